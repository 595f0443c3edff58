//! Fleet mode (`edgefleet-agent run`): enrol → attest → stream desired state → download
//! → verify → load → serve → report, and keep serving whatever happens to the gateway.
//!
//! ```text
//!             ┌────────────── start ───────────────┐
//!             ▼                                    │ last-known-good on disk:
//!   ┌──────────────────┐  verified again, loaded   │ serve it before the gateway answers
//!   │ Offline (serving │◄──────────────────────────┘
//!   │ what it has)     │◄───────────── gateway unreachable / refused ─────────┐
//!   └────────┬─────────┘  (reports spool, capped jittered backoff)            │
//!            │ enrol (bootstrap token) → attest (evidence → client cert)      │
//!            ▼                                                                │
//!   ┌──────────────────┐  desired == active: nothing restarts                │
//!   │ Connected        │─────────────────────────────────────────────────────┤
//!   │ (long-poll, mTLS)│                                                      │
//!   └────────┬─────────┘                                                      │
//!            │ new desired state                                              │
//!            ▼                                                                │
//!   Downloading (Range resume, size bound) → Verifying (digest, signature)    │
//!     → Loading (llama.cpp, plugins) → Ready (activated atomically, recorded  │
//!     as last-known-good)  ── any failure: Failed(reason), keep serving the   │
//!                             previous model ─────────────────────────────────┘
//! ```
//!
//! Reports (heartbeats) are taken every `fleet.heartbeat_seconds` into a bounded spool
//! and sent oldest first; the gateway acknowledges by sequence number. Model states ride
//! along only when they changed since the last acknowledged report, and a change is
//! reported at once (a burst gathered over [`REPORT_COALESCE`]) rather than at the next
//! heartbeat, so that a rollout step sees a device Ready as soon as it is.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgefleet_proto as proto;
use edgefleet_trust::model_signing::{TrustPolicy, TrustedSigner};
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;

use crate::config::AgentConfig;
use crate::enrol::{EnrolError, Source, attest_once};
use crate::gateway_client::{GatewayClient, GatewayError};
use crate::serve::Serving;

/// Why activating a model failed; the name goes into the report.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The download failed.
    #[error("DownloadFailed: {0}")]
    Download(String),
    /// The file's SHA-256 is not the expected digest.
    #[error("DigestMismatch: {0}")]
    Digest(String),
    /// The file grew beyond its declared size.
    #[error("TooLarge: {0}")]
    TooLarge(String),
    /// The signature bundle does not verify.
    #[error("SignatureInvalid: {0}")]
    Signature(String),
    /// llama.cpp refused the model.
    #[error("LoadFailed: {0}")]
    Load(String),
    /// A plugin was refused.
    #[error("PluginRefused: {0}")]
    Plugin(String),
    /// Local storage failed.
    #[error("StateDirectory: {0}")]
    State(String),
}

/// The mTLS client of the device API.
#[derive(Debug, Clone)]
pub struct DeviceClient {
    http: reqwest::Client,
    base: String,
    device: String,
    /// What it was built from, to reconnect with.
    identity: Arc<Identity>,
}

/// The gateway CA, the client certificate and key (PEM), and the read timeout.
#[derive(Debug)]
struct Identity {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    timeout: Duration,
}

fn rejected(status: reqwest::StatusCode, body: &[u8]) -> GatewayError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    GatewayError::Rejected {
        status: status.as_u16(),
        reason: v["reason"].as_str().unwrap_or("Unknown").to_owned(),
        message: v["message"].as_str().unwrap_or("").to_owned(),
    }
}

