//! Health gates: how the devices on the new revision do on it ([`Health`]), and
//! whether that fails the step ([`gate_failure`]): a device reported the revision
//! `Failed` (online or not: the report is about the revision), an online device was not
//! `Ready` on it within `readyTimeoutSeconds` of the step's start (or of its return
//! online, if later), or a ready device reports an error rate or speed outside the
//! gates ([`stats_breach`]: only statistics of the revision, fresh, and over
//! `minRequests`). A device that is offline (its heartbeat lease ran out) is not waited
//! for.

use std::collections::BTreeMap;

use edgefleet_crds::device::{InferenceStats, ModelState};
use edgefleet_crds::model::HealthGates;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::assign::Fleet;

/// The candidates assigned the new revision, and their health on it (names in name
/// order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health<'a> {
    /// Candidates assigned the revision.
    pub updated: Vec<&'a String>,
    /// Of those, the ones that report it `Failed`.
    pub failed: Vec<&'a String>,
    /// Of those, the ones that report it `Ready` and are `Ready` themselves.
    pub ready: Vec<&'a String>,
    /// Of those on it, the ones that are not `Ready` themselves (offline).
    pub offline: Vec<&'a String>,
}

/// The health of the `candidates` on revision `rev`.
pub fn health<'a>(
    fleet: &Fleet<'_>,
    candidates: &'a BTreeMap<String, Option<String>>,
    rev: &str,
) -> Health<'a> {
    let updated: Vec<&String> = candidates.keys().filter(|n| fleet.on(n, rev)).collect();
    let failed: Vec<&String> = updated
        .iter()
        .copied()
        .filter(|n| fleet.state(n, rev) == Some(ModelState::Failed))
        .collect();
    let ready: Vec<&String> = updated
        .iter()
        .copied()
        .filter(|n| fleet.state(n, rev) == Some(ModelState::Ready) && fleet.online(n))
        .collect();
    let offline: Vec<&String> = updated
        .iter()
        .copied()
        .filter(|n| !fleet.online(n))
        .collect();
    Health {
        updated,
        failed,
        ready,
        offline,
    }
}

/// How old serving statistics may be for the rate gates to judge them. A device
/// reports every heartbeat interval (at most 30 s); its gateway replica holds its latest
/// statistics in memory and publishes a breaching device's within a second
/// ([`crate::replicas`]), so a device that serves is judged on statistics well within
/// this. Recorded `status.inference`, refreshed within a fleet-wide write budget, counts
/// only while this fresh.
pub const STATS_MAX_AGE_SECONDS: i64 = 120;

/// How far ahead of the judge's clock statistics may be stamped (by another replica)
/// and still count.
pub const MAX_CLOCK_SKEW_SECONDS: i64 = 5;

/// Whether `stats`, reported by device `name`, breach the rate gates for revision `rev`
/// of model `key`, and why. Judged only when they count that revision, were observed
/// within [`STATS_MAX_AGE_SECONDS`] of `now` (and not ahead of it), and count at least
/// `minRequests` requests; otherwise they say nothing.
pub fn stats_breach(
    name: &str,
    stats: &InferenceStats,
    key: &str,
    rev: &str,
    gates: &HealthGates,
    now: Timestamp,
) -> Option<String> {
    if !judgeable(stats, key, rev, gates, now) {
        return None;
    }
    if let Some(max) = gates.max_error_rate_percent {
        let rate = stats.errors_total as f64 * 100.0 / stats.requests_total as f64;
        if rate > f64::from(max) {
            return Some(format!(
                "{name} error rate {rate:.1}% is above {max}% ({} of {} requests)",
                stats.errors_total, stats.requests_total
            ));
        }
    }
    if let Some(min) = gates.min_tokens_per_second
        && stats.tokens_per_second < f64::from(min)
    {
        return Some(format!(
            "{name} generates {:.1} tokens/s, below {min}",
            stats.tokens_per_second
        ));
    }
    if let Some(max) = gates.max_time_to_first_token_millis_p95 {
        match stats.time_to_first_token_p95_millis {
            Some(p95) if p95 > f64::from(max) => {
                return Some(format!(
                    "{name} time to first token p95 {p95:.0} ms is above {max} ms"
                ));
            }
            Some(_) => {}
            // Served enough to judge and says nothing of it (an agent too old to
            // measure it): the gate was asked for, so it is not passed.
            None => {
                return Some(format!(
                    "{name} reports no time to first token over {} requests",
                    stats.requests_total
                ));
            }
        }
    }
    None
}

