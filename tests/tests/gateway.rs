//! The gateway over HTTPS against the real API server: a swtpm device enrols, attests,
//! gets a client certificate, and its EdgeDevice shows Attested=True with the policy
//! hash; unknown devices, wrong tokens, replays and dev evidence are refused by name and
//! recorded; lapsed attestations turn Attested False.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use edgefleet_agent::attest::dev::DevAttester;
use edgefleet_agent::attest::tpm::TpmAttester;
use edgefleet_agent::gateway_client::{GatewayClient, GatewayError};
use edgefleet_crds::device::EdgeDevice;
use edgefleet_e2e::swtpm::Swtpm;
use edgefleet_e2e::{ControlPlane, workspace_root};
use edgefleet_operator::device_status::DeviceStatus;
use edgefleet_operator::gateway::{self, Gateway};
use edgefleet_trust::attestation::TeeKind;
use edgefleet_trust::attestation::policy::Policy;
use edgefleet_trust::attestation::service::{
    AttestationService, ChallengeRequest, Evidence, EvidenceRequest, ServiceConfig, TpmEnrolment,
};
use kube::api::{Api, PostParams};

const TOKEN: &str = "bootstrap-token-for-tests";

struct Setup {
    cp: ControlPlane,
    agent: rcgen::KeyPair,
    client: GatewayClient,
    url: String,
    ca_pem: String,
    devices: DeviceStatus,
    swtpm: Swtpm,
    _server: tokio::task::JoinHandle<()>,
}

fn ca() -> (String, rcgen::KeyPair, rcgen::CertificateParams) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "edgefleet gateway CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    (p.self_signed(&key).unwrap().pem(), key, p)
}

async fn setup() -> Setup {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::start().await.unwrap();
    cp.install_crds().await.unwrap();
    let kube = cp.client().await.unwrap();
    let devices_api: Api<EdgeDevice> = Api::all(kube.clone());
    let mut example: EdgeDevice = serde_yaml::from_str(
        &std::fs::read_to_string(workspace_root().join("examples/edgedevice-store-042.yaml"))
            .unwrap(),
    )
    .unwrap();
    // The device enrolled with this agent key.
    let agent = rcgen::KeyPair::generate().unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&agent);
    example.spec.facts.agent_key_fingerprint = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&spki))
    );
    devices_api
        .create(&PostParams::default(), &example)
        .await
        .unwrap();

    let swtpm = Swtpm::start();
    let rego = std::fs::read_to_string(workspace_root().join("policies/attestation.rego")).unwrap();
    let data = std::fs::read_to_string(workspace_root().join("policies/reference.json")).unwrap();
    let policy = Policy::load("default", &rego, &data).unwrap();
    let (ca_pem, ca_key, ca_params) = ca();
    let service = AttestationService::new(
        ServiceConfig {
            nonce_ttl: Duration::from_secs(60),
            result_ttl: Duration::from_secs(3600),
            snp_roots: vec![],
            intel_root: None,
            tdx_collateral: None,
            ek_cas: vec![swtpm.ca("swtpm-localca-rootca-cert.pem")],
            ek_intermediates: vec![swtpm.ca("issuercert.pem")],
        },
        policy,
        p256::ecdsa::SigningKey::random(&mut rand_core::OsRng),
        &ca_pem,
        &ca_key.serialize_pem(),
    )
    .unwrap();

    // The gateway's own serving certificate, from the same CA.
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(
                &server_key,
                &rcgen::Issuer::from_params(&ca_params, &ca_key),
            )
            .unwrap();
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![server.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .unwrap();
    let devices = DeviceStatus::new(kube);
    let router = Gateway::new(Arc::new(service), devices.clone()).router();
    let listener = edgefleet_operator::gateway::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let server = tokio::spawn(async move {
        gateway::serve(listener, Arc::new(tls), router)
            .await
            .unwrap();
    });
    let client = GatewayClient::new(&url, ca_pem.as_bytes(), TOKEN).unwrap();
    Setup {
        cp,
        agent,
        client,
        url,
        ca_pem,
        devices,
        swtpm,
        _server: server,
    }
}

