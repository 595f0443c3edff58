//! The gateway's attestation service with real attesters: a dev key (rejected by the
//! default policy), and a swtpm TPM enrolled by credential activation and given a
//! client certificate for its agent key.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use edgefleet_agent::attest::dev::DevAttester;
use edgefleet_agent::attest::tpm::TpmAttester;
use edgefleet_e2e::swtpm::Swtpm;
use edgefleet_trust::attestation::policy::Policy;
use edgefleet_trust::attestation::service::{
    AttestationService, ChallengeRequest, Evidence, EvidenceRequest, ServiceConfig, TpmEnrolment,
};
use edgefleet_trust::attestation::{TeeKind, result};
use x509_parser::prelude::FromDer as _;

fn policy(reference: Option<serde_json::Value>) -> Policy {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rego = std::fs::read_to_string(root.join("policies/attestation.rego")).unwrap();
    let data = match reference {
        Some(r) => r.to_string(),
        None => std::fs::read_to_string(root.join("policies/reference.json")).unwrap(),
    };
    Policy::load("attestation", &rego, &data).unwrap()
}

/// The service with the default policy (`policies/reference.json`).
fn service(ek_cas: Vec<Vec<u8>>, ek_intermediates: Vec<Vec<u8>>) -> AttestationService {
    service_with(ek_cas, ek_intermediates, None)
}

fn service_with(
    ek_cas: Vec<Vec<u8>>,
    ek_intermediates: Vec<Vec<u8>>,
    reference: Option<serde_json::Value>,
) -> AttestationService {
    replicas(ek_cas, ek_intermediates, reference, 1).remove(0)
}

/// `n` services sharing one device CA, as the gateway replicas of one fleet do.
fn replicas(
    ek_cas: Vec<Vec<u8>>,
    ek_intermediates: Vec<Vec<u8>>,
    reference: Option<serde_json::Value>,
    n: usize,
) -> Vec<AttestationService> {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "edgefleet device CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let config = ServiceConfig {
        nonce_ttl: Duration::from_secs(30),
        result_ttl: Duration::from_secs(3600),
        snp_roots: vec![],
        intel_root: None,
        tdx_collateral: None,
        ek_cas,
        ek_intermediates,
    };
    (0..n)
        .map(|_| {
            AttestationService::new(
                config.clone(),
                policy(reference.clone()),
                p256::ecdsa::SigningKey::random(&mut rand_core::OsRng),
                &ca_pem,
                &ca_key.serialize_pem(),
            )
            .unwrap()
        })
        .collect()
}

/// What a TPM quotes for a challenge: SHA-256 of its report data.
fn qualifying(report_data: &[u8]) -> [u8; 32] {
    edgefleet_trust::attestation::binding::tpm_qualifying_data(&report_data.try_into().unwrap())
}

/// The agent's identity key and a CSR for it.
fn agent_key() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    (
        B64.encode(rcgen::PublicKeyData::subject_public_key_info(&key)),
        csr.pem().unwrap(),
    )
}

fn now() -> SystemTime {
    SystemTime::now()
}

#[test]
fn dev_evidence_verifies_but_the_default_policy_refuses_it() {
    let svc = service(vec![], vec![]);
    let (key, csr) = agent_key();
    let dev = DevAttester::generate();
    let challenge = svc
        .challenge(
            &ChallengeRequest {
                device: "laptop".into(),
                agent_public_key: key.clone(),
                tee: TeeKind::Dev,
                tpm: None,
            },
            now(),
        )
        .unwrap();
    let rd: [u8; 64] = hex::decode(&challenge.report_data)
        .unwrap()
        .try_into()
        .unwrap();
    let req = EvidenceRequest {
        device: "laptop".into(),
        nonce: challenge.nonce.clone(),
        csr: csr.clone(),
        evidence: Evidence::Dev {
            evidence: dev.evidence(&rd).unwrap(),
        },
    };
    let out = svc.evidence(&req, now()).unwrap();
    assert!(!out.decision.allow);
    assert!(
        out.decision
            .deny
            .contains(&"evidence kind dev is not allowed".to_owned()),
        "{:?}",
        out.decision.deny
    );
    assert!(
        out.certificate.is_none(),
        "no certificate without an allowed decision"
    );
    let claims = result::verify(&svc.result_verifying_key(), &out.attestation_result, 0).unwrap();
    assert_eq!(claims["ear.status"], "contraindicated");
    assert_eq!(claims["sub"], "laptop");

    // The service keeps no record of used challenges (any replica may see the answer):
    // a replay verifies again, naming the same challenge, and the gateway refuses it
    // where it records the result (`gateway` tests).
    let first = svc.verify(&req, now(), None).unwrap().challenge_issued_ms;
    assert_eq!(
        svc.verify(&req, now(), None).unwrap().challenge_issued_ms,
        first
    );
}