/// Whether any rate gate (judged on a device's serving statistics) is set.
fn rate_gates(gates: &HealthGates) -> bool {
    gates.max_error_rate_percent.is_some()
        || gates.min_tokens_per_second.is_some()
        || gates.max_time_to_first_token_millis_p95.is_some()
}

/// Whether the rate gates are set and `stats` are enough to judge revision `rev` of
/// model `key` on ([`stats_breach`]): of that revision, fresh, and over `minRequests`.
pub fn judgeable(
    stats: &InferenceStats,
    key: &str,
    rev: &str,
    gates: &HealthGates,
    now: Timestamp,
) -> bool {
    if !rate_gates(gates) {
        return false;
    }
    if stats.model.as_deref() != Some(key) || stats.revision.as_deref() != Some(rev) {
        return false;
    }
    let Some(observed) = stats.observed_time.as_ref().map(|t| t.0) else {
        return false;
    };
    let age = now.duration_since(observed).as_secs();
    // Another replica's clock may be a little ahead of this one's.
    (-MAX_CLOCK_SKEW_SECONDS..=STATS_MAX_AGE_SECONDS).contains(&age)
        && stats.requests_total >= i64::from(gates.min_requests.max(1))
}

/// Whether every device in `ready` has statistics the rate gates can judge (vacuously
/// true without rate gates): the evidence a failed revision needs before it resumes.
pub fn all_judgeable(
    ready: &[&String],
    fleet: &Fleet<'_>,
    gates: &HealthGates,
    rev: &str,
    now: Timestamp,
) -> bool {
    if !rate_gates(gates) {
        return true;
    }
    ready.iter().all(|name| {
        fleet
            .device(name.as_str())
            .and_then(|d| d.status.as_ref())
            .and_then(|s| s.inference.as_ref())
            .is_some_and(|s| judgeable(s, fleet.key(), rev, gates, now))
    })
}

/// Why the devices on the new revision fail the gates, if they do. `step_started` is
/// when the current step started (its ready timeout runs from then).
pub fn gate_failure(
    health: &Health<'_>,
    fleet: &Fleet<'_>,
    gates: &HealthGates,
    rev: &str,
    step_started: Option<&Time>,
    now: Timestamp,
) -> Option<String> {
    let Health {
        updated,
        failed,
        ready,
        offline,
    } = health;
    if let Some(name) = failed.first() {
        // With its named reason, when it gave one (a golden prompt's mismatch, a
        // failed load, a bad signature).
        let reason = fleet
            .report(name, rev)
            .and_then(|m| m.reason.as_deref())
            .map(|r| format!(" ({})", r.chars().take(63).collect::<String>()))
            .unwrap_or_default();
        return Some(format!("{name} reported the revision Failed{reason}"));
    }
    if let Some(started) = step_started {
        // Each online device's clock runs from the step's start, or from when it came
        // back online if that is later: a device that returns from an outage late in a
        // step gets the whole timeout to load.
        let timeout = i64::from(gates.ready_timeout_seconds);
        let slow = updated.iter().find(|n| {
            if ready.contains(n) || offline.contains(n) {
                return false;
            }
            let since = fleet
                .online_since(n)
                .map_or(started.0, |t| t.max(started.0));
            now.duration_since(since).as_secs() > timeout
        });
        if let Some(slow) = slow {
            return Some(format!(
                "{slow} was not ready within {} s",
                gates.ready_timeout_seconds
            ));
        }
    }
    for name in ready {
        let stats = fleet
            .device(name.as_str())
            .and_then(|d| d.status.as_ref())
            .and_then(|s| s.inference.as_ref());
        if let Some(why) = stats.and_then(|s| stats_breach(name, s, fleet.key(), rev, gates, now)) {
            return Some(why);
        }
    }
    None
}