/// The public key (SPKI, base64) and a CSR of `key`.
fn key_and_csr(key: &rcgen::KeyPair) -> (String, String) {
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(key)
        .unwrap();
    (
        B64.encode(rcgen::PublicKeyData::subject_public_key_info(&key)),
        csr.pem().unwrap(),
    )
}

fn rejected(e: GatewayError) -> (u16, String) {
    match e {
        GatewayError::Rejected { status, reason, .. } => (status, reason),
        other => panic!("expected a named rejection, got {other}"),
    }
}

/// One attestation round of a TPM device: challenge, credential activation, quote.
async fn tpm_round(
    s: &Setup,
    tpm: &mut TpmAttester,
    ask: &ChallengeRequest,
    csr: String,
) -> EvidenceRequest {
    let challenge = s.client.challenge(ask).await.unwrap();
    edgefleet_e2e::swtpm::tpm_evidence(tpm, challenge, &ask.device, csr)
}

fn attested_condition(d: &EdgeDevice) -> (String, String) {
    let c = d
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Attested")
        .unwrap();
    (c.status.clone(), c.reason.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_device_attests_over_https_and_its_status_shows_it() {
    let s = setup().await;
    let device = "store-042-till-1";
    let mut tpm = TpmAttester::open(&s.swtpm.tcti()).unwrap();
    let (key, csr) = key_and_csr(&s.agent);
    let enrol = TpmEnrolment {
        ek_certificate: B64.encode(tpm.ek_certificate().unwrap()),
        ak_public_area: B64.encode(tpm.ak_public_area().unwrap()),
    };
    let ask = |dev: &str| ChallengeRequest {
        device: dev.into(),
        agent_public_key: key.clone(),
        tee: TeeKind::Tpm,
        tpm: Some(enrol.clone()),
    };

    // An unknown device gets no challenge.
    let (status, reason) = rejected(s.client.challenge(&ask("intruder-1")).await.unwrap_err());
    assert_eq!((status, reason.as_str()), (404, "UnknownDevice"));
    // Nor does a caller with another key than the one the device enrolled with (no
    // bootstrap token is asked for: the enrolled key and the evidence authenticate).
    let stranger = GatewayClient::new(&s.url, s.ca_pem.as_bytes(), "").unwrap();
    let thief = rcgen::KeyPair::generate().unwrap();
    let foreign = ChallengeRequest {
        agent_public_key: B64.encode(rcgen::PublicKeyData::subject_public_key_info(&thief)),
        ..ask(device)
    };
    let (status, reason) = rejected(stranger.challenge(&foreign).await.unwrap_err());
    assert_eq!((status, reason.as_str()), (403, "KeyMismatch"));

    let req = tpm_round(&s, &mut tpm, &ask(device), csr).await;
    let appraisal = s.client.evidence(&req).await.unwrap();
    assert!(appraisal.decision.allow, "{:?}", appraisal.decision.deny);
    assert!(
        appraisal
            .certificate
            .as_deref()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );

    // The decision is in the EdgeDevice status, with the policy hash.
    let api: Api<EdgeDevice> = Api::all(s.cp.client().await.unwrap());
    let d = api.get(device).await.unwrap();
    assert_eq!(
        attested_condition(&d),
        ("True".into(), "AttestationPassed".into())
    );
    let att = d.status.as_ref().unwrap().attestation.as_ref().unwrap();
    assert_eq!(att.policy_hash, appraisal.decision.policy_hash);
    assert!(att.allowed);
    assert_eq!(att.tee_kind, edgefleet_crds::TeeKind::Tpm);
    let get = s.cp.kubectl().args(["get", "ed", device]).output().unwrap();
    let text = String::from_utf8_lossy(&get.stdout);
    assert!(text.lines().nth(1).unwrap().contains("tpm"), "{text}");

    // Another key asking for this device is refused, and someone who knows only the
    // device's public key cannot make it look failed: without a CSR signed by its key
    // the gateway records nothing.
    let intruder = rcgen::KeyPair::generate().unwrap();
    let (other_key, other_csr) = key_and_csr(&intruder);
    let err = s
        .client
        .challenge(&ChallengeRequest {
            agent_public_key: other_key,
            ..ask(device)
        })
        .await
        .unwrap_err();
    assert_eq!(rejected(err), (403, "KeyMismatch".to_owned()));
    let c = s.client.challenge(&ask(device)).await.unwrap();
    let forged = EvidenceRequest {
        device: device.into(),
        nonce: c.nonce,
        csr: other_csr,
        evidence: Evidence::Dev {
            evidence: DevAttester::generate().evidence(&[0; 64]).unwrap(),
        },
    };
    assert_eq!(
        rejected(s.client.evidence(&forged).await.unwrap_err()),
        (403, "InvalidCsr".to_owned())
    );
    assert_eq!(
        attested_condition(&api.get(device).await.unwrap()),
        ("True".into(), "AttestationPassed".into())
    );

    // Replaying the same evidence is refused: its challenge is recorded as answered in
    // the device's status (challenges are stateless tokens any replica can open, so
    // single use is enforced there, not in one process's memory).
    let (status, reason) = rejected(s.client.evidence(&req).await.unwrap_err());
    assert_eq!((status, reason.as_str()), (409, "NonceUsed"));
    let recorded = api
        .get(device)
        .await
        .unwrap()
        .status
        .unwrap()
        .attestation
        .unwrap()
        .challenge_issued_millis;
    assert!(recorded.is_some_and(|ms| ms > 0), "{recorded:?}");
    // A nonce this fleet never issued is not one at all.
    let mut forged_nonce = req.clone();
    forged_nonce.nonce = B64.encode([7u8; 64]);
    let (status, reason) = rejected(s.client.evidence(&forged_nonce).await.unwrap_err());
    assert_eq!((status, reason.as_str()), (401, "UnknownNonce"));

    // An hour and more later, the attestation has lapsed.
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
    assert_eq!(s.devices.lapse_expired(later).await.unwrap(), [device]);
    let d = api.get(device).await.unwrap();
    assert_eq!(
        attested_condition(&d),
        ("False".into(), "AttestationExpired".into())
    );
    // The summary of the last attestation stays for the record.
    assert_eq!(
        d.status
            .as_ref()
            .unwrap()
            .attestation
            .as_ref()
            .unwrap()
            .policy_hash,
        appraisal.decision.policy_hash
    );
    // Sweeping again changes nothing.
    assert!(s.devices.lapse_expired(later).await.unwrap().is_empty());

    // The allowed quote's TPM clock is kept in the status ...
    let stored = d.status.unwrap().attestation.unwrap().tpm_clock.unwrap();
    let quoted = appraisal.tpm_clock.unwrap();
    assert_eq!(stored.reset_count, i64::from(quoted.reset_count));
    assert_eq!(stored.clock, i64::try_from(quoted.clock).unwrap());
    // ... and the next quote is held to it, whatever the gateway remembers itself: with
    // a stored state one reset ahead of the TPM, a fresh quote is a rollback.
    api.patch_status(
        device,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({
            "status": {"attestation": {"tpmClock": {"resetCount": stored.reset_count + 1}}}
        })),
    )
    .await
    .unwrap();
    let (key2, csr2) = key_and_csr(&s.agent);
    assert_eq!(key2, key);
    let again = tpm_round(&s, &mut tpm, &ask(device), csr2).await;
    let (_, reason) = rejected(s.client.evidence(&again).await.unwrap_err());
    assert_eq!(reason, "ClockRollback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_evidence_is_recorded_as_failed_and_malformed_bodies_are_named() {
    let s = setup().await;
    let device = "store-042-till-1";
    let (key, csr) = key_and_csr(&s.agent);
    let dev_challenge = ChallengeRequest {
        device: device.into(),
        agent_public_key: key,
        tee: TeeKind::Dev,
        tpm: None,
    };
    // The device enrolled as a TPM device: dev evidence is refused up front.
    let err = s.client.challenge(&dev_challenge).await.unwrap_err();
    assert_eq!(rejected(err), (403, "TeeKindMismatch".to_owned()));
    // Declared as able to produce dev evidence too, it gets a challenge, and its dev
    // evidence verifies but the default policy refuses it, which the status records.
    let api: Api<EdgeDevice> = Api::all(s.cp.client().await.unwrap());
    api.patch(
        device,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(
            serde_json::json!({"spec": {"facts": {"teeKinds": ["tpm", "dev"]}}}),
        ),
    )
    .await
    .unwrap();
    let challenge = s.client.challenge(&dev_challenge).await.unwrap();
    let rd: [u8; 64] = hex::decode(&challenge.report_data)
        .unwrap()
        .try_into()
        .unwrap();
    let req = EvidenceRequest {
        device: device.into(),
        nonce: challenge.nonce,
        csr,
        evidence: Evidence::Dev {
            evidence: DevAttester::generate().evidence(&rd).unwrap(),
        },
    };
    let appraisal = s.client.evidence(&req).await.unwrap();
    assert!(!appraisal.decision.allow);
    assert!(appraisal.certificate.is_none());
    let api: Api<EdgeDevice> = Api::all(s.cp.client().await.unwrap());
    let d = api.get(device).await.unwrap();
    assert_eq!(
        attested_condition(&d),
        ("False".into(), "AttestationFailed".into())
    );
    assert!(
        d.status
            .unwrap()
            .attestation
            .unwrap()
            .message
            .unwrap()
            .contains("evidence kind dev is not allowed")
    );

    // Malformed bodies are a named 400.
    let (status, reason) = post_raw_challenge(&s, serde_json::Value::Null).await;
    assert_eq!((status, reason.as_str()), (400, "BadRequest"));
    let (status, reason) =
        post_raw_challenge(&s, serde_json::json!({"device": device, "tee": "sgx"})).await;
    assert_eq!((status, reason.as_str()), (400, "BadRequest"));
}

/// Posts a JSON body that is not a valid challenge request, with the right token.
async fn post_raw_challenge(s: &Setup, body: serde_json::Value) -> (u16, String) {
    match s.client.challenge_raw(&body).await {
        Err(GatewayError::Rejected { status, reason, .. }) => (status, reason),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_attestation_round_stores_a_certificate_only_when_allowed() {
    use edgefleet_agent::enrol::{Source, attest_once};
    let s = setup().await;
    let device = "store-042-till-1";
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("agent-key.pem"), s.agent.serialize_pem()).unwrap();

    // A device enrolled for TPM evidence is refused with the development key: no
    // certificate is stored.
    let mut dev = Source::Dev(DevAttester::generate());
    let err = attest_once(&s.client, device, &mut dev, state.path())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("TeeKindMismatch"), "{err}");
    assert!(!state.path().join("agent-cert.pem").exists());

    // The TPM round (enrolment, credential activation, bound quote) is allowed, and the
    // certificate is for the stored agent key.
    let mut tpm = Source::Tpm(edgefleet_agent::enrol::TpmSource::new(s.swtpm.tcti()));
    let a = attest_once(&s.client, device, &mut tpm, state.path())
        .await
        .unwrap();
    assert!(a.decision.allow, "{:?}", a.decision.deny);
    let cert_pem = std::fs::read_to_string(state.path().join("agent-cert.pem")).unwrap();
    let der = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .unwrap()
        .1
        .contents;
    let (_, cert) = <x509_parser::certificate::X509Certificate<'_> as x509_parser::prelude::FromDer<'_, _>>::from_der(&der).unwrap();
    let key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(state.path().join("agent-key.pem")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );

    // A second round re-attests with the same TPM attester (the AK is kept).
    let again = attest_once(&s.client, device, &mut tpm, state.path())
        .await
        .unwrap();
    assert!(again.decision.allow, "{:?}", again.decision.deny);

    // An unknown device name gets a named refusal, not a certificate.
    let err = attest_once(&s.client, "not-enrolled", &mut tpm, state.path())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UnknownDevice"), "{err}");
}
