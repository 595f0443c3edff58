//! The EdgeModel rollout, as a pure function: from an EdgeModel and the EdgeDevices,
//! where the rollout stands and the status that describes it. The reconciler
//! (`crate::edgemodel`) writes the result; everything here is unit-tested without an
//! API server.
//!
//! - **Derived assignment** ([`assign`]): nothing is written per device. Each device
//!   has a stable rank for the model (a hash of the model's UID and the device's name);
//!   a candidate runs `currentRevision` when its rank is below `status.rolloutRank`,
//!   `stableRevision` otherwise. The gateway derives every device's desired state the
//!   same way, so an advance, a rollback or a revocation is one EdgeModel status write
//!   whatever the fleet's size, and a device that joins or leaves never changes another
//!   device's revision.
//! - **Revision**: a digest of everything the device runs (artifact, signature,
//!   variants, runtime settings, plugins, port). A spec change that alters it starts a
//!   new rollout at step 0 with `rolloutRank` 0 (devices on an unfinished earlier
//!   revision go back to the stable one).
//! - **Candidates**: devices the selector matches that are approved and `Attested`
//!   under the required policy with an unexpired, allowed result of an accepted evidence
//!   kind, and that have the memory the chosen variant needs. A device that stops being
//!   a candidate derives nothing (this is how a failed or lapsed attestation revokes
//!   models).
//! - **Steps**: cumulative targets (count or percent of the online candidates). The
//!   rank moves over devices in rank order, at most `maxUnavailable` online devices
//!   updating at a time. A device that is offline (not `Ready`: its heartbeat lease ran
//!   out) neither counts toward a step nor uses the budget nor fails a gate; the rank
//!   passes it, and it gets the revision when it comes back. A step is done when its
//!   online devices are `Ready` on the revision and within the health gates for its
//!   pause; then the next step starts. The last step makes the revision stable.
//! - **Gates**: an online device that reports the revision `Failed`, is not `Ready`
//!   within `readyTimeoutSeconds` of the step's start, or reports an error rate or
//!   speed outside the gates fails the step: the rollout halts (`Degraded`) and, when
//!   `rollbackOnFailure` is set, the rank goes back to 0 (every device on the stable
//!   revision). Once the revision is stable, gates are no longer judged: a device's
//!   trouble is counted, never a rollback.
//! - **Signature**: `spec.signers` must resolve under the trust policies (reason
//!   `UntrustedSigner` otherwise), and the bundle must verify against the resolved
//!   signers and, for a single-file model, name the artifact's digest. Otherwise the
//!   rank is 0 and `SignatureVerified` is False with the reason.
//! - **Trust boundary** ([`trust`]): only devices in a pool bound to the model's
//!   namespace are candidates; a withdrawn revision (its signers no longer granted)
//!   loses its template, so its devices derive a stable revision that holds, or
//!   nothing; a device's local refusal of the current revision excludes it alone,
//!   counted, never a gate failure.
//!
//! [`plan`] composes named steps, each a pure function in a module of its own:
//! [`select`] the candidates, judge the [`gates`], reach a [`advance::verdict`] and
//! advance the step ([`advance`]), move the rank ([`assign::advance_rank`]), and
//! [`report`] the counts and conditions. [`revision`](mod@revision) holds what a
//! revision is: its digest, signature check and template.

pub mod advance;
pub mod assign;
#[cfg(test)]
mod fixtures;
pub mod gates;
pub mod report;
pub mod revision;
pub mod select;
#[cfg(test)]
mod table;
pub mod trust;

