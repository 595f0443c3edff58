//! `edgefleet-operator run` options of the device gateway, and starting it from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use edgefleet_trust::attestation::policy::Policy;
use edgefleet_trust::attestation::service::{AttestationService, ServiceConfig};
use edgefleet_trust::attestation::snp::SnpRoots;

use super::devices::{Approval, Fleet, FleetConfig};
use super::{Gateway, serve_with, server_tls};
use crate::device_status::DeviceStatus;
use crate::metrics::FleetCounters;

/// Gateway options. Without `--gateway-addr` the operator runs no gateway.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayOptions {
    /// Address of the device gateway (HTTPS, mTLS after attestation).
    #[arg(long, env = "EDGEFLEET_GATEWAY_ADDR")]
    pub gateway_addr: Option<SocketAddr>,
    /// PEM certificate chain the gateway serves.
    #[arg(
        long,
        env = "EDGEFLEET_GATEWAY_CERT",
        default_value = "/etc/edgefleet/gateway/tls.crt"
    )]
    pub gateway_cert: PathBuf,
    /// PEM (PKCS#8) key of that certificate.
    #[arg(
        long,
        env = "EDGEFLEET_GATEWAY_KEY",
        default_value = "/etc/edgefleet/gateway/tls.key"
    )]
    pub gateway_key: PathBuf,
    /// PEM certificate of the device CA, which issues devices' client certificates.
    #[arg(
        long,
        env = "EDGEFLEET_DEVICE_CA_CERT",
        default_value = "/etc/edgefleet/device-ca/tls.crt"
    )]
    pub device_ca_cert: PathBuf,
    /// PEM key of the device CA.
    #[arg(
        long,
        env = "EDGEFLEET_DEVICE_CA_KEY",
        default_value = "/etc/edgefleet/device-ca/tls.key"
    )]
    pub device_ca_key: PathBuf,
    /// File holding a shared lab token (at least 16 characters) that enrols any device
    /// name and never expires, besides the `EdgeBootstrapToken`s (prefer those: they
    /// expire, count usages and allow only the names they name). Without it, only
    /// `EdgeBootstrapToken`s enrol devices; an empty file is the same.
    #[arg(long, env = "EDGEFLEET_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// The Rego appraisal policy.
    #[arg(
        long,
        env = "EDGEFLEET_POLICY",
        default_value = "/etc/edgefleet/policies/attestation.rego"
    )]
    pub policy: PathBuf,
    /// Its reference values (JSON, the policy's `data`).
    #[arg(
        long,
        env = "EDGEFLEET_POLICY_DATA",
        default_value = "/etc/edgefleet/policies/reference.json"
    )]
    pub policy_data: PathBuf,
    /// The policy's name, which EdgeModels require in `spec.attestation.policy`.
    #[arg(long, default_value = "default")]
    pub policy_name: String,
    /// PEM (PKCS#8) P-256 key that signs attestation results (default: a fresh key per
    /// process, so results do not verify across restarts).
    #[arg(long, env = "EDGEFLEET_RESULT_KEY")]
    pub result_key: Option<PathBuf>,
    /// Lifetime of an attestation result and of the client certificate, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(60..=86400))]
    pub result_ttl_seconds: u64,
    /// PEM EK CA certificates trusted for TPM enrolment (repeatable).
    #[arg(long = "ek-ca")]
    pub ek_cas: Vec<PathBuf>,
    /// PEM EK intermediate certificates (repeatable).
    #[arg(long = "ek-intermediate")]
    pub ek_intermediates: Vec<PathBuf>,
    /// PEM Intel SGX root CA, for TDX quotes.
    #[arg(long)]
    pub intel_root: Option<PathBuf>,
    /// Intel TDX collateral directory: `tcb_info_<fmspc>.json`, `td_qe_identity.json`
    /// and `tcb_signing_chain.pem` from Intel's PCS, refreshed out of band (read for
    /// each quote). Without it, TDX TCB status is `unknown`.
    #[arg(long)]
    pub tdx_collateral: Option<PathBuf>,
    /// Fleet-wide budget of status refresh writes per second: writes that only keep a
    /// device's `lastHeartbeatTime` and serving statistics fresh. Readiness changes are
    /// written whatever the budget. Liveness is decided from the gateway's memory, so a
    /// spent budget delays timestamps, never readiness.
    #[arg(long, default_value_t = crate::heartbeat::DEFAULT_REFRESH_PER_SECOND, value_parser = parse_rate)]
    pub status_refresh_per_second: f64,
    /// Fleet-wide budget of report writes per second that carry a change (model
    /// states, dropped reports) to `EdgeDevice.status`. The reconciler reads reported
    /// model states from the gateway's memory, so a spent budget delays the device
    /// statuses, not the rollout; a deferred change is written with a later report.
    #[arg(long, default_value_t = crate::heartbeat::DEFAULT_CHANGE_PER_SECOND, value_parser = parse_rate)]
    pub status_change_per_second: f64,
    /// AMD roots as GENERATION=FILE (a PEM bundle with the ARK and ASK), repeatable.
    #[arg(long = "snp-roots", value_name = "GEN=FILE")]
    pub snp_roots: Vec<String>,
    /// Content-addressed artifact store the gateway serves (files named by SHA-256 hex).
    #[arg(
        long,
        env = "EDGEFLEET_ARTIFACT_DIR",
        default_value = "/var/lib/edgefleet/artifacts"
    )]
    pub artifact_dir: PathBuf,
    /// Disk budget of the artifact store, in bytes: every ten minutes, artifacts that no
    /// EdgeModel references (in its spec or its revision templates) are removed, oldest
    /// first, until the store fits. Referenced artifacts are never removed.
    #[arg(long, env = "EDGEFLEET_ARTIFACT_BUDGET_BYTES", default_value_t = 32 << 30)]
    pub artifact_budget_bytes: u64,
    /// PEM roots trusted when the gateway mirrors an assigned `https://` artifact that is
    /// not in the store yet (gateway::mirror). Unreadable: nothing is mirrored.
    #[arg(
        long,
        env = "EDGEFLEET_ARTIFACT_CA",
        default_value = "/etc/ssl/certs/ca-certificates.crt"
    )]
    pub artifact_ca: PathBuf,
    /// Approval at enrolment: `manual`, `auto`, or `auto:key=value,...` (devices asking
    /// for all of those labels).
    #[arg(long, default_value = "manual", value_parser = Approval::parse)]
    pub approval: Approval,
    /// Seconds a device connection may stay quiet before the gateway checks that its
    /// peer is still there (an HTTP/2 ping; TCP keepalive for HTTP/1.1). 0: never
    /// check, and a vanished device's connection is held until TCP gives up.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub device_keepalive_seconds: u64,
    /// Seconds the peer has to answer that check before its connection is closed.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub device_keepalive_timeout_seconds: u64,
    /// Connections no device has claimed yet (TLS handshakes, enrolment, attestation)
    /// held at once; a new one beyond it closes the oldest, so a flood of slow or junk
    /// connections cannot keep devices out. Identified devices never count.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    pub unidentified_connections: u64,
    /// Seconds a connection may stay unclaimed by a device before it is closed.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=3600))]
    pub unidentified_lifetime_seconds: u64,
    /// The attestation lease, in seconds: how long a device may go on serving (offline,
    /// or refused by the gateway) after its last successful attestation. At its end the
    /// agent unloads its model (`AttestationLeaseExpired`) until it attests again.
    #[arg(
        long,
        env = "EDGEFLEET_ATTESTATION_LEASE_SECONDS",
        default_value_t = edgefleet_proto::DEFAULT_ATTESTATION_LEASE_SECONDS,
        value_parser = clap::value_parser!(u64).range(10..=2_592_000)
    )]
    pub attestation_lease_seconds: u64,
}

