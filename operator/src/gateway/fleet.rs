//! The gateway's device API: enrolment (bootstrap token), then, over mTLS with the
//! certificate attestation issued, the desired-state long-poll, reports (heartbeats with
//! model-state deltas, spooled while offline) and artifact downloads with `Range`.
//! The messages are in [`edgefleet_proto`].
//!
//! - **Identity.** rustls checks the client certificate's chain to the device CA and its
//!   validity. A request for `/v1/devices/{name}/…` must then carry a certificate naming
//!   `{name}` (SAN URI `edgefleet://device/{name}`) whose key is the one the EdgeDevice
//!   enrolled with. Anything else is refused by name, logged and counted
//!   (`Impersonation`, `KeyMismatch`, `ClientCertificateRequired`).
//! - **Desired state** comes from watch caches (reflectors) of EdgeDevices and
//!   EdgeModels: the device's `spec.desiredModels`, each resolved through its
//!   EdgeModel's `status.revisions` template. A waiting poll wakes when its own device's
//!   relevant fields or a model's templates change, so changes reach connected devices
//!   as soon as the watch delivers them. Only approved devices with an allowed, unexpired
//!   attestation get models.
//! - **Reports** are heartbeats: each is noted in memory ([`Heartbeats::seen`]), which
//!   is what liveness is decided on, and so are the model states they carry
//!   ([`crate::reported`]), which is what the reconciler plans on. A device becoming
//!   Ready is written at once (`Ready`, under the heartbeat manager). A change in model
//!   states or dropped reports is written (`status.models`, `inference` and `reports`
//!   under [`REPORT_MANAGER`]) within a fleet-wide change budget
//!   (`--status-change-per-second`); past it, the change waits for a later report.
//!   Writes that only keep timestamps and statistics fresh are made at most every third
//!   of the lease per device, and only within a fleet-wide refresh budget
//!   (`--status-refresh-per-second`). So the API server's write rate from reports is
//!   bounded however many devices report, however often, and however many change at
//!   once in a rollout. Writes run in the background, at most one per device and
//!   [`MAX_CONCURRENT_WRITES`] in all, each carrying the device's latest state.
//! - **Artifacts** are served from a content-addressed directory (`<dir>/<sha256 hex>`),
//!   only to a device whose desired state names that digest.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use edgefleet_crds::device::{DesiredModel, EdgeDeviceSpec};
use edgefleet_crds::model::RevisionTemplate;
use edgefleet_crds::{EdgeDevice, EdgeModel};
use edgefleet_proto as proto;
use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::ApiError;
use crate::heartbeat::Heartbeats;

/// Field manager of the status fields reports write.
pub const REPORT_MANAGER: &str = "edgefleet-gateway-reports";

/// The client certificate of a connection (leaf, DER), put into each request by the
/// TLS accept loop, with the connection's slot in the gateway's connection table (a
/// request identified as a device claims the connection for it).
#[derive(Debug, Clone, Default)]
pub struct PeerCertificate(
    pub Option<Arc<Vec<u8>>>,
    pub Option<Arc<super::connections::Slot>>,
);

/// Who is approved at enrolment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// An administrator sets `spec.approved`.
    Manual,
    /// Devices whose requested labels include all of these (none: every device).
    Auto(BTreeMap<String, String>),
}

impl Approval {
    /// `manual`, `auto`, or `auto:key=value,key=value`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "manual" => Ok(Self::Manual),
            None if s == "auto" => Ok(Self::Auto(BTreeMap::new())),
            Some(("auto", labels)) => {
                let mut want = BTreeMap::new();
                for kv in labels.split(',').filter(|s| !s.is_empty()) {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| format!("{kv:?}: expected key=value"))?;
                    want.insert(k.to_owned(), v.to_owned());
                }
                Ok(Self::Auto(want))
            }
            _ => Err(format!(
                "{s:?}: expected manual, auto or auto:key=value,..."
            )),
        }
    }

    fn approves(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Manual => false,
            Self::Auto(want) => want.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }
}

/// Settings of the device API.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Content-addressed artifact store: files named by their SHA-256 (hex).
    pub artifact_dir: PathBuf,
    /// Fetches assigned `https://` artifacts missing from the store ([`super::mirror`]).
    pub mirror: Option<super::mirror::Mirror>,
    /// Approval at enrolment.
    pub approval: Approval,
    /// The heartbeat lease (reports write status at most every third of it, unless
    /// model states change).
    pub heartbeat_lease: Duration,
    /// Token devices enrol with.
    pub bootstrap_token: String,
    /// Refresh writes per second, fleet-wide (see the module docs).
    pub refresh_per_second: f64,
    /// Report writes that carry a change, per second, fleet-wide (see the module docs).
    pub change_per_second: f64,
}

/// Status writes in flight at once, fleet-wide: a rollout's change writes queue here
/// instead of flooding the API server.
pub const MAX_CONCURRENT_WRITES: usize = 32;

#[derive(Debug, Default)]
struct Delivery {
    boot: String,
    last_seq: u64,
    missing: u64,
    dropped: u64,
    last_write: Option<Instant>,
    /// The latest model states and counters: every write under [`REPORT_MANAGER`] must
    /// carry all of them, since server-side apply removes owned fields a patch omits.
    models: Option<Vec<edgefleet_crds::device::LoadedModel>>,
    inference: Option<proto::Inference>,
    /// A status write for this device is in flight.
    writing: bool,
    /// A change arrived while a write was in flight: the next report writes it.
    pending_change: bool,
}

