//! The connection to the gateway: enrol (a bootstrap token only for the first
//! enrolment: once the gateway answered one, the process never sends it again, and the
//! configured token file is deleted when `gateway.delete_token_after_enrol` is set), attest (the device's key and evidence →
//! client certificate; no token, so a device whose certificate lapsed while it was
//! offline comes back the same way), then long-poll the desired state over mTLS and converge, until it is
//! time to attest again (within two thirds of the attestation lease). A passing
//! trouble (no answer, `429`, `5xx`) keeps the session and moves to the next replica in
//! the list under the same certificate; only a refusal (`401`, `403`, `404`) ends it.
//! Reconnect with capped, jittered backoff when the session ends. An enrolment answered "not approved"
//! stops serving; each allowed attestation renews the attestation lease.

use std::sync::Arc;
use std::time::Duration;

use edgefleet_proto as proto;

use super::{DeviceClient, FleetAgent, facts};
use crate::enrol::{EnrolError, Source, attest_once};
use crate::gateway_client::{GatewayClient, GatewayError};

/// Between half and the whole of `d`, at random: the pause before a device asks again,
/// so that a fleet does not reconnect in step.
pub fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 4];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    let frac = f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX);
    // Between half and the whole of `d`, so that a fleet does not reconnect in step.
    d.mul_f64(0.5 + frac / 2.0)
}

