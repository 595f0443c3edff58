//! The whole fleet, end to end: the real API server, the operator process with its
//! gateway, three real agent processes (`edgefleet-agent run`, `dev` attester) and the
//! real SmolLM2 model with the pii-redact plugin.
//!
//! `kubectl apply` → every device enrols, attests, long-polls its desired state,
//! downloads through the gateway, verifies, loads and serves → `kubectl get em` shows
//! 3/3 and each device answers a chat. Then: identities are enforced (no certificate,
//! another device's name, a foreign CA, an unassigned artifact); a new revision rolls out
//! step by step; a badly signed revision halts with SignatureInvalid while the devices
//! keep serving; deletion unloads everywhere before the finalizer goes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgefleet_crds::{EdgeDevice, EdgeModel, ModelPhase};
use edgefleet_e2e::builders::{
    EdgeModelBuilder, SignedArtifact, Signer, allow_all_pools, apply_edge_model, assigned_revision,
    trust_signers_of,
};
use edgefleet_e2e::local_fleet::{self, Proc};
use edgefleet_e2e::netns::Netns;
use edgefleet_e2e::wait::eventually;
use edgefleet_e2e::{ControlPlane, cache_dir, free_port};
use kube::Client;
use kube::api::{Api, DeleteParams};
use serde_json::{Value, json};

const NS: &str = "fleet";

