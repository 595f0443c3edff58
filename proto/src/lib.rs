//! The device gateway protocol: the JSON messages agents and the gateway exchange after
//! attestation. Plain serde types with no Kubernetes dependency, shared by both sides.
//!
//! | endpoint | auth | body → answer |
//! | --- | --- | --- |
//! | `POST /v1/enrol` | bootstrap token | [`EnrolRequest`] → [`EnrolResponse`] |
//! | `POST /v1/attestation/challenge`, `/evidence` | bootstrap token | see the attestation service |
//! | `GET /v1/devices/{name}/desired?version=V&waitSeconds=N` | mTLS | [`DesiredState`], or 304 while it is still `V` after `N` s |
//! | `POST /v1/devices/{name}/report` | mTLS | [`ReportBatch`] → [`ReportAck`] |
//! | `GET /v1/devices/{name}/artifacts/sha256:<hex>` | mTLS | the file, with `Range` |
//!
//! A device may use only its own `{name}`: the one its client certificate names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod store;

/// Longest long-poll the gateway holds open.
pub const MAX_WAIT_SECONDS: u64 = 60;
/// Most reports one batch may carry.
pub const MAX_BATCH: usize = 1024;

/// `POST /v1/enrol`: a device asks to join the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrolRequest {
    /// The EdgeDevice name it asks for (a DNS-1123 subdomain).
    pub device: String,
    /// The agent's identity key, SPKI DER, base64. Its SHA-256 becomes the device's
    /// `agentKeyFingerprint`, fixed for the device's life.
    pub agent_public_key: String,
    /// What the device says it is.
    pub facts: Facts,
    /// Labels the device asks for (for example its pool); the approval policy decides
    /// whether they are believed.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Hardware facts an agent declares at enrolment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    /// `uname -m`.
    pub arch: String,
    /// Logical cores.
    pub cpu_cores: u32,
    /// Usable memory in bytes.
    pub memory_bytes: u64,
    /// Accelerators.
    #[serde(default)]
    pub accelerators: Vec<String>,
    /// Evidence kinds it can produce (`tpm`, `sev-snp`, `tdx`, `dev`).
    pub tee_kinds: Vec<String>,
    /// Agent version.
    pub agent_version: String,
}

/// The gateway's answer to an enrolment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrolResponse {
    /// The device name.
    pub device: String,
    /// Whether this request created the EdgeDevice (false: it existed with this key).
    pub created: bool,
    /// Whether the device is approved (by policy or by an administrator). An agent told
    /// `false` stops serving until it is approved again.
    pub approved: bool,
    /// The attestation lease, in seconds: how long after its last successful attestation
    /// a device may go on serving (its last-known-good model) without attesting again.
    /// Absent from older gateways: the agent then keeps its previous lease, or the
    /// default of [`DEFAULT_ATTESTATION_LEASE_SECONDS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation_lease_seconds: Option<u64>,
}

/// The attestation lease when the gateway names none: 24 hours.
pub const DEFAULT_ATTESTATION_LEASE_SECONDS: u64 = 86_400;

/// Everything a device should run, as of `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredState {
    /// Opaque: changes whenever anything below changes. Sent back as `?version=`.
    pub version: String,
    /// The device.
    pub device: String,
    /// Models to run, each at one revision.
    pub models: Vec<DeviceModel>,
    /// Every signer the cluster's trust policy (`EdgeTrustPolicy`) holds. An agent whose
    /// local trust directory is empty pins this set at first contact (trust on first
    /// use); an agent with local pins ignores it. Empty from gateways that predate it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_signers: Vec<Signer>,
}

impl DesiredState {
    /// Builds the state with its version: 16 hex digits of SHA-256 over the models.
    pub fn new(device: String, models: Vec<DeviceModel>) -> Self {
        Self::with_trusted_signers(device, models, Vec::new())
    }

