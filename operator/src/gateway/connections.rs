//! The gateway's device connections: one per device, and none held for a peer that has
//! gone.
//!
//! - **A device's new HTTP/2 connection closes its older ones.** An agent multiplexes
//!   its desired-state long-poll, reports and downloads on one HTTP/2 connection, so a
//!   new one from the same device means it has given up on the old: it reconnected
//!   after a network change, a NAT rebinding, a restart or a reconnect storm. Without
//!   this the old connection keeps its descriptor until TCP notices, and in a storm
//!   every device briefly holds two. An HTTP/1.1 client needs a connection per request
//!   in flight, so a device may hold up to [`MAX_HTTP1_PER_DEVICE`] of those; a further
//!   one closes the oldest.
//! - **Only a proven device claims a connection.** A connection becomes a device's with
//!   its first request that the gateway identifies as that device (certificate chain,
//!   name and enrolled key, `Fleet::identify`), not at the TLS handshake: a certificate
//!   whose key the device no longer has (after a re-enrolment) closes nothing, and
//!   neither does a connection a client opens and drops unused (an HTTP/2 client racing
//!   two handshakes keeps one and drops the other before its first request).
//! - **A superseded connection is closed gracefully.** It gets a GOAWAY, requests in
//!   flight on it have [`SUPERSEDED_GRACE`] to finish, then it is dropped.
//! - **A peer that vanished is found.** A device that lost power, or whose NAT dropped
//!   the mapping, leaves a connection that nothing would close until its long-poll
//!   answers and TCP gives up retransmitting (about 15 minutes). The gateway pings an
//!   HTTP/2 connection that was quiet for `keepalive_idle` and closes it when the ping is
//!   not answered within `keepalive_timeout`; TCP keepalive with the same times covers
//!   HTTP/1.1. Agents report every heartbeat, so a live device is rarely pinged.
//!
//! Anonymous connections (enrolment and attestation, before a device has a certificate)
//! are not tracked here: each carries a few short requests, and the agent keeps none
//! idle. Until a connection is claimed it is bounded by [`super::unidentified`] (a
//! lifetime, and a cap that evicts the oldest).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

/// HTTP/1.1 connections one device may hold at once.
pub const MAX_HTTP1_PER_DEVICE: usize = 4;

/// How long a superseded connection may take to close after its GOAWAY: requests in
/// flight finish meanwhile, and a peer that is gone (it never acknowledges the
/// GOAWAY's PING) holds its descriptor this long at most.
pub const SUPERSEDED_GRACE: Duration = Duration::from_secs(10);

/// How the gateway checks that a connection's peer is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionOptions {
    /// Quiet time after which the peer is checked (`None`: never).
    pub keepalive_idle: Option<Duration>,
    /// How long the check may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Limits on connections no device has claimed yet ([`super::unidentified`]).
    pub unidentified: super::unidentified::UnidentifiedLimits,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        Self {
            keepalive_idle: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
            unidentified: super::unidentified::UnidentifiedLimits::default(),
        }
    }
}

impl ConnectionOptions {
    /// TCP keepalive on an accepted socket: probes start after `keepalive_idle` of
    /// silence, three of them within `keepalive_timeout`, and the kernel closes the
    /// connection when none is answered. Probes are only sent while nothing sent is
    /// unacknowledged, so `TCP_USER_TIMEOUT` bounds that case too (an answer written to
    /// a peer that vanished would otherwise be retransmitted for about 15 minutes).
    pub fn apply_tcp(&self, tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
        let Some(idle) = self.keepalive_idle else {
            return Ok(());
        };
        let idle = idle.max(Duration::from_secs(1));
        let interval = (self.keepalive_timeout / 3).max(Duration::from_secs(1));
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(3);
        let socket = socket2::SockRef::from(tcp);
        socket.set_tcp_keepalive(&keepalive)?;
        socket.set_tcp_user_timeout(Some(idle + self.keepalive_timeout))
    }
}

#[derive(Debug)]
struct Held {
    id: u64,
    close: Arc<Notify>,
}

/// The device connections the gateway holds, by device name.
#[derive(Debug, Default)]
pub struct DeviceConnections {
    next: AtomicU64,
    held: Mutex<HashMap<String, Vec<Held>>>,
    superseded: Counter,
    evicted: Counter,
}

/// A connection's entry in [`DeviceConnections`]; dropping it forgets the connection.
#[derive(Debug)]
pub struct Registration {
    connections: Arc<DeviceConnections>,
    device: String,
    id: u64,
}

impl DeviceConnections {
    /// Counting the connections closed because the device opened a newer one in
    /// `superseded` (the `gateway_connections_superseded_total` metric).
    pub fn new(superseded: Counter) -> Self {
        Self {
            superseded,
            ..Self::default()
        }
    }

    /// Records a connection of `device`, closing those it supersedes: `close` is
    /// notified when a later connection of the device supersedes this one.
    pub fn register(
        self: &Arc<Self>,
        device: &str,
        http2: bool,
        close: Arc<Notify>,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let superseded = {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            let list = held.entry(device.to_owned()).or_default();
            let superseded: Vec<Held> = if http2 {
                std::mem::take(list)
            } else {
                let excess = (list.len() + 1).saturating_sub(MAX_HTTP1_PER_DEVICE);
                list.drain(..excess).collect()
            };
            list.push(Held { id, close });
            superseded
        };
        if !superseded.is_empty() {
            tracing::debug!(
                device,
                closed = superseded.len(),
                "a device's new connection closes its older ones"
            );
        }
        for old in superseded {
            // Stored as a permit if the old connection's task is not waiting yet.
            old.close.notify_one();
            self.superseded.inc();
        }
        Registration {
            connections: self.clone(),
            device: device.to_owned(),
            id,
        }
    }

