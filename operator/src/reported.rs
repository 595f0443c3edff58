//! Model states as devices last reported them to this replica's gateway, in memory.
//!
//! On the leader this is the freshest account of what each device connected to it
//! runs (devices connected to other replicas are known through their recorded status): fresher than `EdgeDevice.status.models`, which the
//! gateway writes within a fleet-wide budget (`--status-change-per-second`) so that a
//! rollout to a large fleet is not two API writes per device. The EdgeModel reconciler
//! plans on the device cache with these states laid over it ([`Reported::overlay`]), and
//! a reported change triggers it ([`Reported::changes`]) without waiting for the status
//! write and its watch event.
//!
//! A new leader starts with nothing in memory and plans on the recorded status until
//! its devices report to it (each reports at least every heartbeat, and a reconnecting
//! agent reports its full state).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgefleet_crds::EdgeDevice;
use edgefleet_crds::device::{InferenceStats, LoadedModel};
use kube::ResourceExt;

/// Statistics not refreshed this long are forgotten ([`Reported::stats_snapshot`]).
const STATS_FORGOTTEN: k8s_openapi::jiff::SignedDuration =
    k8s_openapi::jiff::SignedDuration::from_secs(600);

/// How long a burst of reports is gathered into one reconcile trigger.
pub const TRIGGER_COALESCE: Duration = Duration::from_millis(100);

