//! The configfs-tsm attester against a fake configfs tree that behaves like the kernel
//! (outblob is a FIFO the fake kernel fills after reading inblob and bumping
//! generation), and the development attester against its verifier.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use edgefleet_agent::attest::AttestError;
use edgefleet_agent::attest::configfs_tsm::ConfigfsTsm;
use edgefleet_agent::attest::dev::DevAttester;
use edgefleet_trust::attestation::{TeeKind, dev};

/// Prepares the entry the attester will use and starts a fake kernel for one request.
/// `bump` is how far generation advances (1 normally; 2 simulates a concurrent writer).
fn fake_kernel(
    root: &Path,
    provider: &str,
    report: Vec<u8>,
    bump: u64,
) -> std::thread::JoinHandle<Vec<u8>> {
    let entry = root.join(format!("edgefleet-{}", std::process::id()));
    std::fs::create_dir_all(&entry).unwrap();
    std::fs::write(entry.join("generation"), "7\n").unwrap();
    std::fs::write(entry.join("provider"), format!("{provider}\n")).unwrap();
    let fifo = entry.join("outblob");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    std::thread::spawn(move || {
        // Opening the FIFO for writing blocks until the attester opens it to read, which
        // it does only after writing inblob.
        let mut out = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        let inblob = std::fs::read(entry.join("inblob")).unwrap();
        std::fs::write(entry.join("generation"), format!("{}\n", 7 + bump)).unwrap();
        let mut blob = report;
        blob.extend_from_slice(&inblob);
        out.write_all(&blob).unwrap();
        inblob
    })
}

fn root() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tsm/report");
    std::fs::create_dir_all(&root).unwrap();
    (dir, root)
}

#[test]
fn configfs_tsm_writes_the_binding_and_returns_the_report() {
    let (_dir, root) = root();
    let kernel = fake_kernel(&root, "sev_guest", b"SNP-REPORT:".to_vec(), 1);
    let report_data = [0xab; 64];
    let report = ConfigfsTsm::new(&root).report(&report_data).unwrap();
    assert_eq!(kernel.join().unwrap(), report_data);
    assert_eq!(report.provider, "sev_guest");
    assert!(report.outblob.starts_with(b"SNP-REPORT:"));
    assert_eq!(&report.outblob[11..], &report_data);
    assert_eq!(report.auxblob, None);
}

#[test]
fn configfs_tsm_detects_a_concurrent_request() {
    let (_dir, root) = root();
    let kernel = fake_kernel(&root, "tdx_guest", b"QUOTE".to_vec(), 2);
    let err = ConfigfsTsm::new(&root).report(&[1; 64]).unwrap_err();
    kernel.join().unwrap();
    assert!(
        matches!(
            err,
            AttestError::Generation {
                before: 7,
                after: 9
            }
        ),
        "{err}"
    );
}

#[test]
fn configfs_tsm_without_the_interface_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = ConfigfsTsm::new(dir.path().join("no/such/tsm"))
        .report(&[0; 64])
        .unwrap_err();
    assert!(matches!(err, AttestError::Configfs { .. }), "{err}");
}

#[test]
fn dev_evidence_verifies_as_not_genuine_and_binds() {
    let att = DevAttester::generate();
    let rd = [5u8; 64];
    let ev = att.evidence(&rd).unwrap();
    let claims = dev::verify(&ev, Some(&rd)).unwrap();
    assert_eq!(claims.tee, TeeKind::Dev);
    assert!(!claims.hardware_genuine);
    assert_eq!(
        dev::verify(&ev, Some(&[6u8; 64])).unwrap_err().reason(),
        "ReportDataMismatch"
    );
    let mut forged = ev.clone();
    forged.report_data = hex::encode([6u8; 64]);
    assert_eq!(
        dev::verify(&forged, None).unwrap_err().reason(),
        "SignatureInvalid"
    );
}
