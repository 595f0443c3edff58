#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

//! Chaos: faults injected into a whole fleet (the real API server, the operator process
//! with its gateway, real agents serving the real SmolLM2 model), each scenario ending
//! with two checks. Convergence: the EdgeModel is `Available` with every device `Ready`
//! on the expected revision. And nothing lost or falsely judged: no `HealthGateFailed`
//! or `RolledBack` Event and no `failedRevision` when no device really failed, the
//! rollout of a revision never going backwards, and every device still `Attested` (its
//! attestation record allowed) and recording the model `Ready` in its status.
//!
//! 1. The operator is SIGKILLed between two rollout steps and started again: the
//!    rollout completes on the recorded step clock, no device reloads or goes
//!    `NotReady`, and the agents keep their gateway session (no new enrolment or
//!    attestation).
//!    1b. The same with no model states written to device statuses
//!    (`--status-change-per-second=0`): the agents re-report their states to the
//!    restarted gateway, so the leader judges no device falsely.
//! 2. The leader of two replicas dies mid-rollout: the other takes the lead and completes
//!    it, its devices move without ever going `NotReady`.
//! 3. The API server is SIGKILLed mid-rollout and started again on the same etcd, port
//!    and certificates: the leader exits (it cannot renew its Lease) and is restarted as
//!    a supervisor would, devices keep serving meanwhile, nothing stored is lost, no
//!    device goes `NotReady`, and the rollout completes.
//! 4. An agent is SIGKILLed in the middle of a (throttled) download and started again:
//!    it resumes from its `.partial` file, byte for byte where it stopped.
//! 5. An agent is SIGKILLed while loading a new revision: restarted, it serves its
//!    last-known-good from disk at once, then converges to the new revision.
//! 6. Torn files in an agent's state directory (a crash's `.agent-key.pem.*.partial`
//!    aside file, a truncated `active.json`, a truncated report spool): ignored with a
//!    warning; the agent attests with its own key and converges without downloading.
//! 7. A device cut off in its network namespace keeps serving, a new revision is rolled
//!    out meanwhile (the offline device is passed over, not failed), and after the heal it
//!    converges to it with none of its reports lost.
//! 8. A device whose disk (a tmpfs state directory) is too small for the model: only
//!    that device is failed, by name (`StateDirectory: No space left on device`); given
//!    room and restarted, it resumes its partial download and the revision resumes.
//! 9. A device's wall clock jumps two days forward (libfaketime; the monotonic and boot
//!    clocks go on, as when NTP steps a clock) with an attestation lease of 30 s: it
//!    serves without a gap (its lease runs on the boot clock), attests again without
//!    looping on results that look expired to it, converges to a new revision, and,
//!    restarted with the clock still ahead, serves again once it has attested.
//!
//! Each test runs the control plane, one or two operator processes and up to three
//! agents: like `fleet_e2e`, they are in nextest's `fleet` test group
//! (`.config/nextest.toml`) so that on a 2-core machine they run one at a time. They need root (network namespaces, tc, tmpfs), as
//! `fleet_e2e` does.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgefleet_agent::activation::store::{artifacts_dir, last_known_good_path, previous_path};
use edgefleet_crds::conditions::{self as cond, reasons};
use edgefleet_crds::device::ModelState;
use edgefleet_crds::{EdgeDevice, EdgeModel, EdgeModelStatus, ModelPhase};
use edgefleet_e2e::builders::{
    EdgeModelBuilder, SignedArtifact, Signer, allow_all_pools, apply_edge_model, assigned_revision,
    trust_signers_of,
};
use edgefleet_e2e::local_fleet::{self, Proc};
use edgefleet_e2e::netns::Netns;
use edgefleet_e2e::wait::eventually;
use edgefleet_e2e::{ControlPlane, cache_dir, free_port};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::Api;
use serde_json::{Value, json};

const NS: &str = "fleet";
const MODEL: &str = "smollm2";
const POOL: &str = "chaos";
/// Where the operator's Leases live.
const SYSTEM_NS: &str = "edgefleet-system";
/// The ready timeout of the health gates: generous, since on a loaded 2-core machine a
/// load can be slow, and these tests are about false judgements, not slow devices.
const READY_TIMEOUT: i32 = 300;
/// How long devices may take to enrol, attest and turn Ready.
const ENROL: Duration = Duration::from_secs(90);
/// How long a rollout (downloads, loads, pauses) may take.
const ROLLOUT: Duration = Duration::from_secs(150);
/// How long what follows at once (a status write, a log line) may take.
const SHORT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;
const CHAT: &str = r#"{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":8,"temperature":0}"#;

/// `Netns::create` names its namespace after this process: under `cargo test` (one
/// process, tests on threads) two scenarios would make the same one. nextest runs each
/// test in a process of its own; this lock keeps `cargo test` working too.
static NETNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn model_file() -> PathBuf {
    std::env::var_os("EDGEFLEET_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// The model's key in device reports, `namespace/name`.
fn key() -> String {
    format!("{NS}/{MODEL}")
}

/// `spec.rollout`: `steps`, `maxUnavailable`, and the health gates (a ready timeout;
/// rollback or not).
fn rollout(steps: Value, max_unavailable: i32, rollback: bool, ready_timeout: i32) -> Value {
    json!({
        "steps": steps,
        "maxUnavailable": max_unavailable,
        "healthGates": {"readyTimeoutSeconds": ready_timeout, "rollbackOnFailure": rollback},
    })
}

/// One operator replica: its identity, its gateway's port (kept across restarts), how
/// many times it was started (each start logs to `<identity>-<n>.log`).
struct Replica {
    identity: String,
    port: u16,
    starts: usize,
    proc_: Option<Proc>,
}

/// One agent: its API port, network namespace and environment, kept across restarts.
struct Agent {
    port: u16,
    netns: Option<String>,
    env: Vec<(String, String)>,
    proc_: Option<Proc>,
}

/// How to start a [`Fleet`].
struct Options<'a> {
    /// Operator replicas, by identity; the first leads.
    replicas: &'a [&'a str],
    /// The namespace some agents run in (the gateways then listen on every address).
    netns: Option<&'a Netns>,
    /// `--heartbeat-lease-seconds`.
    lease_seconds: u64,
    /// More operator arguments.
    extra: &'a [&'a str],
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            replicas: &["op-1"],
            netns: None,
            lease_seconds: 8,
            extra: &[],
        }
    }
}