impl DeviceClient {
    /// A client for `base` trusting `ca_pem`, presenting `cert_pem` with `key_pem`.
    pub fn new(
        base: &str,
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
        device: &str,
        timeout: Duration,
    ) -> Result<Self, GatewayError> {
        use rustls::pki_types::pem::PemObject as _;
        let roots = crate::gateway_client::roots(ca_pem)?;
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| GatewayError::Ca(format!("client certificate: {e}")))?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| GatewayError::Ca(format!("client key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| GatewayError::Ca(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| GatewayError::Ca(format!("client certificate: {e}")))?;
        // HTTP/2 when the gateway offers it: the long-poll, reports and downloads share
        // one connection, so a device costs the gateway one socket, not two or three.
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(timeout)
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            device: device.to_owned(),
            identity: Arc::new(Identity {
                ca: ca_pem.to_vec(),
                cert: cert_pem.to_vec(),
                key: key_pem.to_vec(),
                timeout,
            }),
        })
    }

    /// The same identity over new connections (the old ones close once unused).
    pub fn reconnect(&self) -> Self {
        let i = &*self.identity;
        Self::new(&self.base, &i.ca, &i.cert, &i.key, &self.device, i.timeout)
            .unwrap_or_else(|_| self.clone())
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v1/devices/{}/{tail}", self.base, self.device)
    }

    /// Long-polls the desired state: `None` when it is still `version` after `wait`.
    pub async fn desired(
        &self,
        version: Option<&str>,
        wait: Duration,
    ) -> Result<Option<proto::DesiredState>, GatewayError> {
        let mut req = self
            .http
            .get(self.url("desired"))
            .query(&[("waitSeconds", wait.as_secs().to_string())]);
        if let Some(v) = version {
            req = req.query(&[("version", v)]);
        }
        let resp = req.send().await?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let body = resp.bytes().await?;
        if !status.is_success() {
            return Err(rejected(status, &body));
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| GatewayError::Rejected {
                status: status.as_u16(),
                reason: "BadResponse".into(),
                message: e.to_string(),
            })
    }

    /// Sends reports.
    pub async fn report(
        &self,
        batch: &proto::ReportBatch,
    ) -> Result<proto::ReportAck, GatewayError> {
        let resp = self
            .http
            .post(self.url("report"))
            .json(batch)
            .send()
            .await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        if !status.is_success() {
            return Err(rejected(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| GatewayError::Rejected {
            status: status.as_u16(),
            reason: "BadResponse".into(),
            message: e.to_string(),
        })
    }

    /// Starts a download of `path` from byte `from`.
    ///
    /// `503` means the gateway does not have the file yet (it is mirroring it into its
    /// store, or the revision's template is on its way): asked again every
    /// [`FETCHING_POLL`], for up to [`FETCHING_PATIENCE`], before it counts as a failure.
    pub async fn download(&self, path: &str, from: u64) -> Result<reqwest::Response, GatewayError> {
        let deadline = tokio::time::Instant::now() + FETCHING_PATIENCE;
        loop {
            let mut req = self.http.get(format!("{}{path}", self.base));
            if from > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
            }
            let resp = req.send().await?;
            let status = resp.status();
            if status.is_success() || status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
                return Ok(resp);
            }
            let body = resp.bytes().await?;
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                && tokio::time::Instant::now() + FETCHING_POLL < deadline
            {
                tracing::info!(%path, "the gateway does not have the artifact yet; asking again");
                tokio::time::sleep(FETCHING_POLL).await;
                continue;
            }
            return Err(rejected(status, &body));
        }
    }
}

/// How often a download the gateway answered `503` is asked again.
pub const FETCHING_POLL: Duration = Duration::from_secs(2);
/// How long a download waits for the gateway to have the artifact.
pub const FETCHING_PATIENCE: Duration = Duration::from_secs(300);