/// How the candidates reporting `rev` `Ready` (and online) answered its golden prompts
/// (`names`, in the spec's order): distinct answers per prompt, overall and per kind
/// of hardware (CPU architecture, attested TEE kind, variant), and the first prompt
/// that devices of one kind answered differently, named (judged over every kind; the
/// list for status keeps at most 32 kinds per prompt). What a device reports is
/// bounded by the gateway; one answer per prompt and device counts.
pub fn golden_consistency(
    health: &Health<'_>,
    fleet: &Fleet<'_>,
    candidates: &BTreeMap<String, Option<String>>,
    rev: &str,
    names: &[String],
) -> (
    Vec<edgefleet_crds::model::GoldenConsistency>,
    Option<String>,
) {
    use std::collections::BTreeSet;
    type Kind = (String, String, String);
    let mut by_prompt: BTreeMap<&str, BTreeMap<Kind, (i32, BTreeSet<&str>)>> = BTreeMap::new();
    for name in &health.ready {
        let Some(report) = fleet.report(name, rev) else {
            continue;
        };
        let Some(device) = fleet.device(name) else {
            continue;
        };
        let arch: String = device.spec.facts.arch.chars().take(64).collect();
        let tee = device
            .status
            .as_ref()
            .and_then(|s| s.attestation.as_ref())
            .and_then(|a| serde_json::to_value(a.tee_kind).ok())
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let variant = candidates.get(*name).cloned().flatten().unwrap_or_default();
        let mut answered = BTreeSet::new();
        for answer in &report.golden {
            if !answered.insert(answer.name.as_str()) {
                continue;
            }
            if let Some(prompt) = names.iter().find(|n| **n == answer.name) {
                let kind = by_prompt
                    .entry(prompt.as_str())
                    .or_default()
                    .entry((arch.clone(), tee.clone(), variant.clone()))
                    .or_default();
                kind.0 += 1;
                kind.1.insert(answer.digest.as_str());
            }
        }
    }
    let disagreement = names.iter().find_map(|prompt| {
        let ((arch, tee, variant), (devices, digests)) = by_prompt
            .get(prompt.as_str())?
            .iter()
            .find(|(_, (_, d))| d.len() > 1)?;
        let variant = if variant.is_empty() {
            String::new()
        } else {
            format!(", variant {variant}")
        };
        Some(format!(
            "golden prompt {prompt}: {devices} devices of one kind ({arch} {tee}{variant}) gave {} different answers",
            digests.len()
        ))
    });
    let listed = names
        .iter()
        .filter_map(|prompt| {
            let kinds = by_prompt.get(prompt.as_str())?;
            let all: BTreeSet<&str> = kinds
                .values()
                .flat_map(|(_, d)| d.iter().copied())
                .collect();
            Some(edgefleet_crds::model::GoldenConsistency {
                name: prompt.clone(),
                distinct_answers: i32::try_from(all.len()).unwrap_or(i32::MAX),
                kinds: kinds
                    .iter()
                    .take(32)
                    .map(|((arch, tee, variant), (devices, digests))| {
                        edgefleet_crds::model::GoldenKind {
                            arch: arch.clone(),
                            tee: tee.clone(),
                            variant: variant.clone(),
                            devices: *devices,
                            distinct_answers: i32::try_from(digests.len()).unwrap_or(i32::MAX),
                        }
                    })
                    .collect(),
            })
        })
        .collect();
    (listed, disagreement)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::fixtures::{
        ago, device, first_token_p95, fleet, now, on, online, reporting, serving, serving_as,
    };
    use edgefleet_crds::EdgeDevice;

    const REV: &str = "r2";

    fn candidates(devices: &[EdgeDevice]) -> BTreeMap<String, Option<String>> {
        devices
            .iter()
            .map(|d| (d.metadata.name.clone().unwrap_or_default(), None))
            .collect()
    }

    fn judge(devices: &[EdgeDevice], gates: &HealthGates, started: Option<Time>) -> Option<String> {
        let fleet = fleet(devices);
        let candidates = candidates(devices);
        let health = health(&fleet, &candidates, REV);
        gate_failure(&health, &fleet, gates, REV, started.as_ref(), now())
    }

    #[test]
    fn health_counts_only_ready_devices_that_are_online() {
        let devices = [
            online(reporting(on(device("a"), REV), REV, ModelState::Ready)),
            reporting(on(device("b"), REV), REV, ModelState::Ready),
            online(reporting(on(device("c"), REV), REV, ModelState::Failed)),
            online(reporting(on(device("d"), "r1"), "r1", ModelState::Ready)),
        ];
        let fleet = fleet(&devices);
        let candidates = candidates(&devices);
        let h = health(&fleet, &candidates, REV);
        let names = |v: &[&String]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&h.updated), ["a", "b", "c"]);
        assert_eq!(names(&h.failed), ["c"]);
        assert_eq!(names(&h.ready), ["a"]);
        assert_eq!(names(&h.offline), ["b"]);
    }

    #[test]
    fn a_failed_report_fails_the_gate_before_anything_else() {
        let gates = HealthGates {
            max_error_rate_percent: Some(1),
            ..HealthGates::default()
        };
        let devices = [
            online(serving(
                reporting(on(device("a"), REV), REV, ModelState::Ready),
                50.0,
                100,
                50,
            )),
            online(reporting(on(device("b"), REV), REV, ModelState::Failed)),
        ];
        assert_eq!(
            judge(&devices, &gates, Some(ago(10_000))).as_deref(),
            Some("b reported the revision Failed")
        );
    }

    #[test]
    fn a_device_not_ready_fails_only_after_the_ready_timeout() {
        let gates = HealthGates::default();
        let devices = [
            online(reporting(on(device("a"), REV), REV, ModelState::Ready)),
            online(reporting(on(device("b"), REV), REV, ModelState::Loading)),
        ];
        let timeout = i64::from(gates.ready_timeout_seconds);
        assert_eq!(judge(&devices, &gates, None), None);
        assert_eq!(judge(&devices, &gates, Some(ago(timeout))), None);
        assert_eq!(
            judge(&devices, &gates, Some(ago(timeout + 1))).as_deref(),
            Some("b was not ready within 600 s")
        );
        // Offline (lost power, say): not ready, but not failing either.
        let devices = [
            online(reporting(on(device("a"), REV), REV, ModelState::Ready)),
            reporting(on(device("b"), REV), REV, ModelState::Loading),
            on(device("c"), REV),
        ];
        assert_eq!(judge(&devices, &gates, Some(ago(timeout * 10))), None);
        // Back online a minute ago, long after the step started: its clock runs from
        // its return.
        let mut back = online(reporting(on(device("b"), REV), REV, ModelState::Loading));
        back.status.as_mut().unwrap().conditions[0].last_transition_time = ago(60);
        let devices = [back.clone()];
        assert_eq!(judge(&devices, &gates, Some(ago(timeout * 10))), None);
        back.status.as_mut().unwrap().conditions[0].last_transition_time = ago(timeout + 1);
        assert_eq!(
            judge(&[back], &gates, Some(ago(timeout * 10))).as_deref(),
            Some("b was not ready within 600 s")
        );
    }

    #[test]
    fn error_rate_and_speed_are_judged_on_ready_devices_that_served() {
        let gates = HealthGates {
            max_error_rate_percent: Some(5),
            min_tokens_per_second: Some(10),
            ..HealthGates::default()
        };
        let ready = |name: &str| online(reporting(on(device(name), REV), REV, ModelState::Ready));
        // Within the gates, or nothing served yet.
        let fine = [
            serving(ready("a"), 20.0, 100, 5),
            serving(ready("b"), 0.0, 0, 0),
        ];
        assert_eq!(judge(&fine, &gates, None), None);
        let erring = [serving(ready("a"), 20.0, 100, 6)];
        assert_eq!(
            judge(&erring, &gates, None).as_deref(),
            Some("a error rate 6.0% is above 5% (6 of 100 requests)")
        );
        let slow = [serving(ready("a"), 9.5, 100, 0)];
        assert_eq!(
            judge(&slow, &gates, None).as_deref(),
            Some("a generates 9.5 tokens/s, below 10")
        );
        // A device that is not ready on the revision is not judged by its statistics.
        let offline = [serving(
            reporting(on(device("a"), REV), REV, ModelState::Ready),
            1.0,
            100,
            90,
        )];
        assert_eq!(judge(&offline, &gates, None), None);
    }

    #[test]
    fn time_to_first_token_p95_is_judged_and_never_skipped() {
        let gates = HealthGates {
            max_time_to_first_token_millis_p95: Some(500),
            min_requests: 20,
            ..HealthGates::default()
        };
        let ready = |name: &str| online(reporting(on(device(name), REV), REV, ModelState::Ready));
        let with = |p95: Option<f64>, requests: i64| {
            first_token_p95(serving(ready("a"), 20.0, requests, 0), p95)
        };
        assert_eq!(judge(&[with(Some(500.0), 20)], &gates, None), None);
        assert_eq!(
            judge(&[with(Some(750.0), 20)], &gates, None).as_deref(),
            Some("a time to first token p95 750 ms is above 500 ms")
        );
        // Enough served and no measurement (an older agent, or a value the gateway
        // refused as nonsense): the gate asked for is failed, not skipped.
        assert_eq!(
            judge(&[with(None, 20)], &gates, None).as_deref(),
            Some("a reports no time to first token over 20 requests")
        );
        // Under minRequests nothing is judged, slow or silent.
        assert_eq!(judge(&[with(Some(9_000.0), 19)], &gates, None), None);
        assert_eq!(judge(&[with(None, 19)], &gates, None), None);
        // The gate alone makes the statistics the evidence a resume waits for.
        let name = "a".to_owned();
        let few = [with(Some(100.0), 19)];
        assert!(!all_judgeable(&[&name], &fleet(&few), &gates, REV, now()));
        let enough = [with(Some(100.0), 20)];
        assert!(all_judgeable(&[&name], &fleet(&enough), &gates, REV, now()));
    }

    #[test]
    fn rate_gates_judge_only_fresh_statistics_of_the_revision_over_min_requests() {
        let gates = HealthGates {
            max_error_rate_percent: Some(5),
            min_tokens_per_second: Some(10),
            min_requests: 20,
            ..HealthGates::default()
        };
        let ready = || online(reporting(on(device("a"), REV), REV, ModelState::Ready));
        let verdict = |d: EdgeDevice| judge(&[d], &gates, None);
        // Fresh, of this revision, enough requests: judged.
        assert_eq!(
            verdict(serving_as(ready(), REV, 10, 20.0, 20, 2)).as_deref(),
            Some("a error rate 10.0% is above 5% (2 of 20 requests)")
        );
        assert_eq!(
            verdict(serving_as(ready(), REV, STATS_MAX_AGE_SECONDS, 5.0, 20, 0)).as_deref(),
            Some("a generates 5.0 tokens/s, below 10")
        );
        // One early failure is not a rate: under minRequests, nothing is judged.
        assert_eq!(verdict(serving_as(ready(), REV, 10, 20.0, 19, 19)), None);
        // Counters of the revision before (not yet replaced after the switch) say
        // nothing about this one.
        assert_eq!(verdict(serving_as(ready(), "r1", 10, 1.0, 100, 100)), None);
        // Nor do counters of another model, untagged ones, stale ones, or ones from
        // the future.
        let mut other = serving_as(ready(), REV, 10, 1.0, 100, 100);
        other
            .status
            .as_mut()
            .unwrap()
            .inference
            .as_mut()
            .unwrap()
            .model = Some("ns/other".into());
        assert_eq!(verdict(other), None);
        let mut untagged = serving_as(ready(), REV, 10, 1.0, 100, 100);
        untagged
            .status
            .as_mut()
            .unwrap()
            .inference
            .as_mut()
            .unwrap()
            .revision = None;
        assert_eq!(verdict(untagged), None);
        assert_eq!(
            verdict(serving_as(
                ready(),
                REV,
                STATS_MAX_AGE_SECONDS + 1,
                1.0,
                100,
                100
            )),
            None
        );
        assert_eq!(
            verdict(serving_as(
                ready(),
                REV,
                -MAX_CLOCK_SKEW_SECONDS - 1,
                1.0,
                100,
                100
            )),
            None
        );
        // A replica's clock a little ahead is no reason to ignore them.
        assert!(
            verdict(serving_as(
                ready(),
                REV,
                -MAX_CLOCK_SKEW_SECONDS,
                1.0,
                100,
                100
            ))
            .is_some()
        );
        // With no rate gate set, nothing is judged at all.
        assert_eq!(
            judge(
                &[serving_as(ready(), REV, 10, 1.0, 100, 100)],
                &HealthGates::default(),
                None
            ),
            None
        );
    }
}