#[test]
fn a_challenge_issued_by_one_replica_is_answered_at_another_and_no_table_fills() {
    let mut fleet = replicas(vec![], vec![], None, 2);
    let (b, a) = (fleet.pop().unwrap(), fleet.pop().unwrap());
    let foreign = service(vec![], vec![]);
    let (key, csr) = agent_key();
    let dev = DevAttester::generate();
    let ask = |svc: &AttestationService, device: &str| {
        svc.challenge(
            &ChallengeRequest {
                device: device.into(),
                agent_public_key: key.clone(),
                tee: TeeKind::Dev,
                tpm: None,
            },
            now(),
        )
        .unwrap()
    };
    let answer = |svc: &AttestationService,
                  c: &edgefleet_trust::attestation::service::Challenge,
                  device: &str| {
        let rd: [u8; 64] = hex::decode(&c.report_data).unwrap().try_into().unwrap();
        svc.verify(
            &EvidenceRequest {
                device: device.into(),
                nonce: c.nonce.clone(),
                csr: csr.clone(),
                evidence: Evidence::Dev {
                    evidence: dev.evidence(&rd).unwrap(),
                },
            },
            now(),
            None,
        )
    };
    // Issued by a, answered at b: the fleet's replicas share the device CA.
    let c = ask(&a, "till-a");
    let v = answer(&b, &c, "till-a").unwrap();
    assert_eq!(v.device, "till-a");
    // A service with another device CA (another fleet) cannot open it.
    assert_eq!(
        answer(&foreign, &c, "till-a").unwrap_err().reason(),
        "UnknownNonce"
    );
    // A device asking in a loop fills nothing: every challenge stays answerable, and
    // each names when it was issued, in order.
    let flood: Vec<_> = (0..1000).map(|_| ask(&a, "till-a")).collect();
    let first = answer(&a, &flood[0], "till-a").unwrap().challenge_issued_ms;
    let last = answer(&b, &flood[999], "till-a")
        .unwrap()
        .challenge_issued_ms;
    assert!(first <= last, "{first} > {last}");
    // What a challenge seals cannot be read or changed by the device: the TPM
    // credential secret stays hidden (see `challenge_token`), and an edited nonce is
    // not one this fleet issued.
    // A replica whose clock runs ahead: a challenge issued "in the future" beyond the
    // allowed skew is refused (it would shut out the device's next challenges), one a
    // second ahead is not.
    let ahead = |secs: u64| {
        a.challenge(
            &ChallengeRequest {
                device: "till-a".into(),
                agent_public_key: key.clone(),
                tee: TeeKind::Dev,
                tpm: None,
            },
            now() + Duration::from_secs(secs),
        )
        .unwrap()
    };
    assert_eq!(
        answer(&b, &ahead(10), "till-a").unwrap_err().reason(),
        "UnknownNonce"
    );
    answer(&b, &ahead(1), "till-a").unwrap();
    let mut edited = B64.decode(&c.nonce).unwrap();
    let last_byte = edited.len() - 1;
    edited[last_byte] ^= 1;
    let mut tampered = c.clone();
    tampered.nonce = B64.encode(edited);
    assert_eq!(
        answer(&a, &tampered, "till-a").unwrap_err().reason(),
        "UnknownNonce"
    );
}

#[test]
fn challenges_expire_and_bind_device_and_key() {
    let svc = service(vec![], vec![]);
    let (key, csr) = agent_key();
    let dev = DevAttester::generate();
    let ask = |device: &str| {
        svc.challenge(
            &ChallengeRequest {
                device: device.into(),
                agent_public_key: key.clone(),
                tee: TeeKind::Dev,
                tpm: None,
            },
            now(),
        )
        .unwrap()
    };
    let req = |c: &edgefleet_trust::attestation::service::Challenge, device: &str, csr: &str| {
        let rd: [u8; 64] = hex::decode(&c.report_data).unwrap().try_into().unwrap();
        EvidenceRequest {
            device: device.into(),
            nonce: c.nonce.clone(),
            csr: csr.into(),
            evidence: Evidence::Dev {
                evidence: dev.evidence(&rd).unwrap(),
            },
        }
    };
    // Expired.
    let c = ask("a");
    let err = svc
        .evidence(&req(&c, "a", &csr), now() + Duration::from_secs(31))
        .unwrap_err();
    assert_eq!(err.reason(), "UnknownNonce");
    // Another device's name.
    let c = ask("a");
    assert_eq!(
        svc.evidence(&req(&c, "b", &csr), now())
            .unwrap_err()
            .reason(),
        "ChallengeMismatch"
    );
    // A CSR for another key.
    let c = ask("a");
    let (_, other_csr) = agent_key();
    assert_eq!(
        svc.evidence(&req(&c, "a", &other_csr), now())
            .unwrap_err()
            .reason(),
        "InvalidCsr"
    );
    // Evidence bound to another challenge.
    let c1 = ask("a");
    let c2 = ask("a");
    let mut crossed = req(&c2, "a", &csr);
    crossed.nonce = c1.nonce.clone();
    assert_eq!(
        svc.evidence(&crossed, now()).unwrap_err().reason(),
        "ReportDataMismatch"
    );
    // Never issued.
    let mut forged = req(&c2, "a", &csr);
    forged.nonce = B64.encode([0u8; 32]);
    assert_eq!(
        svc.evidence(&forged, now()).unwrap_err().reason(),
        "UnknownNonce"
    );
}

