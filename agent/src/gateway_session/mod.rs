//! Fleet mode (`edgefleet-agent run`): enrol → attest → stream desired state → download
//! → verify → load → serve → report, and keep serving whatever happens to the gateway.
//!
//! ```text
//!             ┌────────────── start ───────────────┐
//!             ▼                                    │ last-known-good on disk:
//!   ┌──────────────────┐  verified again, loaded   │ serve it before the gateway answers
//!   │ Offline (serving │◄──────────────────────────┘
//!   │ what it has)     │◄───────────── gateway unreachable / refused ─────────┐
//!   └────────┬─────────┘  (reports spool, capped jittered backoff)            │
//!            │ enrol (bootstrap token) → attest (evidence → client cert)      │
//!            ▼                                                                │
//!   ┌──────────────────┐  desired == active: nothing restarts                │
//!   │ Connected        │─────────────────────────────────────────────────────┤
//!   │ (long-poll, mTLS)│                                                      │
//!   └────────┬─────────┘                                                      │
//!            │ new desired state                                              │
//!            ▼                                                                │
//!   Downloading (Range resume, size bound) → Verifying (digest, signature)    │
//!     → Loading (llama.cpp, plugins) → Ready (activated atomically, recorded  │
//!     as last-known-good)  ── any failure: Failed(reason), keep serving the   │
//!                             previous model ─────────────────────────────────┘
//! ```
//!
//! Revocation: an enrolment answered "not approved" stops serving at once (the
//! agent keeps asking); a desired state without models unloads; and the attestation
//! lease bounds how long the device serves without a successful attestation: at its
//! end (offline, or refused) the model is unloaded, reported `Failed` with
//! `AttestationLeaseExpired`, and served again only after the next successful
//! attestation. At start, a last-known-good is served only within the recorded lease.
//!
//! Reports (heartbeats) are taken every `fleet.heartbeat_seconds` into a bounded spool
//! and sent oldest first; the gateway acknowledges by sequence number. Model states ride
//! along only when they changed since the last acknowledged report, and a change is
//! reported at once (a burst gathered over [`REPORT_COALESCE`]) rather than at the next
//! heartbeat, so that a rollout step sees a device Ready as soon as it is.
//!
//! Here: the [`FleetAgent`] (its shared state and model states), [`facts`] and [`run`].
//! By what it does: `client` (the device API over mTLS), `control` (enrol, attest,
//! long-poll, reconnect), `converge` (desired state → activation, last-known-good),
//! `download` (resumable artifact downloads), `lease` (the attestation lease) and
//! `reports` (the spool and heartbeats).
//! Loading the model itself is [`crate::activation`]'s, shared with standalone `serve`.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgefleet_proto as proto;

use crate::activation::pins::{LocalPins, PinError, PinSource};
use crate::config::AgentConfig;
use crate::enrol::Source;
use crate::serve::Serving;

mod client;
mod control;
mod converge;
mod download;
mod lease;
mod reports;

pub use client::{DeviceClient, FETCHING_PATIENCE, FETCHING_POLL};
pub use control::{first_endpoint, jitter};
pub use download::fetch;
pub use lease::{LEASE_EXPIRED, Lease};

#[derive(Debug, Default)]
struct Shared {
    models: Vec<proto::ModelReport>,
    /// Bumped whenever `models` changes.
    models_version: u64,
    /// `models_version` of the last acknowledged report that carried models.
    acked_models_version: Option<u64>,
    /// Bumped at every new gateway session: an acknowledgement from an earlier
    /// session's gateway, arriving late, does not count.
    session: u64,
    spool: VecDeque<(proto::Report, Option<u64>)>,
    seq: u64,
    dropped: u64,
    client: Option<DeviceClient>,
    /// When the spool was last written to disk, while reports were not delivered.
    persisted: Option<std::time::Instant>,
}

/// The fleet agent: what it serves, its model states and report spool, and the
/// gateway session's client while connected.
pub struct FleetAgent {
    config: AgentConfig,
    serving: Arc<Serving>,
    shared: Mutex<Shared>,
    boot: String,
    active: tokio::sync::Mutex<Option<proto::DeviceModel>>,
    /// Model states changed since the last report was taken.
    models_changed: tokio::sync::Notify,
    /// The attestation lease (see the `lease` module).
    lease: Mutex<lease::LeaseState>,
    /// The device's own trust roots, which the gateway's signers are narrowed to.
    pins: tokio::sync::Mutex<LocalPins>,
    /// Set once the gateway answered an enrolment: from then on this process sends no
    /// bootstrap token, so a device an administrator deleted is not re-enrolled by the
    /// token it still holds in memory (a new one, in a restarted agent, enrols it).
    enrolled: std::sync::atomic::AtomicBool,
    /// The engine this agent loaded last and the model and revision it serves: what the
    /// serving counters of reports are tied to.
    served: Mutex<Option<Served>>,
    /// The revision served and its answers to its golden prompts (and load time), as
    /// reported with its `Ready`: said again whenever that state is reported again, so
    /// that a re-delivered revision keeps its answers in status.
    ready_report: Mutex<Option<ReadyReport>>,
}

/// The revision a `Ready` report was made for, its golden answers and load time.
type ReadyReport = (String, Vec<proto::GoldenAnswer>, Option<u64>);

/// An engine and the model (`namespace/name`) and revision it was loaded for.
type Served = (Arc<crate::engine::Engine>, String, String);

