//! Device liveness: the `Ready` condition and `lastHeartbeatTime` of EdgeDevices,
//! owned by their own server-side-apply field manager ([`HEARTBEAT_MANAGER`]).
//!
//! - [`Heartbeats::record`] marks a device Ready on a heartbeat, but writes only when
//!   something changed or a third of the lease has passed since the last write: however
//!   often devices heartbeat, each costs the API server at most three writes per lease
//!   (`lastHeartbeatTime` keeps whole seconds, so the window is up to a second shorter).
//! - [`Heartbeats::expire`] turns `Ready` False (reason `HeartbeatExpired`) on devices
//!   whose last heartbeat is older than the lease. The EdgeModel reconciler then moves
//!   them to nothing new; they keep (and go on serving) what they have.

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
    let (ready, last) = ready_of(device);
    let ready = ready.is_some_and(|c| c.status == "True");
    let lease = SignedDuration::try_from(lease).unwrap_or(SignedDuration::MAX);
    ready && last.is_none_or(|t| t + lease < now)
}

/// Writes device liveness.
#[derive(Debug, Clone)]
pub struct Heartbeats {
    api: Api<EdgeDevice>,
    lease: Duration,
    cache: Option<kube::runtime::reflector::Store<EdgeDevice>>,
}

impl Heartbeats {
    /// Liveness with a lease of `lease`.
    pub fn new(client: Client, lease: Duration) -> Self {
        Self {
            api: Api::all(client),
            lease,
            cache: None,
        }
    }

    /// Sweeps over `cache` (a watch cache of every EdgeDevice) instead of listing the
    /// fleet from the API server every quarter lease. A heartbeat written just before a
    /// sweep may not be in the cache yet; such a device turns not Ready and Ready again
    /// at its next report, which writes at once when the device is not Ready.
    pub fn with_cache(mut self, cache: kube::runtime::reflector::Store<EdgeDevice>) -> Self {
        self.cache = Some(cache);
        self
    }

    async fn apply(
        &self,
        device: &EdgeDevice,
        ready: bool,
        reason: &str,
        message: String,
        heartbeat: Option<Timestamp>,
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
        let patch =
            json!({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDevice", "status": st});
        self.api
            .patch_status(
                &device.name_any(),
                &PatchParams::apply(HEARTBEAT_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(|_| ())
    }

    /// Records a heartbeat from `device` at `now`. Returns whether it wrote.
    pub async fn record(&self, device: &EdgeDevice, now: Timestamp) -> Result<bool, kube::Error> {
        let (ready, last) = ready_of(device);
        let is_ready = ready.is_some_and(|c| c.status == "True");
        let coalesce = SignedDuration::try_from(self.lease / 3).unwrap_or(SignedDuration::ZERO);
        if is_ready && last.is_some_and(|t| t + coalesce > now) {
            return Ok(false);
        }
        self.apply(
            device,
            true,
            HEARTBEAT_RECEIVED,
            "the agent heartbeats within its lease".into(),
            Some(now),
            now,
        )
        .await?;
        Ok(true)
    }

    /// Marks not ready every device whose heartbeat is older than the lease. Returns
    /// the devices changed.
    pub async fn expire(&self, now: Timestamp) -> Result<Vec<String>, kube::Error> {
        let mut changed = Vec::new();
        for device in crate::device_status::all_devices(&self.api, self.cache.as_ref()).await? {
            let device = device.as_ref();
            if expired(device, now, self.lease) {
                let (_, last) = ready_of(device);
                self.apply(
                    device,
                    false,
                    reasons::HEARTBEAT_EXPIRED,
                    format!("no heartbeat for more than {} s", self.lease.as_secs()),
                    last,
                    now,
                )
                .await?;
                changed.push(device.name_any());
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
