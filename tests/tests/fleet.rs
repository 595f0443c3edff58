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

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgefleet_crds::{EdgeDevice, EdgeModel};
use edgefleet_e2e::fleet::{self, Proc};
use edgefleet_e2e::{ControlPlane, cache_dir, free_port};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
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
    fleet::digest_of(p).unwrap()
}

/// A signer key and the bundle of `file` signed with it.
fn sign(file: &Path, key_pem: &str) -> String {
    let signer = edgefleet_trust::model_signing::PrivateKey::from_pem(key_pem).unwrap();
    String::from_utf8(
        edgefleet_trust::model_signing::sign(file, &signer, None, &Default::default()).unwrap(),
    )
    .unwrap()
}

fn new_key() -> (String, String) {
    use p256::pkcs8::EncodePrivateKey as _;
    let key = p256::SecretKey::random(&mut rand_core::OsRng)
        .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
        .unwrap()
        .to_string();
    let public = edgefleet_trust::model_signing::PrivateKey::from_pem(&key)
        .unwrap()
        .public_key()
        .to_pem()
        .unwrap();
    (key, public)
}

/// A network namespace with a veth pair to the host: the device's own network, which
/// a test can cut (link down) and slow (tc).
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn create() -> Self {
        let id = std::process::id() % 10000;
        let subnet = std::process::id() % 250;
        let name = format!("ef{id}");
        let host_if = format!("efh{id}");
        let dev_if = format!("efd{id}");
        let host_ip = format!("10.213.{subnet}.1");
        let dev_ip = format!("10.213.{subnet}.2");
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &dev_if,
        ]);
        ip(&["link", "set", &dev_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        for args in [
            vec!["addr", "add", &format!("{dev_ip}/30"), "dev", &dev_if],
            vec!["link", "set", &dev_if, "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut a = vec!["netns", "exec", &name, "ip"];
            a.extend(args.iter().map(|s| &**s));
            ip(&a);
        }
        Self {
            name,
            host_if,
            host_ip,
        }
    }

    /// Cuts (false) or restores (true) the device's link to the host.
    fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }

    /// Limits host→device traffic (downloads) to `rate`, or lifts the limit.
    fn shape(&self, rate: Option<&str>) {
        let mut c = Command::new("tc");
        match rate {
            Some(r) => c.args([
                "qdisc",
                "replace",
                "dev",
                &self.host_if,
                "root",
                "tbf",
                "rate",
                r,
                "burst",
                "64kb",
                "latency",
                "500ms",
            ]),
            None => c.args(["qdisc", "del", "dev", &self.host_if, "root"]),
        };
        assert!(c.status().unwrap().success());
    }

    /// GET or POST from inside the device's network (its local clients).
    fn curl(&self, url: &str, body: Option<&str>) -> (u16, String) {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.name,
            "curl",
            "-s",
            "-m",
            "60",
            "-w",
            "\n%{http_code}",
        ]);
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "-d", b]);
        }
        let out = c.arg(url).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.parse().unwrap_or(0), body.to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
    }
}

struct Setup {
    cp: ControlPlane,
    client: Client,
    dir: tempfile::TempDir,
    gateway: String,
    gateway_ca: fleet::Ca,
    device_ca_pem: String,
    agents: Vec<(String, u16, Proc)>,
    _operator: Proc,
    model: PathBuf,
    digest: String,
    size: u64,
    signer_public: String,
    bundle: String,
    plugin_digest: String,
    plugin_size: u64,
    /// Where the gateway mirrors the plugin from.
    plugin_uri: String,
    plugin_bundle: String,
    /// A plugin that imports sockets it is never granted: devices refuse to load it.
    bad_plugin: (String, u64, String),
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
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let pki = fleet::GatewayPki::write(
        d,
        &netns.map(|n| vec![n.host_ip.clone()]).unwrap_or_default(),
    )
    .unwrap();

