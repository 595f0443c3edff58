//! The chart grants every API call the operator makes. The operator's controller, its
//! leader election and its heartbeat sweep run against the real API server through a
//! client that records each request; a rollout, a failed attestation, a lease, a sweep
//! and a deletion exercise them. Every recorded (group, resource, verb) must be allowed
//! by the ClusterRole or Role that `helm template` renders from `charts/edgefleet`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgefleet_e2e::builders::{
    DeviceStatusBuilder, EdgeDeviceBuilder, EdgeModelBuilder, Signer, allow_all_pools,
    trust_signers_of,
};
use edgefleet_e2e::wait::eventually;
use edgefleet_e2e::{ControlPlane, workspace_root};
use kube::client::{Body, ClientBuilder};
use serde_json::Value;

type Calls = Arc<Mutex<BTreeSet<(String, String, String)>>>;

/// How long the scenario waits for each thing the operator or the gateway does.
const PATIENCE: Duration = Duration::from_secs(30);

/// (group, resource[/subresource], verb) of a request, as RBAC sees it.
fn rbac_of(method: &http::Method, uri: &http::Uri) -> Option<(String, String, String)> {
    let parts: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest.to_vec()),
        ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest.to_vec()),
        _ => return None,
    };
    let rest = match rest.as_slice() {
        ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail.to_vec(),
        other => other.to_vec(),
    };
    let (resource, named) = match rest.as_slice() {
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => return None,
    };
    let watch = uri.query().is_some_and(|q| q.contains("watch=true"));
    let verb = match (method.as_str(), named, watch) {
        ("GET", _, true) => "watch",
        ("GET", true, false) => "get",
        ("GET", false, false) => "list",
        ("POST", _, _) => "create",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", true, _) => "delete",
        ("DELETE", false, _) => "deletecollection",
        _ => return None,
    };
    Some((group, resource, verb.to_owned()))
}

async fn recording_client(cp: &ControlPlane, calls: Calls) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(cp.kubeconfig_path()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let record = tower::util::MapRequestLayer::new(move |req: http::Request<Body>| {
        if let Some(call) = rbac_of(req.method(), req.uri()) {
            calls.lock().unwrap().insert(call);
        }
        req
    });
    ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&record)
        .build()
}

