//! The TPM flow end to end against a real software TPM (swtpm) started by the test:
//! an EK certificate made by `swtpm_setup` with a local CA, AK creation, credential
//! activation, a bound quote verified into claims, a policy decision, and a PCR extend
//! that changes the decision under a policy pinning that PCR.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use edgefleet_agent::attest::tpm::TpmAttester;
use edgefleet_trust::attestation::policy::Policy;
use edgefleet_trust::attestation::tpm::{self, TpmOptions};
use edgefleet_trust::attestation::{binding, pem_certificates, tpm_enrol};
use serde_json::json;

/// swtpm with fresh state and its own local CA; killed on drop.
struct Swtpm {
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
    fn start() -> Self {
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

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    fn ca(&self, name: &str) -> Vec<u8> {
        pem_certificates(&std::fs::read(self.dir.path().join("ca").join(name)).unwrap())
            .unwrap()
            .remove(0)
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tpm_policy(pcr16: &str) -> Policy {
    let rego = std::fs::read_to_string(repo().join("policies/attestation.rego")).unwrap();
    let data = json!({"reference": {"allowed_tees": ["tpm"], "allow_debug": false,
        "snp": {"min_tcb": {}, "launch_measurements": []}, "tdx": {"mr_td": []},
        "tpm": {"pcrs": {"pcr16": [pcr16]}}}});
    Policy::load("tpm-pinned", &rego, &data.to_string()).unwrap()
}

#[test]
fn swtpm_enrols_attests_and_a_pcr_extend_changes_the_decision() {
    let swtpm = Swtpm::start();
    let mut tpm = TpmAttester::open(&swtpm.tcti()).unwrap();

    // The EK certificate chains to the local CA (root, via its issuing certificate).
    let ek_cert = tpm.ek_certificate().unwrap();
    let root = swtpm.ca("swtpm-localca-rootca-cert.pem");
    let issuer = swtpm.ca("issuercert.pem");
    let ek_spki = tpm_enrol::verify_ek_certificate(
        &ek_cert,
        std::slice::from_ref(&issuer),
        &root,
        SystemTime::now(),
    )
    .unwrap();
    // Without the issuing certificate, or under another CA, it does not.
    assert_eq!(
        tpm_enrol::verify_ek_certificate(&ek_cert, &[], &root, SystemTime::now())
            .unwrap_err()
            .reason(),
        "ChainInvalid"
    );
    assert!(
        tpm_enrol::verify_ek_certificate(
            &ek_cert,
            std::slice::from_ref(&issuer),
            &issuer,
            SystemTime::now()
        )
        .is_ok(),
        "the issuing CA itself may be configured as the EK CA"
    );
    let other = Swtpm::start();
    let other_root = other.ca("swtpm-localca-rootca-cert.pem");
    assert_eq!(
        tpm_enrol::verify_ek_certificate(&ek_cert, &[issuer], &other_root, SystemTime::now())
            .unwrap_err()
            .reason(),
        "ChainInvalid"
    );

    // The AK is a restricted signing key, and we name it as the TPM does.
    let ak = tpm_enrol::parse_ak_public(&tpm.ak_public_area().unwrap()).unwrap();
    assert_eq!(ak.name, tpm.ak_name().unwrap());

    // Credential activation: only the TPM holding both the EK and the named AK recovers
    // the secret.
    let secret = *b"edgefleet credential challenge!!";
    let (blob, enc) = tpm_enrol::make_credential(&ek_spki, &ak.name, &secret).unwrap();
    assert_eq!(tpm.activate_credential(&blob, &enc).unwrap(), secret);
    let mut wrong_name = ak.name.clone();
    wrong_name[10] ^= 1;
    let (blob, enc) = tpm_enrol::make_credential(&ek_spki, &wrong_name, &secret).unwrap();
    assert!(
        tpm.activate_credential(&blob, &enc).is_err(),
        "a credential for another AK name must not activate"
    );

    // A quote bound to the challenge verifies into claims the policy allows.
    let nonce = b"challenge-nonce-0001";
    let bound = binding::report_data(nonce, b"agent-public-key-der", "store-042-till-1");
    let evidence = tpm.quote(&bound).unwrap();
    let expected = TpmOptions {
        expected_nonce: Some(bound.to_vec()),
        previous: None,
        ak_trusted: true,
    };
    let (claims, clock) = tpm::verify(&evidence, &expected).unwrap();
    assert!(claims.hardware_genuine);
    assert_eq!(
        evidence.ak_public,
        base64_of(&tpm_enrol::ak_spki_der(&ak).unwrap())
    );
    let pcr16 = claims.measurements["pcr16"].clone();
    let policy = tpm_policy(&pcr16);
    let decision = policy.evaluate(&claims).unwrap();
    assert!(decision.allow, "{:?}", decision.deny);

    // The same quote for another device's binding is refused.
    let relayed = binding::report_data(nonce, b"agent-public-key-der", "store-043-till-1");
    let err = tpm::verify(
        &evidence,
        &TpmOptions {
            expected_nonce: Some(relayed.to_vec()),
            ..expected.clone()
        },
    )
    .unwrap_err();
    assert_eq!(err.reason(), "ReportDataMismatch");

    // Extending the pinned PCR changes the decision.
    tpm.extend_debug_pcr([0x42; 32]).unwrap();
    let evidence = tpm.quote(&bound).unwrap();
    let (claims, clock2) = tpm::verify(
        &evidence,
        &TpmOptions {
            previous: Some(clock),
            ..expected
        },
    )
    .unwrap();
    assert!(clock2.clock >= clock.clock);
    assert_ne!(claims.measurements["pcr16"], pcr16);
    let decision = policy.evaluate(&claims).unwrap();
    assert!(!decision.allow);
    assert_eq!(decision.deny, ["TPM pcr16 is not an allowed value"]);
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