fn hex_of(digest: &str) -> Result<&str, ActivateError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| ActivateError::Digest(format!("{digest:?} is not sha256:<hex>")))
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Fetches an artifact into `dir/<hex>`: resumes `dir/<hex>.partial` with a Range
/// request, stops at the declared size, checks the digest of the whole file, and only
/// then renames it into place. A file already in place is checked again and reused.
pub async fn fetch(
    client: &DeviceClient,
    artifact: &proto::ArtifactRef,
    dir: &Path,
) -> Result<PathBuf, ActivateError> {
    let hex = hex_of(&artifact.digest)?.to_owned();
    let done = dir.join(&hex);
    let partial = dir.join(format!("{hex}.partial"));
    let state = |e: std::io::Error| ActivateError::State(e.to_string());
    tokio::fs::create_dir_all(dir).await.map_err(state)?;
    if tokio::fs::try_exists(&done).await.unwrap_or(false) {
        let p = done.clone();
        let got = tokio::task::spawn_blocking(move || file_sha256(&p))
            .await
            .map_err(|e| ActivateError::State(e.to_string()))?
            .map_err(state)?;
        if got == hex {
            return Ok(done);
        }
        tracing::warn!(file = %done.display(), "a stored artifact no longer matches its digest; fetching it again");
        tokio::fs::remove_file(&done).await.map_err(state)?;
    }
    let mut have = tokio::fs::metadata(&partial)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    if artifact.size_bytes.is_some_and(|s| have > s) {
        have = 0;
    }
    if have > 0 {
        tracing::info!(digest = %artifact.digest, from = have, "resuming download");
    }
    let resp = client
        .download(&artifact.path, have)
        .await
        .map_err(|e| ActivateError::Download(e.to_string()))?;
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&partial)
        .await
        .map_err(state)?;
    let mut written = match resp.status() {
        reqwest::StatusCode::PARTIAL_CONTENT => have,
        reqwest::StatusCode::RANGE_NOT_SATISFIABLE => have,
        _ => 0,
    };
    file.set_len(written).await.map_err(state)?;
    file.seek_to(written).await.map_err(state)?;
    if resp.status() != reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        let mut resp = resp;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| ActivateError::Download(e.to_string()))?
        {
            written += chunk.len() as u64;
            if let Some(max) = artifact.size_bytes
                && written > max
            {
                drop(file);
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(ActivateError::TooLarge(format!(
                    "{} grew beyond its declared {max} bytes",
                    artifact.digest
                )));
            }
            file.write_all(&chunk).await.map_err(state)?;
        }
    }
    file.sync_all().await.map_err(state)?;
    drop(file);
    let p = partial.clone();
    let got = tokio::task::spawn_blocking(move || file_sha256(&p))
        .await
        .map_err(|e| ActivateError::State(e.to_string()))?
        .map_err(state)?;
    if got != hex {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(ActivateError::Digest(format!(
            "downloaded sha256:{got}, expected {}",
            artifact.digest
        )));
    }
    tokio::fs::rename(&partial, &done).await.map_err(state)?;
    Ok(done)
}

trait SeekTo {
    async fn seek_to(&mut self, at: u64) -> std::io::Result<u64>;
}

impl SeekTo for tokio::fs::File {
    async fn seek_to(&mut self, at: u64) -> std::io::Result<u64> {
        use tokio::io::AsyncSeekExt as _;
        self.seek(std::io::SeekFrom::Start(at)).await
    }
}

/// The signers of a desired model as a trust policy.
pub fn trust_policy(signers: &[proto::Signer]) -> Result<TrustPolicy, ActivateError> {
    let signers = signers
        .iter()
        .map(|s| {
            TrustedSigner::from_pem(
                &s.name,
                s.public_key.as_deref(),
                s.certificate_root.as_deref(),
                &s.identities,
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(ActivateError::Signature)?;
    Ok(TrustPolicy { signers })
}

/// Verifies `file` against `bundle` and, for a single-file bundle, that it signs the
/// same digest as `digest` (the gateway's word, already checked on the bytes).
pub fn verify_file(
    file: &Path,
    bundle: &str,
    policy: &TrustPolicy,
    digest: &str,
) -> Result<(), ActivateError> {
    let v = edgefleet_trust::model_signing::verify(
        bundle.as_bytes(),
        file,
        policy,
        std::time::SystemTime::now(),
        &[],
    )
    .map_err(|e| ActivateError::Signature(format!("{}: {e}", e.reason())))?;
    if let [(_, signed)] = v.resources.as_slice()
        && format!("sha256:{signed}") != digest
    {
        return Err(ActivateError::Signature(format!(
            "the bundle signs sha256:{signed}, not {digest}"
        )));
    }
    tracing::info!(file = %file.display(), signer = %v.signer, "signature verified");
    Ok(())
}

#[derive(Debug, Default)]
struct Shared {
    models: Vec<proto::ModelReport>,
    /// Bumped whenever `models` changes.
    models_version: u64,
    /// `models_version` of the last acknowledged report that carried models.
    acked_models_version: Option<u64>,
    spool: VecDeque<(proto::Report, Option<u64>)>,
    seq: u64,
    dropped: u64,
    client: Option<DeviceClient>,
}

/// The fleet agent.
pub struct FleetAgent {
    config: AgentConfig,
    serving: Arc<Serving>,
    shared: Mutex<Shared>,
    boot: String,
    active: tokio::sync::Mutex<Option<proto::DeviceModel>>,
    /// Model states changed since the last report was taken.
    models_changed: tokio::sync::Notify,
}

/// How long a change of model states waits for the changes right behind it (Loading
/// then Ready) before it is reported; also the least time between two reports.
pub const REPORT_COALESCE: Duration = Duration::from_millis(250);

impl std::fmt::Debug for FleetAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetAgent")
            .field("boot", &self.boot)
            .finish_non_exhaustive()
    }
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 4];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    let frac = f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX);
    // Between half and the whole of `d`, so that a fleet does not reconnect in step.
    d.mul_f64(0.5 + frac / 2.0)
}

