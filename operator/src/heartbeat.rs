//! Device liveness: the `Ready` condition and `lastHeartbeatTime` of EdgeDevices,
//! owned by their own server-side-apply field manager ([`HEARTBEAT_MANAGER`]).
//!
//! Liveness is decided from memory, and the API server is told about changes:
//! - [`Heartbeats::seen`] notes every report in memory (on the replica the device
//!   reports to). [`Heartbeats::expire`] turns `Ready` False (reason `HeartbeatExpired`) on
//!   devices silent for longer than the lease, by the later of that memory, the
//!   recorded `lastHeartbeatTime` and the time this leader started (a new leader gives
//!   every device one lease to reach it). The EdgeModel reconciler then moves them to
//!   nothing new; they keep (and go on serving) what they have.
//! - [`Heartbeats::record`] writes `Ready` True at once when a device was not Ready.
//!   For a Ready device it refreshes `lastHeartbeatTime` at most every third of the
//!   lease, and only with a token from a fleet-wide budget ([`Heartbeats::try_refresh`],
//!   shared with the gateway's periodic report writes). So refresh writes per second
//!   are bounded by the budget however many devices there are and however often they
//!   heartbeat; with more devices, `lastHeartbeatTime` is refreshed less often (about
//!   every N / budget seconds), which is why the sweep does not rely on it alone.
//! - The gateway's report writes that carry a change of model states take a token from
//!   a second budget ([`Heartbeats::try_change`]); the states themselves are kept in
//!   memory ([`Heartbeats::reported`]) for the reconciler, which does not wait for them.
//!
//! With several gateway replicas ([`Heartbeats::with_replica`], [`crate::replicas`]),
//! each judges the devices that report to it: [`Heartbeats::record`] writes the
//! replica's identity into `status.gateway` at once when a device arrives from another
//! replica (not within the refresh budget, so that the replica it left stops judging
//! it), and [`Heartbeats::expire`] sweeps only the devices whose `status.gateway` names
//! this replica. The leader ([`Heartbeats::sweep_orphans`]) also sweeps the devices no
//! replica holds: those with no `status.gateway`, and those of a replica whose presence
//! Lease ran out, counting their silence from that replica's last renewal
//! ([`watch_since`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgefleet_crds::EdgeDevice;
use edgefleet_crds::conditions::{self, reasons};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// Field manager of `Ready` and `lastHeartbeatTime`.
pub const HEARTBEAT_MANAGER: &str = "edgefleet-heartbeat";

/// Reason of a Ready condition set by a heartbeat.
pub const HEARTBEAT_RECEIVED: &str = "HeartbeatReceived";

/// The device's `Ready` condition and last heartbeat, if any.
fn ready_of(
    device: &EdgeDevice,
) -> (
    Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    Option<Timestamp>,
) {
    let status = device.status.as_ref();
    let ready = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == conditions::READY));
    let last = status
        .and_then(|s| s.last_heartbeat_time.as_ref())
        .map(|t| t.0);
    (ready, last)
}

/// Whether `device` should be marked not ready at `now`: it is Ready but its last
/// heartbeat (or none) is older than `lease`.
pub fn expired(device: &EdgeDevice, now: Timestamp, lease: Duration) -> bool {
    expired_since(device, None, now, lease)
}

/// [`expired`], counting `seen` (a heartbeat known in memory, or the time liveness
/// started being watched) as a heartbeat too.
fn expired_since(
    device: &EdgeDevice,
    seen: Option<Timestamp>,
    now: Timestamp,
    lease: Duration,
) -> bool {
    let (ready, last) = ready_of(device);
    let ready = ready.is_some_and(|c| c.status == "True");
    let lease = SignedDuration::try_from(lease).unwrap_or(SignedDuration::MAX);
    // `None` orders below every `Some`: the later of the two, or whichever there is.
    let last = last.max(seen);
    ready && last.is_none_or(|t| t + lease < now)
}