#[test]
fn a_tpm_device_enrols_attests_and_receives_a_certificate_for_its_key() {
    let swtpm = Swtpm::start();
    let svc = service(
        vec![swtpm.ca("swtpm-localca-rootca-cert.pem")],
        vec![swtpm.ca("issuercert.pem")],
    );
    let mut tpm = TpmAttester::open(&swtpm.tcti()).unwrap();
    let (key, csr) = agent_key();
    let enrol = TpmEnrolment {
        ek_certificate: B64.encode(tpm.ek_certificate().unwrap()),
        ak_public_area: B64.encode(tpm.ak_public_area().unwrap()),
    };
    let ask = || {
        svc.challenge(
            &ChallengeRequest {
                device: "till-1".into(),
                agent_public_key: key.clone(),
                tee: TeeKind::Tpm,
                tpm: Some(enrol.clone()),
            },
            now(),
        )
        .unwrap()
    };

    // A wrong answer to the credential challenge is refused.
    let c = ask();
    let rd = hex::decode(&c.report_data).unwrap();
    let wrong = EvidenceRequest {
        device: "till-1".into(),
        nonce: c.nonce.clone(),
        csr: csr.clone(),
        evidence: Evidence::Tpm {
            evidence: tpm.quote(&qualifying(&rd)).unwrap(),
            credential: B64.encode([0u8; 32]),
        },
    };
    assert_eq!(
        svc.evidence(&wrong, now()).unwrap_err().reason(),
        "CredentialMismatch"
    );

    // The right one, with a bound quote, yields an affirming result and a certificate.
    let c = ask();
    let cred = c.credential.as_ref().unwrap();
    let secret = tpm
        .activate_credential(
            &B64.decode(&cred.id_object).unwrap(),
            &B64.decode(&cred.encrypted_secret).unwrap(),
        )
        .unwrap();
    let rd = hex::decode(&c.report_data).unwrap();
    let req = EvidenceRequest {
        device: "till-1".into(),
        nonce: c.nonce.clone(),
        csr: csr.clone(),
        evidence: Evidence::Tpm {
            evidence: tpm.quote(&qualifying(&rd)).unwrap(),
            credential: B64.encode(secret),
        },
    };
    let out = svc.evidence(&req, now()).unwrap();
    assert!(out.decision.allow, "{:?}", out.decision.deny);
    let pem = out.certificate.unwrap();
    let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .unwrap()
        .1
        .contents;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
    assert_eq!(
        cert.public_key().raw,
        B64.decode(&key).unwrap().as_slice(),
        "the certificate is for the attested key"
    );
    assert_eq!(
        cert.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "till-1"
    );
    let ca = x509_parser::pem::parse_x509_pem(svc.ca_certificate().as_bytes())
        .unwrap()
        .1
        .contents;
    let (_, ca) = x509_parser::certificate::X509Certificate::from_der(&ca).unwrap();
    cert.verify_signature(Some(ca.public_key())).unwrap();
    let claims = result::verify(&svc.result_verifying_key(), &out.attestation_result, 0).unwrap();
    assert_eq!(claims["ear.status"], "affirming");
    assert!(
        result::verify(
            &svc.result_verifying_key(),
            &out.attestation_result,
            out.expires_at + 1
        )
        .is_err(),
        "results expire"
    );
}

#[test]
fn a_tpm_whose_ek_is_not_from_a_configured_ca_gets_no_challenge() {
    let swtpm = Swtpm::start();
    let other = Swtpm::start();
    let svc = service(
        vec![other.ca("swtpm-localca-rootca-cert.pem")],
        vec![other.ca("issuercert.pem")],
    );
    let mut tpm = TpmAttester::open(&swtpm.tcti()).unwrap();
    let (key, _) = agent_key();
    let err = svc
        .challenge(
            &ChallengeRequest {
                device: "till-1".into(),
                agent_public_key: key,
                tee: TeeKind::Tpm,
                tpm: Some(TpmEnrolment {
                    ek_certificate: B64.encode(tpm.ek_certificate().unwrap()),
                    ak_public_area: B64.encode(tpm.ak_public_area().unwrap()),
                }),
            },
            now(),
        )
        .unwrap_err();
    assert_eq!(err.reason(), "ChainInvalid", "{err}");
}
