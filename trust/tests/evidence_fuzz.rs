//! No evidence bytes make a verifier panic: random bytes and genuine evidence with
//! random edits always come back as a named error or as verified claims.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::{collateral_dir, intel_root, milan, now, read, tpm_evidence, when};
use edgefleet_trust::attestation::snp::{self, SnpOptions};
use edgefleet_trust::attestation::tdx::{self, TdxOptions};
use edgefleet_trust::attestation::tdx_collateral::TdxCollateral;
use edgefleet_trust::attestation::tpm::{self, TpmOptions};
use proptest::prelude::*;

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
        let roots = milan();
        let vcek = read("trustee-snp-vcek.der");
        prop_assert!(snp::verify(&bytes, &vcek, &roots, now(), &SnpOptions::default()).is_err());
        let report = edit(read("trustee-snp-report.bin"), &edits);
        let _ = snp::verify(&report, &vcek, &roots, now(), &SnpOptions::default());
        let _ = snp::verify(&read("trustee-snp-report.bin"), &edit(vcek.clone(), &edits), &roots, now(), &SnpOptions::default());
    }

    #[test]
    fn tdx_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..6000),
                        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let root = intel_root();
        prop_assert!(tdx::verify(&bytes, &root, now(), &TdxOptions::default()).is_err());
        let quote = edit(read("trustee-tdx_quote_5.dat"), &edits);
        let _ = tdx::verify(&quote, &root, now(), &TdxOptions::default());
    }

    #[test]
    fn tdx_collateral_never_panics(text in "\\PC{0,400}",
                                   edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let root = intel_root();
        let genuine = TdxCollateral::load_dir(&collateral_dir()).unwrap();
        let quote = read("gotdx-quote-v5.dat");
        let run = |c: TdxCollateral| {
            let opts = TdxOptions { collateral: Some(Arc::new(c)), ..TdxOptions::default() };
            tdx::verify(&quote, &root, when(), &opts)
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
        let genuine = tpm_evidence();
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
