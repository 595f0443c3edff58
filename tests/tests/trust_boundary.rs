//! The trust boundary between a device's name and its hardware, over HTTPS against the
//! real API server and two real software TPMs (swtpm A and B, each with its own EK and
//! EK CA, both trusted by the gateway):
//!
//! - the first allowed attestation records the device's hardware identity (A's EK
//!   digest) in `status.hardwareIdentity`; the same name and the same agent key attesting
//!   from TPM B are refused `HardwareMismatch` with no certificate, counted, published as
//!   a Warning event, and A's identity stays; so is a fall-back to `dev` evidence;
//! - after the administrator clears the identity (`edgefleet device reset`, which
//!   refuses an unknown name and a device with nothing recorded), B is accepted and
//!   recorded;
//! - two writers racing to record different identities: only the first wins, the other
//!   reads the winner's, and the API server refuses to change a recorded identity;
//! - an enrolled name cannot be taken by another token holder with another key
//!   (`AlreadyEnrolled`).
//!
//! Module `revocation` (real operator and agent processes): a device stops serving when
//! unapproved while connected, when restarted while unapproved (`NotApproved`), when its
//! model was deleted while it was down, and at the end of its attestation lease while
//! offline (`AttestationLeaseExpired`). Module `chart`: the real operator started with
//! the arguments and files `helm template` renders; a swtpm device attests with the EK CA
//! from chart values and is refused `ChainInvalid` without it.
//! Module `tokens`: enrolment tokens (`EdgeBootstrapToken`): each refusal by name,
//! usages and labels, device-owned labels, attesting without a token, and a real agent
//! coming back after its certificate lapsed with its token deleted.
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
use edgefleet_operator::device_identity::{self, Pinned};
use edgefleet_operator::device_status::DeviceStatus;
use edgefleet_operator::gateway::devices::{Approval, Fleet, FleetConfig};
use edgefleet_operator::gateway::{self, Gateway};
use edgefleet_operator::metrics::{FleetCounters, ReasonLabel};
use edgefleet_trust::attestation::identity::{HardwareIdentity, sha256_digest};
use edgefleet_trust::attestation::policy::Policy;
use edgefleet_trust::attestation::service::{
    AttestationService, ChallengeRequest, Evidence, EvidenceRequest, ServiceConfig, TpmEnrolment,
};
use edgefleet_trust::attestation::{Claims, TeeKind};
use kube::api::{Api, Patch, PatchParams};

const TOKEN: &str = "bootstrap-token-for-trust-boundary";
const DEVICE: &str = "store-042-till-1";

struct Setup {
    cp: ControlPlane,
    agent: rcgen::KeyPair,
    client: GatewayClient,
    url: String,
    ca_pem: String,
    devices: DeviceStatus,
    counters: Arc<FleetCounters>,
    tpm_a: Swtpm,
    tpm_b: Swtpm,
    _server: tokio::task::JoinHandle<()>,
    _caches: tokio::task::JoinHandle<()>,
    _store: tempfile::TempDir,
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

fn spki_b64(key: &rcgen::KeyPair) -> String {
    B64.encode(rcgen::PublicKeyData::subject_public_key_info(key))
}

fn csr(key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

/// A control plane, and the gateway (attestation and device API, as the operator serves
/// them) trusting the EK CAs of both software TPMs; `DEVICE` is enrolled as a TPM device
/// by `agent` through `POST /v1/enrol`.
async fn setup() -> Setup {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::start().await.unwrap();
    cp.install_crds().await.unwrap();
    let kube = cp.client().await.unwrap();

    let (tpm_a, tpm_b) = (Swtpm::start(), Swtpm::start());
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
            ek_cas: vec![
                tpm_a.ca("swtpm-localca-rootca-cert.pem"),
                tpm_b.ca("swtpm-localca-rootca-cert.pem"),
            ],
            ek_intermediates: vec![tpm_a.ca("issuercert.pem"), tpm_b.ca("issuercert.pem")],
        },
        policy,
        p256::ecdsa::SigningKey::random(&mut rand_core::OsRng),
        &ca_pem,
        &ca_key.serialize_pem(),
    )
    .unwrap();

    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
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
    let counters: Arc<FleetCounters> = Arc::default();
    let store = tempfile::tempdir().unwrap();
    let (fleet, caches) = Fleet::new(
        kube.clone(),
        FleetConfig {
            artifact_dir: store.path().to_path_buf(),
            artifact_budget_bytes: 1 << 30,
            mirror: None,
            approval: Approval::Auto(Default::default()),
            heartbeat_lease: Duration::from_secs(30),
            bootstrap_token: Some(TOKEN.into()),
            refresh_per_second: edgefleet_operator::heartbeat::DEFAULT_REFRESH_PER_SECOND,
            change_per_second: edgefleet_operator::heartbeat::DEFAULT_CHANGE_PER_SECOND,
            attestation_lease: std::time::Duration::from_secs(86_400),
        },
        counters.clone(),
    );
    let caches = tokio::spawn(caches);
    fleet.ready().await.unwrap();
    let devices = DeviceStatus::new(kube.clone());
    let recorder = kube::runtime::events::Recorder::new(
        kube,
        kube::runtime::events::Reporter {
            controller: "edgefleet-gateway".into(),
            instance: None,
        },
    );
    let router = Gateway::new(Arc::new(service), devices.clone())
        .with_counters(counters.clone())
        .with_events(recorder)
        .router()
        .merge(fleet.router());
    let listener = gateway::listen("127.0.0.1:0".parse().unwrap()).unwrap();
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
    let agent = rcgen::KeyPair::generate().unwrap();
    let enrolled = client.enrol(&enrol_request(&agent)).await.unwrap();
    assert!(enrolled.created);
    Setup {
        cp,
        agent,
        client,
        url,
        ca_pem,
        devices,
        counters,
        tpm_a,
        tpm_b,
        _server: server,
        _caches: caches,
        _store: store,
    }
}

