//! `EdgeDevice`: one enrolled device of the fleet.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::TeeKind;

/// Desired state of a device: whether it is admitted, and which models the operator
/// wants on it. Facts describe the hardware; the device's labels (in metadata) are what
/// EdgeModel selectors match.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "edgefleet.io",
    version = "v1alpha1",
    kind = "EdgeDevice",
    plural = "edgedevices",
    shortname = "ed",
    category = "edgefleet",
    status = "EdgeDeviceStatus",
    derive = "PartialEq",
    doc = "EdgeDevice is one enrolled edge device: its facts, approval and last reported state. What it runs is derived from the EdgeModels' status.",
    printcolumn(name = "Approved", type_ = "boolean", json_path = ".spec.approved"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Attested",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Attested\")].status"
    ),
    printcolumn(
        name = "TEE",
        type_ = "string",
        json_path = ".status.attestation.teeKind"
    ),
    printcolumn(
        name = "Models",
        type_ = "integer",
        json_path = ".status.loadedModelCount"
    ),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeatTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeviceSpec {
    /// Hardware facts the agent declared at enrolment. Attestation confirms what it can;
    /// the rest is the device's word.
    pub facts: DeviceFacts,
    /// Whether the device is admitted to the fleet. Unapproved devices get no models.
    /// Set by an administrator, or by the operator's approval policy at enrolment.
    #[serde(default)]
    pub approved: bool,
}

/// What a device is. `agentKeyFingerprint` is fixed at enrolment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceFacts {
    /// CPU architecture, as `uname -m` reports it (for example `x86_64`, `aarch64`).
    #[schemars(length(min = 1, max = 32))]
    pub arch: String,
    /// Logical CPU cores.
    #[schemars(range(min = 1, max = 4096))]
    pub cpu_cores: i32,
    /// Usable memory, as a quantity (for example `8Gi`).
    #[x_kube(validation = Rule::new("type(self) == int ? self > 0 : (isQuantity(self) && quantity(self).isGreaterThan(quantity('0')))")
        .message("memory must be a positive quantity such as 8Gi"))]
    pub memory: Quantity,
    /// Accelerators, for example `nvidia.com/gpu` or `apple.com/metal`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(max = 128)))]
    pub accelerators: Vec<String>,
    /// Evidence kinds the device can produce.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4), extend("x-kubernetes-list-type" = "set"))]
    pub tee_kinds: Vec<TeeKind>,
    /// Agent version string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub agent_version: Option<String>,
    /// SHA-256 fingerprint of the agent's identity public key, as `sha256:<hex>`.
    /// Immutable: a new key is a new device, which enrols again.
    #[x_kube(validation = Rule::new("self.matches('^sha256:[0-9a-f]{64}$')")
        .message("agentKeyFingerprint must have the form sha256:<64 lowercase hex digits>"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("agentKeyFingerprint is immutable"))]
    #[schemars(length(max = 71))]
    pub agent_key_fingerprint: String,
}

/// A model assignment: what the gateway tells a device to run, derived from the
/// EdgeModel's status and the device ([`crate::EdgeModelStatus::revision_for`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesiredModel {
    /// The EdgeModel, as `namespace/name`.
    #[schemars(length(min = 3, max = 317))]
    pub model: String,
    /// The EdgeModel revision to run.
    #[schemars(length(min = 1, max = 64))]
    pub revision: String,
    /// Chosen variant name; absent for the default artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub variant: Option<String>,
}

/// Observed state of a device, from its heartbeats and attestations.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeviceStatus {
    /// `Ready`, `Attested` and `Approved`, with reasons.
    /// Each writer (operator, gateway) owns its own condition types under server-side
    /// apply, so the list is a map keyed by `type`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// When the gateway last heard from the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// The gateway replica the device reports to (the operator replica's identity),
    /// which judges its liveness. Absent once the device is marked not ready, until it
    /// reports again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub gateway: Option<String>,
    /// The latest attestation result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationSummary>,
    /// The hardware the device's evidence is pinned to, recorded by the gateway at the
    /// first allowed attestation. Evidence from other hardware is refused
    /// (`HardwareMismatch`) until an administrator clears this field (or deletes the
    /// EdgeDevice) to re-key the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_identity: Option<HardwareIdentity>,
    /// Models on the device and their state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<LoadedModel>,
    /// Number of models in state Ready, for `kubectl get`.
    #[serde(default)]
    pub loaded_model_count: i32,
    /// Serving statistics over the last heartbeat interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<InferenceStats>,
    /// Delivery of the agent's reports, so that loss is visible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reports: Option<ReportDelivery>,
}

/// How the agent's reports arrive at the gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportDelivery {
    /// Identifies the agent process whose sequence numbers these are.
    pub boot: String,
    /// Highest report sequence number received from it.
    pub last_sequence: i64,
    /// Reports of this boot the gateway never received (gaps in the sequence).
    pub missing: i64,
    /// Reports the agent dropped because its offline spool was full.
    pub dropped: i64,
}

