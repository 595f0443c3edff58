//! `EdgeModel`: a model to deploy onto a fleet of edge devices.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Artifact, SignatureSource, TeeKind, TrustedSigner};

/// Annotation on an EdgeModel that asks to roll its failed revision out again from the
/// first step; any new value (a timestamp, say) asks once:
/// `kubectl annotate edgemodel NAME edgefleet.io/retry=$(date +%s) --overwrite`.
pub const RETRY_ANNOTATION: &str = "edgefleet.io/retry";

/// Desired state of an EdgeModel: which model, signed by whom, onto which devices, how
/// fast, and how it runs there.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "edgefleet.io",
    version = "v1alpha1",
    kind = "EdgeModel",
    plural = "edgemodels",
    shortname = "em",
    category = "edgefleet",
    namespaced,
    status = "EdgeModelStatus",
    derive = "PartialEq",
    doc = "EdgeModel deploys a signed LLM (GGUF) onto the edge devices its selector matches, in health-gated rollout steps.",
    printcolumn(
        name = "Signer",
        type_ = "string",
        json_path = ".spec.signers[0].name",
        description = "First trusted signer"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.readyDevices",
        description = "Devices serving the current revision / devices targeted"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Rollout phase"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.signers) > 0")
    .message("spec.signers must name at least one trusted signer for spec.signature"))]
#[x_kube(validation = Rule::new("!has(self.variants) || self.variants.all(v, v.name != self.servedName)")
    .message("a variant name must differ from spec.servedName"))]
pub struct EdgeModelSpec {
    /// Model id served on the device's OpenAI-compatible API (`"model"` in requests).
    /// Immutable: clients address the model by it; create a new EdgeModel to rename.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("servedName is immutable"))]
    pub served_name: String,
    /// The default model file (GGUF) and its digest.
    pub artifact: Artifact,
    /// OpenSSF model-signing v1.0 bundle over the artifact. Devices and the operator
    /// refuse the artifact unless it verifies against `signers`.
    pub signature: SignatureSource,
    /// Identities trusted to sign this model (and its variants and plugins), picked from
    /// the EdgeTrustPolicy signers granted to this namespace: by name alone, or in full
    /// (which must equal the policy's signer). At least one. A signer the policies do not
    /// grant here refuses the revision (`SignatureVerified=False`, `UntrustedSigner`).
    #[schemars(length(max = 8))]
    pub signers: Vec<TrustedSigner>,
    /// Alternative builds of the same model (for example other quantisations) with the
    /// minimum device memory each needs. A device gets the first variant whose
    /// `minMemory` it meets, otherwise the default artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub variants: Option<Vec<ModelVariant>>,
    /// Which EdgeDevices receive the model, by their labels. An empty selector matches
    /// every approved device.
    #[serde(default)]
    pub selector: LabelSelector,
    /// What a device must prove before it may fetch the model.
    #[serde(default)]
    pub attestation: AttestationRequirement,
    /// How the operator moves devices to a new revision.
    #[serde(default)]
    pub rollout: RolloutStrategy,
    /// llama.cpp settings on the device.
    #[serde(default)]
    pub runtime: RuntimeSettings,
    /// WebAssembly plugins each request passes through, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub plugins: Option<Vec<PluginSpec>>,
    /// TCP port of the OpenAI-compatible API on the device.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Checks each device runs after loading the model and before it reports it Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Validation>,
    /// The artifact (and every variant) is encrypted (`edgefleet model encrypt`); its
    /// key is released by the gateway only to an approved device this model targets,
    /// whose current attestation meets `attestation`, sealed to a key the device made
    /// for that request (HPKE). The device decrypts into memory only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// Where an encrypted model's key is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Encryption {
    /// The Secret, in the EdgeModel's namespace, holding the 32-byte key. The Secret
    /// must grant it to this EdgeModel: its annotation `edgefleet.io/edgemodels` lists
    /// the EdgeModel's name (comma-separated names).
    pub key_secret_ref: KeySecretRef,
}