use edgefleet_crds::conditions::{self as cond, Status, reasons};
use edgefleet_crds::{EdgeDevice, EdgeModel, EdgeModelStatus, ModelPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::events::EventType;

pub use advance::{max_unavailable, step_targets};
pub use assign::Position;
pub use revision::verify_template;
pub use revision::{check_signature, keep_templates, revision, template};
pub use select::{Excluded, candidate, condition_true, quantity_bytes};
pub use trust::Trust;

use advance::{Outcome, Progress, StepState, Verdict};
use assign::Fleet;
use edgefleet_crds::model::RANK_ALL;

/// `namespace/name` of an EdgeModel: its key in device assignments and reports.
pub fn model_key(model: &EdgeModel) -> String {
    format!(
        "{}/{}",
        model.namespace().unwrap_or_default(),
        model.name_any()
    )
}

/// An event to publish: its type, reason and message.
pub type Event = (EventType, &'static str, String);

/// The outcome of planning one EdgeModel: the status to write (it holds the rollout
/// position every device derives its revision from), and the events.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The status to write.
    pub status: EdgeModelStatus,
    /// Events to publish, in order.
    pub events: Vec<Event>,
}

/// The revision `device` derives from `status` of the model with UID `uid`, when it is
/// a candidate (templates not considered: [`EdgeModelStatus::revision_for`] adds them).
pub fn revision_after(status: &EdgeModelStatus, uid: &str, device: &str) -> Option<String> {
    edgefleet_crds::model::derived_revision(
        status.current_revision.as_deref(),
        status.stable_revision.as_deref(),
        status.rollout_rank,
        edgefleet_crds::model::device_rank(uid, device),
    )
    .map(str::to_owned)
}

/// What `device` runs of `model` now: nothing unless it is a candidate (`pools`: the
/// selectors of the device pools bound to the model's namespace) and the model is not
/// being deleted; else the revision it derives from the model's status (one whose
/// template the status holds), with its variant. The gateway serves this.
pub fn desired(
    model: &EdgeModel,
    device: &EdgeDevice,
    pools: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector],
    now: Timestamp,
) -> Option<edgefleet_crds::device::DesiredModel> {
    if model.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = model.status.as_ref()?;
    let selector: kube::core::Selector = model.spec.selector.clone().try_into().ok()?;
    let pools: Vec<kube::core::Selector> = pools
        .iter()
        .filter_map(|p| p.clone().try_into().ok())
        .collect();
    candidate(&model.spec, &selector, &pools, device, now).ok()?;
    let uid = model.metadata.uid.as_deref().unwrap_or_default();
    let rank = edgefleet_crds::model::device_rank(uid, &device.name_any());
    let revision = status.revision_for(rank)?;
    // The variant from the revision's own template (the stable revision may come from
    // an earlier spec), by the same memory rule as candidacy: the first variant whose
    // memory need the device meets, else the default artifact if the device has at
    // least its size; else nothing.
    let memory = quantity_bytes(&device.spec.facts.memory).unwrap_or(0);
    let template = status.revisions.iter().find(|t| t.revision == revision)?;
    let variant = match template
        .variants
        .iter()
        .find(|v| quantity_bytes(&v.min_memory).is_some_and(|m| m <= memory))
    {
        Some(v) => Some(v.name.clone()),
        None => {
            let need = template
                .artifact
                .size_bytes
                .map_or(0, |b| u128::try_from(b).unwrap_or(0));
            if memory < need {
                return None;
            }
            None
        }
    };
    Some(edgefleet_crds::device::DesiredModel {
        model: model_key(model),
        revision: revision.to_owned(),
        variant,
    })
}

