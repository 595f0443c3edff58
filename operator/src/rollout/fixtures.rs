//! Test fixtures for the rollout steps: EdgeDevices and a spec in the shapes the steps
//! read (conditions, attestation, assignment, reported state, serving statistics).

#![allow(clippy::unwrap_used)]

use edgefleet_crds::conditions as cond;
use edgefleet_crds::device::{
    AttestationSummary, EdgeDeviceStatus, InferenceStats, LoadedModel, ModelState,
};

use super::assign::Fleet;
use edgefleet_crds::{EdgeDevice, EdgeModelSpec, TeeKind};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// The model key the fixtures assign and report.
pub const KEY: &str = "ns/m";

/// A fixed "now".
pub fn now() -> Timestamp {
    Timestamp::from_second(1_700_000_000).unwrap()
}

/// `seconds` before [`now`].
pub fn ago(seconds: i64) -> Time {
    Time(now() - SignedDuration::from_secs(seconds))
}

/// A spec with `selector` (matchLabels) and the default attestation requirement.
pub fn spec(selector: serde_json::Value) -> EdgeModelSpec {
    serde_json::from_value(serde_json::json!({
        "servedName": "m",
        "artifact": {"uri": "https://x/m.gguf", "digest": format!("sha256:{}", "a".repeat(64))},
        "signature": {"inline": "{}"},
        "signers": [{"name": "s", "publicKey": "k"}],
        "selector": {"matchLabels": selector},
    }))
    .unwrap()
}

/// An approved device with 1 GiB of memory, labelled `site=a`, and no status.
pub fn device(name: &str) -> EdgeDevice {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDevice",
        "metadata": {"name": name, "labels": {"site": "a"}},
        "spec": {"approved": true, "facts": {"arch": "x86_64", "cpuCores": 1, "memory": "1Gi",
            "agentKeyFingerprint": format!("sha256:{}", "0".repeat(64))}},
    }))
    .unwrap()
}

fn status(d: &mut EdgeDevice) -> &mut EdgeDeviceStatus {
    d.status.get_or_insert_with(EdgeDeviceStatus::default)
}

/// `d` with condition `kind` True.
pub fn with_condition(mut d: EdgeDevice, kind: &str) -> EdgeDevice {
    status(&mut d).conditions.push(Condition {
        type_: kind.to_owned(),
        status: "True".into(),
        reason: "Test".into(),
        message: String::new(),
        observed_generation: None,
        last_transition_time: ago(1000),
    });
    d
}

/// `d`, `Ready`.
pub fn online(d: EdgeDevice) -> EdgeDevice {
    with_condition(d, cond::READY)
}

/// `d`, attested with TPM evidence under the default policy until an hour after
/// [`now`].
pub fn attested(d: EdgeDevice) -> EdgeDevice {
    let mut d = with_condition(d, cond::ATTESTED);
    status(&mut d).attestation = Some(AttestationSummary {
        tee_kind: TeeKind::Tpm,
        allowed: true,
        policy: "default".into(),
        policy_hash: "sha256:00".into(),
        measurements_digest: None,
        measurements: Default::default(),
        verified_time: ago(60),
        expiry_time: Time(now() + SignedDuration::from_secs(3600)),
        message: None,
        tpm_clock: None,
        lease_expiry_time: None,
        challenge_issued_millis: None,
        result: None,
        result_id: None,
    });
    d
}

/// The annotation [`on`] sets for [`fleet`].
const ON: &str = "test.edgefleet.io/on";

/// `d`, running [`KEY`] at revision `rev` before the plan (for [`fleet`]).
pub fn on(mut d: EdgeDevice, rev: &str) -> EdgeDevice {
    d.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(ON.into(), rev.into());
    d
}

/// `devices` as model [`KEY`] sees them, each running what [`on`] set.
pub fn fleet(devices: &[EdgeDevice]) -> Fleet<'_> {
    let before = devices
        .iter()
        .filter_map(|d| {
            let rev = d.metadata.annotations.as_ref()?.get(ON)?;
            Some((d.metadata.name.clone()?, rev.clone()))
        })
        .collect();
    Fleet::with(KEY, devices, Default::default(), before)
}