/// A key in a Secret of the EdgeModel's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeySecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key in its `data` holding the 32 bytes (default `key`).
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    "key".into()
}

fn default_port() -> i32 {
    8080
}

/// What a device checks after loading a revision, before it serves it or reports it
/// Ready.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Validation {
    /// Prompts answered greedily (temperature 0) through the model's chat template,
    /// each with its expected answer. A device whose answer does not meet one fails the
    /// revision (`Failed`, reason `GoldenPromptMismatch`) and keeps serving what it
    /// served before. Each device reports the SHA-256 of its answers; the EdgeModel's
    /// `status.goldenPrompts` shows how many distinct answers each kind of hardware
    /// gave.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[x_kube(validation = Rule::new("self.all(p, self.exists_one(q, q.name == p.name))")
        .message("goldenPrompts names must be unique"))]
    pub golden_prompts: Vec<GoldenPrompt>,
}

/// One golden prompt: exactly one of `exact`, `contains` and `regex`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.exact) ? 1 : 0) + (has(self.contains) ? 1 : 0) + (has(self.regex) ? 1 : 0) == 1")
    .message("a golden prompt expects exactly one of exact, contains and regex"))]
pub struct GoldenPrompt {
    /// Its name, unique in the list (reported with its result).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The user message (one message, through the model's chat template).
    #[schemars(length(min = 1, max = 4096))]
    pub prompt: String,
    /// The answer, with whitespace trimmed at both ends, must equal this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub exact: Option<String>,
    /// The answer must contain this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub contains: Option<String>,
    /// The answer must match this regular expression (Rust `regex` syntax: no
    /// look-around or back-references; matching takes linear time). The operator
    /// refuses a revision whose expression does not compile (`GoldenPromptInvalid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub regex: Option<String>,
    /// Most tokens generated for the answer.
    #[serde(default = "default_golden_tokens")]
    #[schemars(range(min = 1, max = 256))]
    pub max_tokens: i32,
}

fn default_golden_tokens() -> i32 {
    32
}

/// Another build of the model for devices with a given amount of memory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelVariant {
    /// Variant name, for example `q8_0`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The variant's file and digest.
    pub artifact: Artifact,
    /// Its signature bundle, verified against the same `spec.signers`.
    pub signature: SignatureSource,
    /// Least device memory (as a Kubernetes quantity, for example `2Gi`) for this variant.
    #[x_kube(validation = Rule::new("type(self) == int ? self > 0 : (isQuantity(self) && quantity(self).isGreaterThan(quantity('0')))")
        .message("minMemory must be a positive quantity such as 2Gi"))]
    pub min_memory: Quantity,
}

/// Attestation a device must pass before it receives the model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttestationRequirement {
    /// Accepted evidence kinds. `dev` is for development clusters; the default policy
    /// rejects it.
    #[serde(default = "default_tee_kinds")]
    #[schemars(length(min = 1, max = 4))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub tee_kinds: Vec<TeeKind>,
    /// Name of the Rego appraisal policy (from the operator's policy set) that must allow
    /// the device's evidence.
    #[serde(default = "default_policy")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub policy: String,
}

impl Default for AttestationRequirement {
    fn default() -> Self {
        Self {
            tee_kinds: default_tee_kinds(),
            policy: default_policy(),
        }
    }
}

fn default_tee_kinds() -> Vec<TeeKind> {
    vec![TeeKind::Tpm, TeeKind::SevSnp, TeeKind::Tdx]
}

fn default_policy() -> String {
    "default".to_owned()
}

