//! Attestation verifiers on genuine recorded evidence, with every region's tampering,
//! and the Rego appraisal policy.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::path::Path;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::{intel_root, later, milan, now, read, tpm_evidence};
use edgefleet_trust::attestation::policy::Policy;
use edgefleet_trust::attestation::snp::{self, SnpOptions, SnpRoots};
use edgefleet_trust::attestation::tdx::{self, TdxOptions};
use edgefleet_trust::attestation::tpm::{self, ClockState, TpmEvidence, TpmOptions};
use edgefleet_trust::attestation::{AttestationError, Claims, TeeKind};
use rstest::rstest;
use serde_json::json;

fn flip(mut v: Vec<u8>, at: usize) -> Vec<u8> {
    v[at] ^= 0x01;
    v
}

/// A self-signed certificate with the same subject as `der` but a different key.
fn impostor_of(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = rcgen::DistinguishedName::new();
    for rdn in cert.subject().iter() {
        for attr in rdn.iter() {
            let value = attr.as_str().unwrap().to_owned();
            let oid: Vec<u64> = attr.attr_type().iter().unwrap().collect();
            dn.push(rcgen::DnType::from_oid(&oid), value);
        }
    }
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    params.self_signed(&key).unwrap().der().to_vec()
}

// ---- SEV-SNP ----------------------------------------------------------------------

/// What an SNP verification takes, genuine unless a test edits it: trustee's report and
/// VCEK, the Milan roots, at `now()`.
struct SnpInputs {
    report: Vec<u8>,
    vcek: Vec<u8>,
    roots: Vec<SnpRoots>,
    at: SystemTime,
}

impl SnpInputs {
    fn genuine() -> Self {
        Self {
            report: read("trustee-snp-report.bin"),
            vcek: read("trustee-snp-vcek.der"),
            roots: milan(),
            at: now(),
        }
    }

    fn verify(&self, options: &SnpOptions) -> Result<Claims, AttestationError> {
        snp::verify(&self.report, &self.vcek, &self.roots, self.at, options)
    }
}

/// SNP options that expect `report_data` to be bound.
fn snp_bound_to(report_data: Vec<u8>) -> SnpOptions {
    SnpOptions {
        expected_report_data: Some(report_data),
        ..Default::default()
    }
}

#[test]
fn genuine_snp_report_verifies_into_claims() {
    let c = SnpInputs::genuine().verify(&SnpOptions::default()).unwrap();
    assert_eq!(c.tee, TeeKind::SevSnp);
    assert!(c.hardware_genuine && !c.debug);
    assert_eq!(c.tcb["microcode"], json!(115));
    assert_eq!(c.tcb["bootloader"], json!(3));
    assert_eq!(c.platform["product"], json!("Milan-B0"));
    assert_eq!(c.measurements["launch_measurement"].len(), 96);
    assert!(c.report_data.starts_with("ec6c52d7533cc2c4"));
    assert_eq!(c.key_binding, None);
}

#[test]
fn snp_debug_guest_is_rejected_unless_allowed() {
    let gosev = SnpInputs {
        report: read("gosev-attestation.bin"),
        vcek: read("gosev-vcek.der"),
        roots: vec![SnpRoots::from_pem("Milan", &read("gosev-milan.testcer")).unwrap()],
        at: now(),
    };
    let err = gosev.verify(&SnpOptions::default()).unwrap_err();
    assert_eq!(err.reason(), "DebugEnabled", "{err}");
    let allow_debug = SnpOptions {
        allow_debug: true,
        ..Default::default()
    };
    assert!(gosev.verify(&allow_debug).unwrap().debug);
}

#[rstest]
#[case::version(0x00, "SignatureInvalid")]
#[case::policy(0x08, "SignatureInvalid")]
#[case::report_data(0x50, "SignatureInvalid")]
#[case::measurement(0x90, "SignatureInvalid")]
#[case::reported_tcb(0x180, "SignatureInvalid")]
#[case::chip_id(0x1A0, "SignatureInvalid")]
#[case::signature_r(0x2A0, "SignatureInvalid")]
#[case::signature_s(0x2A0 + 72 + 10, "SignatureInvalid")]
fn each_snp_report_region_is_protected(#[case] at: usize, #[case] reason: &str) {
    let mut i = SnpInputs::genuine();
    i.report = flip(i.report, at);
    let err = i.verify(&SnpOptions::default()).unwrap_err();
    assert_eq!(err.reason(), reason, "{err}");
}