/// Metrics of the device API (registered in [`crate::metrics::Metrics`]).
#[derive(Debug, Default, Clone)]
pub struct FleetCounters {
    /// Refused requests by reason.
    pub refusals: prometheus_client::metrics::family::Family<
        crate::metrics::ReasonLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    /// Devices holding a desired-state long-poll open now (connected devices).
    pub waiting: prometheus_client::metrics::gauge::Gauge,
    /// Status writes made for reports.
    pub report_writes: prometheus_client::metrics::counter::Counter,
    /// Refresh writes left for later because the budget was spent.
    pub refresh_deferred: prometheus_client::metrics::counter::Counter,
    /// Report writes carrying a change left for a later report because the change
    /// budget was spent.
    pub change_deferred: prometheus_client::metrics::counter::Counter,
    /// Artifact bytes sent.
    pub artifact_bytes: prometheus_client::metrics::counter::Counter,
    /// Device connections closed because the device opened a newer one.
    pub superseded: prometheus_client::metrics::counter::Counter,
}

struct Inner {
    client: Client,
    devices: Store<EdgeDevice>,
    models: Store<EdgeModel>,
    notify: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    models_changed: tokio::sync::watch::Sender<u64>,
    heartbeats: Heartbeats,
    deliveries: Mutex<HashMap<String, Delivery>>,
    /// The highest resourceVersion the device cache has applied, and a tick per device
    /// event: what the EdgeModel reconciler needs to plan on this cache too.
    devices_seen: Arc<std::sync::atomic::AtomicU64>,
    devices_changed: tokio::sync::watch::Sender<u64>,
    writes: Arc<tokio::sync::Semaphore>,
    config: FleetConfig,
    counters: Arc<FleetCounters>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The device API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

fn refuse(status: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
    ApiError(status, reason, message.into())
}

/// What of a device the desired state depends on.
fn device_digest(d: &EdgeDevice) -> String {
    let attestation = d.status.as_ref().and_then(|s| s.attestation.as_ref());
    let body = json!({
        "spec": d.spec,
        "allowed": attestation.map(|a| a.allowed),
        "expiry": attestation.map(|a| a.expiry_time.0.to_string()),
    });
    hex::encode(sha2::Sha256::digest(body.to_string().as_bytes()))
}

impl Fleet {
    /// The API over `client`, and the future that keeps its watch caches (run it for as
    /// long as the API serves). Wait for [`Fleet::ready`] before serving.
    pub fn new(
        client: Client,
        config: FleetConfig,
        counters: Arc<FleetCounters>,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (devices, device_writer) = reflector::store();
        let (models, model_writer) = reflector::store();
        let (models_changed, _) = tokio::sync::watch::channel(0u64);
        let inner = Arc::new(Inner {
            heartbeats: Heartbeats::new(client.clone(), config.heartbeat_lease)
                .with_refresh_rate(config.refresh_per_second)
                .with_change_rate(config.change_per_second),
            writes: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_WRITES)),
            client: client.clone(),
            devices,
            models,
            notify: Mutex::new(HashMap::new()),
            models_changed,
            deliveries: Mutex::new(HashMap::new()),
            devices_seen: Arc::default(),
            devices_changed: tokio::sync::watch::channel(0).0,
            config,
            counters,
        });
        let fleet = Self { inner };
        let driver = {
            let fleet = fleet.clone();
            async move {
                let cfg = watcher::Config::default();
                // Managed fields are of no use here, and the largest part of a device.
                let device_events = reflector::reflector(
                    device_writer,
                    watcher(Api::<EdgeDevice>::all(client.clone()), cfg.clone())
                        .modify(|d: &mut EdgeDevice| d.managed_fields_mut().clear()),
                )
                .default_backoff()
                .touched_objects();
                let model_events =
                    reflector::reflector(model_writer, watcher(Api::<EdgeModel>::all(client), cfg))
                        .default_backoff()
                        .touched_objects();
                let mut seen_devices: HashMap<String, String> = HashMap::new();
                let mut seen_models: HashMap<String, String> = HashMap::new();
                let devices = device_events.for_each(|e| {
                    match e {
                        Ok(d) => {
                            if let Some(rv) = d
                                .metadata
                                .resource_version
                                .as_deref()
                                .and_then(|v| v.parse().ok())
                            {
                                fleet
                                    .inner
                                    .devices_seen
                                    .fetch_max(rv, std::sync::atomic::Ordering::SeqCst);
                            }
                            fleet
                                .inner
                                .devices_changed
                                .send_modify(|n| *n = n.wrapping_add(1));
                            let digest = device_digest(&d);
                            let name = d.name_any();
                            if seen_devices.get(&name) != Some(&digest) {
                                seen_devices.insert(name.clone(), digest);
                                fleet.wake(&name);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "watching EdgeDevices"),
                    }
                    futures::future::ready(())
                });
                let models = model_events.for_each(|e| {
                    match e {
                        Ok(m) => {
                            let revisions = m
                                .status
                                .as_ref()
                                .map(|s| serde_json::to_string(&s.revisions).unwrap_or_default())
                                .unwrap_or_default();
                            let key = crate::rollout::model_key(&m);
                            let digest = hex::encode(sha2::Sha256::digest(revisions.as_bytes()));
                            if seen_models.get(&key) != Some(&digest) {
                                seen_models.insert(key, digest);
                                fleet.prefetch(&m);
                                fleet.inner.models_changed.send_modify(|n| *n += 1);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "watching EdgeModels"),
                    }
                    futures::future::ready(())
                });
                futures::future::join(devices, models).await;
            }
        };
        (fleet, driver)
    }

    /// Liveness as this gateway sees it: sharing its memory of heartbeats and its write
    /// budget, sweeping over its cache. The leader runs [`Heartbeats::expire_loop`] on it.
    pub fn heartbeats(&self) -> Heartbeats {
        self.inner
            .heartbeats
            .clone()
            .with_cache(self.device_cache())
    }

    /// The watch cache of EdgeDevices (for sweeps that would otherwise list the fleet).
    pub fn device_cache(&self) -> Store<EdgeDevice> {
        self.inner.devices.clone()
    }

    /// The device cache as the EdgeModel reconciler plans on it, so that the leader
    /// keeps one copy of the fleet rather than two.
    pub fn shared_devices(&self) -> crate::edgemodel::SharedDevices {
        crate::edgemodel::SharedDevices {
            store: self.inner.devices.clone(),
            seen: self.inner.devices_seen.clone(),
            changes: self.inner.devices_changed.subscribe(),
        }
    }

    /// Waits until both watch caches hold their first listing.
    pub async fn ready(&self) -> Result<(), String> {
        self.inner
            .devices
            .wait_until_ready()
            .await
            .map_err(|e| e.to_string())?;
        self.inner
            .models
            .wait_until_ready()
            .await
            .map_err(|e| e.to_string())
    }

    fn wake(&self, device: &str) {
        if let Ok(map) = self.inner.notify.lock()
            && let Some(n) = map.get(device)
        {
            n.notify_waiters();
        }
    }

    fn notifier(&self, device: &str) -> Arc<tokio::sync::Notify> {
        match self.inner.notify.lock() {
            Ok(mut map) => map.entry(device.to_owned()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    fn count_refusal(&self, reason: &'static str) {
        self.inner
            .counters
            .refusals
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// The routes (merge them into the gateway's router).
    pub fn router(self) -> Router {
        Router::new()
            .route("/v1/enrol", post(enrol))
            .route("/v1/devices/{name}/desired", get(desired))
            .route("/v1/devices/{name}/report", post(report))
            .route("/v1/devices/{name}/artifacts/{digest}", get(artifact))
            .with_state(self)
    }

    /// The device a request may act as, after checking its certificate against `name`.
    async fn identify(
        &self,
        peer: &PeerCertificate,
        name: &str,
    ) -> Result<Arc<EdgeDevice>, ApiError> {
        // The certificate first: anonymous or foreign requests cost no API call.
        let result = match Self::certified_key(peer, name) {
            Ok(fingerprint) => match self.device(name).await {
                Ok(Ok(device)) if device.spec.facts.agent_key_fingerprint == fingerprint => {
                    if let Some(slot) = &peer.1 {
                        slot.claim(name);
                    }
                    Ok(device)
                }
                Ok(Ok(_)) => Err(refuse(
                    StatusCode::FORBIDDEN,
                    "KeyMismatch",
                    format!("the certificate's key is not the one {name} enrolled with"),
                )),
                Ok(Err(e)) | Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(ApiError(_, reason, message)) = &result {
            self.count_refusal(reason);
            tracing::warn!(device = name, reason, %message, "device request refused");
        }
        result
    }

    /// The EdgeDevice from the watch cache, or (when the cache has not seen it yet, as
    /// right after enrolment) from the API server.
    async fn device(&self, name: &str) -> Result<Result<Arc<EdgeDevice>, ApiError>, ApiError> {
        if let Some(d) = self.inner.devices.get(&ObjectRef::new(name)) {
            return Ok(Ok(d));
        }
        let api: Api<EdgeDevice> = Api::all(self.inner.client.clone());
        match api.get_opt(name).await {
            Ok(Some(d)) => Ok(Ok(Arc::new(d))),
            Ok(None) => Ok(Err(refuse(
                StatusCode::NOT_FOUND,
                "UnknownDevice",
                format!("no EdgeDevice {name:?}"),
            ))),
            Err(e) => Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "KubeApi",
                e.to_string(),
            )),
        }
    }

    /// Checks that the client certificate names `name`; returns its key's fingerprint.
    fn certified_key(peer: &PeerCertificate, name: &str) -> Result<String, ApiError> {
        let der = peer.0.as_ref().ok_or_else(|| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "ClientCertificateRequired",
                "device endpoints need the client certificate issued at attestation",
            )
        })?;
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
            refuse(
                StatusCode::FORBIDDEN,
                "BadClientCertificate",
                format!("unparsable client certificate: {e}"),
            )
        })?;
        let named = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|g| match g {
                    x509_parser::extensions::GeneralName::URI(u) => {
                        u.strip_prefix("edgefleet://device/").map(str::to_owned)
                    }
                    _ => None,
                })
            })
            .ok_or_else(|| {
                refuse(
                    StatusCode::FORBIDDEN,
                    "BadClientCertificate",
                    "the client certificate names no device",
                )
            })?;
        if named != name {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "Impersonation",
                format!("the certificate of {named:?} may not act as {name:?}"),
            ));
        }
        Ok(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(cert.public_key().raw))
        ))
    }

    /// The device's desired state now; `Err` while an assigned revision's template has
    /// not reached the cache yet.
    fn desired_state(&self, device: &EdgeDevice) -> Result<proto::DesiredState, String> {
        let name = device.name_any();
        let now = k8s_openapi::jiff::Timestamp::now();
        let entitled = device.spec.approved
            && device
                .status
                .as_ref()
                .and_then(|s| s.attestation.as_ref())
                .is_some_and(|a| a.allowed && a.expiry_time.0 > now);
        let mut models = Vec::new();
        if entitled {
            for d in &device.spec.desired_models {
                models.push(self.device_model(&name, d)?);
            }
        }
        Ok(proto::DesiredState::new(name, models))
    }

    /// Starts mirroring every `https://` artifact of `model`'s revision templates that
    /// is not in the store, so that it is there before devices ask for it.
    fn prefetch(&self, model: &EdgeModel) {
        let Some(mirror) = &self.inner.config.mirror else {
            return;
        };
        let templates = model.status.iter().flat_map(|s| s.revisions.iter());
        for t in templates {
            let artifacts = std::iter::once(&t.artifact)
                .chain(t.variants.iter().map(|v| &v.artifact))
                .chain(t.plugins.iter().map(|p| &p.artifact));
            for a in artifacts {
                // The CRD's CEL rule already requires this; it names a file here.
                let Some(hex) = a.digest.strip_prefix("sha256:").filter(|h| {
                    h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                }) else {
                    continue;
                };
                if !a.uri.starts_with("https://")
                    || self.inner.config.artifact_dir.join(hex).exists()
                {
                    continue;
                }
                let size = a.size_bytes.and_then(|b| u64::try_from(b).ok());
                mirror.ensure(hex, &a.uri, size);
            }
        }
    }

    /// The EdgeModel (from the cache) whose template `d` names.
    fn model_of(&self, d: &DesiredModel) -> Result<Arc<EdgeModel>, String> {
        let (ns, name) = d
            .model
            .split_once('/')
            .ok_or_else(|| format!("bad model key {:?}", d.model))?;
        self.inner
            .models
            .get(&ObjectRef::new(name).within(ns))
            .ok_or_else(|| format!("EdgeModel {} is not in the cache", d.model))
    }

    /// Where the artifact `digest` assigned to `device` comes from (its EdgeModel's
    /// `artifact`), for mirroring.
    fn assigned_source(
        &self,
        device: &EdgeDevice,
        digest: &str,
    ) -> Option<edgefleet_crds::Artifact> {
        for d in &device.spec.desired_models {
            let Ok(model) = self.model_of(d) else {
                continue;
            };
            let Some(t) = template_of(&model, d) else {
                continue;
            };
            let variant = d
                .variant
                .as_ref()
                .and_then(|v| t.variants.iter().find(|x| &x.name == v))
                .map(|v| &v.artifact);
            let found = std::iter::once(variant.unwrap_or(&t.artifact))
                .chain(t.plugins.iter().map(|p| &p.artifact))
                .find(|a| a.digest == digest);
            if let Some(a) = found {
                return Some(a.clone());
            }
        }
        None
    }

    fn device_model(&self, device: &str, d: &DesiredModel) -> Result<proto::DeviceModel, String> {
        let model = self.model_of(d)?;
        let t: &RevisionTemplate = template_of(&model, d)
            .ok_or_else(|| format!("{} has no template of revision {}", d.model, d.revision))?;
        let (artifact, signature) = match &d.variant {
            Some(v) => {
                let v = t
                    .variants
                    .iter()
                    .find(|x| &x.name == v)
                    .ok_or_else(|| format!("{} has no variant {v}", d.model))?;
                (&v.artifact, &v.signature)
            }
            None => (&t.artifact, &t.signature),
        };
        let art = |a: &edgefleet_crds::Artifact| proto::ArtifactRef {
            digest: a.digest.clone(),
            size_bytes: a.size_bytes.and_then(|b| u64::try_from(b).ok()),
            path: format!("/v1/devices/{device}/artifacts/{}", a.digest),
        };
        let pos = |v: i32| u32::try_from(v).unwrap_or(0);
        Ok(proto::DeviceModel {
            model: d.model.clone(),
            revision: d.revision.clone(),
            variant: d.variant.clone(),
            served_name: t.served_name.clone(),
            artifact: art(artifact),
            bundle: signature.inline.clone().unwrap_or_default(),
            signers: t
                .signers
                .iter()
                .map(|s| proto::Signer {
                    name: s.name.clone(),
                    public_key: s.public_key.clone(),
                    certificate_root: s.certificate_root.clone(),
                    identities: s.identities.clone().unwrap_or_default(),
                })
                .collect(),
            runtime: proto::Runtime {
                context_size: pos(t.runtime.context_size),
                threads: t.runtime.threads.map(pos),
                gpu_layers: pos(t.runtime.gpu_layers),
                parallel_slots: pos(t.runtime.parallel_slots),
                queue_depth: pos(t.runtime.queue_depth),
            },
            plugins: t
                .plugins
                .iter()
                .map(|p| proto::DevicePlugin {
                    name: p.name.clone(),
                    artifact: art(&p.artifact),
                    bundle: p.signature.inline.clone().unwrap_or_default(),
                    fuel: p.limits.fuel.and_then(|f| u64::try_from(f).ok()),
                    deadline_millis: p.limits.deadline_millis.and_then(|f| u64::try_from(f).ok()),
                    memory_bytes: u64::try_from(p.limits.memory_bytes).unwrap_or(0),
                    config: p.config.clone(),
                    grants: p
                        .grants
                        .as_ref()
                        .map(|g| proto::Grants {
                            env: g.env.clone(),
                            clocks: g.clocks,
                            read_only_dirs: g.read_only_dirs.clone(),
                            network: g.network,
                        })
                        .unwrap_or_default(),
                })
                .collect(),
            port: u16::try_from(t.port).unwrap_or(8080),
        })
    }
}