/// How devices move to a new revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// Cumulative targets of each step. The last step should reach every targeted
    /// device; an absent list means one step to 100%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub steps: Option<Vec<RolloutStep>>,
    /// How many targeted devices may be not ready at once during a rollout, as a count
    /// (`1`) or a percentage (`"25%"`). Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("type(self) == int ? self >= 0 : self.matches('^(100|[1-9]?[0-9])%$')")
        .message("maxUnavailable must be a non-negative count or a percentage from 0% to 100%"))]
    pub max_unavailable: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    /// Conditions a step must meet before the next one starts.
    #[serde(default)]
    pub health_gates: HealthGates,
    /// Stops the rollout where it is. Devices keep what they run.
    #[serde(default)]
    pub paused: bool,
}

/// One rollout step: a device count or a percentage of targeted devices (exactly one).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.count) != has(self.percent)")
    .message("a rollout step sets exactly one of count and percent"))]
pub struct RolloutStep {
    /// Number of devices updated once this step is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub count: Option<i32>,
    /// Percentage (1–100) of targeted devices updated once this step is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("percent must be between 1 and 100"))]
    pub percent: Option<i32>,
    /// Seconds to watch health after the step is reached before moving on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub pause_seconds: Option<i32>,
}

/// Health a device must show on the new revision for a step to pass.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthGates {
    /// Seconds a device has to report the model Ready before the step fails.
    #[serde(default = "default_ready_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub ready_timeout_seconds: i32,
    /// Highest error rate allowed, in percent of requests (0–100). Errors are the
    /// server's failures (llama.cpp errors); a request refused as the client's mistake
    /// (a prompt that does not fit the context) is not one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100").message("maxErrorRatePercent must be between 0 and 100"))]
    pub max_error_rate_percent: Option<i32>,
    /// Least generation speed, in tokens per second, a device must report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_tokens_per_second: Option<i32>,
    /// Highest 95th percentile time to first token, in milliseconds, a device may
    /// report (`status.inference.timeToFirstTokenP95Millis`, estimated from the agent's
    /// histogram buckets, whose last bound is 120 s, so at most 120000; it counts the
    /// request's wait for a slot). A device that has served `minRequests` requests and reports
    /// no time to first token fails it: a gate that was asked for is never skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 120000))]
    pub max_time_to_first_token_millis_p95: Option<i32>,
    /// Requests a device must have served on the revision before the rate gates
    /// (`maxErrorRatePercent`, `minTokensPerSecond`, `maxTimeToFirstTokenMillisP95`)
    /// judge it: one early failure is not a rate. A device below it is neither failed
    /// nor waited for.
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_requests: i32,
    /// Devices of the same kind (CPU architecture, TEE kind and variant) that give
    /// different answers to a golden prompt (`spec.validation.goldenPrompts`) fail the
    /// gate, even when each answer meets its expectation: greedy decoding of the same
    /// weights on the same kind of hardware answers the same, so a difference means a
    /// wrong or damaged model somewhere. Kinds may differ from each other (their
    /// arithmetic does); `status.goldenPrompts` shows them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub golden_prompts: bool,
    /// Roll back to the previous revision when a gate fails (default true).
    #[serde(default = "default_true")]
    pub rollback_on_failure: bool,
}

impl Default for HealthGates {
    fn default() -> Self {
        Self {
            ready_timeout_seconds: default_ready_timeout(),
            max_error_rate_percent: None,
            min_tokens_per_second: None,
            max_time_to_first_token_millis_p95: None,
            min_requests: default_min_requests(),
            golden_prompts: false,
            rollback_on_failure: true,
        }
    }
}

fn default_ready_timeout() -> i32 {
    600
}

fn default_min_requests() -> i32 {
    20
}

fn default_true() -> bool {
    true
}