/// The reported model states of devices. Clones share them.
#[derive(Debug, Clone)]
pub struct Reported {
    states: Arc<Mutex<HashMap<String, Vec<LoadedModel>>>>,
    /// Each device's latest serving statistics, stamped when they arrived.
    stats: Arc<Mutex<HashMap<String, InferenceStats>>>,
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Reported {
    fn default() -> Self {
        Self {
            states: Arc::default(),
            stats: Arc::default(),
            changed: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

impl Reported {
    /// Notes what `device` reported it runs; returns whether that differs from what was
    /// noted before (and so triggers the reconciler).
    pub fn note(&self, device: &str, models: &[LoadedModel]) -> bool {
        let Ok(mut states) = self.states.lock() else {
            return false;
        };
        if states.get(device).is_some_and(|m| m.as_slice() == models) {
            return false;
        }
        states.insert(device.to_owned(), models.to_vec());
        drop(states);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        true
    }

    /// Notes `device`'s latest serving statistics (no trigger: the health gates read
    /// them when the reconciler next runs, which a rollout step requeues for).
    pub fn note_stats(&self, device: &str, stats: InferenceStats) {
        if let Ok(mut all) = self.stats.lock() {
            all.insert(device.to_owned(), stats);
        }
    }

    /// Every device's latest statistics, as noted now. Statistics no device refreshed
    /// for ten minutes (a device gone, or reporting elsewhere) are forgotten.
    pub fn stats_snapshot(&self) -> HashMap<String, InferenceStats> {
        let cutoff = k8s_openapi::jiff::Timestamp::now() - STATS_FORGOTTEN;
        self.stats
            .lock()
            .map(|mut s| {
                s.retain(|_, st| st.observed_time.as_ref().is_some_and(|t| t.0 > cutoff));
                s.clone()
            })
            .unwrap_or_default()
    }

    /// Forgets `device` (it enrolled anew, or is gone).
    pub fn forget(&self, device: &str) {
        if let Ok(mut states) = self.states.lock() {
            states.remove(device);
        }
        if let Ok(mut stats) = self.stats.lock() {
            stats.remove(device);
        }
    }

    /// Replaces the recorded `status.models` of each device that reported to this
    /// replica with what it reported, and its recorded `status.inference` with the
    /// statistics it reported since (written ones lag: they are refreshed within a
    /// fleet-wide budget).
    pub fn overlay(&self, devices: &mut [EdgeDevice]) {
        self.overlay_where(devices, |_| true);
    }

    /// [`Reported::overlay`], only on the devices `keep` accepts (with several
    /// replicas: those that report to this one now, not those that moved away).
    pub fn overlay_where(&self, devices: &mut [EdgeDevice], keep: impl Fn(&EdgeDevice) -> bool) {
        let (Ok(states), Ok(stats)) = (self.states.lock(), self.stats.lock()) else {
            return;
        };
        for d in devices {
            if !keep(d) {
                continue;
            }
            let name = d.name_any();
            if let Some(models) = states.get(&name) {
                d.status.get_or_insert_with(Default::default).models = models.clone();
            }
            if let Some(fresh) = stats.get(&name) {
                lay_stats_over(d, fresh);
            }
        }
    }

    /// Every device's reported states, as noted now.
    pub fn snapshot(&self) -> HashMap<String, Vec<LoadedModel>> {
        self.states.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// A trigger for every change noted, a burst gathered over [`TRIGGER_COALESCE`].
    pub fn changes(&self) -> impl futures::Stream<Item = ()> + Send + 'static {
        let rx = self.changed.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            tokio::time::sleep(TRIGGER_COALESCE).await;
            rx.borrow_and_update();
            Some(((), rx))
        })
    }
}

/// Puts `fresh` in `device`'s `status.inference` unless what is there was observed
/// later.
pub fn lay_stats_over(device: &mut EdgeDevice, fresh: &InferenceStats) {
    let status = device.status.get_or_insert_with(Default::default);
    let newer = match (
        status
            .inference
            .as_ref()
            .and_then(|i| i.observed_time.as_ref()),
        fresh.observed_time.as_ref(),
    ) {
        (Some(recorded), Some(f)) => f.0 > recorded.0,
        (None, _) => true,
        (Some(_), None) => false,
    };
    if newer {
        status.inference = Some(fresh.clone());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use edgefleet_crds::device::ModelState;
    use futures::StreamExt as _;

    fn loaded(revision: &str, state: ModelState) -> LoadedModel {
        LoadedModel {
            model: "default/m".into(),
            revision: revision.into(),
            state,
            message: None,
            reason: None,
            load_millis: None,
            golden: Vec::new(),
        }
    }

    fn device(name: &str, models: Vec<LoadedModel>) -> EdgeDevice {
        let mut d = EdgeDevice::new(
            name,
            serde_json::from_value(serde_json::json!({
                "facts": {"arch": "x86_64", "cpuCores": 4, "memory": "8Gi",
                          "agentKeyFingerprint": format!("sha256:{}", "ab".repeat(32))},
            }))
            .unwrap(),
        );
        d.status = Some(edgefleet_crds::device::EdgeDeviceStatus {
            models,
            ..Default::default()
        });
        d
    }

    #[test]
    fn reported_states_replace_the_recorded_ones_only_for_devices_that_reported() {
        let r = Reported::default();
        assert!(r.note("a", &[loaded("r2", ModelState::Ready)]));
        // The same report again is no change; a different one is.
        assert!(!r.note("a", &[loaded("r2", ModelState::Ready)]));
        assert!(r.note("a", &[loaded("r2", ModelState::Failed)]));
        let mut devices = vec![
            device("a", vec![loaded("r1", ModelState::Ready)]),
            device("b", vec![loaded("r1", ModelState::Ready)]),
        ];
        r.overlay(&mut devices);
        let models = |d: &EdgeDevice| d.status.as_ref().unwrap().models.clone();
        assert_eq!(models(&devices[0]), vec![loaded("r2", ModelState::Failed)]);
        assert_eq!(models(&devices[1]), vec![loaded("r1", ModelState::Ready)]);
        // Forgotten: the recorded status stands again.
        r.forget("a");
        let mut devices = vec![device("a", vec![loaded("r1", ModelState::Ready)])];
        r.overlay(&mut devices);
        assert_eq!(models(&devices[0]), vec![loaded("r1", ModelState::Ready)]);
    }

    #[tokio::test]
    async fn a_burst_of_changes_is_one_trigger_and_no_change_is_none() {
        let r = Reported::default();
        let mut changes = Box::pin(r.changes());
        for i in 0..50 {
            r.note(&format!("d{i}"), &[loaded("r1", ModelState::Ready)]);
        }
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), changes.next()).await,
            Ok(Some(()))
        );
        // Repeats are not changes: no further trigger.
        r.note("d1", &[loaded("r1", ModelState::Ready)]);
        assert!(
            tokio::time::timeout(TRIGGER_COALESCE * 5, changes.next())
                .await
                .is_err()
        );
    }
}