fn enrol_request(key: &rcgen::KeyPair) -> edgefleet_proto::EnrolRequest {
    edgefleet_proto::EnrolRequest {
        device: DEVICE.into(),
        agent_public_key: spki_b64(key),
        facts: edgefleet_proto::Facts {
            arch: "x86_64".into(),
            cpu_cores: 4,
            memory_bytes: 8 << 30,
            accelerators: vec![],
            tee_kinds: vec!["tpm".into()],
            agent_version: "0.1.0".into(),
        },
        labels: Default::default(),
    }
}

fn rejected(e: GatewayError) -> (u16, String) {
    match e {
        GatewayError::Rejected { status, reason, .. } => (status, reason),
        other => panic!("expected a named rejection, got {other}"),
    }
}

/// One attestation round of `DEVICE` with the agent key and the TPM at `tpm`.
async fn tpm_round(
    s: &Setup,
    tpm: &Swtpm,
) -> Result<edgefleet_trust::attestation::service::Appraisal, GatewayError> {
    let mut attester = TpmAttester::open(&tpm.tcti()).unwrap();
    let ask = ChallengeRequest {
        device: DEVICE.into(),
        agent_public_key: spki_b64(&s.agent),
        tee: TeeKind::Tpm,
        tpm: Some(TpmEnrolment {
            ek_certificate: B64.encode(attester.ek_certificate().unwrap()),
            ak_public_area: B64.encode(attester.ak_public_area().unwrap()),
        }),
    };
    let challenge = s.client.challenge(&ask).await.unwrap();
    s.client
        .evidence(&edgefleet_e2e::swtpm::tpm_evidence(
            &mut attester,
            challenge,
            DEVICE,
            csr(&s.agent),
        ))
        .await
}

/// `sha256:<hex>` of the EK SubjectPublicKeyInfo in `tpm`'s EK certificate.
fn ek_digest(tpm: &Swtpm) -> String {
    let cert = TpmAttester::open(&tpm.tcti())
        .unwrap()
        .ek_certificate()
        .unwrap();
    let (_, cert) =
        <x509_parser::certificate::X509Certificate<'_> as x509_parser::prelude::FromDer<'_, _>>::from_der(&cert)
            .unwrap();
    sha256_digest(cert.public_key().raw)
}

async fn device(s: &Setup) -> EdgeDevice {
    Api::<EdgeDevice>::all(s.cp.client().await.unwrap())
        .get(DEVICE)
        .await
        .unwrap()
}

fn recorded_ek(d: &EdgeDevice) -> Option<String> {
    d.status
        .as_ref()?
        .hardware_identity
        .as_ref()?
        .ek_public_key_digest
        .clone()
}

fn mismatches_counted(s: &Setup) -> u64 {
    s.counters
        .refusals
        .get_or_create(&ReasonLabel {
            reason: "HardwareMismatch".into(),
        })
        .get()
}