/// llama.cpp runtime settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSettings {
    /// Context window in tokens.
    #[serde(default = "default_context_size")]
    #[schemars(range(min = 128, max = 1048576))]
    pub context_size: i32,
    /// CPU threads for generation; absent means the device's core count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub threads: Option<i32>,
    /// Layers offloaded to a GPU (0 = CPU only).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1024))]
    pub gpu_layers: i32,
    /// Requests decoded concurrently; more wait in a bounded queue.
    #[serde(default = "default_parallel")]
    #[schemars(range(min = 1, max = 64))]
    pub parallel_slots: i32,
    /// Requests allowed to wait for a slot before the API answers 429.
    #[serde(default = "default_queue")]
    #[schemars(range(min = 0, max = 4096))]
    pub queue_depth: i32,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            context_size: default_context_size(),
            threads: None,
            gpu_layers: 0,
            parallel_slots: default_parallel(),
            queue_depth: default_queue(),
        }
    }
}

fn default_context_size() -> i32 {
    2048
}
fn default_parallel() -> i32 {
    1
}
fn default_queue() -> i32 {
    16
}

/// A WebAssembly component in the request path, with its sandbox limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginSpec {
    /// Plugin name, unique within the chain; used in logs and metrics.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The component file (`.wasm`) and its digest.
    pub artifact: Artifact,
    /// Its signature bundle, verified against `spec.signers` like the model.
    pub signature: SignatureSource,
    /// Per-call sandbox limits.
    pub limits: PluginLimits,
    /// Read-only configuration the plugin reads through the host's `config` import.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(length(max = 64))]
    pub config: BTreeMap<String, String>,
    /// Capabilities beyond the sandbox's default of none. Without a grant a plugin has
    /// no environment, no files, no network and a frozen clock, and a component that
    /// imports a filesystem, socket or clock interface it was not granted is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grants: Option<PluginGrants>,
}

/// What a plugin may reach outside its sandbox.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PluginGrants {
    /// Environment variables the plugin sees (it sees none otherwise).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(length(max = 32))]
    pub env: BTreeMap<String, String>,
    /// The real wall and monotonic clocks; otherwise both read a fixed time.
    #[serde(default)]
    pub clocks: bool,
    /// Absolute device directories the plugin may read (never write), each seen at the
    /// same path. The agent refuses relative paths and `..`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub read_only_dirs: Vec<String>,
    /// TCP/UDP sockets and name lookup.
    #[serde(default)]
    pub network: bool,
}

/// Limits that apply to every call into a plugin.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.fuel) || has(self.deadlineMillis)")
    .message("plugin limits need fuel or deadlineMillis (or both)"))]
pub struct PluginLimits {
    /// Wasm fuel (roughly instructions) per call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub fuel: Option<i64>,
    /// Wall-clock bound per call, in milliseconds (epoch interruption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60000))]
    pub deadline_millis: Option<i32>,
    /// Linear-memory cap of the plugin instance, in bytes.
    #[x_kube(validation = Rule::new("self > 0").message("memoryBytes must be greater than 0"))]
    pub memory_bytes: i64,
}

