//! The EdgeDevice watch cache that one part of the operator keeps (the gateway's) and
//! another plans on (the EdgeModel reconciler), so that the leader holds one copy of
//! the fleet rather than two: [`DeviceFeed`] is the keeper's side, noting each event
//! the cache applied; [`SharedDevices`] is the reader's side, the cache with how far
//! it has seen and a tick per event (and the keeper's trust-policy cache, shared the
//! same way).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use edgefleet_crds::EdgeDevice;
use kube::runtime::reflector::Store;

/// A device watch cache kept elsewhere (the gateway's), for the reconciler to plan on
/// instead of watching the fleet a second time.
#[derive(Debug)]
pub struct SharedDevices {
    /// The cache (managed fields stripped).
    pub store: Store<EdgeDevice>,
    /// The highest resourceVersion the cache has applied.
    pub seen: Arc<AtomicU64>,
    /// Ticks once per device event the cache has applied.
    pub changes: tokio::sync::watch::Receiver<u64>,
    /// The keeper's EdgeTrustPolicy cache too, when it keeps one.
    pub policies: Option<crate::trust_policy::TrustPolicies>,
    /// The keeper's EdgeModel cache too, when it keeps one.
    pub models: Option<Store<edgefleet_crds::EdgeModel>>,
}

/// The keeper's side of a shared device cache: the highest resourceVersion the cache
/// has applied, and a tick per device event (what the EdgeModel reconciler needs to
/// plan on the cache too).
#[derive(Debug)]
pub struct DeviceFeed {
    seen: Arc<AtomicU64>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for DeviceFeed {
    fn default() -> Self {
        Self {
            seen: Arc::default(),
            changed: tokio::sync::watch::channel(0).0,
        }
    }
}

impl DeviceFeed {
    /// Notes a device event the cache has applied: its resourceVersion, and a tick.
    pub fn applied(&self, d: &EdgeDevice) {
        if let Some(rv) = d
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
        {
            self.seen.fetch_max(rv, Ordering::SeqCst);
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// `store` (the cache this feed reports on) for a reader.
    pub fn share(&self, store: Store<EdgeDevice>) -> SharedDevices {
        SharedDevices {
            store,
            seen: self.seen.clone(),
            changes: self.changed.subscribe(),
            policies: None,
            models: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn device(rv: Option<&str>) -> EdgeDevice {
        let mut d: EdgeDevice = serde_json::from_value(serde_json::json!({
            "apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDevice",
            "metadata": {"name": "a"},
            "spec": {"facts": {"arch": "x86_64", "cpuCores": 1, "memory": "1Gi",
                "agentKeyFingerprint": format!("sha256:{}", "0".repeat(64))}},
        }))
        .unwrap();
        d.metadata.resource_version = rv.map(str::to_owned);
        d
    }

    #[test]
    fn readers_see_the_highest_resource_version_and_a_tick_per_event() {
        let feed = DeviceFeed::default();
        let (store, _writer) = kube::runtime::reflector::store::<EdgeDevice>();
        let mut shared = feed.share(store);
        assert!(!shared.changes.has_changed().unwrap());
        feed.applied(&device(Some("7")));
        feed.applied(&device(Some("5")));
        assert_eq!(shared.seen.load(Ordering::SeqCst), 7);
        assert!(shared.changes.has_changed().unwrap());
        assert_eq!(*shared.changes.borrow_and_update(), 2);
        // An event without a resourceVersion still ticks, and moves nothing back.
        feed.applied(&device(None));
        assert_eq!(shared.seen.load(Ordering::SeqCst), 7);
        assert_eq!(*shared.changes.borrow_and_update(), 3);
    }
}
