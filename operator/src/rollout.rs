//! The EdgeModel rollout, as a pure function: from an EdgeModel and the EdgeDevices,
//! which devices should run which revision, and the status that describes it. The
//! reconciler (`crate::edgemodel`) applies the result; everything here is unit-tested
//! without an API server.
//!
//! - **Revision**: a digest of everything the device runs (artifact, signature,
//!   variants, runtime settings, plugins, port). A spec change that alters it starts a
//!   new rollout at step 0.
//! - **Candidates**: devices the selector matches that are approved and `Attested`
//!   under the required policy with an unexpired, allowed result of an accepted evidence
//!   kind, and that have the memory the chosen variant needs. Devices that stop being
//!   candidates lose the assignment (this is how a failed or lapsed attestation revokes
//!   models). A candidate that is not `Ready` (its heartbeat lease ran out, for example
//!   behind a network partition) keeps what it has — it goes on serving locally — but
//!   is moved to nothing new until it is back.
//! - **Steps**: cumulative targets (count or percent of candidates). Devices move to the
//!   new revision in name order, at most `maxUnavailable` not-yet-ready at a time. A step
//!   is done when its devices are all `Ready` on the revision and within the health
//!   gates for its pause; then the next step starts. The last step makes the revision
//!   stable.
//! - **Gates**: a device that reports the revision `Failed`, is not `Ready` within
//!   `readyTimeoutSeconds` of the step's start, or reports an error rate or speed
//!   outside the gates fails the step: the rollout halts (`Degraded`) and devices on the
//!   new revision are moved back to the stable one when `rollbackOnFailure` is set.
//! - **Signature**: the bundle must verify against `spec.signers` and, for a single-file
//!   model, name the artifact's digest. Otherwise nothing moves to the new revision and
//!   `SignatureVerified` is False with reason `SignatureInvalid`.

use std::collections::BTreeMap;

use edgefleet_crds::SignatureSource;
use edgefleet_crds::device::{DesiredModel, ModelState};
use edgefleet_crds::model::{ModelVariant, RevisionTemplate, RolloutStep};
use edgefleet_crds::{EdgeDevice, EdgeModel, EdgeModelSpec, EdgeModelStatus, TrustedSigner};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use sha2::{Digest, Sha256};

use edgefleet_crds::conditions::{self as cond, reasons};

/// `namespace/name` of an EdgeModel: its key in device assignments and reports.
pub fn model_key(model: &EdgeModel) -> String {
    format!(
        "{}/{}",
        model.namespace().unwrap_or_default(),
        model.name_any()
    )
}

/// The revision of a spec: 16 hex digits of SHA-256 over what the device runs.
pub fn revision(spec: &EdgeModelSpec) -> String {
    let runs = serde_json::json!({
        "artifact": spec.artifact,
        "signature": spec.signature,
        "variants": spec.variants,
        "runtime": spec.runtime,
        "plugins": spec.plugins,
        "port": spec.port,
    });
    let digest = Sha256::digest(runs.to_string().as_bytes());
    hex::encode(&digest[..8])
}

/// Checks the signature bundle against the signers, and that it names the artifact.
/// `fetched` is the bundle fetched from `signature.uri` (or why it could not be); an
/// inline bundle is used as it is. `Err` carries the condition reason and message.
pub fn check_signature(
    spec: &EdgeModelSpec,
    fetched: Option<Result<&str, &str>>,
    now: std::time::SystemTime,
) -> Result<(), (&'static str, String)> {
    use edgefleet_trust::model_signing as ms;
    let inline = match (&spec.signature.inline, fetched) {
        (Some(inline), _) => inline.as_str(),
        (None, Some(Ok(fetched))) => fetched,
        (None, Some(Err(why))) => {
            return Err((
                reasons::SIGNATURE_NOT_FETCHED,
                format!("fetching signature.uri: {why}"),
            ));
        }
        (None, None) => {
            return Err((
                reasons::SIGNATURE_NOT_FETCHED,
                "signature.uri is not fetched (the operator has no bundle CA roots); give signature.inline".into(),
            ));
        }
    };
    let policy = trust_policy(&spec.signers).map_err(|e| (reasons::SIGNATURE_INVALID, e))?;
    let (_, _, predicate) = ms::verify_bundle(inline.as_bytes(), &policy, now)
        .map_err(|e| (reasons::SIGNATURE_INVALID, format!("{}: {e}", e.reason())))?;
    let want = spec
        .artifact
        .digest
        .strip_prefix("sha256:")
        .unwrap_or(&spec.artifact.digest);
    match predicate.resources.as_slice() {
        [r] if r.name == "." && r.algorithm == "sha256" && r.digest != want => {
            return Err((
                reasons::SIGNATURE_INVALID,
                format!(
                    "DigestMismatch: the bundle signs sha256:{} but artifact.digest is {}",
                    r.digest, spec.artifact.digest
                ),
            ));
        }
        // Directories and shards: the whole-file digest is checked on the device.
        _ => {}
    }
    Ok(())
}