/// Plans `model` over `devices` at `now`, within what the trust policies allow
/// (`trust`: the signature check with the resolved signers, the bound device pools and
/// the withdrawn revisions).
pub fn plan(model: &EdgeModel, devices: &[EdgeDevice], trust: &Trust<'_>, now: Timestamp) -> Plan {
    let signature = trust.signature;
    let key = model_key(model);
    let uid = model.metadata.uid.clone().unwrap_or_default();
    let spec = &model.spec;
    let previous = model.status.clone().unwrap_or_default();
    let generation = model.metadata.generation;
    let rev = revision(spec);
    let mut events = Vec::new();
    let mut status = previous.clone();
    status.observed_generation = generation;

    // A new revision starts a new rollout at step 0, over no device yet.
    if previous.current_revision.as_deref() != Some(rev.as_str()) {
        status.current_revision = Some(rev.clone());
        status.current_step = Some(0);
        status.step_started_time = None;
        status.failed_revision = None;
        status.rollout_rank = Some(0);
        events.push((
            EventType::Normal,
            cond::PROGRESSING,
            format!("rolling out revision {rev}"),
        ));
    }
    // A withdrawn stable revision is no rollback target.
    if status
        .stable_revision
        .as_ref()
        .is_some_and(|s| trust.withdrawn.contains_key(s))
    {
        status.stable_revision = None;
    }
    let stable = status.stable_revision.clone();
    // An administrator's retry (a new value of the retry annotation) rolls the failed
    // revision out again from the first step. Each value asks once: it is recorded
    // whether or not a revision has failed, so that an old annotation never retries a
    // later failure by itself.
    if let Some(asked) = model
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(edgefleet_crds::model::RETRY_ANNOTATION))
        .map(|a| a.chars().take(128).collect::<String>())
        && status.last_retry.as_ref() != Some(&asked)
    {
        status.last_retry = Some(asked.clone());
        if status.failed_revision.as_deref() == Some(rev.as_str()) {
            status.failed_revision = None;
            status.current_step = Some(0);
            status.step_started_time = None;
            status.rollout_rank = Some(0);
            events.push((
                EventType::Normal,
                reasons::RETRYING,
                format!(
                    "rolling out failed revision {rev} again from the first step, as {}={asked} asks",
                    edgefleet_crds::model::RETRY_ANNOTATION
                ),
            ));
        }
    }
    // A status from before rollout ranks: a completed revision stays complete; an
    // unfinished rollout starts again from its first step (its devices run the stable
    // revision until the rank reaches them).
    if status.rollout_rank.is_none() {
        if stable.as_deref() == Some(rev.as_str()) {
            status.rollout_rank = Some(RANK_ALL);
        } else {
            status.rollout_rank = Some(0);
            status.current_step = Some(0);
            status.step_started_time = None;
        }
    }
    let position = Position {
        current: Some(rev.clone()),
        stable: stable.clone(),
        rank: status.rollout_rank.unwrap_or(0),
    };

    // Select; announce the devices that no longer qualify and the withdrawn revisions
    // (both lose the model by derivation); set aside the devices that refused this
    // revision.
    let mut selection = select::select(spec, devices, trust.pools, now);
    let fleet = Fleet::new(&key, &uid, devices, selection.candidates.keys(), &position);
    let refused = trust::refused(&fleet, &selection.candidates, &rev);
    events.extend(revocation_events(&fleet, &selection));
    events.extend(trust::withdrawal_events(
        &fleet,
        trust.withdrawn,
        stable.as_deref(),
    ));
    selection
        .candidates
        .retain(|name, _| !refused.contains_key(name));
    let (listed, refusals) = trust::refusal_events(&refused, &rev, &previous.refusals);
    status.refusals = listed;
    events.extend(refusals);
    let candidates = &selection.candidates;

    // Judge the gates on the devices already on the new revision; once it is the stable
    // revision, a device's trouble is counted, never a reason to roll back.
    let n = candidates.len();
    let online = candidates.keys().filter(|c| fleet.online(c)).count();
    let targets = step_targets(spec.rollout.steps.as_deref(), online);
    let last_step = targets.len().saturating_sub(1);
    let mut step = usize::try_from(status.current_step.unwrap_or(0))
        .unwrap_or(0)
        .min(last_step);
    let gates = &spec.rollout.health_gates;
    let health = gates::health(&fleet, candidates, &rev);
    let completed = stable.as_deref() == Some(rev.as_str());
    let golden_names: Vec<String> = spec
        .validation
        .iter()
        .flat_map(|v| v.golden_prompts.iter().map(|p| p.name.clone()))
        .collect();
    let (golden, disagreement) =
        gates::golden_consistency(&health, &fleet, candidates, &rev, &golden_names);
    status.golden_prompts = golden;
    let gate_failure = gates::gate_failure(
        &health,
        &fleet,
        gates,
        &rev,
        status.step_started_time.as_ref(),
        now,
    )
    .or_else(|| disagreement.filter(|_| gates.golden_prompts))
    .filter(|_| !completed);
    let mut failed_before = status.failed_revision.as_deref() == Some(rev.as_str());
    // Without rollback the devices stay on a failed revision; once every one of them
    // that is online is ready on it again, no gate fails, and (with rate gates) each
    // has fresh statistics over minRequests to show it, it resumes (its step's clock
    // starts again). A restarted agent's few requests are no such evidence. With rollback they left it, so nothing shows it healthy: it
    // waits for a spec change or a retry, and the condition says so.
    if failed_before
        && !gates.rollback_on_failure
        && gate_failure.is_none()
        && !health.ready.is_empty()
        && health.ready.len() + health.offline.len() == health.updated.len()
        && gates::all_judgeable(&health.ready, &fleet, gates, &rev, now)
    {
        failed_before = false;
        status.failed_revision = None;
        status.step_started_time = None;
        events.push((
            EventType::Normal,
            reasons::RETRYING,
            format!("revision {rev} resumes: its devices are healthy again"),
        ));
    }
    let verdict = advance::verdict(gate_failure, signature.is_ok(), failed_before, n);

    // Rolling back is moving the rank to 0, when there is a stable revision to go back
    // to; says which.
    let mut rank = position.rank;
    let back_to_stable = |rank: &mut i64| {
        let stable = stable.clone().filter(|s| *s != rev)?;
        *rank = 0;
        Some(stable)
    };
    let outcome = match verdict {
        Verdict::GateFailed(why) => {
            // Halt, and move devices back to the stable revision.
            status.failed_revision = Some(rev.clone());
            events.push((EventType::Warning, reasons::HEALTH_GATE_FAILED, why.clone()));
            let mut then = None;
            if gates.rollback_on_failure {
                if let Some(stable) = back_to_stable(&mut rank) {
                    events.push((
                        EventType::Warning,
                        reasons::ROLLED_BACK,
                        format!("rolled back to revision {stable}"),
                    ));
                    then = Some(format!("rolled back to revision {stable}; "));
                }
                then = Some(format!(
                    "{}revision {rev} is not retried until the spec changes or the {} annotation asks",
                    then.unwrap_or_default(),
                    edgefleet_crds::model::RETRY_ANNOTATION
                ));
            }
            let then = then.unwrap_or_else(|| {
                format!(
                    "its devices stay on revision {rev}; it resumes once they are healthy again"
                )
            });
            Outcome::degraded(format!("{why} ({then})"))
        }
        Verdict::FailedBefore => {
            // Keep the message that named the failure.
            let first = previous
                .conditions
                .iter()
                .find(|c| {
                    c.type_ == cond::DEGRADED && Status::parse(&c.status) == Some(Status::True)
                })
                .map(|c| c.message.clone());
            if gates.rollback_on_failure {
                back_to_stable(&mut rank);
            }
            Outcome::degraded(first.unwrap_or_else(|| {
                format!("revision {rev} failed its health gates; change the spec to roll out again")
            }))
        }
        Verdict::SignatureInvalid => {
            // Nothing runs the unverified revision; devices keep the stable one. Should
            // the signature verify again (a bundle fetched, a grant restored), the
            // rollout starts over from its first step with a fresh clock.
            rank = 0;
            step = 0;
            status.step_started_time = None;
            Outcome::settled(ModelPhase::Failed)
        }
        Verdict::NoCandidates => no_candidates(model, &selection, trust),
        Verdict::Advance if online == 0 && !completed => Outcome::waiting(n),
        Verdict::Advance => {
            // Is the current step done (its online devices ready, pause elapsed)?
            let progress = Progress {
                targets: &targets,
                steps: spec.rollout.steps.as_deref(),
                paused: spec.rollout.paused,
                candidates: online,
                updated: health.updated.len() - health.offline.len(),
                ready: health.ready.len(),
            };
            let started = status.step_started_time.clone();
            let advanced = advance::advance_step(StepState { step, started }, &progress, now);
            step = advanced.state.step;
            status.step_started_time = advanced.state.started;
            events.extend(
                advanced
                    .event
                    .map(|msg| (EventType::Normal, cond::PROGRESSING, msg)),
            );
            let target = targets[step];
            if spec.rollout.paused {
                Outcome::paused(step, targets.len())
            } else {
                // Move the rank over more devices, within the unavailability budget.
                let budget = max_unavailable(spec.rollout.max_unavailable.as_ref(), online);
                let moved = assign::advance_rank(&fleet, candidates, &health, rank, target, budget);
                if moved > rank && status.step_started_time.is_none() {
                    status.step_started_time = Some(Time(now));
                }
                rank = moved;
                // Complete when the last step is ready, and for good once the revision
                // is stable: a device that fails or reboots later is counted, and the
                // model stays Available.
                if completed || advance::complete(step, &targets, health.ready.len()) {
                    rank = RANK_ALL;
                    if !completed {
                        status.stable_revision = Some(rev.clone());
                        events.push((
                            EventType::Normal,
                            reasons::ROLLOUT_COMPLETE,
                            format!("revision {rev} is ready on {} devices", health.ready.len()),
                        ));
                    }
                    Outcome::settled(ModelPhase::Available)
                } else {
                    Outcome::progressing(step, targets.len(), health.ready.len(), target, &rev)
                }
            }
        }
    };
    status.current_step = Some(i32::try_from(step).unwrap_or(i32::MAX));
    status.rollout_rank = Some(rank);

    // Counts and conditions, at the position this plan writes.
    let after = Position {
        current: Some(rev.clone()),
        stable: status.stable_revision.clone(),
        rank,
    };
    let serving = report::serving_revision(outcome.phase, stable.as_deref(), &rev);
    let counts = report::counts(&fleet, candidates, &after, &rev, &serving);
    let targeted = selection.targeted;
    status.devices.targeted = targeted;
    status.devices.attested = i32::try_from(n).unwrap_or(i32::MAX);
    status.devices.updated = i32::try_from(counts.updated).unwrap_or(i32::MAX);
    status.devices.ready = i32::try_from(counts.ready).unwrap_or(i32::MAX);
    status.devices.failed = i32::try_from(counts.failed).unwrap_or(i32::MAX);
    status.devices.refused = i32::try_from(refused.len()).unwrap_or(i32::MAX);
    status.ready_devices = Some(format!("{}/{targeted}", counts.ready));
    status.phase = Some(outcome.phase);
    events.extend(report::signature_event(signature, &previous.conditions));
    let observed = report::Observed {
        signature,
        ready: counts.ready,
        targeted,
        refused: refused.len(),
        generation,
        previous: &previous.conditions,
    };
    status.conditions = report::conditions(outcome, &observed, now);
    Plan { status, events }
}