/// The events about `DEVICE` with `reason`.
async fn events(s: &Setup, reason: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
    Api::<k8s_openapi::api::events::v1::Event>::all(s.cp.client().await.unwrap())
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(DEVICE)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_pinned_to_its_first_tpm_until_an_admin_clears_it() {
    let s = setup().await;
    let (ek_a, ek_b) = (ek_digest(&s.tpm_a), ek_digest(&s.tpm_b));
    assert_ne!(ek_a, ek_b, "two TPMs, two EKs");

    // TPM A attests first: allowed, and its EK is recorded as the device's hardware.
    let a = tpm_round(&s, &s.tpm_a).await.unwrap();
    assert!(a.decision.allow, "{:?}", a.decision.deny);
    assert!(a.certificate.is_some());
    let d = device(&s).await;
    let identity = d
        .status
        .as_ref()
        .unwrap()
        .hardware_identity
        .clone()
        .unwrap();
    assert_eq!(identity.kind, edgefleet_crds::TeeKind::Tpm);
    assert_eq!(
        identity.ek_public_key_digest.as_deref(),
        Some(ek_a.as_str())
    );
    assert_eq!(events(&s, "HardwareIdentityRecorded").await.len(), 1);
    // A again: the same hardware.
    assert!(tpm_round(&s, &s.tpm_a).await.unwrap().certificate.is_some());

    // The same name and the same agent key from TPM B: refused, no certificate.
    let err = tpm_round(&s, &s.tpm_b).await.unwrap_err();
    assert_eq!(rejected(err), (403, "HardwareMismatch".to_owned()));
    let d = device(&s).await;
    assert_eq!(
        recorded_ek(&d).as_deref(),
        Some(ek_a.as_str()),
        "A's identity stays"
    );
    let attested = d
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Attested")
        .unwrap();
    assert_eq!(attested.status, "False");
    assert!(
        attested.message.starts_with("HardwareMismatch"),
        "{}",
        attested.message
    );
    assert_eq!(mismatches_counted(&s), 1);
    let warned = events(&s, "HardwareMismatch").await;
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(warned[0].type_.as_deref(), Some("Warning"));

    // Falling back to development evidence is another kind: a mismatch too.
    Api::<EdgeDevice>::all(s.cp.client().await.unwrap())
        .patch(
            DEVICE,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"facts": {"teeKinds": ["tpm", "dev"]}}})),
        )
        .await
        .unwrap();
    let challenge = s
        .client
        .challenge(&ChallengeRequest {
            device: DEVICE.into(),
            agent_public_key: spki_b64(&s.agent),
            tee: TeeKind::Dev,
            tpm: None,
        })
        .await
        .unwrap();
    let rd: [u8; 64] = hex::decode(&challenge.report_data)
        .unwrap()
        .try_into()
        .unwrap();
    let err = s
        .client
        .evidence(&EvidenceRequest {
            device: DEVICE.into(),
            nonce: challenge.nonce,
            csr: csr(&s.agent),
            evidence: Evidence::Dev {
                evidence: DevAttester::generate().evidence(&rd).unwrap(),
            },
        })
        .await
        .unwrap_err();
    assert_eq!(rejected(err), (403, "HardwareMismatch".to_owned()));
    assert_eq!(mismatches_counted(&s), 2);
    assert_eq!(
        recorded_ek(&device(&s).await).as_deref(),
        Some(ek_a.as_str())
    );

    // The administrator re-keys the device with `edgefleet device reset`; a name with no
    // EdgeDevice is refused by name and changes nothing.
    let reset = |name: &str| {
        let out =
            std::process::Command::new(edgefleet_e2e::local_fleet::binary("edgefleet").unwrap())
                .args(["device", "reset", name])
                .env("KUBECONFIG", s.cp.kubeconfig_path())
                .output()
                .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = reset("store-999-nobody");
    assert!(!ok);
    assert!(err.contains("no EdgeDevice store-999-nobody"), "{err}");
    assert_eq!(
        recorded_ek(&device(&s).await).as_deref(),
        Some(ek_a.as_str())
    );
    let (ok, out, err) = reset(DEVICE);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("reset the hardware identity of {DEVICE}")) && out.contains(&ek_a),
        "{out}"
    );
    assert_eq!(device(&s).await.status.unwrap().hardware_identity, None);
    let (ok, _, err) = reset(DEVICE);
    assert!(!ok);
    assert!(
        err.contains("has no recorded hardware identity: nothing to reset"),
        "{err}"
    );

    // Now B is accepted, and is the device's hardware from here on.
    let b = tpm_round(&s, &s.tpm_b).await.unwrap();
    assert!(b.decision.allow, "{:?}", b.decision.deny);
    assert!(b.certificate.is_some());
    assert_eq!(
        recorded_ek(&device(&s).await).as_deref(),
        Some(ek_b.as_str())
    );
    let err = tpm_round(&s, &s.tpm_a).await.unwrap_err();
    assert_eq!(rejected(err), (403, "HardwareMismatch".to_owned()));
    assert_eq!(
        recorded_ek(&device(&s).await).as_deref(),
        Some(ek_b.as_str())
    );
}