fn trust_policy(
    signers: &[TrustedSigner],
) -> Result<edgefleet_trust::model_signing::TrustPolicy, String> {
    let signers = signers
        .iter()
        .map(|s| {
            edgefleet_trust::model_signing::TrustedSigner::from_pem(
                &s.name,
                s.public_key.as_deref(),
                s.certificate_root.as_deref(),
                s.identities.as_deref().unwrap_or_default(),
            )
        })
        .collect::<Result<_, _>>()?;
    Ok(edgefleet_trust::model_signing::TrustPolicy { signers })
}

/// What `spec` runs at revision `rev`, with every signature bundle resolved by
/// `resolve` (given a `signature.uri`; inline bundles are used as they are). `Err` names
/// the first bundle that is not available.
pub fn template(
    spec: &EdgeModelSpec,
    rev: &str,
    resolve: impl Fn(&str) -> Option<String>,
) -> Result<RevisionTemplate, String> {
    let inline = |what: &str, s: &SignatureSource| -> Result<SignatureSource, String> {
        let bundle = match (&s.inline, &s.uri) {
            (Some(b), _) => b.clone(),
            (None, Some(uri)) => resolve(uri)
                .ok_or_else(|| format!("the bundle of {what} ({uri}) is not fetched"))?,
            (None, None) => return Err(format!("{what} has no signature")),
        };
        Ok(SignatureSource {
            inline: Some(bundle),
            uri: None,
        })
    };
    let mut variants = Vec::new();
    for v in spec.variants.iter().flatten() {
        let mut v = v.clone();
        v.signature = inline(&format!("variant {}", v.name), &v.signature)?;
        variants.push(v);
    }
    let mut plugins = Vec::new();
    for p in spec.plugins.iter().flatten() {
        let mut p = p.clone();
        p.signature = inline(&format!("plugin {}", p.name), &p.signature)?;
        plugins.push(p);
    }
    Ok(RevisionTemplate {
        revision: rev.to_owned(),
        served_name: spec.served_name.clone(),
        artifact: spec.artifact.clone(),
        signature: inline("the model", &spec.signature)?,
        variants,
        signers: spec.signers.clone(),
        runtime: spec.runtime.clone(),
        plugins,
        port: spec.port,
    })
}

/// The templates to keep: `previous` with `current` added (or replaced), restricted to
/// the revisions in `keep`, in revision order.
pub fn keep_templates(
    previous: &[RevisionTemplate],
    current: Option<RevisionTemplate>,
    keep: &std::collections::BTreeSet<String>,
) -> Vec<RevisionTemplate> {
    let mut by_rev: BTreeMap<String, RevisionTemplate> = previous
        .iter()
        .map(|t| (t.revision.clone(), t.clone()))
        .collect();
    if let Some(t) = current {
        by_rev.insert(t.revision.clone(), t);
    }
    by_rev.retain(|r, _| keep.contains(r));
    by_rev.into_values().collect()
}

/// Bytes of a quantity such as `2Gi`, `512Mi`, `8G` or `1000`.
pub fn quantity_bytes(q: &Quantity) -> Option<u128> {
    let s = q.0.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: u128 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000u128.pow(2),
        "G" => 1000u128.pow(3),
        "T" => 1000u128.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    if let Ok(n) = num.parse::<u128>() {
        return n.checked_mul(mult);
    }
    let f: f64 = num.parse().ok()?;
    (f.is_finite() && f >= 0.0).then_some((f * mult as f64) as u128)
}

/// Why a device is not a candidate (for the status message and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Excluded {
    /// The selector does not match.
    NotSelected,
    /// Not approved.
    NotApproved,
    /// No allowed, unexpired attestation of an accepted kind under the policy.
    NotAttested(String),
    /// Too little memory for the model.
    TooLittleMemory,
}

