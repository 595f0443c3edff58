//! The device gateway's attestation API over HTTPS (axum on rustls).
//!
//! - `POST /v1/attestation/challenge`: a single-use nonce, the report data to bind, and
//!   for TPMs a credential challenge. Unknown devices get 404, a key other than the one
//!   the device enrolled with 403 `KeyMismatch`. No bootstrap token is asked for: the
//!   token serves only the first enrolment.
//! - `POST /v1/attestation/evidence`: the CSR must be signed by the enrolled key named
//!   in the challenge (possession of the device's key), the evidence must bind the
//!   challenge's nonce, that key and the device name (no replay), and come from the
//!   hardware recorded in `EdgeDevice.status` ([`crate::device_identity`], recorded at
//!   the first allowed attestation). Then the gateway records the decision and returns
//!   the signed attestation result and, when allowed, the device's client certificate.
//!   Evidence from other hardware is refused (`HardwareMismatch`, 403) before any
//!   result is signed or certificate issued, and is counted and published as a Warning
//!   event on the EdgeDevice. So a device whose certificate lapsed (offline longer
//!   than its life) comes back by attesting again, with its key and its hardware.
//!
//! Verification and policy evaluation are CPU work and run on blocking threads.
//! Errors are JSON `{"reason": "...", "message": "..."}` naming what failed ([`error`]):
//! 4xx for the request's fault, 5xx for ours; nothing is skipped silently.
//!
//! The device API (enrolment, desired state, reports, artifacts) is in [`devices`];
//! this module also holds the TLS configuration and the accept loop both are served on.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use edgefleet_trust::attestation::service::{
    AttestationService, ChallengeRequest, EvidenceRequest, ServiceError,
};
use kube::runtime::events::{Event, EventType, Recorder};
use serde_json::json;
use sha2::Digest as _;
use time::OffsetDateTime;

use crate::device_identity::{self, Pinned};
use crate::device_status::DeviceStatus;
use crate::metrics::FleetCounters;
pub use connections::{ConnectionOptions, DeviceConnections};
use error::json_body;
pub use error::{ApiError, Reason};

pub mod connections;
pub mod devices;
pub mod error;
pub mod mirror;
pub mod options;
pub mod unidentified;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// How often lapsed attestations are swept.
pub const LAPSE_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct Gateway {
    service: Arc<AttestationService>,
    /// Bounds the verifications running at once (each is CPU work on a blocking thread).
    verifying: Arc<tokio::sync::Semaphore>,
    devices: DeviceStatus,
    counters: Arc<FleetCounters>,
    events: Events,
    /// The attestation lease devices are told at enrolment; its end after each allowed
    /// appraisal is written to `status.attestation.leaseExpiryTime`.
    attestation_lease: Duration,
}

/// Publishes an event on `device` (its note cut to 1024 characters) for `action`; a
/// failure is logged, not returned.
pub(crate) async fn publish_on_device(
    recorder: &Recorder,
    device: &edgefleet_crds::EdgeDevice,
    type_: EventType,
    reason: &str,
    note: String,
    action: &str,
) {
    let ev = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1024).collect()),
        action: action.to_owned(),
        secondary: None,
    };
    let reference = kube::Resource::object_ref(device, &());
    if let Err(e) = recorder.publish(&ev, &reference).await {
        tracing::warn!(error = %e, "publishing an event");
    }
}

/// Where the gateway publishes events about EdgeDevices, if anywhere.
#[derive(Clone, Default)]
struct Events(Option<Recorder>);

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Events").field(&self.0.is_some()).finish()
    }
}

impl Gateway {
    /// A gateway over `service`, writing status through `devices`. Its requests are
    /// authenticated by the device's enrolled key and evidence, not by a token.
    pub fn new(service: Arc<AttestationService>, devices: DeviceStatus) -> Self {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        Self {
            service,
            verifying: Arc::new(tokio::sync::Semaphore::new(workers)),
            devices,
            counters: Arc::default(),
            events: Events::default(),
            attestation_lease: Duration::from_secs(
                edgefleet_proto::DEFAULT_ATTESTATION_LEASE_SECONDS,
            ),
        }
    }

