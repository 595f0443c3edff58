//! No byte string makes bundle verification panic: random bytes, and valid bundles with
//! random bytes overwritten, always come back as a named error (or, for an untouched
//! bundle, as success). Runs a few hundred cases in CI.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use edgefleet_trust::model_signing::{PublicKey, TrustPolicy, verify_bundle};
use proptest::prelude::*;

fn policy() -> TrustPolicy {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/model-signing");
    let pem = std::fs::read_to_string(dir.join("keys/signing-key-pub.pem")).unwrap();
    TrustPolicy::keys([("k".to_owned(), PublicKey::from_pem(&pem).unwrap())])
}

fn golden() -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/model-signing");
    std::fs::read(dir.join("v1.1.0-ek.sig")).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_rejected_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let now = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let result = verify_bundle(&bytes, &policy(), now);
        prop_assert!(result.is_err());
    }

    #[test]
    fn corrupted_golden_bundles_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bundle = golden();
        let original = bundle.clone();
        for (at, byte) in edits {
            let i = at.index(bundle.len());
            bundle[i] = byte;
        }
        let now = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        match verify_bundle(&bundle, &policy(), now) {
            // Only an edit that leaves what is signed intact may pass: the DSSE payload,
            // its type and the signature itself. Whitespace, unknown fields and the
            // unsigned `keyid` hint may change (a flip of `keyid` to ` eyid` passed a
            // stricter check of the whole envelope, rightly: DSSE does not sign it).
            Ok(_) => {
                let signed = |b: &[u8]| -> Option<serde_json::Value> {
                    let v: serde_json::Value = serde_json::from_slice(b).ok()?;
                    let env = &v["dsseEnvelope"];
                    Some(serde_json::json!([env["payload"], env["payloadType"], env["signatures"][0]["sig"]]))
                };
                let want = signed(&original).unwrap();
                match signed(&bundle) {
                    Some(got) => prop_assert_eq!(got, want),
                    // A strict parser refuses the edited text (say, a lone surrogate
                    // escape in a field the verifier skips unread): then what is
                    // signed must still be in it, byte for byte.
                    None => {
                        for part in want.as_array().unwrap() {
                            let literal = serde_json::to_string(part).unwrap();
                            prop_assert!(
                                bundle.windows(literal.len()).any(|w| w == literal.as_bytes()),
                                "a signed part changed: {}", literal
                            );
                        }
                    }
                }
            }
            Err(e) => prop_assert!(!e.reason().is_empty()),
        }
        prop_assert!(verify_bundle(&original, &policy(), now).is_ok());
    }
}
