//! A real software TPM (swtpm) with fresh state and its own local CA, made by
//! `swtpm_setup` the way a TPM vendor provisions an EK certificate. Test support:
//! panics on setup failure, kills swtpm on drop.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a panic is the failure report

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgefleet_trust::attestation::pem_certificates;

/// swtpm with fresh state and its own local CA; killed on drop.
#[derive(Debug)]
pub struct Swtpm {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < 65000 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

impl Swtpm {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("state")).unwrap();
        std::fs::create_dir_all(d.join("ca")).unwrap();
        std::fs::write(
            d.join("localca.conf"),
            format!(
                "statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n",
                ca = d.join("ca").display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("localca.options"),
            "--platform-manufacturer edgefleet\n--platform-version 2.1\n--platform-model swtpm\n",
        )
        .unwrap();
        std::fs::write(
            d.join("setup.conf"),
            format!(
                "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {}\ncreate_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
                d.join("localca.conf").display(),
                d.join("localca.options").display()
            ),
        )
        .unwrap();
        let out = Command::new("swtpm_setup")
            .args([
                "--tpm2",
                "--createek",
                "--create-ek-cert",
                "--create-platform-cert",
                "--overwrite",
                "--tpmstate",
            ])
            .arg(d.join("state"))
            .arg("--config")
            .arg(d.join("setup.conf"))
            .output()
            .expect("swtpm_setup runs (apt: swtpm swtpm-tools)");
        assert!(
            out.status.success(),
            "swtpm_setup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port_pair();
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
            .arg("--tpmstate")
            .arg(format!("dir={}", d.join("state").display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm runs");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "swtpm did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { dir, child, port }
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The PEM file `name` of the EK CA that `swtpm_setup` used.
    pub fn ca_path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join("ca").join(name)
    }

    pub fn ca(&self, name: &str) -> Vec<u8> {
        pem_certificates(&std::fs::read(self.dir.path().join("ca").join(name)).unwrap())
            .unwrap()
            .remove(0)
    }
}

/// The evidence a TPM device answers `challenge` with, as the agent does: activate the
/// gateway's credential with the EK, quote with the AK over the challenge's report data.
/// Test code: a TPM or challenge that cannot do this fails the test.
pub fn tpm_evidence(
    tpm: &mut edgefleet_agent::attest::tpm::TpmAttester,
    challenge: edgefleet_trust::attestation::service::Challenge,
    device: &str,
    csr: String,
) -> edgefleet_trust::attestation::service::EvidenceRequest {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    let cred = challenge
        .credential
        .clone()
        .expect("a TPM challenge carries a credential");
    let secret = tpm
        .activate_credential(
            &B64.decode(&cred.id_object).expect("id_object is base64"),
            &B64.decode(&cred.encrypted_secret)
                .expect("encrypted_secret is base64"),
        )
        .expect("the TPM activates its credential");
    let rd: [u8; 64] = hex::decode(&challenge.report_data)
        .expect("report data is hex")
        .try_into()
        .expect("report data is 64 bytes");
    let quote = tpm
        .quote(&edgefleet_trust::attestation::binding::tpm_qualifying_data(
            &rd,
        ))
        .expect("the TPM quotes");
    edgefleet_trust::attestation::service::EvidenceRequest {
        device: device.to_owned(),
        nonce: challenge.nonce,
        csr,
        evidence: edgefleet_trust::attestation::service::Evidence::Tpm {
            evidence: quote,
            credential: B64.encode(secret),
        },
    }
}