    // The artifact store: the model and the plugin, by digest.
    let store = d.join("artifacts");
    let model = model_file();
    let (digest, size) = fleet::store_artifact(&store, &model).unwrap();
    // The plugin is not in the store: the gateway mirrors it from its https:// URI (a
    // server whose CA only the operator is told to trust) when the model's templates
    // name it, checking its digest on the way in.
    let plugin = plugin_file("pii_redact.wasm");
    let plugin_bytes = std::fs::read(&plugin).unwrap();
    let plugin_digest = fleet::digest_of(&plugin).unwrap();
    let plugin_size = plugin_bytes.len() as u64;
    let (plugin_host, plugin_ca) =
        fleet::https_files(vec![("/pii_redact.wasm", plugin_bytes)]).unwrap();
    let plugin_ca_file = d.join("plugin-host-ca.pem");
    std::fs::write(&plugin_ca_file, plugin_ca).unwrap();
    let (signer_key, signer_public) = new_key();
    let bundle = sign(&model, &signer_key);
    let plugin_bundle = sign(&plugin, &signer_key);
    let bad = plugin_file("hostile_net.wasm");
    let (bad_digest, bad_size) = fleet::store_artifact(&store, &bad).unwrap();
    let bad_plugin = (bad_digest, bad_size, sign(&bad, &signer_key));