#[rstest]
#[case::unknown_version(|i: &mut SnpInputs| i.report[0] = 9, "Unsupported")]
#[case::truncated_report(|i: &mut SnpInputs| i.report.truncate(1000), "Truncated")]
#[case::garbage_vcek(|i: &mut SnpInputs| i.vcek = b"not a certificate".to_vec(), "MalformedCertificate")]
// The go-sev-guest VCEK is genuine, but for another chip and TCB.
#[case::vcek_of_another_chip(|i: &mut SnpInputs| i.vcek = read("gosev-vcek.der"), "SignatureInvalid")]
// A flipped byte in the VCEK's signature.
#[case::vcek_signature(|i: &mut SnpInputs| { let n = i.vcek.len(); i.vcek[n - 20] ^= 0x01; }, "ChainInvalid")]
// A pinned ASK with a flipped signature byte.
#[case::ask_signature(|i: &mut SnpInputs| { let n = i.roots[0].ask.len(); i.roots[0].ask[n - 20] ^= 0x01; }, "ChainInvalid")]
#[case::wrong_root_with_the_same_name(|i: &mut SnpInputs| i.roots[0].ark = impostor_of(&i.roots[0].ark), "ChainInvalid")]
#[case::chain_expired(|i: &mut SnpInputs| i.at = later(), "CertificateNotValidAt")]
fn snp_evidence_and_chain_faults_are_named(
    #[case] fault: fn(&mut SnpInputs),
    #[case] reason: &str,
) {
    let mut i = SnpInputs::genuine();
    fault(&mut i);
    let err = i.verify(&SnpOptions::default()).unwrap_err();
    assert_eq!(err.reason(), reason, "{err}");
}

#[test]
fn remembered_chain_signatures_still_check_every_byte_and_the_time() {
    let roots = milan();
    let (report, vcek) = (read("trustee-snp-report.bin"), read("trustee-snp-vcek.der"));
    let opts = SnpOptions::default();
    snp::verify(&report, &vcek, &roots, now(), &opts).unwrap();
    // The clone shares what was remembered; a same-named impostor ARK is still refused,
    // because the remembered pairs are keyed by both certificates' bytes.
    let mut impostor = roots.clone();
    impostor[0].ark = impostor_of(&impostor[0].ark);
    let err = snp::verify(&report, &vcek, &impostor, now(), &opts).unwrap_err();
    assert_eq!(err.reason(), "ChainInvalid", "{err}");
    // A VCEK whose own signature is altered is checked afresh.
    let tampered = flip(vcek.clone(), vcek.len() - 5);
    let err = snp::verify(&report, &tampered, &roots, now(), &opts).unwrap_err();
    assert_eq!(err.reason(), "ChainInvalid", "{err}");
    // Validity is checked on every report.
    let err = snp::verify(&report, &vcek, &roots, later(), &opts).unwrap_err();
    assert_eq!(err.reason(), "CertificateNotValidAt", "{err}");
    assert!(snp::verify(&report, &vcek, &roots, now(), &opts).is_ok());
}

#[test]
fn snp_report_data_must_match_the_binding() {
    let i = SnpInputs::genuine();
    let bound = i.report[0x50..0x90].to_vec();
    let c = i.verify(&snp_bound_to(bound.clone())).unwrap();
    assert_eq!(c.key_binding, Some(hex::encode(&bound)));
    let mut other = bound;
    other[0] ^= 1;
    let err = i.verify(&snp_bound_to(other)).unwrap_err();
    assert_eq!(err.reason(), "ReportDataMismatch");
}

// ---- TDX --------------------------------------------------------------------------