/// Whether `device` has condition `kind` with status True.
pub fn condition_true(device: &EdgeDevice, kind: &str) -> bool {
    device
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == kind))
        .is_some_and(|c| c.status == "True")
}

/// The variant a device gets (`None`: the default artifact), or why it gets nothing.
pub fn candidate(
    spec: &EdgeModelSpec,
    selector: &Selector,
    device: &EdgeDevice,
    now: Timestamp,
) -> Result<Option<String>, Excluded> {
    if !selector.matches(device.labels()) {
        return Err(Excluded::NotSelected);
    }
    if !device.spec.approved {
        return Err(Excluded::NotApproved);
    }
    let attestation = device.status.as_ref().and_then(|s| s.attestation.as_ref());
    let Some(a) = attestation else {
        return Err(Excluded::NotAttested("no attestation".into()));
    };
    if !condition_true(device, cond::ATTESTED) || !a.allowed {
        return Err(Excluded::NotAttested("the policy did not allow it".into()));
    }
    if a.policy != spec.attestation.policy {
        return Err(Excluded::NotAttested(format!(
            "attested under policy {:?}, not {:?}",
            a.policy, spec.attestation.policy
        )));
    }
    if !spec.attestation.tee_kinds.contains(&a.tee_kind) {
        return Err(Excluded::NotAttested(format!(
            "evidence kind {:?} is not accepted",
            a.tee_kind
        )));
    }
    if a.expiry_time.0 <= now {
        return Err(Excluded::NotAttested("the attestation lapsed".into()));
    }
    let memory = quantity_bytes(&device.spec.facts.memory).unwrap_or(0);
    let fits = |v: &ModelVariant| quantity_bytes(&v.min_memory).is_some_and(|m| m <= memory);
    if let Some(v) = spec.variants.iter().flatten().find(|v| fits(v)) {
        return Ok(Some(v.name.clone()));
    }
    // The default artifact needs at least its own size in memory.
    let need = spec
        .artifact
        .size_bytes
        .map_or(0, |b| u128::try_from(b).unwrap_or(0));
    if memory < need {
        return Err(Excluded::TooLittleMemory);
    }
    Ok(None)
}

/// What a device reports for `model` at `revision`.
fn reported(device: &EdgeDevice, model: &str, revision: &str) -> Option<ModelState> {
    device
        .status
        .as_ref()?
        .models
        .iter()
        .find(|m| m.model == model && m.revision == revision)
        .map(|m| m.state)
}

fn assigned<'a>(device: &'a EdgeDevice, model: &str) -> Option<&'a DesiredModel> {
    device.spec.desired_models.iter().find(|d| d.model == model)
}

/// Cumulative device targets of the steps, for `n` candidates.
pub fn step_targets(steps: Option<&[RolloutStep]>, n: usize) -> Vec<usize> {
    let Some(steps) = steps.filter(|s| !s.is_empty()) else {
        return vec![n];
    };
    steps
        .iter()
        .map(|s| match (s.count, s.percent) {
            (Some(c), _) => usize::try_from(c).unwrap_or(0).min(n),
            (None, Some(p)) => (n * usize::try_from(p.clamp(0, 100)).unwrap_or(0)).div_ceil(100),
            (None, None) => n,
        })
        .collect()
}

/// `maxUnavailable` as a device count (at least 1, so a rollout can always move).
pub fn max_unavailable(v: Option<&IntOrString>, n: usize) -> usize {
    let m = match v {
        None => 1,
        Some(IntOrString::Int(i)) => usize::try_from(*i).unwrap_or(0),
        Some(IntOrString::String(s)) => s
            .strip_suffix('%')
            .and_then(|p| p.parse::<usize>().ok())
            .map_or(1, |p| (n * p.min(100)) / 100),
    };
    m.max(1)
}

/// The outcome of planning one EdgeModel.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// For each device whose assignment of this model must change: the new one (`None`
    /// removes it).
    pub assignments: BTreeMap<String, Option<DesiredModel>>,
    /// The status to write.
    pub status: EdgeModelStatus,
    /// Events to publish: (type `Normal`/`Warning`, reason, message).
    pub events: Vec<(&'static str, &'static str, String)>,
}