fn model_file() -> PathBuf {
    std::env::var_os("EDGEFLEET_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

fn plugin_file(name: &str) -> PathBuf {
    std::env::var_os("EDGEFLEET_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("target-wasm/wasm32-wasip2/release"))
        .join(name)
}

fn sha256_file(p: &Path) -> String {
    local_fleet::digest_of(p).unwrap()
}

struct Setup {
    cp: ControlPlane,
    client: Client,
    dir: tempfile::TempDir,
    gateway: String,
    gateway_ca: local_fleet::Ca,
    device_ca_pem: String,
    agents: Vec<(String, u16, Proc)>,
    _operator: Proc,
    model: PathBuf,
    /// Who signed the model and the plugins.
    signer: Signer,
    /// The model as the EdgeModel names it.
    artifact: SignedArtifact,
    plugin: SignedArtifact,
    /// Where the gateway mirrors the plugin from.
    plugin_uri: String,
    /// A plugin that imports sockets it is never granted: devices refuse to load it.
    bad_plugin: SignedArtifact,
}

impl Setup {
    /// The end of each process's log and the resources as they stand.
    fn diagnostics(&self) -> String {
        let logs: String = ["operator", "dev-1", "dev-2", "dev-3"]
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(self.dir.path().join(format!("{n}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                format!(
                    "--- {n}\n{}\n",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect();
        let state = self
            .cp
            .kubectl()
            .args(["get", "em,ed", "-A", "-o", "yaml"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let state: String = state
            .lines()
            .filter(|l| !l.contains("inline:") && !l.trim_start().starts_with('"') && l.len() < 200)
            .collect::<Vec<_>>()
            .join("\n");
        format!("{logs}\n{state}")
    }
}

impl Drop for Setup {
    /// A failing test (a wait that timed out, an assertion) shows the processes' logs
    /// and the resources beside its panic message.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
    }
}

async fn setup() -> Setup {
    setup_with(None).await
}

/// Three agents; with `netns`, dev-3 runs in that network namespace, behind its veth.
async fn setup_with(netns: Option<&Netns>) -> Setup {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::start().await.expect("control plane starts");
    cp.install_crds().await.expect("CRDs install");
    let client = cp.client().await.unwrap();
    allow_all_pools(&client).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let pki = local_fleet::GatewayPki::write(
        d,
        &netns.map(|n| vec![n.host_ip.clone()]).unwrap_or_default(),
    )
    .unwrap();

    // The artifact store: the model and the plugin, by digest.
    let store = d.join("artifacts");
    let model = model_file();
    let (digest, size) = local_fleet::store_artifact(&store, &model).unwrap();
    // The plugin is not in the store: the gateway mirrors it from its https:// URI (a
    // server whose CA only the operator is told to trust) when the model's templates
    // name it, checking its digest on the way in.
    let plugin = plugin_file("pii_redact.wasm");
    let plugin_bytes = std::fs::read(&plugin).unwrap();
    let (plugin_host, plugin_ca) =
        local_fleet::https_files(vec![("/pii_redact.wasm", plugin_bytes)]).unwrap();
    let plugin_ca_file = d.join("plugin-host-ca.pem");
    std::fs::write(&plugin_ca_file, plugin_ca).unwrap();
    let signer = Signer::generate().unwrap();
    let artifact = SignedArtifact {
        digest,
        size,
        bundle: signer.sign(&model).unwrap(),
    };
    let plugin = signer.artifact(&plugin).unwrap();
    let bad = plugin_file("hostile_net.wasm");
    let (digest, size) = local_fleet::store_artifact(&store, &bad).unwrap();
    let bad_plugin = SignedArtifact {
        digest,
        size,
        bundle: signer.sign(&bad).unwrap(),
    };

    let port = free_port().unwrap();
    let gateway = format!("https://127.0.0.1:{port}");
    let operator = local_fleet::spawn_operator(
        cp.kubeconfig_path(),
        &pki,
        &local_fleet::OperatorSpec {
            gateway_addr: if netns.is_some() {
                format!("0.0.0.0:{port}")
            } else {
                format!("127.0.0.1:{port}")
            },
            artifact_dir: store,
            approval: "auto:edgefleet.io/pool=e2e".into(),
            ek_cas: vec![],
            ek_intermediates: vec![],
            heartbeat_lease_seconds: 8,
            artifact_ca: Some(plugin_ca_file),
            log: d.join("operator.log"),
        },
    )
    .unwrap();
    local_fleet::create_pool_token(&client, "e2e")
        .await
        .unwrap();
    let mut agents = Vec::new();
    for i in 1..=3 {
        let name = format!("dev-{i}");
        let (port, child) = match netns.filter(|_| i == 3) {
            Some(n) => start_agent_in(
                d,
                &name,
                &format!("https://{}:{port}", n.host_ip),
                None,
                Some(n),
            ),
            None => start_agent(d, &name, &gateway, None),
        };
        agents.push((name, port, child));
    }
    Setup {
        cp,
        client,
        gateway,
        gateway_ca: pki.gateway_ca,
        device_ca_pem: pki.device_ca.pem,
        agents,
        _operator: Proc(operator),
        model,
        signer,
        artifact,
        plugin,
        plugin_uri: format!("{plugin_host}/pii_redact.wasm"),
        bad_plugin,
        dir,
    }
}

/// Starts `edgefleet-agent run` for `name` (its state survives restarts).
fn start_agent(d: &Path, name: &str, gateway: &str, port: Option<u16>) -> (u16, Proc) {
    start_agent_in(d, name, gateway, port, None)
}

/// Starts the agent, inside `netns` when given.
fn start_agent_in(
    d: &Path,
    name: &str,
    gateway: &str,
    port: Option<u16>,
    netns: Option<&Netns>,
) -> (u16, Proc) {
    let port = port.unwrap_or_else(|| free_port().unwrap());
    let child = local_fleet::spawn_agent(&local_fleet::AgentSpec {
        name: name.into(),
        dir: d.join(name),
        gateway: gateway.into(),
        gateway_ca: d.join("gw-ca.crt"),
        port,
        tee: "dev".into(),
        tcti: None,
        netns: netns.map(|n| n.name.clone()),
        pool: "e2e".into(),
        log: d.join(format!("{name}.log")),
    })
    .unwrap();
    (port, Proc(child))
}

/// The EdgeModel of the fleet: the model with `bundle` as its signature, one device
/// first (then `pause` seconds), then the rest, through the pii-redact plugin.
fn edge_model(s: &Setup, bundle: &str, context: i32, pause: i32) -> EdgeModelBuilder {
    EdgeModelBuilder::new(NS, "smollm2")
        .artifact(
            "https://artifacts.example/smollm2.gguf",
            &s.artifact.digest,
            Some(s.artifact.size),
        )
        .inline_signature(bundle)
        .signer("models-team", &s.signer.public_key)
        .pool("e2e")
        .attestation(&["dev"], Some("dev"))
        .rollout(json!({
            "steps": [{"count": 1, "pauseSeconds": pause}, {"percent": 100}],
            "maxUnavailable": 1,
            "healthGates": {"readyTimeoutSeconds": 120, "rollbackOnFailure": true},
        }))
        .runtime(json!({"contextSize": context, "threads": 1, "parallelSlots": 1}))
        .plugin("pii-redact", &s.plugin_uri, &s.plugin, plugin_limits())
}

fn plugin_limits() -> Value {
    json!({"deadlineMillis": 200, "memoryBytes": 33554432})
}

fn manifest(s: &Setup, bundle: &str, context: i32, pause: i32) -> Value {
    edge_model(s, bundle, context, pause).build()
}

/// The manifest with the socket-importing plugin added to the chain.
fn manifest_with_bad_plugin(s: &Setup, context: i32) -> Value {
    edge_model(s, &s.artifact.bundle, context, 0)
        .plugin(
            "hostile-net",
            "https://artifacts.example/hostile_net.wasm",
            &s.bad_plugin,
            plugin_limits(),
        )
        .build()
}

/// Applies `m`, its signers trusted for the namespace first.
async fn apply(client: &Client, m: &Value) {
    trust_signers_of(client, m).await.unwrap();
    apply_edge_model(client, m).await.unwrap();
}

async fn model(client: &Client) -> Option<EdgeModel> {
    Api::<EdgeModel>::namespaced(client.clone(), NS)
        .get_opt("smollm2")
        .await
        .unwrap()
}

/// The reason and message of the model's condition `kind`, while its status is `status`.
async fn model_condition(c: &Client, kind: &str, status: &str) -> Option<(String, String)> {
    let st = model(c).await?.status?;
    st.conditions
        .iter()
        .find(|x| x.type_ == kind && x.status == status)
        .map(|x| (x.reason.clone(), x.message.clone()))
}

/// Whether the operator has published an Event on the model with `reason`, noting (the
/// beginning of) `message`.
async fn published(c: &Client, reason: &str, message: &str) -> bool {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .any(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("smollm2")
                && e.reason.as_deref() == Some(reason)
                && e.note.as_deref().is_some_and(|n| message.starts_with(n))
        })
}

fn reported(d: &EdgeDevice) -> Vec<(String, String)> {
    d.status
        .as_ref()
        .map(|s| {
            s.models
                .iter()
                .map(|m| (m.revision.clone(), format!("{:?}", m.state)))
                .collect()
        })
        .unwrap_or_default()
}

/// The devices, once the status of every one reports `want` as (revision, state).
async fn all_reporting(c: &Client, want: &[(String, String)]) -> Option<Vec<EdgeDevice>> {
    let ds = devices(c).await;
    ds.iter().all(|d| reported(d) == want).then_some(ds)
}

async fn devices(client: &Client) -> Vec<EdgeDevice> {
    Api::<EdgeDevice>::all(client.clone())
        .list(&Default::default())
        .await
        .unwrap()
        .items
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn chat(port: u16) -> (u16, Value) {
    let resp = http()
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .json(&json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12, "temperature": 0,
        }))
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or_default(),
    )
}

/// A client of the gateway presenting `identity` (cert and key PEM), if any.
fn gateway_client(s: &Setup, identity: Option<(String, String)>) -> reqwest::Client {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls::pki_types::CertificateDer::from_pem_slice(s.gateway_ca.pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    let tls = match identity {
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn identity_of(s: &Setup, device: &str) -> (String, String) {
    let state = s.dir.path().join(device).join("state");
    (
        std::fs::read_to_string(state.join("agent-cert.pem")).unwrap(),
        std::fs::read_to_string(state.join("agent-key.pem")).unwrap(),
    )
}

async fn refusal(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or_default();
    (status, v["reason"].as_str().unwrap_or("").to_owned())
}

#[tokio::test]
async fn a_fleet_of_three_agents_rolls_out_serves_and_unloads() {
    let s = setup().await;
    let c = &s.client;

    // Enrolment creates approved EdgeDevices; attestation makes them Attested.
    eventually(
        "three enrolled, attested devices",
        Duration::from_secs(60),
        || async {
            let ds = devices(c).await;
            let ok = ds.len() == 3
                && ds.iter().all(|d| {
                    d.spec.approved
                        && edgefleet_operator::rollout::condition_true(d, "Attested")
                        && d.spec.facts.tee_kinds == vec![edgefleet_crds::TeeKind::Dev]
                });
            ok.then_some(())
        },
    )
    .await;

    apply(c, &manifest(&s, &s.artifact.bundle, 1024, 0)).await;
    let rev1 = eventually("3/3 ready", Duration::from_secs(180), || async {
        let m = model(c).await?;
        let st = m.status?;
        (st.ready_devices.as_deref() == Some("3/3") && st.phase == Some(ModelPhase::Available))
            .then_some(st.current_revision?)
    })
    .await;
    let out =
        s.cp.kubectl()
            .args(["get", "em", "-n", NS])
            .output()
            .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("3/3") && table.contains("Available"),
        "{table}"
    );
    // The plugin reached the devices through the gateway's mirror of its URI.
    let mirrored = s
        .dir
        .path()
        .join("artifacts")
        .join(s.plugin.digest.trim_start_matches("sha256:"));
    let meta = std::fs::symlink_metadata(&mirrored).unwrap();
    assert!(meta.is_file() && meta.len() == s.plugin.size, "{meta:?}");
    // The rollout plans on the reports in the gateway's memory; the device statuses
    // follow within the change budget.
    let want = vec![(rev1.clone(), "Ready".to_owned())];
    let ds = eventually(
        "the statuses of all three say Ready",
        Duration::from_secs(30),
        || all_reporting(c, &want),
    )
    .await;
    for d in ds {
        assert_eq!(
            reported(&d),
            want,
            "{}",
            d.metadata.name.clone().unwrap_or_default()
        );
        let delivery = d.status.as_ref().and_then(|s| s.reports.clone()).unwrap();
        assert_eq!(
            (delivery.missing, delivery.dropped),
            (0, 0),
            "no report lost"
        );
        assert!(delivery.last_sequence > 0);
    }
    // HTTP/2: each agent's long-poll, reports and downloads share one connection to the
    // gateway (with HTTP/1.1 the long-poll alone holds one and reports need another).
    let gateway_port = s.gateway.rsplit(':').next().unwrap().to_owned();
    for (name, _, proc_) in &s.agents {
        let pid = format!("pid={},", proc_.0.id());
        eventually(
            &format!("{name} on one connection"),
            Duration::from_secs(30),
            || async {
                let out = std::process::Command::new("ss")
                    .args(["-Htnp", "state", "established"])
                    .arg(format!("dport = :{gateway_port}"))
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                (text.lines().filter(|l| l.contains(&pid)).count() == 1).then_some(())
            },
        )
        .await;
    }
    for (name, port, _) in &s.agents {
        let (code, body) = chat(*port).await;
        assert_eq!(code, 200, "{name}: {body}");
        let text = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("");
        assert!(text.contains("Paris"), "{name} answered {text:?}");
        // The request went through the plugin chain the EdgeModel named.
        let metrics = http()
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("edgefleet_plugin_calls_total") && l.contains("pii-redact")),
            "{name}: no pii-redact calls in metrics"
        );
    }
    // A signed answer names the plugin chain it passed through, and verifies with the
    // device CA alone.
    let (name, port, _) = &s.agents[0];
    let body = json!({"model": "smollm2", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    .to_string();
    let resp = http()
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("edgefleet-receipt", "1")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{name}");
    let signed = resp
        .headers()
        .get("edgefleet-receipt")
        .expect("a receipt")
        .to_str()
        .unwrap()
        .to_owned();
    let answer = resp.bytes().await.unwrap();
    let v = edgefleet_trust::receipt::verify(&signed, s.device_ca_pem.as_bytes()).unwrap();
    v.check_bodies(Some(body.as_bytes()), Some(&answer))
        .unwrap();
    assert_eq!(v.claims.device, *name);
    assert_eq!(
        v.claims.provenance.plugins,
        vec![edgefleet_trust::receipt::PluginClaim {
            name: "pii-redact".into(),
            digest: s.plugin.digest.clone(),
        }]
    );
    assert_eq!(v.claims.provenance.model.digest, s.artifact.digest);
    // Each device's serving counters reach its status tied to the model and revision
    // they count (what the rate gates judge), stamped when the gateway received them.
    let key = format!("{NS}/smollm2");
    eventually(
        "serving statistics of the revision in every status",
        Duration::from_secs(30),
        || async {
            let ds = devices(c).await;
            ds.iter()
                .all(|d| {
                    d.status
                        .as_ref()
                        .and_then(|s| s.inference.as_ref())
                        .is_some_and(|i| {
                            i.model.as_deref() == Some(key.as_str())
                                && i.revision.as_deref() == Some(rev1.as_str())
                                && i.requests_total >= 1
                                && i.errors_total == 0
                                && i.observed_time.is_some()
                                // The agent's histogram estimates, in milliseconds.
                                && i.latency_p50_millis.is_some_and(|v| v > 0.0)
                                && i.latency_p50_millis <= i.latency_p99_millis
                                && i.time_to_first_token_p95_millis.is_some_and(|v| v > 0.0)
                        })
                })
                .then_some(())
        },
    )
    .await;

    // Identities: only a device's own certificate, for its own name and assignments.
    let desired = |dev: &str| format!("{}/v1/devices/{dev}/desired", s.gateway);
    let anon = gateway_client(&s, None);
    assert_eq!(
        refusal(anon.get(desired("dev-1")).send().await.unwrap()).await,
        (401, "ClientCertificateRequired".into())
    );
    let dev1 = gateway_client(&s, Some(identity_of(&s, "dev-1")));
    let own = dev1.get(desired("dev-1")).send().await.unwrap();
    assert_eq!(own.status().as_u16(), 200);
    let state: edgefleet_proto::DesiredState = own.json().await.unwrap();
    assert_eq!(state.models.len(), 1);
    assert_eq!(state.models[0].revision, rev1);
    assert_eq!(
        refusal(dev1.get(desired("dev-2")).send().await.unwrap()).await,
        (403, "Impersonation".into())
    );
    let artifact = |digest: &str| format!("{}/v1/devices/dev-1/artifacts/{digest}", s.gateway);
    let head = dev1
        .get(artifact(&s.artifact.digest))
        .header("Range", "bytes=0-3")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status().as_u16(), 206);
    assert_eq!(
        head.headers()["content-range"].to_str().unwrap(),
        format!("bytes 0-3/{}", s.artifact.size)
    );
    assert_eq!(&head.bytes().await.unwrap()[..], b"GGUF");
    let unassigned = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(
        refusal(dev1.get(artifact(&unassigned)).send().await.unwrap()).await,
        (403, "NotAssigned".into())
    );
    // A certificate naming dev-1 from a CA the gateway does not trust: no handshake.
    let foreign_ca = local_fleet::Ca::new("somebody else's CA").unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "edgefleet://device/dev-1".try_into().unwrap(),
    )];
    let forged = p
        .signed_by(
            &key,
            &rcgen::Issuer::from_params(&foreign_ca.params, &foreign_ca.key),
        )
        .unwrap();
    let foreign = gateway_client(&s, Some((forged.pem(), key.serialize_pem())));
    let err = foreign.get(desired("dev-1")).send().await.unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err:?}");
    assert!(!s.device_ca_pem.is_empty());

    // A new revision rolls out one device first, then the rest.
    apply(c, &manifest(&s, &s.artifact.bundle, 1536, 4)).await;
    let rev2 = eventually(
        "step 1: one device on the new revision",
        Duration::from_secs(120),
        || async {
            let st = model(c).await?.status?;
            let rev = st.current_revision.clone()?;
            (rev != rev1 && st.devices.updated == 1 && st.current_step == Some(0)).then_some(rev)
        },
    )
    .await;
    eventually(
        "the new revision on 3/3",
        Duration::from_secs(180),
        || async {
            let st = model(c).await?.status?;
            let done = st.ready_devices.as_deref() == Some("3/3")
                && st.stable_revision.as_deref() == Some(rev2.as_str())
                && st.current_step == Some(1);
            done.then_some(())
        },
    )
    .await;
    let want = vec![(rev2.clone(), "Ready".to_owned())];
    eventually(
        "the statuses say the new revision Ready",
        Duration::from_secs(30),
        || all_reporting(c, &want),
    )
    .await;

    // A revision its first device (in rank order) cannot load (a plugin importing
    // sockets it is not granted) fails that device's health gate: the rollout halts and
    // moves it back.
    let uid = Api::<EdgeModel>::namespaced(c.clone(), NS)
        .get("smollm2")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let (first_index, first) = s
        .agents
        .iter()
        .enumerate()
        .map(|(i, (name, _, _))| (i, name.clone()))
        .min_by_key(|(_, name)| edgefleet_crds::model::device_rank(&uid, name))
        .unwrap();
    apply(c, &manifest_with_bad_plugin(&s, 1536)).await;
    let (reason, msg) = eventually(
        "Degraded by the failed device",
        Duration::from_secs(120),
        || model_condition(c, "Degraded", "True"),
    )
    .await;
    assert_eq!(reason, "HealthGateFailed", "{msg}");
    eventually(
        "every device back on the stable revision, Ready",
        Duration::from_secs(60),
        || async {
            let ds = devices(c).await;
            let mut back = true;
            for d in &ds {
                let name = d.metadata.name.clone().unwrap_or_default();
                back &= assigned_revision(c, NS, "smollm2", &name).await.as_ref() == Some(&rev2)
                    && reported(d) == vec![(rev2.clone(), "Ready".to_owned())];
            }
            back.then_some(())
        },
    )
    .await;
    let log = log_of(&s, &first);
    assert!(
        log.contains("PluginRefused"),
        "{first} did not name the refusal:\n{log}"
    );
    let (code, _) = chat(s.agents[first_index].1).await;
    assert_eq!(code, 200, "{first} kept serving the stable revision");

    // A revision signed by a stranger halts with SignatureInvalid; devices keep rev2.
    let bad = Signer::generate().unwrap().sign(&s.model).unwrap();
    apply(c, &manifest(&s, &bad, 2048, 0)).await;
    let (reason, msg) = eventually("SignatureVerified False", Duration::from_secs(60), || {
        model_condition(c, "SignatureVerified", "False")
    })
    .await;
    assert_eq!(reason, "SignatureInvalid", "{msg}");
    // The reconcile that wrote the condition publishes its Event after its assignment
    // writes: once the Event is there, the operator has decided what the devices run.
    eventually(
        "the SignatureInvalid Event",
        Duration::from_secs(30),
        || async { published(c, "SignatureInvalid", &msg).await.then_some(()) },
    )
    .await;
    for d in devices(c).await {
        assert_eq!(reported(&d), vec![(rev2.clone(), "Ready".to_owned())]);
        let name = d.metadata.name.clone().unwrap_or_default();
        assert_eq!(
            assigned_revision(c, NS, "smollm2", &name).await.as_ref(),
            Some(&rev2)
        );
    }
    let (code, _) = chat(s.agents[0].1).await;
    assert_eq!(code, 200, "still serving the verified revision");

    // Deletion unloads everywhere, then releases the finalizer.
    Api::<EdgeModel>::namespaced(c.clone(), NS)
        .delete("smollm2", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the EdgeModel gone", Duration::from_secs(90), || async {
        model(c).await.is_none().then_some(())
    })
    .await;
    // The finalizer is released on the reports in the gateway's memory; the statuses
    // follow.
    eventually(
        "the statuses say nothing is loaded",
        Duration::from_secs(30),
        || all_reporting(c, &[]),
    )
    .await;
    for (name, port, _) in &s.agents {
        let (code, body) = chat(*port).await;
        assert_eq!(code, 503, "{name} still serves: {body}");
    }
}

fn log_of(s: &Setup, device: &str) -> String {
    std::fs::read_to_string(s.dir.path().join(format!("{device}.log"))).unwrap_or_default()
}

fn device_named<'a>(ds: &'a [EdgeDevice], name: &str) -> &'a EdgeDevice {
    ds.iter()
        .find(|d| d.metadata.name.as_deref() == Some(name))
        .unwrap()
}