#[rstest]
#[case::trustee_v4("trustee-tdx_quote_4.dat", 4, true)]
#[case::trustee_v5("trustee-tdx_quote_5.dat", 5, false)]
#[case::gotdx_v4("gotdx-quote-v4.dat", 4, false)]
#[case::gotdx_v5("gotdx-quote-v5.dat", 5, false)]
fn genuine_tdx_quotes_verify(#[case] name: &str, #[case] version: u64, #[case] debug: bool) {
    let quote = read(name);
    let opts = TdxOptions {
        allow_debug: true,
        ..Default::default()
    };
    let c =
        tdx::verify(&quote, &intel_root(), now(), &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(c.tee, TeeKind::Tdx);
    assert_eq!(c.platform["quote_version"], json!(version));
    assert_eq!(c.debug, debug);
    assert_eq!(c.tcb["tcb_status"], json!("unknown"));
    assert_eq!(c.measurements["mr_td"].len(), 96);
    if debug {
        let err = tdx::verify(&quote, &intel_root(), now(), &TdxOptions::default()).unwrap_err();
        assert_eq!(err.reason(), "DebugEnabled");
    }
}

/// Offsets in trustee's v5 quote: header 48, body descriptor 6, body 648, then the
/// signature data (4-byte length, quote signature, AK, certification data).
const V5_BODY: usize = 54;
const V5_SIG: usize = 54 + 648 + 4;
const V5_CERT: usize = V5_SIG + 134;

#[rstest]
#[case::header_qe_svn(8, "SignatureInvalid")]
#[case::mr_td(V5_BODY + 136, "SignatureInvalid")]
#[case::rtmr0(V5_BODY + 328, "SignatureInvalid")]
#[case::report_data(V5_BODY + 520, "SignatureInvalid")]
#[case::quote_signature(V5_SIG + 5, "SignatureInvalid")]
#[case::attestation_key(V5_SIG + 64 + 5, "Malformed")]
#[case::qe_report(V5_CERT + 10, "SignatureInvalid")]
#[case::qe_report_signature(V5_CERT + 384 + 3, "SignatureInvalid")]
#[case::qe_auth_data(V5_CERT + 384 + 64 + 2 + 1, "QeBindingMismatch")]
#[case::pck_chain(V5_CERT + 384 + 64 + 2 + 32 + 6 + 200, "ChainInvalid")]
fn each_tdx_quote_region_is_protected(#[case] at: usize, #[case] reason: &str) {
    let quote = flip(read("trustee-tdx_quote_5.dat"), at);
    let err = tdx::verify(&quote, &intel_root(), now(), &TdxOptions::default()).unwrap_err();
    assert_eq!(err.reason(), reason, "{err}");
}

#[test]
fn tdx_wrong_root_and_expiry_are_rejected() {
    let quote = read("trustee-tdx_quote_5.dat");
    let err = tdx::verify(
        &quote,
        &impostor_of(&intel_root()),
        now(),
        &TdxOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.reason(), "ChainInvalid", "{err}");
    let err = tdx::verify(&quote, &intel_root(), later(), &TdxOptions::default()).unwrap_err();
    assert_eq!(err.reason(), "CertificateNotValidAt", "{err}");
    let err = tdx::verify(&quote[..700], &intel_root(), now(), &TdxOptions::default()).unwrap_err();
    assert_eq!(err.reason(), "Truncated", "{err}");
}

#[test]
fn tdx_report_data_must_match_the_binding() {
    let quote = read("trustee-tdx_quote_5.dat");
    let bound_to = |report_data: Vec<u8>| {
        let opts = TdxOptions {
            expected_report_data: Some(report_data),
            ..Default::default()
        };
        tdx::verify(&quote, &intel_root(), now(), &opts)
    };
    let c = bound_to(quote[V5_BODY + 520..V5_BODY + 584].to_vec()).unwrap();
    assert!(c.key_binding.is_some());
    let err = bound_to(vec![0; 64]).unwrap_err();
    assert_eq!(err.reason(), "ReportDataMismatch");
}

// ---- TPM --------------------------------------------------------------------------

fn tpm_nonce(e: &TpmEvidence) -> Vec<u8> {
    let msg = B64.decode(&e.tpm_quote.message).unwrap();
    tpm::parse_attest(&msg).unwrap().extra_data
}

#[test]
fn genuine_tpm_quote_verifies_with_its_nonce() {
    let e = tpm_evidence();
    let (c, clock) = tpm::verify(
        &e,
        &TpmOptions {
            expected_nonce: Some(tpm_nonce(&e)),
            ak_trusted: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.tee, TeeKind::Tpm);
    assert!(c.hardware_genuine);
    assert_eq!(c.measurements.len(), 24);
    assert_eq!(c.measurements["pcr17"], "f".repeat(64));
    assert_eq!(c.platform["signature_scheme"], json!("rsassa"));
    assert_eq!(clock.reset_count, 2);
}

#[test]
fn tpm_wrong_nonce_is_rejected() {
    let e = tpm_evidence();
    let err = tpm::verify(
        &e,
        &TpmOptions {
            expected_nonce: Some(vec![0; 64]),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.reason(), "ReportDataMismatch");
}

#[rstest]
#[case::quote(|e: &mut TpmEvidence| {
    let msg = B64.decode(&e.tpm_quote.message).unwrap();
    e.tpm_quote.message = B64.encode(flip(msg, 40));
}, "SignatureInvalid")]
#[case::pcr(|e: &mut TpmEvidence| e.tpm_quote.pcrs[7] = "11".repeat(32), "PcrDigestMismatch")]
#[case::ak(|e: &mut TpmEvidence| {
    let ak = B64.decode(&e.ak_public).unwrap();
    let n = ak.len();
    e.ak_public = B64.encode(flip(ak, n - 10));
}, "SignatureInvalid")]
fn tpm_quote_and_pcr_tampering_is_caught(
    #[case] tamper: fn(&mut TpmEvidence),
    #[case] reason: &str,
) {
    let mut e = tpm_evidence();
    tamper(&mut e);
    let err = tpm::verify(&e, &TpmOptions::default()).unwrap_err();
    assert_eq!(err.reason(), reason, "{err}");
}

