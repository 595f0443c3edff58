//! The edgefleet operator: the EdgeModel reconciler, the device gateway (enrolment,
//! attestation, desired state, reports, artifacts), the EdgeDevice status they keep, and
//! the cluster's trust policies they apply.

pub mod bundles;
pub mod device_cache;
pub mod device_identity;
pub mod device_status;
pub mod edgemodel;
pub mod gateway;
pub mod heartbeat;
pub mod leader;
pub mod metrics;
pub mod process;
pub mod replicas;
pub mod reported;
pub mod rollout;
pub mod trust_policy;
