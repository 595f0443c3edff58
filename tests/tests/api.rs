//! The edgefleet API served by a real Kubernetes API server (etcd 3.5 +
//! apiextensions-apiserver 1.36): what users apply is accepted, what is invalid is
//! rejected with a readable reason, and clients see what the operator will rely on.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::io::Write as _;
use std::process::{Output, Stdio};
use std::time::Duration;

use edgefleet_crds::{EdgeDevice, EdgeModel, ModelPhase};
use edgefleet_e2e::{ControlPlane, workspace_root};
use futures::StreamExt as _;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use rstest::rstest;
use serde_json::{Value, json};

async fn control_plane() -> ControlPlane {
    let cp = ControlPlane::start().await.expect("control plane starts");
    let names = cp.install_crds().await.expect("CRDs install");
    assert!(
        names.contains(&"edgemodels.edgefleet.io".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"edgedevices.edgefleet.io".to_owned()),
        "{names:?}"
    );
    cp
}

fn example(name: &str) -> Value {
    let text = std::fs::read_to_string(workspace_root().join("examples").join(name)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn model_example() -> Value {
    example("edgemodel-smollm2.yaml")
}

/// `kubectl apply --server-side` of one object, read from stdin.
fn apply(cp: &ControlPlane, obj: &Value) -> Output {
    let mut child = cp
        .kubectl()
        .args(["apply", "--server-side", "--field-manager=e2e", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(obj.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> Output {
    cp.kubectl().args(args).output().expect("kubectl runs")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn a_plugin() -> Value {
    json!({
        "name": "pii-redact",
        "artifact": {
            "uri": "https://artifacts.edgefleet.example/plugins/pii-redact.wasm",
            "digest": format!("sha256:{}", "ab".repeat(32)),
        },
        "signature": {"uri": "https://artifacts.edgefleet.example/plugins/pii-redact.sig"},
        "limits": {"fuel": 1_000_000_000i64, "memoryBytes": 67_108_864i64},
    })
}

#[tokio::test]
async fn every_example_is_accepted_by_server_side_apply() {
    let cp = control_plane().await;
    let mut seen = 0;
    for entry in std::fs::read_dir(workspace_root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let out = kubectl(
            &cp,
            &["apply", "--server-side", "-f", path.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "{} rejected: {}",
            path.display(),
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).contains("serverside-applied"),
            "{}",
            text(&out.stdout)
        );
        seen += 1;
    }
    assert!(
        seen >= 2,
        "expected at least the EdgeModel and EdgeDevice examples, saw {seen}"
    );

    let models: Api<EdgeModel> = Api::namespaced(cp.client().await.unwrap(), "retail");
    let model = models.get("smollm2-135m-instruct").await.unwrap();
    assert_eq!(model.spec.runtime.parallel_slots, 2);
    let devices: Api<EdgeDevice> = Api::all(cp.client().await.unwrap());
    assert!(devices.get("store-042-till-1").await.unwrap().spec.approved);
}

#[tokio::test]
async fn the_server_fills_in_schema_defaults() {
    let cp = control_plane().await;
    let mut m = model_example();
    let spec = m["spec"].as_object_mut().unwrap();
    spec.remove("runtime");
    spec.remove("port");
    spec.remove("attestation");
    m["spec"]["rollout"]
        .as_object_mut()
        .unwrap()
        .remove("healthGates");
    let out = apply(&cp, &m);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let models: Api<EdgeModel> = Api::namespaced(cp.client().await.unwrap(), "retail");
    let raw: Value =
        serde_json::to_value(models.get("smollm2-135m-instruct").await.unwrap()).unwrap();
    assert_eq!(raw["spec"]["runtime"]["contextSize"], json!(2048));
    assert_eq!(raw["spec"]["runtime"]["parallelSlots"], json!(1));
    assert_eq!(raw["spec"]["port"], json!(8080));
    assert_eq!(raw["spec"]["attestation"]["policy"], json!("default"));
    assert_eq!(
        raw["spec"]["attestation"]["teeKinds"],
        json!(["tpm", "sev-snp", "tdx"])
    );
    assert_eq!(
        raw["spec"]["rollout"]["healthGates"]["readyTimeoutSeconds"],
        json!(600)
    );
    assert_eq!(
        raw["spec"]["rollout"]["healthGates"]["rollbackOnFailure"],
        json!(true)
    );
}

/// Each mutation of the valid example must be refused, naming the reason.
#[rstest]
#[case::digest_not_sha256("bad digest", |m: &mut Value| m["spec"]["artifact"]["digest"] = json!("sha256:ABC"),
    "digest must have the form sha256:<64 lowercase hex digits>")]
#[case::uri_scheme("ftp uri", |m: &mut Value| m["spec"]["artifact"]["uri"] = json!("ftp://host/model.gguf"),
    "uri must start with https://, http://, file:/// or oci://")]
#[case::no_signers("no signers", |m: &mut Value| m["spec"]["signers"] = json!([]),
    "spec.signers must name at least one trusted signer")]
#[case::signer_key_and_root("key and root", |m: &mut Value| m["spec"]["signers"][0]["certificateRoot"] = json!("-----BEGIN CERTIFICATE-----"),
    "a signer has at most one of publicKey and certificateRoot")]