/// The `rolloutRank` that puts exactly the devices `on` (of model UID `uid`) below it
/// and the `off` ones above: panics when their ranks interleave (pick other names).
pub fn rank_between(uid: &str, on: &[&str], off: &[&str]) -> i64 {
    use edgefleet_crds::model::device_rank;
    let top = on
        .iter()
        .map(|n| device_rank(uid, n))
        .max()
        .map_or(0, |r| r + 1);
    let bottom = off.iter().map(|n| device_rank(uid, n)).min();
    assert!(
        bottom.is_none_or(|b| b >= top),
        "the ranks of {on:?} and {off:?} interleave; choose other names"
    );
    top
}

/// `d`, reporting [`KEY`] at revision `rev` in `state`.
pub fn reporting(mut d: EdgeDevice, rev: &str, state: ModelState) -> EdgeDevice {
    status(&mut d).models.push(LoadedModel {
        model: KEY.into(),
        revision: rev.into(),
        state,
        message: None,
        reason: None,
        load_millis: None,
        golden: Vec::new(),
    });
    d
}

/// `d`, reporting [`KEY`] at revision `rev` `Failed` with `reason`.
pub fn refusing(mut d: EdgeDevice, rev: &str, reason: &str) -> EdgeDevice {
    status(&mut d).models.push(LoadedModel {
        model: KEY.into(),
        revision: rev.into(),
        state: ModelState::Failed,
        message: Some(format!("{reason}: refused")),
        reason: Some(reason.into()),
        load_millis: None,
        golden: Vec::new(),
    });
    d
}

/// `d`, reporting `requests` requests of which `errors` failed, at `tokens_per_second`,
/// on the revision of [`KEY`] it reports, received 10 s before [`now`].
pub fn serving(d: EdgeDevice, tokens_per_second: f64, requests: i64, errors: i64) -> EdgeDevice {
    let rev = d
        .status
        .as_ref()
        .and_then(|s| s.models.iter().rev().find(|m| m.model == KEY))
        .map(|m| m.revision.clone())
        .unwrap_or_default();
    serving_as(d, &rev, 10, tokens_per_second, requests, errors)
}

/// `d` with serving statistics of [`KEY`] at revision `rev`, received `age` seconds
/// before [`now`].
pub fn serving_as(
    mut d: EdgeDevice,
    rev: &str,
    age: i64,
    tokens_per_second: f64,
    requests: i64,
    errors: i64,
) -> EdgeDevice {
    status(&mut d).inference = Some(InferenceStats {
        model: Some(KEY.into()),
        revision: Some(rev.into()),
        observed_time: Some(ago(age)),
        tokens_per_second,
        latency_p50_millis: None,
        latency_p99_millis: None,
        time_to_first_token_p95_millis: None,
        requests_total: requests,
        errors_total: errors,
    });
    d
}

/// `d`, its serving statistics ([`serving`]) reporting time to first token p95 `p95`.
pub fn first_token_p95(mut d: EdgeDevice, p95: Option<f64>) -> EdgeDevice {
    if let Some(i) = status(&mut d).inference.as_mut() {
        i.time_to_first_token_p95_millis = p95;
    }
    d
}

/// Plans `m` over `devices` at [`now`] with every device in a bound pool, nothing
/// withdrawn, and `signature` as the signature check.
pub fn plan_all_pools(
    m: &edgefleet_crds::EdgeModel,
    devices: &[EdgeDevice],
    signature: Result<(), (&'static str, String)>,
) -> super::Plan {
    let pools = [Default::default()];
    let withdrawn = std::collections::BTreeMap::new();
    super::plan(
        m,
        devices,
        &super::Trust {
            signature: &signature,
            pools: &pools,
            withdrawn: &withdrawn,
        },
        now(),
    )
}