impl FleetAgent {
    /// An agent with `config`, serving through `serving`.
    pub fn new(config: AgentConfig, serving: Arc<Serving>) -> Arc<Self> {
        let mut b = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
        Arc::new(Self {
            config,
            serving,
            shared: Mutex::new(Shared::default()),
            boot: hex::encode(b),
            active: tokio::sync::Mutex::new(None),
            models_changed: tokio::sync::Notify::new(),
        })
    }

    fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    fn active_path(&self) -> PathBuf {
        self.state_dir().join("active.json")
    }

    fn set_model_state(
        &self,
        m: &proto::DeviceModel,
        state: &str,
        message: Option<String>,
        load_millis: Option<u64>,
    ) {
        let report = proto::ModelReport {
            model: m.model.clone(),
            revision: m.revision.clone(),
            state: state.to_owned(),
            message,
            load_millis,
        };
        self.set_models(vec![report]);
    }

    fn set_models(&self, models: Vec<proto::ModelReport>) {
        if let Ok(mut s) = self.shared.lock()
            && s.models != models
        {
            s.models = models;
            s.models_version += 1;
            drop(s);
            self.models_changed.notify_one();
        }
    }

    /// Serves the last-known-good model, if one is recorded and still verifies.
    pub async fn restore(&self) {
        let path = self.active_path();
        let Ok(text) = tokio::fs::read_to_string(&path).await else {
            return;
        };
        let m: proto::DeviceModel = match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable last-known-good record; ignoring it");
                return;
            }
        };
        tracing::info!(model = %m.model, revision = %m.revision, "restoring the last-known-good model");
        match self.activate(None, &m).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(model = %m.model, error = %e, "the last-known-good model does not load");
                self.set_model_state(&m, "Failed", Some(e.to_string()), None);
            }
        }
    }

    /// Fetches (when `client` is given; otherwise only from disk), verifies, loads and
    /// serves `m`, then records it as last-known-good.
    async fn activate(
        &self,
        client: Option<&DeviceClient>,
        m: &proto::DeviceModel,
    ) -> Result<(), ActivateError> {
        let dir = self.state_dir().join("artifacts");
        let policy = trust_policy(&m.signers)?;
        let get = |a: proto::ArtifactRef| {
            let dir = dir.clone();
            async move {
                match client {
                    Some(c) => fetch(c, &a, &dir).await,
                    None => {
                        let p = dir.join(hex_of(&a.digest)?);
                        let p2 = p.clone();
                        let got = tokio::task::spawn_blocking(move || file_sha256(&p2))
                            .await
                            .map_err(|e| ActivateError::State(e.to_string()))?
                            .map_err(|e| ActivateError::State(format!("{}: {e}", p.display())))?;
                        if format!("sha256:{got}") != a.digest {
                            return Err(ActivateError::Digest(format!(
                                "{} changed on disk",
                                p.display()
                            )));
                        }
                        Ok(p)
                    }
                }
            }
        };
        self.set_model_state(m, "Downloading", None, None);
        let model_file = get(m.artifact.clone()).await?;
        let mut plugin_files = Vec::new();
        for p in &m.plugins {
            plugin_files.push(get(p.artifact.clone()).await?);
        }
        self.set_model_state(m, "Verifying", None, None);
        {
            let (f, b, d, pol) = (
                model_file.clone(),
                m.bundle.clone(),
                m.artifact.digest.clone(),
                policy.clone(),
            );
            tokio::task::spawn_blocking(move || verify_file(&f, &b, &pol, &d))
                .await
                .map_err(|e| ActivateError::State(e.to_string()))??;
        }
        let mut specs = Vec::new();
        for (p, file) in m.plugins.iter().zip(&plugin_files) {
            let wasm = tokio::fs::read(file)
                .await
                .map_err(|e| ActivateError::State(format!("{}: {e}", file.display())))?;
            // The bytes compiled are the bytes verified.
            let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&wasm)));
            if digest != p.artifact.digest {
                return Err(ActivateError::Digest(format!(
                    "plugin {} changed on disk",
                    p.name
                )));
            }
            let (f, b, d, pol) = (
                file.clone(),
                p.bundle.clone(),
                p.artifact.digest.clone(),
                policy.clone(),
            );
            tokio::task::spawn_blocking(move || verify_file(&f, &b, &pol, &d))
                .await
                .map_err(|e| ActivateError::State(e.to_string()))?
                .map_err(|e| ActivateError::Plugin(format!("{}: {e}", p.name)))?;
            specs.push(crate::plugins::PluginSpec {
                wasm,
                name: p.name.clone(),
                limits: crate::plugins::Limits {
                    fuel: p.fuel,
                    deadline: p.deadline_millis.map(Duration::from_millis),
                    memory_bytes: p.memory_bytes,
                },
                config: p.config.clone(),
                grants: crate::plugins::Grants {
                    env: p.grants.env.clone(),
                    clocks: p.grants.clocks,
                    read_only_dirs: p
                        .grants
                        .read_only_dirs
                        .iter()
                        .map(|d| (PathBuf::from(d), d.clone()))
                        .collect(),
                    network: p.grants.network,
                },
            });
        }
        self.set_model_state(m, "Loading", None, None);
        let loaded =
            if specs.is_empty() {
                None
            } else {
                let runtime =
                    crate::plugins::PluginRuntime::new(self.config.fleet.plugin_cache.as_deref())
                        .map_err(|e| ActivateError::Plugin(e.to_string()))?;
                let mut loaded = Vec::new();
                for spec in specs {
                    let name = spec.name.clone();
                    loaded.push(runtime.load(spec).map_err(|e| {
                        ActivateError::Plugin(format!("{name}: {}: {e}", e.reason()))
                    })?);
                }
                Some((runtime, loaded))
            };
        let serve = &self.config.serve;
        let threads = m
            .runtime
            .threads
            .or((serve.threads > 0).then_some(serve.threads));
        let config = crate::engine::EngineConfig {
            model_path: model_file,
            served_name: m.served_name.clone(),
            context_size: m.runtime.context_size.max(128),
            threads: threads.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| (n.get() as i32 - 1).max(1)),
                |t| i32::try_from(t).unwrap_or(1),
            ),
            gpu_layers: m.runtime.gpu_layers,
            parallel_slots: usize::try_from(m.runtime.parallel_slots.max(1)).unwrap_or(1),
            queue_depth: usize::try_from(m.runtime.queue_depth.max(1)).unwrap_or(1),
        };
        let engine = tokio::task::spawn_blocking(move || crate::engine::Engine::load(config))
            .await
            .map_err(|e| ActivateError::Load(e.to_string()))?
            .map_err(|e| ActivateError::Load(e.to_string()))?;
        let load_millis = engine.load_millis();
        let engine = Arc::new(engine);
        let chain = loaded.map(|(runtime, loaded)| {
            let infer =
                crate::serve::EngineSubPrompt::new(&engine, tokio::runtime::Handle::current());
            runtime.chain(loaded, Some(infer), Default::default())
        });
        self.serving.install_with_plugins(engine, chain);
        // Last-known-good, written atomically.
        let record =
            serde_json::to_vec_pretty(m).map_err(|e| ActivateError::State(e.to_string()))?;
        let tmp = self.state_dir().join(".active.json.partial");
        tokio::fs::write(&tmp, record)
            .await
            .map_err(|e| ActivateError::State(e.to_string()))?;
        tokio::fs::rename(&tmp, self.active_path())
            .await
            .map_err(|e| ActivateError::State(e.to_string()))?;
        *self.active.lock().await = Some(m.clone());
        self.set_model_state(m, "Ready", None, Some(load_millis));
        crate::systemd::status(&format!(
            "serving {} revision {}",
            m.served_name, m.revision
        ));
        tracing::info!(model = %m.model, revision = %m.revision, load_ms = load_millis, "serving");
        Ok(())
    }

    /// Brings the device to `desired`. Nothing restarts when it already runs it.
    pub async fn converge(&self, client: &DeviceClient, desired: &proto::DesiredState) {
        let current = self.active.lock().await.clone();
        let Some(want) = desired.models.first() else {
            if let Some(c) = current {
                tracing::info!(model = %c.model, "unassigned; unloading");
                self.serving.uninstall();
                let _ = tokio::fs::remove_file(self.active_path()).await;
                *self.active.lock().await = None;
                crate::systemd::status("serving no model");
            }
            self.set_models(vec![]);
            return;
        };
        if desired.models.len() > 1 {
            tracing::warn!(
                count = desired.models.len(),
                "this agent serves one model at a time; the first is served"
            );
        }
        if current.as_ref() == Some(want) {
            // Already running it (for example moved back after a failed revision): say
            // so again, without reloading.
            self.set_model_state(want, "Ready", None, None);
            return;
        }
        tracing::info!(model = %want.model, revision = %want.revision, "activating");
        if let Err(e) = self.activate(Some(client), want).await {
            tracing::warn!(model = %want.model, revision = %want.revision, error = %e, "activation failed; serving what was served before");
            self.set_model_state(want, "Failed", Some(e.to_string()), None);
        }
    }

    fn inference(&self) -> Option<proto::Inference> {
        let e = self.serving.current_engine()?;
        let s = e.stats();
        use std::sync::atomic::Ordering::Relaxed;
        let micros = s.generation_micros.load(Relaxed);
        let tokens = s.generated_tokens.load(Relaxed);
        Some(proto::Inference {
            requests_total: s.requests.load(Relaxed),
            errors_total: s.failures.load(Relaxed),
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

    /// Sends the spool; returns the gateway's desired-state version on success.
    async fn flush(&self) -> Result<Option<String>, GatewayError> {
        let (client, batch) = {
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
            )
        };
        if batch.reports.is_empty() {
            return Ok(None);
        }
        let ack = client.report(&batch).await?;
        if let Ok(mut s) = self.shared.lock() {
            while s.spool.front().is_some_and(|(r, _)| r.seq <= ack.acked) {
                if let Some((_, Some(v))) = s.spool.pop_front() {
                    s.acked_models_version = Some(v);
                }
            }
            // A later report must carry the models again if this one's were lost.
        }
        if ack.gaps > 0 {
            tracing::warn!(
                gaps = ack.gaps,
                "the gateway is missing reports of this boot"
            );
        }
        Ok(Some(ack.desired_version))
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

    /// Enrols, attests and follows the desired state, reconnecting with capped,
    /// jittered backoff, forever.
    pub async fn control_loop(self: Arc<Self>, mut source: Source) {
        let cfg = &self.config;
        let max = Duration::from_secs(cfg.fleet.backoff_max_seconds);
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.connected(&mut source).await {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => {
                    let wait = jitter(backoff);
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "gateway session ended");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(max);
                }
            }
        }
    }

    async fn connected(&self, source: &mut Source) -> Result<(), EnrolError> {
        let cfg = &self.config;
        let ca = std::fs::read(&cfg.gateway.ca).map_err(|e| EnrolError::State {
            path: cfg.gateway.ca.clone(),
            source: e,
        })?;
        let bootstrap =
            GatewayClient::new(&cfg.gateway.url, &ca, cfg.gateway.bootstrap_token.expose())?;
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
            .await?;
        if !enrolled.approved {
            return Err(EnrolError::Invalid(format!(
                "{} is enrolled but not approved yet",
                enrolled.device
            )));
        }
        let appraisal = attest_once(&bootstrap, &cfg.device.name, source, self.state_dir()).await?;
        if !appraisal.decision.allow {
            return Err(EnrolError::Invalid(format!(
                "the attestation policy denied this device: {:?}",
                appraisal.decision.deny
            )));
        }
        let cert = std::fs::read(self.state_dir().join("agent-cert.pem")).map_err(|e| {
            EnrolError::State {
                path: self.state_dir().join("agent-cert.pem"),
                source: e,
            }
        })?;
        let wait = Duration::from_secs(cfg.fleet.poll_wait_seconds.min(proto::MAX_WAIT_SECONDS));
        let client = DeviceClient::new(
            &cfg.gateway.url,
            &ca,
            &cert,
            key.serialize_pem().as_bytes(),
            &cfg.device.name,
            wait + Duration::from_secs(15),
        )?;
        if let Ok(mut s) = self.shared.lock() {
            s.client = Some(client.clone());
        }
        tracing::info!(device = %cfg.device.name, "connected to the gateway");
        // Re-attest at two thirds of the result's lifetime.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let reattest = tokio::time::Instant::now()
            + Duration::from_secs(((appraisal.expires_at - now).max(3) * 2 / 3) as u64)
                .min(Duration::from_secs(cfg.attestation.interval_seconds));
        let _ = self.flush().await;
        let mut version: Option<String> = None;
        while tokio::time::Instant::now() < reattest {
            match client.desired(version.as_deref(), wait).await {
                Ok(Some(desired)) => {
                    tracing::info!(version = %desired.version, models = desired.models.len(), "desired state");
                    self.converge(&client, &desired).await;
                    version = Some(desired.version);
                    let _ = self.flush().await;
                }
                Ok(None) => {}
                Err(e) => {
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

/// What this machine is.
pub fn facts(tee: &str) -> proto::Facts {
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(1 << 30, |kb| kb * 1024);
    proto::Facts {
        arch: std::env::consts::ARCH.to_owned(),
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_bytes,
        accelerators: vec![],
        tee_kinds: vec![tee.to_owned()],
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Runs the agent in fleet mode: serve first (the last-known-good model, if any), then
/// connect. Returns when the server stops (SIGTERM, SIGINT).
pub async fn run(
    config: AgentConfig,
    source: Source,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.serve.listen).await?;
    let serving = Serving::new();
    let router = crate::serve::router(serving.clone());
    let listen = config.serve.listen;
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                shutdown.await;
                crate::systemd::stopping();
            })
            .await
    });
    let _watchdog = crate::systemd::spawn_watchdog();
    let agent = FleetAgent::new(config, serving.clone());
    agent.restore().await;
    if agent.active.lock().await.is_none() {
        serving.set_no_model();
    }
    crate::systemd::ready(&format!("agent listening on {listen}"));
    let reports = tokio::spawn(agent.clone().report_loop());
    let control = tokio::spawn(agent.clone().control_loop(source));
    let result = server.await;
    reports.abort();
    control.abort();
    result??;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn agent() -> (Arc<FleetAgent>, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("agent.toml"),
            "[device]\nname = \"till-1\"\n[gateway]\nurl = \"https://gw:8443\"\nbootstrap_token = \"s3cret-token-value\"\n",
        )
        .unwrap();
        let config = crate::config::load(d.path(), Vec::new()).unwrap();
        (FleetAgent::new(config, Serving::new()), d)
    }

    fn models(state: &str) -> Vec<proto::ModelReport> {
        vec![proto::ModelReport {
            model: "retail/smollm2".into(),
            revision: "0123456789abcdef".into(),
            state: state.into(),
            message: None,
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
        a.set_models(models("Loading"));
        a.set_models(models("Ready"));
        let started = std::time::Instant::now();
        a.next_report(every).await;
        let waited = started.elapsed();
        assert!(waited >= REPORT_COALESCE && waited < every, "{waited:?}");
        // The same states again are no change: back to the heartbeat.
        a.set_models(models("Ready"));
        let started = std::time::Instant::now();
        a.next_report(every).await;
        assert!(started.elapsed() >= every, "{:?}", started.elapsed());
    }
}