#[case::bare_signer_with_identities("a name with identities", |m: &mut Value| m["spec"]["signers"] = json!([{"name": "ci", "identities": ["ci@example.com"]}]),
    "identities apply only to certificateRoot signers")]
#[case::root_without_identity("root, no identity", |m: &mut Value| m["spec"]["signers"] = json!([{"name": "ca", "certificateRoot": "-----BEGIN CERTIFICATE-----"}]),
    "a certificateRoot signer must pin at least one identity")]
#[case::signature_inline_and_uri("inline and uri", |m: &mut Value| m["spec"]["signature"]["inline"] = json!("{}"),
    "exactly one of signature.inline and signature.uri must be set")]
#[case::percent_over_100("percent 150", |m: &mut Value| m["spec"]["rollout"]["steps"][1]["percent"] = json!(150),
    "percent must be between 1 and 100")]
#[case::step_count_and_percent("count and percent", |m: &mut Value| m["spec"]["rollout"]["steps"][0]["percent"] = json!(10),
    "a rollout step sets exactly one of count and percent")]
#[case::max_unavailable_percent("maxUnavailable 150%", |m: &mut Value| m["spec"]["rollout"]["maxUnavailable"] = json!("150%"),
    "maxUnavailable must be a non-negative count or a percentage from 0% to 100%")]
#[case::plugin_memory_zero("plugin memory 0", |m: &mut Value| { let mut p = a_plugin(); p["limits"]["memoryBytes"] = json!(0); m["spec"]["plugins"] = json!([p]); },
    "memoryBytes must be greater than 0")]
#[case::plugin_unbounded("plugin without fuel or deadline", |m: &mut Value| { let mut p = a_plugin(); p["limits"] = json!({"memoryBytes": 1024}); m["spec"]["plugins"] = json!([p]); },
    "plugin limits need fuel or deadlineMillis (or both)")]
#[case::plugin_grant_not_boolean("network grant as a string", |m: &mut Value| { let mut p = a_plugin(); p["grants"] = json!({"network": "yes"}); m["spec"]["plugins"] = json!([p]); },
    "grants.network")]
#[case::port_out_of_range("port 70000", |m: &mut Value| m["spec"]["port"] = json!(70000),
    "spec.port: Invalid value: 70000: spec.port in body should be less than or equal to 65535")]
#[case::unknown_field("unknown field", |m: &mut Value| m["spec"]["replicas"] = json!(3),
    ".spec.replicas: field not declared in schema")]
#[case::missing_artifact("no artifact", |m: &mut Value| { m["spec"].as_object_mut().unwrap().remove("artifact"); },
    "spec.artifact: Required value")]
#[case::unknown_tee("unknown TEE", |m: &mut Value| m["spec"]["attestation"]["teeKinds"] = json!(["tpm", "sgx"]),
    "Unsupported value: \"sgx\"")]
#[case::duplicate_tee("duplicate TEE", |m: &mut Value| m["spec"]["attestation"]["teeKinds"] = json!(["tpm", "tpm"]),
    ".spec.attestation.teeKinds: duplicate entries for key [=\"tpm\"]")]
