//! The gateway's device API: enrolment (a bootstrap token for a new device), then, over mTLS with the
//! certificate attestation issued, the desired-state long-poll, reports (heartbeats with
//! model-state deltas, spooled while offline) and artifact downloads with `Range`.
//! The messages are in [`edgefleet_proto`]. One module per thing a device asks for:
//!
//! - `identity`: who a request may act as. rustls checks the client certificate's
//!   chain to the device CA and its validity. A request for `/v1/devices/{name}/…` must
//!   then carry a certificate naming `{name}` (SAN URI `edgefleet://device/{name}`)
//!   whose key is the one the EdgeDevice enrolled with. Anything else is refused by
//!   name, logged and counted (`Impersonation`, `KeyMismatch`,
//!   `ClientCertificateRequired`).
//! - `enrol`: `POST /v1/enrol` creates the EdgeDevice, approved or not by the
//!   [`Approval`] policy; `tokens`: the bootstrap token a new device needs
//!   (`EdgeBootstrapToken`s, or the optional shared lab token).
//! - `desired`: the desired-state long-poll.
//! - `report`: heartbeats with model states, and the status writes they cost.
//! - `artifacts`: artifact downloads, and mirroring assigned artifacts into the store.
//!
//! This module holds the [`Fleet`] itself: its settings, its watch caches (reflectors)
//! of EdgeDevices, EdgeModels and EdgeTrustPolicies, which wake a waiting poll when its
//! own device's relevant fields, a model's templates or a policy change, and its routes. The device cache is
//! shared with the EdgeModel reconciler ([`crate::device_cache`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use edgefleet_crds::{EdgeDevice, EdgeModel};
use futures::StreamExt as _;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use sha2::Digest as _;

use crate::device_cache::{DeviceFeed, SharedDevices};
use crate::gateway::error::Reason;
use crate::heartbeat::Heartbeats;
use crate::metrics::FleetCounters;

mod artifacts;

/// The hex of a `sha256:<64 lowercase hex>` digest, or `None` for anything else (a
/// digest a device or a request names, which must name a file and nothing more).
fn sha256_hex(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}
mod desired;
mod enrol;
mod identity;
mod keys;
mod report;
mod tokens;

pub use artifacts::{Unsatisfiable, parse_range};
pub use desired::DesiredQuery;
pub use enrol::{Approval, valid_name};
pub use identity::PeerCertificate;
pub use keys::KEY_BROKER_MANAGER;
pub use report::{MAX_CONCURRENT_WRITES, REPORT_MANAGER};
pub use tokens::MIN_SHARED_TOKEN_LEN;

/// Settings of the device API. Its `Debug` never shows the shared token.
#[derive(Clone)]
pub struct FleetConfig {
    /// Content-addressed artifact store: files named by their SHA-256 (hex).
    pub artifact_dir: PathBuf,
    /// Disk budget of the store: artifacts no EdgeModel references are removed, oldest
    /// first, until it fits ([`Fleet::collect_artifacts`]).
    pub artifact_budget_bytes: u64,
    /// Fetches assigned `https://` artifacts missing from the store
    /// ([`crate::gateway::mirror`]).
    pub mirror: Option<crate::gateway::mirror::Mirror>,
    /// Approval at enrolment.
    pub approval: Approval,
    /// The heartbeat lease (reports write status at most every third of it, unless
    /// model states change).
    pub heartbeat_lease: Duration,
    /// The shared lab token (any device name, never expires), if any: new devices
    /// enrol with it or with an `EdgeBootstrapToken`. At least
    /// [`MIN_SHARED_TOKEN_LEN`] characters, or it admits nothing.
    pub bootstrap_token: Option<String>,
    /// Refresh writes per second, fleet-wide (see the `report` module).
    pub refresh_per_second: f64,
    /// Report writes that carry a change, per second, fleet-wide (see the `report` module).
    pub change_per_second: f64,
    /// The attestation lease told to devices at enrolment: how long after its last
    /// successful attestation a device may serve without attesting again.
    pub attestation_lease: Duration,
}

impl std::fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetConfig")
            .field("artifact_dir", &self.artifact_dir)
            .field("artifact_budget_bytes", &self.artifact_budget_bytes)
            .field("mirror", &self.mirror)
            .field("approval", &self.approval)
            .field("heartbeat_lease", &self.heartbeat_lease)
            .field(
                "bootstrap_token",
                &self.bootstrap_token.as_ref().map(|_| "<redacted>"),
            )
            .field("refresh_per_second", &self.refresh_per_second)
            .field("change_per_second", &self.change_per_second)
            .field("attestation_lease", &self.attestation_lease)
            .finish()
    }
}