/// Observed state of an EdgeModel, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeModelStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Available`, `Progressing`, `Degraded` and `SignatureVerified`, with reasons.
    /// Each writer (operator, gateway) owns its own condition types under server-side
    /// apply, so the list is a map keyed by `type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// One-word summary: Pending, Progressing, Available, Paused, Degraded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ModelPhase>,
    /// `ready/targeted`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_devices: Option<String>,
    /// Device counts by state.
    #[serde(default)]
    pub devices: DeviceCounts,
    /// Revision (hash of artifact, signature and runtime settings) being rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// Last revision that completed a rollout; the rollback target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,
    /// Index of the rollout step reached (0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<i32>,
    /// When the current step's devices were all assigned: the start of its ready
    /// timeout and, once they are ready, of its pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// How far the current revision has rolled out: a candidate device whose rank for
    /// this model ([`device_rank`]) is below this number runs `currentRevision`; the
    /// others run `stableRevision` (or nothing before a first rollout completes). 0 when
    /// a rollout starts and after a rollback, 2^48 (every device) once it is complete.
    /// Devices derive what they run from this one number, so an advance is one status
    /// write whatever the fleet's size, and a device joining or leaving never changes
    /// another device's revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 281_474_976_710_656_i64))]
    pub rollout_rank: Option<i64>,
    /// A revision that failed its health gates. With `rollbackOnFailure` its devices
    /// went back to the stable revision (when there is one) and it is not retried until
    /// the spec changes or an administrator asks with the [`RETRY_ANNOTATION`];
    /// without, it resumes once every online device on it is healthy again (with rate
    /// gates: shown by fresh statistics over `minRequests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_revision: Option<String>,
    /// The value of the [`RETRY_ANNOTATION`] last acted on (each new value asks once;
    /// at most its first 128 characters are kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub last_retry: Option<String>,
    /// What each revision that devices may run (the current one, the stable one, and any
    /// a device is still assigned) consists of, with every signature bundle resolved. The
    /// gateway serves devices from these, so that a rollback needs nothing the spec no
    /// longer holds, and a device gets exactly what the operator verified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["revision"]))]
    pub revisions: Vec<RevisionTemplate>,
    /// Devices that refused the current revision on their own authority (a local
    /// refusal such as `PluginGrantDenied`): excluded from the rollout, each announced
    /// once by a `DeviceRefused` event. At most 128 are listed; `devices.refused` counts
    /// them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["device"]))]
    pub refusals: Vec<Refusal>,
    /// The current revision's golden prompts: how many distinct answers the devices
    /// reporting it Ready gave, per kind of hardware.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub golden_prompts: Vec<GoldenConsistency>,
    /// Keys of this encrypted model the gateways released to attested devices, all
    /// replicas together (each adds its count a few seconds after the releases; a
    /// replica that crashes first loses its few uncounted ones: the events and the
    /// metric are the full record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_releases: Option<i64>,
}

/// One golden prompt's answers across the fleet.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GoldenConsistency {
    /// The prompt's name.
    #[schemars(length(max = 63))]
    pub name: String,
    /// Distinct answers over every kind.
    pub distinct_answers: i32,
    /// Per kind of hardware.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub kinds: Vec<GoldenKind>,
}

/// The answers of one kind of hardware to one golden prompt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GoldenKind {
    /// CPU architecture (`x86_64`, `aarch64`).
    #[schemars(length(max = 64))]
    pub arch: String,
    /// TEE kind the device attests with.
    #[schemars(length(max = 32))]
    pub tee: String,
    /// The variant it runs (empty: the default artifact).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 63))]
    pub variant: String,
    /// Devices of this kind that answered.
    pub devices: i32,
    /// Distinct answers among them (1 when they agree).
    pub distinct_answers: i32,
}

/// `status.rolloutRank` that puts every device in the rollout's range (ranks are 48-bit
/// numbers, exact in any JSON reader, with ties improbable even among millions of
/// devices).
pub const RANK_ALL: i64 = 1 << 48;

/// The rank of `device` for the EdgeModel with UID `model_uid`: the first six bytes
/// of SHA-256(`model_uid` NUL `device`) as a number in [0, 2^48). Stable for the
/// life of the EdgeModel, independent of the other devices, and spread evenly, so
/// that a threshold over ranks takes a fair sample of the fleet and a re-created
/// EdgeModel samples afresh.
pub fn device_rank(model_uid: &str, device: &str) -> i64 {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(model_uid.as_bytes());
    h.update([0u8]);
    h.update(device.as_bytes());
    let d = h.finalize();
    i64::from_be_bytes([0, 0, d[0], d[1], d[2], d[3], d[4], d[5]])
}

/// The revision a candidate of rank `rank` runs when `current` has rolled out to the
/// ranks below `rollout_rank`: `current` there, `stable` elsewhere.
pub fn derived_revision<'a>(
    current: Option<&'a str>,
    stable: Option<&'a str>,
    rollout_rank: Option<i64>,
    rank: i64,
) -> Option<&'a str> {
    current
        .filter(|_| rank < rollout_rank.unwrap_or(0))
        .or(stable)
}

