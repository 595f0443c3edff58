//! The EdgeModel reconciler (controller-rs shape): `finalizer()` as the one top-level
//! step; Apply plans the rollout with [`crate::rollout::plan`] and writes the result;
//! Cleanup unassigns the model from every device and waits until no ready device still
//! reports it before the finalizer is released.
//!
//! Writes (module `writes`):
//! - the EdgeModel status, with server-side apply under [`STATUS_MANAGER`], only when it
//!   changed (no no-op patches). Nothing is written per device: the status holds the
//!   rollout position (`rolloutRank`) every device derives its revision from
//!   ([`rollout::desired`]), so a step of a rollout to any number of devices is one
//!   write;
//! - Events for rollout steps, gate failures, rollbacks, revocations and signature
//!   failures.
//!
//! Reads: the EdgeModel itself is read fresh; devices come from a watch cache (a
//! reflector, managed fields stripped), because listing a large fleet on every
//! reconcile is what stops a rollout from scaling. A reconcile never plans on a cache
//! that is not filled yet ([`DeviceCache::caught_up`]). The planner writes no device,
//! so it never has to wait for its own device writes to come back through the watch.

use std::sync::Arc;
use std::time::Duration;

use edgefleet_crds::conditions::reasons;
use edgefleet_crds::{EdgeDevice, EdgeModel, ModelPhase};
use futures::{FutureExt as _, StreamExt};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt};

use crate::device_cache::SharedDevices;
use crate::rollout;
use crate::trust_policy::TrustPolicies;

mod verify;
mod writes;

/// Finalizer on every EdgeModel.
pub const FINALIZER: &str = "edgefleet.io/unassign";
/// Field manager of EdgeModel status writes.
pub const STATUS_MANAGER: &str = "edgefleet-operator";
/// Requeue while a rollout moves (pause and ready timers).
pub const REQUEUE_PROGRESSING: Duration = Duration::from_secs(5);
/// Requeue when settled (attestation expiry is checked at least this often).
pub const REQUEUE_SETTLED: Duration = Duration::from_secs(60);
/// Backoff bounds of failed reconciles.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Upper bound of the backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Reconciler errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[source] Box<kube::Error>),
    /// Finalizer handling failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// Deletion waits for devices that still report the model.
    #[error("{0} device(s) still report the model; waiting before releasing the finalizer")]
    StillLoaded(usize),
    /// The device cache is not filled yet.
    #[error("the device cache is not filled yet")]
    CacheBehind,
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Self::Kube(Box::new(e))
    }
}

impl Error {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "KubeApi",
            Self::Finalizer(_) => "Finalizer",
            Self::StillLoaded(_) => "StillLoaded",
            Self::CacheBehind => "CacheBehind",
        }
    }
}

/// How long a reconcile waits for the device cache to see its own last writes before
/// it gives up and requeues.
pub const CACHE_WAIT: Duration = Duration::from_secs(10);

/// The device watch cache.
#[derive(Clone, Debug)]
pub struct DeviceCache {
    store: Store<EdgeDevice>,
}

impl DeviceCache {
    /// Waits until the cache is filled; false when that takes longer than
    /// [`CACHE_WAIT`].
    pub async fn caught_up(&self) -> bool {
        self.caught_up_within(CACHE_WAIT).await
    }

    async fn caught_up_within(&self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.store.wait_until_ready())
            .await
            .is_ok()
    }

    /// Every device in the cache.
    pub fn devices(&self) -> Vec<EdgeDevice> {
        self.store.state().iter().map(|d| (**d).clone()).collect()
    }
}

/// Where the reconciler gets what devices are and report, beyond its own watch.
#[derive(Debug, Default)]
pub struct Sources {
    /// Model states devices reported to this replica's gateway ([`crate::reported`]).
    pub reported: Option<crate::reported::Reported>,
    /// The gateway's device cache (and its trust-policy cache); without it the
    /// reconciler watches devices and policies itself.
    pub devices: Option<SharedDevices>,
    /// With several gateway replicas: this replica, and where the others publish the
    /// reports their devices' status does not show yet ([`crate::replicas`]).
    pub replicas: Option<ReplicaSource>,
}

/// Where the other gateway replicas' pending reports are.
#[derive(Debug, Clone)]
pub struct ReplicaSource {
    /// This replica's identity.
    pub identity: String,
    /// The namespace of the EdgeGatewayReplica objects.
    pub namespace: String,
    /// The heartbeat lease: a replica's publication older than this is ignored.
    pub lease: Duration,
}