struct Inner {
    client: Client,
    devices: Store<EdgeDevice>,
    models: Store<EdgeModel>,
    notify: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    models_changed: tokio::sync::watch::Sender<u64>,
    heartbeats: Heartbeats,
    deliveries: Mutex<HashMap<String, report::Delivery>>,
    /// What the EdgeModel reconciler needs to plan on the device cache too.
    device_feed: DeviceFeed,
    /// The EdgeTrustPolicies (their signers go to devices), shared with the reconciler.
    policies: crate::trust_policy::TrustPolicies,
    writes: Arc<tokio::sync::Semaphore>,
    config: FleetConfig,
    tokens: tokens::Tokens,
    counters: Arc<FleetCounters>,
    /// Key releases not yet added to their EdgeModel's `status.keyReleases`, by model.
    key_releases: Mutex<HashMap<String, u64>>,
    /// Where events about EdgeDevices go (a released key), once set.
    events: Mutex<Option<kube::runtime::events::Recorder>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The device API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

/// What of a device the desired state depends on.
fn device_digest(d: &EdgeDevice) -> String {
    // Everything a device's desired state derives from (`rollout::desired`).
    let attestation = d.status.as_ref().and_then(|s| s.attestation.as_ref());
    let body = json!({
        "spec": d.spec,
        "labels": d.metadata.labels,
        "attested": crate::rollout::condition_true(d, edgefleet_crds::conditions::ATTESTED),
        "allowed": attestation.map(|a| a.allowed),
        "policy": attestation.map(|a| &a.policy),
        "kind": attestation.map(|a| a.tee_kind),
        "expiry": attestation.map(|a| a.expiry_time.0.to_string()),
    });
    hex::encode(sha2::Sha256::digest(body.to_string().as_bytes()))
}

/// A digest of what devices' desired states derive from in `m` (its spec, rollout
/// position, templates and deletion), so that a status write that only changes counts
/// wakes no device.
fn model_digest(m: &EdgeModel) -> String {
    let status = m.status.as_ref();
    let body = json!({
        "uid": m.metadata.uid,
        "deleting": m.metadata.deletion_timestamp.is_some(),
        "spec": m.spec,
        "current": status.map(|s| &s.current_revision),
        "stable": status.map(|s| &s.stable_revision),
        "rank": status.map(|s| s.rollout_rank),
        "revisions": status.map(|s| &s.revisions),
    });
    hex::encode(sha2::Sha256::digest(body.to_string().as_bytes()))
}

impl Fleet {
    /// The API over `client`, and the future that keeps its watch caches (run it for as
    /// long as the API serves). Wait for [`Fleet::ready`] before serving.
    pub fn new(
        client: Client,
        config: FleetConfig,
        counters: Arc<FleetCounters>,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (devices, device_writer) = reflector::store();
        let (models, model_writer) = reflector::store();
        let (models_changed, _) = tokio::sync::watch::channel(0u64);
        let (policies, keep_policies) = crate::trust_policy::TrustPolicies::watch(client.clone());
        let policy_changes = policies.changes();
        let inner = Arc::new(Inner {
            policies,
            heartbeats: Heartbeats::new(client.clone(), config.heartbeat_lease)
                .with_refresh_rate(config.refresh_per_second)
                .with_change_rate(config.change_per_second),
            writes: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_WRITES)),
            client: client.clone(),
            devices,
            models,
            notify: Mutex::new(HashMap::new()),
            models_changed,
            deliveries: Mutex::new(HashMap::new()),
            device_feed: DeviceFeed::default(),
            tokens: tokens::Tokens::new(config.bootstrap_token.clone()),
            config,
            counters,
            key_releases: Mutex::new(HashMap::new()),
            events: Mutex::new(None),
        });
        let fleet = Self { inner };
        let driver = {
            let fleet = fleet.clone();
            async move {
                let cfg = watcher::Config::default();
                // Managed fields are of no use here, and the largest part of a device.
                let device_events = reflector::reflector(
                    device_writer,
                    watcher(Api::<EdgeDevice>::all(client.clone()), cfg.clone())
                        .modify(|d: &mut EdgeDevice| d.managed_fields_mut().clear()),
                )
                .default_backoff()
                .touched_objects();
                let model_events =
                    reflector::reflector(model_writer, watcher(Api::<EdgeModel>::all(client), cfg))
                        .default_backoff()
                        .touched_objects();
                let mut seen_devices: HashMap<String, String> = HashMap::new();
                let mut seen_models: HashMap<String, String> = HashMap::new();
                let devices = device_events.for_each(|e| {
                    match e {
                        Ok(d) => {
                            fleet.inner.device_feed.applied(&d);
                            let digest = device_digest(&d);
                            let name = d.name_any();
                            if seen_devices.get(&name) != Some(&digest) {
                                seen_devices.insert(name.clone(), digest);
                                fleet.wake(&name);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "watching EdgeDevices"),
                    }
                    futures::future::ready(())
                });
                let models = model_events.for_each(|e| {
                    match e {
                        Ok(m) => {
                            let key = crate::rollout::model_key(&m);
                            let digest = model_digest(&m);
                            if seen_models.get(&key) != Some(&digest) {
                                seen_models.insert(key, digest);
                                fleet.prefetch(&m);
                                fleet.inner.models_changed.send_modify(|n| *n += 1);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "watching EdgeModels"),
                    }
                    futures::future::ready(())
                });
                // A policy change changes every device's trusted signers.
                let policies = policy_changes.for_each(|()| {
                    fleet.inner.models_changed.send_modify(|n| *n += 1);
                    futures::future::ready(())
                });
                futures::future::join4(devices, models, policies, keep_policies).await;
            }
        };
        (fleet, driver)
    }

    /// Liveness as this gateway sees it: sharing its memory of heartbeats and its write
    /// budget, sweeping over its cache. The leader runs [`Heartbeats::expire_loop`] on it.
    pub fn heartbeats(&self) -> Heartbeats {
        self.inner
            .heartbeats
            .clone()
            .with_cache(self.device_cache())
    }

    /// The watch cache of EdgeDevices (for sweeps that would otherwise list the fleet).
    pub fn device_cache(&self) -> Store<EdgeDevice> {
        self.inner.devices.clone()
    }

    /// The device cache as the EdgeModel reconciler plans on it, so that the leader
    /// keeps one copy of the fleet rather than two.
    pub fn shared_devices(&self) -> SharedDevices {
        let mut shared = self.inner.device_feed.share(self.inner.devices.clone());
        shared.policies = Some(self.inner.policies.clone());
        shared.models = Some(self.inner.models.clone());
        shared
    }

    /// Waits until the watch caches hold their first listing.
    pub async fn ready(&self) -> Result<(), String> {
        if !self.inner.policies.ready(Duration::from_secs(300)).await {
            return Err("the EdgeTrustPolicy cache did not fill".into());
        }
        self.inner
            .devices
            .wait_until_ready()
            .await
            .map_err(|e| e.to_string())?;
        self.inner
            .models
            .wait_until_ready()
            .await
            .map_err(|e| e.to_string())
    }

    /// Adds key releases to their EdgeModels' `status.keyReleases` every 5 s, for as
    /// long as it runs ([`Fleet::flush_key_releases`]).
    pub async fn key_release_loop(self) {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            self.flush_key_releases().await;
        }
    }

