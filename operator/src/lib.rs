//! The edgefleet operator: today, the device gateway's attestation endpoints and the
//! EdgeDevice status they maintain. Reconcilers join later.

pub mod bundles;
pub mod device_status;
pub mod edgemodel;
pub mod gateway;
pub mod heartbeat;
pub mod leader;
pub mod metrics;
pub mod rollout;