/// From when `device`'s silence counts for the replica `me`, or `None` when another
/// replica judges it (module docs). `owner` is the device's `status.gateway`;
/// `replicas`, only on the leader, the replicas' presence renewals; `remembered` the
/// device's last heartbeat in this replica's memory; `since` when this replica started
/// watching.
pub fn watch_since(
    owner: Option<&str>,
    me: Option<&str>,
    replicas: Option<&HashMap<String, (Timestamp, Duration)>>,
    remembered: Option<Timestamp>,
    since: Timestamp,
    now: Timestamp,
) -> Option<Timestamp> {
    let mine = remembered.max(Some(since));
    match (me, owner) {
        (None, _) => mine,
        (Some(me), Some(o)) if o == me => mine,
        _ => {
            let replicas = replicas?;
            match owner.and_then(|o| replicas.get(o).map(|r| (o, r))) {
                None => mine,
                Some((_, (renewed, duration))) => {
                    if crate::replicas::alive(*renewed, *duration, now) {
                        None
                    } else {
                        mine.max(Some(*renewed))
                    }
                }
            }
        }
    }
}

/// Refresh writes per second the fleet may cost by default.
pub const DEFAULT_REFRESH_PER_SECOND: f64 = 20.0;

/// Default budget of report writes that carry a change, fleet-wide, per second. A
/// rollout to N devices produces N such changes; the reconciler reads them from memory
/// ([`crate::reported`]), so within the budget the API server's writes go to the
/// assignments first and the device statuses catch up at this rate.
pub const DEFAULT_CHANGE_PER_SECOND: f64 = 50.0;

