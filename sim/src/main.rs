//! edgefleet-sim: many simulated devices speaking the real gateway protocol over real
//! TLS, to measure the fleet's service level indicators.
//!
//! Each simulated device is a task: it enrols with the bootstrap token, attests with the
//! `dev` attester (a real challenge, evidence and CSR; the gateway's policy must admit
//! dev evidence), then over mTLS with the certificate it got holds a desired-state
//! long-poll open and heartbeats with reports. **Simulated, not real:** the download
//! (a device reports a model `Ready` as soon as its desired state names it) and
//! inference (no model is loaded; reports carry zero counters).
//!
//! Scenarios:
//! - `steady`: heartbeats for `--duration` seconds; heartbeat round trips measured.
//! - `rollout`: applies `--apply` (an EdgeModel manifest, server-side) and waits until
//!   every device has seen its new desired state and the EdgeModel's status counts all
//!   of them ready: rollout completion time, and the cloud→edge latency of each device
//!   (from the apply to its long-poll answering).
//! - `storm`: every device drops its connections at once and reconnects; recovery is
//!   until every device has answered a desired-state poll again.
//! - `outage`: a storm after a network outage the gateway did not see: every device
//!   reconnects at once, but its old connection is left open and unused (as when the
//!   path broke without a close reaching the gateway), so the gateway must find and
//!   close the old connections itself; the devices stay connected 10 s after recovery,
//!   so that the gateway's descriptors then show what it still holds.
//! - `churn`: a tenth of the devices leave and as many new ones enrol, per round; the
//!   time from a newcomer's start to its first answered poll is measured.
//! - `restart`: every gateway replica is killed and started again by the harness
//!   (`edgefleet-dev fleet-bench` does it once the start file exists, and then creates
//!   `<start-file>.restarted`); the devices follow the agent's rule (a passing trouble
//!   keeps the session, only a refusal enrols and attests anew). Recovery is until
//!   every device's long-poll has answered from a restarted gateway; `reattested`
//!   counts the devices that attested again (none should).
//! - `slowloris`: for `--duration` seconds an attacker holds `--slow-headers`
//!   connections that drip HTTP/1 headers and `--junk-tls` connections that stall in
//!   the TLS handshake against the first gateway, reopening each the moment it is
//!   closed; meanwhile a connected probe device asks for its desired state every second
//!   (`probe_desired_ms`: answered at once, no version given) and, beside it, a fresh
//!   device enrols, attests and polls every 5 s, one attempt each (`fresh_device_ms`).
//!
//! Several processes can share one simulated fleet (each holds a connection per device,
//! and one process has at most 20,000 descriptors here): give each its own `--prefix`
//! and share of `--devices`, the whole fleet's size as `--fleet-devices`, every operator
//! replica as a `--gateway`, and one `--start-file` that the harness creates once all are
//! connected, so that their scenarios start together.
//!
//! The summary is one JSON object on stdout.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use clap::{Parser, ValueEnum};
use edgefleet_agent::attest::dev::DevAttester;
use edgefleet_agent::gateway_client::GatewayClient;
use edgefleet_agent::gateway_session::{DeviceClient, REPORT_COALESCE};
use edgefleet_proto as proto;
use edgefleet_trust::attestation::service::{ChallengeRequest, Evidence, EvidenceRequest};
use tokio::sync::{Mutex, Semaphore, watch};

mod flood;

