//! Cluster-owned trust roots (`EdgeTrustPolicy`), against the real API server:
//!
//! - an EdgeModel whose signer no policy grants reaches no device (`SignatureVerified`
//!   False `UntrustedSigner`, a Warning event, no assignment), nor one granted only to
//!   another namespace; a bare-name reference resolves to the policy's signer and
//!   rolls out, with the full signer in the revision template devices are served from;
//! - removing the signer from the policy withdraws the revision: the assignment goes,
//!   the template is dropped, a `RevisionWithdrawn` event names it;
//! - a namespace cannot target a device pool it is not bound to, while a bound one can;
//! - the API server refuses a pool selecting on device-owned labels;
//! - through the real gateway's report endpoint (a real operator process, two devices
//!   enrolled and attested with dev evidence), a device's local refusal
//!   (`PluginGrantDenied`) excludes only it: the other completes the rollout, the model
//!   is neither Failed nor Degraded, and the refusal is counted and announced once.
//!
//! The EdgeModel reconciler runs in-process (`edgemodel::run`, its own policy watch)
//! except in the last test.

use std::time::Duration;

use edgefleet_crds::{EdgeDevice, EdgeModel, ModelPhase};
use edgefleet_e2e::ControlPlane;
use edgefleet_e2e::builders::{
    DeviceStatusBuilder, EdgeDeviceBuilder, EdgeModelBuilder, SignedArtifact, Signer,
    apply_edge_model, apply_trust_policy, bind_pool, trust_signer,
};
use edgefleet_e2e::wait::eventually;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(30);

/// A control plane with the CRDs and the EdgeModel reconciler running in-process.
async fn cluster() -> (ControlPlane, Client, tokio::task::JoinHandle<()>) {
    let cp = ControlPlane::start().await.expect("control plane starts");
    cp.install_crds().await.expect("CRDs install");
    let client = cp.client().await.unwrap();
    let operator = tokio::spawn(edgefleet_operator::edgemodel::run(client.clone()));
    (cp, client, operator)
}

/// An approved, ready TPM device attested under the default policy, labelled (by the
/// administrator) `edgefleet.io/pool=pool`.
async fn device(client: &Client, name: &str, pool: &str) {
    let fingerprint = format!("sha256:{:0>64}", hex::encode(name));
    let d = EdgeDeviceBuilder::new(name, &fingerprint[..71])
        .pool(pool)
        .build()
        .unwrap();
    let api: Api<EdgeDevice> = Api::all(client.clone());
    api.create(&PostParams::default(), &d).await.unwrap();
    let status = DeviceStatusBuilder::attestation(
        true,
        "tpm",
        &format!("sha256:{}", "b".repeat(64)),
        k8s_openapi::jiff::Timestamp::now(),
    )
    .ready(true)
    .build();
    api.patch_status(
        name,
        &kube::api::PatchParams::apply("test-gateway").force(),
        &kube::api::Patch::Apply(status),
    )
    .await
    .unwrap();
}

fn signed() -> (Signer, SignedArtifact) {
    let signer = Signer::generate().unwrap();
    let artifact = signer.artifact_of(b"GGUF model bytes").unwrap();
    (signer, artifact)
}

/// The model `ns/smollm2`, signed, for every device (empty selector), TPM evidence.
fn model(ns: &str, artifact: &SignedArtifact) -> EdgeModelBuilder {
    EdgeModelBuilder::new(ns, "smollm2")
        .artifact("https://artifacts.example/m.gguf", &artifact.digest, None)
        .inline_signature(&artifact.bundle)
        .attestation(&["tpm"], Some("default"))
}

async fn get_model(client: &Client, ns: &str) -> EdgeModel {
    Api::<EdgeModel>::namespaced(client.clone(), ns)
        .get("smollm2")
        .await
        .unwrap()
}

/// `(status, reason, message)` of the model's condition `kind`.
fn condition(m: &EdgeModel, kind: &str) -> Option<(String, String, String)> {
    m.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn assignment(client: &Client, device: &str, ns: &str) -> Option<String> {
    edgefleet_e2e::builders::assigned_revision(client, ns, "smollm2", device).await
}

/// The notes of the events on `ns/smollm2` with `reason`.
async fn events(client: &Client, ns: &str, reason: &str) -> Vec<String> {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("smollm2")
        })
        .filter_map(|e| e.note)
        .collect()
}