#[rstest]
#[case::reset_went_down(ClockState { clock: 0, reset_count: 3, restart_count: 0 }, "ClockRollback")]
#[case::restart_went_down(ClockState { clock: 0, reset_count: 2, restart_count: 1 }, "ClockRollback")]
#[case::clock_went_back(ClockState { clock: u64::MAX, reset_count: 2, restart_count: 0 }, "ClockRollback")]
fn tpm_counters_must_not_go_back(#[case] previous: ClockState, #[case] reason: &str) {
    let e = tpm_evidence();
    let after = |previous: ClockState| {
        let opts = TpmOptions {
            previous: Some(previous),
            ..Default::default()
        };
        tpm::verify(&e, &opts)
    };
    let err = after(previous).unwrap_err();
    assert_eq!(err.reason(), reason, "{err}");
    // An earlier state is fine.
    let earlier = ClockState {
        clock: 1,
        reset_count: 2,
        restart_count: 0,
    };
    after(earlier).unwrap();
}

/// Builds and signs (ECDSA P-256) a TPMS_ATTEST, to reach checks behind the signature.
fn own_quote(safe: bool, pcrs: &[String]) -> TpmEvidence {
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::EncodePublicKey as _;
    use sha2::Digest as _;
    let key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
    let mut m = Vec::new();
    m.extend(0xff54_4347u32.to_be_bytes());
    m.extend(0x8018u16.to_be_bytes());
    m.extend(2u16.to_be_bytes());
    m.extend([0, 0x0b]);
    m.extend(8u16.to_be_bytes());
    m.extend(b"noncenon");
    m.extend(1000u64.to_be_bytes());
    m.extend(1u32.to_be_bytes());
    m.extend(0u32.to_be_bytes());
    m.push(u8::from(safe));
    m.extend(0u64.to_be_bytes());
    m.extend(1u32.to_be_bytes());
    m.extend(0x000bu16.to_be_bytes());
    m.push(3);
    m.extend([0b1000_0000, 0, 0]); // PCR 7
    let digest = sha2::Sha256::digest(hex::decode(&pcrs[7]).unwrap());
    m.extend(32u16.to_be_bytes());
    m.extend(digest);
    let sig: p256::ecdsa::Signature = key.sign(&m);
    let (r, s) = sig.split_bytes();
    let mut t = Vec::new();
    t.extend(0x0018u16.to_be_bytes());
    t.extend(0x000bu16.to_be_bytes());
    t.extend(32u16.to_be_bytes());
    t.extend(r);
    t.extend(32u16.to_be_bytes());
    t.extend(s);
    let spki = key.verifying_key().to_public_key_der().unwrap();
    TpmEvidence {
        ak_public: B64.encode(spki.as_bytes()),
        tpm_quote: tpm::TpmQuote {
            message: B64.encode(m),
            signature: B64.encode(t),
            pcrs: pcrs.to_vec(),
        },
    }
}