/// A token bucket: `rate` tokens a second, at most `burst` saved.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: std::time::Instant,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        let rate = if rate.is_finite() { rate.max(0.0) } else { 0.0 };
        // A second's worth saved, so that a quiet moment is not lost entirely.
        let burst = if rate > 0.0 {
            rate.max(1.0).floor()
        } else {
            0.0
        };
        Self {
            rate,
            burst,
            tokens: burst,
            at: std::time::Instant::now(),
        }
    }

    fn take(&mut self, now: std::time::Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Writes device liveness. Clones share the memory of heartbeats and the budget.
#[derive(Debug, Clone)]
pub struct Heartbeats {
    api: Api<EdgeDevice>,
    lease: Duration,
    cache: Option<kube::runtime::reflector::Store<EdgeDevice>>,
    /// The latest heartbeat of each device, in memory.
    seen: Arc<Mutex<HashMap<String, Timestamp>>>,
    /// When this instance started watching liveness.
    since: Timestamp,
    /// The fleet-wide budget of refresh writes.
    refresh: Arc<Mutex<Bucket>>,
    /// The fleet-wide budget of report writes that carry a change.
    changes: Arc<Mutex<Bucket>>,
    /// Model states as reported, in memory.
    reported: crate::reported::Reported,
    /// This replica, when there are several ([`Heartbeats::with_replica`]); shared by
    /// clones.
    replica: Arc<std::sync::OnceLock<Replica>>,
    /// The fleet-wide budgets as configured (refresh, change), and how many replicas
    /// share them now ([`Heartbeats::share_among`]).
    budgets: Arc<Mutex<(f64, f64, usize)>>,
}

/// A replica's identity, where replicas announce themselves, and whether it leads.
struct Replica {
    identity: String,
    client: Client,
    namespace: String,
    orphans: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("identity", &self.identity)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Heartbeats {
    /// Liveness with a lease of `lease` and the default refresh budget.
    pub fn new(client: Client, lease: Duration) -> Self {
        Self {
            api: Api::all(client),
            lease,
            cache: None,
            seen: Arc::default(),
            since: Timestamp::now(),
            refresh: Arc::new(Mutex::new(Bucket::new(DEFAULT_REFRESH_PER_SECOND))),
            changes: Arc::new(Mutex::new(Bucket::new(DEFAULT_CHANGE_PER_SECOND))),
            reported: crate::reported::Reported::default(),
            replica: Arc::default(),
            budgets: Arc::new(Mutex::new((
                DEFAULT_REFRESH_PER_SECOND,
                DEFAULT_CHANGE_PER_SECOND,
                1,
            ))),
        }
    }

    /// Shares the fleet-wide budgets among `replicas` live replicas: each spends its
    /// share (rate / replicas), so the API server sees the configured rate however many
    /// replicas serve devices.
    pub fn share_among(&self, replicas: usize) {
        let replicas = replicas.max(1);
        let Ok(mut b) = self.budgets.lock() else {
            return;
        };
        if b.2 == replicas {
            return;
        }
        b.2 = replicas;
        let n = replicas as f64;
        if let Ok(mut r) = self.refresh.lock() {
            *r = Bucket::new(b.0 / n);
        }
        if let Ok(mut c) = self.changes.lock() {
            *c = Bucket::new(b.1 / n);
        }
    }

    /// This replica's share of the (refresh, change) budgets, writes per second.
    pub fn budget_share(&self) -> (f64, f64) {
        self.budgets
            .lock()
            .map(|b| (b.0 / b.2 as f64, b.1 / b.2 as f64))
            .unwrap_or((0.0, 0.0))
    }

    /// Judges liveness as the replica `identity` among several, whose presence Leases
    /// are in `namespace` (module docs), for this instance and every clone. Set once;
    /// a later call changes nothing.
    pub fn with_replica(self, identity: String, namespace: &str) -> Self {
        let _ = self.replica.set(Replica {
            identity,
            client: self.api.clone().into_client(),
            namespace: namespace.to_owned(),
            orphans: std::sync::atomic::AtomicBool::new(false),
        });
        self
    }

    /// From now on (the leader), also sweeps the devices no live replica holds.
    pub fn sweep_orphans(&self) {
        if let Some(r) = self.replica.get() {
            r.orphans.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn identity(&self) -> Option<&str> {
        self.replica.get().map(|r| r.identity.as_str())
    }

    /// Sets the budget of report writes that carry a change (model states, dropped
    /// reports; writes per second, fleet-wide; 0 defers every one).
    pub fn with_change_rate(self, per_second: f64) -> Self {
        if let Ok(mut b) = self.changes.lock() {
            *b = Bucket::new(per_second);
        }
        if let Ok(mut b) = self.budgets.lock() {
            *b = (b.0, per_second, 1);
        }
        self
    }

    /// Takes a token for one report write that carries a change; false when the budget
    /// is spent (the change waits for a later report).
    pub fn try_change(&self) -> bool {
        self.changes
            .lock()
            .map(|mut b| b.take(std::time::Instant::now()))
            .unwrap_or(false)
    }

    /// The model states devices reported to this replica (shared by clones).
    pub fn reported(&self) -> crate::reported::Reported {
        self.reported.clone()
    }

    /// Sets the refresh budget (writes per second, fleet-wide; 0 refreshes nothing).
    pub fn with_refresh_rate(self, per_second: f64) -> Self {
        if let Ok(mut b) = self.refresh.lock() {
            *b = Bucket::new(per_second);
        }
        if let Ok(mut b) = self.budgets.lock() {
            *b = (per_second, b.1, 1);
        }
        self
    }

    /// Notes a heartbeat from `device` at `now`, in memory only.
    pub fn seen(&self, device: &str, now: Timestamp) {
        if let Ok(mut seen) = self.seen.lock() {
            let t = seen.entry(device.to_owned()).or_insert(now);
            *t = (*t).max(now);
        }
    }

    /// Takes a token for one refresh write (a write that only keeps a timestamp or a
    /// statistic fresh); false when the budget is spent.
    pub fn try_refresh(&self) -> bool {
        self.refresh
            .lock()
            .map(|mut b| b.take(std::time::Instant::now()))
            .unwrap_or(false)
    }

    /// The latest heartbeat of `device` in memory.
    fn remembered(&self, device: &str) -> Option<Timestamp> {
        self.seen.lock().ok().and_then(|s| s.get(device).copied())
    }

    /// Sweeps over `cache` (a watch cache of every EdgeDevice) instead of listing the
    /// fleet from the API server every quarter lease. A heartbeat written just before a
    /// sweep may not be in the cache yet; such a device turns not Ready and Ready again
    /// at its next report, which writes at once when the device is not Ready.
    pub fn with_cache(mut self, cache: kube::runtime::reflector::Store<EdgeDevice>) -> Self {
        self.cache = Some(cache);
        self
    }

    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        device: &EdgeDevice,
        ready: bool,
        reason: &str,
        message: String,
        heartbeat: Option<Timestamp>,
        gateway: Option<&str>,
        now: Timestamp,
    ) -> Result<(), kube::Error> {
        let (previous, _) = ready_of(device);
        let status = if ready { "True" } else { "False" };
        let since = previous
            .filter(|c| c.status == status)
            .map_or(Time(now), |c| c.last_transition_time.clone());
        let mut st = json!({
            "conditions": [{
                "type": conditions::READY, "status": status, "reason": reason,
                "message": message, "lastTransitionTime": since,
                "observedGeneration": device.metadata.generation,
            }],
        });
        if let Some(t) = heartbeat {
            st["lastHeartbeatTime"] = json!(Time(t));
        }
        // Omitted, the field this manager set before is removed: a device marked not
        // ready belongs to no replica until it reports again.
        if let Some(g) = gateway {
            st["gateway"] = json!(g);
        }
        let mut patch =
            json!({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDevice", "status": st});
        // Marking a device not ready is conditional on the device being as this replica
        // read it: with a stale cache it could undo another replica's newer claim.
        if !ready {
            patch["metadata"] = json!({"resourceVersion": device.metadata.resource_version});
        }
        self.api
            .patch_status(
                &device.name_any(),
                &PatchParams::apply(HEARTBEAT_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(|_| ())
    }

    /// Records a heartbeat from `device` at `now`: in memory always; in the status when
    /// the device was not Ready, or as a refresh (module docs). Returns whether it wrote.
    pub async fn record(&self, device: &EdgeDevice, now: Timestamp) -> Result<bool, kube::Error> {
        self.seen(&device.name_any(), now);
        let (ready, last) = ready_of(device);
        let is_ready = ready.is_some_and(|c| c.status == "True");
        // A device that arrives from another replica is claimed at once, so that the
        // replica it left stops judging it.
        let owner = device.status.as_ref().and_then(|s| s.gateway.as_deref());
        let arrived = self.identity().is_some_and(|me| owner != Some(me));
        let coalesce = SignedDuration::try_from(self.lease / 3).unwrap_or(SignedDuration::ZERO);
        if is_ready && !arrived && last.is_some_and(|t| t + coalesce > now) {
            return Ok(false);
        }
        if is_ready && !arrived && !self.try_refresh() {
            return Ok(false);
        }
        self.apply(
            device,
            true,
            HEARTBEAT_RECEIVED,
            "the agent heartbeats within its lease".into(),
            Some(now),
            self.identity(),
            now,
        )
        .await?;
        Ok(true)
    }

    /// Marks not ready every device whose heartbeat is older than the lease. Returns
    /// the devices changed.
    pub async fn expire(&self, now: Timestamp) -> Result<Vec<String>, kube::Error> {
        let mut changed = Vec::new();
        let replicas = match self.replica.get() {
            Some(r) if r.orphans.load(std::sync::atomic::Ordering::SeqCst) => {
                Some(crate::replicas::renewals(r.client.clone(), &r.namespace).await?)
            }
            _ => None,
        };
        for device in crate::device_status::all_devices(&self.api, self.cache.as_ref()).await? {
            let device = device.as_ref();
            let name = device.name_any();
            let owner = device.status.as_ref().and_then(|s| s.gateway.as_deref());
            let Some(since) = watch_since(
                owner,
                self.identity(),
                replicas.as_ref(),
                self.remembered(&name),
                self.since,
                now,
            ) else {
                continue;
            };
            if expired_since(device, Some(since), now, self.lease) {
                let (_, recorded) = ready_of(device);
                let last = recorded.max(self.remembered(&name));
                // Whole seconds, as metav1.Time keeps them.
                let last = last.and_then(|t| Timestamp::from_second(t.as_second()).ok());
                match self
                    .apply(
                        device,
                        false,
                        reasons::HEARTBEAT_EXPIRED,
                        format!("no heartbeat for more than {} s", self.lease.as_secs()),
                        last,
                        None,
                        now,
                    )
                    .await
                {
                    // Changed since the cache saw it (it reported elsewhere, say):
                    // judged again at the next sweep.
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    other => other?,
                }
                changed.push(name);
            }
        }
        Ok(changed)
    }

    /// Sweeps every quarter lease until dropped.
    pub async fn expire_loop(self) {
        loop {
            tokio::time::sleep(self.lease / 4).await;
            match self.expire(Timestamp::now()).await {
                Ok(changed) if !changed.is_empty() => {
                    tracing::info!(?changed, "heartbeat leases expired");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "expiring heartbeat leases"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Bucket, watch_since};
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    #[test]
    fn each_replica_judges_its_own_devices_and_the_leader_those_of_gone_replicas() {
        let t = |s: i64| Timestamp::from_second(1_700_000_000 + s).unwrap();
        let now = t(100);
        let lease = Duration::from_secs(15);
        let replicas: HashMap<String, (Timestamp, Duration)> = [
            ("a".to_owned(), (t(95), lease)), // alive
            ("b".to_owned(), (t(50), lease)), // gone since 65
        ]
        .into();
        let since = t(0);
        let heard = Some(t(90));
        // One replica (no identity): every device, as before.
        assert_eq!(watch_since(Some("x"), None, None, heard, since, now), heard);
        assert_eq!(watch_since(None, None, None, None, since, now), Some(since));
        // Its own devices: from its memory.
        assert_eq!(
            watch_since(Some("a"), Some("a"), None, heard, since, now),
            heard
        );
        // Another live replica's device: not its business, leader or not.
        assert_eq!(
            watch_since(Some("b"), Some("a"), None, heard, since, now),
            None
        );
        assert_eq!(
            watch_since(Some("a"), Some("c"), Some(&replicas), None, since, now),
            None
        );
        // The leader takes the devices of a gone replica, from its last renewal ...
        assert_eq!(
            watch_since(Some("b"), Some("a"), Some(&replicas), None, since, now),
            Some(t(50))
        );
        // ... those of a replica never seen, and those of none.
        assert_eq!(
            watch_since(Some("z"), Some("a"), Some(&replicas), None, since, now),
            Some(since)
        );
        assert_eq!(
            watch_since(None, Some("a"), Some(&replicas), None, t(10), now),
            Some(t(10))
        );
        // A non-leader never sweeps those.
        assert_eq!(watch_since(None, Some("a"), None, None, since, now), None);
        let _ = SignedDuration::ZERO;
    }

    #[test]
    fn the_budget_refills_at_its_rate_and_saves_little() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0);
        let taken = (0..100).filter(|_| b.take(t0)).count();
        assert_eq!(taken, 10, "a second's worth to start with");
        assert!(!b.take(t0));
        // A tenth of a second later, one more; ten seconds later, only the burst.
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert!(!b.take(t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_secs(10);
        assert_eq!((0..100).filter(|_| b.take(later)).count(), 10);
    }

    #[tokio::test]
    async fn replicas_share_the_fleet_wide_budgets() {
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let h = super::Heartbeats::new(client, Duration::from_secs(30))
            .with_refresh_rate(20.0)
            .with_change_rate(50.0);
        assert_eq!(h.budget_share(), (20.0, 50.0));
        h.share_among(4);
        assert_eq!(h.budget_share(), (5.0, 12.5));
        // A fresh bucket holds its burst (one second of its own rate): 5 refreshes, then
        // none.
        assert_eq!((0..100).filter(|_| h.try_refresh()).count(), 5);
        h.share_among(0);
        assert_eq!(
            h.budget_share(),
            (20.0, 50.0),
            "never less than one replica"
        );
    }

    #[test]
    fn a_zero_budget_refreshes_nothing() {
        let t0 = Instant::now();
        let mut b = Bucket::new(0.0);
        assert!(!b.take(t0));
        assert!(!b.take(t0 + Duration::from_secs(3600)));
        let mut b = Bucket::new(f64::NAN);
        assert!(!b.take(t0 + Duration::from_secs(1)));
    }
}