    /// [`DesiredState::new`] with the cluster's trusted signers; the version covers them
    /// too, so that a changed trust policy reaches the device.
    pub fn with_trusted_signers(
        device: String,
        models: Vec<DeviceModel>,
        trusted_signers: Vec<Signer>,
    ) -> Self {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(serde_json::to_vec(&models).unwrap_or_default());
        if !trusted_signers.is_empty() {
            h.update(serde_json::to_vec(&trusted_signers).unwrap_or_default());
        }
        let version = hex::encode(&h.finalize()[..8]);
        Self {
            version,
            device,
            models,
            trusted_signers,
        }
    }
}

/// One model assignment, with everything the device needs to fetch, verify and run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModel {
    /// The EdgeModel, `namespace/name`.
    pub model: String,
    /// Its revision.
    pub revision: String,
    /// The variant chosen for this device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Model id on the device's API.
    pub served_name: String,
    /// The GGUF file.
    pub artifact: ArtifactRef,
    /// The OpenSSF model-signing bundle (JSON) over the artifact.
    pub bundle: String,
    /// Who may have signed it.
    pub signers: Vec<Signer>,
    /// llama.cpp settings.
    pub runtime: Runtime,
    /// Plugin chain, in order.
    #[serde(default)]
    pub plugins: Vec<DevicePlugin>,
    /// Golden prompts to answer after loading, before serving and reporting Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub golden_prompts: Vec<GoldenPrompt>,
    /// Set when the artifact is encrypted: where to ask for its key
    /// ([`KeyRequest`]), after the ciphertext's signature verifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<ModelEncryption>,
    /// Port of the device's API.
    pub port: u16,
}

/// A file the device fetches through the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactRef {
    /// `sha256:<hex>` of the whole file.
    pub digest: String,
    /// Its size, when the EdgeModel gives it; a download that grows past it stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Path on the gateway.
    pub path: String,
}

/// A trusted signer, as in `EdgeModel.spec.signers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Signer {
    /// Name.
    pub name: String,
    /// PEM public key (key mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// PEM root certificate (certificate mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_root: Option<String>,
    /// Identities a leaf certificate must carry (certificate mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

/// llama.cpp settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Runtime {
    /// Context window per slot.
    pub context_size: u32,
    /// Threads (absent: the agent's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// GPU layers.
    pub gpu_layers: u32,
    /// Slots.
    pub parallel_slots: u32,
    /// Queue depth.
    pub queue_depth: u32,
}

/// A plugin of the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevicePlugin {
    /// Name.
    pub name: String,
    /// The component.
    pub artifact: ArtifactRef,
    /// Its signature bundle (JSON).
    pub bundle: String,
    /// Fuel per call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Deadline per call, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_millis: Option<u64>,
    /// Memory cap, bytes.
    pub memory_bytes: u64,
    /// Configuration.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Grants.
    #[serde(default)]
    pub grants: Grants,
}

/// What a plugin may reach (see `PluginGrants` in the CRD).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grants {
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Real clocks.
    #[serde(default)]
    pub clocks: bool,
    /// Read-only directories.
    #[serde(default)]
    pub read_only_dirs: Vec<String>,
    /// Sockets.
    #[serde(default)]
    pub network: bool,
}

/// `POST /v1/devices/{name}/report`: the reports a device has not yet had acknowledged,
/// oldest first (after an outage, the spool).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportBatch {
    /// Reports, by increasing `seq`.
    pub reports: Vec<Report>,
    /// Reports the agent dropped, since it started, because its spool was full.
    #[serde(default)]
    pub dropped: u64,
}

/// One heartbeat. Model states are sent only when they changed since the last
/// acknowledged report (a delta); `None` means unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Increases by one per report, from 1 at agent start (with `boot`).
    pub seq: u64,
    /// Identifies the agent process, so that a restart's `seq` 1 is not a gap.
    pub boot: String,
    /// Seconds since the epoch when the report was taken.
    pub time: i64,
    /// The full list of model states, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<ModelReport>>,
    /// Serving counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<Inference>,
}

