//! Gateway replicas. Every operator replica serves devices (enrolment, attestation,
//! desired state, reports, artifacts); the leader alone plans rollouts. A device
//! reports to one replica at a time, and that replica judges its liveness
//! ([`crate::heartbeat`]): it records itself in the device's `status.gateway`.
//!
//! Each replica announces that it is alive in a Lease of its own,
//! `edgefleet-gateway-<identity>` (label [`REPLICA_LABEL`]), renewed every third of its
//! duration with server-side apply. The leader reads them ([`renewals`]) to tell a
//! replica that is gone from one that is merely quiet: the devices of a gone replica
//! are the leader's to judge, counting from that replica's last renewal, so they have a
//! whole heartbeat lease to reconnect elsewhere before they are marked not ready.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

/// Label of every replica's presence Lease.
pub const REPLICA_LABEL: &str = "edgefleet.io/gateway-replica";
/// Field manager of the presence Leases.
pub const PRESENCE_MANAGER: &str = "edgefleet-gateway-presence";

/// The name of `identity`'s presence Lease: `edgefleet-gateway-` and the identity,
/// lowercased, with anything a Kubernetes name may not hold replaced by `-`, and cut to
/// fit (a hash of the identity keeps cut names apart).
pub fn lease_name(identity: &str) -> String {
    let clean: String = identity
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
            _ => '-',
        })
        .collect();
    let name = format!("edgefleet-gateway-{}", clean.trim_matches(['-', '.']));
    if name.len() <= 63 && clean == identity {
        return name;
    }
    use sha2::Digest as _;
    let h = hex::encode(&sha2::Sha256::digest(identity.as_bytes())[..6]);
    let keep: String = name.chars().take(50).collect();
    format!("{}-{h}", keep.trim_end_matches(['-', '.']))
}

/// This replica's presence.
#[derive(Debug, Clone)]
pub struct Presence {
    leases: Api<Lease>,
    identity: String,
    duration: Duration,
}

impl Presence {
    /// The presence of replica `identity`, in `namespace`, lasting `duration` unless
    /// renewed.
    pub fn new(client: Client, namespace: &str, identity: String, duration: Duration) -> Self {
        Self {
            leases: Api::namespaced(client, namespace),
            identity,
            duration,
        }
    }

    /// Renews the Lease (creating it the first time).
    pub async fn renew(&self) -> Result<(), kube::Error> {
        let name = lease_name(&self.identity);
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "labels": {REPLICA_LABEL: "true"}},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX),
                "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(Timestamp::now()),
            },
        });
        self.leases
            .patch(
                &name,
                &PatchParams::apply(PRESENCE_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await
            .map(|_| ())
    }

    /// Renews every third of the duration, for as long as it runs.
    pub async fn run(self) {
        loop {
            if let Err(e) = self.renew().await {
                tracing::warn!(error = %e, "renewing this gateway replica's presence");
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }
}

/// When each replica (by identity) last renewed its presence, and for how long.
pub async fn renewals(
    client: Client,
    namespace: &str,
) -> Result<HashMap<String, (Timestamp, Duration)>, kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let list = leases
        .list(&ListParams::default().labels(REPLICA_LABEL))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|l| {
            let spec = l.spec?;
            let renewed = spec.renew_time?.0;
            let duration = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
            );
            Some((spec.holder_identity?, (renewed, duration)))
        })
        .collect())
}

/// Whether a replica that last renewed at `renewed` for `duration` is alive at `now`.
pub fn alive(renewed: Timestamp, duration: Duration, now: Timestamp) -> bool {
    let d = SignedDuration::try_from(duration).unwrap_or(SignedDuration::ZERO);
    renewed + d >= now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_valid_and_distinct() {
        assert_eq!(lease_name("op-1"), "edgefleet-gateway-op-1");
        let odd = lease_name("Host_Name/42");
        assert!(odd.starts_with("edgefleet-gateway-host-name-42-"), "{odd}");
        assert_ne!(lease_name("Host_Name/42"), lease_name("host-name-42"));
        let long = lease_name(&"x".repeat(300));
        assert!(long.len() <= 63, "{long}");
        assert!(
            long.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        );
        assert_ne!(lease_name(&"x".repeat(300)), lease_name(&"x".repeat(301)));
    }

    #[test]
    fn a_replica_is_alive_until_its_lease_runs_out() {
        let t = Timestamp::from_second(1_700_000_000).unwrap();
        let d = Duration::from_secs(15);
        assert!(alive(t, d, t + SignedDuration::from_secs(15)));
        assert!(!alive(t, d, t + SignedDuration::from_secs(16)));
    }
}