/// The revision template of `model` that `d` names.
fn template_of<'a>(model: &'a EdgeModel, d: &DesiredModel) -> Option<&'a RevisionTemplate> {
    model
        .status
        .as_ref()
        .and_then(|s| s.revisions.iter().find(|t| t.revision == d.revision))
}

fn authorize(fleet: &Fleet, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if edgefleet_trust::attestation::service::constant_time_eq(
        given.as_bytes(),
        fleet.inner.config.bootstrap_token.as_bytes(),
    ) {
        Ok(())
    } else {
        fleet.count_refusal("Unauthorized");
        Err(refuse(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "missing or wrong bootstrap token",
        ))
    }
}

/// Whether `name` is a DNS-1123 subdomain (what Kubernetes object names must be).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn valid_label(k: &str, v: &str) -> bool {
    let (prefix, name) = k.rsplit_once('/').unwrap_or(("", k));
    let part = |s: &str| {
        s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
    };
    (prefix.is_empty() || valid_name(prefix)) && !name.is_empty() && part(name) && part(v)
}

async fn enrol(
    State(fleet): State<Fleet>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<proto::EnrolResponse>, ApiError> {
    authorize(&fleet, &headers)?;
    let req: proto::EnrolRequest = serde_json::from_slice(&body).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("request body: {e}"),
        )
    })?;
    let bad = |m: String| refuse(StatusCode::BAD_REQUEST, "BadRequest", m);
    if !valid_name(&req.device) {
        return Err(bad(format!("{:?} is not a valid device name", req.device)));
    }
    let f = &req.facts;
    if f.arch.is_empty()
        || f.arch.len() > 32
        || !(1..=4096).contains(&f.cpu_cores)
        || f.memory_bytes == 0
    {
        return Err(bad(
            "facts: arch (1-32 chars), cpuCores (1-4096) and memoryBytes (> 0) are required".into(),
        ));
    }
    let mut tee_kinds = Vec::new();
    for t in &f.tee_kinds {
        let kind: edgefleet_crds::TeeKind = serde_json::from_value(json!(t))
            .map_err(|_| bad(format!("facts.teeKinds: unknown kind {t:?}")))?;
        tee_kinds.push(kind);
    }
    if let Some((k, v)) = req.labels.iter().find(|(k, v)| !valid_label(k, v)) {
        return Err(bad(format!(
            "label {k}={v} is not a valid Kubernetes label"
        )));
    }
    let key = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        req.agent_public_key.trim(),
    )
    .map_err(|e| bad(format!("agentPublicKey: {e}")))?;
    use x509_parser::prelude::FromDer as _;
    if x509_parser::x509::SubjectPublicKeyInfo::from_der(&key).is_err() {
        return Err(bad(
            "agentPublicKey is not a DER SubjectPublicKeyInfo".into()
        ));
    }
    let fingerprint = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&key)));
    let api: Api<EdgeDevice> = Api::all(fleet.inner.client.clone());
    let kube_err =
        |e: kube::Error| refuse(StatusCode::SERVICE_UNAVAILABLE, "KubeApi", e.to_string());
    let existing = |d: EdgeDevice| {
        if d.spec.facts.agent_key_fingerprint == fingerprint {
            Ok(Json(proto::EnrolResponse {
                device: req.device.clone(),
                created: false,
                approved: d.spec.approved,
            }))
        } else {
            fleet.count_refusal("AlreadyEnrolled");
            Err(refuse(
                StatusCode::CONFLICT,
                "AlreadyEnrolled",
                format!(
                    "{} is enrolled with another key; delete the EdgeDevice to enrol it again",
                    req.device
                ),
            ))
        }
    };
    // The cache answers for devices enrolled a while ago; a new one costs only the create.
    if let Some(d) = fleet.inner.devices.get(&ObjectRef::new(&req.device)) {
        return existing((*d).clone());
    }
    let approved = fleet.inner.config.approval.approves(&req.labels);
    let mut device = EdgeDevice::new(
        &req.device,
        EdgeDeviceSpec {
            facts: edgefleet_crds::device::DeviceFacts {
                arch: f.arch.clone(),
                cpu_cores: i32::try_from(f.cpu_cores).unwrap_or(i32::MAX),
                memory: Quantity(f.memory_bytes.to_string()),
                accelerators: f.accelerators.iter().take(8).cloned().collect(),
                tee_kinds,
                agent_version: Some(f.agent_version.chars().take(64).collect()),
                agent_key_fingerprint: fingerprint.clone(),
            },
            approved,
            desired_models: vec![],
        },
    );
    device.metadata.labels = Some(req.labels.clone());
    match api.create(&PostParams::default(), &device).await {
        Ok(_) => {
            // A new device of an old name: nothing it reported before applies.
            fleet.inner.heartbeats.reported().forget(&req.device);
            tracing::info!(device = %req.device, approved, "device enrolled");
            Ok(Json(proto::EnrolResponse {
                device: req.device.clone(),
                created: true,
                approved,
            }))
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // Enrolled concurrently: the same key is the same device.
            let d = api.get(&req.device).await.map_err(kube_err)?;
            existing(d)
        }
        Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
            Err(refuse(StatusCode::BAD_REQUEST, "Invalid", s.message))
        }
        Err(e) => Err(kube_err(e)),
    }
}