#[case::variant_named_like_model("variant name clash", |m: &mut Value| m["spec"]["variants"] = json!([{
        "name": "smollm2-135m-instruct",
        "artifact": m["spec"]["artifact"].clone(), "signature": m["spec"]["signature"].clone(), "minMemory": "2Gi"}]),
    "a variant name must differ from spec.servedName")]
#[tokio::test]
async fn invalid_edgemodels_are_rejected_with_their_reason(
    #[case] what: &str,
    #[case] mutate: fn(&mut Value),
    #[case] expected: &str,
) {
    let cp = control_plane().await;
    // The unmodified example passes, so the rejection below is the mutation's doing.
    let valid = model_example();
    let ok = apply(&cp, &valid);
    assert!(
        ok.status.success(),
        "valid example rejected: {}",
        text(&ok.stderr)
    );

    let mut invalid = valid.clone();
    invalid["metadata"]["name"] = json!("invalid");
    mutate(&mut invalid);
    let out = apply(&cp, &invalid);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "{what}: accepted, but must be rejected"
    );
    assert!(
        stderr.contains(expected),
        "{what}: expected {expected:?} in:\n{stderr}"
    );
    let get = kubectl(&cp, &["get", "em", "-n", "retail", "invalid"]);
    assert!(
        !get.status.success(),
        "{what}: a rejected object must not exist"
    );
}

#[rstest]
#[case::bad_fingerprint(|d: &mut Value| d["spec"]["facts"]["agentKeyFingerprint"] = json!("md5:1234"),
    "agentKeyFingerprint must have the form sha256:<64 lowercase hex digits>")]
#[case::zero_cores(|d: &mut Value| d["spec"]["facts"]["cpuCores"] = json!(0),
    "spec.facts.cpuCores in body should be greater than or equal to 1")]
#[case::memory_not_quantity(|d: &mut Value| d["spec"]["facts"]["memory"] = json!("lots"),
    "memory must be a positive quantity such as 8Gi")]
#[case::zero_memory(|d: &mut Value| d["spec"]["facts"]["memory"] = json!("0"),
    "memory must be a positive quantity such as 8Gi")]
// Assignments are derived from the EdgeModel status now; the old field is refused by
// name instead of being silently kept.
#[case::removed_assignments(|d: &mut Value| d["spec"]["desiredModels"] = json!([
        {"model": "retail/smollm2", "revision": "a"}]),
    ".spec.desiredModels: field not declared in schema")]
#[tokio::test]
async fn invalid_edgedevices_are_rejected_with_their_reason(
    #[case] mutate: fn(&mut Value),
    #[case] expected: &str,
) {
    let cp = control_plane().await;
    let mut device = example("edgedevice-store-042.yaml");
    // The unmodified example passes, so the rejection below is the mutation's doing.
    let ok = apply(&cp, &device);
    assert!(
        ok.status.success(),
        "valid example rejected: {}",
        text(&ok.stderr)
    );
    device["metadata"]["name"] = json!("invalid-device");
    mutate(&mut device);
    let out = apply(&cp, &device);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "accepted, but must be rejected");
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in:\n{stderr}"
    );
}

#[tokio::test]
async fn immutable_fields_cannot_change() {
    let cp = control_plane().await;
    let mut model = model_example();
    assert!(apply(&cp, &model).status.success());
    // A mutable field may change ...
    model["spec"]["runtime"]["contextSize"] = json!(4096);
    let out = apply(&cp, &model);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // ... an immutable one may not.
    model["spec"]["servedName"] = json!("renamed");
    let out = apply(&cp, &model);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("servedName is immutable"),
        "{}",
        text(&out.stderr)
    );

    let mut device = example("edgedevice-store-042.yaml");
    assert!(apply(&cp, &device).status.success());
    device["spec"]["facts"]["agentKeyFingerprint"] = json!(format!("sha256:{}", "0".repeat(64)));
    let out = apply(&cp, &device);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("agentKeyFingerprint is immutable"),
        "{}",
        text(&out.stderr)
    );
}

