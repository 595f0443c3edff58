//! Connections no device has claimed yet, bounded so that a hostile client cannot hold
//! the gateway's descriptors.
//!
//! Every accepted connection starts here, before its TLS handshake, and leaves when a
//! request on it is identified as a device's ([`super::connections::Slot::claim`]) or
//! when it ends. While here it is subject to two limits:
//!
//! - **A lifetime.** An unidentified connection lives at most `lifetime` (enrolment and
//!   attestation are a few short requests; a TLS handshake has its own, shorter limit),
//!   counted from its admission. Identified device connections are exempt: they hold a
//!   long-poll for good. HTTP/1 headers, on any connection, must arrive within
//!   `header_read_timeout` ([`HEADER_READ_TIMEOUT`] by default).
//! - **A cap with eviction.** At most `cap` connections are unidentified at once. A
//!   new one beyond the cap evicts the *oldest* unidentified connection rather than
//!   being refused, so a flood of slow or junk connections cannot keep a fresh device
//!   out: the flood's connections are older than the device's, and the agent opens a
//!   fresh connection for each of its few enrolment and attestation requests (its TPM
//!   works between them, not on an open connection). Identified connections never count against
//!   the cap, because many devices may share one NAT address. The default (4096, the
//!   accept backlog) is above what a reconnect storm holds mid-handshake on these
//!   machines; an evicted device retries with its jittered backoff.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

/// Longest an HTTP/1 client may take to send a request's headers, by default. hyper
/// also applies it to a keep-alive connection idle between requests, so it must be
/// well above the longest gap between a device's requests (its heartbeat, at most
/// 30 s at scale); an unidentified connection is held far less by its lifetime.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(90);

/// How many connections may be unidentified at once, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnidentifiedLimits {
    /// Unidentified connections held at once; a new one beyond it evicts the oldest.
    pub cap: usize,
    /// Longest a connection may stay unidentified.
    pub lifetime: Duration,
    /// Longest an HTTP/1 client may take to send a request's headers (on every
    /// connection, identified or not).
    pub header_read_timeout: Duration,
}