/// Result of the device's latest attestation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttestationSummary {
    /// Evidence kind used.
    pub tee_kind: TeeKind,
    /// Whether the policy allowed the evidence.
    pub allowed: bool,
    /// Policy name and SHA-256 of the policy text that decided.
    pub policy: String,
    /// `sha256:<hex>` of the Rego policy text that decided.
    pub policy_hash: String,
    /// Digest over the normalized measurements (PCRs, launch measurement, MRTD/RTMRs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measurements_digest: Option<String>,
    /// Selected normalized measurements, by name, hex-encoded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub measurements: BTreeMap<String, String>,
    /// When the evidence was verified.
    pub verified_time: Time,
    /// When the result lapses unless the device attests again.
    pub expiry_time: Time,
    /// The end of the device's attestation lease: after its last allowed attestation,
    /// the agent serves until then without attesting again, and then stops serving
    /// (`AttestationLeaseExpired`) until it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expiry_time: Option<Time>,
    /// Why the policy denied, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The TPM clock and counters of the last allowed quote. The next quote must not be
    /// behind them; kept here so that a gateway restart or another replica still catches
    /// a rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_clock: Option<TpmClock>,
    /// When the challenge this result answered was issued (milliseconds since the
    /// epoch). Challenges are stateless tokens any gateway replica can check; each is
    /// used once because the gateway records the result only for a challenge issued
    /// strictly after this one, on the resourceVersion it read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub challenge_issued_millis: Option<i64>,
    /// The signed attestation result (an EAR token: a compact JWS, ES256, whose `x5c`
    /// is its signer's certificate from the device CA). The device embeds it in the
    /// receipts it signs; `edgefleet receipt verify` checks both with the CA alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub result: Option<String>,
    /// SHA-256 (hex) of `result`: the id a receipt names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub result_id: Option<String>,
}

/// What pins a device's evidence to its hardware. Written once, by the gateway under its
/// own field manager; it cannot be changed, only removed (which re-keys the device).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf")
    .message("hardwareIdentity cannot be changed; remove it to re-key the device"))]
pub struct HardwareIdentity {
    /// Evidence kind; a different kind is a different identity.
    pub kind: TeeKind,
    /// TPM: `sha256:<hex>` of the EK's SubjectPublicKeyInfo (DER). Compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 71))]
    pub ek_public_key_digest: Option<String>,
    /// SEV-SNP: the report's CHIP_ID, hex. Compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub chip_id: Option<String>,
    /// SEV-SNP: the reported TCB at enrolment. Recorded, not compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcb_at_enrolment: Option<SnpTcb>,
    /// TDX: `ppid:<hex>` (the PCK certificate's PPID), or `pck:sha256:<hex>` of the PCK
    /// certificate when it carries no PPID. Compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 80))]
    pub platform_id: Option<String>,
    /// TDX: the platform's FMSPC, hex. Recorded, not compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 12))]
    pub fmspc: Option<String>,
    /// dev: `sha256:<hex>` of the development key. Recorded, not compared (the dev
    /// attester proves no hardware; only the kind is pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 71))]
    pub dev_key_digest: Option<String>,
    /// When the identity was recorded.
    #[schemars(extend("maxLength" = 64))]
    pub recorded_time: Time,
}

/// An SEV-SNP TCB version's security patch levels.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnpTcb {
    /// Boot loader SPL.
    #[schemars(range(min = 0, max = 255))]
    pub bootloader: i32,
    /// TEE (PSP OS) SPL.
    #[schemars(range(min = 0, max = 255))]
    pub tee: i32,
    /// SNP firmware SPL.
    #[schemars(range(min = 0, max = 255))]
    pub snp: i32,
    /// Microcode SPL.
    #[schemars(range(min = 0, max = 255))]
    pub microcode: i32,
}

/// A TPM's clock and counters.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TpmClock {
    /// Milliseconds the TPM has been powered (monotonic unless reset).
    #[schemars(range(min = 0))]
    pub clock: i64,
    /// TPM resets (power cycles).
    #[schemars(range(min = 0))]
    pub reset_count: i64,
    /// TPM restarts since the last reset.
    #[schemars(range(min = 0))]
    pub restart_count: i64,
}

/// A model's state on the device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadedModel {
    /// The EdgeModel, as `namespace/name`.
    pub model: String,
    /// The revision this entry describes.
    pub revision: String,
    /// Lifecycle state.
    pub state: ModelState,
    /// Detail, for example the verification error of a Failed model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// With `Failed`: the named reason. A local refusal (`PluginGrantDenied`,
    /// `UntrustedSigner`) excludes only this device from the model's rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Milliseconds llama.cpp took to load the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_millis: Option<i64>,
    /// Its answers to the revision's golden prompts (when it ran them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub golden: Vec<GoldenAnswer>,
}

/// A device's answer to one golden prompt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GoldenAnswer {
    /// The prompt's name.
    #[schemars(length(max = 63))]
    pub name: String,
    /// `sha256:<hex>` of the answer's text.
    #[schemars(length(max = 80))]
    pub digest: String,
}

/// Lifecycle of a model on a device.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
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

/// Serving statistics of the model the device serves, since it was loaded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceStats {
    /// The model they count (`namespace/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The revision they count. The health gates judge only statistics of the revision
    /// they gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// When a gateway received them from the device (its own clock). The health gates
    /// judge only statistics received within the last two minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_time: Option<Time>,
    /// Generated tokens per second (mean over the interval).
    pub tokens_per_second: f64,
    /// Median request latency (start to last token) in milliseconds, when the agent
    /// measures it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p50_millis: Option<f64>,
    /// 99th percentile request latency in milliseconds, when the agent measures it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99_millis: Option<f64>,
    /// 95th percentile time to first token in milliseconds, when the agent measures it.
    /// Like the latencies, an estimate from the agent's histogram buckets (within a
    /// factor of 1.5 from 50 ms to 10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_p95_millis: Option<f64>,
    /// Requests served (completed or failed) since the model was loaded.
    pub requests_total: i64,
    /// Of those, the server's failures (engine errors, plugin traps, fuel and
    /// deadlines); a request refused as the client's mistake is in neither.
    pub errors_total: i64,
}