fn tpm_identity(ek: &[u8]) -> HardwareIdentity {
    let claims = Claims {
        tee: TeeKind::Tpm,
        hardware_genuine: true,
        debug: false,
        measurements: Default::default(),
        tcb: Default::default(),
        report_data: String::new(),
        key_binding: None,
        signer: "ak".into(),
        platform: Default::default(),
    };
    HardwareIdentity::of(&claims, Some(ek))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_record_one_identity_and_it_cannot_be_changed() {
    let s = setup().await;
    let seen = device(&s).await;
    let now = time::OffsetDateTime::now_utc();
    let (a, b) = (tpm_identity(b"EK A"), tpm_identity(b"EK B"));

    // Two writers that both read the device without an identity: one records its own,
    // the other finds the winner's.
    let (ra, rb) = tokio::join!(
        s.devices.pin_hardware_identity(&seen, &a, now),
        s.devices.pin_hardware_identity(&seen, &b, now),
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let winner = match (&ra, &rb) {
        (Pinned::Recorded, Pinned::Existing(w)) => {
            assert_eq!(w, &a);
            &a
        }
        (Pinned::Existing(w), Pinned::Recorded) => {
            assert_eq!(w, &b);
            &b
        }
        other => panic!("exactly one writer must win: {other:?}"),
    };
    assert_eq!(
        device_identity::recorded(&device(&s).await).as_ref(),
        Some(winner)
    );

    // A writer that read the device before the identity was recorded (a stale
    // resourceVersion) does not overwrite it.
    let loser = if winner == &a { &b } else { &a };
    assert_eq!(
        s.devices
            .pin_hardware_identity(&seen, loser, now)
            .await
            .unwrap(),
        Pinned::Existing(winner.clone())
    );
    assert_eq!(
        device_identity::recorded(&device(&s).await).as_ref(),
        Some(winner)
    );

    // Nor can any writer change a recorded identity, even forcing it: only removal.
    let api = Api::<EdgeDevice>::all(s.cp.client().await.unwrap());
    let forced = api
        .patch_status(
            DEVICE,
            &PatchParams::apply(device_identity::IDENTITY_MANAGER).force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "edgefleet.io/v1alpha1",
                "kind": "EdgeDevice",
                "status": {"hardwareIdentity": device_identity::status_value(loser, now)},
            })),
        )
        .await
        .unwrap_err();
    match forced {
        kube::Error::Api(e) => assert_eq!(e.code, 422, "{e:?}"),
        other => panic!("expected the API server to refuse: {other}"),
    }
    assert_eq!(
        device_identity::recorded(&device(&s).await).as_ref(),
        Some(winner)
    );
    api.patch_status(
        DEVICE,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"hardwareIdentity": null}})),
    )
    .await
    .unwrap();
    // The write is conditional on the resourceVersion the writer read: a stale one is a
    // conflict, even with no identity recorded (the writer then reads and tries again).
    let stale = api
        .patch_status(
            DEVICE,
            &PatchParams::apply(device_identity::IDENTITY_MANAGER).force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "edgefleet.io/v1alpha1",
                "kind": "EdgeDevice",
                "metadata": {"name": DEVICE, "resourceVersion": seen.metadata.resource_version},
                "status": {"hardwareIdentity": device_identity::status_value(loser, now)},
            })),
        )
        .await
        .unwrap_err();
    match stale {
        kube::Error::Api(e) => assert_eq!(e.code, 409, "{e:?}"),
        other => panic!("expected a conflict: {other}"),
    }
    assert_eq!(
        s.devices
            .pin_hardware_identity(&seen, loser, now)
            .await
            .unwrap(),
        Pinned::Recorded
    );
    assert_eq!(
        device_identity::recorded(&device(&s).await).as_ref(),
        Some(loser)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_name_cannot_be_taken_with_another_key() {
    let s = setup().await;
    // Another holder of the bootstrap token, with a key of its own, asks for the name.
    let thief = rcgen::KeyPair::generate().unwrap();
    let other = GatewayClient::new(&s.url, s.ca_pem.as_bytes(), TOKEN).unwrap();
    let err = other.enrol(&enrol_request(&thief)).await.unwrap_err();
    assert_eq!(rejected(err), (409, "AlreadyEnrolled".to_owned()));
    // Nor may it attest under the name: its key is not the enrolled one.
    let err = other
        .challenge(&ChallengeRequest {
            device: DEVICE.into(),
            agent_public_key: spki_b64(&thief),
            tee: TeeKind::Tpm,
            tpm: None,
        })
        .await
        .unwrap_err();
    assert_eq!(rejected(err), (403, "KeyMismatch".to_owned()));
    // The device keeps its key; enrolling again with it is answered, not created.
    let again = s.client.enrol(&enrol_request(&s.agent)).await.unwrap();
    assert!(!again.created);
    let fingerprint = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            rcgen::PublicKeyData::subject_public_key_info(&s.agent)
        ))
    );
    assert_eq!(
        device(&s).await.spec.facts.agent_key_fingerprint,
        fingerprint
    );
}

/// Revocation that takes effect, with the real operator process (its gateway) and a real
/// agent process (`dev` attester) serving the real SmolLM2 model:
///
/// - a connected device stops serving when it is unapproved;
/// - an agent restarted while unapproved stops serving its last-known-good as soon as
///   the gateway answers its enrolment "not approved" (`NotApproved`), and serves again
///   once approved;
/// - a model deleted while the agent was down is unloaded at its first desired state;
/// - a device cut off from the gateway stops serving at the end of its attestation
///   lease (`AttestationLeaseExpired`, at `status.attestation.leaseExpiryTime`), not long
///   before; restarted while still cut off, it does not serve its last-known-good; and
///   it serves again after its next successful attestation.
mod revocation {
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use edgefleet_crds::device::EdgeDevice;
    use edgefleet_e2e::builders::{
        EdgeModelBuilder, Signer, allow_all_pools, apply_edge_model, trust_signers_of,
    };
    use edgefleet_e2e::local_fleet::{self, Proc};
    use edgefleet_e2e::netns::Netns;
    use edgefleet_e2e::wait::eventually;
    use edgefleet_e2e::{ControlPlane, cache_dir, free_port};
    use kube::api::{Api, Patch, PatchParams};
    use serde_json::json;

    const NS: &str = "fleet";
    const DEVICE: &str = "rev-1";

    struct Fleet {
        _cp: ControlPlane,
        client: kube::Client,
        dir: tempfile::TempDir,
        /// The gateway URL as the agent reaches it.
        gateway: String,
        port: u16,
        agent: Option<Proc>,
        _operator: Proc,
    }