/// A control plane, its operator replicas and agents, the signed model; the processes
/// are killed and the files removed when dropped, and a failing test shows every log's
/// end and the resources beside its panic message.
struct Fleet {
    // Field order is drop order: processes first, then the control plane, then files.
    replicas: Vec<Replica>,
    agents: BTreeMap<String, Agent>,
    /// The API server started again by scenario 3 (the harness has no restart): held
    /// only to be killed last but one, before the control plane.
    _apiserver: Option<Proc>,
    client: Client,
    cp: ControlPlane,
    pki: local_fleet::GatewayPki,
    artifact: SignedArtifact,
    signer: Signer,
    /// The host's address as agents in the namespace reach it.
    netns_host: Option<String>,
    lease_seconds: u64,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|r| {
                r.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        for path in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            eprintln!("--- {}\n{}", path.display(), tail(&text, 30));
        }
        eprintln!("{}", self.cp.log_tails());
        let state = self
            .cp
            .kubectl()
            .args(["get", "em,ed", "-A", "-o", "yaml", "--request-timeout=10s"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let state: Vec<&str> = state
            .lines()
            .filter(|l| !l.contains("inline:") && !l.trim_start().starts_with('"') && l.len() < 200)
            .collect();
        eprintln!("{}", state.join("\n"));
    }
}

impl Fleet {
    /// The control plane with the CRDs, a pool token and a policy binding every pool to
    /// every namespace; the signed model in the artifact store; the replicas started in
    /// order (the first leading before the next starts), each gateway listening. No
    /// agent yet.
    async fn start(o: Options<'_>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cp = ControlPlane::start().await.expect("control plane starts");
        cp.install_crds().await.expect("CRDs install");
        let client = cp.client().await.unwrap();
        allow_all_pools(&client).await.unwrap();
        local_fleet::create_pool_token(&client, POOL).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let netns_host = o.netns.map(|n| n.host_ip.clone());
        let extra_ips: Vec<String> = netns_host.iter().cloned().collect();
        let pki = local_fleet::GatewayPki::write(d, &extra_ips).unwrap();
        let model = model_file();
        let (digest, size) = local_fleet::store_artifact(&d.join("artifacts"), &model).unwrap();
        let signer = Signer::generate().unwrap();
        let artifact = SignedArtifact {
            digest,
            size,
            bundle: signer.sign(&model).unwrap(),
        };
        let replicas = o
            .replicas
            .iter()
            .map(|identity| Replica {
                identity: (*identity).to_owned(),
                port: free_port().unwrap(),
                starts: 0,
                proc_: None,
            })
            .collect();
        let mut fleet = Self {
            replicas,
            agents: BTreeMap::new(),
            _apiserver: None,
            client,
            cp,
            pki,
            artifact,
            signer,
            netns_host,
            lease_seconds: o.lease_seconds,
            extra: o.extra.iter().map(|e| (*e).to_owned()).collect(),
            dir,
        };
        for i in 0..fleet.replicas.len() {
            fleet.start_replica(i);
            if i == 0 {
                let first = fleet.replicas[0].identity.clone();
                eventually(&format!("{first} leading"), ENROL, || async {
                    (lease_holder(&fleet.client).await? == first).then_some(())
                })
                .await;
            }
            let port = fleet.replicas[i].port;
            eventually("the gateway listening", ENROL, || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            })
            .await;
        }
        fleet
    }

    /// Starts replica `i` (again): the same identity and gateway port, a new log.
    fn start_replica(&mut self, i: usize) {
        let d = self.dir.path();
        let r = &mut self.replicas[i];
        r.starts += 1;
        let host = if self.netns_host.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        let mut owned = vec![format!("--identity={}", r.identity)];
        owned.extend(self.extra.iter().cloned());
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        let child = local_fleet::spawn_operator_with(
            self.cp.kubeconfig_path(),
            &self.pki,
            &local_fleet::OperatorSpec {
                gateway_addr: format!("{host}:{}", r.port),
                artifact_dir: d.join("artifacts"),
                approval: format!("auto:{}={POOL}", local_fleet::POOL_LABEL),
                ek_cas: vec![],
                ek_intermediates: vec![],
                heartbeat_lease_seconds: self.lease_seconds,
                artifact_ca: None,
                log: d.join(format!("{}-{}.log", r.identity, r.starts)),
            },
            &args,
        )
        .unwrap();
        r.proc_ = Some(Proc(child));
    }

    /// SIGKILLs replica `i` and reaps it.
    fn kill_replica(&mut self, i: usize) {
        drop(self.replicas[i].proc_.take());
    }

    /// The log of replica `i`'s latest start.
    fn replica_log(&self, i: usize) -> String {
        let r = &self.replicas[i];
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}-{}.log", r.identity, r.starts)),
        )
        .unwrap_or_default()
    }

    /// Every replica's gateway URL, in order, as an agent (in the namespace or not)
    /// reaches it.
    fn gateways(&self, in_netns: bool) -> Vec<String> {
        let host = match (&self.netns_host, in_netns) {
            (Some(h), true) => h.as_str(),
            _ => "127.0.0.1",
        };
        self.replicas
            .iter()
            .map(|r| format!("https://{host}:{}", r.port))
            .collect()
    }

    /// Starts agent `name` (in `netns` when given), listing every replica.
    fn start_agent(&mut self, name: &str, netns: Option<&Netns>) {
        let port = free_port().unwrap();
        self.spawn_agent(name, port, netns.map(|n| n.name.clone()), Vec::new());
    }

    /// Starts agent `name` with `env` set (kept across its restarts).
    fn start_agent_with_env(&mut self, name: &str, env: Vec<(String, String)>) {
        let port = free_port().unwrap();
        self.spawn_agent(name, port, None, env);
    }

    fn spawn_agent(
        &mut self,
        name: &str,
        port: u16,
        netns: Option<String>,
        env: Vec<(String, String)>,
    ) {
        let urls = self.gateways(netns.is_some());
        let d = self.dir.path();
        let spec = local_fleet::AgentSpec {
            name: name.to_owned(),
            dir: d.join(name),
            gateway: urls[0].clone(),
            gateway_ca: d.join("gw-ca.crt"),
            port,
            tee: "dev".into(),
            tcti: None,
            netns: netns.clone(),
            pool: POOL.into(),
            log: d.join(format!("{name}.log")),
        };
        let child = local_fleet::spawn_agent_with_env(&spec, &urls[1..], &env).unwrap();
        self.agents.insert(
            name.to_owned(),
            Agent {
                port,
                netns,
                env,
                proc_: Some(Proc(child)),
            },
        );
    }

    /// SIGKILLs agent `name` and reaps it.
    fn kill_agent(&mut self, name: &str) {
        drop(self.agents.get_mut(name).unwrap().proc_.take());
    }

    /// Kills agent `name` if it runs, and starts it again: the same configuration, state
    /// directory, port and network.
    fn restart_agent(&mut self, name: &str) {
        self.kill_agent(name);
        let (port, netns, env) = {
            let a = &self.agents[name];
            (a.port, a.netns.clone(), a.env.clone())
        };
        self.spawn_agent(name, port, netns, env);
    }

    fn names(&self) -> Vec<String> {
        self.agents.keys().cloned().collect()
    }

    fn state_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name).join("state")
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Agent `name`'s log, every start of it (appended to).
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    fn log_len(&self, name: &str) -> usize {
        self.log(name).len()
    }

    /// What agent `name` logged after byte `from`.
    fn log_since(&self, name: &str, from: usize) -> String {
        self.log(name).get(from..).unwrap_or_default().to_owned()
    }

    /// GET (or POST `body` to) `path` on agent `name`'s API, from inside its network:
    /// (status, body); status 0 when nothing answered.
    async fn http(&self, name: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let a = &self.agents[name];
        let mut c = match &a.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns.as_str(), "curl"]);
                c
            }
            None => tokio::process::Command::new("curl"),
        };
        c.args(["-s", "-m", "60", "-w", "\n%{http_code}"]);
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "-d", b]);
        }
        let out = c
            .arg(format!("http://127.0.0.1:{}{path}", a.port))
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    async fn chat(&self, name: &str) -> (u16, String) {
        self.http(name, "/v1/chat/completions", Some(CHAT)).await
    }

    /// Whether agent `name` serves a model (`/readyz` 200).
    async fn serving(&self, name: &str) -> bool {
        self.http(name, "/readyz", None).await.0 == 200
    }

    /// Applies the model for the pool's dev devices, with the context size `context`
    /// (a different size is a new revision of the same artifact) and `rollout`; its
    /// signer trusted first.
    async fn apply(&self, context: i32, rollout: Value) {
        let manifest = EdgeModelBuilder::new(NS, MODEL)
            .artifact(
                "https://artifacts.example/smollm2.gguf",
                &self.artifact.digest,
                Some(self.artifact.size),
            )
            .inline_signature(&self.artifact.bundle)
            .signer("models-team", &self.signer.public_key)
            .pool(POOL)
            .attestation(&["dev"], Some("dev"))
            .rollout(rollout)
            .runtime(json!({"contextSize": context, "threads": 1, "parallelSlots": 1}))
            .build();
        trust_signers_of(&self.client, &manifest).await.unwrap();
        apply_edge_model(&self.client, &manifest).await.unwrap();
    }

    /// Waits until every agent's device is enrolled, approved, attested and Ready.
    async fn wait_enrolled(&self) {
        let names = self.names();
        eventually(
            "every device enrolled, approved, attested and Ready",
            ENROL,
            || async {
                for name in &names {
                    let d = device(&self.client, name).await?;
                    (d.spec.approved && ready(&d) && attested(&d)).then_some(())?;
                }
                Some(())
            },
        )
        .await;
    }

    /// The device the rollout reaches first (the lowest rank for the model).
    async fn canary(&self) -> String {
        let uid = model(&self.client)
            .await
            .and_then(|m| m.metadata.uid)
            .unwrap();
        self.names()
            .into_iter()
            .min_by_key(|n| edgefleet_crds::model::device_rank(&uid, n))
            .unwrap()
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// The model, or `None` when missing or when the API server does not answer.
async fn model(c: &Client) -> Option<EdgeModel> {
    Api::<EdgeModel>::namespaced(c.clone(), NS)
        .get_opt(MODEL)
        .await
        .ok()
        .flatten()
}

async fn status(c: &Client) -> Option<EdgeModelStatus> {
    model(c).await?.status
}

async fn device(c: &Client, name: &str) -> Option<EdgeDevice> {
    Api::<EdgeDevice>::all(c.clone())
        .get_opt(name)
        .await
        .ok()
        .flatten()
}

fn ready(d: &EdgeDevice) -> bool {
    edgefleet_operator::rollout::condition_true(d, cond::READY)
}

/// `Attested`, with an allowed attestation record in its status.
fn attested(d: &EdgeDevice) -> bool {
    edgefleet_operator::rollout::condition_true(d, cond::ATTESTED)
        && d.status
            .as_ref()
            .and_then(|s| s.attestation.as_ref())
            .is_some_and(|a| a.allowed)
}

/// The Ready condition of `d`: (status, lastTransitionTime).
fn ready_since(d: &EdgeDevice) -> Option<(String, String)> {
    let c = d
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == cond::READY)?;
    Some((c.status.clone(), c.last_transition_time.0.to_string()))
}