/// A model's state on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelReport {
    /// `namespace/name`.
    pub model: String,
    /// Revision.
    pub revision: String,
    /// Where the model is in its lifecycle.
    pub state: ModelState,
    /// Detail (the named failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// With `Failed`: the named reason. A local refusal ([`LOCAL_REFUSALS`]: the device's
    /// owner did not consent to a plugin grant, or the device does not hold the signer's
    /// root) excludes only this device from the rollout; it never fails the revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Load time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_millis: Option<u64>,
    /// Answers to the revision's golden prompts, once run (at most
    /// [`MAX_GOLDEN_PROMPTS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub golden: Vec<GoldenAnswer>,
}

/// Most golden prompts a revision has (`spec.validation.goldenPrompts`).
pub const MAX_GOLDEN_PROMPTS: usize = 8;

/// The compiled size a golden prompt's regular expression may take: the operator
/// refuses a revision whose expression exceeds it, and the device compiles it under
/// the same limit.
pub const GOLDEN_REGEX_SIZE_LIMIT: usize = 1 << 20;

/// One golden prompt as the device runs it: exactly one expectation is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GoldenPrompt {
    /// Its name.
    pub name: String,
    /// The user message.
    pub prompt: String,
    /// The trimmed answer equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The answer contains this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
    /// The answer matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// Most tokens generated.
    pub max_tokens: u32,
}

/// A device's answer to a golden prompt: the SHA-256 of its text.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GoldenAnswer {
    /// The prompt's name.
    pub name: String,
    /// `sha256:<hex>`.
    pub digest: String,
}

/// Reasons a device refuses a model on its own authority (`ModelReport::reason`): the
/// operator excludes that device and counts it, and the rollout goes on without it.
pub const LOCAL_REFUSALS: [&str; 2] = ["PluginGrantDenied", "UntrustedSigner"];

/// Whether `reason` is one of [`LOCAL_REFUSALS`].
pub fn is_local_refusal(reason: &str) -> bool {
    LOCAL_REFUSALS.contains(&reason)
}

/// A model's lifecycle state on the device, as `EdgeDevice.status.models[].state`
/// records it. On the wire it is the variant's name (`"Pending"`, …, `"Failed"`); any
/// other string is refused at parse with [`UnknownModelState`] (its message names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub enum ModelState {
    /// Assigned, not started.
    Pending,
    /// Fetching the artifact.
    Downloading,
    /// Checking digests and signature.
    Verifying,
    /// Loading into llama.cpp.
    Loading,
    /// Serving requests.
    Ready,
    /// Draining in-flight requests before unloading.
    Draining,
    /// Download, verification or load failed; see `message`.
    Failed,
}

impl ModelState {
    /// Every state.
    pub const ALL: [Self; 7] = [
        Self::Pending,
        Self::Downloading,
        Self::Verifying,
        Self::Loading,
        Self::Ready,
        Self::Draining,
        Self::Failed,
    ];

    /// The state's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Downloading => "Downloading",
            Self::Verifying => "Verifying",
            Self::Loading => "Loading",
            Self::Ready => "Ready",
            Self::Draining => "Draining",
            Self::Failed => "Failed",
        }
    }
}

impl std::fmt::Display for ModelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ModelState {
    type Err = UnknownModelState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownModelState(s.to_owned()))
    }
}

impl TryFrom<String> for ModelState {
    type Error = UnknownModelState;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// A model state string that is none of [`ModelState`]'s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownModelState(pub String);

impl std::fmt::Display for UnknownModelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown model state {:?}", self.0)
    }
}

impl std::error::Error for UnknownModelState {}

/// Serving counters of the model served now, since it was loaded (each load starts
/// them at zero, so they are the revision's own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inference {
    /// The model served (`namespace/name`); absent from agents before it was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Its revision; absent from agents before it was sent (the health gates do not
    /// judge counters they cannot tie to a revision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Requests served, completed or failed.
    pub requests_total: u64,
    /// Of those, the server's failures (engine errors, plugin traps, fuel and
    /// deadlines); a request refused as the client's mistake is in neither.
    pub errors_total: u64,
    /// Mean generation speed.
    pub tokens_per_second: f64,
    /// Median request duration (start to last token), in milliseconds, estimated from
    /// the agent's histogram; absent before the first request (and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p50_millis: Option<f64>,
    /// 99th percentile request duration, in milliseconds, estimated likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99_millis: Option<f64>,
    /// 95th percentile time to first token, in milliseconds, estimated likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_p95_millis: Option<f64>,
}