    impl Drop for Fleet {
        fn drop(&mut self) {
            if std::thread::panicking() {
                for n in ["operator", DEVICE] {
                    let text = std::fs::read_to_string(self.dir.path().join(format!("{n}.log")))
                        .unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    eprintln!(
                        "--- {n}\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
    }

    fn model_file() -> PathBuf {
        std::env::var_os("EDGEFLEET_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    }

    fn start_agent(d: &Path, gateway: &str, port: u16, netns: Option<&Netns>) -> Proc {
        Proc(
            local_fleet::spawn_agent(&local_fleet::AgentSpec {
                name: DEVICE.into(),
                dir: d.join(DEVICE),
                gateway: gateway.into(),
                gateway_ca: d.join("gw-ca.crt"),
                port,
                tee: "dev".into(),
                tcti: None,
                netns: netns.map(|n| n.name.clone()),
                pool: "rev".into(),
                log: d.join(format!("{DEVICE}.log")),
            })
            .unwrap(),
        )
    }

    /// The operator (with `extra` arguments) and one agent (in `netns` when given),
    /// serving the signed model.
    async fn fleet(extra: &[&str], netns: Option<&Netns>) -> Fleet {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cp = ControlPlane::start().await.unwrap();
        cp.install_crds().await.unwrap();
        let client = cp.client().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pki = local_fleet::GatewayPki::write(
            d,
            &netns.map(|n| vec![n.host_ip.clone()]).unwrap_or_default(),
        )
        .unwrap();
        let store = d.join("artifacts");
        let model = model_file();
        let (digest, size) = local_fleet::store_artifact(&store, &model).unwrap();
        let signer = Signer::generate().unwrap();
        let bundle = signer.sign(&model).unwrap();
        let gw_port = free_port().unwrap();
        let operator = local_fleet::spawn_operator_with(
            cp.kubeconfig_path(),
            &pki,
            &local_fleet::OperatorSpec {
                gateway_addr: match netns {
                    Some(_) => format!("0.0.0.0:{gw_port}"),
                    None => format!("127.0.0.1:{gw_port}"),
                },
                artifact_dir: store,
                approval: "auto:edgefleet.io/pool=rev".into(),
                ek_cas: vec![],
                ek_intermediates: vec![],
                heartbeat_lease_seconds: 8,
                artifact_ca: None,
                log: d.join("operator.log"),
            },
            extra,
        )
        .unwrap();
        let host = netns.map_or("127.0.0.1".to_owned(), |n| n.host_ip.clone());
        let gateway = format!("https://{host}:{gw_port}");
        let port = free_port().unwrap();
        local_fleet::create_pool_token(&client, "rev")
            .await
            .unwrap();
        let agent = start_agent(d, &gateway, port, netns);
        let manifest = EdgeModelBuilder::new(NS, "smollm2")
            .artifact(
                "https://artifacts.example/smollm2.gguf",
                &digest,
                Some(size),
            )
            .inline_signature(&bundle)
            .signer("models-team", &signer.public_key)
            .pool("rev")
            .attestation(&["dev"], Some("dev"))
            .rollout(json!({"steps": [{"percent": 100}], "maxUnavailable": 1}))
            .runtime(json!({"contextSize": 512, "threads": 1, "parallelSlots": 1}))
            .build();
        allow_all_pools(&client).await.unwrap();
        trust_signers_of(&client, &manifest).await.unwrap();
        apply_edge_model(&client, &manifest).await.unwrap();
        let f = Fleet {
            _cp: cp,
            client,
            dir,
            gateway,
            port,
            agent: Some(agent),
            _operator: Proc(operator),
        };
        let ready = f.url("/readyz");
        eventually("the device serves", Duration::from_secs(180), || async {
            (get(netns, &ready).await.0 == 200).then_some(())
        })
        .await;
        // The agent answers as soon as the model is installed and records it as
        // last-known-good right after; the tests that restart it need that record.
        eventually(
            "the model recorded as last-known-good",
            Duration::from_secs(30),
            || async { f.log().contains("converge: serving").then_some(()) },
        )
        .await;
        f
    }

    impl Fleet {
        fn url(&self, path: &str) -> String {
            format!("http://127.0.0.1:{}{path}", self.port)
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self.dir.path().join(format!("{DEVICE}.log")))
                .unwrap_or_default()
        }

        async fn approve(&self, approved: bool) {
            Api::<EdgeDevice>::all(self.client.clone())
                .patch(
                    DEVICE,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"approved": approved}})),
                )
                .await
                .unwrap();
        }

        async fn device(&self) -> EdgeDevice {
            Api::<EdgeDevice>::all(self.client.clone())
                .get(DEVICE)
                .await
                .unwrap()
        }
    }

    /// GET `url` (from inside `netns` when given): status and body.
    async fn get(netns: Option<&Netns>, url: &str) -> (u16, String) {
        match netns {
            Some(n) => n.curl(url, None),
            None => match reqwest::get(url).await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(_) => (0, String::new()),
            },
        }
    }

