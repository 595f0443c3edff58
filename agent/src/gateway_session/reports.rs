//! Reports (heartbeats): taken every `fleet.heartbeat_seconds`, or at once (after
//! [`REPORT_COALESCE`]) when model states change, into a bounded spool, and sent oldest
//! first, one boot's at a time; the gateway acknowledges by sequence number.
//!
//! While reports are not delivered the spool is also kept on disk ([`SPOOL_FILE`] in the
//! state directory, written durably at most every [`SPOOL_PERSIST_EVERY`]), and a
//! restarted agent sends what it finds there first, under the boot that took it (they
//! close the gap in its sequence). They carry neither model states nor serving
//! counters: those of a process that is gone are no news, and must not stand in for
//! the current ones even for a moment. The file goes once the spool is delivered, so that a device that is
//! connected writes nothing.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_proto as proto;

use super::{FleetAgent, REPORT_COALESCE};
use crate::gateway_client::GatewayError;

/// The undelivered reports, in the state directory.
pub const SPOOL_FILE: &str = "report-spool.json";
/// Least time between two writes of the spool to disk while reports are not delivered
/// (flash wears; a power cut loses at most this much of an outage's reports).
pub const SPOOL_PERSIST_EVERY: Duration = Duration::from_secs(60);
/// Largest spool file read back (a bounded spool of reports is far smaller).
const MAX_SPOOL_FILE_BYTES: u64 = 16 << 20;

/// The reports an earlier process left in `dir` (model states and counters left out),
/// the newest
/// `max` of them, and how many older ones did not fit. A file that cannot be read is
/// reported, removed, and counts for nothing: it never stops the agent.
pub(super) fn load_spool(dir: &Path, max: usize) -> (VecDeque<proto::Report>, u64) {
    let path = dir.join(SPOOL_FILE);
    let bytes = match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (VecDeque::new(), 0),
        Ok(m) if m.len() > MAX_SPOOL_FILE_BYTES => Err(format!("{} bytes", m.len())),
        _ => std::fs::read(&path).map_err(|e| e.to_string()),
    };
    let reports: Result<Vec<proto::Report>, String> =
        bytes.and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
    match reports {
        Ok(reports) => {
            let mut spool: VecDeque<proto::Report> = reports
                .into_iter()
                .map(|mut r| {
                    r.models = None;
                    r.inference = None;
                    r
                })
                .collect();
            let mut dropped = 0;
            while spool.len() > max {
                spool.pop_front();
                dropped += 1;
            }
            tracing::info!(
                reports = spool.len(),
                dropped,
                "reports from before the restart, to send first"
            );
            (spool, dropped)
        }
        Err(why) => {
            tracing::warn!(path = %path.display(), %why, "SpoolUnreadable: the undelivered reports of the earlier process are lost");
            let _ = std::fs::remove_file(&path);
            (VecDeque::new(), 0)
        }
    }
}

impl FleetAgent {
    /// Keeps the spool on disk while it is not delivered (at most every
    /// [`SPOOL_PERSIST_EVERY`]).
    async fn persist_spool(&self) {
        let reports: Vec<proto::Report> = {
            let Ok(mut s) = self.shared.lock() else {
                return;
            };
            if s.spool.is_empty()
                || s.persisted
                    .is_some_and(|t| t.elapsed() < SPOOL_PERSIST_EVERY)
            {
                return;
            }
            s.persisted = Some(std::time::Instant::now());
            s.spool.iter().map(|(r, _)| r.clone()).collect()
        };
        let Ok(bytes) = serde_json::to_vec(&reports) else {
            return;
        };
        if let Err(e) =
            crate::durable::write_async(&self.state_dir().join(SPOOL_FILE), bytes, 0o600).await
        {
            tracing::warn!(error = %e, "keeping undelivered reports on disk");
        }
    }

    /// The spool is delivered: the copy on disk goes.
    fn forget_persisted_spool(&self) {
        let on_disk = self.shared.lock().is_ok_and(|mut s| {
            let was = s.persisted.is_some() && s.spool.is_empty();
            if was {
                s.persisted = None;
            }
            was
        });
        if on_disk {
            let _ = std::fs::remove_file(self.state_dir().join(SPOOL_FILE));
        }
    }

