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

    /// Renews every third of the duration, for as long as it runs, and each time
    /// shares `heartbeats`' fleet-wide status write budgets among the replicas alive.
    pub async fn run(self, heartbeats: crate::heartbeat::Heartbeats) {
        loop {
            if let Err(e) = self.renew().await {
                tracing::warn!(error = %e, "renewing this gateway replica's presence");
            }
            let namespace = self.leases.namespace().unwrap_or_default().to_owned();
            let client = self.leases.clone().into_client();
            match renewals(client, &namespace).await {
                Ok(r) => {
                    let now = Timestamp::now();
                    let alive = r.values().filter(|(t, d)| alive(*t, *d, now)).count();
                    heartbeats.share_among(alive);
                }
                Err(e) => tracing::warn!(error = %e, "listing the gateway replicas"),
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

/// How far ahead of the leader's clock a publication's time may be.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5);
/// How often a replica publishes its pending reports (when they changed).
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// Most bytes of device names one publication holds (with their quoting, so that the
/// object stays well under etcd's 1.5 MiB request limit).
pub const MAX_PUBLISHED_BYTES: usize = 1_000_000;

/// The reported model states of the devices that report to replica `me` (in
/// `reported`) that their recorded status (`recorded`, by name) does not show yet,
/// grouped and sorted; at most [`MAX_PUBLISHED_BYTES`] of names (the rest wait for a
/// later publication, or their status write).
pub fn pending(
    reported: &HashMap<String, Vec<edgefleet_crds::device::LoadedModel>>,
    recorded: impl Fn(&str) -> Option<std::sync::Arc<edgefleet_crds::EdgeDevice>>,
    me: &str,
) -> Vec<edgefleet_crds::replica::PendingStates> {
    use std::collections::BTreeMap;
    let mut groups: BTreeMap<
        (
            String,
            String,
            edgefleet_crds::device::ModelState,
            Option<String>,
        ),
        Vec<String>,
    > = BTreeMap::new();
    let mut bytes = 0;
    for (device, models) in reported {
        let Some(d) = recorded(device) else {
            continue;
        };
        let status = d.status.as_ref();
        if status.and_then(|s| s.gateway.as_deref()) != Some(me) {
            continue;
        }
        let shown = status.map(|s| s.models.as_slice()).unwrap_or_default();
        for m in models {
            let written = shown.iter().any(|r| {
                r.model == m.model
                    && r.revision == m.revision
                    && r.state == m.state
                    && r.reason == m.reason
            });
            if written || bytes + device.len() + 3 > MAX_PUBLISHED_BYTES {
                continue;
            }
            bytes += device.len() + 3;
            groups
                .entry((
                    m.model.clone(),
                    m.revision.clone(),
                    m.state,
                    m.reason.clone(),
                ))
                .or_default()
                .push(device.clone());
        }
    }
    groups
        .into_iter()
        .map(|((model, revision, state, reason), mut devices)| {
            devices.sort();
            edgefleet_crds::replica::PendingStates {
                model,
                revision,
                state,
                reason,
                devices,
            }
        })
        .collect()
}

/// Most statistics breaches one publication holds.
pub const MAX_BREACHES: usize = 64;
/// Most of them for one model, so that one model's breaches cannot crowd out
/// another's.
pub const MAX_BREACHES_PER_MODEL: usize = 8;

/// The devices that report to replica `me` whose latest statistics (`stats`, as noted
/// in memory) breach the rate gates of the revision their model is rolling out
/// ([`crate::rollout::gates::stats_breach`]; `model` looks a model up by key), and that
/// report (in `states`, as noted in memory) that revision `Ready`. A completed
/// revision is not judged, so nothing is published for it. In (model, device) order,
/// at most [`MAX_BREACHES_PER_MODEL`] per model and [`MAX_BREACHES`] in all.
pub fn breaches(
    stats: &HashMap<String, edgefleet_crds::device::InferenceStats>,
    states: &HashMap<String, Vec<edgefleet_crds::device::LoadedModel>>,
    recorded: impl Fn(&str) -> Option<std::sync::Arc<edgefleet_crds::EdgeDevice>>,
    model: impl Fn(&str) -> Option<std::sync::Arc<edgefleet_crds::EdgeModel>>,
    me: &str,
    now: Timestamp,
) -> Vec<edgefleet_crds::replica::StatsBreach> {
    let mut found: Vec<(String, edgefleet_crds::replica::StatsBreach)> = stats
        .iter()
        .filter(|(device, _)| {
            recorded(device)
                .and_then(|d| d.status.as_ref().and_then(|s| s.gateway.clone()))
                .as_deref()
                == Some(me)
        })
        .filter_map(|(device, s)| {
            let key = s.model.as_deref()?;
            let m = model(key)?;
            let status = m.status.as_ref()?;
            let rev = status.current_revision.as_deref()?;
            if status.stable_revision.as_deref() == Some(rev) {
                return None;
            }
            // Counters of a model and revision the device does not report serving
            // count for nothing.
            let serving = states.get(device).is_some_and(|ms| {
                ms.iter().any(|l| {
                    l.model == key
                        && l.revision == rev
                        && l.state == edgefleet_crds::device::ModelState::Ready
                })
            });
            let gates = &m.spec.rollout.health_gates;
            (serving
                && crate::rollout::gates::stats_breach(device, s, key, rev, gates, now).is_some())
            .then(|| {
                (
                    key.to_owned(),
                    edgefleet_crds::replica::StatsBreach {
                        device: device.clone(),
                        stats: s.clone(),
                    },
                )
            })
        })
        .collect();
    found.sort_by(|a, b| (&a.0, &a.1.device).cmp(&(&b.0, &b.1.device)));
    let mut per_model: HashMap<String, usize> = HashMap::new();
    found
        .into_iter()
        .filter(|(key, _)| {
            let n = per_model.entry(key.clone()).or_default();
            *n += 1;
            *n <= MAX_BREACHES_PER_MODEL
        })
        .map(|(_, b)| b)
        .take(MAX_BREACHES)
        .collect()
}

/// Publishes this replica's pending reports ([`pending`]) in its EdgeGatewayReplica
/// when they change, and at least every third of `lease` (so the leader knows them
/// fresh), for as long as it runs.
pub async fn publish_loop(
    client: Client,
    namespace: String,
    identity: String,
    reported: crate::reported::Reported,
    devices: kube::runtime::reflector::Store<edgefleet_crds::EdgeDevice>,
    models: Option<kube::runtime::reflector::Store<edgefleet_crds::EdgeModel>>,
    lease: Duration,
) {
    let api: Api<edgefleet_crds::EdgeGatewayReplica> = Api::namespaced(client, &namespace);
    let name = lease_name(&identity);
    type Published = (
        Vec<edgefleet_crds::replica::PendingStates>,
        Vec<edgefleet_crds::replica::StatsBreach>,
    );
    let mut last: Option<Published> = None;
    let mut last_at = std::time::Instant::now();
    loop {
        let device = |n: &str| devices.get(&kube::runtime::reflector::ObjectRef::new(n));
        let reported_states = reported.snapshot();
        let states = pending(&reported_states, device, &identity);
        let breached = match &models {
            Some(models) => breaches(
                &reported.stats_snapshot(),
                &reported_states,
                device,
                |key| {
                    let (ns, name) = key.split_once('/')?;
                    models.get(&kube::runtime::reflector::ObjectRef::new(name).within(ns))
                },
                &identity,
                Timestamp::now(),
            ),
            None => Vec::new(),
        };
        let now = (states, breached);
        // Counters move with every heartbeat: a breach is published anew when which
        // devices breach changes, and its numbers at least every third of the lease
        // (well within what the gates take as fresh).
        let changed = last.as_ref().is_none_or(|(states, breached)| {
            *states != now.0
                || breached.len() != now.1.len()
                || breached
                    .iter()
                    .zip(&now.1)
                    .any(|(a, b)| a.device != b.device || a.stats.revision != b.stats.revision)
        });
        if changed || last_at.elapsed() >= lease / 3 {
            let body = json!({
                "apiVersion": "edgefleet.io/v1alpha1",
                "kind": "EdgeGatewayReplica",
                "metadata": {"name": name},
                "spec": {
                    "identity": identity,
                    "publishedTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(Timestamp::now()),
                    "pending": now.0,
                    "breaches": now.1,
                },
            });
            match api
                .patch(
                    &name,
                    &PatchParams::apply(PRESENCE_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await
            {
                Ok(_) => {
                    last = Some(now);
                    last_at = std::time::Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, "publishing this replica's pending reports"),
            }
        }
        tokio::time::sleep(PUBLISH_EVERY).await;
    }
}

/// Lays the pending reports other replicas published over `devices`' recorded model
/// states: each reported model replaces the device's entry of that model; and their
/// published statistics breaches over the recorded statistics, when fresher. Only a
/// publication of another replica than `me`, in the object named for its identity,
/// published within `lease` before `now` and not from the future (beyond
/// [`MAX_CLOCK_SKEW`]), and only for devices whose `status.gateway` names that replica
/// (a stale replica's word about a device that moved counts for nothing).
pub fn overlay_published(
    devices: &mut [edgefleet_crds::EdgeDevice],
    published: &[std::sync::Arc<edgefleet_crds::EdgeGatewayReplica>],
    me: Option<&str>,
    lease: Duration,
    now: Timestamp,
) {
    use kube::ResourceExt as _;
    let mut by_device: HashMap<&str, Vec<edgefleet_crds::device::LoadedModel>> = HashMap::new();
    let mut stats: HashMap<&str, &edgefleet_crds::device::InferenceStats> = HashMap::new();
    let mut from: HashMap<&str, &str> = HashMap::new();
    let skew = SignedDuration::try_from(MAX_CLOCK_SKEW).unwrap_or(SignedDuration::ZERO);
    for r in published {
        let identity = r.spec.identity.as_str();
        if Some(identity) == me
            || r.name_any() != lease_name(identity)
            || !alive(r.spec.published_time.0, lease, now)
            || r.spec.published_time.0 > now + skew
        {
            continue;
        }
        for g in &r.spec.pending {
            for d in &g.devices {
                from.insert(d.as_str(), identity);
                by_device.entry(d.as_str()).or_default().push(
                    edgefleet_crds::device::LoadedModel {
                        model: g.model.clone(),
                        revision: g.revision.clone(),
                        state: g.state,
                        message: None,
                        reason: g.reason.clone(),
                        load_millis: None,
                        golden: Vec::new(),
                    },
                );
            }
        }
        for b in &r.spec.breaches {
            from.insert(b.device.as_str(), identity);
            stats.insert(b.device.as_str(), &b.stats);
        }
    }
    if by_device.is_empty() && stats.is_empty() {
        return;
    }
    for d in devices {
        let name = d.name_any();
        let owner = d.status.as_ref().and_then(|s| s.gateway.as_deref());
        if owner.is_none() || owner != from.get(name.as_str()).copied() {
            continue;
        }
        if let Some(fresh) = stats.get(name.as_str()) {
            crate::reported::lay_stats_over(d, fresh);
        }
        let Some(models) = by_device.get(name.as_str()) else {
            continue;
        };
        let status = d.status.get_or_insert_with(Default::default);
        for m in models {
            status.models.retain(|r| r.model != m.model);
            status.models.push(m.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use edgefleet_crds::EdgeDevice;
    use edgefleet_crds::device::{LoadedModel, ModelState};
    use kube::ResourceExt as _;

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

    fn loaded(model: &str, rev: &str, state: ModelState) -> LoadedModel {
        LoadedModel {
            model: model.into(),
            revision: rev.into(),
            state,
            message: None,
            reason: None,
            load_millis: None,
            golden: Vec::new(),
        }
    }

    fn device(name: &str, gateway: Option<&str>, models: Vec<LoadedModel>) -> EdgeDevice {
        let mut d: EdgeDevice = serde_json::from_value(json!({
            "apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDevice",
            "metadata": {"name": name},
            "spec": {"facts": {"arch": "x86_64", "cpuCores": 1, "memory": "1Gi",
                "agentKeyFingerprint": format!("sha256:{}", "0".repeat(64))}},
        }))
        .unwrap();
        d.status = Some(edgefleet_crds::device::EdgeDeviceStatus {
            gateway: gateway.map(str::to_owned),
            models,
            ..Default::default()
        });
        d
    }

    #[test]
    fn a_replica_publishes_only_its_own_devices_unwritten_states_and_the_leader_lays_them_over() {
        let recorded: HashMap<String, std::sync::Arc<EdgeDevice>> = [
            device(
                "a",
                Some("op-2"),
                vec![loaded("ns/m", "r1", ModelState::Ready)],
            ),
            device(
                "b",
                Some("op-2"),
                vec![loaded("ns/m", "r2", ModelState::Ready)],
            ),
            device("c", Some("op-1"), vec![]),
            device("d", Some("op-2"), vec![]),
        ]
        .into_iter()
        .map(|d| (d.name_any(), std::sync::Arc::new(d)))
        .collect();
        let reported: HashMap<String, Vec<LoadedModel>> = [
            ("a", vec![loaded("ns/m", "r2", ModelState::Ready)]), // not written yet
            ("b", vec![loaded("ns/m", "r2", ModelState::Ready)]), // written
            ("c", vec![loaded("ns/m", "r2", ModelState::Ready)]), // moved to op-1
            ("d", vec![loaded("ns/m", "r2", ModelState::Ready)]), // not written yet
            ("gone", vec![loaded("ns/m", "r2", ModelState::Ready)]), // deleted
        ]
        .into_iter()
        .map(|(n, m)| (n.to_owned(), m))
        .collect();
        let p = pending(&reported, |n| recorded.get(n).cloned(), "op-2");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].revision.as_str(), p[0].state),
            ("r2", ModelState::Ready)
        );
        assert_eq!(p[0].devices, ["a", "d"]);

        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let lease = Duration::from_secs(30);
        let publication = |identity: &str, at: Timestamp| {
            std::sync::Arc::new(edgefleet_crds::EdgeGatewayReplica::new(
                &lease_name(identity),
                edgefleet_crds::EdgeGatewayReplicaSpec {
                    identity: identity.into(),
                    published_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(at),
                    pending: p.clone(),
                    breaches: Vec::new(),
                },
            ))
        };
        let models = |ds: &[EdgeDevice], n: &str| {
            ds.iter()
                .find(|d| d.name_any() == n)
                .unwrap()
                .status
                .as_ref()
                .unwrap()
                .models
                .clone()
        };
        let fresh = [publication("op-2", now)];
        let mut ds: Vec<EdgeDevice> = recorded.values().map(|d| (**d).clone()).collect();
        overlay_published(&mut ds, &fresh, Some("op-1"), lease, now);
        assert_eq!(models(&ds, "a"), [loaded("ns/m", "r2", ModelState::Ready)]);
        assert_eq!(models(&ds, "d"), [loaded("ns/m", "r2", ModelState::Ready)]);
        assert_eq!(models(&ds, "c"), []);
        // Its own publication, or a stale one (a replica that is gone), counts for nothing.
        let mut ds: Vec<EdgeDevice> = recorded.values().map(|d| (**d).clone()).collect();
        overlay_published(&mut ds, &fresh, Some("op-2"), lease, now);
        assert_eq!(models(&ds, "a"), [loaded("ns/m", "r1", ModelState::Ready)]);
        let stale = [publication("op-2", now - SignedDuration::from_secs(31))];
        overlay_published(&mut ds, &stale, Some("op-1"), lease, now);
        assert_eq!(models(&ds, "a"), [loaded("ns/m", "r1", ModelState::Ready)]);
        // Nor one from the future, nor one about devices another replica holds now.
        let future = [publication("op-2", now + SignedDuration::from_secs(60))];
        overlay_published(&mut ds, &future, Some("op-1"), lease, now);
        assert_eq!(models(&ds, "a"), [loaded("ns/m", "r1", ModelState::Ready)]);
        let mut moved: Vec<EdgeDevice> = recorded.values().map(|d| (**d).clone()).collect();
        for d in &mut moved {
            d.status.as_mut().unwrap().gateway = Some("op-3".into());
        }
        overlay_published(&mut moved, &fresh, Some("op-1"), lease, now);
        assert_eq!(
            models(&moved, "a"),
            [loaded("ns/m", "r1", ModelState::Ready)]
        );
    }

    #[test]
    fn a_replica_is_alive_until_its_lease_runs_out() {
        let t = Timestamp::from_second(1_700_000_000).unwrap();
        let d = Duration::from_secs(15);
        assert!(alive(t, d, t + SignedDuration::from_secs(15)));
        assert!(!alive(t, d, t + SignedDuration::from_secs(16)));
    }

    #[test]
    fn a_replica_publishes_its_own_devices_breaching_statistics_and_the_leader_judges_them() {
        use edgefleet_crds::device::InferenceStats;
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let at = |secs_ago: i64| {
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                now - SignedDuration::from_secs(secs_ago),
            ))
        };
        let stats = |rev: &str, requests: i64, errors: i64, age: i64| InferenceStats {
            model: Some("ns/m".into()),
            revision: Some(rev.into()),
            observed_time: at(age),
            tokens_per_second: 20.0,
            latency_p50_millis: None,
            latency_p99_millis: None,
            time_to_first_token_p95_millis: None,
            requests_total: requests,
            errors_total: errors,
        };
        let mut model: edgefleet_crds::EdgeModel = serde_json::from_value(json!({
            "apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {
                "servedName": "m",
                "artifact": {"uri": "https://x/m.gguf", "digest": format!("sha256:{}", "a".repeat(64))},
                "signature": {"inline": "{}"},
                "signers": [{"name": "s", "publicKey": "k"}],
                "selector": {"matchLabels": {"site": "a"}},
                "rollout": {"healthGates": {"maxErrorRatePercent": 5, "minRequests": 20}},
            },
        }))
        .unwrap();
        model.status = Some(edgefleet_crds::model::EdgeModelStatus {
            current_revision: Some("r2".into()),
            ..Default::default()
        });
        let model = std::sync::Arc::new(model);
        let recorded: HashMap<String, std::sync::Arc<EdgeDevice>> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|n| {
                let owner = if *n == "f" { "op-1" } else { "op-2" };
                (
                    n.to_string(),
                    std::sync::Arc::new(device(n, Some(owner), vec![])),
                )
            })
            .collect();
        let noted: HashMap<String, InferenceStats> = [
            ("a", stats("r2", 100, 50, 5)),    // breaches
            ("b", stats("r2", 100, 1, 5)),     // within the gate
            ("c", stats("r2", 10, 10, 5)),     // under minRequests
            ("d", stats("r1", 100, 100, 5)),   // the revision before
            ("e", stats("r2", 100, 100, 600)), // stale
            ("f", stats("r2", 100, 100, 5)),   // another replica's device
        ]
        .into_iter()
        .map(|(n, s)| (n.to_owned(), s))
        .collect();
        let ready = |rev: &str| {
            vec![LoadedModel {
                model: "ns/m".into(),
                revision: rev.into(),
                state: ModelState::Ready,
                message: None,
                reason: None,
                load_millis: None,
                golden: Vec::new(),
            }]
        };
        let mut states: HashMap<String, Vec<LoadedModel>> = ["a", "b", "c", "e", "f"]
            .iter()
            .map(|n| (n.to_string(), ready("r2")))
            .collect();
        states.insert("d".into(), ready("r1"));
        let found = breaches(
            &noted,
            &states,
            |n| recorded.get(n).cloned(),
            |key| (key == "ns/m").then(|| model.clone()),
            "op-2",
            now,
        );
        assert_eq!(
            found.iter().map(|b| b.device.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        // No model by that key: nothing to judge against.
        assert!(
            breaches(
                &noted,
                &states,
                |n| recorded.get(n).cloned(),
                |_| None,
                "op-2",
                now
            )
            .is_empty()
        );
        // A device whose counters name a revision it does not report serving: nothing.
        let mut not_serving = states.clone();
        not_serving.insert("a".into(), ready("r1"));
        assert!(
            breaches(
                &noted,
                &not_serving,
                |n| recorded.get(n).cloned(),
                |key| (key == "ns/m").then(|| model.clone()),
                "op-2",
                now
            )
            .is_empty()
        );
        // A completed revision is not judged.
        let mut done = (*model).clone();
        done.status.as_mut().unwrap().stable_revision = Some("r2".into());
        let done = std::sync::Arc::new(done);
        assert!(
            breaches(
                &noted,
                &states,
                |n| recorded.get(n).cloned(),
                |key| (key == "ns/m").then(|| done.clone()),
                "op-2",
                now
            )
            .is_empty()
        );

        // The leader lays a live publication's breach over the device's older recorded
        // statistics; a stale publication's, or one about a device another replica
        // holds, counts for nothing.
        let publication = |identity: &str, published: Timestamp, breaches| {
            std::sync::Arc::new(edgefleet_crds::EdgeGatewayReplica::new(
                &lease_name(identity),
                edgefleet_crds::EdgeGatewayReplicaSpec {
                    identity: identity.into(),
                    published_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                        published,
                    ),
                    pending: Vec::new(),
                    breaches,
                },
            ))
        };
        let lease = Duration::from_secs(30);
        let recorded_stats = |ds: &[EdgeDevice]| ds[0].status.as_ref().unwrap().inference.clone();
        let mut ds = vec![(*recorded["a"]).clone()];
        ds[0].status.as_mut().unwrap().inference = Some(stats("r2", 40, 0, 300));
        overlay_published(
            &mut ds,
            &[publication("op-2", now, found.clone())],
            Some("op-1"),
            lease,
            now,
        );
        assert_eq!(recorded_stats(&ds), Some(stats("r2", 100, 50, 5)));
        let mut ds = vec![(*recorded["a"]).clone()];
        ds[0].status.as_mut().unwrap().inference = Some(stats("r2", 40, 0, 300));
        let old = now - SignedDuration::from_secs(60);
        overlay_published(
            &mut ds,
            &[publication("op-2", old, found.clone())],
            Some("op-1"),
            lease,
            now,
        );
        assert_eq!(recorded_stats(&ds), Some(stats("r2", 40, 0, 300)));
        overlay_published(
            &mut ds,
            &[publication("op-3", now, found)],
            Some("op-1"),
            lease,
            now,
        );
        assert_eq!(recorded_stats(&ds), Some(stats("r2", 40, 0, 300)));
    }
}