/// Query of the desired-state long-poll.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredQuery {
    /// The version the device has.
    #[serde(default)]
    version: Option<String>,
    /// Seconds to wait for a change (at most [`proto::MAX_WAIT_SECONDS`]).
    #[serde(default)]
    wait_seconds: Option<u64>,
}

async fn desired(
    State(fleet): State<Fleet>,
    Extension(peer): Extension<PeerCertificate>,
    Path(name): Path<String>,
    Query(q): Query<DesiredQuery>,
) -> Result<Response, ApiError> {
    fleet.identify(&peer, &name).await?;
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(q.wait_seconds.unwrap_or(0).min(proto::MAX_WAIT_SECONDS));
    let notify = fleet.notifier(&name);
    let mut models_changed = fleet.inner.models_changed.subscribe();
    let counters = fleet.inner.counters.clone();
    counters.waiting.inc();
    struct Done(Arc<FleetCounters>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.waiting.dec();
        }
    }
    let _done = Done(counters);
    loop {
        // Register for wake-ups before reading, so that no change slips in between.
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        models_changed.borrow_and_update();
        let device = fleet.device(&name).await??;
        match fleet.desired_state(&device) {
            Ok(state) if q.version.as_deref() != Some(state.version.as_str()) => {
                return Ok(Json(state).into_response());
            }
            Ok(_) => {}
            Err(why) if q.version.is_none() => {
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "RevisionPending",
                    why,
                ));
            }
            Err(why) => tracing::debug!(device = %name, %why, "desired state incomplete; waiting"),
        }
        tokio::select! {
            () = woken => {}
            r = models_changed.changed() => if r.is_err() { break },
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    Ok(StatusCode::NOT_MODIFIED.into_response())
}

