//! The TPM flow end to end against a real software TPM (swtpm) started by the test:
//! an EK certificate made by `swtpm_setup` with a local CA, AK creation, credential
//! activation, a bound quote verified into claims, a policy decision, and a PCR extend
//! that changes the decision under a policy pinning that PCR.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use edgefleet_e2e::swtpm::Swtpm;

use edgefleet_agent::attest::tpm::TpmAttester;
use edgefleet_trust::attestation::policy::Policy;
use edgefleet_trust::attestation::tpm::{self, TpmOptions};
use edgefleet_trust::attestation::{binding, tpm_enrol};
use serde_json::json;

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