    /// Connections `device` holds now.
    pub fn held_by(&self, device: &str) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device)
            .map_or(0, Vec::len)
    }

    /// Connections closed so far because their device opened a newer one.
    pub fn superseded(&self) -> u64 {
        self.superseded.get()
    }

    /// Counting unidentified connections evicted by newer ones in `evicted` (the
    /// `gateway_unidentified_evicted_total` metric).
    pub fn with_evictions(mut self, evicted: Counter) -> Self {
        self.evicted = evicted;
        self
    }

    /// The counter of evicted unidentified connections.
    pub fn evictions(&self) -> Counter {
        self.evicted.clone()
    }
}

/// One connection's side of the table: created with the connection, claimed for a
/// device by the first request identified as it (see the module docs).
#[derive(Debug)]
pub struct Slot {
    connections: Arc<DeviceConnections>,
    http2: bool,
    close: Arc<Notify>,
    held: std::sync::OnceLock<Registration>,
    pass: Option<Arc<super::unidentified::Pass>>,
}

impl Slot {
    /// The slot of a new connection; `http2` as its ALPN negotiated.
    pub fn new(connections: Arc<DeviceConnections>, http2: bool) -> Arc<Self> {
        Self::admitted(connections, http2, None)
    }

    /// [`Slot::new`] for a connection holding `pass` among the unidentified: claiming
    /// it for a device also marks it identified.
    pub fn admitted(
        connections: Arc<DeviceConnections>,
        http2: bool,
        pass: Option<Arc<super::unidentified::Pass>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            connections,
            http2,
            close: Arc::default(),
            held: std::sync::OnceLock::new(),
            pass,
        })
    }

    /// Makes the connection `device`'s (once; later calls do nothing), closing the
    /// connections it supersedes. Call only after identifying the request as `device`.
    pub fn claim(&self, device: &str) {
        // A connection evicted before its first request was identified is closing:
        // it must not supersede the device's other connections.
        if let Some(p) = &self.pass
            && !p.identified()
        {
            return;
        }
        self.held.get_or_init(|| {
            self.connections
                .register(device, self.http2, self.close.clone())
        });
    }

    /// Resolves when a newer connection of the same device supersedes this one.
    pub async fn superseded(&self) {
        self.close.notified().await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut held = self
            .connections
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = held.get_mut(&self.device) {
            list.retain(|h| h.id != self.id);
            if list.is_empty() {
                held.remove(&self.device);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::{DeviceConnections, MAX_HTTP1_PER_DEVICE, Slot};

    async fn notified_within(n: &Notify, ms: u64) -> bool {
        tokio::time::timeout(Duration::from_millis(ms), n.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_new_http2_connection_closes_only_the_same_devices_older_ones() {
        let c = Arc::new(DeviceConnections::default());
        let (a1, b1, a2) = (
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
        );
        let _ra1 = c.register("a", true, a1.clone());
        let _rb1 = c.register("b", true, b1.clone());
        let _ra2 = c.register("a", true, a2.clone());
        assert!(
            notified_within(&a1, 1000).await,
            "a's old connection is closed"
        );
        assert!(!notified_within(&b1, 50).await, "another device's is not");
        assert!(!notified_within(&a2, 50).await, "the newest is not");
        assert_eq!(c.superseded(), 1);
        assert_eq!(c.held_by("a"), 1);
    }

    #[tokio::test]
    async fn http1_connections_are_capped_per_device_oldest_first() {
        let c = Arc::new(DeviceConnections::default());
        let held: Vec<_> = (0..MAX_HTTP1_PER_DEVICE)
            .map(|_| {
                let n = Arc::new(Notify::new());
                (c.register("a", false, n.clone()), n)
            })
            .collect();
        assert_eq!(c.superseded(), 0, "up to the cap, nothing is closed");
        assert_eq!(c.held_by("a"), MAX_HTTP1_PER_DEVICE);
        let newest = Arc::new(Notify::new());
        let _r = c.register("a", false, newest.clone());
        assert!(
            notified_within(&held[0].1, 1000).await,
            "the oldest is closed"
        );
        for (_, n) in &held[1..] {
            assert!(!notified_within(n, 20).await);
        }
        assert!(!notified_within(&newest, 20).await);
        assert_eq!(c.superseded(), 1);
        assert_eq!(c.held_by("a"), MAX_HTTP1_PER_DEVICE);
    }

    #[tokio::test]
    async fn an_ended_connection_is_forgotten_and_never_closed_later() {
        let c = Arc::new(DeviceConnections::default());
        let n = Arc::new(Notify::new());
        drop(c.register("a", true, n.clone()));
        assert_eq!(c.held_by("a"), 0);
        let _r2 = c.register("a", true, Arc::new(Notify::new()));
        assert!(!notified_within(&n, 50).await);
        assert_eq!(c.superseded(), 0, "nothing live was superseded");
    }

    #[tokio::test]
    async fn a_slot_is_claimed_once_and_only_when_asked() {
        let c = Arc::new(DeviceConnections::default());
        let first = Slot::new(c.clone(), true);
        assert_eq!(c.held_by("a"), 0, "an unclaimed connection is nobody's");
        first.claim("a");
        first.claim("a");
        assert_eq!(c.held_by("a"), 1, "claiming twice registers once");
        let second = Slot::new(c.clone(), true);
        second.claim("a");
        tokio::time::timeout(Duration::from_secs(1), first.superseded())
            .await
            .expect("the first connection is superseded by the second");
        assert_eq!(c.superseded(), 1);
        drop(second);
        assert_eq!(c.held_by("a"), 0, "a slot's registration leaves with it");
    }
}