fn model_state(s: &str) -> Option<edgefleet_crds::device::ModelState> {
    serde_json::from_value(json!(s)).ok()
}

async fn report(
    State(fleet): State<Fleet>,
    Extension(peer): Extension<PeerCertificate>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<proto::ReportAck>, ApiError> {
    let device = fleet.identify(&peer, &name).await?;
    fleet
        .inner
        .heartbeats
        .seen(&name, k8s_openapi::jiff::Timestamp::now());
    let batch: proto::ReportBatch = serde_json::from_slice(&body).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("request body: {e}"),
        )
    })?;
    if batch.reports.len() > proto::MAX_BATCH {
        return Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "BatchTooLarge",
            format!("at most {} reports per batch", proto::MAX_BATCH),
        ));
    }
    if batch
        .reports
        .windows(2)
        .any(|w| w[0].seq >= w[1].seq || w[0].boot != w[1].boot)
    {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "reports must be of one boot, by increasing seq",
        ));
    }
    let mut models = None;
    for r in &batch.reports {
        if let Some(m) = &r.models {
            let mut out = Vec::new();
            for m in m.iter().take(16) {
                let state = model_state(&m.state).ok_or_else(|| {
                    refuse(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("unknown model state {:?}", m.state),
                    )
                })?;
                out.push(edgefleet_crds::device::LoadedModel {
                    model: m.model.chars().take(317).collect(),
                    revision: m.revision.chars().take(64).collect(),
                    state,
                    message: m.message.as_ref().map(|s| s.chars().take(1024).collect()),
                    load_millis: m.load_millis.and_then(|v| i64::try_from(v).ok()),
                });
            }
            models = Some(out);
        }
    }
    // Sequence accounting.
    let (acked, missing, write, start_write) = {
        let mut map = fleet.inner.deliveries.lock().map_err(|_| {
            refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal",
                "delivery state poisoned",
            )
        })?;
        let d = map.entry(name.clone()).or_default();
        if let Some(first) = batch.reports.first()
            && first.boot != d.boot
        {
            // A new agent process, or this gateway's first batch from it: continue from
            // what the status recorded for that boot.
            let recorded = device
                .status
                .as_ref()
                .and_then(|s| s.reports.as_ref())
                .filter(|r| r.boot == first.boot);
            *d = Delivery {
                boot: first.boot.clone(),
                last_seq: recorded.map_or(0, |r| u64::try_from(r.last_sequence).unwrap_or(0)),
                missing: recorded.map_or(0, |r| u64::try_from(r.missing).unwrap_or(0)),
                dropped: 0,
                last_write: None,
                models: device.status.as_ref().map(|s| s.models.clone()),
                inference: None,
                // A write of the previous boot may still be in flight.
                writing: d.writing,
                // The new boot is recorded with the first refresh (`last_write` is None,
                // so one is due at once, within the refresh budget): a fleet connecting
                // at once does not cost a change write per device. Model states that
                // differ from the recorded ones are a change.
                pending_change: false,
            };
        }
        for r in &batch.reports {
            if r.seq > d.last_seq {
                d.missing += r.seq - d.last_seq - 1;
                d.last_seq = r.seq;
            }
        }
        let dropped_changed = batch.dropped != d.dropped;
        d.dropped = batch.dropped;
        let changed = models
            .as_ref()
            .is_some_and(|m| d.models.as_ref() != Some(m))
            || dropped_changed
            || d.pending_change;
        if let Some(m) = models {
            // The reconciler reads this at once; the status write may wait for budget.
            fleet.inner.heartbeats.reported().note(&name, &m);
            d.models = Some(m);
        }
        if let Some(i) = batch
            .reports
            .iter()
            .rev()
            .find_map(|r| r.inference.as_ref())
        {
            d.inference = Some(i.clone());
        }
        let third = fleet.inner.config.heartbeat_lease / 3;
        let stale = d.last_write.is_none_or(|t| t.elapsed() >= third);
        // Changes and refreshes each take a token from their own budget, and neither is
        // written while a write is in flight (the change flag carries a change over to a
        // later report instead, as it does when the change budget is spent).
        let due = if d.writing {
            d.pending_change |= changed;
            false
        } else if changed {
            let token = fleet.inner.heartbeats.try_change();
            if !token {
                fleet.inner.counters.change_deferred.inc();
                d.pending_change = true;
            }
            token
        } else if stale {
            let token = fleet.inner.heartbeats.try_refresh();
            if !token {
                fleet.inner.counters.refresh_deferred.inc();
            }
            token
        } else {
            false
        };
        if due {
            d.last_write = Some(Instant::now());
            d.pending_change = false;
        }
        let write = due.then(|| {
            (
                d.boot.clone(),
                d.models.clone().unwrap_or_default(),
                d.inference.clone(),
                d.dropped,
            )
        });
        // One write in flight per device; a change that arrives meanwhile is made with a
        // later report instead (`pending_change`).
        let start_write = if d.writing {
            false
        } else {
            d.writing = true;
            true
        };
        (d.last_seq, d.missing, write, start_write)
    };
    // The writes go on in the background, one at a time per device: the device gets its
    // acknowledgement without waiting on the API server (reports are state snapshots, so
    // a write that fails is simply made again with the next report).
    let patch = write.map(|(boot, models, inference, dropped)| {
        let mut st = json!({
            "reports": {
                "boot": boot, "lastSequence": acked, "missing": missing, "dropped": dropped,
            },
            "models": models,
            "loadedModelCount": models
                .iter()
                .filter(|m| m.state == edgefleet_crds::device::ModelState::Ready)
                .count(),
        });
        if let Some(i) = inference {
            st["inference"] = json!({
                "tokensPerSecond": i.tokens_per_second,
                "requestsTotal": i.requests_total,
                "errorsTotal": i.errors_total,
            });
        }
        json!({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDevice", "status": st})
    });
    if start_write {
        let fleet = fleet.clone();
        let (name, device) = (name.clone(), device.clone());
        tokio::spawn(async move {
            let _permit = fleet.inner.writes.clone().acquire_owned().await;
            let mut failed = false;
            if let Some(patch) = patch {
                match Api::<EdgeDevice>::all(fleet.inner.client.clone())
                    .patch_status(
                        &name,
                        &PatchParams::apply(REPORT_MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await
                {
                    Ok(_) => {
                        fleet.inner.counters.report_writes.inc();
                    }
                    Err(e) => {
                        tracing::warn!(device = %name, error = %e, "writing a device report");
                        failed = true;
                    }
                }
            }
            if let Err(e) = fleet
                .inner
                .heartbeats
                .record(&device, k8s_openapi::jiff::Timestamp::now())
                .await
            {
                tracing::warn!(device = %name, error = %e, "writing a heartbeat");
            }
            if let Ok(mut map) = fleet.inner.deliveries.lock()
                && let Some(d) = map.get_mut(&name)
            {
                d.writing = false;
                if failed {
                    // Made again with the next report, budget or not.
                    d.pending_change = true;
                }
            }
        });
    }
    let desired_version = fleet
        .desired_state(&device)
        .map(|s| s.version)
        .unwrap_or_default();
    Ok(Json(proto::ReportAck {
        acked,
        gaps: missing,
        desired_version,
    }))
}

/// The answer for an assigned artifact that is not in the store: mirrored from its
/// `https://` URI when the gateway can ([`super::mirror`]), else not found.
fn missing_artifact(
    fleet: &Fleet,
    device: &EdgeDevice,
    digest: &str,
    hex_digest: &str,
    e: std::io::Error,
) -> ApiError {
    let source = fleet.assigned_source(device, digest);
    match (&fleet.inner.config.mirror, source) {
        (Some(mirror), Some(a)) if a.uri.starts_with("https://") => {
            let size = a.size_bytes.and_then(|b| u64::try_from(b).ok());
            match mirror.ensure(hex_digest, &a.uri, size) {
                super::mirror::MirrorState::Fetching => refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ArtifactFetching",
                    format!("{digest} is being fetched from {} into the store", a.uri),
                ),
                super::mirror::MirrorState::Failed(why) => {
                    fleet.count_refusal("ArtifactMirrorFailed");
                    refuse(StatusCode::BAD_GATEWAY, "ArtifactMirrorFailed", why)
                }
            }
        }
        (_, source) => refuse(
            StatusCode::NOT_FOUND,
            "ArtifactNotInStore",
            format!(
                "{digest}: {e}{}",
                source.map_or(String::new(), |a| format!(
                    " (its URI {} is not mirrored: only https:// is, with --artifact-ca)",
                    a.uri
                ))
            ),
        ),
    }
}

/// A `Range` header that no part of the file satisfies (answered with 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// Parses `bytes=a-b` / `bytes=a-` against a file of `len` bytes: the inclusive range,
/// `Ok(None)` for no (or an ignorable) header, `Err` when unsatisfiable.
pub fn parse_range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    // Several ranges: serve the whole file (allowed by RFC 9110).
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", "") => return Err(Unsatisfiable),
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| Unsatisfiable)?;
            if n == 0 {
                return Err(Unsatisfiable);
            }
            (len.saturating_sub(n), len.saturating_sub(1))
        }
        (a, "") => (a.parse().map_err(|_| Unsatisfiable)?, len.saturating_sub(1)),
        (a, b) => {
            let (a, b): (u64, u64) = (
                a.parse().map_err(|_| Unsatisfiable)?,
                b.parse().map_err(|_| Unsatisfiable)?,
            );
            (a, b.min(len.saturating_sub(1)))
        }
    };
    if start >= len || start > end {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

async fn artifact(
    State(fleet): State<Fleet>,
    Extension(peer): Extension<PeerCertificate>,
    Path((name, digest)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let device = fleet.identify(&peer, &name).await?;
    let hex_digest = digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                "BadDigest",
                "expected sha256:<64 lowercase hex>",
            )
        })?;
    let state = fleet
        .desired_state(&device)
        .map_err(|why| refuse(StatusCode::SERVICE_UNAVAILABLE, "RevisionPending", why))?;
    let assigned = state.models.iter().any(|m| {
        m.artifact.digest == digest || m.plugins.iter().any(|p| p.artifact.digest == digest)
    });
    if !assigned {
        fleet.count_refusal("NotAssigned");
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "NotAssigned",
            format!(
                "{digest} is not part of what {name} is assigned (or the device is not approved and attested)"
            ),
        ));
    }
    let path = fleet.inner.config.artifact_dir.join(hex_digest);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return Err(missing_artifact(&fleet, &device, &digest, hex_digest, e)),
    };
    let len = file
        .metadata()
        .await
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))?
        .len();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match parse_range(range, len) {
        Ok(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Ok(None) => (StatusCode::OK, 0, len.saturating_sub(1)),
        Err(Unsatisfiable) => {
            let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))?;
    let counters = fleet.inner.counters.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(count), 256 << 10).map(
        move |chunk| {
            if let Ok(c) = &chunk {
                counters.artifact_bytes.inc_by(c.len() as u64);
            }
            chunk
        },
    );
    let mut resp = Response::new(axum::body::Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&count.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}"))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_unsatisfiable_ones_are_refused() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-"), 10), Ok(Some((0, 9))));
        assert_eq!(parse_range(Some("bytes=4-6"), 10), Ok(Some((4, 6))));
        assert_eq!(parse_range(Some("bytes=4-100"), 10), Ok(Some((4, 9))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=6-4"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=x-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=-0"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=-"), 10), Err(Unsatisfiable));
    }

    #[test]
    fn approval_policies_parse_and_decide() {
        let labels: BTreeMap<String, String> =
            [("edgefleet.io/pool".to_owned(), "retail".to_owned())].into();
        assert!(!Approval::parse("manual").unwrap().approves(&labels));
        assert!(Approval::parse("auto").unwrap().approves(&labels));
        assert!(
            Approval::parse("auto:edgefleet.io/pool=retail")
                .unwrap()
                .approves(&labels)
        );
        assert!(
            !Approval::parse("auto:edgefleet.io/pool=lab")
                .unwrap()
                .approves(&labels)
        );
        assert!(Approval::parse("sometimes").is_err());
        assert!(Approval::parse("auto:pool").is_err());
    }

    #[test]
    fn names_and_labels_are_checked() {
        assert!(valid_name("store-042"));
        assert!(valid_name("a.b-c"));
        assert!(!valid_name("Store"));
        assert!(!valid_name("-x"));
        assert!(!valid_name("../etc"));
        assert!(!valid_name(""));
        assert!(valid_label("edgefleet.io/pool", "retail"));
        assert!(!valid_label("edgefleet.io/pool", "re tail"));
        assert!(!valid_label("Bad_Prefix/x", "y"));
    }
}
