//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator replicas
//! are safe: only the holder runs the controllers (and so only it writes).
//!
//! The holder renews the Lease every `duration / 3`; every write carries the
//! `resourceVersion` it read, so two candidates racing for an expired Lease cannot both
//! win (the loser gets 409 Conflict). A holder that cannot renew before its Lease
//! expires stops leading: [`LeaderElection::run`] returns, and the process exits so that
//! its supervisor restarts it as a candidate — a replica never keeps writing on a Lease
//! it may have lost.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};

/// Name of the operator's Lease.
pub const LEASE_NAME: &str = "edgefleet-operator";

/// Errors of one election step.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The API server refused or failed.
    #[error("lease {LEASE_NAME}: {0}")]
    Kube(#[from] kube::Error),
}

/// One candidate for the operator's Lease.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    leases: Api<Lease>,
    identity: String,
    duration: Duration,
}

/// What one election step found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This candidate holds the Lease until at least the returned renewal.
    Leader,
    /// Another candidate holds it.
    Follower(String),
}

impl LeaderElection {
    /// A candidate named `identity` for the Lease in `namespace`.
    pub fn new(client: Client, namespace: &str, identity: String, duration: Duration) -> Self {
        Self {
            leases: Api::namespaced(client, namespace),
            identity,
            duration,
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(15)),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One step: create, renew or take over the Lease if this candidate may.
    pub async fn step(&self) -> Result<Role, LeaderError> {
        let now = Timestamp::now();
        let Some(mut lease) = self.leases.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Role::Leader),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Role::Follower("?".into())),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        let expired = match (spec.renew_time.as_ref(), spec.lease_duration_seconds) {
            (Some(renewed), Some(secs)) => {
                renewed.0 + SignedDuration::from_secs(i64::from(secs)) < now
            }
            _ => true,
        };
        if !mine && !expired {
            return Ok(Role::Follower(holder));
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time } else { None };
        lease.spec = Some(self.spec(now, acquired, transitions));
        // `replace` sends the resourceVersion read above: a concurrent writer makes it 409.
        match self
            .leases
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Role::Leader),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Role::Follower(holder)),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this candidate leads.
    pub async fn acquire(&self) {
        loop {
            match self.step().await {
                Ok(Role::Leader) => return,
                Ok(Role::Follower(holder)) => {
                    tracing::debug!(%holder, "following");
                }
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Keeps renewing; returns when leadership is lost (or could not be renewed within
    /// the Lease duration).
    pub async fn hold(&self) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.step().await {
                Ok(Role::Leader) => last_renewed = tokio::time::Instant::now(),
                Ok(Role::Follower(holder)) => {
                    tracing::error!(%holder, "lost the operator lease");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the operator lease");
                    // Stop before the Lease can expire elsewhere (client-go's renew
                    // deadline): two thirds of its duration.
                    if last_renewed.elapsed() >= self.duration * 2 / 3 {
                        tracing::error!("could not renew the operator lease in time");
                        return;
                    }
                }
            }
        }
    }
}

/// Label put on the leader's Pod (`--label-leader-pod`), for people and tools that want
/// to find it; every replica serves devices.
pub const ROLE_LABEL: &str = "edgefleet.io/role";

/// Marks `pod` in `namespace` as the leader (`leader: true`) or removes the mark.
pub async fn label_pod(
    client: &Client,
    namespace: &str,
    pod: &str,
    leader: bool,
) -> Result<(), kube::Error> {
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let value = if leader {
        serde_json::json!("leader")
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({"metadata": {"labels": {ROLE_LABEL: value}}});
    api.patch(
        pod,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}