/// A warning for each online device that is no longer a candidate but still reports
/// the model: it derives nothing now, and unloads the model at its next poll.
fn revocation_events(fleet: &Fleet<'_>, selection: &select::Selection) -> Vec<Event> {
    fleet
        .names()
        .filter(|name| !selection.candidates.contains_key(*name))
        .filter(|name| fleet.online(name) && fleet.reports(name).next().is_some())
        .map(|name| {
            let why = selection
                .excluded
                .get(name)
                .map_or_else(String::new, |e| format!("{e:?}"));
            (
                EventType::Warning,
                reasons::UNASSIGNED,
                format!("{name} no longer qualifies ({why}); model unassigned"),
            )
        })
        .collect()
}

/// Why there is no candidate: no device pool is bound to the namespace, none of the
/// devices the selector matches is in one, or none qualifies.
fn no_candidates(model: &EdgeModel, selection: &select::Selection, trust: &Trust<'_>) -> Outcome {
    let ns = model.namespace().unwrap_or_default();
    let outside = selection
        .excluded
        .values()
        .filter(|e| **e == Excluded::NotInNamespacePool)
        .count();
    let mut outcome = Outcome::no_candidates();
    if trust.pools.is_empty() {
        outcome.progressing_reason = reasons::NO_POOL;
        outcome.progressing_message =
            format!("no EdgeTrustPolicy binds a device pool to namespace {ns}");
    } else if outside > 0 && selection.targeted == 0 {
        outcome.progressing_reason = reasons::NO_POOL;
        outcome.progressing_message = format!(
            "the selector matches {outside} device(s), none in a device pool bound to namespace {ns}"
        );
    }
    outcome
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::rollout::fixtures::{
        attested, device, now, online, plan_all_pools as run, reporting, spec,
    };
    use edgefleet_crds::device::ModelState;

    fn model(status: EdgeModelStatus) -> (EdgeModel, String) {
        let spec = spec(serde_json::json!({"site": "a"}));
        let rev = revision(&spec);
        let mut m = EdgeModel::new("m", spec);
        m.metadata.namespace = Some("ns".into());
        m.status = Some(EdgeModelStatus {
            current_revision: Some(rev.clone()),
            ..status
        });
        (m, rev)
    }

    #[test]
    fn a_status_from_before_ranks_keeps_a_complete_rollout_complete() {
        let (m, rev) = model(EdgeModelStatus::default());
        let mut done = m.clone();
        done.status.as_mut().unwrap().stable_revision = Some(rev.clone());
        let devices = [online(attested(reporting(
            device("a"),
            &rev,
            ModelState::Ready,
        )))];
        let p = run(&done, &devices, Ok(()));
        assert_eq!(p.status.rollout_rank, Some(RANK_ALL));
        assert_eq!(p.status.phase, Some(ModelPhase::Available));
        // Unfinished: it starts over from the first step.
        let mut half = m;
        let st = half.status.as_mut().unwrap();
        st.stable_revision = Some("old".into());
        st.current_step = Some(3);
        st.step_started_time = Some(crate::rollout::fixtures::ago(5000));
        let p = run(&half, &devices, Ok(()));
        assert_eq!(p.status.current_step, Some(0));
        assert_ne!(p.status.rollout_rank, Some(RANK_ALL));
    }

    #[test]
    fn an_unverified_signature_puts_every_device_back_and_restarts_the_steps() {
        let (m, rev) = model(EdgeModelStatus {
            stable_revision: Some("old".into()),
            rollout_rank: Some(RANK_ALL / 2),
            current_step: Some(1),
            step_started_time: Some(crate::rollout::fixtures::ago(5000)),
            ..EdgeModelStatus::default()
        });
        let devices = [online(attested(reporting(
            device("a"),
            &rev,
            ModelState::Ready,
        )))];
        let p = run(&m, &devices, Err(("SignatureNotFetched", "down".into())));
        assert_eq!(p.status.rollout_rank, Some(0));
        assert_eq!(p.status.current_step, Some(0));
        assert_eq!(p.status.step_started_time, None);
        assert_eq!(p.status.phase, Some(ModelPhase::Failed));
        assert_eq!(revision_after(&p.status, "", "a").as_deref(), Some("old"));
    }

    #[test]
    fn a_complete_rollout_stays_available_while_every_device_is_offline() {
        let (m, rev) = model(EdgeModelStatus::default());
        let mut done = m;
        let st = done.status.as_mut().unwrap();
        st.stable_revision = Some(rev.clone());
        st.rollout_rank = Some(RANK_ALL);
        let devices = [attested(reporting(device("a"), &rev, ModelState::Loading))];
        let p = run(&done, &devices, Ok(()));
        assert_eq!(p.status.phase, Some(ModelPhase::Available));
        assert!(!p.events.iter().any(|e| e.1 == reasons::HEALTH_GATE_FAILED));
        // Not yet complete: it waits, naming why.
        let mut rolling = done.clone();
        rolling.status.as_mut().unwrap().stable_revision = None;
        rolling.status.as_mut().unwrap().rollout_rank = Some(0);
        let p = run(&rolling, &devices, Ok(()));
        assert_eq!(p.status.phase, Some(ModelPhase::Progressing));
        assert_eq!(p.status.rollout_rank, Some(0));
    }

    #[test]
    fn the_gateway_serves_a_revision_only_to_a_device_it_fits() {
        use edgefleet_crds::model::RevisionTemplate;
        let (mut m, rev) = model(EdgeModelStatus {
            rollout_rank: Some(RANK_ALL),
            ..EdgeModelStatus::default()
        });
        let mut t: RevisionTemplate = serde_json::from_value(serde_json::json!({
            "revision": rev, "servedName": "m",
            "artifact": {"uri": "https://x/m.gguf", "digest": format!("sha256:{}", "a".repeat(64)),
                "sizeBytes": 4_i64 << 30},
            "signature": {"inline": "{}"}, "signers": [{"name": "s", "publicKey": "k"}],
            "runtime": {}, "port": 8080,
        }))
        .unwrap();
        m.status.as_mut().unwrap().revisions = vec![t.clone()];
        let pools = [Default::default()];
        // The fixture device has 1 GiB: the 4 GiB default artifact does not fit.
        let d = online(attested(device("a")));
        assert_eq!(desired(&m, &d, &pools, now()), None);
        // A variant that fits is chosen from the revision's own template.
        t.variants = serde_json::from_value(serde_json::json!([
            {"name": "big", "minMemory": "2Gi", "artifact": {"uri": "https://x/b", "digest": format!("sha256:{}", "b".repeat(64))},
             "signature": {"inline": "{}"}},
            {"name": "small", "minMemory": "512Mi", "artifact": {"uri": "https://x/s", "digest": format!("sha256:{}", "c".repeat(64))},
             "signature": {"inline": "{}"}},
        ]))
        .unwrap();
        m.status.as_mut().unwrap().revisions = vec![t];
        let got = desired(&m, &d, &pools, now()).unwrap();
        assert_eq!(
            (got.revision.as_str(), got.variant.as_deref()),
            (rev.as_str(), Some("small"))
        );
        // Not a candidate (no bound pool): nothing.
        assert_eq!(desired(&m, &d, &[], now()), None);
        // Being deleted: nothing.
        m.metadata.deletion_timestamp = Some(crate::rollout::fixtures::ago(1));
        assert_eq!(desired(&m, &d, &pools, now()), None);
    }
}
