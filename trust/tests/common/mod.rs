//! Attestation fixtures shared by the test crates `attestation`, `tdx_collateral` and
//! `evidence_fuzz`: the recorded evidence, the pinned roots, Intel's TDX collateral, and
//! the times at which each is valid.
#![allow(dead_code)] // each test crate uses only some of these
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgefleet_trust::attestation::pem_certificates;
use edgefleet_trust::attestation::snp::SnpRoots;
use edgefleet_trust::attestation::tpm::TpmEvidence;

/// The recorded evidence and roots.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/attestation")
}

/// A file of [`dir`].
pub fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap()
}

/// 2026-06-01: every fixture's chain is valid then.
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_780_272_000)
}

/// 2050-01-01: every fixture's chain has expired.
pub fn later() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(2_524_608_000)
}

/// The pinned AMD Milan roots (ARK, ASK, ASVK).
pub fn milan() -> Vec<SnpRoots> {
    vec![SnpRoots::from_pem("Milan", &read("trustee-milan_ask_ark_asvk.pem")).unwrap()]
}

/// The pinned Intel SGX root, DER.
pub fn intel_root() -> Vec<u8> {
    pem_certificates(&read("intel-sgx-root.pem"))
        .unwrap()
        .remove(0)
}

/// trustee's recorded TPM evidence.
pub fn tpm_evidence() -> TpmEvidence {
    serde_json::from_slice(&read("trustee-tpm_evidence.json")).unwrap()
}

/// Intel's genuine TDX collateral (see data/tdx-collateral/README.md).
pub fn collateral_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tdx-collateral")
}

/// 2026-02-01T20:00:00Z: the one window where the 90c06f000000 TCB info and the QE
/// identity are both current (see data/tdx-collateral/README.md).
pub fn when() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_769_976_000)
}