/// The (group, resource, verb) triples the chart's roles allow.
fn granted() -> BTreeSet<(String, String, String)> {
    let helm = std::env::var_os("HELM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| edgefleet_e2e::cache_dir().join("tools/helm"));
    let out = std::process::Command::new(&helm)
        .args(["template", "edgefleet"])
        .arg(workspace_root().join("charts/edgefleet"))
        .args(["--namespace", "edgefleet-system"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/test installs helm)", helm.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut allowed = BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_slice(&out.stdout) {
        let v = Value::deserialize(doc).unwrap();
        if !matches!(v["kind"].as_str(), Some("ClusterRole" | "Role")) {
            continue;
        }
        for rule in v["rules"].as_array().into_iter().flatten() {
            for g in rule["apiGroups"].as_array().into_iter().flatten() {
                for r in rule["resources"].as_array().into_iter().flatten() {
                    for verb in rule["verbs"].as_array().into_iter().flatten() {
                        allowed.insert((
                            g.as_str().unwrap().to_owned(),
                            r.as_str().unwrap().to_owned(),
                            verb.as_str().unwrap().to_owned(),
                        ));
                    }
                }
            }
        }
    }
    allowed
}

use serde::Deserialize as _;

#[tokio::test]
async fn the_chart_grants_every_call_the_operator_makes() {
    let allowed = granted();
    // The check can fail: the chart must not grant, say, deleting devices, nor writing
    // a device's spec (what a device runs is derived from the EdgeModel status).
    for verb in ["delete", "patch", "update"] {
        assert!(
            !allowed.contains(&("edgefleet.io".into(), "edgedevices".into(), verb.into())),
            "the chart grants {verb} on edgedevices"
        );
    }

    let cp = ControlPlane::start().await.expect("control plane starts");
    cp.install_crds().await.expect("CRDs install");
    let admin = cp.client().await.unwrap();
    let calls: Calls = Arc::default();
    let client = recording_client(&cp, calls.clone()).await;

    // Leader election, the heartbeat sweep and the controller, as `run` starts them.
    let election = edgefleet_operator::leader::LeaderElection::new(
        client.clone(),
        "edgefleet-system",
        "op-1".into(),
        Duration::from_secs(3),
    );
    election.acquire().await;
    election.step().await.unwrap();
    let heartbeats =
        edgefleet_operator::heartbeat::Heartbeats::new(client.clone(), Duration::from_secs(2));
    let operator = tokio::spawn(edgefleet_operator::edgemodel::run(client.clone()));

    // A device and a model, driven through assignment, a heartbeat and its expiry, then
    // deletion; written with the admin client, so only the operator's calls count.
    let devices: kube::Api<edgefleet_crds::EdgeDevice> = kube::Api::all(admin.clone());
    let device = EdgeDeviceBuilder::new("till-a", &format!("sha256:{}", "a".repeat(64)))
        .pool("retail")
        .build()
        .unwrap();
    devices.create(&Default::default(), &device).await.unwrap();
    let now = k8s_openapi::jiff::Timestamp::now();
    let later = now + k8s_openapi::jiff::SignedDuration::from_hours(1);
    let health =
        DeviceStatusBuilder::attestation(true, "tpm", &format!("sha256:{}", "b".repeat(64)), now)
            .build();
    devices
        .patch_status(
            "till-a",
            &kube::api::PatchParams::apply("test-gateway"),
            &kube::api::Patch::Apply(health),
        )
        .await
        .unwrap();
    let d = devices.get("till-a").await.unwrap();
    heartbeats.record(&d, now).await.unwrap();
    let models: kube::Api<edgefleet_crds::EdgeModel> =
        kube::Api::namespaced(admin.clone(), "retail");
    let signer = Signer::generate().unwrap();
    let artifact = signer.artifact_of(b"GGUF model bytes").unwrap();
    let manifest = EdgeModelBuilder::new("retail", "smollm2-135m-instruct")
        .served_name("smollm2")
        .artifact("https://artifacts.example/m.gguf", &artifact.digest, None)
        .inline_signature(&artifact.bundle)
        .signer("models-team", &signer.public_key)
        .pool("retail")
        .attestation(&["tpm"], None)
        .build();
    allow_all_pools(&admin).await.unwrap();
    trust_signers_of(&admin, &manifest).await.unwrap();
    models
        .patch(
            "smollm2-135m-instruct",
            &kube::api::PatchParams::apply("e2e"),
            &kube::api::Patch::Apply(manifest),
        )
        .await
        .unwrap();
    // The operator reconciles it: finalizer, rollout position, status, events.
    eventually(
        "the operator to assign till-a the model",
        PATIENCE,
        || async {
            edgefleet_e2e::builders::assigned_revision(
                &admin,
                "retail",
                "smollm2-135m-instruct",
                "till-a",
            )
            .await
        },
    )
    .await;
    heartbeats.expire(later).await.unwrap();
    models
        .delete("smollm2-135m-instruct", &Default::default())
        .await
        .unwrap();
    eventually(
        "the operator to release the deleted model",
        PATIENCE,
        || async {
            models
                .get_opt("smollm2-135m-instruct")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    operator.abort();

    // The gateway: a device enrols (creating its EdgeDevice) and reports over its
    // client certificate (status writes and the heartbeat), served from watch caches.
    let store = tempfile::tempdir().unwrap();
    let (fleet, caches) = edgefleet_operator::gateway::devices::Fleet::new(
        client.clone(),
        edgefleet_operator::gateway::devices::FleetConfig {
            artifact_dir: store.path().to_path_buf(),
            artifact_budget_bytes: 1 << 30,
            approval: edgefleet_operator::gateway::devices::Approval::Auto(Default::default()),
            heartbeat_lease: Duration::from_secs(30),
            bootstrap_token: Some("rbac-bootstrap-token-0123".into()),
            mirror: None,
            refresh_per_second: edgefleet_operator::heartbeat::DEFAULT_REFRESH_PER_SECOND,
            change_per_second: edgefleet_operator::heartbeat::DEFAULT_CHANGE_PER_SECOND,
            attestation_lease: std::time::Duration::from_secs(86_400),
        },
        Arc::default(),
    );
    let caches = tokio::spawn(caches);
    fleet.ready().await.unwrap();
    // It enrols with an EdgeBootstrapToken, which the gateway reads and counts.
    let token = edgefleet_e2e::local_fleet::create_pool_token(&admin, "rbac")
        .await
        .unwrap();
    let bearer = format!("Bearer {token}");
    let key = rcgen::KeyPair::generate().unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "edgefleet://device/till-b".try_into().unwrap(),
    )];
    let cert = params.self_signed(&key).unwrap();
    let router = fleet.clone().router().layer(axum::Extension(
        edgefleet_operator::gateway::devices::PeerCertificate(
            Some(Arc::new(cert.der().to_vec())),
            None,
        ),
    ));
    let call = |method: &str, path: &str, token: bool, body: serde_json::Value| {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        if token {
            req = req.header("authorization", bearer.as_str());
        }
        tower::ServiceExt::oneshot(
            router.clone(),
            req.body(axum::body::Body::from(body.to_string())).unwrap(),
        )
    };
    let enrolled = call(
        "POST",
        "/v1/enrol",
        true,
        serde_json::json!({
            "device": "till-b",
            "agentPublicKey": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &spki),
            "facts": {"arch": "x86_64", "cpuCores": 2, "memoryBytes": 1073741824u64,
                      "teeKinds": ["dev"], "agentVersion": "0.1.0"},
        }),
    )
    .await
    .unwrap();
    assert_eq!(enrolled.status(), 200);
    eventually("the enrolled till-b's EdgeDevice", PATIENCE, || async {
        fleet_has(&devices, "till-b").await.then_some(())
    })
    .await;
    // Its report is to be served from the watch cache, as the gateway serves devices.
    let cache = fleet.device_cache();
    eventually("till-b in the gateway's device cache", PATIENCE, || async {
        cache
            .get(&kube::runtime::reflector::ObjectRef::new("till-b"))
            .map(|_| ())
    })
    .await;
    let reported = call(
        "POST",
        "/v1/devices/till-b/report",
        false,
        serde_json::json!({"reports": [{"seq": 1, "boot": "b1", "time": 0, "models": []}]}),
    )
    .await
    .unwrap();
    assert_eq!(reported.status(), 200);
    // The gateway writes reports in the background.
    eventually("the gateway to write till-b's report", PATIENCE, || async {
        let d = devices.get("till-b").await.unwrap();
        d.status.and_then(|s| s.reports).map(|_| ())
    })
    .await;
    caches.abort();

    let calls = calls.lock().unwrap().clone();
    for expected in [
        ("edgefleet.io", "edgemodels", "watch"),
        ("edgefleet.io", "edgemodels", "patch"),
        ("edgefleet.io", "edgemodels/status", "patch"),
        ("edgefleet.io", "edgedevices", "list"),
        ("edgefleet.io", "edgedevices/status", "patch"),
        ("coordination.k8s.io", "leases", "create"),
        ("coordination.k8s.io", "leases", "update"),
        ("events.k8s.io", "events", "create"),
        ("edgefleet.io", "edgedevices", "create"),
        ("edgefleet.io", "edgedevices", "watch"),
        ("edgefleet.io", "edgebootstraptokens", "get"),
        ("edgefleet.io", "edgebootstraptokens/status", "update"),
    ] {
        let e = (
            expected.0.to_owned(),
            expected.1.to_owned(),
            expected.2.to_owned(),
        );
        assert!(
            calls.contains(&e),
            "the scenario did not exercise {e:?}: {calls:?}"
        );
    }
    let missing: Vec<_> = calls.difference(&allowed).collect();
    assert!(missing.is_empty(), "the chart does not grant: {missing:?}");
}

async fn fleet_has(devices: &kube::Api<edgefleet_crds::EdgeDevice>, name: &str) -> bool {
    devices.get_opt(name).await.unwrap().is_some()
}