    /// Whether the device answers like a device with no model: `/readyz` "no model",
    /// and a chat refused with 503.
    async fn serves_nothing(f: &Fleet, netns: Option<&Netns>) -> bool {
        let (code, body) = get(netns, &f.url("/readyz")).await;
        if (code, body.trim()) != (503, "no model") {
            return false;
        }
        let chat =
            r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":4}"#;
        let (code, _) = match netns {
            Some(n) => n.curl(&f.url("/v1/chat/completions"), Some(chat)),
            None => {
                let r = reqwest::Client::new()
                    .post(f.url("/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(chat)
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), String::new())
            }
        };
        code == 503
    }

    /// Holds today; kept as a regression test.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connected_device_stops_serving_when_unapproved() {
        let f = fleet(&[], None).await;
        f.approve(false).await;
        eventually(
            "the unapproved device stops serving",
            Duration::from_secs(30),
            || async { serves_nothing(&f, None).await.then_some(()) },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_restarted_while_unapproved_stops_serving_its_last_known_good() {
        let mut f = fleet(&[], None).await;
        drop(f.agent.take());
        f.approve(false).await;
        let restarted = Instant::now();
        f.agent = Some(start_agent(f.dir.path(), &f.gateway, f.port, None));
        // It reaches the gateway at once (on the same host) and is told "not approved".
        eventually(
            "the restarted, unapproved agent stops serving",
            Duration::from_secs(30),
            || async { serves_nothing(&f, None).await.then_some(()) },
        )
        .await;
        assert!(restarted.elapsed() < Duration::from_secs(30));
        let log = f.log();
        assert!(
            log.contains("NotApproved: the gateway says this device is not approved"),
            "{log}"
        );
        // It keeps asking; approved again, it converges and serves.
        f.approve(true).await;
        eventually(
            "approved again, it serves",
            Duration::from_secs(60),
            || async { (get(None, &f.url("/readyz")).await.0 == 200).then_some(()) },
        )
        .await;
    }

    /// Holds today; kept as a regression test.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_deleted_while_the_agent_was_down_is_unloaded_at_the_first_desired_state() {
        let mut f = fleet(&[], None).await;
        drop(f.agent.take());
        Api::<edgefleet_crds::EdgeModel>::namespaced(f.client.clone(), NS)
            .delete("smollm2", &kube::api::DeleteParams::default())
            .await
            .unwrap();
        f.agent = Some(start_agent(f.dir.path(), &f.gateway, f.port, None));
        eventually(
            "the restarted agent unloads the deleted model",
            Duration::from_secs(30),
            || async { serves_nothing(&f, None).await.then_some(()) },
        )
        .await;
        let log = f.log();
        assert!(log.contains("unassigned; unloading"), "{log}");
    }

