//! No evidence bytes make a verifier panic: random bytes and genuine evidence with
//! random edits always come back as a named error or as verified claims.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use edgefleet_trust::attestation::pem_certificates;
use edgefleet_trust::attestation::snp::{self, SnpOptions, SnpRoots};
use edgefleet_trust::attestation::tdx::{self, TdxOptions};
use edgefleet_trust::attestation::tdx_collateral::TdxCollateral;
use edgefleet_trust::attestation::tpm::{self, TpmEvidence, TpmOptions};
use proptest::prelude::*;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/attestation")
}
fn read(n: &str) -> Vec<u8> {
    std::fs::read(dir().join(n)).unwrap()
}
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_780_272_000)
}

fn edit(mut v: Vec<u8>, edits: &[(prop::sample::Index, u8)]) -> Vec<u8> {
    for (at, b) in edits {
        let i = at.index(v.len());
        v[i] = *b;
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn snp_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1400),
                        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let roots = vec![SnpRoots::from_pem("Milan", &read("trustee-milan_ask_ark_asvk.pem")).unwrap()];
        let vcek = read("trustee-snp-vcek.der");
        prop_assert!(snp::verify(&bytes, &vcek, &roots, now(), &SnpOptions::default()).is_err());
        let report = edit(read("trustee-snp-report.bin"), &edits);
        let _ = snp::verify(&report, &vcek, &roots, now(), &SnpOptions::default());
        let _ = snp::verify(&read("trustee-snp-report.bin"), &edit(vcek.clone(), &edits), &roots, now(), &SnpOptions::default());
    }

    #[test]
    fn tdx_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..6000),
                        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let root = pem_certificates(&read("intel-sgx-root.pem")).unwrap().remove(0);
        prop_assert!(tdx::verify(&bytes, &root, now(), &TdxOptions::default()).is_err());
        let quote = edit(read("trustee-tdx_quote_5.dat"), &edits);
        let _ = tdx::verify(&quote, &root, now(), &TdxOptions::default());
    }

    #[test]
    fn tdx_collateral_never_panics(text in "\\PC{0,400}",
                                   edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let root = pem_certificates(&read("intel-sgx-root.pem")).unwrap().remove(0);
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tdx-collateral");
        let genuine = TdxCollateral::load_dir(&data).unwrap();
        // 2026-02-01T20:00:00Z, when the genuine collateral is current.
        let when = UNIX_EPOCH + Duration::from_secs(1_769_976_000);
        let quote = read("gotdx-quote-v5.dat");
        let run = |c: TdxCollateral| {
            let opts = TdxOptions { collateral: Some(Arc::new(c)), ..TdxOptions::default() };
            tdx::verify(&quote, &root, when, &opts)
        };
        let mut c = genuine.clone();
        c.tcb_infos.insert("90c06f000000".into(), text.clone());
        prop_assert!(run(c).is_err());
        let mut c = genuine.clone();
        c.qe_identity = text;
        prop_assert!(run(c).is_err());
        // Byte edits of the genuine documents: valid UTF-8 or not, never a panic.
        let mut c = genuine.clone();
        let info = edit(genuine.tcb_infos["90c06f000000"].clone().into_bytes(), &edits);
        c.tcb_infos.insert("90c06f000000".into(), String::from_utf8_lossy(&info).into_owned());
        let _ = run(c);
        let mut c = genuine.clone();
        c.signing_chain = edit(genuine.signing_chain.clone(), &edits);
        let _ = run(c);
    }

    #[test]
    fn tpm_never_panics(msg in proptest::collection::vec(any::<u8>(), 0..300),
                        sig in proptest::collection::vec(any::<u8>(), 0..300),
                        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let _ = tpm::parse_attest(&msg);
        let genuine: TpmEvidence = serde_json::from_slice(&read("trustee-tpm_evidence.json")).unwrap();
        let mut e = genuine.clone();
        e.tpm_quote.message = B64.encode(&msg);
        e.tpm_quote.signature = B64.encode(&sig);
        prop_assert!(tpm::verify(&e, &TpmOptions::default()).is_err());
        let mut e = genuine.clone();
        e.tpm_quote.message = B64.encode(edit(B64.decode(&genuine.tpm_quote.message).unwrap(), &edits));
        let _ = tpm::verify(&e, &TpmOptions::default());
        let mut e = genuine;
        e.tpm_quote.signature = B64.encode(edit(B64.decode(&e.tpm_quote.signature).unwrap(), &edits));
        let _ = tpm::verify(&e, &TpmOptions::default());
    }
}
