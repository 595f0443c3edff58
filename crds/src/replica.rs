//! `EdgeGatewayReplica`: what one operator replica's gateway knows that the leader
//! needs and the API server does not have yet. Every replica serves devices; a device's
//! reported model states are written to its `EdgeDevice.status` within a fleet-wide
//! budget, so during a rollout they lag. Each replica publishes, in one object of its
//! own, the states its devices reported that their recorded status does not show yet,
//! grouped by (model, revision, state, reason) — a device name each — and the leader
//! plans on them as if they were written. Likewise the serving statistics of devices
//! that breach a rate gate. One write per replica per second at most, whatever the
//! number of devices.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::device::{InferenceStats, ModelState};

/// One replica's pending device reports.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "edgefleet.io",
    version = "v1alpha1",
    kind = "EdgeGatewayReplica",
    plural = "edgegatewayreplicas",
    shortname = "egr",
    category = "edgefleet",
    namespaced,
    derive = "PartialEq",
    doc = "EdgeGatewayReplica is written by one operator replica: the model states its devices reported that their EdgeDevice status does not show yet, for the leader to plan on.",
    printcolumn(name = "Replica", type_ = "string", json_path = ".spec.identity"),
    printcolumn(name = "Published", type_ = "date", json_path = ".spec.publishedTime")
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeGatewayReplicaSpec {
    /// The replica (the operator's identity).
    #[schemars(length(min = 1, max = 253))]
    pub identity: String,
    /// When this was published. The leader ignores a replica's reports older than a
    /// heartbeat lease (a replica that is gone).
    pub published_time: MicroTime,
    /// Reported states not yet in the devices' status, grouped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4096))]
    pub pending: Vec<PendingStates>,
    /// Devices whose serving statistics breach their model's rate gates as this
    /// replica judged them, with those statistics (so that the leader judges fresh
    /// numbers: recorded ones are refreshed within a fleet-wide write budget). At most
    /// 64; one is enough to fail a step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub breaches: Vec<StatsBreach>,
}

/// One device's statistics that breach a rate gate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatsBreach {
    /// The device.
    #[schemars(length(min = 1, max = 253))]
    pub device: String,
    /// Its statistics, as it reported them.
    pub stats: InferenceStats,
}

/// Devices that reported one model at one revision in one state (with one reason).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingStates {
    /// The EdgeModel, as `namespace/name`.
    #[schemars(length(min = 3, max = 317))]
    pub model: String,
    /// The revision.
    #[schemars(length(min = 1, max = 64))]
    pub revision: String,
    /// The state they reported.
    pub state: ModelState,
    /// The named reason, for a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub reason: Option<String>,
    /// The devices.
    #[schemars(length(max = 100000), inner(length(max = 253)))]
    pub devices: Vec<String>,
}