/// Waits for the model's `SignatureVerified` to be False with `UntrustedSigner`; returns
/// its message.
async fn untrusted(client: &Client, ns: &str) -> String {
    eventually(
        "SignatureVerified False UntrustedSigner",
        PATIENCE,
        || async {
            let (status, reason, msg) =
                condition(&get_model(client, ns).await, "SignatureVerified")?;
            (status == "False" && reason == "UntrustedSigner").then_some(msg)
        },
    )
    .await
}

#[tokio::test]
async fn an_edgemodel_with_an_untrusted_signer_reaches_no_device() {
    let (_cp, client, _op) = cluster().await;
    bind_pool(&client, "retail", &["retail"]).await.unwrap();
    device(&client, "till-a", "retail").await;
    let (signer, artifact) = signed();
    // The author names a key of their own: no policy holds it.
    let manifest = model("retail", &artifact)
        .signer("models-team", &signer.public_key)
        .build();
    apply_edge_model(&client, &manifest).await.unwrap();
    let msg = untrusted(&client, "retail").await;
    assert_eq!(
        msg,
        "no EdgeTrustPolicy lets namespace retail use signer models-team"
    );
    let m = get_model(&client, "retail").await;
    let status = m.status.unwrap();
    assert_eq!(status.phase, Some(ModelPhase::Failed));
    assert!(status.revisions.is_empty(), "no template: {status:?}");
    eventually("the UntrustedSigner event", PATIENCE, || async {
        let e = events(&client, "retail", "UntrustedSigner").await;
        (e.len() == 1 && e[0] == msg).then_some(())
    })
    .await;
    assert_eq!(assignment(&client, "till-a", "retail").await, None);

    // Another key trusted under the same name does not trust the author's.
    let (other, _) = signed();
    trust_signer(&client, "models-team", &other.public_key, &["retail"])
        .await
        .unwrap();
    eventually("a key mismatch", PATIENCE, || async {
        let (_, reason, msg) = condition(&get_model(&client, "retail").await, "SignatureVerified")?;
        (reason == "UntrustedSigner" && msg.starts_with("signer models-team differs")).then_some(())
    })
    .await;
    assert_eq!(assignment(&client, "till-a", "retail").await, None);
}

#[tokio::test]
async fn a_signer_granted_to_another_namespace_only_is_refused() {
    let (_cp, client, _op) = cluster().await;
    bind_pool(&client, "retail", &["retail", "labs"])
        .await
        .unwrap();
    device(&client, "till-a", "retail").await;
    let (signer, artifact) = signed();
    trust_signer(&client, "labs-team", &signer.public_key, &["labs"])
        .await
        .unwrap();
    let manifest = model("retail", &artifact).signer_named("labs-team").build();
    apply_edge_model(&client, &manifest).await.unwrap();
    let msg = untrusted(&client, "retail").await;
    assert_eq!(
        msg,
        "signer labs-team is not granted to namespace retail by any EdgeTrustPolicy"
    );
    assert_eq!(assignment(&client, "till-a", "retail").await, None);

    // The same model in the namespace the signer is granted to rolls out.
    let manifest = model("labs", &artifact).signer_named("labs-team").build();
    apply_edge_model(&client, &manifest).await.unwrap();
    eventually("labs/smollm2 assigned", PATIENCE, || {
        assignment(&client, "till-a", "labs")
    })
    .await;
    assert_eq!(assignment(&client, "till-a", "retail").await, None);
}