/// The agent's default `fleet.backoff_max_seconds`: the longest pause between a
/// device's attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Seconds the outage scenario stays connected after recovery.
const OUTAGE_SETTLE_SECONDS: u64 = 10;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Scenario {
    Steady,
    Rollout,
    Storm,
    Outage,
    Churn,
    Restart,
    Slowloris,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "simulated edgefleet devices (real protocol; download and inference faked)"
)]
struct Cli {
    /// Gateway URL (repeatable: every operator replica serves devices; each device uses
    /// the one its name hashes to, as the agent starts at).
    #[arg(long = "gateway", required = true)]
    gateways: Vec<String>,
    /// PEM CA of the gateway's certificate.
    #[arg(long)]
    gateway_ca: PathBuf,
    /// File with the bootstrap token the devices enrol with (an EdgeBootstrapToken
    /// with enough usages, whose labels the devices get).
    #[arg(long)]
    token_file: PathBuf,
    /// Number of devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Device name prefix (names are PREFIX-00001 …).
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Labels every device asks for, KEY=VALUE (repeatable): bare names, which the
    /// gateway stores under device.edgefleet.io/.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Enrolments and attestations in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::Steady)]
    scenario: Scenario,
    /// Seconds of the steady and churn scenarios.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// EdgeModel manifest (YAML or JSON) the rollout scenario applies.
    #[arg(long)]
    apply: Option<PathBuf>,
    /// Longest wait for a scenario's end.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Devices of the whole simulated fleet, when several simulator processes share it
    /// (each under its descriptor limit): the rollout is complete when the EdgeModel
    /// counts this many. Default: `--devices`.
    #[arg(long)]
    fleet_devices: Option<usize>,
    /// Once every device of this process is connected, wait until this file exists
    /// before the scenario starts (a harness running several processes creates it when
    /// all are connected, so that their scenarios start together).
    #[arg(long)]
    start_file: Option<PathBuf>,
    /// Re-enrol and re-attest after any failed poll, transient or not (what an agent
    /// without the keep-the-session rule would do): the restart scenario's baseline.
    #[arg(long)]
    reattest_on_error: bool,
    /// The slowloris scenario: connections that drip HTTP/1 headers.
    #[arg(long, env = "EDGEFLEET_SIM_SLOW_HEADERS", default_value_t = 5000)]
    slow_headers: usize,
    /// The slowloris scenario: connections that stall in the TLS handshake.
    #[arg(long, env = "EDGEFLEET_SIM_JUNK_TLS", default_value_t = 1000)]
    junk_tls: usize,
}