fn condition(
    kind: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_owned();
    // Keep lastTransitionTime while the status stays the same.
    let since = previous
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: kind.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Plans `model` over `devices` at `now`. `signature` is the result of
/// [`check_signature`] for the model's current spec.
pub fn plan(
    model: &EdgeModel,
    devices: &[EdgeDevice],
    signature: &Result<(), (&'static str, String)>,
    now: Timestamp,
) -> Plan {
    let key = model_key(model);
    let spec = &model.spec;
    let previous = model.status.clone().unwrap_or_default();
    let generation = model.metadata.generation;
    let rev = revision(spec);
    let mut events = Vec::new();
    let mut status = previous.clone();
    status.observed_generation = generation;

    let new_rollout = previous.current_revision.as_deref() != Some(rev.as_str());
    if new_rollout {
        status.current_revision = Some(rev.clone());
        status.current_step = Some(0);
        status.step_started_time = None;
        status.failed_revision = None;
        events.push((
            "Normal",
            cond::PROGRESSING,
            format!("rolling out revision {rev}"),
        ));
    }
    let stable = status.stable_revision.clone();
    let selector: Result<Selector, _> = spec.selector.clone().try_into();

    // Who may run the model at all, and which variant.
    let mut candidates: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut targeted = 0;
    let mut excluded: BTreeMap<String, Excluded> = BTreeMap::new();
    for d in devices {
        let result = match &selector {
            Ok(sel) => candidate(spec, sel, d, now),
            Err(_) => Err(Excluded::NotSelected),
        };
        match result {
            Ok(variant) => {
                targeted += 1;
                candidates.insert(d.name_any(), variant);
            }
            Err(e) => {
                if !matches!(e, Excluded::NotSelected) && d.spec.approved {
                    targeted += 1;
                }
                excluded.insert(d.name_any(), e);
            }
        }
    }
    let by_name: BTreeMap<String, &EdgeDevice> =
        devices.iter().map(|d| (d.name_any(), d)).collect();

    let mut assignments: BTreeMap<String, Option<DesiredModel>> = BTreeMap::new();
    let want = |assignments: &mut BTreeMap<String, Option<DesiredModel>>,
                name: &str,
                desired: Option<DesiredModel>| {
        let current = by_name.get(name).and_then(|d| assigned(d, &key)).cloned();
        if current != desired {
            assignments.insert(name.to_owned(), desired);
        }
    };
    // Revocation: devices that are no longer candidates lose the model.
    for (name, d) in &by_name {
        if !candidates.contains_key(name) && assigned(d, &key).is_some() {
            let why = excluded
                .get(name)
                .map_or_else(String::new, |e| format!("{e:?}"));
            events.push((
                "Warning",
                reasons::UNASSIGNED,
                format!("{name} no longer qualifies ({why}); model unassigned"),
            ));
            want(&mut assignments, name, None);
        }
    }

    let desired = |rev: &str, variant: &Option<String>| DesiredModel {
        model: key.clone(),
        revision: rev.to_owned(),
        variant: variant.clone(),
    };
    let on = |name: &str, r: &str| {
        by_name
            .get(name)
            .and_then(|d| assigned(d, &key))
            .is_some_and(|a| a.revision == r)
    };
    let state = |name: &str, r: &str| by_name.get(name).and_then(|d| reported(d, &key, r));
    let online = |name: &str| {
        by_name
            .get(name)
            .is_some_and(|d| condition_true(d, cond::READY))
    };

    let sig_ok = signature.is_ok();
    let failed_before = status.failed_revision.as_deref() == Some(rev.as_str());
    let n = candidates.len();
    let targets = step_targets(spec.rollout.steps.as_deref(), n);
    let last_step = targets.len().saturating_sub(1);
    let mut step = usize::try_from(status.current_step.unwrap_or(0))
        .unwrap_or(0)
        .min(last_step);
    let budget = max_unavailable(spec.rollout.max_unavailable.as_ref(), n);
    let gates = &spec.rollout.health_gates;

    // Devices already on the new revision, and their health.
    let updated: Vec<&String> = candidates.keys().filter(|n| on(n, &rev)).collect();
    let failed: Vec<&String> = updated
        .iter()
        .copied()
        .filter(|n| state(n, &rev) == Some(ModelState::Failed))
        .collect();
    let ready: Vec<&String> = updated
        .iter()
        .copied()
        .filter(|n| state(n, &rev) == Some(ModelState::Ready) && online(n))
        .collect();
    let gate_failure = gate_failure(
        &updated,
        &failed,
        &ready,
        &by_name,
        gates,
        status.step_started_time.as_ref(),
        now,
    );

    let phase;
    let (mut progressing, mut progressing_reason, mut progressing_msg) =
        (false, reasons::ROLLOUT_COMPLETE, String::new());
    let mut degraded: Option<String> = None;
    // Moves the devices on `rev` back to the stable revision; says whether any moved.
    let back_to_stable = |assignments: &mut BTreeMap<String, Option<DesiredModel>>| {
        let stable = stable.as_deref().filter(|s| *s != rev)?;
        for (name, variant) in &candidates {
            if on(name, &rev) {
                want(assignments, name, Some(desired(stable, variant)));
            }
        }
        Some(stable.to_owned())
    };

    if let Some(why) = gate_failure.filter(|_| sig_ok && !failed_before) {
        // A gate failed: halt, and move devices back to the stable revision.
        status.failed_revision = Some(rev.clone());
        events.push(("Warning", reasons::HEALTH_GATE_FAILED, why.clone()));
        degraded = Some(why);
        phase = "Degraded";
        if gates.rollback_on_failure
            && let Some(stable) = back_to_stable(&mut assignments)
        {
            events.push((
                "Warning",
                reasons::ROLLED_BACK,
                format!("rolled back to revision {stable}"),
            ));
        }
    } else if failed_before {
        // Keep the message that named the failure.
        let first = previous
            .conditions
            .iter()
            .find(|c| c.type_ == cond::DEGRADED && c.status == "True")
            .map(|c| c.message.clone());
        degraded = Some(first.unwrap_or_else(|| {
            format!("revision {rev} failed its health gates; change the spec to roll out again")
        }));
        phase = "Degraded";
        if gates.rollback_on_failure {
            back_to_stable(&mut assignments);
        }
    } else if !sig_ok {
        phase = "Failed";
        // Nothing moves to the unverified revision; devices keep the stable one.
        back_to_stable(&mut assignments);
    } else if n == 0 {
        phase = "Pending";
        progressing_reason = reasons::NO_DEVICES;
        progressing_msg = "no approved, ready and attested device matches the selector".into();
    } else {
        // Advance: is the current step done (all its devices ready, pause elapsed)?
        let target = targets[step];
        let step_done = ready.len() >= target && updated.len() >= target;
        if step_done {
            let started = status.step_started_time.clone().unwrap_or(Time(now));
            status.step_started_time = Some(started.clone());
            let pause = spec
                .rollout
                .steps
                .as_ref()
                .and_then(|s| s.get(step))
                .and_then(|s| s.pause_seconds)
                .unwrap_or(0);
            let elapsed = now.duration_since(started.0).as_secs();
            if step < last_step && elapsed >= i64::from(pause) && !spec.rollout.paused {
                step += 1;
                status.step_started_time = None;
                events.push((
                    "Normal",
                    cond::PROGRESSING,
                    format!(
                        "step {} reached ({} of {n} devices); starting step {}",
                        step,
                        targets[step - 1],
                        step + 1
                    ),
                ));
            }
        } else if status.step_started_time.is_none() && updated.len() >= target {
            status.step_started_time = Some(Time(now));
        }
        let target = targets[step];
        if spec.rollout.paused {
            phase = "Paused";
            progressing_reason = reasons::PAUSED;
            progressing_msg = format!("paused at step {} of {}", step + 1, targets.len());
        } else {
            // Move more devices, in name order, within the unavailability budget.
            let unavailable = updated.len() - ready.len();
            let mut room = budget.saturating_sub(unavailable);
            let mut moving = updated.len();
            for (name, variant) in &candidates {
                if moving >= target || room == 0 {
                    break;
                }
                if !on(name, &rev) && online(name) {
                    want(&mut assignments, name, Some(desired(&rev, variant)));
                    moving += 1;
                    room -= 1;
                    if status.step_started_time.is_none() {
                        status.step_started_time = Some(Time(now));
                    }
                }
            }
            let complete = step == last_step && ready.len() >= targets[last_step];
            if complete {
                phase = "Available";
                if stable.as_deref() != Some(rev.as_str()) {
                    status.stable_revision = Some(rev.clone());
                    events.push((
                        "Normal",
                        reasons::ROLLOUT_COMPLETE,
                        format!("revision {rev} is ready on {} devices", ready.len()),
                    ));
                }
            } else {
                phase = "Progressing";
                progressing = true;
                progressing_reason = reasons::ROLLING_OUT;
                progressing_msg = format!(
                    "step {} of {}: {} of {target} devices ready on revision {rev}",
                    step + 1,
                    targets.len(),
                    ready.len()
                );
            }
        }
        // Candidates outside the rollout's reach so far keep (or get) the stable revision.
        if let Some(stable) = status.stable_revision.clone() {
            for (name, variant) in &candidates {
                let on_any = by_name.get(name.as_str()).and_then(|d| assigned(d, &key));
                let moving_now = assignments
                    .get(name)
                    .is_some_and(|a| a.as_ref().is_some_and(|a| a.revision == rev));
                if on_any.is_none() && !moving_now && stable != rev && online(name) {
                    want(&mut assignments, name, Some(desired(&stable, variant)));
                }
            }
        }
    }
    status.current_step = Some(i32::try_from(step).unwrap_or(i32::MAX));

    // Counts, after this plan's assignments.
    let after = |name: &str| -> Option<String> {
        match assignments.get(name) {
            Some(a) => a.as_ref().map(|a| a.revision.clone()),
            None => by_name
                .get(name)
                .and_then(|d| assigned(d, &key))
                .map(|a| a.revision.clone()),
        }
    };
    let serving_rev = if phase == "Degraded" || phase == "Failed" {
        stable.clone().unwrap_or_else(|| rev.clone())
    } else {
        rev.clone()
    };
    let updated_n = candidates
        .keys()
        .filter(|n| after(n).as_deref() == Some(rev.as_str()))
        .count();
    let ready_n = candidates
        .keys()
        .filter(|n| {
            state(n, &serving_rev) == Some(ModelState::Ready)
                && online(n)
                && after(n).as_deref() == Some(serving_rev.as_str())
        })
        .count();
    let failed_n = candidates
        .keys()
        .filter(|n| state(n, &rev) == Some(ModelState::Failed))
        .count();
    status.devices.targeted = targeted;
    status.devices.attested = i32::try_from(n).unwrap_or(i32::MAX);
    status.devices.updated = i32::try_from(updated_n).unwrap_or(i32::MAX);
    status.devices.ready = i32::try_from(ready_n).unwrap_or(i32::MAX);
    status.devices.failed = i32::try_from(failed_n).unwrap_or(i32::MAX);
    status.ready_devices = Some(format!("{ready_n}/{targeted}"));
    status.phase = Some(phase.to_owned());

    let prev = &previous.conditions;
    let (sig_reason, sig_msg) = match signature {
        Ok(()) => (
            reasons::SIGNATURE_VALID,
            "the bundle verifies against spec.signers".to_owned(),
        ),
        Err((reason, msg)) => (*reason, msg.clone()),
    };
    if let Err((reason, msg)) = signature
        && prev
            .iter()
            .find(|c| c.type_ == cond::SIGNATURE_VERIFIED)
            .is_none_or(|c| c.status != "False" || c.message != *msg)
    {
        events.push(("Warning", reason, msg.clone()));
    }
    let available = targeted > 0 && i32::try_from(ready_n).is_ok_and(|r| r == targeted);
    status.conditions = vec![
        condition(
            cond::AVAILABLE,
            available,
            if phase == "Available" {
                reasons::ALL_DEVICES_READY
            } else {
                reasons::NOT_ALL_DEVICES_READY
            },
            format!("{ready_n} of {targeted} targeted devices ready"),
            generation,
            prev,
            now,
        ),
        condition(
            cond::PROGRESSING,
            progressing,
            progressing_reason,
            progressing_msg,
            generation,
            prev,
            now,
        ),
        condition(
            cond::DEGRADED,
            degraded.is_some(),
            if degraded.is_some() {
                reasons::HEALTH_GATE_FAILED
            } else {
                reasons::HEALTHY
            },
            degraded.unwrap_or_default(),
            generation,
            prev,
            now,
        ),
        condition(
            cond::SIGNATURE_VERIFIED,
            sig_ok,
            sig_reason,
            sig_msg,
            generation,
            prev,
            now,
        ),
    ];
    Plan {
        assignments,
        status,
        events,
    }
}

/// Why the devices on the new revision fail the gates, if they do.
fn gate_failure(
    updated: &[&String],
    failed: &[&String],
    ready: &[&String],
    by_name: &BTreeMap<String, &EdgeDevice>,
    gates: &edgefleet_crds::model::HealthGates,
    step_started: Option<&Time>,
    now: Timestamp,
) -> Option<String> {
    if let Some(name) = failed.first() {
        return Some(format!("{name} reported the revision Failed"));
    }
    if let Some(started) = step_started {
        let waited = now.duration_since(started.0).as_secs();
        if waited > i64::from(gates.ready_timeout_seconds)
            && let Some(slow) = updated.iter().find(|n| !ready.contains(n))
        {
            return Some(format!(
                "{slow} was not ready within {} s",
                gates.ready_timeout_seconds
            ));
        }
    }
    for name in ready {
        let Some(stats) = by_name
            .get(name.as_str())
            .and_then(|d| d.status.as_ref())
            .and_then(|s| s.inference.as_ref())
        else {
            continue;
        };
        if let Some(max) = gates.max_error_rate_percent
            && stats.requests_total > 0
        {
            let rate = stats.errors_total as f64 * 100.0 / stats.requests_total as f64;
            if rate > f64::from(max) {
                return Some(format!("{name} error rate {rate:.1}% is above {max}%"));
            }
        }
        if let Some(min) = gates.min_tokens_per_second
            && stats.requests_total > 0
            && stats.tokens_per_second < f64::from(min)
        {
            return Some(format!(
                "{name} generates {:.1} tokens/s, below {min}",
                stats.tokens_per_second
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn step(count: Option<i32>, percent: Option<i32>) -> RolloutStep {
        RolloutStep {
            count,
            percent,
            pause_seconds: None,
        }
    }

    #[test]
    fn step_targets_are_cumulative_and_capped() {
        assert_eq!(step_targets(None, 7), vec![7]);
        let steps = [
            step(Some(1), None),
            step(None, Some(50)),
            step(None, Some(100)),
        ];
        assert_eq!(step_targets(Some(&steps), 7), vec![1, 4, 7]);
        assert_eq!(step_targets(Some(&steps), 0), vec![0, 0, 0]);
        assert_eq!(step_targets(Some(&[step(Some(10), None)]), 3), vec![3]);
        // A percentage rounds up: 10% of 3 devices is one device, never none.
        assert_eq!(step_targets(Some(&[step(None, Some(10))]), 3), vec![1]);
    }

    #[test]
    fn max_unavailable_is_at_least_one() {
        assert_eq!(max_unavailable(None, 10), 1);
        assert_eq!(max_unavailable(Some(&IntOrString::Int(3)), 10), 3);
        assert_eq!(max_unavailable(Some(&IntOrString::Int(0)), 10), 1);
        assert_eq!(
            max_unavailable(Some(&IntOrString::String("25%".into())), 10),
            2
        );
        assert_eq!(
            max_unavailable(Some(&IntOrString::String("25%".into())), 2),
            1
        );
    }

    #[test]
    fn quantities_parse_to_bytes() {
        let q = |s: &str| quantity_bytes(&Quantity(s.into()));
        assert_eq!(q("8Gi"), Some(8 << 30));
        assert_eq!(q("512Mi"), Some(512 << 20));
        assert_eq!(q("2G"), Some(2_000_000_000));
        assert_eq!(q("1.5Gi"), Some(3 << 29));
        assert_eq!(q("1000"), Some(1000));
        assert_eq!(q("8 apples"), None);
        assert_eq!(q("Gi"), None);
    }

    #[test]
    fn revision_follows_what_the_device_runs() {
        let spec: EdgeModelSpec = serde_json::from_value(serde_json::json!({
            "servedName": "m",
            "artifact": {"uri": "https://x/m.gguf", "digest": format!("sha256:{}", "a".repeat(64))},
            "signature": {"inline": "{}"},
            "signers": [{"name": "s", "publicKey": "k"}],
        }))
        .unwrap();
        let base = revision(&spec);
        assert_eq!(base.len(), 16);
        let mut paused = spec.clone();
        paused.rollout.paused = true;
        assert_eq!(revision(&paused), base, "pausing is not a new revision");
        let mut bigger = spec.clone();
        bigger.runtime.context_size = 4096;
        assert_ne!(revision(&bigger), base);
        let mut other = spec;
        other.artifact.digest = format!("sha256:{}", "b".repeat(64));
        assert_ne!(revision(&other), base);
    }
}
