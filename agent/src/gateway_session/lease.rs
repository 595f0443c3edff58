//! The attestation lease: how long the device may go on serving after its last
//! successful attestation (the gateway names its length at enrolment; 24 hours by
//! default). [`Lease`] is persisted in the state directory (`attestation-lease.json`)
//! with the wall-clock time of that attestation, so that a restarted agent knows whether
//! its last-known-good model may still be served ([`deadline_from`]). A lease granted by
//! an attestation in this process is a deadline on the boot clock (`CLOCK_BOOTTIME`: it
//! counts time the device spends suspended, and no one steps it), so that a wall clock
//! stepped while the agent runs neither extends it (set back) nor ends it (set forward:
//! a device without a real-time clock that boots at an old time and is corrected by
//! NTP hours later, which would otherwise stop serving until its next attestation). A
//! lease read from disk was granted in another process, perhaps another boot: the wall
//! clock is all that relates it to now, so until the next attestation it is judged on
//! both clocks, the earlier end winning (a clock corrected forward after boot ends a
//! stale lease). [`FleetAgent::lease_loop`] stops serving when the lease runs out
//! ([`LEASE_EXPIRED`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::FleetAgent;

/// The file, in the state directory, that holds the [`Lease`].
pub const LEASE_FILE: &str = "attestation-lease.json";

/// The reason a device stops serving at the end of its lease (logged and reported as
/// its model's failure).
pub const LEASE_EXPIRED: &str = "AttestationLeaseExpired";

/// How often the lease is checked while serving.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The lease granted by the last successful attestation, in Unix seconds (wall clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// When the device last attested successfully.
    pub attested_at: i64,
    /// When it must stop serving unless it attests again.
    pub expires_at: i64,
}

impl Lease {
    /// The lease of an attestation at `now`, for `seconds`.
    pub fn granted(now: i64, seconds: u64) -> Self {
        Self {
            attested_at: now,
            expires_at: now.saturating_add(i64::try_from(seconds).unwrap_or(i64::MAX)),
        }
    }

    /// Seconds left at wall-clock `now`: never more than the lease's length, so a clock
    /// set back before the attestation does not extend it.
    pub fn remaining(&self, now: i64) -> u64 {
        let length = self.expires_at.saturating_sub(self.attested_at).max(0);
        u64::try_from(self.expires_at.saturating_sub(now).clamp(0, length)).unwrap_or(0)
    }

    /// Whether the lease is over at wall-clock `now`.
    pub fn expired(&self, now: i64) -> bool {
        self.remaining(now) == 0
    }
}

/// The boot-clock deadline of a `lease` read from disk at wall-clock `wall_now` and
/// boot-clock `boot_now` ([`boot_now`]): what is left of it by the wall clock, and never
/// more than its length.
pub fn deadline_from(lease: &Lease, wall_now: i64, boot_now: Duration) -> Duration {
    boot_now.saturating_add(Duration::from_secs(lease.remaining(wall_now)))
}

/// Time since the device booted, suspend included (`CLOCK_BOOTTIME`). Unlike the wall
/// clock it is never stepped; unlike the monotonic clock it goes on while the device
/// is suspended, so a lease ends on time across a suspend.
pub fn boot_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Wall-clock seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The recorded lease; `None` when there is none (never attested) or it does not parse.
pub fn load(state: &Path) -> Option<Lease> {
    let bytes = std::fs::read(state.join(LEASE_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Records `lease` durably ([`crate::durable`]).
pub fn record(state: &Path, lease: &Lease) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(lease).map_err(std::io::Error::other)?;
    crate::durable::write(&state.join(LEASE_FILE), &bytes, 0o644)
}

/// The lease as the running agent holds it.
#[derive(Debug, Default)]
pub(super) struct LeaseState {
    lease: Option<Lease>,
    /// On the boot clock ([`boot_now`]).
    deadline: Option<Duration>,
    /// The lease was read from disk, not granted in this process: the wall clock
    /// still bounds it.
    from_disk: bool,
}

impl FleetAgent {
    /// Whether the attestation lease is over (or there never was one): the device must
    /// not serve. A lease read from disk is judged by the wall clock once, and from
    /// then on by the boot clock.
    pub(super) fn lease_expired(&self) -> bool {
        let Ok(mut s) = self.lease.lock() else {
            return true;
        };
        if s.lease.is_none() {
            s.lease = load(self.state_dir());
            s.from_disk = s.lease.is_some();
        }
        let Some(lease) = s.lease else {
            return true;
        };
        let now = boot_now();
        let deadline = if s.from_disk {
            let by_wall = deadline_from(&lease, unix_now(), now);
            s.deadline.map_or(by_wall, |d| d.min(by_wall))
        } else {
            s.deadline
                .unwrap_or_else(|| deadline_from(&lease, unix_now(), now))
        };
        s.deadline = Some(deadline);
        now >= deadline
    }

    /// A successful attestation: a new lease of `seconds` from now, recorded on disk.
    pub(super) fn renew_lease(&self, seconds: u64) {
        let lease = Lease::granted(unix_now(), seconds);
        if let Err(e) = record(self.state_dir(), &lease) {
            tracing::warn!(error = %e, "the attestation lease could not be recorded");
        }
        if let Ok(mut s) = self.lease.lock() {
            s.lease = Some(lease);
            s.deadline = Some(boot_now().saturating_add(Duration::from_secs(seconds)));
            s.from_disk = false;
        }
        tracing::debug!(expires_at = lease.expires_at, "attestation lease renewed");
    }

    /// Stops serving when the attestation lease runs out, forever.
    pub async fn lease_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            if self.active.lock().await.is_some() && self.lease_expired() {
                self.stop_serving(
                    LEASE_EXPIRED,
                    "no successful attestation within the attestation lease",
                )
                .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_over_at_its_end_and_not_before() {
        let l = Lease::granted(1_000, 20);
        assert_eq!(l.expires_at, 1_020);
        assert!(!l.expired(1_000));
        assert_eq!(l.remaining(1_005), 15);
        assert!(!l.expired(1_019));
        assert!(l.expired(1_020));
        assert!(l.expired(5_000));
    }

    #[test]
    fn a_clock_set_back_does_not_extend_the_lease() {
        let l = Lease::granted(1_000, 20);
        // Before the attestation: at most the lease's length, never more.
        assert_eq!(l.remaining(0), 20);
        assert_eq!(l.remaining(i64::MIN), 20);
        // Read from disk: what the wall clock leaves of it, on the boot clock.
        let boot = Duration::from_secs(500);
        assert_eq!(
            deadline_from(&l, 1_015, boot),
            boot + Duration::from_secs(5)
        );
        assert_eq!(
            deadline_from(&l, 1_030, boot),
            boot,
            "over by the wall clock"
        );
        assert_eq!(
            deadline_from(&l, 0, boot),
            boot + Duration::from_secs(20),
            "a clock set far back gets the lease's length, no more"
        );
    }

    #[test]
    fn the_boot_clock_goes_forward() {
        let a = boot_now();
        std::thread::sleep(Duration::from_millis(20));
        let b = boot_now();
        assert!(b > a, "{a:?} then {b:?}");
        assert!(a > Duration::ZERO);
    }

    #[test]
    fn the_lease_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(dir.path()), None);
        let l = Lease::granted(1_000, 86_400);
        record(dir.path(), &l).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(dir.path()), Some(l));
        std::fs::write(dir.path().join(LEASE_FILE), b"{").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(dir.path()), None, "a corrupt lease is no lease");
    }
}