impl Default for UnidentifiedLimits {
    fn default() -> Self {
        Self {
            cap: 4096,
            lifetime: Duration::from_secs(60),
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    /// Admission order (ids may have left already: skipped when evicting).
    order: VecDeque<u64>,
    live: HashMap<u64, Arc<Notify>>,
}

/// The unidentified connections of one gateway ([module docs](self)).
#[derive(Debug)]
pub struct Unidentified {
    limits: UnidentifiedLimits,
    table: Mutex<Table>,
    evicted: Counter,
}

impl Unidentified {
    /// A table with `limits`, counting evictions in `evicted`.
    pub fn new(limits: UnidentifiedLimits, evicted: Counter) -> Arc<Self> {
        Arc::new(Self {
            limits: UnidentifiedLimits {
                cap: limits.cap.max(1),
                ..limits
            },
            table: Mutex::default(),
            evicted,
        })
    }

    /// Admits a new connection, evicting the oldest unidentified ones beyond the cap.
    pub fn admit(self: &Arc<Self>) -> Arc<Pass> {
        let evict = Arc::new(Notify::new());
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let id = t.next;
        t.next += 1;
        t.order.push_back(id);
        t.live.insert(id, evict.clone());
        while t.live.len() > self.limits.cap {
            let Some(oldest) = t.order.pop_front() else {
                break;
            };
            if let Some(n) = t.live.remove(&oldest) {
                // A stored permit: the connection sees it even if not yet waiting.
                n.notify_one();
                self.evicted.inc();
            }
        }
        // Ids that left on their own stay in `order` until they reach its front.
        if t.order.len() > 2 * self.limits.cap + 64 {
            let live = &t.live;
            let kept: VecDeque<u64> = t
                .order
                .iter()
                .copied()
                .filter(|i| live.contains_key(i))
                .collect();
            t.order = kept;
        }
        drop(t);
        Arc::new(Pass {
            table: self.clone(),
            id,
            evict,
            identified: AtomicBool::new(false),
            admitted: tokio::time::Instant::now(),
        })
    }

    /// Connections unidentified now.
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .live
            .len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes `id`; whether it was still there (not evicted).
    fn leave(&self, id: u64) -> bool {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .live
            .remove(&id)
            .is_some()
    }
}

/// One connection's place among the unidentified, until it is identified or ends.
#[derive(Debug)]
pub struct Pass {
    table: Arc<Unidentified>,
    id: u64,
    evict: Arc<Notify>,
    identified: AtomicBool,
    admitted: tokio::time::Instant,
}

impl Pass {
    /// The connection was identified as a device's: it leaves the table, and neither
    /// the lifetime nor the cap applies to it any more. False when it had already been
    /// evicted (it is closing: the caller must not treat it as the device's).
    pub fn identified(&self) -> bool {
        // Under the table's lock, so that an eviction and an identification never both
        // succeed.
        let mut t = self
            .table
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.identified.load(Ordering::Acquire) {
            return true;
        }
        let live = t.live.remove(&self.id).is_some();
        if live {
            self.identified.store(true, Ordering::Release);
        }
        live
    }

    /// Resolves when the connection must close: evicted by a newer one, or unidentified
    /// for longer than the lifetime since its admission. Never resolves once it is
    /// identified.
    pub async fn must_close(&self) {
        let lifetime = async {
            tokio::time::sleep_until(self.admitted + self.table.limits.lifetime).await;
            if self.identified.load(Ordering::Acquire) {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = self.evict.notified() => {}
            () = lifetime => {}
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let _ = self.table.leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn table(cap: usize, lifetime_ms: u64) -> Arc<Unidentified> {
        Unidentified::new(
            UnidentifiedLimits {
                cap,
                lifetime: Duration::from_millis(lifetime_ms),
                ..UnidentifiedLimits::default()
            },
            Counter::default(),
        )
    }

    async fn closes_within(p: &Pass, ms: u64) -> bool {
        tokio::time::timeout(Duration::from_millis(ms), p.must_close())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn beyond_the_cap_the_oldest_unidentified_connection_is_evicted() {
        let t = table(2, 60_000);
        let a = t.admit();
        let b = t.admit();
        assert_eq!(t.len(), 2);
        let c = t.admit();
        assert_eq!(t.len(), 2);
        assert!(closes_within(&a, 50).await, "the oldest is evicted");
        assert!(!closes_within(&b, 50).await);
        assert!(!closes_within(&c, 50).await);
        assert_eq!(t.evicted.get(), 1);
        // An evicted connection cannot be identified any more (it is closing).
        assert!(!a.identified());
        // An identified connection leaves, and no longer counts: two new ones fit
        // beside c, and b (identified) is never evicted.
        assert!(b.identified());
        assert!(b.identified(), "once identified, always");
        assert_eq!(t.len(), 1);
        let d = t.admit();
        assert!(!closes_within(&b, 50).await);
        assert!(!closes_within(&c, 50).await);
        let _e = t.admit();
        assert!(
            closes_within(&c, 50).await,
            "c is now the oldest unidentified"
        );
        assert!(!closes_within(&d, 50).await);
        assert!(!closes_within(&b, 50).await);
    }

    #[tokio::test]
    async fn an_unidentified_connection_lives_at_most_its_lifetime_and_an_identified_one_for_good()
    {
        let t = table(8, 100);
        let anonymous = t.admit();
        let device = t.admit();
        assert!(device.identified());
        assert!(closes_within(&anonymous, 1_000).await);
        assert!(!closes_within(&device, 400).await);
    }

    #[tokio::test]
    async fn a_connection_that_ends_leaves_the_table() {
        let t = table(2, 60_000);
        let a = t.admit();
        drop(t.admit());
        assert_eq!(t.len(), 1);
        // The ended one does not take a place: a second fits beside a.
        let _b = t.admit();
        assert!(!closes_within(&a, 50).await);
        assert_eq!(t.evicted.get(), 0);
        // Many that come and go keep the bookkeeping bounded.
        for _ in 0..10_000 {
            drop(t.admit());
        }
        let order = t.table.lock().unwrap().order.len();
        assert!(order <= 2 * 2 + 64 + 1, "{order}");
    }
}