#[tokio::test]
async fn a_bare_name_resolves_and_removing_the_signer_withdraws_the_revision() {
    let (_cp, client, _op) = cluster().await;
    bind_pool(&client, "retail", &["retail"]).await.unwrap();
    device(&client, "till-a", "retail").await;
    let (signer, artifact) = signed();
    let policy = json!({
        "signers": [{"name": "models-team", "publicKey": signer.public_key, "namespaces": ["retail"]}],
    });
    apply_trust_policy(&client, "models", policy).await.unwrap();
    let manifest = model("retail", &artifact)
        .signer_named("models-team")
        .build();
    apply_edge_model(&client, &manifest).await.unwrap();
    let rev = eventually(
        "the bare-named signer's revision assigned",
        PATIENCE,
        || assignment(&client, "till-a", "retail"),
    )
    .await;
    let m = get_model(&client, "retail").await;
    let (status, reason, _) = condition(&m, "SignatureVerified").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "SignatureValid")
    );
    // Devices get the policy's signer in full.
    let template = &m.status.unwrap().revisions[0];
    assert_eq!(template.revision, rev);
    assert_eq!(template.signers.len(), 1);
    assert_eq!(
        template.signers[0].public_key.as_deref(),
        Some(signer.public_key.as_str())
    );

    // The administrator removes the signer (the policy keeps nothing else).
    apply_trust_policy(&client, "models", json!({"signers": []}))
        .await
        .unwrap();
    eventually("the assignment withdrawn", PATIENCE, || async {
        assignment(&client, "till-a", "retail")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    let m = eventually("the template dropped", PATIENCE, || async {
        let m = get_model(&client, "retail").await;
        m.status.as_ref()?.revisions.is_empty().then_some(m)
    })
    .await;
    let (_, reason, msg) = condition(&m, "SignatureVerified").unwrap();
    assert_eq!(reason, "UntrustedSigner", "{msg}");
    let withdrawn = eventually("the RevisionWithdrawn event", PATIENCE, || async {
        let e = events(&client, "retail", "RevisionWithdrawn").await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert!(
        withdrawn[0].starts_with(&format!(
            "revision {rev} withdrawn: no EdgeTrustPolicy grants its signer(s) models-team to namespace retail any more"
        )),
        "{withdrawn:?}"
    );
    // Deleting the whole policy changes nothing more, and a new grant brings it back.
    Api::<edgefleet_crds::EdgeTrustPolicy>::all(client.clone())
        .delete("models", &DeleteParams::default())
        .await
        .unwrap();
    trust_signer(&client, "models-team", &signer.public_key, &["retail"])
        .await
        .unwrap();
    eventually("assigned again once trusted again", PATIENCE, || {
        assignment(&client, "till-a", "retail")
    })
    .await;
}

#[tokio::test]
async fn a_namespace_cannot_target_a_device_pool_it_is_not_bound_to() {
    let (_cp, client, _op) = cluster().await;
    device(&client, "till-a", "retail").await;
    device(&client, "lab-1", "labs").await;
    let (signer, artifact) = signed();
    trust_signer(&client, "models-team", &signer.public_key, &["*"])
        .await
        .unwrap();
    // No pool is bound yet: nothing is a candidate, and the status says why.
    let manifest = model("retail", &artifact)
        .signer_named("models-team")
        .build();
    apply_edge_model(&client, &manifest).await.unwrap();
    let msg = eventually("Pending for want of a pool", PATIENCE, || async {
        let (_, reason, msg) = condition(&get_model(&client, "retail").await, "Progressing")?;
        (reason == "NoDevicePool").then_some(msg)
    })
    .await;
    assert_eq!(
        msg,
        "no EdgeTrustPolicy binds a device pool to namespace retail"
    );

    // retail is bound to the stores' pool: its model reaches till-a, never lab-1,
    // though its selector (empty) matches both.
    bind_pool(&client, "retail", &["retail"]).await.unwrap();
    eventually("till-a assigned", PATIENCE, || {
        assignment(&client, "till-a", "retail")
    })
    .await;
    let m = get_model(&client, "retail").await;
    assert_eq!(m.status.unwrap().devices.targeted, 1);
    assert_eq!(assignment(&client, "lab-1", "retail").await, None);

    // Bound to the labs pool, the labs namespace reaches lab-1 only.
    bind_pool(&client, "labs", &["labs"]).await.unwrap();
    let manifest = model("labs", &artifact).signer_named("models-team").build();
    apply_edge_model(&client, &manifest).await.unwrap();
    eventually("lab-1 assigned", PATIENCE, || {
        assignment(&client, "lab-1", "labs")
    })
    .await;
    assert_eq!(assignment(&client, "till-a", "labs").await, None);
    assert_eq!(assignment(&client, "lab-1", "retail").await, None);
}

#[tokio::test]
async fn a_pool_selecting_device_owned_labels_is_refused() {
    let cp = ControlPlane::start().await.expect("control plane starts");
    cp.install_crds().await.expect("CRDs install");
    let client = cp.client().await.unwrap();
    for selector in [
        json!({"matchLabels": {"device.edgefleet.io/pool": "retail"}}),
        json!({"matchExpressions": [{"key": "device.edgefleet.io/pool", "operator": "Exists"}]}),
    ] {
        let err = apply_trust_policy(
            &client,
            "sneaky",
            json!({"devicePools": [{"name": "p", "selector": selector, "namespaces": ["*"]}]}),
        )
        .await
        .unwrap_err();
        let text = format!("{:?}", err);
        assert!(
            text.contains("a device pool must not select on device-owned labels"),
            "{text}"
        );
    }
    // A signer needs exactly one of a key and a root, and namespaces.
    let err = apply_trust_policy(
        &client,
        "bad-signer",
        json!({"signers": [{"name": "s", "namespaces": ["*"]}]}),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{err:?}").contains("a signer has exactly one of publicKey and certificateRoot"),
        "{err:?}"
    );
    // An administrator's label is fine.
    apply_trust_policy(
        &client,
        "fine",
        json!({"devicePools": [{"name": "p", "selector": {"matchLabels": {"edgefleet.io/pool": "x"}}, "namespaces": ["retail"]}]}),
    )
    .await
    .unwrap();
    let example: Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            edgefleet_e2e::workspace_root().join("examples/edgetrustpolicy.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    apply_trust_policy(&client, "example", example["spec"].clone())
        .await
        .unwrap();
}

/// A real operator process and two devices on the device API, enrolled and attested
/// with dev evidence through its gateway; each reports its model states itself.
mod through_the_gateway {
    use std::path::Path;
    use std::time::Duration;

    use edgefleet_agent::attest::dev::DevAttester;
    use edgefleet_agent::enrol::{Source, agent_key, attest_once};
    use edgefleet_agent::gateway_client::GatewayClient;
    use edgefleet_agent::gateway_session::DeviceClient;
    use edgefleet_crds::{EdgeModel, ModelPhase};
    use edgefleet_e2e::builders::{EdgeModelBuilder, Signer, allow_all_pools, trust_signers_of};
    use edgefleet_e2e::local_fleet::{self, BOOTSTRAP_TOKEN, Proc};
    use edgefleet_e2e::wait::eventually;
    use edgefleet_e2e::{ControlPlane, free_port};
    use edgefleet_proto as proto;
    use kube::api::Api;
    use serde_json::json;

    const NS: &str = "fleet";

    /// A device: enrolled, attested, holding its client certificate.
    struct Device {
        name: String,
        client: DeviceClient,
        boot: String,
        seq: u64,
    }

    impl Device {
        async fn enrol(gateway: &str, ca: &[u8], dir: &Path, name: &str) -> Self {
            let state = dir.join(name);
            std::fs::create_dir_all(&state).unwrap();
            let key = agent_key(&state).unwrap();
            let client = GatewayClient::new(gateway, ca, BOOTSTRAP_TOKEN).unwrap();
            use base64::Engine as _;
            let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
            client
                .enrol(&proto::EnrolRequest {
                    device: name.into(),
                    agent_public_key: base64::engine::general_purpose::STANDARD.encode(spki),
                    facts: proto::Facts {
                        arch: "x86_64".into(),
                        cpu_cores: 2,
                        memory_bytes: 4 << 30,
                        accelerators: vec![],
                        tee_kinds: vec!["dev".into()],
                        agent_version: "0.1.0".into(),
                    },
                    labels: Default::default(),
                })
                .await
                .unwrap();
            let mut source = Source::Dev(DevAttester::generate());
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while let Err(e) = attest_once(&client, name, &mut source, &state).await {
                assert!(std::time::Instant::now() < deadline, "{name}: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let cert = std::fs::read(state.join("agent-cert.pem")).unwrap();
            let device = DeviceClient::new(
                gateway,
                ca,
                &cert,
                key.serialize_pem().as_bytes(),
                name,
                Duration::from_secs(30),
            )
            .unwrap();
            Self {
                name: name.into(),
                client: device,
                boot: format!("boot-{name}"),
                seq: 0,
            }
        }

        /// Reports `models` (model, revision, state, reason), as the agent does.
        async fn report(&mut self, models: &[(&str, &str, proto::ModelState, Option<&str>)]) {
            self.seq += 1;
            let reports = vec![proto::Report {
                seq: self.seq,
                boot: self.boot.clone(),
                time: k8s_openapi::jiff::Timestamp::now().as_second(),
                models: Some(
                    models
                        .iter()
                        .map(|(model, revision, state, reason)| proto::ModelReport {
                            model: (*model).into(),
                            revision: (*revision).into(),
                            state: *state,
                            message: reason.map(|r| {
                                format!("{r}: pii-redact: network: not allowed by the device owner")
                            }),
                            reason: reason.map(str::to_owned),
                            load_millis: None,
                            golden: Vec::new(),
                        })
                        .collect(),
                ),
                inference: None,
            }];
            self.client
                .report(&proto::ReportBatch {
                    reports,
                    dropped: 0,
                })
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        }

        /// The revision of `model` in the desired state the gateway serves it.
        async fn desired(&self, model: &str) -> Option<String> {
            let state = self
                .client
                .desired(None, Duration::from_secs(0))
                .await
                .ok()??;
            state
                .models
                .iter()
                .find(|m| m.model == model)
                .map(|m| m.revision.clone())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_refusal_excludes_only_that_device() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cp = ControlPlane::start().await.unwrap();
        cp.install_crds().await.unwrap();
        let client = cp.client().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pki = local_fleet::GatewayPki::write(d, &[]).unwrap();
        let port = free_port().unwrap();
        let _operator = Proc(
            local_fleet::spawn_operator_with(
                cp.kubeconfig_path(),
                &pki,
                &local_fleet::OperatorSpec {
                    gateway_addr: format!("127.0.0.1:{port}"),
                    artifact_dir: d.join("artifacts"),
                    approval: "auto".into(),
                    ek_cas: vec![],
                    ek_intermediates: vec![],
                    heartbeat_lease_seconds: 30,
                    artifact_ca: None,
                    log: d.join("operator.log"),
                },
                &[],
            )
            .unwrap(),
        );
        let gateway = format!("https://127.0.0.1:{port}");
        eventually("the gateway listens", Duration::from_secs(60), || async {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()
                .then_some(())
        })
        .await;
        let ca = std::fs::read(d.join("gw-ca.crt")).unwrap();
        let mut a = Device::enrol(&gateway, &ca, d, "till-a").await;
        let mut b = Device::enrol(&gateway, &ca, d, "till-b").await;
        a.report(&[]).await;
        b.report(&[]).await;

        let signer = Signer::generate().unwrap();
        let artifact = signer.artifact_of(b"GGUF model bytes").unwrap();
        let manifest = EdgeModelBuilder::new(NS, "smollm2")
            .signed(
                "https://artifacts.example/m.gguf",
                &artifact,
                "models-team",
                &signer,
            )
            .attestation(&["dev"], Some("dev"))
            .rollout(json!({"steps": [{"percent": 100}], "maxUnavailable": 2}))
            .build();
        allow_all_pools(&client).await.unwrap();
        trust_signers_of(&client, &manifest).await.unwrap();
        edgefleet_e2e::builders::apply_edge_model(&client, &manifest)
            .await
            .unwrap();
        let key = format!("{NS}/smollm2");
        let rev = eventually(
            "both devices told the revision",
            Duration::from_secs(60),
            || async {
                let (ra, rb) = (a.desired(&key).await?, b.desired(&key).await?);
                (ra == rb).then_some(ra)
            },
        )
        .await;

        // a loads it; b's owner did not allow a grant of its plugin: a local refusal.
        a.report(&[(&key, &rev, proto::ModelState::Ready, None)])
            .await;
        b.report(&[(
            &key,
            &rev,
            proto::ModelState::Failed,
            Some("PluginGrantDenied"),
        )])
        .await;
        let models: Api<EdgeModel> = Api::namespaced(client.clone(), NS);
        let status = eventually("Available without b", Duration::from_secs(60), || async {
            let st = models.get("smollm2").await.ok()?.status?;
            (st.phase == Some(ModelPhase::Available)).then_some(st)
        })
        .await;
        assert_eq!(status.devices.refused, 1, "{status:?}");
        assert_eq!(status.devices.failed, 0, "{status:?}");
        assert_eq!(status.stable_revision.as_deref(), Some(rev.as_str()));
        assert_eq!(status.refusals.len(), 1);
        assert_eq!(
            (
                status.refusals[0].device.as_str(),
                status.refusals[0].reason.as_str()
            ),
            ("till-b", "PluginGrantDenied")
        );
        let degraded = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .unwrap();
        assert_eq!(degraded.status, "False", "{degraded:?}");
        let notes = |reason: &'static str| {
            let client = client.clone();
            async move {
                Api::<k8s_openapi::api::events::v1::Event>::namespaced(client, NS)
                    .list(&Default::default())
                    .await
                    .unwrap()
                    .items
                    .into_iter()
                    .filter(|e| e.reason.as_deref() == Some(reason))
                    .filter_map(|e| e.note)
                    .collect::<Vec<_>>()
            }
        };
        let refused = eventually(
            "the DeviceRefused event",
            Duration::from_secs(30),
            || async {
                let n = notes("DeviceRefused").await;
                (!n.is_empty()).then_some(n)
            },
        )
        .await;
        assert!(
            refused[0].starts_with(&format!(
                "till-b refused revision {rev} (PluginGrantDenied)"
            )),
            "{refused:?}"
        );
        // Reported again, it is not announced again, and nothing failed fleet-wide:
        // judged by a reconcile that ran after the report (an annotation on the model
        // triggers one; the operator counts each).
        let pid = _operator.0.id();
        let reconciles = || {
            local_fleet::operator_counter(
                pid,
                "edgefleet_operator_reconciles_total{result=\"ok\"} ",
            )
            .unwrap_or(0.0)
        };
        b.report(&[(
            &key,
            &rev,
            proto::ModelState::Failed,
            Some("PluginGrantDenied"),
        )])
        .await;
        // Two nudges, each waited for: kube-rs runs one reconcile of an object at a
        // time, so the second one started after the report had landed.
        for nudge in ["1", "2"] {
            let before = reconciles();
            models
                .patch(
                    "smollm2",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(
                        json!({"metadata": {"annotations": {"test.edgefleet.io/nudge": nudge}}}),
                    ),
                )
                .await
                .unwrap();
            eventually(
                "a reconcile after the nudge",
                Duration::from_secs(30),
                || async { (reconciles() > before).then_some(()) },
            )
            .await;
        }
        assert_eq!(notes("DeviceRefused").await.len(), 1);
        assert!(notes("HealthGateFailed").await.is_empty());
        assert!(notes("RolledBack").await.is_empty());
        assert_eq!(a.desired(&key).await.as_deref(), Some(rev.as_str()));

        // The negative: any other failure of a device fails the health gate.
        let mut m = manifest.clone();
        m["spec"]["runtime"] = json!({"contextSize": 4096});
        edgefleet_e2e::builders::apply_edge_model(&client, &m)
            .await
            .unwrap();
        let rev2 = eventually(
            "a told the new revision",
            Duration::from_secs(60),
            || async { a.desired(&key).await.filter(|r| *r != rev) },
        )
        .await;
        a.report(&[(
            &key,
            &rev2,
            proto::ModelState::Failed,
            Some("DigestMismatch"),
        )])
        .await;
        eventually(
            "Degraded by a's failure",
            Duration::from_secs(60),
            || async {
                let st = models.get("smollm2").await.ok()?.status?;
                (st.phase == Some(ModelPhase::Degraded)).then_some(())
            },
        )
        .await;
        assert!(!notes("HealthGateFailed").await.is_empty());
    }
}