    /// The counters of the engine served now, tied to the model and revision it was
    /// loaded for (none between an unload and the next load).
    fn inference(&self) -> Option<proto::Inference> {
        let current = self.serving.current_engine()?;
        let (model, revision) = {
            let served = self.served.lock().ok()?;
            let (e, model, revision) = served.as_ref()?;
            if !Arc::ptr_eq(e, &current) {
                return None;
            }
            (model.clone(), revision.clone())
        };
        let s = current.stats();
        use std::sync::atomic::Ordering::Relaxed;
        let micros = s.generation_micros.load(Relaxed);
        let tokens = s.generated_tokens.load(Relaxed);
        Some(proto::Inference {
            model: Some(model),
            revision: Some(revision),
            requests_total: s.served(),
            errors_total: s.server_failures(),
            tokens_per_second: if micros == 0 {
                0.0
            } else {
                tokens as f64 * 1e6 / micros as f64
            },
            latency_p50_millis: s.duration_seconds.quantile(0.5).map(|v| v * 1e3),
            latency_p99_millis: s.duration_seconds.quantile(0.99).map(|v| v * 1e3),
            time_to_first_token_p95_millis: s.ttft_seconds.quantile(0.95).map(|v| v * 1e3),
        })
    }

    /// Takes a report into the spool (dropping the oldest beyond the bound).
    fn take_report(&self) {
        let inference = self.inference();
        let Ok(mut s) = self.shared.lock() else {
            return;
        };
        s.seq += 1;
        let changed = s.acked_models_version != Some(s.models_version);
        let report = proto::Report {
            seq: s.seq,
            boot: self.boot.clone(),
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            models: changed.then(|| s.models.clone()),
            inference,
        };
        let version = changed.then_some(s.models_version);
        s.spool.push_back((report, version));
        while s.spool.len() > self.config.fleet.spool_max {
            s.spool.pop_front();
            s.dropped += 1;
        }
    }

    /// How many gateway sessions this process has begun.
    pub(super) fn session_number(&self) -> u64 {
        self.shared.lock().map_or(0, |s| s.session)
    }

    /// Starts reporting through `client`, a new session's (or the same session's at
    /// another replica). The next report carries the model states again even if an
    /// earlier session's gateway acknowledged them: that gateway may have acknowledged
    /// without writing them (a leader that failed over), and the one answering now may
    /// never have seen them.
    pub(super) fn begin_session(&self, client: super::DeviceClient) {
        if let Ok(mut s) = self.shared.lock() {
            s.client = Some(client);
            s.acked_models_version = None;
            s.session += 1;
        }
        self.models_changed.notify_one();
    }

    /// Sends the spool; returns the gateway's desired-state version on success.
    pub(super) async fn flush(&self) -> Result<Option<String>, GatewayError> {
        let (client, batch, session) = {
            let Ok(s) = self.shared.lock() else {
                return Ok(None);
            };
            let Some(client) = s.client.clone() else {
                return Ok(None);
            };
            // One boot's reports per batch: an earlier process's go first.
            let boot = s.spool.front().map(|(r, _)| r.boot.clone());
            let reports: Vec<proto::Report> = s
                .spool
                .iter()
                .take_while(|(r, _)| Some(&r.boot) == boot.as_ref())
                .take(proto::MAX_BATCH)
                .map(|(r, _)| r.clone())
                .collect();
            (
                client,
                proto::ReportBatch {
                    reports,
                    dropped: s.dropped,
                },
                s.session,
            )
        };
        if batch.reports.is_empty() {
            return Ok(None);
        }
        let ack = client.report(&batch).await?;
        self.acknowledged(ack.acked, session, &batch.reports[0].boot);
        if ack.gaps > 0 {
            tracing::warn!(
                gaps = ack.gaps,
                "the gateway is missing reports of this boot"
            );
        }
        Ok(Some(ack.desired_version))
    }

