#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

//! Receipts as a relying party checks them: with the gateway's real attestation service
//! (dev evidence under the development policy, the device CA issuing the device's
//! certificate and the result signer's), the agent's receipt signer, and
//! [`receipt::verify`] holding nothing but the CA certificate. Every forgery an
//! attacker holding a device's key, another device's receipt, or another CA could try
//! fails by name.

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use edgefleet_agent::attest::dev::DevAttester;
use edgefleet_agent::serve::ReceiptSigner;
use edgefleet_trust::attestation::TeeKind;
use edgefleet_trust::attestation::policy::Policy;
use edgefleet_trust::attestation::service::{
    AttestationService, ChallengeRequest, Evidence, EvidenceRequest, ServiceConfig,
};
use edgefleet_trust::receipt::{self, Claims, ModelClaim, PluginClaim, Provenance};
use serde_json::{Value, json};

fn policy(reference: &str) -> Policy {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rego = std::fs::read_to_string(root.join("policies/attestation.rego")).unwrap();
    let data = std::fs::read_to_string(root.join("policies").join(reference)).unwrap();
    Policy::load("attestation", &rego, &data).unwrap()
}

/// A device CA: certificate (PEM) and key (PEM).
fn new_ca(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(rcgen::DnType::CommonName, name);
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    (ca.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

/// The gateway's service under `reference` (`dev.json` admits the dev attester,
/// `reference.json` does not), with the device CA `ca`.
fn service(ca: &(String, String), reference: &str) -> AttestationService {
    AttestationService::new(
        ServiceConfig {
            nonce_ttl: Duration::from_secs(30),
            result_ttl: Duration::from_secs(3600),
            snp_roots: vec![],
            intel_root: None,
            tdx_collateral: None,
            ek_cas: vec![],
            ek_intermediates: vec![],
        },
        policy(reference),
        p256::ecdsa::SigningKey::random(&mut rand_core::OsRng),
        &ca.0,
        &ca.1,
    )
    .unwrap()
}

/// A device that attested with `svc`: its key (PKCS#8 PEM), its certificate (PEM,
/// none when the policy denied it) and its attestation result.
struct Device {
    name: String,
    key_pem: String,
    certificate: Option<String>,
    result: String,
}

fn attest(svc: &AttestationService, name: &str) -> Device {
    attest_at(
        svc,
        name,
        &rcgen::KeyPair::generate().unwrap().serialize_pem(),
        SystemTime::now(),
    )
}

/// `name` with the key `key_pem` attests with `svc` at `at`.
fn attest_at(svc: &AttestationService, name: &str, key_pem: &str, at: SystemTime) -> Device {
    let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let challenge = svc
        .challenge(
            &ChallengeRequest {
                device: name.into(),
                agent_public_key: B64.encode(rcgen::PublicKeyData::subject_public_key_info(&key)),
                tee: TeeKind::Dev,
                tpm: None,
            },
            at,
        )
        .unwrap();
    let rd: [u8; 64] = hex::decode(&challenge.report_data)
        .unwrap()
        .try_into()
        .unwrap();
    let out = svc
        .evidence(
            &EvidenceRequest {
                device: name.into(),
                nonce: challenge.nonce,
                csr,
                evidence: Evidence::Dev {
                    evidence: DevAttester::generate().evidence(&rd).unwrap(),
                },
            },
            at,
        )
        .unwrap();
    Device {
        name: name.into(),
        key_pem: key.serialize_pem(),
        certificate: out.certificate,
        result: out.attestation_result,
    }
}

fn provenance() -> Provenance {
    Provenance {
        model: ModelClaim {
            name: "fleet/smollm2".into(),
            revision: "5d41402abc4b2a76".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
        },
        plugins: vec![PluginClaim {
            name: "pii-redact".into(),
            digest: format!("sha256:{}", "cd".repeat(32)),
        }],
    }
}

const REQUEST: &[u8] = br#"{"model":"smollm2","messages":[{"role":"user","content":"hi"}]}"#;
const RESPONSE: &[u8] = br#"{"choices":[{"message":{"content":"Hello"}}]}"#;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The receipt `d` signs (through the agent's signer) over [`REQUEST`] and
/// [`RESPONSE`] at `time`.
fn signed(d: &Device, time: i64) -> String {
    let signer = ReceiptSigner::new(
        &d.name,
        &d.key_pem,
        d.certificate.as_deref().unwrap().as_bytes(),
        &d.result,
    )
    .unwrap();
    signer.sign(
        &provenance(),
        receipt::sha256_hex(REQUEST),
        receipt::sha256_hex(RESPONSE),
        time,
    )
}

/// The receipt's claims, re-signed by `key` with `chain` after `edit`: what a forger
/// holding that key can make.
fn forged(
    token: &str,
    key: &p256::ecdsa::SigningKey,
    chain: &[Vec<u8>],
    edit: impl FnOnce(&mut Claims),
) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let mut claims: Claims = serde_json::from_slice(&B64URL.decode(payload).unwrap()).unwrap();
    edit(&mut claims);
    receipt::sign(key, chain, &claims)
}

fn key_of(d: &Device) -> p256::ecdsa::SigningKey {
    use p256::pkcs8::DecodePrivateKey as _;
    p256::ecdsa::SigningKey::from_pkcs8_pem(&d.key_pem).unwrap()
}

fn der(pem: &str) -> Vec<u8> {
    edgefleet_trust::attestation::pem_certificates(pem.as_bytes())
        .unwrap()
        .remove(0)
}

fn reason(r: Result<receipt::Verified, receipt::ReceiptError>) -> String {
    match r {
        Ok(_) => "verified".into(),
        Err(e) => e.reason().into(),
    }
}

#[test]
fn a_receipt_verifies_with_the_ca_alone_and_says_what_answered() {
    let ca = new_ca("edgefleet device CA");
    let svc = service(&ca, "dev.json");
    let d = attest(&svc, "till-1");
    let t = now();
    let token = signed(&d, t);
    let v = receipt::verify(&token, ca.0.as_bytes()).unwrap();
    assert_eq!(v.claims.device, "till-1");
    assert_eq!(v.claims.time, t);
    assert_eq!(v.claims.provenance, provenance());
    assert_eq!(
        v.claims.attestation_result_id,
        receipt::sha256_hex(d.result.as_bytes())
    );
    assert_eq!(v.attestation["ear.status"], "affirming");
    assert_eq!(v.attestation["edgefleet.tee"], "dev");
    v.check_bodies(Some(REQUEST), Some(RESPONSE)).unwrap();
    // The bodies are what was signed: another request or response is named.
    let other = v.check_bodies(Some(b"{}"), None).unwrap_err();
    assert_eq!(other.reason(), "RequestMismatch");
    let other = v.check_bodies(Some(REQUEST), Some(b"{}")).unwrap_err();
    assert_eq!(other.reason(), "ResponseMismatch");
    // A CA file with the fleet's CA among others (a rotation) still verifies it.
    let both = format!("{}{}", new_ca("another CA").0, ca.0);
    receipt::verify(&token, both.as_bytes()).unwrap();
}

#[test]
fn any_flipped_byte_fails_a_receipt() {
    let ca = new_ca("edgefleet device CA");
    let svc = service(&ca, "dev.json");
    let d = attest(&svc, "till-1");
    let token = signed(&d, now());
    assert_eq!(reason(receipt::verify(&token, ca.0.as_bytes())), "verified");
    // Every 5th byte, and the last of each part, flipped in its low bit.
    let bytes = token.as_bytes();
    let mut at: Vec<usize> = (0..bytes.len()).step_by(5).collect();
    at.extend(
        token
            .match_indices('.')
            .map(|(i, _)| i - 1)
            .chain([bytes.len() - 1]),
    );
    for i in at {
        let mut t = bytes.to_vec();
        t[i] ^= 1;
        let Ok(t) = String::from_utf8(t) else {
            continue;
        };
        let r = receipt::verify(&t, ca.0.as_bytes());
        assert!(r.is_err(), "byte {i} flipped still verifies");
    }
    // A flip inside the signed payload's bytes (re-encoded, so it decodes) is caught by
    // the signature.
    let parts: Vec<&str> = token.split('.').collect();
    let mut payload = B64URL.decode(parts[1]).unwrap();
    let i = payload.len() / 2;
    payload[i] ^= 1;
    let t = format!("{}.{}.{}", parts[0], B64URL.encode(&payload), parts[2]);
    let r = reason(receipt::verify(&t, ca.0.as_bytes()));
    assert!(
        r == "ReceiptSignatureInvalid" || r == "ReceiptMalformed",
        "{r}"
    );
}

#[test]
fn forged_receipts_fail_by_name() {
    let ca = new_ca("edgefleet device CA");
    let svc = service(&ca, "dev.json");
    let d1 = attest(&svc, "till-1");
    let d2 = attest(&svc, "till-2");
    let token = signed(&d1, now());
    let cert1 = der(d1.certificate.as_deref().unwrap());
    let cert2 = der(d2.certificate.as_deref().unwrap());
    let k1 = key_of(&d1);

    // Another fleet's CA.
    let other = new_ca("another fleet");
    assert_eq!(
        reason(receipt::verify(&token, other.0.as_bytes())),
        "CertificateUntrusted"
    );
    // A key with a self-made certificate naming the device.
    let rogue = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "edgefleet://device/till-1".try_into().unwrap(),
    )];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let rogue_cert = p.self_signed(&rogue).unwrap().der().to_vec();
    let rogue_key = {
        use p256::pkcs8::DecodePrivateKey as _;
        p256::ecdsa::SigningKey::from_pkcs8_pem(&rogue.serialize_pem()).unwrap()
    };
    assert_eq!(
        reason(receipt::verify(
            &forged(&token, &rogue_key, &[rogue_cert], |_| {}),
            ca.0.as_bytes()
        )),
        "CertificateUntrusted"
    );
    // Device 2's certificate on device 1's receipt: it names another device.
    assert_eq!(
        reason(receipt::verify(
            &forged(&token, &k1, std::slice::from_ref(&cert2), |_| {}),
            ca.0.as_bytes()
        )),
        "CertificateUntrusted"
    );
    // Device 1 claiming to be device 2 with its own certificate.
    assert_eq!(
        reason(receipt::verify(
            &forged(&token, &k1, std::slice::from_ref(&cert1), |c| {
                c.device = "till-2".into()
            }),
            ca.0.as_bytes()
        )),
        "CertificateUntrusted"
    );
    // Device 2's certificate with device 1's key: the signature does not verify.
    assert_eq!(
        reason(receipt::verify(
            &forged(&token, &k1, std::slice::from_ref(&cert2), |c| {
                c.device = "till-2".into()
            }),
            ca.0.as_bytes()
        )),
        "ReceiptSignatureInvalid"
    );
    // Device 1's receipt carrying device 2's attestation result.
    assert_eq!(
        reason(receipt::verify(
            &forged(&token, &k1, std::slice::from_ref(&cert1), |c| {
                c.attestation_result = d2.result.clone();
                c.attestation_result_id = receipt::sha256_hex(d2.result.as_bytes());
            }),
            ca.0.as_bytes()
        )),
        "AttestationResultMismatch"
    );
    // ... or naming another result than the one it carries.
    assert_eq!(
        reason(receipt::verify(
            &forged(&token, &k1, std::slice::from_ref(&cert1), |c| {
                c.attestation_result_id = receipt::sha256_hex(b"another");
            }),
            ca.0.as_bytes()
        )),
        "AttestationResultMismatch"
    );
    // A device writing its own "affirming" result, signed with its key and
    // certificate: the signer is not the fleet's result signer.
    let parts: Vec<&str> = d1.result.split('.').collect();
    let mut ear: Value = serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
    ear["edgefleet.tee"] = json!("sev-snp");
    let own = edgefleet_trust::attestation::result::sign_with_chain(
        &k1,
        std::slice::from_ref(&cert1),
        &ear,
    );
    assert_eq!(
        reason(receipt::verify(
            &forged(&token, &k1, std::slice::from_ref(&cert1), |c| {
                c.attestation_result_id = receipt::sha256_hex(own.as_bytes());
                c.attestation_result = own.clone();
            }),
            ca.0.as_bytes()
        )),
        "AttestationResultUntrusted"
    );
    // Dated before its certificate and attestation, or after they lapsed.
    let issued = ear["iat"].as_i64().unwrap();
    let expires = ear["exp"].as_i64().unwrap();
    for t in [issued - receipt::MAX_CLOCK_SKEW_SECONDS - 1, expires + 1] {
        assert_eq!(
            reason(receipt::verify(&signed(&d1, t), ca.0.as_bytes())),
            "CertificateNotValidAt",
            "time {t}"
        );
    }
    // A current certificate with a lapsed result of the same key (from an earlier
    // attestation).
    let earlier = attest_at(
        &svc,
        "till-1",
        &d1.key_pem,
        SystemTime::now() - Duration::from_secs(7200),
    );
    assert_eq!(
        reason(receipt::verify(
            &forged(&token, &k1, std::slice::from_ref(&cert1), |c| {
                c.attestation_result_id = receipt::sha256_hex(earlier.result.as_bytes());
                c.attestation_result = earlier.result.clone();
            }),
            ca.0.as_bytes()
        )),
        "OutsideAttestation"
    );
    // Not ES256, or not a receipt.
    let none = format!(
        "{}.{}.",
        B64URL.encode(r#"{"alg":"none","typ":"edgefleet-receipt+jws"}"#),
        token.split('.').nth(1).unwrap()
    );
    assert_eq!(
        reason(receipt::verify(&none, ca.0.as_bytes())),
        "ReceiptUnsupported"
    );
    assert_eq!(
        reason(receipt::verify(&d1.result, ca.0.as_bytes())),
        "ReceiptMalformed"
    );
    assert_eq!(
        reason(receipt::verify("", ca.0.as_bytes())),
        "ReceiptMalformed"
    );
    assert_eq!(
        reason(receipt::verify(&token, b"not a PEM")),
        "CertificateUntrusted"
    );

    // A device certificate in the CA file (by mistake) is not an anchor: otherwise its
    // device could issue itself a result signer's certificate.
    let with_device = format!("{}{}", ca.0, d1.certificate.as_deref().unwrap());
    let e = receipt::verify(&token, with_device.as_bytes()).unwrap_err();
    assert_eq!(e.reason(), "CertificateUntrusted");
    assert!(e.to_string().contains("is not a CA certificate"), "{e}");
    // More than the device's certificate in x5c.
    let ca_der = der(&ca.0);
    assert_eq!(
        reason(receipt::verify(
            &forged(&token, &k1, &[cert1.clone(), ca_der], |_| {}),
            ca.0.as_bytes()
        )),
        "CertificateUntrusted"
    );
    // The result signer's certificate presented as a device's.
    let ear_header: Value = serde_json::from_slice(&B64URL.decode(parts[0]).unwrap()).unwrap();
    let signer_cert = B64.decode(ear_header["x5c"][0].as_str().unwrap()).unwrap();
    assert_eq!(
        reason(receipt::verify(
            &forged(&token, &k1, &[signer_cert], |_| {}),
            ca.0.as_bytes()
        )),
        "CertificateUntrusted"
    );
    // A receipt where its attestation result should be (typ confusion).
    let inner = signed(&d1, now());
    assert_eq!(
        reason(receipt::verify(
            &forged(&token, &k1, std::slice::from_ref(&cert1), |c| {
                c.attestation_result_id = receipt::sha256_hex(inner.as_bytes());
                c.attestation_result = inner.clone();
            }),
            ca.0.as_bytes()
        )),
        "AttestationResultUntrusted"
    );
    // The high-S twin of a valid signature (it verifies as ECDSA, and would be a
    // second token, with another id, for the same content).
    let (input, sig) = token.rsplit_once('.').unwrap();
    let sig = p256::ecdsa::Signature::from_slice(&B64URL.decode(sig).unwrap()).unwrap();
    let (r, s_) = sig.split_scalars();
    let twin = p256::ecdsa::Signature::from_scalars(r, -s_).unwrap();
    let twin = format!("{input}.{}", B64URL.encode(twin.to_bytes()));
    assert_eq!(
        reason(receipt::verify(&twin, ca.0.as_bytes())),
        "ReceiptMalformed"
    );
    // The agent refuses to sign with another device's result.
    let e = ReceiptSigner::new(
        "till-1",
        &d1.key_pem,
        d1.certificate.as_deref().unwrap().as_bytes(),
        &d2.result,
    )
    .unwrap_err();
    assert!(e.contains("till-2"), "{e}");
}