/// How long a change of model states waits for the changes right behind it (Loading
/// then Ready) before it is reported; also the least time between two reports.
pub const REPORT_COALESCE: Duration = Duration::from_millis(250);

impl std::fmt::Debug for FleetAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetAgent")
            .field("boot", &self.boot)
            .finish_non_exhaustive()
    }
}

impl FleetAgent {
    /// An agent with `config`, serving through `serving`. `Err` when the device's trust
    /// pins cannot be read ([`LocalPins::load`]).
    pub fn new(config: AgentConfig, serving: Arc<Serving>) -> Result<Arc<Self>, PinError> {
        let pins = LocalPins::load(&config)?;
        match pins.source() {
            PinSource::Unpinned if config.trust.first_use => tracing::warn!(
                dir = %config.trust.dir(&config.config_dir).display(),
                "no provisioned trust roots: the cluster's signers will be pinned at first contact (trust on first use)"
            ),
            PinSource::Unpinned => tracing::warn!(
                dir = %config.trust.dir(&config.config_dir).display(),
                "no provisioned trust roots and first use is off: every model is refused until the directory is provisioned"
            ),
            source => tracing::info!(?source, signers = pins.len(), "trust roots pinned"),
        }
        let mut b = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
        // Reports an earlier process could not deliver before it stopped (a power cut
        // during an outage) go first.
        let (spool, dropped) = reports::load_spool(&config.state_dir, config.fleet.spool_max);
        let persisted = (!spool.is_empty()).then(std::time::Instant::now);
        let shared = Shared {
            spool: spool.into_iter().map(|r| (r, None)).collect(),
            dropped,
            persisted,
            ..Shared::default()
        };
        Ok(Arc::new(Self {
            config,
            serving,
            shared: Mutex::new(shared),
            served: Mutex::new(None),
            ready_report: Mutex::new(None),
            boot: hex::encode(b),
            active: tokio::sync::Mutex::new(None),
            models_changed: tokio::sync::Notify::new(),
            lease: Mutex::default(),
            pins: tokio::sync::Mutex::new(pins),
            enrolled: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    fn set_model_state(
        &self,
        m: &proto::DeviceModel,
        state: proto::ModelState,
        message: Option<String>,
        load_millis: Option<u64>,
    ) {
        self.report_model(m, state, message, load_millis, Vec::new());
    }

    /// [`Self::set_model_state`] with the answers to the revision's golden prompts.
    fn report_model(
        &self,
        m: &proto::DeviceModel,
        state: proto::ModelState,
        message: Option<String>,
        load_millis: Option<u64>,
        golden: Vec<proto::GoldenAnswer>,
    ) {
        // Failures are named `Reason: detail`; the name travels on its own too, so that
        // the operator can tell a local refusal from a failure.
        let reason = message
            .as_deref()
            .filter(|_| state == proto::ModelState::Failed)
            .and_then(|m| m.split_once(':'))
            .map(|(r, _)| r)
            .filter(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric()))
            .map(str::to_owned);
        let report = proto::ModelReport {
            model: m.model.clone(),
            revision: m.revision.clone(),
            state,
            message,
            reason,
            load_millis,
            golden,
        };
        self.set_models(vec![report]);
    }

    /// Stops serving (the API answers as with no model), keeping the last-known-good on
    /// disk for when the device may serve again; the model is reported `Failed` with
    /// `reason: why`.
    async fn stop_serving(&self, reason: &str, why: &str) {
        let Some(m) = self.active.lock().await.take() else {
            return;
        };
        self.serving.uninstall();
        tracing::warn!(model = %m.model, revision = %m.revision, reason, "{reason}: {why}; stopped serving");
        self.set_model_state(
            &m,
            proto::ModelState::Failed,
            Some(format!("{reason}: {why}")),
            None,
        );
        crate::systemd::status(&format!("serving no model ({reason})"));
    }

    fn set_models(&self, models: Vec<proto::ModelReport>) {
        if let Ok(mut s) = self.shared.lock()
            && s.models != models
        {
            s.models = models;
            s.models_version += 1;
            drop(s);
            self.models_changed.notify_one();
        }
    }
}

/// What this machine is.
pub fn facts(tee: &str) -> proto::Facts {
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(1 << 30, |kb| kb * 1024);
    proto::Facts {
        arch: std::env::consts::ARCH.to_owned(),
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_bytes,
        accelerators: vec![],
        tee_kinds: vec![tee.to_owned()],
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Runs the agent in fleet mode: serve first (the last-known-good model, if any), then
/// connect. Returns when the server stops (SIGTERM, SIGINT).
pub async fn run(
    config: AgentConfig,
    source: Source,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.serve.listen).await?;
    let serving = Serving::new();
    let listen = config.serve.listen;
    let server = crate::serve::spawn(listener, serving.clone(), shutdown);
    let _watchdog = crate::systemd::spawn_watchdog();
    let agent = FleetAgent::new(config, serving.clone())?;
    agent.restore().await;
    if agent.active.lock().await.is_none() {
        serving.set_no_model();
    }
    crate::systemd::ready(&format!("agent listening on {listen}"));
    let reports = tokio::spawn(agent.clone().report_loop());
    let control = tokio::spawn(agent.clone().control_loop(source));
    let lease = tokio::spawn(agent.clone().lease_loop());
    let result = server.await;
    reports.abort();
    control.abort();
    lease.abort();
    result??;
    Ok(())
}
