//! The EdgeModel reconciler against the real API server: devices are EdgeDevices whose
//! status this test writes the way the gateway does (readiness, attestation, per-model
//! state), and the operator's controller runs in-process. Real agents in fleet mode are
//! not part of these tests yet.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edgefleet_crds::{EdgeDevice, EdgeModel, ModelPhase};
use edgefleet_e2e::ControlPlane;
use edgefleet_e2e::builders::{
    DeviceStatusBuilder, EdgeDeviceBuilder, EdgeModelBuilder, Signer, allow_all_pools,
    apply_edge_model, trust_signers_of,
};
use edgefleet_e2e::wait::eventually;
use edgefleet_operator::edgemodel::Sources;
use edgefleet_operator::metrics::{Metrics, ReasonLabel, ResultLabel};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const NS: &str = "retail";
const KEY: &str = "retail/smollm2";
/// How long a test waits for what the operator does.
const PATIENCE: Duration = Duration::from_secs(30);

async fn control_plane() -> (ControlPlane, Client, InProcess) {
    let (cp, client) = cluster(&[]).await;
    let operator = InProcess::spawn(&client, None, Sources::default());
    (cp, client, operator)
}

/// A fresh control plane with the CRDs, a trust policy binding every device to every
/// namespace, and the approved, attested TPM devices named, and no operator yet.
async fn cluster(devices: &[&str]) -> (ControlPlane, Client) {
    let cp = ControlPlane::start().await.expect("control plane starts");
    cp.install_crds().await.expect("CRDs install");
    let client = cp.client().await.unwrap();
    allow_all_pools(&client).await.unwrap();
    for name in devices {
        create_device(&client, name, true, "tpm").await;
    }
    (cp, client)
}