const CHAT: &str = r#"{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":8,"temperature":0}"#;

#[tokio::test]
async fn a_partitioned_device_resumes_its_download_keeps_serving_and_converges() {
    let net = Netns::create();
    // dev-3's downloads crawl, so that it can be killed in the middle of one.
    net.shape(Some("40mbit"));
    let mut s = setup_with(Some(&net)).await;
    let c = s.client.clone();
    let gateway3 = format!(
        "https://{}:{}",
        net.host_ip,
        s.gateway.rsplit(':').next().unwrap()
    );
    apply(&c, &manifest(&s, &s.artifact.bundle, 1024, 0)).await;

    // Kill dev-3 in the middle of its download; it resumes where it stopped.
    let partial = s
        .dir
        .path()
        .join("dev-3/state/artifacts")
        .join(format!("{}.partial", &s.artifact.digest[7..]));
    let had = eventually(
        "dev-3 part-way through its download",
        Duration::from_secs(180),
        || async {
            let n = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            (n > 8 << 20).then_some(n)
        },
    )
    .await;
    let (_, port3, proc3) = s.agents.pop().unwrap();
    drop(proc3);
    assert!(had < s.artifact.size, "the download was complete already");
    net.shape(None);
    let (_, proc3) = start_agent_in(s.dir.path(), "dev-3", &gateway3, Some(port3), Some(&net));
    s.agents.push(("dev-3".into(), port3, proc3));
    let rev1 = eventually("3/3 ready", Duration::from_secs(180), || async {
        let st = model(&c).await?.status?;
        (st.ready_devices.as_deref() == Some("3/3")).then_some(st.current_revision?)
    })
    .await;
    let log = log_of(&s, "dev-3");
    assert!(
        log.contains("resuming download"),
        "dev-3 did not resume:\n{log}"
    );
    assert!(!partial.exists(), "the partial file is gone once complete");
    assert_eq!(
        sha256_file(
            &s.dir
                .path()
                .join("dev-3/state/artifacts")
                .join(&s.artifact.digest[7..])
        ),
        s.artifact.digest
    );

    // Partition dev-3: it goes NotReady after the lease, and keeps serving locally.
    net.link(false);
    let local = format!("http://127.0.0.1:{port3}/v1/chat/completions");
    eventually("dev-3 NotReady", Duration::from_secs(60), || async {
        let ds = devices(&c).await;
        let d = device_named(&ds, "dev-3");
        (!edgefleet_operator::rollout::condition_true(d, "Ready")).then_some(())
    })
    .await;
    let (code, body) = net.curl(&local, Some(CHAT));
    assert_eq!(code, 200, "dev-3 stopped serving while partitioned: {body}");

    // Restarted while cut off, it serves its last-known-good model from disk.
    let (_, _, proc3) = s.agents.pop().unwrap();
    drop(proc3);
    let (_, proc3) = start_agent_in(s.dir.path(), "dev-3", &gateway3, Some(port3), Some(&net));
    s.agents.push(("dev-3".into(), port3, proc3));
    let ready = format!("http://127.0.0.1:{port3}/readyz");
    eventually("dev-3 ready offline", Duration::from_secs(60), || async {
        (net.curl(&ready, None).0 == 200).then_some(())
    })
    .await;
    let (code, body) = net.curl(&local, Some(CHAT));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("Paris"), "{body}");
    // Kept a fixed wait: cut off, the agent takes a report into its spool every second
    // (heartbeat_seconds = 1) without a gateway client, so it neither logs nor exposes
    // the spool; these seconds are what gives it reports to deliver on healing, which
    // the checks below (nothing missing, nothing dropped) are about.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Heal: it reconnects, delivers its spooled reports, and converges without
    // reloading the model it already runs.
    let before = log_of(&s, "dev-3").matches("activating").count();
    net.link(true);
    eventually(
        "dev-3 Ready again with all its reports",
        Duration::from_secs(60),
        || async {
            let ds = devices(&c).await;
            let d = device_named(&ds, "dev-3");
            let r = d.status.as_ref()?.reports.clone()?;
            let ok =
                edgefleet_operator::rollout::condition_true(d, "Ready") && r.last_sequence >= 5;
            ok.then_some(r)
        },
    )
    .await;
    let ds = devices(&c).await;
    let r = device_named(&ds, "dev-3")
        .status
        .as_ref()
        .unwrap()
        .reports
        .clone()
        .unwrap();
    assert_eq!((r.missing, r.dropped), (0, 0), "reports lost: {r:?}");
    assert_eq!(
        reported(device_named(&ds, "dev-3")),
        vec![(rev1, "Ready".to_owned())]
    );
    assert_eq!(
        log_of(&s, "dev-3").matches("activating").count(),
        before,
        "the model was reloaded although nothing changed"
    );
}