    /// Counts the attestation API's refusals in `counters` (`gateway_refusals_total`).
    pub fn with_counters(mut self, counters: Arc<FleetCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// Publishes events about EdgeDevices (a `HardwareMismatch`, a recorded hardware
    /// identity) with `recorder`.
    pub fn with_events(mut self, recorder: Recorder) -> Self {
        self.events = Events(Some(recorder));
        self
    }

    /// The attestation lease devices serve under (shown in EdgeDevice status).
    pub fn with_attestation_lease(mut self, lease: Duration) -> Self {
        self.attestation_lease = lease;
        self
    }

    fn count_refusal(&self, reason: Reason) {
        self.counters
            .refusals
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: reason.as_str().into(),
            })
            .inc();
    }

    /// Publishes an event on `device`; a failure is logged, not returned.
    async fn publish(
        &self,
        device: &edgefleet_crds::EdgeDevice,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        if let Some(recorder) = &self.events.0 {
            publish_on_device(recorder, device, type_, reason, note, "Attest").await;
        }
    }

    /// The HTTP routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/v1/attestation/challenge", post(challenge))
            .route("/v1/attestation/evidence", post(evidence))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self)
    }

    /// Sweeps lapsed attestations every [`LAPSE_SWEEP_INTERVAL`] until the task is dropped.
    pub async fn lapse_loop(self) {
        let mut tick = tokio::time::interval(LAPSE_SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            match self.devices.lapse_expired(OffsetDateTime::now_utc()).await {
                Ok(lapsed) if !lapsed.is_empty() => tracing::info!(?lapsed, "attestations lapsed"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "sweeping lapsed attestations"),
            }
        }
    }
}

async fn challenge(
    State(gw): State<Gateway>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let result = challenge_inner(&gw, &body).await;
    if let Err(e) = &result {
        gw.count_refusal(e.reason());
    }
    result
}

async fn challenge_inner(gw: &Gateway, body: &[u8]) -> Result<Json<serde_json::Value>, ApiError> {
    let req: ChallengeRequest = json_body(body)?;
    let device = gw.devices.get(&req.device).await?;
    // The key must be the one the device enrolled with, and the evidence kind one it has.
    let key = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        req.agent_public_key.trim(),
    )
    .map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Reason::BadRequest,
            format!("agent_public_key: {e}"),
        )
    })?;
    let fingerprint = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&key)));
    if fingerprint != device.spec.facts.agent_key_fingerprint {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            Reason::KeyMismatch,
            format!("the key is not the one {} enrolled with", req.device),
        ));
    }
    let tee: edgefleet_crds::TeeKind = serde_json::from_value(json!(req.tee))
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, Reason::BadRequest, e.to_string()))?;
    if !device.spec.facts.tee_kinds.is_empty() && !device.spec.facts.tee_kinds.contains(&tee) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            Reason::TeeKindMismatch,
            format!("{} did not enrol with {tee:?} evidence", req.device),
        ));
    }
    let service = gw.service.clone();
    let _permit = gw.verifying.acquire().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::ShuttingDown,
            e.to_string(),
        )
    })?;
    let challenge = tokio::task::spawn_blocking(move || service.challenge(&req, SystemTime::now()))
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(json!(challenge)))
}

async fn evidence(
    State(gw): State<Gateway>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let result = evidence_inner(&gw, &body).await;
    if let Err(e) = &result {
        gw.count_refusal(e.reason());
    }
    result
}

