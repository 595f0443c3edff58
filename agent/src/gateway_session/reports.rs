//! Reports (heartbeats): taken every `fleet.heartbeat_seconds`, or at once (after
//! [`REPORT_COALESCE`]) when model states change, into a bounded spool, and sent oldest
//! first; the gateway acknowledges by sequence number.

use std::sync::Arc;
use std::time::Duration;

use edgefleet_proto as proto;

use super::{FleetAgent, REPORT_COALESCE};
use crate::gateway_client::GatewayError;

impl FleetAgent {
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
            let reports: Vec<proto::Report> = s
                .spool
                .iter()
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
        self.acknowledged(ack.acked, session);
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
    fn acknowledged(&self, acked: u64, session: u64) {
        if let Ok(mut s) = self.shared.lock() {
            let current = s.session == session;
            while s.spool.front().is_some_and(|(r, _)| r.seq <= acked) {
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
            if let Err(e) = self.flush().await {
                let spooled = self.shared.lock().map_or(0, |s| s.spool.len());
                tracing::warn!(error = %e, spooled, "report not delivered; spooled");
            }
            self.next_report(every).await;
        }
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
        a.acknowledged(seq, session);
        assert_eq!(next_models(&a), None);
        // A new session (a reconnect, another replica, a new leader): carried again.
        a.begin_session(client());
        assert_eq!(next_models(&a), Some(ready.clone()));
        // A late acknowledgement from the earlier session's gateway does not count.
        let seq = a.shared.lock().unwrap().seq;
        a.acknowledged(seq, session);
        assert_eq!(next_models(&a), Some(ready.clone()));
        // The current session's does.
        let (seq, session) = {
            let s = a.shared.lock().unwrap();
            (s.seq, s.session)
        };
        a.acknowledged(seq, session);
        assert_eq!(next_models(&a), None);
    }
}