/// The replica `d` reports to.
fn gateway_of(d: &EdgeDevice) -> Option<String> {
    d.status.as_ref()?.gateway.clone()
}

/// Each device's Ready condition (status, lastTransitionTime): unchanged between two
/// reads, no device was marked not ready in between.
async fn ready_sinces(c: &Client, names: &[String]) -> BTreeMap<String, Option<(String, String)>> {
    let mut out = BTreeMap::new();
    for name in names {
        out.insert(
            name.clone(),
            device(c, name).await.as_ref().and_then(ready_since),
        );
    }
    out
}

/// The model states `d`'s status records: (model, revision, state).
fn reported(d: &EdgeDevice) -> Vec<(String, String, String)> {
    d.status
        .as_ref()
        .map(|s| {
            s.models
                .iter()
                .map(|m| {
                    (
                        m.model.clone(),
                        m.revision.clone(),
                        format!("{:?}", m.state),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What a device serving `rev` of the model records.
fn serving_on(rev: &str) -> Vec<(String, String, String)> {
    vec![(key(), rev.to_owned(), "Ready".to_owned())]
}

async fn lease_holder(c: &Client) -> Option<String> {
    Api::<Lease>::namespaced(c.clone(), SYSTEM_NS)
        .get_opt(edgefleet_operator::leader::LEASE_NAME)
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// The notes of the Events with `reason` published on the model.
async fn events(c: &Client, reason: &str) -> Vec<String> {
    Api::<Event>::namespaced(c.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(MODEL)
                && e.reason.as_deref() == Some(reason)
        })
        .map(|e| e.note.unwrap_or_default())
        .collect()
}

/// What the status says was judged failed: a failed revision, a Degraded condition
/// (only a failed gate sets it).
fn judged_failed(st: &EdgeModelStatus) -> Option<String> {
    if let Some(rev) = &st.failed_revision {
        return Some(format!("revision {rev} marked failed"));
    }
    st.conditions
        .iter()
        .find(|c| c.type_ == cond::DEGRADED && c.status == "True")
        .map(|c| format!("Degraded {}: {}", c.reason, c.message))
}

/// Waits until the model is Available with `n`/`n` devices ready on its stable
/// revision, which it returns. Fails at once, not at the timeout, on what a false
/// judgement leaves: a failed revision, a Degraded condition, or the step or rank of a
/// revision going backwards.
async fn converged(c: &Client, n: usize, within: Duration) -> String {
    let want = format!("{n}/{n}");
    let seen: RefCell<Option<(String, i32, i64)>> = RefCell::new(None);
    eventually(
        &format!("Available, {want} ready on the stable revision"),
        within,
        || async {
            let st = status(c).await?;
            if let Some(why) = judged_failed(&st) {
                panic!("judged failed although no device failed: {why}");
            }
            if let Some(rev) = st.current_revision.clone() {
                let (step, rank) = (st.current_step.unwrap_or(0), st.rollout_rank.unwrap_or(0));
                let mut seen = seen.borrow_mut();
                if let Some((r, s, k)) = seen.as_ref()
                    && *r == rev
                {
                    assert!(
                        step >= *s && rank >= *k,
                        "{rev} went backwards: step {s} -> {step}, rank {k} -> {rank}"
                    );
                }
                *seen = Some((rev, step, rank));
            }
            let done = st.phase == Some(ModelPhase::Available)
                && st.ready_devices.as_deref() == Some(want.as_str())
                && st.stable_revision.is_some()
                && st.stable_revision == st.current_revision;
            if done { st.stable_revision } else { None }
        },
    )
    .await
}

/// No gate failed and nothing was rolled back: no such Event, no failed revision, not
/// Degraded.
async fn no_false_gate(c: &Client) {
    for reason in [reasons::HEALTH_GATE_FAILED, reasons::ROLLED_BACK] {
        let notes = events(c, reason).await;
        assert!(
            notes.is_empty(),
            "{reason} published although no device failed: {notes:?}"
        );
    }
    let st = status(c).await.expect("the model's status");
    assert_eq!(judged_failed(&st), None);
}

/// Every device in `names` Ready, attested (an allowed record), deriving `rev`, and
/// (when `recorded`: model states are written to statuses) recording the model Ready on
/// `rev`.
async fn devices_settled(c: &Client, names: &[String], rev: &str, recorded: bool) {
    let want = serving_on(rev);
    eventually(
        &format!("every device Ready, attested, recording {MODEL} Ready on {rev}"),
        SHORT,
        || async {
            for name in names {
                let d = device(c, name).await?;
                (ready(&d) && attested(&d) && (!recorded || reported(&d) == want)).then_some(())?;
            }
            Some(())
        },
    )
    .await;
    for name in names {
        assert_eq!(
            assigned_revision(c, NS, MODEL, name).await.as_deref(),
            Some(rev),
            "{name}"
        );
    }
}

/// Waits until the first step is done (one device updated and ready on the current
/// revision, the step not yet moved on: its pause runs) and, when `recorded`, until
/// `canary`'s status records it; returns the revision.
async fn first_step_done(c: &Client, canary: &str, recorded: bool) -> String {
    eventually(
        &format!("the first step done: {canary} Ready on the revision, the pause running"),
        ROLLOUT,
        || async {
            let st = status(c).await?;
            let rev = st.current_revision.clone()?;
            (st.current_step == Some(0) && st.devices.updated == 1 && st.devices.ready == 1)
                .then_some(())?;
            if recorded {
                (reported(&device(c, canary).await?) == serving_on(&rev)).then_some(())?;
            }
            Some(rev)
        },
    )
    .await
}

/// Waits until `name`'s status shows a new agent process (a report boot other than
/// `old_boot`) recording the model Ready on `rev`.
async fn reporting_again(c: &Client, name: &str, old_boot: &str, rev: &str) {
    eventually(
        &format!("{name}'s new process reporting {MODEL} Ready on {rev}"),
        ROLLOUT,
        || async {
            let d = device(c, name).await?;
            let boot = d.status.as_ref()?.reports.as_ref()?.boot.clone();
            (boot != old_boot && reported(&d) == serving_on(rev)).then_some(())
        },
    )
    .await;
}

fn boot_of(d: &EdgeDevice) -> String {
    d.status
        .as_ref()
        .and_then(|s| s.reports.as_ref())
        .map(|r| r.boot.clone())
        .unwrap()
}

/// Polls `path` every 10 ms (a kill has to land inside a short phase) until what was
/// written after byte `from` contains `needle`.
async fn until_logged(path: &Path, from: usize, needle: &str, within: Duration) {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.get(from..).is_some_and(|t| t.contains(needle)) {
            return;
        }
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {needle:?} in {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The revision a model record (`active.json`, `previous.json`) names, if it parses.
fn record_revision(path: &Path) -> Option<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v["revision"].as_str().map(str::to_owned)
}

fn lkg_revision(state: &Path) -> Option<String> {
    record_revision(&last_known_good_path(state))
}

/// Where the agent's "resuming download" line says it resumed (`from=<bytes>`).
fn resumed_from(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("resuming download"))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("from="))?
        .parse()
        .ok()
}

// --- 1. The operator killed between steps --------------------------------------------

/// Scenario 1 (and 1b, with `zero_budget`: no model state is ever written to a device
/// status, so that a restarted operator knows only what devices report to it).
async fn operator_killed_between_steps(zero_budget: bool) {
    let extra: &[&str] = if zero_budget {
        &["--status-change-per-second=0"]
    } else {
        &[]
    };
    let mut f = Fleet::start(Options {
        extra,
        ..Options::default()
    })
    .await;
    for name in ["till-1", "till-2", "till-3"] {
        f.start_agent(name, None);
    }
    f.wait_enrolled().await;
    // 1b's gate is short, so that a false one shows within the test.
    let ready_timeout = if zero_budget { 40 } else { READY_TIMEOUT };
    f.apply(
        512,
        rollout(
            json!([{"count": 1, "pauseSeconds": 20}, {"percent": 100}]),
            1,
            true,
            ready_timeout,
        ),
    )
    .await;
    let canary = f.canary().await;
    let rev = first_step_done(&f.client, &canary, !zero_budget).await;
    let others: Vec<String> = f.names().into_iter().filter(|n| *n != canary).collect();
    for other in &others {
        assert_eq!(
            assigned_revision(&f.client, NS, MODEL, other).await,
            None,
            "{other} got the revision before the second step"
        );
    }
    let activations = count(&f.log(&canary), "converge: activating");
    let sessions: BTreeMap<String, usize> = f
        .names()
        .into_iter()
        .map(|n| {
            let s = count(&f.log(&n), "connected to the gateway");
            (n, s)
        })
        .collect();
    let offsets: BTreeMap<String, usize> = f
        .names()
        .into_iter()
        .map(|n| {
            let at = f.log_len(&n);
            (n, at)
        })
        .collect();
    let ready_before = ready_sinces(&f.client, &f.names()).await;

    // SIGKILL in the pause between the steps. Every agent notices its gateway is gone,
    // and keeps its session; nothing moves the rollout meanwhile.
    f.kill_replica(0);
    for (name, from) in &offsets {
        eventually(
            &format!("{name} noticing its gateway is gone"),
            SHORT,
            || async {
                f.log_since(name, *from)
                    .contains("gateway unreachable; keeping the session")
                    .then_some(())
            },
        )
        .await;
    }
    for other in &others {
        assert_eq!(
            assigned_revision(&f.client, NS, MODEL, other).await,
            None,
            "the rollout moved with no operator running"
        );
    }
    let (code, body) = f.chat(&canary).await;
    assert_eq!(
        code, 200,
        "{canary} stopped serving with no gateway: {body}"
    );

    // Started again (same identity, same gateway address), it completes the rollout on
    // the recorded step and its clock.
    f.start_replica(0);
    let stable = converged(&f.client, 3, ROLLOUT).await;
    assert_eq!(stable, rev);
    no_false_gate(&f.client).await;
    devices_settled(&f.client, &f.names(), &rev, !zero_budget).await;
    // A new leader gives every device a heartbeat lease to reach it (heartbeat.rs): none
    // was marked not ready for the operator's absence.
    assert_eq!(
        ready_sinces(&f.client, &f.names()).await,
        ready_before,
        "a device went not ready across the operator restart"
    );
    assert_eq!(
        count(&f.log(&canary), "converge: activating"),
        activations,
        "{canary} reloaded the revision it already ran"
    );
    // A gateway that stops answering is a passing trouble: no device enrolled or
    // attested again (each costs API writes, and a fleet doing it at once is a storm).
    for (name, before) in &sessions {
        assert_eq!(
            count(&f.log(name), "connected to the gateway"),
            *before,
            "{name} attested again across the operator restart"
        );
    }
    for name in f.names() {
        let (code, body) = f.chat(&name).await;
        assert_eq!(code, 200, "{name}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_between_steps_completes_the_rollout_without_a_false_gate() {
    operator_killed_between_steps(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_between_steps_without_model_status_writes_judges_no_device_falsely() {
    operator_killed_between_steps(true).await;
}

// --- 2. Leader failover mid-rollout ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_failover_mid_rollout_completes_it_with_no_false_gate_and_no_device_not_ready() {
    let lease = 10u64;
    let mut f = Fleet::start(Options {
        replicas: &["op-a", "op-b"],
        lease_seconds: lease,
        ..Options::default()
    })
    .await;
    // Two devices start at op-a (the leader), one at op-b (where a device starts in its
    // list is a hash of its name).
    let (mut at_a, mut at_b) = (Vec::new(), Vec::new());
    for i in 0..64 {
        let name = format!("till-{i}");
        match edgefleet_agent::gateway_session::first_endpoint(&name, 2) {
            0 if at_a.len() < 2 => at_a.push(name),
            1 if at_b.is_empty() => at_b.push(name),
            _ => {}
        }
    }
    assert_eq!((at_a.len(), at_b.len()), (2, 1));
    for name in at_a.iter().chain(&at_b) {
        f.start_agent(name, None);
    }
    f.wait_enrolled().await;
    eventually(
        "every device Ready at the replica it starts at",
        ENROL,
        || async {
            for (names, replica) in [(&at_a, "op-a"), (&at_b, "op-b")] {
                for name in names {
                    let d = device(&f.client, name).await?;
                    (gateway_of(&d).as_deref() == Some(replica)).then_some(())?;
                }
            }
            Some(())
        },
    )
    .await;
    f.apply(
        512,
        rollout(
            json!([{"count": 1, "pauseSeconds": 20}, {"percent": 100}]),
            1,
            true,
            READY_TIMEOUT,
        ),
    )
    .await;
    let canary = f.canary().await;
    let rev = first_step_done(&f.client, &canary, true).await;
    let activations = count(&f.log(&canary), "converge: activating");
    let ready_before = ready_sinces(&f.client, &f.names()).await;

    // The leader dies between the steps; op-b takes the Lease and the rollout.
    f.kill_replica(0);
    eventually("op-b leading", ROLLOUT, || async {
        (lease_holder(&f.client).await? == "op-b").then_some(())
    })
    .await;
    let stable = converged(&f.client, 3, ROLLOUT).await;
    assert_eq!(stable, rev);
    no_false_gate(&f.client).await;
    devices_settled(&f.client, &f.names(), &rev, true).await;
    eventually("every device at op-b", SHORT, || async {
        for name in f.names() {
            let d = device(&f.client, &name).await?;
            (gateway_of(&d).as_deref() == Some("op-b")).then_some(())?;
        }
        Some(())
    })
    .await;
    // op-a's presence runs out, and a heartbeat lease after that the leader has judged
    // the devices op-a held: none of them was ever marked not ready.
    let presence = edgefleet_operator::replicas::lease_name("op-a");
    eventually(
        "op-a's presence Lease run out a heartbeat lease ago",
        ROLLOUT,
        || async {
            let spec = Api::<Lease>::namespaced(f.client.clone(), SYSTEM_NS)
                .get_opt(&presence)
                .await
                .ok()??
                .spec?;
            let end = spec.renew_time?.0
                + SignedDuration::from_secs(i64::from(spec.lease_duration_seconds?))
                + SignedDuration::from_secs(i64::try_from(lease).unwrap());
            (Timestamp::now() > end).then_some(())
        },
    )
    .await;
    assert_eq!(
        ready_sinces(&f.client, &f.names()).await,
        ready_before,
        "a device went not ready when the leader died"
    );
    assert_eq!(
        count(&f.log(&canary), "converge: activating"),
        activations,
        "{canary} reloaded the revision it already ran to move replicas"
    );
}

// --- 3. API server restart ------------------------------------------------------------

/// The API server `cp` runs: a child of this process (the harness starts it, and offers
/// no way to stop it short of dropping the whole control plane), found by the port it
/// serves on. Returns its pid and command line, to start it again with.
fn apiserver_process(cp: &ControlPlane) -> (u32, Vec<String>) {
    let port = cp.server_url().rsplit(':').next().unwrap().to_owned();
    let flag = format!("--secure-port={port}");
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`: the fields after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(me) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.contains(&flag) {
            return (pid, argv);
        }
    }
    panic!("no child of this process serves {}", cp.server_url());
}

/// Starts the API server again with `argv`, the command line it had: the same etcd,
/// port and certificates (so the kubeconfigs stay good). Dies with this process, as the
/// harness's does.
fn start_apiserver(argv: &[String], log: &Path) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
        let mut c = Command::new("/usr/bin/setpriv");
        c.args(["--pdeathsig", "KILL", "--"]).arg(&argv[0]);
        c
    } else {
        Command::new(&argv[0])
    };
    let child = cmd
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Proc(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_restart_mid_rollout_loses_nothing_and_the_rollout_completes() {
    let mut f = Fleet::start(Options::default()).await;
    for name in ["till-1", "till-2"] {
        f.start_agent(name, None);
    }
    f.wait_enrolled().await;
    f.apply(
        512,
        rollout(
            json!([{"count": 1, "pauseSeconds": 20}, {"percent": 100}]),
            1,
            true,
            READY_TIMEOUT,
        ),
    )
    .await;
    let canary = f.canary().await;
    let rev = first_step_done(&f.client, &canary, true).await;
    let model_uid = model(&f.client).await.unwrap().metadata.uid;
    let mut stored = BTreeMap::new();
    for name in f.names() {
        let d = device(&f.client, &name).await.unwrap();
        stored.insert(
            name,
            (
                d.metadata.uid.clone(),
                d.spec.facts.agent_key_fingerprint.clone(),
            ),
        );
    }
    let activations = count(&f.log(&canary), "converge: activating");
    let ready_before = ready_sinces(&f.client, &f.names()).await;

    // SIGKILL the API server (etcd stays).
    let (pid, argv) = apiserver_process(&f.cp);
    let api_port: u16 =
        f.cp.server_url()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    eventually("the API server gone", SHORT, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", api_port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // The leader cannot renew its Lease: it exits, as it must (leader.rs), so that its
    // supervisor restarts it as a candidate. Its gateway goes with it.
    let op = RefCell::new(f.replicas[0].proc_.take().unwrap());
    let exit = eventually(
        "the leader exiting for its unrenewable Lease",
        SHORT,
        || async { op.borrow_mut().0.try_wait().unwrap() },
    )
    .await;
    drop(op);
    assert!(!exit.success(), "{exit:?}");
    let log = f.replica_log(0);
    assert!(log.contains("operator lease"), "{log}");
    // The devices serve through all of it.
    let (code, body) = f.chat(&canary).await;
    assert_eq!(
        code, 200,
        "{canary} stopped serving while the control plane was down: {body}"
    );

    // The API server comes back on the same etcd, port and certificates...
    f._apiserver = Some(start_apiserver(
        &argv,
        &f.cp.dir().join("apiserver-restarted.log"),
    ));
    f.client = f.cp.client().await.unwrap();
    eventually(
        "the restarted API server serving the EdgeModel",
        ROLLOUT,
        || async { model(&f.client).await.map(|_| ()) },
    )
    .await;
    // ...with everything it stored: the same objects, the same enrolled keys.
    assert_eq!(model(&f.client).await.unwrap().metadata.uid, model_uid);
    for (name, (uid, fingerprint)) in &stored {
        let d = device(&f.client, name).await.unwrap();
        assert_eq!(&d.metadata.uid, uid, "{name} is another object");
        assert_eq!(&d.spec.facts.agent_key_fingerprint, fingerprint, "{name}");
    }
    // ...and the supervisor restarts the operator: the rollout completes.
    f.start_replica(0);
    let stable = converged(&f.client, 2, ROLLOUT).await;
    assert_eq!(stable, rev);
    no_false_gate(&f.client).await;
    devices_settled(&f.client, &f.names(), &rev, true).await;
    // The control plane was gone for longer than a heartbeat lease, but the restarted
    // leader counts silence from its own start (heartbeat.rs): no device went not ready.
    assert_eq!(
        ready_sinces(&f.client, &f.names()).await,
        ready_before,
        "a device went not ready across the control plane's restart"
    );
    assert_eq!(
        count(&f.log(&canary), "converge: activating"),
        activations,
        "{canary} reloaded the revision it already ran"
    );
    for name in f.names() {
        let (code, body) = f.chat(&name).await;
        assert_eq!(code, 200, "{name}: {body}");
    }
}

// --- 4. Agent killed mid-download -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_download_resumes_from_its_partial_file_and_converges() {
    let _one_netns = NETNS.lock().await;
    let net = Netns::create();
    // dev-b's downloads crawl, so that it can be killed in the middle of one.
    net.shape(Some("40mbit"));
    let mut f = Fleet::start(Options {
        netns: Some(&net),
        ..Options::default()
    })
    .await;
    f.start_agent("dev-a", None);
    f.start_agent("dev-b", Some(&net));
    f.wait_enrolled().await;
    f.apply(
        512,
        rollout(json!([{"percent": 100}]), 2, true, READY_TIMEOUT),
    )
    .await;
    let hex = f.artifact.digest.trim_start_matches("sha256:").to_owned();
    let store = artifacts_dir(&f.state_dir("dev-b"));
    let partial = store.join(format!("{hex}.partial"));
    let had = eventually("dev-b part-way through its download", ROLLOUT, || async {
        let n = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        (n > 8 * MIB).then_some(n)
    })
    .await;
    f.kill_agent("dev-b");
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(
        (had..f.artifact.size).contains(&kept),
        "the download was complete already ({kept} of {} bytes)",
        f.artifact.size
    );
    net.shape(None);
    let from = f.log_len("dev-b");
    f.restart_agent("dev-b");
    let rev = converged(&f.client, 2, ROLLOUT).await;
    let log = f.log_since("dev-b", from);
    assert_eq!(
        resumed_from(&log),
        Some(kept),
        "dev-b did not resume where its partial file ended:\n{log}"
    );
    assert!(!partial.exists(), "the partial file is gone once complete");
    assert_eq!(
        local_fleet::digest_of(&store.join(&hex)).unwrap(),
        f.artifact.digest
    );
    no_false_gate(&f.client).await;
    devices_settled(&f.client, &f.names(), &rev, true).await;
    for name in f.names() {
        let (code, body) = f.chat(&name).await;
        assert_eq!(code, 200, "{name}: {body}");
    }
}

// --- 5. Agent killed while loading ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_while_loading_serves_its_last_known_good_then_converges() {
    let mut f = Fleet::start(Options::default()).await;
    for name in ["till-1", "till-2"] {
        f.start_agent(name, None);
    }
    f.wait_enrolled().await;
    f.apply(
        512,
        rollout(json!([{"percent": 100}]), 2, true, READY_TIMEOUT),
    )
    .await;
    let rev1 = converged(&f.client, 2, ROLLOUT).await;
    for name in f.names() {
        let state = f.state_dir(&name);
        eventually(
            &format!("{name} recording {rev1} as last-known-good"),
            SHORT,
            || async { lkg_revision(&state).filter(|r| *r == rev1) },
        )
        .await;
    }

    // A new revision (another context size, the same artifact): the canary finds the
    // artifact on disk, verifies it, and goes Loading right after logging the
    // verification; it is killed there.
    let canary = f.canary().await;
    let from = f.log_len(&canary);
    f.apply(
        2048,
        rollout(
            json!([{"count": 1}, {"percent": 100}]),
            1,
            true,
            READY_TIMEOUT,
        ),
    )
    .await;
    until_logged(&f.log_path(&canary), from, "signature verified", ROLLOUT).await;
    f.kill_agent(&canary);
    let rev2 = status(&f.client).await.unwrap().current_revision.unwrap();
    assert_ne!(rev2, rev1);
    // The premise: the kill came before the new revision was recorded.
    assert_eq!(
        lkg_revision(&f.state_dir(&canary)).as_deref(),
        Some(rev1.as_str()),
        "the kill came after {canary} had loaded and recorded {rev2}: this machine loads \
         faster than the test can kill (see the notes at the end)"
    );

    // Restarted: it serves its last-known-good from disk at once, then converges.
    let restarted = f.log_len(&canary);
    f.restart_agent(&canary);
    eventually(
        &format!("{canary} restoring its last-known-good"),
        SHORT,
        || async {
            f.log_since(&canary, restarted)
                .contains("restoring the last-known-good model")
                .then_some(())
        },
    )
    .await;
    let stable = converged(&f.client, 2, ROLLOUT).await;
    assert_eq!(stable, rev2);
    no_false_gate(&f.client).await;
    devices_settled(&f.client, &f.names(), &rev2, true).await;
    let state = f.state_dir(&canary);
    assert_eq!(lkg_revision(&state).as_deref(), Some(rev2.as_str()));
    assert_eq!(
        record_revision(&previous_path(&state)).as_deref(),
        Some(rev1.as_str()),
        "the revision to roll back to without a download"
    );
    for name in f.names() {
        let (code, body) = f.chat(&name).await;
        assert_eq!(code, 200, "{name}: {body}");
    }
}

// --- 6. Torn files in the state directory ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_files_in_the_state_directory_are_ignored_and_the_agent_attests_with_its_own_key() {
    let mut f = Fleet::start(Options::default()).await;
    f.start_agent("till-1", None);
    f.wait_enrolled().await;
    f.apply(
        512,
        rollout(json!([{"percent": 100}]), 1, true, READY_TIMEOUT),
    )
    .await;
    let rev = converged(&f.client, 1, ROLLOUT).await;
    let state = f.state_dir("till-1");
    eventually("the last-known-good recorded", SHORT, || async {
        lkg_revision(&state).filter(|r| *r == rev)
    })
    .await;
    let key_pem = std::fs::read(state.join("agent-key.pem")).unwrap();
    let before = device(&f.client, "till-1").await.unwrap();
    let fingerprint = before.spec.facts.agent_key_fingerprint.clone();
    let old_boot = boot_of(&before);
    let verified = before
        .status
        .as_ref()
        .and_then(|s| s.attestation.as_ref())
        .map(|a| a.verified_time.0)
        .unwrap();
    let artifact = artifacts_dir(&state).join(f.artifact.digest.trim_start_matches("sha256:"));
    let mtime = std::fs::metadata(&artifact).unwrap().modified().unwrap();

    // Killed, and its state directory as a crash on a filesystem that lost writes
    // leaves it: the aside file of a key write (durable.rs names it
    // `.<file>.<pid>.<n>.partial`) holding half a key, a torn last-known-good record and
    // its aside file, a torn report spool.
    f.kill_agent("till-1");
    let active = last_known_good_path(&state);
    let record = std::fs::read(&active).unwrap();
    std::fs::write(&active, &record[..record.len() / 2]).unwrap();
    std::fs::write(
        state.join(".agent-key.pem.1.0.partial"),
        &key_pem[..key_pem.len() / 2],
    )
    .unwrap();
    std::fs::write(
        state.join(".active.json.1.1.partial"),
        &record[..record.len() / 3],
    )
    .unwrap();
    // (`report-spool.json`: reports::SPOOL_FILE, not exported.)
    std::fs::write(state.join("report-spool.json"), br#"[{"seq":1,"boot":"01"#).unwrap();
    let from = f.log_len("till-1");
    f.restart_agent("till-1");
    reporting_again(&f.client, "till-1", &old_boot, &rev).await;
    let stable = converged(&f.client, 1, ROLLOUT).await;
    assert_eq!(stable, rev);

    let log = f.log_since("till-1", from);
    for line in [
        "unreadable last-known-good record; ignoring it",
        "SpoolUnreadable",
        "connected to the gateway",
        "converge: serving",
    ] {
        assert!(log.contains(line), "no {line:?} after the restart:\n{log}");
    }
    assert!(
        !log.contains("restoring the last-known-good model"),
        "a torn record was restored:\n{log}"
    );
    assert!(!log.contains("resuming download"), "{log}");
    // Its own key, untouched, is what it attested with (another key would be refused:
    // the device is enrolled with this one).
    assert_eq!(std::fs::read(state.join("agent-key.pem")).unwrap(), key_pem);
    let after = device(&f.client, "till-1").await.unwrap();
    assert_eq!(after.spec.facts.agent_key_fingerprint, fingerprint);
    let reattested = after
        .status
        .as_ref()
        .and_then(|s| s.attestation.as_ref())
        .map(|a| a.verified_time.0)
        .unwrap();
    assert!(
        reattested > verified,
        "not attested again after the restart"
    );
    // The artifact on disk was verified and reused, not downloaded again.
    assert_eq!(
        std::fs::metadata(&artifact).unwrap().modified().unwrap(),
        mtime
    );
    assert_eq!(lkg_revision(&state).as_deref(), Some(rev.as_str()));
    let r = after
        .status
        .as_ref()
        .and_then(|s| s.reports.clone())
        .unwrap();
    assert_eq!((r.missing, r.dropped), (0, 0), "{r:?}");
    no_false_gate(&f.client).await;
    devices_settled(&f.client, &f.names(), &rev, true).await;
    let (code, body) = f.chat("till-1").await;
    assert_eq!(code, 200, "{body}");
}

// --- 7. Partition, a new revision meanwhile, heal ---------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_device_keeps_serving_and_converges_to_the_revision_applied_while_away() {
    let _one_netns = NETNS.lock().await;
    let net = Netns::create();
    let mut f = Fleet::start(Options {
        netns: Some(&net),
        ..Options::default()
    })
    .await;
    f.start_agent("dev-a", None);
    f.start_agent("dev-b", Some(&net));
    f.wait_enrolled().await;
    f.apply(
        512,
        rollout(json!([{"percent": 100}]), 2, true, READY_TIMEOUT),
    )
    .await;
    let rev1 = converged(&f.client, 2, ROLLOUT).await;
    devices_settled(&f.client, &f.names(), &rev1, true).await;
    let seq_before = device(&f.client, "dev-b")
        .await
        .and_then(|d| d.status?.reports)
        .map_or(0, |r| r.last_sequence);

    // Cut off: NotReady once its heartbeat lease runs out (a true judgement), and still
    // serving its clients.
    net.link(false);
    eventually("dev-b NotReady", ROLLOUT, || async {
        (!ready(&device(&f.client, "dev-b").await?)).then_some(())
    })
    .await;
    let (code, body) = f.chat("dev-b").await;
    assert_eq!(code, 200, "dev-b stopped serving while cut off: {body}");

    // A new revision meanwhile: it rolls out over the online device and becomes stable;
    // the offline one is passed over (it derives the revision), not failed.
    f.apply(
        1024,
        rollout(
            json!([{"count": 1}, {"percent": 100}]),
            1,
            true,
            READY_TIMEOUT,
        ),
    )
    .await;
    let rev2 = eventually(
        "the new revision stable on the online device",
        ROLLOUT,
        || async {
            let st = status(&f.client).await?;
            let rev = st.stable_revision.clone()?;
            (rev != rev1
                && st.current_revision.as_deref() == Some(rev.as_str())
                && reported(&device(&f.client, "dev-a").await?) == serving_on(&rev))
            .then_some(rev)
        },
    )
    .await;
    no_false_gate(&f.client).await;
    assert_eq!(
        assigned_revision(&f.client, NS, MODEL, "dev-b")
            .await
            .as_deref(),
        Some(rev2.as_str())
    );
    let (code, body) = f.chat("dev-b").await;
    assert_eq!(code, 200, "dev-b stopped serving while cut off: {body}");
    assert_eq!(
        lkg_revision(&f.state_dir("dev-b")).as_deref(),
        Some(rev1.as_str())
    );

    // Healed: it reconnects, loads the new revision, and nothing it reported is lost.
    let from = f.log_len("dev-b");
    net.link(true);
    let stable = converged(&f.client, 2, ROLLOUT).await;
    assert_eq!(stable, rev2);
    no_false_gate(&f.client).await;
    devices_settled(&f.client, &f.names(), &rev2, true).await;
    let log = f.log_since("dev-b", from);
    assert!(
        log.lines()
            .any(|l| l.contains("converge: activating") && l.contains(&format!("revision={rev2}"))),
        "dev-b did not activate {rev2} after the heal:\n{log}"
    );
    let r = eventually(
        "dev-b's reports from the partition delivered",
        SHORT,
        || async {
            let r = device(&f.client, "dev-b").await?.status?.reports?;
            (r.last_sequence >= seq_before + 5).then_some(r)
        },
    )
    .await;
    assert_eq!((r.missing, r.dropped), (0, 0), "reports lost: {r:?}");
    assert_eq!(
        lkg_revision(&f.state_dir("dev-b")).as_deref(),
        Some(rev2.as_str())
    );
    let (code, body) = f.chat("dev-b").await;
    assert_eq!(code, 200, "{body}");
}

// --- 8. A full disk ---------------------------------------------------------------------

/// A tmpfs of a given size mounted over a directory (a device's state directory: its
/// "disk"), lazily unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
                &path.display().to_string(),
            ],
        );
        Self(path.to_path_buf())
    }

    /// Grows (or shrinks) it, keeping its files.
    fn resize(&self, size: &str) {
        run(
            "mount",
            &[
                "-o",
                &format!("remount,size={size}"),
                &self.0.display().to_string(),
            ],
        );
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {}: {} (these tests need root, as the netns ones do)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_that_device_alone_by_name_and_it_resumes_once_there_is_room() {
    let mut f = Fleet::start(Options::default()).await;
    // dev-b's disk holds 40 MiB: less than the model (about 94 MiB).
    let disk = SmallDisk::mount(&f.state_dir("dev-b"), "40m");
    f.start_agent("dev-a", None);
    f.start_agent("dev-b", None);
    f.wait_enrolled().await;
    // Without rollback: a failed revision stays, and resumes once its devices are healthy.
    f.apply(
        512,
        rollout(json!([{"percent": 100}]), 2, false, READY_TIMEOUT),
    )
    .await;

    // A true failure, judged as one, naming the device that failed and no other.
    let (reason, message) = eventually(
        "Degraded, naming the device whose disk is full",
        ROLLOUT,
        || async {
            let st = status(&f.client).await?;
            st.conditions
                .iter()
                .find(|c| c.type_ == cond::DEGRADED && c.status == "True")
                .map(|c| (c.reason.clone(), c.message.clone()))
        },
    )
    .await;
    assert_eq!(reason, reasons::HEALTH_GATE_FAILED, "{message}");
    assert!(
        message.contains("dev-b") && !message.contains("dev-a"),
        "{message}"
    );
    let st = status(&f.client).await.unwrap();
    let rev = st.current_revision.clone().unwrap();
    assert_eq!(st.failed_revision.as_deref(), Some(rev.as_str()));
    let failure = eventually("dev-b's status recording why it failed", SHORT, || async {
        device(&f.client, "dev-b")
            .await?
            .status?
            .models
            .into_iter()
            .find(|m| m.revision == rev && m.state == ModelState::Failed)
    })
    .await;
    assert_eq!(
        failure.reason.as_deref(),
        Some("StateDirectory"),
        "{failure:?}"
    );
    assert!(
        failure
            .message
            .as_deref()
            .is_some_and(|m| m.contains("No space left on device")),
        "{failure:?}"
    );
    // The other device is unaffected: it serves the revision.
    eventually("dev-a serving the revision", ROLLOUT, || async {
        (reported(&device(&f.client, "dev-a").await?) == serving_on(&rev)).then_some(())
    })
    .await;
    let (code, body) = f.chat("dev-a").await;
    assert_eq!(code, 200, "{body}");
    // dev-b did not crash: it answers, serving nothing.
    let alive = f
        .agents
        .get_mut("dev-b")
        .unwrap()
        .proc_
        .as_mut()
        .unwrap()
        .0
        .try_wait()
        .unwrap();
    assert_eq!(alive, None, "dev-b's agent exited");
    assert_eq!(f.http("dev-b", "/healthz", None).await.0, 200);
    assert!(!f.serving("dev-b").await);

    // Repaired: the agent stopped, the disk grown, the agent started again. It resumes
    // the partial download the full disk left.
    f.kill_agent("dev-b");
    disk.resize("256m");
    let partial = artifacts_dir(&f.state_dir("dev-b")).join(format!(
        "{}.partial",
        f.artifact.digest.trim_start_matches("sha256:")
    ));
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!((1..=40 * MIB).contains(&kept), "{kept}");
    let from = f.log_len("dev-b");
    f.restart_agent("dev-b");
    eventually("the failed revision resuming", ROLLOUT, || async {
        (!events(&f.client, reasons::RETRYING).await.is_empty()).then_some(())
    })
    .await;
    let stable = converged(&f.client, 2, ROLLOUT).await;
    assert_eq!(stable, rev);
    let log = f.log_since("dev-b", from);
    assert_eq!(resumed_from(&log), Some(kept), "{log}");
    devices_settled(&f.client, &f.names(), &rev, true).await;
    // Only the true failure was ever judged.
    for note in events(&f.client, reasons::HEALTH_GATE_FAILED).await {
        assert!(note.contains("dev-b") && !note.contains("dev-a"), "{note}");
    }
    assert!(events(&f.client, reasons::ROLLED_BACK).await.is_empty());
    let (code, body) = f.chat("dev-b").await;
    assert_eq!(code, 200, "{body}");
}

// --- 9. The device clock jumps forward ---------------------------------------------------

/// When `d` last attested successfully (the gateway's clock).
fn verified_at(d: &EdgeDevice) -> Option<Timestamp> {
    d.status
        .as_ref()?
        .attestation
        .as_ref()
        .map(|a| a.verified_time.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_clock_jumping_forward_keeps_it_serving_attesting_and_converging() {
    // A 30 s attestation lease: two days ahead, a lease judged by the wall clock would
    // be over at once, and the session re-attests every 20 s (two thirds of it).
    let mut f = Fleet::start(Options {
        extra: &["--attestation-lease-seconds=30"],
        ..Options::default()
    })
    .await;
    let clock = f.dir.path().join("till-2.faketime");
    std::fs::write(&clock, "+0\n").unwrap();
    f.start_agent("till-1", None);
    f.start_agent_with_env("till-2", local_fleet::faketime_env(&clock).unwrap());
    f.wait_enrolled().await;
    f.apply(
        512,
        rollout(json!([{"percent": 100}]), 1, true, READY_TIMEOUT),
    )
    .await;
    let rev = converged(&f.client, 2, ROLLOUT).await;
    assert!(f.serving("till-2").await);
    let before = verified_at(&device(&f.client, "till-2").await.unwrap()).unwrap();

    // Two days forward. The faked clock is re-read on every call, so the running agent
    // sees it at once.
    let from = f.log_len("till-2");
    std::fs::write(&clock, "+48h\n").unwrap();
    let jumped = Instant::now();
    // It serves throughout, across at least one re-attestation (every 20 s).
    let mut reattested = None;
    while jumped.elapsed() < Duration::from_secs(45) {
        assert!(
            f.serving("till-2").await,
            "till-2 stopped serving {:?} after its clock jumped:\n{}",
            jumped.elapsed(),
            f.log_since("till-2", from)
        );
        if reattested.is_none()
            && let Some(t) = device(&f.client, "till-2")
                .await
                .and_then(|d| verified_at(&d))
            && t > before
        {
            reattested = Some(jumped.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = f.log_since("till-2", from);
    assert!(
        reattested.is_some(),
        "till-2 did not attest again within 45 s of its clock jumping:\n{log}"
    );
    assert!(!log.contains("AttestationLeaseExpired"), "{log}");
    // Its results look expired on arrival (the gateway's clock is two days behind its
    // own): it says so and attests again within its lease, not in a loop.
    assert!(log.contains("ClockSkew"), "no ClockSkew warning:\n{log}");
    let sessions = count(&log, "connected to the gateway");
    assert!(
        (1..=4).contains(&sessions),
        "{sessions} sessions in 45 s (one per 20 s expected):\n{log}"
    );
    // Judged by the gateway's clock, the device is healthy: nothing failed.
    no_false_gate(&f.client).await;
    devices_settled(&f.client, &f.names(), &rev, true).await;

    // A new revision reaches it as it reaches the device on time.
    f.apply(
        1024,
        rollout(json!([{"percent": 100}]), 1, true, READY_TIMEOUT),
    )
    .await;
    eventually("the new revision planned", SHORT, || async {
        let current = status(&f.client).await?.current_revision?;
        (current != rev).then_some(())
    })
    .await;
    let second = converged(&f.client, 2, ROLLOUT).await;
    assert_ne!(second, rev);
    no_false_gate(&f.client).await;
    let (code, body) = f.chat("till-2").await;
    assert_eq!(code, 200, "{body}");

    // Restarted with the clock still ahead: the lease on disk (written in its own
    // clock) is read once, and it serves again once attested.
    let old_boot = boot_of(&device(&f.client, "till-2").await.unwrap());
    let from = f.log_len("till-2");
    f.restart_agent("till-2");
    reporting_again(&f.client, "till-2", &old_boot, &second).await;
    eventually("till-2 serving again", SHORT, || async {
        f.serving("till-2").await.then_some(())
    })
    .await;
    let log = f.log_since("till-2", from);
    assert!(!log.contains("AttestationLeaseExpired"), "{log}");
    assert_eq!(converged(&f.client, 2, ROLLOUT).await, second);
    no_false_gate(&f.client).await;
    devices_settled(&f.client, &f.names(), &second, true).await;
}