#[test]
fn tpm_ecdsa_quotes_verify_and_unsafe_clocks_are_rejected() {
    let pcrs: Vec<String> = (0..24).map(|i| format!("{i:02x}").repeat(32)).collect();
    let (c, _) = tpm::verify(
        &own_quote(true, &pcrs),
        &TpmOptions {
            expected_nonce: Some(b"noncenon".to_vec()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.platform["signature_scheme"], json!("ecdsa"));
    assert_eq!(c.measurements.keys().collect::<Vec<_>>(), ["pcr07"]);
    assert!(
        !c.hardware_genuine,
        "an AK not bound to a TPM is not hardware-genuine"
    );
    assert_eq!(c.platform["clock_safe"], json!(true));
    let err = tpm::verify(&own_quote(false, &pcrs), &TpmOptions::default()).unwrap_err();
    assert_eq!(err.reason(), "ClockNotSafe");
}

#[test]
fn an_unsafe_clock_after_a_tpm_reset_is_let_through_for_the_policy_to_decide() {
    let pcrs: Vec<String> = (0..24).map(|i| format!("{i:02x}").repeat(32)).collect();
    // The quote's resetCount is 1.
    let after = |reset_count: u32| TpmOptions {
        expected_nonce: Some(b"noncenon".to_vec()),
        previous: Some(ClockState {
            clock: 5000,
            reset_count,
            restart_count: 0,
        }),
        ..Default::default()
    };
    // A power cut, then a reboot: the reset count rose, so the clock is not compared
    // and the quote stands, marked.
    let (mut c, _) = tpm::verify(&own_quote(false, &pcrs), &after(0)).unwrap();
    assert_eq!(c.platform["clock_safe"], json!(false));
    // Later in the same power cycle (a re-attestation before the TPM saved its
    // clock): accepted while the clock moves on from the last quote, a rollback if it
    // went back.
    let within = |clock: u64| TpmOptions {
        previous: Some(ClockState {
            clock,
            reset_count: 1,
            restart_count: 0,
        }),
        ..after(1)
    };
    let (again, _) = tpm::verify(&own_quote(false, &pcrs), &within(900)).unwrap();
    assert_eq!(again.platform["clock_safe"], json!(false));
    let err = tpm::verify(&own_quote(false, &pcrs), &within(5000)).unwrap_err();
    assert_eq!(err.reason(), "ClockRollback");
    // Nothing to compare with: refused until the TPM saves its clock again.
    let err = tpm::verify(&own_quote(false, &pcrs), &TpmOptions::default()).unwrap_err();
    assert_eq!(err.reason(), "ClockNotSafe");
    // The reference policy allows it; a reference without the allowance denies it by
    // name.
    c.hardware_genuine = true;
    let d = policy().evaluate(&c).unwrap();
    assert!(d.allow, "{:?}", d.deny);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rego = std::fs::read_to_string(root.join("policies/attestation.rego")).unwrap();
    let mut data: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("policies/reference.json")).unwrap(),
    )
    .unwrap();
    data["reference"]["tpm"]
        .as_object_mut()
        .unwrap()
        .remove("allow_unsafe_clock_after_reset");
    let strict = Policy::load("attestation", &rego, &data.to_string()).unwrap();
    let d = strict.evaluate(&c).unwrap();
    assert_eq!(d.deny, ["TPM clock is not safe after an unclean shutdown"]);
    // A safe clock is no concern of that rule.
    c.platform.insert("clock_safe".into(), json!(true));
    assert!(strict.evaluate(&c).unwrap().allow);
}

// ---- policy -----------------------------------------------------------------------

fn policy() -> Policy {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rego = std::fs::read_to_string(root.join("policies/attestation.rego")).unwrap();
    let data = std::fs::read_to_string(root.join("policies/reference.json")).unwrap();
    Policy::load("attestation", &rego, &data).unwrap()
}

fn snp_claims() -> Claims {
    let i = SnpInputs::genuine();
    i.verify(&snp_bound_to(i.report[0x50..0x90].to_vec()))
        .unwrap()
}