/// What reconciles share.
pub struct Context {
    client: Client,
    devices: DeviceCache,
    recorder: Recorder,
    metrics: Arc<crate::metrics::Metrics>,
    /// Consecutive failed reconciles per EdgeModel (`namespace/name`), for its backoff.
    failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    bundles: Option<crate::bundles::BundleFetcher>,
    /// Model states devices reported to this replica's gateway ([`crate::reported`]).
    reported: Option<crate::reported::Reported>,
    /// The cluster's EdgeTrustPolicies.
    policies: TrustPolicies,
    /// The other replicas' pending reports, and this replica.
    replicas: Option<(Store<edgefleet_crds::EdgeGatewayReplica>, ReplicaSource)>,
}

impl Context {
    /// The devices to plan on: the cache, with the model states devices reported to
    /// this replica laid over their recorded status.
    fn devices(&self) -> Vec<EdgeDevice> {
        let mut devices = self.devices.devices();
        let me = self.replicas.as_ref().map(|(_, s)| s.identity.as_str());
        if let Some(r) = &self.reported {
            // With several replicas, this one's memory counts only for the devices that
            // report to it now (one that moved away may have newer news elsewhere).
            r.overlay_where(&mut devices, |d| {
                let owner = d.status.as_ref().and_then(|s| s.gateway.as_deref());
                me.is_none() || owner.is_none() || owner == me
            });
        }
        if let Some((store, source)) = &self.replicas {
            crate::replicas::overlay_published(
                &mut devices,
                &store.state(),
                me,
                source.lease,
                k8s_openapi::jiff::Timestamp::now(),
            );
        }
        devices
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

#[tracing::instrument(skip(model, ctx), fields(model = %rollout::model_key(&model)))]
async fn apply(model: Arc<EdgeModel>, ctx: Arc<Context>) -> Result<Action, Error> {
    let now = k8s_openapi::jiff::Timestamp::now();
    // The model fresh; the devices from the cache once it has seen this reconciler's
    // own writes (module docs).
    let models: Api<EdgeModel> =
        Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
    let Some(model) = models.get_opt(&model.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if !ctx.devices.caught_up().await {
        tracing::warn!("the device cache is not filled yet; trying again");
        return Ok(Action::requeue(BACKOFF_MIN));
    }
    if !ctx.policies.ready(CACHE_WAIT).await {
        tracing::warn!("the EdgeTrustPolicy cache is not filled yet; trying again");
        return Ok(Action::requeue(BACKOFF_MIN));
    }
    let devices = ctx.devices();
    let verified = verify::verify(&model, ctx.bundles.as_ref(), &ctx.policies.policies()).await;
    let trust = rollout::Trust {
        signature: &verified.signature,
        pools: &verified.pools,
        withdrawn: &verified.withdrawn,
    };
    let mut plan = rollout::plan(&model, &devices, &trust, now);
    // Keep what devices may run: the current and stable revisions, never a withdrawn
    // one (devices derive nothing else).
    let key = rollout::model_key(&model);
    let mut keep: std::collections::BTreeSet<String> = [
        plan.status.current_revision.clone(),
        plan.status.stable_revision.clone(),
    ]
    .into_iter()
    .flatten()
    .collect();
    keep.retain(|r| !verified.withdrawn.contains_key(r));
    plan.status.revisions = rollout::keep_templates(
        &verified.kept,
        verified.template.filter(|_| verified.signature.is_ok()),
        &keep,
    );
    let model = Arc::new(model);
    ctx.metrics.record_rollout(&key, &plan.status);
    let ready = devices
        .iter()
        .filter(|d| rollout::condition_true(d, edgefleet_crds::conditions::READY))
        .count();
    ctx.metrics.record_devices(ready, devices.len() - ready);
    // One write, whatever the fleet's size: devices derive what they run from it.
    writes::write_status(&ctx.client, &model, &plan.status).await?;
    writes::publish(&ctx.recorder, &model, &plan.events).await;
    Ok(Action::requeue(
        if plan.status.phase == Some(ModelPhase::Progressing) {
            REQUEUE_PROGRESSING
        } else {
            REQUEUE_SETTLED
        },
    ))
}

async fn cleanup(model: Arc<EdgeModel>, ctx: Arc<Context>) -> Result<Action, Error> {
    // A model being deleted is derived onto no device (`rollout::desired`); wait until
    // no ready device still reports it.
    let key = rollout::model_key(&model);
    let mut still = 0;
    // An error, not a requeue: a cleanup that returns Ok releases the finalizer.
    if !ctx.devices.caught_up().await {
        return Err(Error::CacheBehind);
    }
    for device in ctx.devices() {
        let ready = rollout::condition_true(&device, edgefleet_crds::conditions::READY);
        let reports = device
            .status
            .as_ref()
            .is_some_and(|s| s.models.iter().any(|m| m.model == key));
        // A device that is gone dark cannot report the unload; it drops the model when
        // it reconnects and finds no assignment.
        if ready && reports {
            still += 1;
        }
    }
    if still > 0 {
        return Err(Error::StillLoaded(still));
    }
    writes::publish(
        &ctx.recorder,
        &model,
        &[(
            EventType::Normal,
            reasons::UNASSIGNED,
            format!("{key} unassigned from every device"),
        )],
    )
    .await;
    Ok(Action::await_change())
}

async fn reconcile(model: Arc<EdgeModel>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_inner(model, ctx.clone()).await;
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    let label = crate::metrics::ResultLabel {
        result: if result.is_ok() { "ok" } else { "error" }.into(),
    };
    ctx.metrics.reconciles.get_or_create(&label).inc();
    if let Err(e) = &result {
        ctx.metrics
            .failures
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: e.reason().into(),
            })
            .inc();
    }
    result
}

async fn reconcile_inner(model: Arc<EdgeModel>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<EdgeModel> =
        Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
    let key = rollout::model_key(&model);
    let result = finalizer(&api, FINALIZER, model, |event| async {
        match event {
            Finalizer::Apply(m) => apply(m, ctx.clone()).await,
            Finalizer::Cleanup(m) => cleanup(m, ctx.clone()).await,
        }
    })
    .await;
    match result {
        Ok(action) => {
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(&key);
            }
            Ok(action)
        }
        Err(kube::runtime::finalizer::Error::ApplyFailed(e))
        | Err(kube::runtime::finalizer::Error::CleanupFailed(e)) => Err(e),
        Err(e) => Err(Error::Finalizer(e.to_string())),
    }
}