    let port = free_port().unwrap();
    let gateway = format!("https://127.0.0.1:{port}");
    let operator = fleet::spawn_operator(
        cp.kubeconfig_path(),
        &pki,
        &fleet::OperatorSpec {
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
        digest,
        size,
        signer_public,
        bundle,
        plugin_digest,
        plugin_size,
        plugin_uri: format!("{plugin_host}/pii_redact.wasm"),
        plugin_bundle,
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
    let child = fleet::spawn_agent(&fleet::AgentSpec {
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

fn manifest(s: &Setup, bundle: &str, context: i32, pause: i32) -> Value {
    json!({
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "smollm2", "namespace": NS},
        "spec": {
            "servedName": "smollm2",
            "artifact": {"uri": "https://artifacts.example/smollm2.gguf", "digest": s.digest, "sizeBytes": s.size},
            "signature": {"inline": bundle},
            "signers": [{"name": "models-team", "publicKey": s.signer_public}],
            "selector": {"matchLabels": {"edgefleet.io/pool": "e2e"}},
            "attestation": {"teeKinds": ["dev"], "policy": "dev"},
            "rollout": {
                "steps": [{"count": 1, "pauseSeconds": pause}, {"percent": 100}],
                "maxUnavailable": 1,
                "healthGates": {"readyTimeoutSeconds": 120, "rollbackOnFailure": true},
            },
            "runtime": {"contextSize": context, "threads": 1, "parallelSlots": 1},
            "plugins": [{
                "name": "pii-redact",
                "artifact": {"uri": s.plugin_uri, "digest": s.plugin_digest, "sizeBytes": s.plugin_size},
                "signature": {"inline": s.plugin_bundle},
                "limits": {"deadlineMillis": 200, "memoryBytes": 33554432},
            }],
        }
    })
}

/// The manifest with the socket-importing plugin added to the chain.
fn manifest_with_bad_plugin(s: &Setup, context: i32) -> Value {
    let mut m = manifest(s, &s.bundle, context, 0);
    let (digest, size, bundle) = &s.bad_plugin;
    m["spec"]["plugins"].as_array_mut().unwrap().push(json!({
        "name": "hostile-net",
        "artifact": {"uri": "https://artifacts.example/hostile_net.wasm", "digest": digest, "sizeBytes": size},
        "signature": {"inline": bundle},
        "limits": {"deadlineMillis": 200, "memoryBytes": 33554432},
    }));
    m
}

async fn apply(client: &Client, m: &Value) {
    Api::<EdgeModel>::namespaced(client.clone(), NS)
        .patch(
            "smollm2",
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(m),
        )
        .await
        .unwrap();
}

async fn eventually<T, F, Fut>(s: &Setup, what: &str, secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = std::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if started.elapsed() > Duration::from_secs(secs) {
            let logs: String = ["operator", "dev-1", "dev-2", "dev-3"]
                .iter()
                .map(|n| {
                    let text = std::fs::read_to_string(s.dir.path().join(format!("{n}.log")))
                        .unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(25).collect();
                    format!(
                        "--- {n}\n{}\n",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                })
                .collect();
            let state =
                s.cp.kubectl()
                    .args(["get", "em,ed", "-A", "-o", "yaml"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
            let state: String = state
                .lines()
                .filter(|l| {
                    !l.contains("inline:") && !l.trim_start().starts_with('"') && l.len() < 200
                })
                .collect::<Vec<_>>()
                .join("\n");
            panic!("timed out waiting for {what}\n{logs}\n{state}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn model(client: &Client) -> Option<EdgeModel> {
    Api::<EdgeModel>::namespaced(client.clone(), NS)
        .get_opt("smollm2")
        .await
        .unwrap()
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
    eventually(&s, "three enrolled, attested devices", 60, || async {
        let ds = devices(c).await;
        let ok = ds.len() == 3
            && ds.iter().all(|d| {
                d.spec.approved
                    && edgefleet_operator::rollout::condition_true(d, "Attested")
                    && d.spec.facts.tee_kinds == vec![edgefleet_crds::TeeKind::Dev]
            });
        ok.then_some(())
    })
    .await;

    apply(c, &manifest(&s, &s.bundle, 1024, 0)).await;
    let rev1 = eventually(&s, "3/3 ready", 180, || async {
        let m = model(c).await?;
        let st = m.status?;
        (st.ready_devices.as_deref() == Some("3/3") && st.phase.as_deref() == Some("Available"))
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
        .join(s.plugin_digest.trim_start_matches("sha256:"));
    let meta = std::fs::symlink_metadata(&mirrored).unwrap();
    assert!(meta.is_file() && meta.len() == s.plugin_size, "{meta:?}");
    // The rollout plans on the reports in the gateway's memory; the device statuses
    // follow within the change budget.
    let want = vec![(rev1.clone(), "Ready".to_owned())];
    let ds = eventually(&s, "the statuses of all three say Ready", 30, || async {
        let ds = devices(c).await;
        ds.iter().all(|d| reported(d) == want).then_some(ds)
    })
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
        eventually(&s, &format!("{name} on one connection"), 30, || async {
            let out = std::process::Command::new("ss")
                .args(["-Htnp", "state", "established"])
                .arg(format!("dport = :{gateway_port}"))
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (text.lines().filter(|l| l.contains(&pid)).count() == 1).then_some(())
        })
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
        .get(artifact(&s.digest))
        .header("Range", "bytes=0-3")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status().as_u16(), 206);
    assert_eq!(
        head.headers()["content-range"].to_str().unwrap(),
        format!("bytes 0-3/{}", s.size)
    );
    assert_eq!(&head.bytes().await.unwrap()[..], b"GGUF");
    let unassigned = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(
        refusal(dev1.get(artifact(&unassigned)).send().await.unwrap()).await,
        (403, "NotAssigned".into())
    );
    // A certificate naming dev-1 from a CA the gateway does not trust: no handshake.
    let foreign_ca = fleet::Ca::new("somebody else's CA").unwrap();
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
    apply(c, &manifest(&s, &s.bundle, 1536, 4)).await;
    let rev2 = eventually(
        &s,
        "step 1: one device on the new revision",
        120,
        || async {
            let st = model(c).await?.status?;
            let rev = st.current_revision.clone()?;
            (rev != rev1 && st.devices.updated == 1 && st.current_step == Some(0)).then_some(rev)
        },
    )
    .await;
    eventually(&s, "the new revision on 3/3", 180, || async {
        let st = model(c).await?.status?;
        let done = st.ready_devices.as_deref() == Some("3/3")
            && st.stable_revision.as_deref() == Some(rev2.as_str())
            && st.current_step == Some(1);
        done.then_some(())
    })
    .await;
    let want = vec![(rev2.clone(), "Ready".to_owned())];
    eventually(
        &s,
        "the statuses say the new revision Ready",
        30,
        || async {
            devices(c)
                .await
                .iter()
                .all(|d| reported(d) == want)
                .then_some(())
        },
    )
    .await;

    // A revision its first device cannot load (a plugin importing sockets it is not
    // granted) fails that device's health gate: the rollout halts and moves it back.
    apply(c, &manifest_with_bad_plugin(&s, 1536)).await;
    let (reason, msg) = eventually(&s, "Degraded by the failed device", 120, || async {
        let st = model(c).await?.status?;
        st.conditions
            .iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()))
    })
    .await;
    assert_eq!(reason, "HealthGateFailed", "{msg}");
    eventually(
        &s,
        "every device back on the stable revision, Ready",
        60,
        || async {
            let ds = devices(c).await;
            let back = ds.iter().all(|d| {
                d.spec.desired_models.iter().all(|m| m.revision == rev2)
                    && reported(d) == vec![(rev2.clone(), "Ready".to_owned())]
            });
            back.then_some(())
        },
    )
    .await;
    let log = log_of(&s, "dev-1");
    assert!(
        log.contains("PluginRefused"),
        "dev-1 did not name the refusal:\n{log}"
    );
    let (code, _) = chat(s.agents[0].1).await;
    assert_eq!(code, 200, "dev-1 kept serving the stable revision");

    // A revision signed by a stranger halts with SignatureInvalid; devices keep rev2.
    let (stranger, _) = new_key();
    let bad = sign(&s.model, &stranger);
    apply(c, &manifest(&s, &bad, 2048, 0)).await;
    let (reason, msg) = eventually(&s, "SignatureVerified False", 60, || async {
        let st = model(c).await?.status?;
        st.conditions
            .iter()
            .find(|c| c.type_ == "SignatureVerified" && c.status == "False")
            .map(|c| (c.reason.clone(), c.message.clone()))
    })
    .await;
    assert_eq!(reason, "SignatureInvalid", "{msg}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for d in devices(c).await {
        assert_eq!(reported(&d), vec![(rev2.clone(), "Ready".to_owned())]);
        assert!(d.spec.desired_models.iter().all(|m| m.revision == rev2));
    }
    let (code, _) = chat(s.agents[0].1).await;
    assert_eq!(code, 200, "still serving the verified revision");

    // Deletion unloads everywhere, then releases the finalizer.
    Api::<EdgeModel>::namespaced(c.clone(), NS)
        .delete("smollm2", &DeleteParams::default())
        .await
        .unwrap();
    eventually(&s, "the EdgeModel gone", 90, || async {
        model(c).await.is_none().then_some(())
    })
    .await;
    // The finalizer is released on the reports in the gateway's memory; the statuses
    // follow.
    eventually(&s, "the statuses say nothing is loaded", 30, || async {
        devices(c)
            .await
            .iter()
            .all(|d| reported(d).is_empty())
            .then_some(())
    })
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
    apply(&c, &manifest(&s, &s.bundle, 1024, 0)).await;

    // Kill dev-3 in the middle of its download; it resumes where it stopped.
    let partial = s
        .dir
        .path()
        .join("dev-3/state/artifacts")
        .join(format!("{}.partial", &s.digest[7..]));
    let had = eventually(&s, "dev-3 part-way through its download", 180, || async {
        let n = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        (n > 8 << 20).then_some(n)
    })
    .await;
    let (_, port3, proc3) = s.agents.pop().unwrap();
    drop(proc3);
    assert!(had < s.size, "the download was complete already");
    net.shape(None);
    let (_, proc3) = start_agent_in(s.dir.path(), "dev-3", &gateway3, Some(port3), Some(&net));
    s.agents.push(("dev-3".into(), port3, proc3));
    let rev1 = eventually(&s, "3/3 ready", 180, || async {
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
                .join(&s.digest[7..])
        ),
        s.digest
    );

    // Partition dev-3: it goes NotReady after the lease, and keeps serving locally.
    net.link(false);
    let local = format!("http://127.0.0.1:{port3}/v1/chat/completions");
    eventually(&s, "dev-3 NotReady", 60, || async {
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
    eventually(&s, "dev-3 ready offline", 60, || async {
        (net.curl(&ready, None).0 == 200).then_some(())
    })
    .await;
    let (code, body) = net.curl(&local, Some(CHAT));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("Paris"), "{body}");
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Heal: it reconnects, delivers its spooled reports, and converges without
    // reloading the model it already runs.
    let before = log_of(&s, "dev-3").matches("activating").count();
    net.link(true);
    eventually(&s, "dev-3 Ready again with all its reports", 60, || async {
        let ds = devices(&c).await;
        let d = device_named(&ds, "dev-3");
        let r = d.status.as_ref()?.reports.clone()?;
        let ok = edgefleet_operator::rollout::condition_true(d, "Ready") && r.last_sequence >= 5;
        ok.then_some(r)
    })
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