async fn evidence_inner(gw: &Gateway, body: &[u8]) -> Result<Json<serde_json::Value>, ApiError> {
    let req: EvidenceRequest = json_body(body)?;
    let device = gw.devices.get(&req.device).await?;
    let service = gw.service.clone();
    let recorded = device_identity::recorded(&device);
    // The last allowed TPM clock survives gateway restarts in the device's status; it is
    // the clock of the TPM whose EK the device's hardware identity records.
    if let Some(c) = device
        .status
        .as_ref()
        .and_then(|s| s.attestation.as_ref())
        .and_then(|a| a.tpm_clock)
        && let Some(ek) = recorded
            .as_ref()
            .and_then(|r| r.ek_public_key_digest.as_deref())
    {
        service.remember_tpm_clock(
            &req.device,
            ek,
            edgefleet_trust::attestation::tpm::ClockState {
                clock: u64::try_from(c.clock).unwrap_or(0),
                reset_count: u32::try_from(c.reset_count).unwrap_or(u32::MAX),
                restart_count: u32::try_from(c.restart_count).unwrap_or(u32::MAX),
            },
        );
    }
    let now = SystemTime::now();
    let permit = gw.verifying.acquire().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::ShuttingDown,
            e.to_string(),
        )
    })?;
    let verifier = service.clone();
    let pinned = recorded.clone();
    let outcome = tokio::task::spawn_blocking(move || verifier.verify(&req, now, pinned.as_ref()))
        .await
        .map_err(ApiError::internal)?;
    drop(permit);
    let verified = OffsetDateTime::now_utc();
    // Single use: a challenge no newer than the last one recorded for the device was
    // answered already (here or on another replica).
    let outcome = outcome.and_then(|v| {
        if used(&device, v.challenge_issued_ms) {
            Err(ServiceError::NonceUsed)
        } else {
            Ok(v)
        }
    });
    // The evidence must come from the hardware the device's first allowed evidence came
    // from (the service compared it with the recorded identity); a device without one
    // records it now. Nothing is signed or issued before that is settled.
    let outcome = match outcome {
        Ok(v) if recorded.is_none() && v.decision.allow => {
            match pin_hardware(gw, &device, &v, verified).await? {
                Ok(()) => Ok(v),
                Err(mismatch) => Err(ServiceError::HardwareMismatch(mismatch)),
            }
        }
        other => other,
    };
    if let Err(ServiceError::HardwareMismatch(mismatch)) = &outcome {
        tracing::warn!(device = %device.metadata.name.as_deref().unwrap_or_default(), %mismatch, "evidence from other hardware refused");
        gw.publish(
            &device,
            EventType::Warning,
            mismatch.reason(),
            mismatch.to_string(),
        )
        .await;
    }
    let issued_ms = outcome.as_ref().map_or(0, |v| v.challenge_issued_ms);
    let outcome = match outcome {
        Ok(v) => service.conclude(v, now),
        Err(e) => Err(e),
    };
    match outcome {
        Ok(appraisal) => {
            let expires =
                OffsetDateTime::from_unix_timestamp(appraisal.expires_at).unwrap_or(verified);
            // Recorded on the resourceVersion read: when the device changed meanwhile
            // (a heartbeat, the hardware pin, or another answer to this challenge), read
            // it again and decide again whether the challenge is still unused.
            let mut current = device.clone();
            let mut tries = 0;
            loop {
                let written = gw
                    .devices
                    .record_decision(
                        &current,
                        &appraisal.claims,
                        &appraisal.decision,
                        appraisal.tpm_clock.as_ref(),
                        verified,
                        crate::device_status::Expiries {
                            result: expires,
                            lease: verified + gw.attestation_lease,
                        },
                        issued_ms,
                        &appraisal.attestation_result,
                    )
                    .await;
                match written {
                    Ok(()) => break,
                    Err(crate::device_status::StatusError::Conflict(_)) if tries < 5 => {
                        tries += 1;
                        current = gw
                            .devices
                            .get(device.metadata.name.as_deref().unwrap_or_default())
                            .await?;
                        if used(&current, issued_ms) {
                            return Err(ServiceError::NonceUsed.into());
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(Json(json!(appraisal)))
        }
        Err(e) => {
            // Only failures after the CSR proved possession of the device's key say
            // something about the device; anything earlier (replays, mismatches, bad
            // CSRs) could come from anyone who knows the device's public key.
            if matches!(
                e,
                ServiceError::Evidence(_)
                    | ServiceError::CredentialMismatch
                    | ServiceError::HardwareMismatch(_)
            ) {
                gw.devices
                    .record_failure(&device, &format!("{}: {e}", e.reason()), verified)
                    .await?;
            }
            Err(e.into())
        }
    }
}

/// Whether a challenge of `device` issued at `issued_ms` is used: the device's status
/// records an answered challenge at least as new.
fn used(device: &edgefleet_crds::EdgeDevice, issued_ms: u64) -> bool {
    device
        .status
        .as_ref()
        .and_then(|s| s.attestation.as_ref())
        .and_then(|a| a.challenge_issued_millis)
        .is_some_and(|recorded| u64::try_from(recorded).unwrap_or(0) >= issued_ms)
}

/// Records the verified evidence's hardware identity on `device`, which has none
/// (trust on first use, logged loudly and published as an event). When another writer
/// recorded one first, the evidence is compared with that: `Ok(Err(_))` is evidence from
/// other hardware; `Err(_)` is a failed status write.
async fn pin_hardware(
    gw: &Gateway,
    device: &edgefleet_crds::EdgeDevice,
    verified: &edgefleet_trust::attestation::service::Verified,
    now: OffsetDateTime,
) -> Result<Result<(), edgefleet_trust::attestation::identity::HardwareMismatch>, ApiError> {
    let presented = &verified.hardware_identity;
    match gw
        .devices
        .pin_hardware_identity(device, presented, now)
        .await?
    {
        Pinned::Recorded => {
            tracing::warn!(
                device = %verified.device,
                identity = ?presented,
                "trust on first use: recorded the device's hardware identity; evidence from \
                 other hardware is refused until an administrator clears it"
            );
            gw.publish(
                device,
                EventType::Normal,
                "HardwareIdentityRecorded",
                format!("trust on first use: {presented:?}"),
            )
            .await;
            Ok(Ok(()))
        }
        Pinned::Existing(recorded) => Ok(presented.check(&recorded)),
    }
}

/// Pending connections the gateway's socket queues for accept. The standard library's
/// 128 is too few for a fleet: after a reconnect storm or a gateway restart thousands of
/// devices connect at once, and connections beyond the queue are dropped (the kernel
/// caps this at `net.core.somaxconn`, 4096 by default).
pub const ACCEPT_BACKLOG: u32 = 4096;

/// Binds the gateway's listening socket with [`ACCEPT_BACKLOG`] (and `SO_REUSEADDR`, so
/// that a restarted gateway binds while old connections linger in TIME_WAIT).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Serves `router` over HTTPS on `listener` until the future is dropped, with the
/// default [`ConnectionOptions`] and a connection table of its own (see
/// [`serve_with`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
) -> std::io::Result<()> {
    serve_with(
        listener,
        tls,
        router,
        ConnectionOptions::default(),
        Arc::default(),
    )
    .await
}

/// Serves `router` over HTTPS on `listener` until the future is dropped. Each request
/// carries the connection's client certificate, if any, as a
/// [`devices::PeerCertificate`] extension (verifying it is `tls`'s business: the device
/// API needs a client verifier that trusts the device CA and allows anonymous clients,
/// who may only enrol and attest). A connection whose request the device API identifies
/// as a device is kept in `connections`, one HTTP/2 connection per device, and every
/// connection's peer is checked as `options` say (the [`connections`] module).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    options: ConnectionOptions,
    connections: Arc<DeviceConnections>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // HTTP/1 headers must arrive in time (hyper enforces it only with a timer).
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(options.unidentified.header_read_timeout);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(options.keepalive_idle)
        .keep_alive_timeout(options.keepalive_timeout);
    let builder = Arc::new(builder);
    let unidentified =
        unidentified::Unidentified::new(options.unidentified, connections.evictions());
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = options.apply_tcp(&tcp) {
            tracing::debug!(%peer, error = %e, "setting TCP keepalive");
        }
        let acceptor = acceptor.clone();
        let router = router.clone();
        let builder = builder.clone();
        let connections = connections.clone();
        // Every connection starts unidentified: bounded in number and lifetime.
        let pass = unidentified.admit();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let stream = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                () = pass.must_close() => {
                    tracing::debug!(%peer, "evicted during its TLS handshake");
                    return;
                }
            };
            let session = stream.get_ref().1;
            let cert = session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::new(c.to_vec()));
            let http2 = session.alpn_protocol() == Some(b"h2".as_slice());
            // Only a connection with a certificate can be claimed for a device (by a
            // request that `Fleet::identify` accepts).
            let slot = cert.is_some().then(|| {
                connections::Slot::admitted(connections.clone(), http2, Some(pass.clone()))
            });
            let service = router.layer(axum::Extension(devices::PeerCertificate(
                cert,
                slot.clone(),
            )));
            let service = hyper_util::service::TowerToHyperService::new(service);
            let connection =
                builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            let superseded = async {
                match &slot {
                    Some(slot) => slot.superseded().await,
                    None => std::future::pending().await,
                }
            };
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = superseded => {
                    tracing::debug!(%peer, "connection superseded by the device's newer one");
                    // GOAWAY; requests in flight get a grace period, then it is dropped.
                    connection.as_mut().graceful_shutdown();
                    match tokio::time::timeout(connections::SUPERSEDED_GRACE, connection.as_mut()).await {
                        Ok(ended) => ended,
                        Err(_) => return,
                    }
                }
                () = pass.must_close() => {
                    // Unidentified past its lifetime, or evicted by a newer connection.
                    tracing::debug!(%peer, "closing an unidentified connection");
                    return;
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// Longest a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway's TLS configuration: its own certificate chain and key, and client
/// certificates verified against `device_ca` when presented (enrolment and attestation
/// run without one; the device API refuses requests without one).
pub fn server_tls(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    device_ca: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in device_ca {
        roots
            .add(c.clone())
            .map_err(|e| format!("device CA: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| format!("device CA: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("gateway certificate: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// The listening socket queues thousands of connections, not the standard library's
    /// 128 (as `ss` reports it: Send-Q of a listening socket is its backlog).
    #[tokio::test]
    async fn the_gateway_socket_queues_a_reconnect_storm() {
        let listener = super::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let out = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let backlog: u32 = text
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("ss said {text:?}"));
        assert_eq!(backlog, super::ACCEPT_BACKLOG.min(somaxconn), "{text}");
        assert!(backlog > 128, "{text}");
    }
}