    /// Collects unreferenced artifacts every [`artifacts::COLLECT_EVERY`], for as long
    /// as it runs. Start it only after [`Fleet::ready`] returned: an unfilled model
    /// cache references nothing. (It does not wait on the caches itself: a cache's
    /// readiness wakes only its last waiter.)
    pub async fn collect_loop(self) {
        loop {
            self.collect_artifacts().await;
            tokio::time::sleep(artifacts::COLLECT_EVERY).await;
        }
    }

    fn wake(&self, device: &str) {
        if let Ok(map) = self.inner.notify.lock()
            && let Some(n) = map.get(device)
        {
            n.notify_waiters();
        }
    }

    fn notifier(&self, device: &str) -> Arc<tokio::sync::Notify> {
        match self.inner.notify.lock() {
            Ok(mut map) => map.entry(device.to_owned()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Publishes events about EdgeDevices (a released key) with `recorder`.
    pub fn set_events(&self, recorder: kube::runtime::events::Recorder) {
        if let Ok(mut e) = self.inner.events.lock() {
            *e = Some(recorder);
        }
    }

    /// Publishes a Normal event `reason` on `device`; a failure is logged.
    async fn publish_device_event(&self, device: &EdgeDevice, reason: &str, note: String) {
        let recorder = self.inner.events.lock().ok().and_then(|e| e.clone());
        if let Some(recorder) = recorder {
            crate::gateway::publish_on_device(
                &recorder,
                device,
                kube::runtime::events::EventType::Normal,
                reason,
                note,
                "ReleaseKey",
            )
            .await;
        }
    }

    fn count_refusal(&self, reason: Reason) {
        self.inner
            .counters
            .refusals
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: reason.as_str().into(),
            })
            .inc();
    }

    /// The routes (merge them into the gateway's router).
    pub fn router(self) -> Router {
        Router::new()
            .route("/v1/enrol", post(enrol::enrol))
            .route("/v1/devices/{name}/desired", get(desired::desired))
            .route("/v1/devices/{name}/report", post(report::report))
            .route(
                "/v1/devices/{name}/artifacts/{digest}",
                get(artifacts::artifact),
            )
            .route("/v1/devices/{name}/keys", post(keys::keys))
            .with_state(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_debug_form_of_the_settings_never_shows_the_shared_token() {
        let mut config = FleetConfig {
            artifact_dir: PathBuf::from("/var/lib/edgefleet/artifacts"),
            artifact_budget_bytes: 1 << 30,
            mirror: None,
            approval: Approval::Manual,
            heartbeat_lease: Duration::from_secs(30),
            bootstrap_token: Some("lab-token-that-must-not-leak-0123".into()),
            refresh_per_second: 10.0,
            change_per_second: 10.0,
            attestation_lease: Duration::from_secs(86_400),
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("lab-token-that-must-not-leak"), "{shown}");
        assert!(
            shown.contains("bootstrap_token: Some(\"<redacted>\")"),
            "{shown}"
        );
        config.bootstrap_token = None;
        assert!(format!("{config:?}").contains("bootstrap_token: None"));
    }
}