fn read(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn der_certs(path: &PathBuf) -> anyhow::Result<Vec<Vec<u8>>> {
    edgefleet_trust::attestation::pem_certificates(&read(path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=10_000.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a rate between 0 and 10000 per second"
        )),
    }
}

impl GatewayOptions {
    /// Builds the gateway and returns its liveness (for the leader's expiry sweep), its
    /// device cache (for the EdgeModel reconciler) and the future that serves it (and
    /// keeps its caches and the lapse sweep), or `None` without `--gateway-addr`.
    pub async fn start(
        &self,
        client: kube::Client,
        heartbeat_lease: Duration,
        counters: Arc<FleetCounters>,
    ) -> anyhow::Result<
        Option<(
            crate::heartbeat::Heartbeats,
            crate::device_cache::SharedDevices,
            impl std::future::Future<Output = anyhow::Result<()>> + use<>,
        )>,
    > {
        let Some(addr) = self.gateway_addr else {
            return Ok(None);
        };
        let token = match &self.bootstrap_token_file {
            Some(file) => {
                let token = String::from_utf8(read(file)?)
                    .context("the bootstrap token is not UTF-8")?
                    .trim()
                    .to_owned();
                if !token.is_empty() && token.len() < super::devices::MIN_SHARED_TOKEN_LEN {
                    anyhow::bail!(
                        "{}: the shared bootstrap token must be at least {} characters",
                        file.display(),
                        super::devices::MIN_SHARED_TOKEN_LEN
                    );
                }
                if !token.is_empty() {
                    tracing::warn!(
                        file = %file.display(),
                        "a shared bootstrap token enrols any device name and never expires; \
                         prefer EdgeBootstrapTokens (edgefleet token create)"
                    );
                }
                (!token.is_empty()).then_some(token)
            }
            None => None,
        };
        let rego = String::from_utf8(read(&self.policy)?).context("policy is not UTF-8")?;
        let data =
            String::from_utf8(read(&self.policy_data)?).context("policy data is not UTF-8")?;
        let policy = Policy::load(&self.policy_name, &rego, &data)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.policy.display()))?;
        let mut snp_roots = Vec::new();
        for spec in &self.snp_roots {
            let (generation, file) = spec
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--snp-roots {spec:?}: expected GEN=FILE"))?;
            snp_roots.push(
                SnpRoots::from_pem(generation, &read(&PathBuf::from(file))?)
                    .map_err(|e| anyhow::anyhow!("{file}: {e}"))?,
            );
        }
        let mut ek_cas = Vec::new();
        for f in &self.ek_cas {
            ek_cas.extend(der_certs(f)?);
        }
        let mut ek_intermediates = Vec::new();
        for f in &self.ek_intermediates {
            ek_intermediates.extend(der_certs(f)?);
        }
        let intel_root = match &self.intel_root {
            Some(f) => der_certs(f)?.into_iter().next(),
            None => None,
        };
        let result_key = match &self.result_key {
            Some(f) => {
                use p256::pkcs8::DecodePrivateKey as _;
                let pem = String::from_utf8(read(f)?).context("result key is not UTF-8")?;
                p256::ecdsa::SigningKey::from_pkcs8_pem(&pem)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
            }
            None => {
                tracing::warn!(
                    "no --result-key: attestation results are signed with a key of this process only"
                );
                p256::ecdsa::SigningKey::random(&mut rand_core::OsRng)
            }
        };
        let ca_cert =
            String::from_utf8(read(&self.device_ca_cert)?).context("device CA is not UTF-8")?;
        let ca_key =
            String::from_utf8(read(&self.device_ca_key)?).context("device CA key is not UTF-8")?;
        let service = AttestationService::new(
            ServiceConfig {
                nonce_ttl: Duration::from_secs(60),
                result_ttl: Duration::from_secs(self.result_ttl_seconds),
                snp_roots,
                intel_root,
                tdx_collateral: self.tdx_collateral.clone(),
                ek_cas,
                ek_intermediates,
            },
            policy,
            result_key,
            &ca_cert,
            &ca_key,
        )
        .map_err(|e| anyhow::anyhow!("attestation service: {e}"))?;
        let chain: Vec<rustls::pki_types::CertificateDer<'static>> = der_certs(&self.gateway_cert)?
            .into_iter()
            .map(Into::into)
            .collect();
        let key = {
            use rustls::pki_types::pem::PemObject as _;
            rustls::pki_types::PrivateKeyDer::from_pem_slice(&read(&self.gateway_key)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", self.gateway_key.display()))?
        };
        let device_ca: Vec<rustls::pki_types::CertificateDer<'static>> =
            edgefleet_trust::attestation::pem_certificates(ca_cert.as_bytes())
                .map_err(|e| anyhow::anyhow!("device CA: {e}"))?
                .into_iter()
                .map(Into::into)
                .collect();
        let tls = server_tls(chain, key, &device_ca).map_err(|e| anyhow::anyhow!(e))?;
        std::fs::create_dir_all(&self.artifact_dir)
            .with_context(|| format!("creating {}", self.artifact_dir.display()))?;

        let mirror = match std::fs::read(&self.artifact_ca)
            .map_err(|e| format!("{}: {e}", self.artifact_ca.display()))
            .and_then(|pem| super::mirror::Mirror::new(&self.artifact_dir, &pem))
        {
            Ok(m) => Some(m),
            Err(why) => {
                tracing::warn!(%why, "artifacts missing from the store will not be mirrored");
                None
            }
        };
        let superseded = counters.superseded.clone();
        let evicted = counters.unidentified_evicted.clone();
        let refusals = counters.clone();
        let (fleet, caches) = Fleet::new(
            client.clone(),
            FleetConfig {
                artifact_dir: self.artifact_dir.clone(),
                artifact_budget_bytes: self.artifact_budget_bytes,
                mirror,
                approval: self.approval.clone(),
                heartbeat_lease,
                bootstrap_token: token,
                refresh_per_second: self.status_refresh_per_second,
                change_per_second: self.status_change_per_second,
                attestation_lease: Duration::from_secs(self.attestation_lease_seconds),
            },
            counters,
        );
        let recorder = kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "edgefleet-gateway".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        fleet.set_events(recorder.clone());
        let devices = DeviceStatus::new(client).with_cache(fleet.device_cache());
        let gateway = Gateway::new(Arc::new(service), devices)
            .with_counters(refusals)
            .with_events(recorder)
            .with_attestation_lease(Duration::from_secs(self.attestation_lease_seconds));
        let router = gateway.clone().router().merge(fleet.clone().router());
        let listener = super::listen(addr).with_context(|| format!("binding {addr}"))?;
        let connection_options = super::ConnectionOptions {
            keepalive_idle: (self.device_keepalive_seconds > 0)
                .then(|| Duration::from_secs(self.device_keepalive_seconds)),
            keepalive_timeout: Duration::from_secs(self.device_keepalive_timeout_seconds),
            unidentified: super::unidentified::UnidentifiedLimits {
                cap: usize::try_from(self.unidentified_connections).unwrap_or(usize::MAX),
                lifetime: Duration::from_secs(self.unidentified_lifetime_seconds),
                ..super::unidentified::UnidentifiedLimits::default()
            },
        };
        let connections =
            Arc::new(super::DeviceConnections::new(superseded).with_evictions(evicted));
        let heartbeats = fleet.heartbeats();
        let shared = fleet.shared_devices();
        Ok(Some((heartbeats, shared, async move {
            let caches = tokio::spawn(caches);
            let lapse = tokio::spawn(gateway.lapse_loop());
            fleet
                .ready()
                .await
                .map_err(|e| anyhow::anyhow!("gateway caches: {e}"))?;
            let collect = tokio::spawn(fleet.clone().collect_loop());
            let key_releases = tokio::spawn(fleet.clone().key_release_loop());
            tracing::info!(%addr, "device gateway serving");
            let result = serve_with(
                listener,
                Arc::new(tls),
                router,
                connection_options,
                connections,
            )
            .await;
            caches.abort();
            lapse.abort();
            collect.abort();
            key_releases.abort();
            fleet.flush_key_releases().await;
            result.context("device gateway")
        })))
    }
}