    /// The gateway of `session` acknowledged the reports up to `acked`: they leave the
    /// spool, and their model states count as delivered only if that session is still
    /// the current one (a late answer from an earlier gateway does not stop the new
    /// one from being told).
    fn acknowledged(&self, acked: u64, session: u64, boot: &str) {
        if let Ok(mut s) = self.shared.lock() {
            let current = s.session == session;
            while s
                .spool
                .front()
                .is_some_and(|(r, _)| r.boot == boot && r.seq <= acked)
            {
                if let Some((_, Some(v))) = s.spool.pop_front()
                    && current
                {
                    s.acked_models_version = Some(v);
                }
            }
        }
    }

    /// Reports every `heartbeat_seconds`, and when model states change, forever.
    pub async fn report_loop(self: Arc<Self>) {
        let every = Duration::from_secs(self.config.fleet.heartbeat_seconds);
        loop {
            self.take_report();
            // Each batch is one boot's: a spool an earlier process left takes a few.
            for _ in 0..8 {
                match self.flush().await {
                    Ok(Some(_)) if self.spooled() > 0 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, spooled = self.spooled(), "report not delivered; spooled");
                        break;
                    }
                }
            }
            // Undelivered (refused, or no session): kept on disk too.
            if self.spooled() == 0 {
                self.forget_persisted_spool();
            } else {
                self.persist_spool().await;
            }
            self.next_report(every).await;
        }
    }

    fn spooled(&self) -> usize {
        self.shared.lock().map_or(0, |s| s.spool.len())
    }

    /// Waits for the next report: `every`, or a change of model states (and the
    /// changes right behind it) if that comes first.
    async fn next_report(&self, every: Duration) {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = self.models_changed.notified() => tokio::time::sleep(REPORT_COALESCE).await,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::serve::Serving;

    fn agent() -> (Arc<FleetAgent>, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("agent.toml"),
            "[device]\nname = \"till-1\"\n[gateway]\nurl = \"https://gw:8443\"\nbootstrap_token = \"s3cret-token-value\"\n",
        )
        .unwrap();
        let config = crate::config::load(d.path(), Vec::new()).unwrap();
        (FleetAgent::new(config, Serving::new()).unwrap(), d)
    }

    fn models(state: proto::ModelState) -> Vec<proto::ModelReport> {
        vec![proto::ModelReport {
            model: "retail/smollm2".into(),
            revision: "0123456789abcdef".into(),
            state,
            message: None,
            reason: None,
            load_millis: None,
            golden: Vec::new(),
        }]
    }

    #[tokio::test]
    async fn a_change_of_model_states_is_reported_before_the_next_heartbeat() {
        let (a, _dir) = agent();
        let every = Duration::from_secs(2);
        // Nothing changed: the next report waits for the heartbeat.
        let started = std::time::Instant::now();
        a.next_report(every).await;
        assert!(started.elapsed() >= every, "{:?}", started.elapsed());
        // Two changes in a row: one report, after the coalescing wait.
        a.set_models(models(proto::ModelState::Loading));
        a.set_models(models(proto::ModelState::Ready));
        let started = std::time::Instant::now();
        a.next_report(every).await;
        let waited = started.elapsed();
        assert!(waited >= REPORT_COALESCE && waited < every, "{waited:?}");
        // The same states again are no change: back to the heartbeat.
        a.set_models(models(proto::ModelState::Ready));
        let started = std::time::Instant::now();
        a.next_report(every).await;
        assert!(started.elapsed() >= every, "{:?}", started.elapsed());
    }

    fn client() -> super::super::DeviceClient {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["till-1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        super::super::DeviceClient::new(
            "https://127.0.0.1:9",
            cert.pem().as_bytes(),
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            "till-1",
            Duration::from_secs(1),
        )
        .unwrap()
    }

    /// The models of the report just taken.
    fn next_models(agent: &FleetAgent) -> Option<Vec<proto::ModelReport>> {
        agent.take_report();
        let s = agent.shared.lock().unwrap();
        s.spool.back().unwrap().0.models.clone()
    }

    #[tokio::test]
    async fn a_new_session_reports_the_model_states_again_even_if_acknowledged() {
        let (a, _dir) = agent();
        let ready = models(proto::ModelState::Ready);
        a.set_models(ready.clone());
        assert_eq!(next_models(&a), Some(ready.clone()));
        // The gateway acknowledged them: later reports leave them out.
        let session = a.shared.lock().unwrap().session;
        let seq = a.shared.lock().unwrap().seq;
        a.acknowledged(seq, session, &a.boot);
        assert_eq!(next_models(&a), None);
        // A new session (a reconnect, another replica, a new leader): carried again.
        a.begin_session(client());
        assert_eq!(next_models(&a), Some(ready.clone()));
        // A late acknowledgement from the earlier session's gateway does not count.
        let seq = a.shared.lock().unwrap().seq;
        a.acknowledged(seq, session, &a.boot);
        assert_eq!(next_models(&a), Some(ready.clone()));
        // The current session's does.
        let (seq, session) = {
            let s = a.shared.lock().unwrap();
            (s.seq, s.session)
        };
        a.acknowledged(seq, session, &a.boot);
        assert_eq!(next_models(&a), None);
    }

    #[tokio::test]
    async fn undelivered_reports_survive_a_restart_without_their_model_states_and_go_first_by_boot()
    {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("agent.toml"),
            format!(
                "state_dir = \"{}\"\n[device]\nname = \"till-1\"\n[gateway]\nurl = \"https://gw:8443\"\nbootstrap_token = \"s3cret-token-value\"\n[fleet]\nspool_max = 3\n",
                d.path().display()
            ),
        )
        .unwrap();
        let start = || {
            let config = crate::config::load(d.path(), Vec::new()).unwrap();
            FleetAgent::new(config, Serving::new()).unwrap()
        };
        let file = d.path().join(SPOOL_FILE);
        let first = start();
        first.set_models(models(proto::ModelState::Ready));
        for _ in 0..4 {
            first.take_report();
        }
        // Delivered nowhere (no session): kept on disk, the newest spool_max of them.
        assert_eq!(first.spooled(), 3);
        first.persist_spool().await;
        assert!(file.exists());
        // Not rewritten before SPOOL_PERSIST_EVERY.
        let written = std::fs::metadata(&file).unwrap().modified().unwrap();
        first.take_report();
        first.persist_spool().await;
        assert_eq!(
            std::fs::metadata(&file).unwrap().modified().unwrap(),
            written
        );
        drop(first);

        // The power comes back: a new process, a new boot.
        let second = start();
        {
            let s = second.shared.lock().unwrap();
            assert_eq!(s.spool.len(), 3);
            assert!(s.spool.iter().all(|(r, v)| r.boot != second.boot
                && r.models.is_none()
                && r.inference.is_none()
                && v.is_none()));
        }
        second.set_models(models(proto::ModelState::Loading));
        second.take_report();
        // One boot per batch, the earlier one first.
        let (old_boot, seqs) = {
            let s = second.shared.lock().unwrap();
            let boot = s.spool[0].0.boot.clone();
            let seqs: Vec<u64> = s
                .spool
                .iter()
                .filter(|(r, _)| r.boot == boot)
                .map(|(r, _)| r.seq)
                .collect();
            (boot, seqs)
        };
        // The spool stays bounded across the restart: the oldest made room.
        assert_eq!(seqs, [3, 4]);
        let session = second.session_number();
        // An acknowledgement of the new boot's seq 4 does not take the old boot's 4.
        second.acknowledged(4, session, &second.boot);
        assert_eq!(second.spooled(), 3);
        second.acknowledged(4, session, &old_boot);
        assert_eq!(second.spooled(), 1);
        // Everything delivered: the file goes.
        second.acknowledged(1, session, &second.boot);
        assert_eq!(second.spooled(), 0);
        second.forget_persisted_spool();
        assert!(!file.exists());

        // A file that is not a spool is reported and removed, and stops nothing.
        std::fs::write(&file, b"{not json").unwrap();
        let third = start();
        assert_eq!(third.spooled(), 0);
        assert!(!file.exists());
    }
}