/// Splits `kubectl get` output into rows of (column, value), by the header's column
/// offsets (empty cells are blank, not `<none>`, for custom columns).
fn table(out: &str) -> Vec<Vec<(String, String)>> {
    let mut lines = out.lines();
    let header = lines.next().expect("a header line");
    let mut starts: Vec<(usize, &str)> = Vec::new();
    let mut pos = 0;
    for word in header.split_whitespace() {
        let at = header[pos..].find(word).unwrap() + pos;
        starts.push((at, word));
        pos = at + word.len();
    }
    lines
        .map(|line| {
            starts
                .iter()
                .enumerate()
                .map(|(i, (at, name))| {
                    let end = starts
                        .get(i + 1)
                        .map_or(line.len(), |n| n.0.min(line.len()));
                    let cell = line.get((*at).min(line.len())..end).unwrap_or("").trim();
                    ((*name).to_owned(), cell.to_owned())
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    let cp = control_plane().await;
    assert!(apply(&cp, &model_example()).status.success());
    assert!(
        apply(&cp, &example("edgedevice-store-042.yaml"))
            .status
            .success()
    );

    let before = table(&text(&kubectl(&cp, &["get", "em", "-n", "retail"]).stdout));
    let cols: Vec<&str> = before[0].iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(cols, ["NAME", "SIGNER", "READY", "PHASE", "AGE"]);
    let vals: Vec<&str> = before[0].iter().take(4).map(|(_, v)| v.as_str()).collect();
    assert_eq!(
        vals,
        ["smollm2-135m-instruct", "models-team", "", ""],
        "no status yet"
    );

    let out = kubectl(
        &cp,
        &[
            "patch",
            "em",
            "smollm2-135m-instruct",
            "-n",
            "retail",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"readyDevices":"2/3","phase":"Progressing"}}"#,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The rollout position every device derives its revision from is a 48-bit rank
    // bound: anything outside [0, 2^48] is refused by name, never stored.
    for (rank, expected) in [
        (
            "-1",
            "rolloutRank in body should be greater than or equal to 0",
        ),
        (
            "281474976710657",
            "rolloutRank in body should be less than or equal to 281474976710656",
        ),
    ] {
        let patch = format!(r#"{{"status":{{"rolloutRank":{rank}}}}}"#);
        let out = kubectl(
            &cp,
            &[
                "patch",
                "em",
                "smollm2-135m-instruct",
                "-n",
                "retail",
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch,
            ],
        );
        assert!(!out.status.success(), "rolloutRank {rank} accepted");
        assert!(
            text(&out.stderr).contains(expected),
            "{}",
            text(&out.stderr)
        );
    }
    let after = table(&text(&kubectl(&cp, &["get", "em", "-n", "retail"]).stdout));
    let vals: Vec<&str> = after[0].iter().take(4).map(|(_, v)| v.as_str()).collect();
    assert_eq!(
        vals,
        ["smollm2-135m-instruct", "models-team", "2/3", "Progressing"]
    );

    let out = kubectl(
        &cp,
        &[
            "patch",
            "ed",
            "store-042-till-1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"loadedModelCount":1,"attestation":{"teeKind":"tpm","allowed":true,"policy":"default",
            "policyHash":"sha256:00","verifiedTime":"2026-11-24T00:00:00Z","expiryTime":"2026-11-24T01:00:00Z"},
            "conditions":[{"type":"Ready","status":"True","reason":"HeartbeatReceived","message":"","lastTransitionTime":"2026-11-24T00:00:00Z"}]}}"#,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let devices = table(&text(&kubectl(&cp, &["get", "ed"]).stdout));
    let cols: Vec<&str> = devices[0].iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        cols,
        [
            "NAME",
            "APPROVED",
            "READY",
            "ATTESTED",
            "TEE",
            "MODELS",
            "HEARTBEAT",
            "AGE"
        ]
    );
    let vals: Vec<&str> = devices[0].iter().take(6).map(|(_, v)| v.as_str()).collect();
    assert_eq!(vals, ["store-042-till-1", "true", "True", "", "tpm", "1"]);

    // The short names and the category resolve too.
    let all = kubectl(&cp, &["get", "edgefleet", "-A", "-o", "name"]);
    let names = text(&all.stdout);
    assert!(
        names.contains("edgemodel.edgefleet.io/smollm2-135m-instruct"),
        "{names}"
    );
    assert!(
        names.contains("edgedevice.edgefleet.io/store-042-till-1"),
        "{names}"
    );
}

#[tokio::test]
async fn kubectl_explain_shows_field_docs() {
    let cp = control_plane().await;
    let out = kubectl(&cp, &["explain", "em.spec.artifact.digest"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("SHA-256 of the whole file"),
        "{}",
        text(&out.stdout)
    );
    let out = kubectl(&cp, &["explain", "em.spec.nosuchfield"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nosuchfield"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn status_writes_do_not_bump_generation_but_spec_writes_do() {
    let cp = control_plane().await;
    let models: Api<EdgeModel> = Api::namespaced(cp.client().await.unwrap(), "retail");
    let model: EdgeModel = serde_json::from_value(model_example()).unwrap();
    let created = models.create(&PostParams::default(), &model).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));

    let status = json!({"status": {"phase": "Progressing", "observedGeneration": 1,
        "devices": {"targeted": 3, "attested": 3, "updated": 1, "ready": 1, "failed": 0}},
        // The status subresource ignores spec changes.
        "spec": {"port": 9999}});
    let patched = models
        .patch_status(
            "smollm2-135m-instruct",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(1));
    assert_eq!(patched.spec.port, 8080);
    assert_eq!(patched.status.as_ref().unwrap().devices.updated, 1);

    let spec = json!({"spec": {"runtime": {"threads": 4}}});
    let patched = models
        .patch(
            "smollm2-135m-instruct",
            &PatchParams::default(),
            &Patch::Merge(&spec),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    assert_eq!(patched.status.unwrap().phase, Some(ModelPhase::Progressing));
}

#[tokio::test]
async fn kube_client_creates_watches_and_patches_status() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let devices: Api<EdgeDevice> = Api::all(client);
    let device: EdgeDevice = serde_json::from_value(example("edgedevice-store-042.yaml")).unwrap();
    let created = devices
        .create(&PostParams::default(), &device)
        .await
        .unwrap();

    let mut stream = watcher(
        devices.clone(),
        watcher::Config::default().labels("edgefleet.io/site=store-042"),
    )
    .applied_objects()
    .boxed();

    let status = json!({
        "apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDevice",
        "status": {"loadedModelCount": 1, "models": [{"model": "retail/smollm2-135m-instruct",
            "revision": "r1", "state": "Ready", "loadMillis": 216}]},
    });
    devices
        .patch_status(
            "store-042-till-1",
            &PatchParams::apply("edgefleet-operator"),
            &Patch::Apply(&status),
        )
        .await
        .unwrap();

    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(event) = stream.next().await {
            let dev = event.unwrap();
            if dev
                .status
                .as_ref()
                .is_some_and(|s| s.loaded_model_count == 1)
            {
                return dev;
            }
        }
        panic!("watch ended");
    })
    .await
    .expect("the watch sees the status change");
    assert_eq!(
        seen.status.unwrap().models[0].state,
        edgefleet_crds::device::ModelState::Ready
    );

    // A write based on a stale resourceVersion is refused with 409 Conflict.
    let err = devices
        .replace("store-042-till-1", &PostParams::default(), &created)
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 409, "{status:?}"),
        other => panic!("expected 409, got {other}"),
    }
    // A status that breaks the schema is refused with 422 naming the field.
    let err = devices
        .patch_status(
            "store-042-till-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadedModelCount": "many"}})),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains("loadedModelCount"),
                "{}",
                status.message
            );
        }
        other => panic!("expected 422, got {other}"),
    }
}

#[tokio::test]
async fn anonymous_requests_are_refused() {
    let cp = control_plane().await;
    let url = format!("{}/apis/edgefleet.io/v1alpha1/edgemodels", cp.server_url());
    let curl = |extra: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "-k", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(extra)
            .arg(&url)
            .output()
            .expect("curl runs");
        text(&out.stdout)
    };
    // Without a client certificate the server knows nobody and allows nothing.
    assert_eq!(curl(&[]), "403");
    // With the harness's system:masters certificate the same request succeeds.
    let pki = cp.dir().join("pki");
    let cert = pki.join("client.crt");
    let key = pki.join("client.key");
    assert_eq!(
        curl(&[
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap()
        ]),
        "200"
    );
}