/// The EdgeModel controller running in this process, and what it records.
struct InProcess {
    metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcess {
    fn spawn(
        client: &Client,
        bundles: Option<edgefleet_operator::bundles::BundleFetcher>,
        sources: Sources,
    ) -> Self {
        let metrics = Arc::<Metrics>::default();
        let task = tokio::spawn(edgefleet_operator::edgemodel::run_with(
            client.clone(),
            metrics.clone(),
            bundles,
            sources,
        ));
        Self { metrics, task }
    }

    /// Reconciles finished, whatever their result.
    fn finished(&self) -> u64 {
        ["ok", "error"]
            .into_iter()
            .map(|result| {
                self.metrics
                    .reconciles
                    .get_or_create(&ResultLabel {
                        result: result.into(),
                    })
                    .get()
            })
            .sum()
    }

    /// Reconciles that failed for `reason` (an `edgemodel::Error::reason`).
    fn failed(&self, reason: &str) -> u64 {
        self.metrics
            .failures
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .get()
    }

    /// Waits until a reconcile of the model that began after this call has finished, so
    /// that what the operator has not changed by then, it decided to leave. Reconciles
    /// of one object run one at a time, so of two that finish after this call the
    /// second began after it. Each is started by a [`nudge`], the second once the first
    /// has finished.
    async fn reconciled(&self, client: &Client) {
        let before = self.finished();
        for n in 1..=2 {
            nudge(client).await;
            eventually(
                &format!("{n} reconcile(s) to finish after the change"),
                PATIENCE,
                || async { (self.finished() >= before + n).then_some(()) },
            )
            .await;
        }
    }
}

/// A metadata-only change to the model (a new annotation value): a watch event, so a
/// reconcile, with nothing changed that the operator plans on.
async fn nudge(client: &Client) {
    static NUDGES: AtomicU64 = AtomicU64::new(0);
    let n = NUDGES.fetch_add(1, Ordering::Relaxed);
    let annotation =
        json!({"metadata": {"annotations": {"e2e.edgefleet.io/nudge": n.to_string()}}});
    Api::<EdgeModel>::namespaced(client.clone(), NS)
        .patch(
            "smollm2",
            &PatchParams::default(),
            &Patch::Merge(&annotation),
        )
        .await
        .unwrap();
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A one-file model signed by a fresh key.
struct SignedModel {
    digest: String,
    bundle: String,
    /// The signer's public key, PEM.
    public_key: String,
}

fn signed_model() -> SignedModel {
    let signer = Signer::generate().unwrap();
    let artifact = signer.artifact_of(b"GGUF model bytes").unwrap();
    SignedModel {
        digest: artifact.digest,
        bundle: artifact.bundle,
        public_key: signer.public_key,
    }
}

/// Applies a freshly signed model, as [`model_manifest`] with a context of 1024.
async fn apply_signed_model(client: &Client) -> SignedModel {
    let m = signed_model();
    apply_model(
        client,
        &model_manifest(&m.digest, &m.bundle, &m.public_key, 1024),
    )
    .await;
    m
}

fn model_manifest(digest: &str, bundle: &str, public_key: &str, context: i32) -> Value {
    model_builder(digest, public_key, context)
        .inline_signature(bundle)
        .build()
}

/// The model for the `retail` pool's TPM devices: one device first, then the rest, one
/// at a time. Its signature is the caller's to set.
fn model_builder(digest: &str, public_key: &str, context: i32) -> EdgeModelBuilder {
    EdgeModelBuilder::new(NS, "smollm2")
        .artifact("https://artifacts.example/smollm2.gguf", digest, Some(1024))
        .signer("models-team", public_key)
        .pool("retail")
        .attestation(&["tpm"], Some("default"))
        .rollout(json!({
            "steps": [{"count": 1}, {"percent": 100}],
            "maxUnavailable": 1,
            "healthGates": {"readyTimeoutSeconds": 300, "rollbackOnFailure": true},
        }))
        .runtime(json!({"contextSize": context}))
}

async fn create_device(client: &Client, name: &str, approved: bool, tee: &str) {
    let devices: Api<EdgeDevice> = Api::all(client.clone());
    let d = EdgeDeviceBuilder::new(name, &format!("sha256:{}", hex_sha256(name.as_bytes())))
        .pool("retail")
        .approved(approved)
        .tee(tee)
        .build()
        .unwrap();
    devices.create(&PostParams::default(), &d).await.unwrap();
    set_health(client, name, true, true, tee).await;
}

/// Writes readiness and attestation as the gateway would.
async fn set_health(client: &Client, name: &str, ready: bool, attested: bool, tee: &str) {
    let patch = DeviceStatusBuilder::attestation(
        attested,
        tee,
        &format!("sha256:{}", hex_sha256(b"policy")),
        k8s_openapi::jiff::Timestamp::now(),
    )
    .ready(ready)
    .build();
    apply_status(client, name, "test-gateway", &patch).await;
}

/// Writes the device's report of the model (as the agent would, through the gateway).
async fn report(client: &Client, name: &str, revision: Option<&str>, state: &str) {
    let models: Vec<Value> = revision
        .map(|r| json!({"model": KEY, "revision": r, "state": state}))
        .into_iter()
        .collect();
    let patch = json!({
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeDevice",
        "status": {"models": models},
    });
    apply_status(client, name, "test-agent-report", &patch).await;
}

/// Server-side applies `patch` to device `name`'s status as `manager`.
async fn apply_status(client: &Client, name: &str, manager: &str, patch: &Value) {
    Api::<EdgeDevice>::all(client.clone())
        .patch_status(
            name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(patch),
        )
        .await
        .unwrap();
}

/// The revision `name` derives of the model now (what the gateway would tell it).
async fn assignment(client: &Client, name: &str) -> Option<String> {
    edgefleet_e2e::builders::assigned_revision(client, NS, "smollm2", name).await
}

/// `names` in the order the rollout reaches them: by their rank for the model (a
/// hash of its UID and the device's name).
async fn in_rank_order(client: &Client, names: &[&str]) -> Vec<String> {
    let uid = model(client).await.metadata.uid.unwrap();
    let mut names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    names.sort_by_key(|n| edgefleet_crds::model::device_rank(&uid, n));
    names
}

async fn model(client: &Client) -> EdgeModel {
    let models: Api<EdgeModel> = Api::namespaced(client.clone(), NS);
    models.get("smollm2").await.unwrap()
}

/// Some when the model's status counts `want` (`ready/targeted`) ready devices.
async fn ready_devices_are(client: &Client, want: &str) -> Option<()> {
    (model(client).await.status?.ready_devices.as_deref() == Some(want)).then_some(())
}

fn condition(m: &EdgeModel, kind: &str) -> Option<(String, String, String)> {
    m.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Applies `manifest`, its signers trusted for the namespace first (as the cluster's
/// administrator would for a publisher they trust).
async fn apply_model(client: &Client, manifest: &Value) {
    trust_signers_of(client, manifest).await.unwrap();
    apply_edge_model(client, manifest).await.unwrap();
}

#[tokio::test]
async fn a_rollout_moves_step_by_step_and_reaches_all_candidates() {
    let (cp, client, _operator) = control_plane().await;
    for name in ["till-a", "till-b", "till-c"] {
        create_device(&client, name, true, "tpm").await;
    }
    create_device(&client, "till-unapproved", false, "tpm").await;
    create_device(&client, "till-dev-key", true, "dev").await;
    apply_signed_model(&client).await;
    let order = in_rank_order(&client, &["till-a", "till-b", "till-c"]).await;
    let (first, second, third) = (&order[0], &order[1], &order[2]);

    // Step 1: one device (the first by rank) gets the revision.
    let rev = eventually("step 1 assignment", PATIENCE, || async {
        assignment(&client, first).await
    })
    .await;
    let m = model(&client).await;
    let status = m.status.clone().unwrap();
    assert_eq!(status.current_revision.as_deref(), Some(rev.as_str()));
    assert_eq!(status.phase, Some(ModelPhase::Progressing));
    assert_eq!(status.devices.targeted, 4, "{status:?}"); // the dev-key device is approved but not attested as accepted
    assert_eq!(status.devices.attested, 3, "{status:?}");
    assert_eq!(condition(&m, "SignatureVerified").unwrap().0, "True");
    assert_eq!(assignment(&client, second).await, None);
    assert_eq!(assignment(&client, "till-unapproved").await, None);
    assert_eq!(assignment(&client, "till-dev-key").await, None);
    assert!(m.finalizers().iter().any(|f| f == "edgefleet.io/unassign"));

    // The device loads it: step 2 starts, one device at a time (maxUnavailable 1).
    report(&client, first, Some(&rev), "Ready").await;
    eventually("the second device assigned", PATIENCE, || async {
        (assignment(&client, second).await.as_deref() == Some(rev.as_str())).then_some(())
    })
    .await;
    assert_eq!(assignment(&client, third).await, None, "maxUnavailable 1");
    report(&client, second, Some(&rev), "Ready").await;
    eventually("the third device assigned", PATIENCE, || async {
        assignment(&client, third).await.filter(|r| *r == rev)
    })
    .await;
    report(&client, third, Some(&rev), "Ready").await;
    let m = eventually("Available", PATIENCE, || async {
        let m = model(&client).await;
        (m.status.as_ref()?.phase == Some(ModelPhase::Available)).then_some(m)
    })
    .await;
    let status = m.status.clone().unwrap();
    assert_eq!(status.ready_devices.as_deref(), Some("3/4"));
    assert_eq!(status.stable_revision.as_deref(), Some(rev.as_str()));
    assert_eq!(status.observed_generation, m.metadata.generation);
    let out = cp
        .kubectl()
        .args(["get", "em", "-n", NS, "--no-headers"])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(line.contains("3/4") && line.contains("Available"), "{line}");

    // Revocation: a device whose attestation fails loses the model.
    set_health(&client, second, true, false, "tpm").await;
    eventually("the second device unassigned", PATIENCE, || async {
        assignment(&client, second).await.is_none().then_some(())
    })
    .await;
    assert_eq!(
        assignment(&client, first).await.as_deref(),
        Some(rev.as_str())
    );
}

/// A signed model rolled out: what signed it, and the revision the devices run.
struct RolledOut {
    model: SignedModel,
    rev: String,
}

/// Applies a freshly signed model and brings it to `Available` on `devices`, each
/// reporting the revision Ready once it is assigned (in rank order, as the rollout
/// moves them).
async fn roll_out(client: &Client, devices: &[&str]) -> RolledOut {
    let signed = apply_signed_model(client).await;
    let mut rev = String::new();
    for device in &in_rank_order(client, devices).await {
        rev = eventually("assigned", PATIENCE, || async {
            assignment(client, device).await
        })
        .await;
        report(client, device, Some(&rev), "Ready").await;
    }
    eventually("Available", PATIENCE, || async {
        (model(client).await.status?.phase == Some(ModelPhase::Available)).then_some(())
    })
    .await;
    RolledOut { model: signed, rev }
}

#[tokio::test]
async fn a_bad_signature_halts_and_devices_keep_the_old_revision() {
    let (_cp, client, operator) = control_plane().await;
    create_device(&client, "till-a", true, "tpm").await;
    let RolledOut { model: signed, rev } = roll_out(&client, &["till-a"]).await;

    // A new artifact whose digest the bundle does not sign.
    let tampered = format!("sha256:{}", hex_sha256(b"other bytes"));
    apply_model(
        &client,
        &model_manifest(&tampered, &signed.bundle, &signed.public_key, 1024),
    )
    .await;
    let (status, reason, message) = eventually("SignatureInvalid", PATIENCE, || async {
        condition(&model(&client).await, "SignatureVerified").filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "SignatureInvalid")
    );
    assert!(message.contains("DigestMismatch"), "{message}");
    let m = model(&client).await;
    assert_eq!(m.status.as_ref().unwrap().phase, Some(ModelPhase::Failed));
    operator.reconciled(&client).await;
    assert_eq!(
        assignment(&client, "till-a").await.as_deref(),
        Some(rev.as_str())
    );

    // Signed by someone else: also refused, naming the reason.
    let foreign_bundle = signed_model().bundle;
    apply_model(
        &client,
        &model_manifest(&signed.digest, &foreign_bundle, &signed.public_key, 2048),
    )
    .await;
    let (_, reason, message) = eventually("UntrustedSigner", PATIENCE, || async {
        condition(&model(&client).await, "SignatureVerified")
            .filter(|c| c.0 == "False" && c.2.contains("UntrustedSigner"))
    })
    .await;
    assert_eq!(reason, "SignatureInvalid", "{message}");
    operator.reconciled(&client).await;
    assert_eq!(
        assignment(&client, "till-a").await.as_deref(),
        Some(rev.as_str())
    );
}

/// The operator binary, built beside this test (operator/tests gives cargo a reason to
/// build it).
fn operator_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join("edgefleet-operator");
    assert!(bin.exists(), "{} not built", bin.display());
    bin
}

struct Operator(std::process::Child, u16);

impl Operator {
    fn start(cp: &ControlPlane) -> Self {
        Self::named(cp, "op-1")
    }

    fn named(cp: &ControlPlane, identity: &str) -> Self {
        let port = edgefleet_e2e::free_port().unwrap();
        Self(
            std::process::Command::new(operator_binary())
                .args(["run", "--lease-seconds", &LEASE.as_secs().to_string()])
                .args(["--identity", identity])
                .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
                .env("KUBECONFIG", cp.kubeconfig_path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
            port,
        )
    }

    /// GET `path` on the operator's metrics port: (status, body).
    fn get(&self, path: &str) -> (String, String) {
        let out = std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:{}{path}", self.1))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.to_owned(), body.to_owned())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_killed_operator_resumes_the_rollout_where_it_stopped() {
    let (cp, client) = cluster(&["till-a", "till-b", "till-c"]).await;
    apply_signed_model(&client).await;
    let order = in_rank_order(&client, &["till-a", "till-b", "till-c"]).await;
    let (a, b, c) = (&order[0], &order[1], &order[2]);

    let first = Operator::start(&cp);
    let rev = eventually("step 1", PATIENCE, || async {
        assignment(&client, a).await
    })
    .await;
    drop(first); // killed mid-rollout
    report(&client, a, Some(&rev), "Ready").await;
    // Nothing to wait for: the operator is killed and reaped (its Drop waits for it),
    // so nothing is left that could move the rollout on.
    assert_eq!(assignment(&client, b).await, None, "no operator is running");

    let _second = Operator::start(&cp);
    eventually("step 2 resumes", PATIENCE, || async {
        assignment(&client, b).await.filter(|r| *r == rev)
    })
    .await;
    // Nothing regressed: the canary keeps its revision, the step index only grew.
    assert_eq!(assignment(&client, a).await.as_deref(), Some(rev.as_str()));
    let status = model(&client).await.status.unwrap();
    assert_eq!(status.current_revision.as_deref(), Some(rev.as_str()));
    assert_eq!(status.current_step, Some(1));
    report(&client, b, Some(&rev), "Ready").await;
    eventually("the third device", PATIENCE, || async {
        assignment(&client, c).await
    })
    .await;
    report(&client, c, Some(&rev), "Ready").await;
    eventually("Available", PATIENCE, || ready_devices_are(&client, "3/3")).await;
}

/// The operator's Lease, as `--lease-seconds 3` makes it.
const LEASE: Duration = Duration::from_secs(3);

async fn lease(client: &Client) -> Option<k8s_openapi::api::coordination::v1::LeaseSpec> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "edgefleet-system");
    leases.get_opt("edgefleet-operator").await.unwrap()?.spec
}

async fn lease_holder(client: &Client) -> Option<(String, i32)> {
    let spec = lease(client).await?;
    Some((spec.holder_identity?, spec.lease_transitions.unwrap_or(0)))
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_the_other_takes_over() {
    let (cp, client) = cluster(&["till-a", "till-b"]).await;
    let first = Operator::named(&cp, "op-1");
    eventually("op-1 leads", PATIENCE, || async {
        lease_holder(&client).await.filter(|(h, _)| h == "op-1")
    })
    .await;
    let second = Operator::named(&cp, "op-2");
    apply_signed_model(&client).await;
    let order = in_rank_order(&client, &["till-a", "till-b"]).await;
    let (a, b) = (&order[0], &order[1]);
    let rev = eventually("step 1", PATIENCE, || async {
        assignment(&client, a).await
    })
    .await;
    // From when op-2 stands by, until op-1 renews the Lease a whole Lease duration later,
    // op-2 has been a candidate for longer than the Lease lasts: had it been able to
    // take a renewed Lease, it would hold it by then.
    eventually("op-2 standing by", PATIENCE, || async {
        (second.get("/readyz").1 == "standby").then_some(())
    })
    .await;
    let standing_by = k8s_openapi::jiff::Timestamp::now();
    let lease_duration = k8s_openapi::jiff::SignedDuration::try_from(LEASE).unwrap();
    eventually(
        "a renewal of the Lease a Lease duration after op-2 stood by, or a new holder",
        PATIENCE,
        || async {
            let spec = lease(&client).await?;
            let renewed = spec.renew_time?.0;
            (spec.holder_identity.as_deref() != Some("op-1")
                || renewed > standing_by + lease_duration)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        lease_holder(&client).await.map(|(h, _)| h).as_deref(),
        Some("op-1"),
        "the follower must not take a renewed lease"
    );
    // The leader is ready and reports its reconciles; the candidate stands by.
    assert_eq!(first.get("/readyz"), ("200".into(), "leading".into()));
    assert_eq!(second.get("/readyz"), ("200".into(), "standby".into()));
    let (code, body) = first.get("/metrics");
    assert_eq!(code, "200");
    assert!(
        body.contains("edgefleet_operator_reconciles_total{result=\"ok\"}"),
        "{body}"
    );
    assert!(
        body.contains(
            "edgefleet_operator_rollout_devices{model=\"retail/smollm2\",count=\"updated\"} 1"
        ),
        "{body}"
    );

    drop(first); // the leader dies
    report(&client, a, Some(&rev), "Ready").await;
    let (_, transitions) = eventually("op-2 takes over", PATIENCE, || async {
        lease_holder(&client).await.filter(|(h, _)| h == "op-2")
    })
    .await;
    assert!(transitions >= 1, "{transitions}");
    eventually("op-2 leads", PATIENCE, || async {
        (second.get("/readyz").1 == "leading").then_some(())
    })
    .await;
    eventually("the new leader continues the rollout", PATIENCE, || async {
        assignment(&client, b).await.filter(|r| *r == rev)
    })
    .await;
}

#[tokio::test]
async fn a_silent_device_goes_not_ready_but_keeps_serving_what_it_has() {
    use edgefleet_operator::heartbeat::{Heartbeats, expired};
    let (_cp, client, _operator) = control_plane().await;
    create_device(&client, "till-a", true, "tpm").await;
    let rev = roll_out(&client, &["till-a"]).await.rev;
    eventually("1/1", PATIENCE, || ready_devices_are(&client, "1/1")).await;

    let devices: Api<EdgeDevice> = Api::all(client.clone());
    let lease = Duration::from_secs(2);
    let hb = Heartbeats::new(client.clone(), lease);
    // Whole seconds: metav1.Time (lastHeartbeatTime) keeps no fractions.
    let now =
        k8s_openapi::jiff::Timestamp::from_second(k8s_openapi::jiff::Timestamp::now().as_second())
            .unwrap();
    assert!(
        hb.record(&devices.get("till-a").await.unwrap(), now)
            .await
            .unwrap()
    );
    // Heartbeats within a third of the lease are coalesced: no write.
    let d = devices.get("till-a").await.unwrap();
    let version = d.resource_version();
    // (Timestamps are given, not read: the test must not depend on how fast it runs.)
    for ms in (50..=600).step_by(50) {
        let at = now + k8s_openapi::jiff::SignedDuration::from_millis(ms);
        assert!(!hb.record(&d, at).await.unwrap(), "{ms} ms");
    }
    assert_eq!(
        devices.get("till-a").await.unwrap().resource_version(),
        version
    );
    assert!(
        hb.expire(now).await.unwrap().is_empty(),
        "the lease has not run out"
    );

    // Silence past the lease: NotReady, but the model stays assigned.
    let later = now + k8s_openapi::jiff::SignedDuration::from_secs(3);
    assert!(expired(&devices.get("till-a").await.unwrap(), later, lease));
    assert_eq!(hb.expire(later).await.unwrap(), vec!["till-a".to_owned()]);
    let d = devices.get("till-a").await.unwrap();
    let ready = d
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "HeartbeatExpired")
    );
    eventually("0/1", PATIENCE, || ready_devices_are(&client, "0/1")).await;
    assert_eq!(
        assignment(&client, "till-a").await.as_deref(),
        Some(rev.as_str())
    );

    // Back: one heartbeat makes it Ready again, and the count recovers.
    assert!(hb.record(&d, later).await.unwrap());
    eventually("1/1 again", PATIENCE, || ready_devices_are(&client, "1/1")).await;
    assert_eq!(
        assignment(&client, "till-a").await.as_deref(),
        Some(rev.as_str())
    );
}

#[tokio::test]
async fn liveness_comes_from_memory_and_refreshes_wait_for_the_budget() {
    use edgefleet_operator::heartbeat::Heartbeats;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    let (_cp, client, _operator) = control_plane().await;
    create_device(&client, "till-b", true, "tpm").await;
    set_health(&client, "till-b", false, true, "tpm").await;
    let devices: Api<EdgeDevice> = Api::all(client.clone());
    let lease = Duration::from_secs(3);
    let secs = SignedDuration::from_secs;
    let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap();
    // No budget at all: a device that is not Ready is still written at once.
    let starved = Heartbeats::new(client.clone(), lease).with_refresh_rate(0.0);
    assert!(
        starved
            .record(&devices.get("till-b").await.unwrap(), now)
            .await
            .unwrap()
    );
    let d = devices.get("till-b").await.unwrap();
    let version = d.resource_version();
    // A refresh is due after a third of the lease, but there is no token: no write...
    assert!(!starved.record(&d, now + secs(2)).await.unwrap());
    assert_eq!(
        devices.get("till-b").await.unwrap().resource_version(),
        version
    );
    // ...and the device stays Ready by memory past the recorded heartbeat's lease.
    assert!(starved.expire(now + secs(4)).await.unwrap().is_empty());
    // Silent for a lease after the remembered heartbeat: expired, and the status says
    // when it was last heard from.
    assert_eq!(
        starved.expire(now + secs(6)).await.unwrap(),
        vec!["till-b".to_owned()]
    );
    let d = devices.get("till-b").await.unwrap();
    let status = d.status.as_ref().unwrap();
    assert_eq!(
        status.last_heartbeat_time.as_ref().map(|t| t.0),
        Some(now + secs(2))
    );
    // Back, then a refresh: with a budget it writes, without one it waits.
    assert!(starved.record(&d, now + secs(7)).await.unwrap());
    let d = devices.get("till-b").await.unwrap();
    assert!(!starved.record(&d, now + secs(9)).await.unwrap());
    let budgeted = Heartbeats::new(client.clone(), lease);
    assert!(budgeted.record(&d, now + secs(9)).await.unwrap());
}

/// A report as the gateway notes it in memory.
fn reported(revision: &str, state: &str) -> Vec<edgefleet_crds::device::LoadedModel> {
    serde_json::from_value(json!([{"model": KEY, "revision": revision, "state": state}])).unwrap()
}

#[tokio::test]
async fn the_rollout_plans_on_reported_states_before_any_status_write() {
    use edgefleet_operator::reported::Reported;
    let (_cp, client) = cluster(&["till-a", "till-b"]).await;
    let memory = Reported::default();
    let operator = InProcess::spawn(
        &client,
        None,
        Sources {
            reported: Some(memory.clone()),
            devices: None,
            replicas: None,
        },
    );
    apply_signed_model(&client).await;
    let order = in_rank_order(&client, &["till-a", "till-b"]).await;
    let (a, b) = (order[0].as_str(), order[1].as_str());
    let rev = eventually("the first device assigned", PATIENCE, || async {
        assignment(&client, a).await
    })
    .await;
    // Step 1 is one device: the second waits until the first is Ready on the revision.
    // A report of another revision is not that.
    memory.note(a, &reported("0000000000000000", "Ready"));
    operator.reconciled(&client).await;
    assert_eq!(assignment(&client, b).await, None);
    assert_eq!(
        model(&client)
            .await
            .status
            .unwrap()
            .ready_devices
            .as_deref(),
        Some("0/2")
    );
    // Ready on the revision, in memory only: the rollout moves on, and reaches all,
    // while neither device's recorded status says anything of the model.
    memory.note(a, &reported(&rev, "Ready"));
    eventually("the second device assigned", PATIENCE, || async {
        assignment(&client, b).await
    })
    .await;
    memory.note(b, &reported(&rev, "Ready"));
    eventually("Available from memory", PATIENCE, || async {
        let status = model(&client).await.status?;
        (status.phase == Some(ModelPhase::Available)
            && status.ready_devices.as_deref() == Some("2/2"))
        .then_some(())
    })
    .await;
    let devices: Api<EdgeDevice> = Api::all(client.clone());
    for name in ["till-a", "till-b"] {
        let recorded = devices.get(name).await.unwrap().status.unwrap().models;
        assert!(recorded.is_empty(), "{name}: {recorded:?}");
    }

    // A replica without that memory (a new leader) plans on the recorded status: no
    // device is Ready there, until a status write says so.
    operator.task.abort();
    let _successor = InProcess::spawn(
        &client,
        None,
        Sources {
            reported: Some(Reported::default()),
            devices: None,
            replicas: None,
        },
    );
    eventually("0/2 from the recorded status", PATIENCE, || {
        ready_devices_are(&client, "0/2")
    })
    .await;
    report(&client, a, Some(&rev), "Ready").await;
    eventually(
        "1/2 once the first device's status is written",
        PATIENCE,
        || ready_devices_are(&client, "1/2"),
    )
    .await;
}

#[tokio::test]
async fn an_https_artifact_enters_the_store_only_with_its_digest() {
    use edgefleet_operator::gateway::mirror::{Mirror, MirrorState};
    let good = "GGUF model bytes ".repeat(4096);
    let hex = hex_sha256(good.as_bytes());
    let (url, ca) = edgefleet_e2e::local_fleet::https_files(vec![
        ("/good.gguf", good.clone()),
        ("/tampered.gguf", good.replacen("model", "modal", 1)),
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mirror = Mirror::new(dir.path(), ca.as_bytes()).unwrap();
    let leftovers = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    let size = Some(good.len() as u64);
    // Served bytes that are not the named digest, a wrong size, a plain-HTTP URI: refused,
    // and nothing is left in the store.
    let err = mirror
        .fetch(&hex, &format!("{url}/tampered.gguf"), size)
        .await
        .unwrap_err();
    assert!(err.contains("digest mismatch"), "{err}");
    let err = mirror
        .fetch(&hex, &format!("{url}/good.gguf"), Some(10))
        .await
        .unwrap_err();
    assert!(err.contains("larger than the 10 bytes"), "{err}");
    let err = mirror
        .fetch(&hex, &url.replace("https://", "http://"), size)
        .await
        .unwrap_err();
    assert!(err.contains("only https://"), "{err}");
    // A server the roots do not vouch for.
    let (_, other_ca) =
        edgefleet_e2e::local_fleet::https_files(Vec::<(&str, Vec<u8>)>::new()).unwrap();
    let stranger = Mirror::new(dir.path(), other_ca.as_bytes()).unwrap();
    assert!(
        stranger
            .fetch(&hex, &format!("{url}/good.gguf"), size)
            .await
            .is_err()
    );
    assert!(leftovers().is_empty(), "{:?}", leftovers());
    // In the background: fetching, then a named failure that is kept for a while.
    assert_eq!(
        mirror.ensure(&hex, &format!("{url}/tampered.gguf"), size),
        MirrorState::Fetching
    );
    let failed = eventually("the background fetch to fail", PATIENCE, || async {
        match mirror.ensure(&hex, &format!("{url}/tampered.gguf"), size) {
            MirrorState::Fetching => None,
            MirrorState::Failed(why) => Some(why),
        }
    })
    .await;
    assert!(failed.contains("digest mismatch"), "{failed}");
    // The genuine file: into the store under its digest, nothing else.
    assert_eq!(
        mirror.fetch(&hex, &format!("{url}/good.gguf"), size).await,
        Ok(good.len() as u64)
    );
    assert_eq!(
        std::fs::read(dir.path().join(&hex)).unwrap(),
        good.as_bytes()
    );
    assert_eq!(leftovers(), vec![hex.clone()]);
}

#[tokio::test]
async fn a_bundle_given_by_uri_is_fetched_over_https_and_verified() {
    let (_cp, client) = cluster(&["till-a"]).await;
    let SignedModel {
        digest,
        bundle,
        public_key,
    } = signed_model();
    let foreign = signed_model().bundle;
    let (base, ca_pem) = edgefleet_e2e::local_fleet::https_files(vec![
        ("/good.sig", bundle),
        ("/foreign.sig", foreign),
    ])
    .unwrap();
    let fetcher = edgefleet_operator::bundles::BundleFetcher::new(ca_pem.as_bytes()).unwrap();
    let operator = InProcess::spawn(&client, Some(fetcher), Sources::default());
    let by_uri = |uri: String| {
        model_builder(&digest, &public_key, 1024)
            .signature_uri(&uri)
            .build()
    };

    // Not there: nothing is assigned, and the condition says why.
    apply_model(&client, &by_uri(format!("{base}/missing.sig"))).await;
    let (_, reason, message) = eventually("SignatureNotFetched", PATIENCE, || async {
        condition(&model(&client).await, "SignatureVerified").filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(reason, "SignatureNotFetched", "{message}");
    assert!(message.contains("404"), "{message}");
    operator.reconciled(&client).await;
    assert_eq!(assignment(&client, "till-a").await, None);

    // Signed by someone else: fetched, and refused by name.
    apply_model(&client, &by_uri(format!("{base}/foreign.sig"))).await;
    eventually("UntrustedSigner", PATIENCE, || async {
        condition(&model(&client).await, "SignatureVerified")
            .filter(|c| c.1 == "SignatureInvalid" && c.2.contains("UntrustedSigner"))
    })
    .await;
    operator.reconciled(&client).await;
    assert_eq!(assignment(&client, "till-a").await, None);

    // The right bundle: verified, and the device gets the model.
    apply_model(&client, &by_uri(format!("{base}/good.sig"))).await;
    eventually("assigned", PATIENCE, || async {
        assignment(&client, "till-a").await
    })
    .await;
    let (status, reason, _) = condition(&model(&client).await, "SignatureVerified").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "SignatureValid")
    );
}

#[tokio::test]
async fn a_failed_gate_rolls_back_and_deletion_unassigns_first() {
    let (_cp, client, operator) = control_plane().await;
    for name in ["till-a", "till-b"] {
        create_device(&client, name, true, "tpm").await;
    }
    let RolledOut {
        model: signed,
        rev: stable,
    } = roll_out(&client, &["till-a", "till-b"]).await;
    // The canary is the first device by rank (the model's UID stays across spec
    // changes, so ranks do too).
    let order = in_rank_order(&client, &["till-a", "till-b"]).await;
    let (a, b) = (order[0].as_str(), order[1].as_str());

    // A new revision (another context size); the canary fails to load it.
    apply_model(
        &client,
        &model_manifest(&signed.digest, &signed.bundle, &signed.public_key, 2048),
    )
    .await;
    let next = eventually("canary on the new revision", PATIENCE, || async {
        assignment(&client, a).await.filter(|r| *r != stable)
    })
    .await;
    assert_eq!(
        assignment(&client, b).await.as_deref(),
        Some(stable.as_str())
    );
    report(&client, a, Some(&next), "Failed").await;
    eventually("rolled back", PATIENCE, || async {
        (assignment(&client, a).await.as_deref() == Some(stable.as_str())).then_some(())
    })
    .await;
    let m = model(&client).await;
    let (degraded, reason, message) = condition(&m, "Degraded").unwrap();
    assert_eq!(
        (degraded.as_str(), reason.as_str()),
        ("True", "HealthGateFailed")
    );
    assert!(message.contains(a), "{message}");
    assert_eq!(m.status.as_ref().unwrap().phase, Some(ModelPhase::Degraded));
    assert_eq!(
        m.status.as_ref().unwrap().failed_revision.as_deref(),
        Some(next.as_str())
    );
    report(&client, a, Some(&stable), "Ready").await;

    // Deletion: assignments go first; the finalizer waits for the devices' reports.
    let models: Api<EdgeModel> = Api::namespaced(client.clone(), NS);
    let still_loaded = operator.failed("StillLoaded");
    models
        .delete("smollm2", &DeleteParams::default())
        .await
        .unwrap();
    eventually("unassigned everywhere", PATIENCE, || async {
        (assignment(&client, a).await.is_none() && assignment(&client, b).await.is_none())
            .then_some(())
    })
    .await;
    // The cleanup that unassigned them finds the devices still reporting the model,
    // and fails for that: the finalizer stays.
    eventually("a cleanup to wait for the devices", PATIENCE, || async {
        (operator.failed("StillLoaded") > still_loaded).then_some(())
    })
    .await;
    assert!(
        models.get_opt("smollm2").await.unwrap().is_some(),
        "released before the devices unloaded"
    );
    report(&client, a, None, "Ready").await;
    report(&client, b, None, "Ready").await;
    eventually("finalizer released", PATIENCE, || async {
        models
            .get_opt("smollm2")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}