impl EdgeModelStatus {
    /// The revision a candidate device of rank `rank` ([`device_rank`]) runs: the
    /// current one below `rolloutRank`, else the stable one; only a revision whose
    /// template this status holds (a revision withdrawn or not verified has none).
    pub fn revision_for(&self, rank: i64) -> Option<&str> {
        let held = |r: &&str| self.revisions.iter().any(|t| t.revision == *r);
        derived_revision(
            self.current_revision.as_deref().filter(held),
            self.stable_revision.as_deref().filter(held),
            self.rollout_rank,
            rank,
        )
    }
}

/// A device's local refusal of a revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    /// The device.
    #[schemars(length(max = 253))]
    pub device: String,
    /// The revision it refused.
    #[schemars(length(max = 64))]
    pub revision: String,
    /// The named reason (`PluginGrantDenied`, `UntrustedSigner`).
    #[schemars(length(max = 63))]
    pub reason: String,
}

/// One-word summary: Pending, Progressing, Available, Paused, Degraded or Failed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ModelPhase {
    /// No approved, ready and attested device matches the selector.
    Pending,
    /// Devices are moving to the current revision.
    Progressing,
    /// Every step is done and the current revision is the stable one.
    Available,
    /// `spec.rollout.paused` holds the rollout where it is.
    Paused,
    /// The current revision failed its health gates; the rollout is halted.
    Degraded,
    /// The signature did not verify; nothing moves to the current revision.
    Failed,
    /// A phase this version does not know (written by a newer operator). Read only, so
    /// that one such object cannot stall the watches of every EdgeModel; never written,
    /// and not in the schema.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

impl ModelPhase {
    /// The phase as written in `status.phase`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Progressing => "Progressing",
            Self::Available => "Available",
            Self::Paused => "Paused",
            Self::Degraded => "Degraded",
            Self::Failed => "Failed",
            Self::Unknown => "Unknown",
        }
    }
}

impl std::fmt::Display for ModelPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One revision as devices run it. Every `signature` holds its bundle inline.
///
/// Written only by the operator, from a spec the API server already validated; the
/// nested objects are stored without their CEL rules (`x-kubernetes-preserve-unknown-fields`),
/// which would otherwise be charged again for every kept revision and exceed the CRD's
/// CEL cost budget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionTemplate {
    /// The revision.
    #[schemars(length(max = 64))]
    pub revision: String,
    /// Model id on the device's API.
    #[schemars(length(max = 128))]
    pub served_name: String,
    /// The default model file.
    #[schemars(schema_with = "crate::common::opaque_object")]
    pub artifact: Artifact,
    /// Its bundle, inline.
    #[schemars(schema_with = "crate::common::opaque_object")]
    pub signature: SignatureSource,
    /// Variants, with their bundles inline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::opaque_list")]
    pub variants: Vec<ModelVariant>,
    /// Trusted signers.
    #[schemars(schema_with = "crate::common::opaque_list")]
    pub signers: Vec<TrustedSigner>,
    /// llama.cpp settings.
    #[schemars(schema_with = "crate::common::opaque_object")]
    pub runtime: RuntimeSettings,
    /// Plugins, with their bundles inline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::opaque_list")]
    pub plugins: Vec<PluginSpec>,
    /// API port.
    pub port: i32,
    /// Golden prompts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::common::opaque_object")]
    pub validation: Option<Validation>,
    /// Where the key of an encrypted artifact is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::common::opaque_object")]
    pub encryption: Option<Encryption>,
}