#[test]
fn a_contraindicated_result_signs_no_receipt_and_verifies_none() {
    let ca = new_ca("edgefleet device CA");
    let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let svc = service(&ca, "dev.json");
    let d = attest_at(&svc, "till-1", &key, SystemTime::now());
    // The same fleet's gateway under the production policy, which refuses the dev
    // attester: no certificate, a contraindicated result for the same key.
    let strict = service(&ca, "reference.json");
    let denied = attest_at(&strict, "till-1", &key, SystemTime::now());
    assert!(denied.certificate.is_none());
    // The agent refuses to sign with it.
    let e = ReceiptSigner::new(
        "till-1",
        &d.key_pem,
        d.certificate.as_deref().unwrap().as_bytes(),
        &denied.result,
    )
    .unwrap_err();
    assert!(e.contains("contraindicated"), "{e}");
    // A receipt made with it anyway, by a forger holding the key, is named.
    let token = signed(&d, now());
    let with_denied = forged(
        &token,
        &key_of(&d),
        &[der(d.certificate.as_deref().unwrap())],
        |c| {
            c.attestation_result_id = receipt::sha256_hex(denied.result.as_bytes());
            c.attestation_result = denied.result.clone();
        },
    );
    assert_eq!(
        reason(receipt::verify(&with_denied, ca.0.as_bytes())),
        "AttestationNotAffirming"
    );
}

#[test]
fn a_stream_splits_into_the_bytes_its_receipt_covers_and_the_receipt() {
    let body = b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
    let mut stream = body.to_vec();
    stream.extend_from_slice(b"event: edgefleet-receipt\ndata: a.b.c\n\n");
    let (covered, r) = receipt::split_stream(&stream).unwrap();
    assert_eq!(covered, body);
    assert_eq!(r, "a.b.c");
    // No receipt event, or one with a second line of data: none.
    assert!(receipt::split_stream(body).is_none());
    let mut bad = body.to_vec();
    bad.extend_from_slice(b"event: edgefleet-receipt\ndata: a\ndata: b\n\n");
    assert!(receipt::split_stream(&bad).is_none());
}