impl Cli {
    /// The gateway `device` uses.
    fn gateway_of(&self, device: &str) -> &str {
        let at = edgefleet_agent::gateway_session::first_endpoint(device, self.gateways.len());
        self.gateways.get(at).map_or("", String::as_str)
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

/// Everything the devices record.
#[derive(Debug, Default)]
struct Record {
    heartbeat_ms: Vec<f64>,
    /// Per device: when its long-poll last answered with a new version.
    seen: BTreeMap<String, (Instant, String)>,
    /// Per device: when it last completed a poll (for storms).
    polled: BTreeMap<String, Instant>,
    /// Per device: when it first completed a poll (for churn).
    first_polled: BTreeMap<String, Instant>,
    failures: BTreeMap<String, u64>,
    connect_retries: BTreeMap<String, u64>,
    attested: u64,
    /// Connected devices that enrolled and attested again (refused by a gateway).
    reattested: u64,
    /// Per device: when its last poll failed.
    errored: BTreeMap<String, Instant>,
    /// Per device: its first answered poll after its last failure.
    recovered: BTreeMap<String, Instant>,
}

impl Record {
    /// `name`'s poll was answered.
    fn answered(&mut self, name: &str) {
        let now = Instant::now();
        self.polled.insert(name.to_owned(), now);
        self.first_polled.entry(name.to_owned()).or_insert(now);
        if self.errored.contains_key(name) && !self.recovered.contains_key(name) {
            self.recovered.insert(name.to_owned(), now);
        }
    }

    /// `name`'s poll failed.
    fn failed(&mut self, name: &str) {
        self.errored.insert(name.to_owned(), Instant::now());
        self.recovered.remove(name);
    }
}

struct Shared {
    cli: Cli,
    ca: Vec<u8>,
    token: String,
    record: Mutex<Record>,
    /// Bumped to make every device drop its connections and reconnect.
    storm: watch::Sender<u64>,
    gate: Semaphore,
    reports: AtomicU64,
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// An error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

async fn fail(shared: &Shared, what: &str, e: impl std::fmt::Display) {
    let reason = without_urls(&e.to_string());
    let key = format!("{what}: {}", reason.chars().take(240).collect::<String>());
    *shared.record.lock().await.failures.entry(key).or_insert(0) += 1;
}

/// `text` with each `(https://…)` (naming a device) as `(URL)`, so that the same
/// failure of many devices counts under one reason.
fn without_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("(https://") {
        out.push_str(&rest[..at]);
        out.push_str("(URL)");
        rest = rest[at..].find(')').map_or("", |end| &rest[at + end + 1..]);
    }
    out.push_str(rest);
    out
}

/// Enrols and attests one device; returns its mTLS client.
async fn connect(
    shared: &Shared,
    name: &str,
    key: &rcgen::KeyPair,
) -> anyhow::Result<DeviceClient> {
    connect_at(shared, name, shared.cli.gateway_of(name), key).await
}

/// Enrols and attests one device at `gateway`; returns its mTLS client there.
async fn connect_at(
    shared: &Shared,
    name: &str,
    gateway: &str,
    key: &rcgen::KeyPair,
) -> anyhow::Result<DeviceClient> {
    let _permit = shared.gate.acquire().await?;
    let boot = GatewayClient::new(gateway, &shared.ca, &shared.token)?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let b64 = base64::engine::general_purpose::STANDARD;
    boot.enrol(&proto::EnrolRequest {
        device: name.to_owned(),
        agent_public_key: b64.encode(&spki),
        facts: proto::Facts {
            arch: "x86_64".into(),
            cpu_cores: 4,
            memory_bytes: 8 << 30,
            accelerators: vec![],
            tee_kinds: vec!["dev".into()],
            agent_version: concat!("sim-", env!("CARGO_PKG_VERSION")).into(),
        },
        labels: shared.cli.labels.iter().cloned().collect(),
    })
    .await?;
    let challenge = boot
        .challenge(&ChallengeRequest {
            device: name.to_owned(),
            agent_public_key: b64.encode(&spki),
            tee: edgefleet_trust::attestation::TeeKind::Dev,
            tpm: None,
        })
        .await?;
    let report_data: [u8; 64] = hex::decode(&challenge.report_data)
        .ok()
        .and_then(|v| v.try_into().ok())
        .context("bad report data")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let appraisal = boot
        .evidence(&EvidenceRequest {
            device: name.to_owned(),
            nonce: challenge.nonce,
            csr,
            evidence: Evidence::Dev {
                evidence: DevAttester::generate().evidence(&report_data)?,
            },
        })
        .await?;
    let cert = appraisal
        .certificate
        .with_context(|| format!("denied: {:?}", appraisal.decision.deny))?;
    shared.record.lock().await.attested += 1;
    Ok(DeviceClient::new(
        gateway,
        &shared.ca,
        cert.as_bytes(),
        key.serialize_pem().as_bytes(),
        name,
        Duration::from_secs(proto::MAX_WAIT_SECONDS + 15),
    )?)
}

/// One device, until its task is aborted.
async fn device(shared: Arc<Shared>, name: String) {
    // The device's key, kept for its life (the gateway pins it at enrolment).
    let key = match rcgen::KeyPair::generate() {
        Ok(k) => k,
        Err(e) => return fail(&shared, "key", e).await,
    };
    let client = loop {
        match connect(&shared, &name, &key).await {
            Ok(c) => break c,
            Err(e) => {
                // Enrolment retries (the first connection storm meets a full accept
                // queue) are counted apart from failures of connected devices.
                let reason: String = format!("{e:#}").chars().take(240).collect();
                *shared
                    .record
                    .lock()
                    .await
                    .connect_retries
                    .entry(reason)
                    .or_insert(0) += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let boot = format!("{name}-{}", std::process::id());
    let models: Arc<Mutex<Option<Vec<proto::ModelReport>>>> = Arc::default();
    // As the agent does, a change of model states is reported at once, not at the next
    // heartbeat.
    let report_now = Arc::new(tokio::sync::Notify::new());
    // Heartbeats, stopped with this task.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    // The device's current client: a storm replaces it, and the heartbeats follow (as
    // the agent's reports use its current session), so that a device holds one
    // connection, not its old one for reports beside a new one for the long-poll.
    let current = Arc::new(std::sync::Mutex::new(client.clone()));
    let _hb = AbortOnDrop({
        let (shared, current, models, name, report_now) = (
            shared.clone(),
            current.clone(),
            models.clone(),
            name.clone(),
            report_now.clone(),
        );
        let boot = boot.clone();
        tokio::spawn(async move {
            let every = Duration::from_secs(shared.cli.heartbeat_seconds);
            // Spread the fleet's heartbeats over the interval.
            let offset =
                name.bytes().map(u64::from).sum::<u64>() % (every.as_millis() as u64).max(1);
            tokio::time::sleep(Duration::from_millis(offset)).await;
            let mut seq = 0;
            loop {
                seq += 1;
                let batch = proto::ReportBatch {
                    reports: vec![proto::Report {
                        seq,
                        boot: boot.clone(),
                        time: 0,
                        models: models.lock().await.take(),
                        inference: Some(proto::Inference {
                            model: None,
                            revision: None,
                            requests_total: 0,
                            errors_total: 0,
                            tokens_per_second: 0.0,
                            latency_p50_millis: None,
                            latency_p99_millis: None,
                            time_to_first_token_p95_millis: None,
                        }),
                    }],
                    dropped: 0,
                };
                let client = match current.lock() {
                    Ok(c) => c.clone(),
                    Err(_) => return,
                };
                let started = Instant::now();
                match client.report(&batch).await {
                    Ok(_) => {
                        let ms = started.elapsed().as_secs_f64() * 1000.0;
                        shared.record.lock().await.heartbeat_ms.push(ms);
                        shared.reports.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        // Send the models again with the next report.
                        *models.lock().await =
                            batch.reports.into_iter().next().and_then(|r| r.models);
                        fail(&shared, "report", e).await;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = report_now.notified() => tokio::time::sleep(REPORT_COALESCE).await,
                }
            }
        })
    });
    // The desired-state stream; a storm replaces the client's connections.
    let mut storm = shared.storm.subscribe();
    let mut client = client;
    // In an outage the old connections stay open, never used again.
    let mut abandoned = Vec::new();
    let mut version: Option<String> = None;
    let mut last_models: Option<Vec<proto::ModelReport>> = None;
    let mut retry = Duration::from_secs(1);
    loop {
        let poll = client.desired(version.as_deref(), Duration::from_secs(30));
        let result = tokio::select! {
            r = poll => r,
            _ = storm.changed() => {
                // Drop every connection (or, in an outage, leave it) and come back at once.
                if shared.cli.scenario == Scenario::Outage {
                    abandoned.push(client.clone());
                }
                client = client.reconnect();
                if let Ok(mut c) = current.lock() {
                    *c = client.clone();
                }
                version = None;
                continue;
            }
        };
        match result {
            Ok(Some(state)) => {
                {
                    let mut r = shared.record.lock().await;
                    r.seen
                        .insert(name.clone(), (Instant::now(), state.version.clone()));
                    r.answered(&name);
                }
                retry = Duration::from_secs(1);
                // Simulated download, verification and load: Ready at once.
                last_models = Some(
                    state
                        .models
                        .iter()
                        .map(|m| proto::ModelReport {
                            model: m.model.clone(),
                            revision: m.revision.clone(),
                            state: proto::ModelState::Ready,
                            message: Some("simulated device".into()),
                            reason: None,
                            load_millis: Some(0),
                            golden: Vec::new(),
                        })
                        .collect(),
                );
                models.lock().await.clone_from(&last_models);
                report_now.notify_one();
                version = Some(state.version);
            }
            Ok(None) => {
                retry = Duration::from_secs(1);
                shared.record.lock().await.answered(&name);
            }
            // The agent's rule (`gateway_session::control`): a passing trouble keeps the
            // session and asks again on a fresh connection, with jittered backoff, the
            // states re-reported; only a refusal enrols and attests anew.
            Err(e) if e.is_transient() && !shared.cli.reattest_on_error => {
                shared.record.lock().await.failed(&name);
                fail(&shared, "desired", chain(&e)).await;
                tokio::time::sleep(edgefleet_agent::gateway_session::jitter(retry)).await;
                retry = (retry * 2).min(BACKOFF_MAX);
                client = client.reconnect();
                if let Ok(mut c) = current.lock() {
                    *c = client.clone();
                }
                version = None;
                resend(&models, &last_models).await;
                report_now.notify_one();
            }
            Err(e) => {
                shared.record.lock().await.failed(&name);
                fail(&shared, "desired (refused)", chain(&e)).await;
                // The session is over: enrol and attest until that succeeds.
                client = loop {
                    match connect(&shared, &name, &key).await {
                        Ok(c) => break c,
                        Err(e) => {
                            fail(&shared, "re-attest", format!("{e:#}")).await;
                            tokio::time::sleep(edgefleet_agent::gateway_session::jitter(retry))
                                .await;
                            retry = (retry * 2).min(BACKOFF_MAX);
                        }
                    }
                };
                shared.record.lock().await.reattested += 1;
                if let Ok(mut c) = current.lock() {
                    *c = client.clone();
                }
                version = None;
                resend(&models, &last_models).await;
                report_now.notify_one();
            }
        }
    }
}

/// The model states of the last desired state go with the next report (unless a newer
/// set is already waiting).
async fn resend(
    models: &Mutex<Option<Vec<proto::ModelReport>>>,
    last: &Option<Vec<proto::ModelReport>>,
) {
    let mut m = models.lock().await;
    if m.is_none() {
        m.clone_from(last);
    }
}

/// The slowloris scenario ([module docs](self)).
async fn slowloris(shared: &Arc<Shared>, out: &mut serde_json::Value) -> anyhow::Result<()> {
    let cli = &shared.cli;
    let first = cli.gateways.first().context("no gateway")?;
    let target = flood::Target::new(first, &shared.ca)?;
    // The probe is a device like the others, on the flooded gateway.
    let probe_name = format!("{}-probe", cli.prefix);
    let probe = connect_at(shared, &probe_name, first, &rcgen::KeyPair::generate()?).await?;
    let first = first.clone();
    let stats = Arc::new(flood::FloodStats::default());
    let attack = flood::start(&target, cli.slow_headers, cli.junk_tls, &stats);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(cli.duration);
    // The probe asks every second, on its own; fresh devices join one after another
    // beside it, each started at most every 5 s.
    let probing = {
        let shared = shared.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let (mut ms, mut failures, mut open) = (Vec::new(), 0u64, Vec::new());
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < end {
                tick.tick().await;
                open.push(stats.open.load(Ordering::Relaxed) as f64);
                let started = Instant::now();
                let asked = tokio::time::timeout(
                    Duration::from_secs(10),
                    probe.desired(None, Duration::from_secs(1)),
                )
                .await;
                match asked {
                    Ok(Ok(_)) => ms.push(started.elapsed().as_secs_f64() * 1000.0),
                    Ok(Err(e)) => {
                        failures += 1;
                        fail(&shared, "probe", chain(&e)).await;
                    }
                    Err(_) => {
                        failures += 1;
                        fail(&shared, "probe", "no answer within 10 s").await;
                    }
                }
            }
            (ms, failures, open)
        })
    };
    let joining = {
        let shared = shared.clone();
        let first = first.clone();
        tokio::spawn(async move {
            let (mut ms, mut failures, mut fresh) = (Vec::new(), 0u64, 0u32);
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < end {
                tick.tick().await;
                fresh += 1;
                let name = format!("{}-fresh-{fresh:03}", shared.cli.prefix);
                let started = Instant::now();
                // One attempt per request, as the agent's first try: an evicted or
                // refused connection is a failure here, not retried.
                let joined = tokio::time::timeout(Duration::from_secs(30), async {
                    let key = rcgen::KeyPair::generate()?;
                    let c = connect_at(&shared, &name, &first, &key).await?;
                    c.desired(None, Duration::from_secs(1)).await?;
                    anyhow::Ok(())
                })
                .await;
                match joined {
                    Ok(Ok(())) => ms.push(started.elapsed().as_secs_f64() * 1000.0),
                    Ok(Err(e)) => {
                        failures += 1;
                        fail(&shared, "fresh device", format!("{e:#}")).await;
                    }
                    Err(_) => {
                        failures += 1;
                        fail(&shared, "fresh device", "not connected within 30 s").await;
                    }
                }
            }
            (ms, failures, fresh)
        })
    };
    let (mut probe_ms, probe_failures, open_samples) = probing.await?;
    let (mut fresh_ms, fresh_failures, fresh) = joining.await?;
    for t in &attack {
        t.abort();
    }
    let mean_open = open_samples.iter().sum::<f64>() / open_samples.len().max(1) as f64;
    out["flood"] = serde_json::json!({
        "slow_headers": cli.slow_headers,
        "junk_tls": cli.junk_tls,
        "seconds": t0.elapsed().as_secs_f64(),
        "open_mean": mean_open,
        "open_max": open_samples.iter().copied().fold(0.0, f64::max),
        "opened": stats.opened.load(Ordering::Relaxed),
        "closed_by_gateway": stats.closed.load(Ordering::Relaxed),
        "failed_to_open": stats.failed.load(Ordering::Relaxed),
    });
    out["probe_desired_ms"] = summary_ms(&mut probe_ms);
    out["probe_failures"] = serde_json::json!(probe_failures);
    out["fresh_device_ms"] = summary_ms(&mut fresh_ms);
    out["fresh_devices"] = serde_json::json!(fresh);
    out["fresh_failures"] = serde_json::json!(fresh_failures);
    Ok(())
}

fn summary_ms(v: &mut [f64]) -> serde_json::Value {
    serde_json::json!({
        "count": v.len(),
        "p50": quantile(v, 0.5),
        "p99": quantile(v, 0.99),
        "max": quantile(v, 1.0),
    })
}

async fn apply_manifest(path: &PathBuf) -> anyhow::Result<(String, String, kube::Client)> {
    let text = std::fs::read_to_string(path)?;
    let value: serde_json::Value = serde_yaml::from_str(&text)?;
    let ns = value["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let name = value["metadata"]["name"]
        .as_str()
        .context("manifest has no name")?
        .to_owned();
    let client = kube::Client::try_default().await?;
    let api: kube::Api<edgefleet_crds::EdgeModel> = kube::Api::namespaced(client.clone(), &ns);
    api.patch(
        &name,
        &kube::api::PatchParams::apply("edgefleet-sim").force(),
        &kube::api::Patch::Apply(&value),
    )
    .await?;
    Ok((ns, name, client))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let ca =
        std::fs::read(&cli.gateway_ca).with_context(|| format!("{}", cli.gateway_ca.display()))?;
    let token = std::fs::read_to_string(&cli.token_file)?.trim().to_owned();
    let (storm, _) = watch::channel(0);
    let n = cli.devices;
    let shared = Arc::new(Shared {
        gate: Semaphore::new(cli.concurrency.max(1)),
        cli,
        ca,
        token,
        record: Mutex::default(),
        storm,
        reports: AtomicU64::new(0),
    });
    let names: Vec<String> = (1..=n)
        .map(|i| format!("{}-{i:05}", shared.cli.prefix))
        .collect();
    let started = Instant::now();
    let mut tasks: BTreeMap<String, tokio::task::JoinHandle<()>> = names
        .iter()
        .map(|name| {
            (
                name.clone(),
                tokio::spawn(device(shared.clone(), name.clone())),
            )
        })
        .collect();
    let deadline = started + Duration::from_secs(shared.cli.timeout);
    // Everyone connected: attested and answered a first poll.
    loop {
        let polled = shared.record.lock().await.polled.len();
        if polled >= n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {polled} of {n} devices connected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    // From here on the scenario is measured: heartbeats of the connection phase (when
    // the gateway is busy attesting) do not count, and a harness watching stderr can
    // take its own snapshot now.
    shared.record.lock().await.heartbeat_ms.clear();
    eprintln!("CONNECTED devices={n} seconds={connect_seconds:.3}");
    if let Some(file) = &shared.cli.start_file {
        while !file.exists() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} never appeared",
                file.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shared.record.lock().await.heartbeat_ms.clear();
    }
    let fleet = shared.cli.fleet_devices.unwrap_or(n).max(n);
    let mut out = serde_json::json!({
        "devices": n,
        "scenario": format!("{:?}", shared.cli.scenario).to_lowercase(),
        "simulated": ["download", "inference"],
        "connect_seconds": connect_seconds,
    });
    match shared.cli.scenario {
        Scenario::Steady | Scenario::Churn => {
            let end = Instant::now() + Duration::from_secs(shared.cli.duration);
            let mut round = 0;
            let mut joined: BTreeMap<String, Instant> = BTreeMap::new();
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_secs(shared.cli.heartbeat_seconds.max(1))).await;
                if shared.cli.scenario == Scenario::Churn {
                    round += 1;
                    let leave: Vec<String> = tasks.keys().take(n / 10).cloned().collect();
                    for name in leave {
                        if let Some(t) = tasks.remove(&name) {
                            t.abort();
                        }
                    }
                    for i in 0..n / 10 {
                        let name = format!("{}-r{round}-{i:05}", shared.cli.prefix);
                        joined.insert(name.clone(), Instant::now());
                        tasks.insert(name.clone(), tokio::spawn(device(shared.clone(), name)));
                    }
                }
            }
            if shared.cli.scenario == Scenario::Churn {
                // Newcomers of the last round get one more heartbeat to come in.
                tokio::time::sleep(Duration::from_secs(shared.cli.heartbeat_seconds.max(1))).await;
                let r = shared.record.lock().await;
                let mut join_ms: Vec<f64> = joined
                    .iter()
                    .filter_map(|(name, t0)| {
                        let t = r.first_polled.get(name)?;
                        Some(t.saturating_duration_since(*t0).as_secs_f64() * 1000.0)
                    })
                    .collect();
                out["churn_rounds"] = serde_json::json!(round);
                out["churn_started"] = serde_json::json!(joined.len());
                out["churn_join_ms"] = summary_ms(&mut join_ms);
            }
        }
        Scenario::Rollout => {
            let path = shared
                .cli
                .apply
                .clone()
                .context("--apply is required for rollout")?;
            let before: BTreeMap<String, String> = shared
                .record
                .lock()
                .await
                .seen
                .iter()
                .map(|(k, (_, v))| (k.clone(), v.clone()))
                .collect();
            let t0 = Instant::now();
            let (ns, name, client) = apply_manifest(&path).await?;
            let api: kube::Api<edgefleet_crds::EdgeModel> = kube::Api::namespaced(client, &ns);
            let mut latencies = loop {
                let r = shared.record.lock().await;
                let changed: Vec<f64> = r
                    .seen
                    .iter()
                    .filter(|(k, (_, v))| before.get(*k) != Some(v))
                    .map(|(_, (t, _))| t.saturating_duration_since(t0).as_secs_f64() * 1000.0)
                    .collect();
                if changed.len() >= n {
                    break changed;
                }
                drop(r);
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "not every device saw the rollout"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let devices_seen = t0.elapsed().as_secs_f64();
            loop {
                let st = api.get(&name).await?.status.unwrap_or_default();
                if usize::try_from(st.devices.ready).unwrap_or(0) >= fleet
                    && usize::try_from(st.devices.updated).unwrap_or(0) >= fleet
                {
                    out["ready_devices"] = serde_json::json!(st.ready_devices);
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the rollout did not complete: {st:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            out["rollout_seconds"] = serde_json::json!(t0.elapsed().as_secs_f64());
            out["all_devices_saw_change_seconds"] = serde_json::json!(devices_seen);
            out["cloud_to_edge_ms"] = summary_ms(&mut latencies);
        }
        Scenario::Storm | Scenario::Outage => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let t0 = Instant::now();
            shared.storm.send_modify(|v| *v += 1);
            loop {
                let back = shared
                    .record
                    .lock()
                    .await
                    .polled
                    .values()
                    .filter(|t| **t > t0)
                    .count();
                if back >= n {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "only {back} of {n} devices came back"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            out["storm_recovery_seconds"] = serde_json::json!(t0.elapsed().as_secs_f64());
            if shared.cli.scenario == Scenario::Outage {
                // Stay connected a while, so that a harness sampling the gateway sees
                // what it still holds of the old connections once every device is back.
                tokio::time::sleep(Duration::from_secs(OUTAGE_SETTLE_SECONDS)).await;
                eprintln!("SETTLED devices={n} seconds={OUTAGE_SETTLE_SECONDS}");
                out["settle_seconds"] = serde_json::json!(OUTAGE_SETTLE_SECONDS);
            }
        }
        Scenario::Restart => {
            let marker = shared
                .cli
                .start_file
                .as_ref()
                .context("--start-file is required for restart")?
                .with_extension("restarted");
            let t0 = Instant::now();
            while !marker.exists() {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{} never appeared",
                    marker.display()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let up = Instant::now();
            // Back: a device whose poll failed after the kill and was answered since
            // (by the new process: the old one is gone).
            let last = loop {
                let r = shared.record.lock().await;
                let back: Vec<Instant> = r
                    .errored
                    .iter()
                    .filter(|(_, t)| **t >= t0)
                    .filter_map(|(name, _)| r.recovered.get(name).copied())
                    .collect();
                if back.len() >= n {
                    break back.into_iter().max().unwrap_or(up);
                }
                drop(r);
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "only {} of {n} devices came back",
                    back.len()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            out["restart_recovery_seconds"] =
                serde_json::json!(last.saturating_duration_since(t0).as_secs_f64());
            out["gateway_down_seconds"] = serde_json::json!((up - t0).as_secs_f64());
            // A heartbeat round after recovery, so that re-reported states are written
            // (or not) within the measured window.
            tokio::time::sleep(Duration::from_secs(shared.cli.heartbeat_seconds.max(1))).await;
        }
        Scenario::Slowloris => slowloris(&shared, &mut out).await?,
    }
    for t in tasks.values() {
        t.abort();
    }
    let mut r = shared.record.lock().await;
    out["attested"] = serde_json::json!(r.attested);
    out["reattested"] = serde_json::json!(r.reattested);
    out["reports"] = serde_json::json!(shared.reports.load(Ordering::Relaxed));
    out["heartbeat_rtt_ms"] = summary_ms(&mut r.heartbeat_ms);
    out["failures"] = serde_json::json!(r.failures);
    out["connect_retries"] = serde_json::json!(r.connect_retries);
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