#[rstest]
#[case::genuine_bound_snp(|_c: &mut Claims| {}, None)]
#[case::unbound(|c: &mut Claims| c.key_binding = None, Some("evidence is not bound to the expected nonce and key"))]
#[case::dev_attester(|c: &mut Claims| { c.tee = TeeKind::Dev; c.hardware_genuine = false; }, Some("evidence kind dev is not allowed"))]
#[case::not_genuine(|c: &mut Claims| c.hardware_genuine = false, Some("evidence does not chain to a hardware root of trust"))]
#[case::debug(|c: &mut Claims| c.debug = true, Some("debugging is enabled"))]
#[case::old_microcode(|c: &mut Claims| { c.tcb.insert("microcode".into(), json!(100)); }, Some("SNP microcode SPL 100 is below the minimum 115"))]
fn policy_decides_on_claims(#[case] edit: fn(&mut Claims), #[case] denied: Option<&str>) {
    let mut c = snp_claims();
    edit(&mut c);
    let d = policy().evaluate(&c).unwrap();
    assert!(d.policy_hash.starts_with("sha256:") && d.policy_hash.len() == 71);
    match denied {
        None => assert!(d.allow, "{:?}", d.deny),
        Some(reason) => {
            assert!(!d.allow);
            assert!(d.deny.iter().any(|r| r == reason), "{:?}", d.deny);
        }
    }
}

#[rstest]
#[case::up_to_date("UpToDate", None)]
#[case::out_of_date("OutOfDate", Some("TDX TCB status OutOfDate is not an allowed one"))]
#[case::no_collateral("unknown", Some("TDX TCB status unknown is not an allowed one"))]
fn the_reference_policy_admits_only_up_to_date_tdx(
    #[case] status: &str,
    #[case] denied: Option<&str>,
) {
    let quote = read("gotdx-quote-v5.dat");
    let mut c = tdx::verify(&quote, &intel_root(), now(), &TdxOptions::default()).unwrap();
    // As if bound: the binding rule is not what this case is about.
    c.key_binding = Some(c.report_data.clone());
    c.tcb.insert("tcb_status".into(), json!(status));
    let d = policy().evaluate(&c).unwrap();
    match denied {
        None => assert!(d.allow, "{:?}", d.deny),
        Some(reason) => assert_eq!(d.deny, [reason]),
    }
}

#[test]
fn policy_pins_measurements_from_data() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rego = std::fs::read_to_string(root.join("policies/attestation.rego")).unwrap();
    let c = snp_claims();
    let pinned = json!({"reference": {"allowed_tees": ["sev-snp"], "allow_debug": false,
        "snp": {"min_tcb": {}, "launch_measurements": [c.measurements["launch_measurement"]]}, "tdx": {"mr_td": []}, "tpm": {"pcrs": {}}}});
    let p = Policy::load("pinned", &rego, &pinned.to_string()).unwrap();
    assert!(p.evaluate(&c).unwrap().allow);
    let other = json!({"reference": {"allowed_tees": ["sev-snp"], "allow_debug": false,
        "snp": {"min_tcb": {}, "launch_measurements": ["00".repeat(48)]}, "tdx": {"mr_td": []}, "tpm": {"pcrs": {}}}});
    let p = Policy::load("other", &rego, &other.to_string()).unwrap();
    let d = p.evaluate(&c).unwrap();
    assert!(!d.allow);
    assert_eq!(d.deny, ["SNP launch measurement is not an allowed one"]);
}

#[test]
fn a_policy_that_does_not_compile_is_rejected_at_load() {
    let err =
        Policy::load("broken", "package edgefleet.attestation\nallow if {", "{}").unwrap_err();
    assert!(err.to_string().contains("does not compile"), "{err}");
}

#[test]
fn attestation_errors_have_distinct_reasons() {
    let errs = [
        AttestationError::DebugEnabled.reason(),
        AttestationError::ReportDataMismatch.reason(),
        AttestationError::QeBindingMismatch.reason(),
        AttestationError::PcrDigestMismatch.reason(),
        AttestationError::ClockNotSafe.reason(),
        AttestationError::CollateralInvalid(String::new()).reason(),
        AttestationError::CollateralMissing(String::new()).reason(),
        AttestationError::TcbNotSupported(String::new()).reason(),
        AttestationError::QeIdentityMismatch(String::new()).reason(),
        AttestationError::ChainInvalid(String::new()).reason(),
    ];
    let unique: std::collections::BTreeSet<_> = errs.iter().collect();
    assert_eq!(unique.len(), errs.len());
}