/// Where in a list of `n` gateways the device `name` starts: a hash of its name, so
/// that a fleet spreads over the replicas, and a device keeps its replica across
/// restarts.
pub fn first_endpoint(name: &str, n: usize) -> usize {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(name.as_bytes());
    let h = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    usize::try_from(h % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
}

impl FleetAgent {
    /// Enrols, attests and follows the desired state, reconnecting with capped,
    /// jittered backoff, forever.
    pub async fn control_loop(self: Arc<Self>, mut source: Source) {
        let cfg = &self.config;
        let max = Duration::from_secs(cfg.fleet.backoff_max_seconds);
        let mut backoff = Duration::from_secs(1);
        let endpoints: Vec<String> = cfg
            .gateway
            .endpoints()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut at = first_endpoint(&cfg.device.name, endpoints.len());
        let mut failed_in_a_row = 0usize;
        loop {
            let session = self.session_number();
            let result = self.connected(&mut source, &endpoints, &mut at).await;
            let url = &endpoints[at % endpoints.len()];
            if self.session_number() != session {
                // A session was established (then ended): the next failure starts the
                // backoff afresh.
                backoff = Duration::from_secs(1);
                failed_in_a_row = 0;
            }
            match result {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    failed_in_a_row = 0;
                }
                Err(e) => {
                    // The next replica, after a jittered wait: the one that failed may
                    // be gone, and every replica serves every device.
                    at = at.wrapping_add(1);
                    failed_in_a_row += 1;
                    let wait = jitter(backoff);
                    tracing::warn!(error = %e, gateway = %url, next = %endpoints[at % endpoints.len()], retry_in_ms = wait.as_millis() as u64, "gateway session ended");
                    tokio::time::sleep(wait).await;
                    // The backoff grows each time the whole list has failed in a row.
                    if failed_in_a_row.is_multiple_of(endpoints.len()) {
                        backoff = (backoff * 2).min(max);
                    }
                }
            }
        }
    }

    /// One session: enrol and attest at `endpoints[at]`, then follow the desired state
    /// until it is time to attest again. A passing trouble
    /// ([`GatewayError::is_transient`]) keeps the session: the device asks the next
    /// replica (moving `at`), with jittered, capped backoff, under the same certificate.
    async fn connected(
        &self,
        source: &mut Source,
        endpoints: &[String],
        at: &mut usize,
    ) -> Result<(), EnrolError> {
        let cfg = &self.config;
        let url = endpoints[*at % endpoints.len()].as_str();
        let ca = std::fs::read(&cfg.gateway.ca).map_err(|e| EnrolError::State {
            path: cfg.gateway.ca.clone(),
            source: e,
        })?;
        // The token serves the first enrolment only: once enrolled, this process asks
        // with its key alone.
        let token = if self.enrolled.load(std::sync::atomic::Ordering::Relaxed) {
            ""
        } else {
            cfg.gateway.bootstrap_token.expose()
        };
        let bootstrap = GatewayClient::new(url, &ca, token)?;
        let key = crate::enrol::agent_key(self.state_dir())?;
        let enrolled = bootstrap
            .enrol(&proto::EnrolRequest {
                device: cfg.device.name.clone(),
                agent_public_key: base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    rcgen::PublicKeyData::subject_public_key_info(&key),
                ),
                facts: facts(&cfg.attestation.tee),
                labels: cfg.device.labels.clone(),
            })
            .await
            .map_err(|e| match e {
                GatewayError::Rejected { reason, .. }
                    if reason == "TokenRequired" && !bootstrap.has_token() =>
                {
                    EnrolError::NoBootstrapToken(cfg.device.name.clone())
                }
                e => e.into(),
            })?;
        // Enrolled: the token has served its purpose.
        self.enrolled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        crate::config::delete_token_after_enrol(&cfg.gateway);
        if !enrolled.approved {
            // Revoked (or never approved): nothing is served until the gateway says so.
            self.stop_serving(
                "NotApproved",
                "the gateway says this device is not approved",
            )
            .await;
            return Err(EnrolError::Invalid(format!(
                "{} is enrolled but not approved yet",
                enrolled.device
            )));
        }
        let appraisal =
            match attest_once(&bootstrap, &cfg.device.name, source, self.state_dir()).await {
                Ok(a) => a,
                Err(e) => {
                    // A transient failure (a timeout, a busy or restarting replica) keeps
                    // the receipt signer: its result is good until it lapses
                    // (`ReceiptSigner::current_at`). A refusal of the evidence drops it.
                    if !matches!(&e, EnrolError::Gateway(g) if g.is_transient()) {
                        self.serving.set_receipt_signer(None);
                    }
                    return Err(e);
                }
            };
        if !appraisal.decision.allow {
            // Denied: the device no longer vouches for its answers.
            self.serving.set_receipt_signer(None);
            return Err(EnrolError::Invalid(format!(
                "the attestation policy denied this device: {:?}",
                appraisal.decision.deny
            )));
        }
        let lease_seconds = enrolled
            .attestation_lease_seconds
            .unwrap_or(proto::DEFAULT_ATTESTATION_LEASE_SECONDS)
            .max(1);
        self.renew_lease(lease_seconds);
        let cert = std::fs::read(self.state_dir().join("agent-cert.pem")).map_err(|e| {
            EnrolError::State {
                path: self.state_dir().join("agent-cert.pem"),
                source: e,
            }
        })?;
        // Receipts are signed with this key, certificate and attestation result from now on.
        match crate::serve::ReceiptSigner::new(
            &cfg.device.name,
            &key.serialize_pem(),
            &cert,
            &appraisal.attestation_result,
        ) {
            Ok(signer) => self.serving.set_receipt_signer(Some(signer)),
            Err(e) => {
                tracing::warn!(error = %e, "no receipts: the attestation result or certificate does not read");
                self.serving.set_receipt_signer(None);
            }
        }
        let wait = Duration::from_secs(cfg.fleet.poll_wait_seconds.min(proto::MAX_WAIT_SECONDS));
        let client = DeviceClient::new(
            url,
            &ca,
            &cert,
            key.serialize_pem().as_bytes(),
            &cfg.device.name,
            wait + Duration::from_secs(15),
        )?;
        self.begin_session(client.clone());
        tracing::info!(device = %cfg.device.name, "connected to the gateway");
        // Re-attest at two thirds of the result's lifetime, and of the attestation lease
        // (a device clock ahead of the gateway's does not make it loop:
        // `reattest_in`).
        let reattest = tokio::time::Instant::now()
            + crate::enrol::reattest_in(
                appraisal.expires_at,
                Duration::from_secs(cfg.attestation.interval_seconds),
            )
            .min(Duration::from_secs((lease_seconds * 2 / 3).max(1)));
        let _ = self.flush().await;
        let mut version: Option<String> = None;
        let mut client = client;
        let max = Duration::from_secs(cfg.fleet.backoff_max_seconds);
        let mut retry = Duration::from_secs(1);
        while tokio::time::Instant::now() < reattest {
            // A long-poll ends by the time to re-attest, so that the lease is renewed.
            let left = reattest.saturating_duration_since(tokio::time::Instant::now());
            let poll = wait.min(left).max(Duration::from_secs(1));
            match client.desired(version.as_deref(), poll).await {
                Ok(Some(desired)) => {
                    retry = Duration::from_secs(1);
                    tracing::info!(version = %desired.version, models = desired.models.len(), "desired state");
                    self.converge(&client, &desired).await;
                    version = Some(desired.version);
                    let _ = self.flush().await;
                }
                Ok(None) => retry = Duration::from_secs(1),
                Err(e) if e.is_transient() => {
                    // The certificate is still good, at every replica: no enrolment and
                    // no attestation (each costs the API server writes, and a storm of
                    // them is what a flapping network would cause). Ask the next one.
                    *at = at.wrapping_add(1);
                    let next = endpoints[*at % endpoints.len()].as_str();
                    let pause = jitter(retry).min(left);
                    tracing::warn!(error = %e, gateway = %client.base(), next, retry_in_ms = pause.as_millis() as u64, "gateway unreachable; keeping the session");
                    tokio::time::sleep(pause).await;
                    retry = (retry * 2).min(max);
                    client = if next.trim_end_matches('/') != client.base() {
                        client.at(next)
                    } else {
                        client.reconnect()
                    };
                    // The replica answering next may never have heard this device's
                    // states (another replica, or this one restarted): they go again
                    // with the next report.
                    self.begin_session(client.clone());
                    // Any desired state is asked for afresh.
                    version = None;
                }
                Err(e) => {
                    // Refused (the certificate, the device): enrol and attest anew.
                    if let Ok(mut s) = self.shared.lock() {
                        s.client = None;
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_spread_over_the_gateways_and_keep_their_place() {
        assert_eq!(first_endpoint("till-1", 1), 0);
        assert_eq!(first_endpoint("till-1", 3), first_endpoint("till-1", 3));
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[first_endpoint(&format!("till-{i}"), 4)] += 1;
        }
        assert!(counts.iter().all(|c| (850..1150).contains(c)), "{counts:?}");
    }
}