/// Per-state device counts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCounts {
    /// Devices the selector matches.
    #[serde(default)]
    pub targeted: i32,
    /// Targeted devices with a passing, unexpired attestation.
    #[serde(default)]
    pub attested: i32,
    /// Devices assigned the current revision.
    #[serde(default)]
    pub updated: i32,
    /// Devices serving the current revision and healthy.
    #[serde(default)]
    pub ready: i32,
    /// Devices that reported a failure for the current revision.
    #[serde(default)]
    pub failed: i32,
    /// Devices that refused the current revision on their own authority (excluded from
    /// the rollout, not failures).
    #[serde(default)]
    pub refused: i32,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn phases_are_written_as_their_names() {
        for phase in [
            ModelPhase::Pending,
            ModelPhase::Progressing,
            ModelPhase::Available,
            ModelPhase::Paused,
            ModelPhase::Degraded,
            ModelPhase::Failed,
        ] {
            let json = serde_json::to_value(phase).unwrap();
            assert_eq!(json, serde_json::json!(phase.as_str()));
            assert_eq!(serde_json::from_value::<ModelPhase>(json).unwrap(), phase);
        }
        let status: EdgeModelStatus =
            serde_json::from_value(serde_json::json!({"phase": "Progressing"})).unwrap();
        assert_eq!(status.phase, Some(ModelPhase::Progressing));
        // A phase from a newer operator reads as Unknown instead of failing the object
        // (and with it every watch of EdgeModels); the schema does not offer it.
        assert_eq!(
            serde_json::from_value::<ModelPhase>(serde_json::json!("Rebalancing")).unwrap(),
            ModelPhase::Unknown
        );
        let schema = serde_json::to_string(&schemars::schema_for!(ModelPhase)).unwrap();
        assert!(schema.contains("\"Failed\""), "{schema}");
        assert!(!schema.contains("Unknown"), "{schema}");
    }

    #[test]
    fn ranks_are_stable_48_bit_and_differ_per_model() {
        let r = device_rank("uid-1", "till-a");
        assert_eq!(r, device_rank("uid-1", "till-a"));
        assert!((0..RANK_ALL).contains(&r));
        assert_ne!(r, device_rank("uid-2", "till-a"));
        assert_ne!(r, device_rank("uid-1", "till-b"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(device_rank("ab", "c"), device_rank("a", "bc"));
        // Spread: of 10,000 devices, about half rank below the middle.
        let low = (0..10_000)
            .filter(|i| device_rank("uid-1", &format!("d{i}")) < RANK_ALL / 2)
            .count();
        assert!((4_700..5_300).contains(&low), "{low}");
    }

    #[test]
    fn a_device_runs_the_current_revision_below_the_rollout_rank_and_the_stable_above() {
        let template = |rev: &str| -> RevisionTemplate {
            serde_json::from_value(serde_json::json!({
                "revision": rev, "servedName": "m",
                "artifact": {"uri": "https://x/m.gguf", "digest": format!("sha256:{}", "a".repeat(64))},
                "signature": {"inline": "{}"}, "signers": [{"name": "s", "publicKey": "k"}],
                "runtime": {}, "port": 8080,
            }))
            .unwrap()
        };
        let mut s = EdgeModelStatus {
            current_revision: Some("r2".into()),
            stable_revision: Some("r1".into()),
            rollout_rank: Some(100),
            revisions: vec![template("r1"), template("r2")],
            ..EdgeModelStatus::default()
        };
        assert_eq!(s.revision_for(99), Some("r2"));
        assert_eq!(s.revision_for(100), Some("r1"));
        // No rank yet: nobody is in range.
        s.rollout_rank = None;
        assert_eq!(s.revision_for(0), Some("r1"));
        s.rollout_rank = Some(RANK_ALL);
        assert_eq!(s.revision_for(RANK_ALL - 1), Some("r2"));
        // A revision without its template (withdrawn, unverified) is never served.
        s.revisions = vec![template("r1")];
        assert_eq!(s.revision_for(0), Some("r1"));
        s.revisions = vec![template("r2")];
        s.rollout_rank = Some(100);
        assert_eq!(s.revision_for(100), None);
        // Before a first rollout completes, devices above the rank run nothing.
        s.stable_revision = None;
        s.revisions = vec![template("r2")];
        assert_eq!(s.revision_for(5), Some("r2"));
        assert_eq!(s.revision_for(500), None);
    }
}