fn error_policy(model: Arc<EdgeModel>, error: &Error, ctx: Arc<Context>) -> Action {
    let n = match ctx.failures.lock() {
        Ok(mut f) => {
            let n = f.entry(rollout::model_key(&model)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    // Capped exponential backoff with jitter.
    let base = BACKOFF_MIN.saturating_mul(1 << n.min(6)).min(BACKOFF_MAX);
    let jitter =
        Duration::from_millis(u64::from(rand_jitter()) % (base.as_millis() as u64 / 4 + 1));
    tracing::warn!(model = %rollout::model_key(&model), reason = error.reason(), %error, "reconcile failed");
    Action::requeue(base + jitter)
}

fn rand_jitter() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// Runs the EdgeModel controller until the process is asked to stop (bundles given by
/// URI are not fetched).
pub async fn run(client: Client) {
    run_with(client, Arc::default(), None, Sources::default()).await;
}

/// The device cache and its trigger: every device event (once the cache holds it)
/// reconciles every model, since a device change can change any model's candidates
/// and counts. From `shared` when given, else from a watch of this reconciler's own.
fn device_cache(
    client: &Client,
    shared: Option<SharedDevices>,
) -> (DeviceCache, futures::stream::BoxStream<'static, ()>) {
    if let Some(shared) = shared {
        let cache = DeviceCache {
            store: shared.store,
        };
        let ticks = futures::stream::unfold(shared.changes, |mut rx| async move {
            rx.changed().await.ok()?;
            rx.borrow_and_update();
            Some(((), rx))
        });
        return (cache, ticks.boxed());
    }
    let (store, writer) = reflector::store();
    let cache = DeviceCache { store };
    let events = reflector::reflector(
        writer,
        watcher(
            Api::<EdgeDevice>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|d: &mut EdgeDevice| d.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects()
    .filter_map(move |r| {
        let trigger = match r {
            Ok(_) => Some(()),
            Err(e) => {
                tracing::warn!(error = %e, "watching EdgeDevices");
                None
            }
        };
        futures::future::ready(trigger)
    });
    (cache, events.boxed())
}

/// [`run`], recording into `metrics`, fetching URI bundles with `bundles`, and
/// planning on `sources`: the gateway's device cache and the model states devices
/// report to it, when this replica runs one (without them, on a watch of its own and
/// the recorded `EdgeDevice.status` alone).
pub async fn run_with(
    client: Client,
    metrics: Arc<crate::metrics::Metrics>,
    bundles: Option<crate::bundles::BundleFetcher>,
    sources: Sources,
) {
    let models: Api<EdgeModel> = Api::all(client.clone());
    // The gateway's policy cache when it shares one, else a watch of this reconciler's.
    let shared = sources.devices.as_ref().and_then(|d| d.policies.clone());
    let (policies, keep_policies) = match shared {
        Some(p) => (p, futures::future::pending().boxed()),
        None => {
            let (p, driver) = TrustPolicies::watch(client.clone());
            (p, driver.boxed())
        }
    };
    let (devices, device_events) = device_cache(&client, sources.devices);
    let reported = sources.reported;
    // The other replicas' publications, and a reconcile of every model when they change.
    let (replicas, replica_events) = match sources.replicas {
        Some(source) => {
            let (store, writer) = reflector::store();
            let events = reflector::reflector(
                writer,
                watcher(
                    Api::<edgefleet_crds::EdgeGatewayReplica>::namespaced(
                        client.clone(),
                        &source.namespace,
                    ),
                    watcher::Config::default(),
                ),
            )
            .default_backoff()
            .touched_objects()
            .filter_map(|r| futures::future::ready(r.ok().map(|_| ())));
            (Some((store, source)), events.boxed())
        }
        None => (None, futures::stream::pending().boxed()),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        devices,
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "edgefleet-operator".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        failures: std::sync::Mutex::default(),
        metrics,
        bundles,
        reported: reported.clone(),
        policies: policies.clone(),
        replicas,
    });
    let reports = match reported {
        Some(r) => r.changes().boxed(),
        None => futures::stream::pending().boxed(),
    };
    // A policy change re-plans every model: a revision may be withdrawn, a pool bound.
    let controller = Controller::new(models, watcher::Config::default())
        .reconcile_all_on(device_events)
        .reconcile_all_on(reports)
        .reconcile_all_on(replica_events)
        .reconcile_all_on(policies.changes())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile");
            }
        });
    tokio::select! {
        () = controller => {}
        () = keep_policies => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use kube::runtime::watcher::Event;
    use serde_json::json;

    fn device(name: &str, rv: u64) -> EdgeDevice {
        let mut d: EdgeDevice = serde_json::from_value(json!({
            "apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDevice",
            "metadata": {"name": name, "resourceVersion": rv.to_string()},
            "spec": {"facts": {"arch": "x86_64", "cpuCores": 1, "memory": "1Gi",
                "agentKeyFingerprint": format!("sha256:{}", "0".repeat(64))}},
        }))
        .unwrap();
        d.metadata.resource_version = Some(rv.to_string());
        d
    }

    #[tokio::test]
    async fn a_reconcile_waits_for_the_cache_to_be_filled() {
        let (store, mut writer) = reflector::store::<EdgeDevice>();
        let cache = DeviceCache { store };
        let short = Duration::from_millis(100);
        // Not filled yet: never plan on an empty cache.
        assert!(!cache.caught_up_within(short).await);
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitApply(device("a", 3)));
        assert!(!cache.caught_up_within(short).await);
        writer.apply_watcher_event(&Event::InitDone);
        assert!(cache.caught_up_within(short).await);
        assert_eq!(cache.devices().len(), 1);
    }

    #[tokio::test]
    async fn a_shared_cache_triggers_per_event() {
        let (store, mut writer) = reflector::store::<EdgeDevice>();
        let (tick, changes) = tokio::sync::watch::channel(0u64);
        // Never contacted: a shared cache needs no watch of its own.
        let client =
            Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let (cache, mut triggers) = device_cache(
            &client,
            Some(SharedDevices {
                store,
                seen: Arc::default(),
                changes,
                policies: None,
                models: None,
            }),
        );
        let short = Duration::from_millis(100);
        // Nothing happened: no trigger, and an unfilled cache is not planned on.
        assert!(tokio::time::timeout(short, triggers.next()).await.is_err());
        assert!(!cache.caught_up_within(short).await);
        // The owner applies events and ticks.
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitApply(device("a", 3)));
        writer.apply_watcher_event(&Event::InitDone);
        tick.send_modify(|n| *n += 1);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), triggers.next()).await,
            Ok(Some(()))
        );
        assert!(cache.caught_up_within(short).await);
        assert_eq!(cache.devices().len(), 1);
    }
}