    fn unix_now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_offline_device_stops_serving_at_the_end_of_its_attestation_lease() {
        let net = Netns::create();
        let mut f = fleet(&["--attestation-lease-seconds=20"], Some(&net)).await;
        // The lease the gateway granted at the last allowed attestation is in status.
        eventually("the lease in status", Duration::from_secs(30), || async {
            let d = f.device().await;
            d.status?.attestation?.lease_expiry_time
        })
        .await;

        net.link(false);
        let cut = unix_now();
        // The lease the agent enforces, as it recorded it (`state/attestation-lease.json`,
        // `gateway_session::lease`): no attestation reaches it after the cut.
        let recorded: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                f.dir
                    .path()
                    .join(DEVICE)
                    .join("state")
                    .join("attestation-lease.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let expiry = recorded["expiresAt"].as_i64().unwrap();
        assert!(
            expiry > cut && expiry <= cut + 21,
            "lease end {expiry}, cut at {cut}"
        );
        // The gateway granted (and recorded in status) at least that lease.
        eventually("the lease in status", Duration::from_secs(10), || async {
            let granted = f.device().await.status?.attestation?.lease_expiry_time?;
            (granted.0.as_second() >= expiry - 1).then_some(())
        })
        .await;
        // Serving still, until shortly before the lease ends.
        while unix_now() < expiry - 3 {
            assert!(
                !serves_nothing(&f, Some(&net)).await,
                "stopped {}s before the lease ended",
                expiry - unix_now()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let stopped = eventually(
            "the offline device stops serving at the lease's end",
            Duration::from_secs(15),
            || async { serves_nothing(&f, Some(&net)).await.then(unix_now) },
        )
        .await;
        assert!(
            stopped >= expiry - 2 && stopped <= expiry + 8,
            "stopped at {stopped}, the lease ended at {expiry}"
        );
        let log = f.log();
        assert!(
            log.contains(
                "AttestationLeaseExpired: no successful attestation within the attestation lease"
            ),
            "{log}"
        );

        // Restarted while still cut off, its last-known-good (lease over) is not served.
        drop(f.agent.take());
        f.agent = Some(start_agent(f.dir.path(), &f.gateway, f.port, Some(&net)));
        eventually(
            "the restarted agent answers",
            Duration::from_secs(30),
            || async { (get(Some(&net), &f.url("/healthz")).await.0 == 200).then_some(()) },
        )
        .await;
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            assert!(
                serves_nothing(&f, Some(&net)).await,
                "a last-known-good whose lease is over was served at start"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let log = f.log();
        assert!(
            log.contains(
                "the last-known-good model is not served before the next successful attestation"
            ),
            "{log}"
        );

        // Back online: it attests, reports why it stopped, and serves again.
        net.link(true);
        eventually(
            "attested again, it serves",
            Duration::from_secs(60),
            || async { (get(Some(&net), &f.url("/readyz")).await.0 == 200).then_some(()) },
        )
        .await;
        let d = f.device().await;
        let renewed = d
            .status
            .and_then(|s| s.attestation)
            .and_then(|a| a.lease_expiry_time)
            .unwrap()
            .0
            .as_second();
        assert!(renewed > expiry, "the lease was not renewed");
    }
}

/// The roots a chart user passes reach the gateway: `helm template` of charts/edgefleet
/// with `attestation.tpm.ekCaBundle` (and `ekIntermediates`) set to a software TPM's EK
/// CA, the rendered operator container run as a local process with exactly its rendered
/// arguments (the rendered ConfigMaps and Secrets, and the Secrets an installer creates,
/// written at their mount paths under a directory; only the listen addresses replaced),
/// and a real agent process with that TPM enrols and is `Attested=True`. Without the
/// values, the chart renders no roots and the same agent is refused `ChainInvalid`.
mod chart {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::Duration;

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use edgefleet_agent::attest::tpm::TpmAttester;
    use edgefleet_agent::gateway_client::GatewayClient;
    use edgefleet_crds::device::EdgeDevice;
    use edgefleet_e2e::chart::{self, LocalOperator};
    use edgefleet_e2e::local_fleet::{self, BOOTSTRAP_TOKEN, Proc};
    use edgefleet_e2e::swtpm::Swtpm;
    use edgefleet_e2e::wait::eventually;
    use edgefleet_e2e::{ControlPlane, free_port};
    use edgefleet_trust::attestation::TeeKind;
    use edgefleet_trust::attestation::service::{ChallengeRequest, TpmEnrolment};
    use kube::api::Api;
    use serde_json::json;

    const AGENT: &str = "chart-tpm-1";

    struct Install {
        _cp: ControlPlane,
        client: kube::Client,
        dir: tempfile::TempDir,
        operator: LocalOperator,
        gateway: String,
        metrics: u16,
        _tpm: Swtpm,
        _agent: Proc,
        _operator: Proc,
    }

    impl Drop for Install {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!("--- operator args: {:?}", self.operator.args);
                for n in ["operator", AGENT] {
                    let text = std::fs::read_to_string(self.dir.path().join(format!("{n}.log")))
                        .unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    eprintln!(
                        "--- {n}\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
    }

    fn pem_of(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    /// Values every install here sets: automatic approval, and a bootstrap token Secret
    /// the installer made (so the agent knows the token), merged with `roots`.
    fn values(roots: serde_json::Value) -> serde_json::Value {
        let mut v = json!({
            "gateway": {
                "approval": "auto",
                "bootstrapToken": {"shared": true, "existingSecret": "fleet-token"}
            }
        });
        if !roots.is_null() {
            v["attestation"] = roots;
        }
        v
    }

    /// Renders the chart with `values`, runs its operator with the rendered arguments
    /// against a fresh control plane, and starts a real agent (`tpm`, on `tpm`).
    async fn install(values: serde_json::Value, tpm: Swtpm) -> Install {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cp = ControlPlane::start().await.unwrap();
        cp.install_crds().await.unwrap();
        let client = cp.client().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        local_fleet::GatewayPki::write(d, &[]).unwrap();

        let rendered = chart::template(&values).unwrap();
        // The Secrets an installer creates before `helm install` (docs/install-k3s.md).
        let file = |name: &str| std::fs::read(d.join(name)).unwrap();
        let existing: BTreeMap<String, BTreeMap<String, Vec<u8>>> = [
            (
                "edgefleet-gateway-tls",
                [("tls.crt", file("gw.crt")), ("tls.key", file("gw.key"))],
            ),
            (
                "edgefleet-device-ca",
                [
                    ("tls.crt", file("dev-ca.crt")),
                    ("tls.key", file("dev-ca.key")),
                ],
            ),
        ]
        .into_iter()
        .map(|(name, files)| {
            (
                name.to_owned(),
                files.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            )
        })
        .chain([(
            "fleet-token".to_owned(),
            BTreeMap::from([("token".to_owned(), BOOTSTRAP_TOKEN.as_bytes().to_vec())]),
        )])
        .collect();
        let mut operator = rendered
            .local_operator(&d.join("pod"), "edgefleet-operator-0", &existing)
            .unwrap();
        let (gw_port, metrics) = (free_port().unwrap(), free_port().unwrap());
        operator.set_flag("--gateway-addr", &format!("127.0.0.1:{gw_port}"));
        operator.set_flag("--metrics-addr", &format!("127.0.0.1:{metrics}"));
        let op = Proc(
            operator
                .spawn(cp.kubeconfig_path(), &d.join("operator.log"))
                .unwrap(),
        );
        let gateway = format!("https://127.0.0.1:{gw_port}");
        eventually("the gateway listens", Duration::from_secs(60), || async {
            std::net::TcpStream::connect(("127.0.0.1", gw_port))
                .is_ok()
                .then_some(())
        })
        .await;
        local_fleet::create_pool_token(&client, "chart")
            .await
            .unwrap();
        let agent = Proc(
            local_fleet::spawn_agent(&local_fleet::AgentSpec {
                name: AGENT.into(),
                dir: d.join(AGENT),
                gateway: gateway.clone(),
                gateway_ca: d.join("gw-ca.crt"),
                port: free_port().unwrap(),
                tee: "tpm".into(),
                tcti: Some(tpm.tcti()),
                netns: None,
                pool: "chart".into(),
                log: d.join(format!("{AGENT}.log")),
            })
            .unwrap(),
        );
        Install {
            _cp: cp,
            client,
            dir,
            operator,
            gateway,
            metrics,
            _tpm: tpm,
            _agent: agent,
            _operator: op,
        }
    }

    impl Install {
        async fn device(&self) -> Option<EdgeDevice> {
            Api::<EdgeDevice>::all(self.client.clone())
                .get_opt(AGENT)
                .await
                .unwrap()
        }

        /// `edgefleet_operator_gateway_refusals_total{reason}` on the operator's metrics
        /// endpoint.
        async fn refusals(&self, reason: &str) -> f64 {
            let url = format!("http://127.0.0.1:{}/metrics", self.metrics);
            let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
            let series =
                format!("edgefleet_operator_gateway_refusals_total{{reason=\"{reason}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0)
        }
    }

    fn attested(d: &EdgeDevice) -> Option<String> {
        d.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Attested")
            .map(|c| c.status.clone())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tpm_ek_ca_set_in_chart_values_lets_a_tpm_device_attest() {
        let tpm = Swtpm::start();
        let roots = json!({"tpm": {
            "ekCaBundle": pem_of(&tpm.ca_path("swtpm-localca-rootca-cert.pem")),
            "ekIntermediates": pem_of(&tpm.ca_path("issuercert.pem")),
        }});
        let rendered = chart::template(&values(roots.clone())).unwrap();
        assert!(
            rendered
                .names("ConfigMap")
                .contains(&"edgefleet-operator-roots".to_owned()),
            "{:?}",
            rendered.names("ConfigMap")
        );
        let s = install(values(roots), tpm).await;
        assert!(
            s.operator
                .has_flag("--ek-ca", "/etc/edgefleet/roots/ek-ca.pem"),
            "{:?}",
            s.operator.args
        );
        assert!(s.operator.has_flag(
            "--ek-intermediate",
            "/etc/edgefleet/roots/ek-intermediates.pem"
        ));

        let d = eventually(
            "the TPM device is Attested=True",
            Duration::from_secs(120),
            || async {
                let d = s.device().await?;
                (attested(&d).as_deref() == Some("True")).then_some(d)
            },
        )
        .await;
        let summary = d.status.as_ref().unwrap().attestation.clone().unwrap();
        assert!(summary.allowed);
        assert_eq!(summary.tee_kind, edgefleet_crds::TeeKind::Tpm);
        assert!(summary.policy.starts_with("default"), "{}", summary.policy);
        assert_eq!(s.refusals("ChainInvalid").await, 0.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_the_ek_ca_in_chart_values_a_tpm_device_is_refused_chain_invalid() {
        let rendered = chart::template(&values(serde_json::Value::Null)).unwrap();
        assert!(
            !rendered
                .names("ConfigMap")
                .contains(&"edgefleet-operator-roots".to_owned())
        );
        let s = install(values(serde_json::Value::Null), Swtpm::start()).await;
        assert!(
            !s.operator.args.iter().any(|a| a.starts_with("--ek-ca")),
            "{:?}",
            s.operator.args
        );

        // The agent enrols (approval is automatic) and its attestation is refused.
        eventually(
            "the agent's attestation refused ChainInvalid",
            Duration::from_secs(120),
            || async { (s.refusals("ChainInvalid").await >= 1.0).then_some(()) },
        )
        .await;
        let d = s.device().await.expect("the agent enrolled");
        assert_ne!(attested(&d).as_deref(), Some("True"));

        // The gateway's answer, as the agent got it: 403, ChainInvalid (another swtpm:
        // the agent holds its own).
        let key = rcgen::KeyPair::generate().unwrap();
        let gw_ca = std::fs::read(s.dir.path().join("gw-ca.crt")).unwrap();
        let client = GatewayClient::new(&s.gateway, &gw_ca, BOOTSTRAP_TOKEN).unwrap();
        let mut request = super::enrol_request(&key);
        request.device = "chart-tpm-2".into();
        client.enrol(&request).await.unwrap();
        let other = Swtpm::start();
        let mut attester = TpmAttester::open(&other.tcti()).unwrap();
        let refused = client
            .challenge(&ChallengeRequest {
                device: "chart-tpm-2".into(),
                agent_public_key: super::spki_b64(&key),
                tee: TeeKind::Tpm,
                tpm: Some(TpmEnrolment {
                    ek_certificate: B64.encode(attester.ek_certificate().unwrap()),
                    ak_public_area: B64.encode(attester.ak_public_area().unwrap()),
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(super::rejected(refused), (403, "ChainInvalid".to_owned()));
    }
}

#[path = "trust_boundary/tokens.rs"]
mod tokens;

#[path = "trust_boundary/policy.rs"]
mod policy;

#[path = "trust_boundary/pins.rs"]
mod pins;