/// How a device gets an encrypted model's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelEncryption {
    /// The gateway path to POST a [`KeyRequest`] to.
    pub key_path: String,
}

/// A device's request for a model key: what it is for, the one-request HPKE public key
/// to seal it to, and the device's signature over both
/// (`edgefleet_trust::sealed::key_request_message`) by the key its attestation bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyRequest {
    /// The model (`namespace/name`).
    pub model: String,
    /// Its revision.
    pub revision: String,
    /// The encrypted artifact's digest.
    pub digest: String,
    /// The X25519 public key to seal to (base64).
    pub recipient: String,
    /// ECDSA P-256 SHA-256 signature (ASN.1 DER, base64).
    pub signature: String,
}

/// The gateway's answer to a [`KeyRequest`]: the key, sealed to its recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyRelease {
    /// The HPKE suite (`edgefleet_trust::sealed::KEY_RELEASE_SUITE`).
    pub suite: String,
    /// The HPKE encapsulated key (base64).
    pub encapsulated_key: String,
    /// The sealed model key (base64).
    pub wrapped_key: String,
}

/// The gateway's answer to a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportAck {
    /// Highest `seq` received; the agent drops everything up to it from its spool.
    pub acked: u64,
    /// Reports of this boot missing between acknowledged batches (lost), as the gateway
    /// counts them.
    pub gaps: u64,
    /// The device's current desired-state version: a hint to poll when it differs.
    pub desired_version: String,
}

/// A named refusal, the body of every 4xx/5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Machine-readable reason, for example `Impersonation`.
    pub reason: String,
    /// Detail.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_follows_the_content() {
        let a = DesiredState::new("d".into(), vec![]);
        let model = DeviceModel {
            model: "ns/m".into(),
            revision: "r1".into(),
            variant: None,
            served_name: "m".into(),
            artifact: ArtifactRef {
                digest: "sha256:00".into(),
                size_bytes: Some(1),
                path: "/x".into(),
            },
            bundle: "{}".into(),
            signers: vec![],
            runtime: Runtime {
                context_size: 512,
                threads: None,
                gpu_layers: 0,
                parallel_slots: 1,
                queue_depth: 1,
            },
            plugins: vec![],
            port: 8080,
            golden_prompts: vec![],
            encryption: None,
        };
        let b = DesiredState::new("d".into(), vec![model.clone()]);
        assert_ne!(a.version, b.version);
        let mut changed = model.clone();
        changed.revision = "r2".into();
        let c = DesiredState::new("d".into(), vec![changed]);
        assert_ne!(b.version, c.version);
        assert_eq!(
            b.version,
            DesiredState::new("d".into(), vec![model]).version
        );
    }

    /// Model states are their names on the wire, both ways.
    #[test]
    fn model_states_are_their_names_on_the_wire() {
        for s in ModelState::ALL {
            let wire = serde_json::to_value(s).unwrap_or_default();
            assert_eq!(wire, serde_json::json!(s.as_str()));
            assert_eq!(serde_json::from_value::<ModelState>(wire).ok(), Some(s));
            assert_eq!(s.as_str().parse(), Ok(s));
        }
        let report: ModelReport = serde_json::from_value(serde_json::json!({
            "model": "ns/m", "revision": "r1", "state": "Ready", "loadMillis": 216,
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.state, ModelState::Ready);
    }

    /// A state no version of the protocol has is refused at parse, by name.
    #[test]
    fn an_unknown_model_state_is_refused_by_name() {
        let err = serde_json::from_value::<ModelReport>(serde_json::json!({
            "model": "ns/m", "revision": "r1", "state": "Exploded",
        }))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains(r#"unknown model state "Exploded""#), "{err}");
        assert_eq!(
            "ready".parse::<ModelState>(),
            Err(UnknownModelState("ready".into()))
        );
        // Not a string at all.
        assert!(serde_json::from_value::<ModelState>(serde_json::json!(3)).is_err());
    }
}
