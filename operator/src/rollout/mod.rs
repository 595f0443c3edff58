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
//! - **Signature**: `spec.signers` must resolve under the trust policies (reason
//!   `UntrustedSigner` otherwise), and the bundle must verify against the resolved
//!   signers and, for a single-file model, name the artifact's digest. Otherwise nothing
//!   moves to the new revision and `SignatureVerified` is False with the reason.
//! - **Trust boundary** ([`trust`]): only devices in a pool bound to the model's
//!   namespace are candidates; devices on a withdrawn revision (its signers no longer
//!   granted) move to a stable revision that holds, or lose the model; a device's local
//!   refusal of the current revision excludes it alone, counted, never a gate failure.
//!
//! [`plan`] composes named steps, each a pure function in a module of its own:
//! [`select`] the candidates, [`assign::revoke`] the devices that stopped being
//! candidates, judge the [`gates`], reach a [`advance::verdict`] and advance the step
//! ([`advance`]), [`assign`] devices (roll back, move within the budget, fill with the
//! stable revision), and [`report`] the counts and conditions.
//! [`revision`](mod@revision) holds what a revision is: its digest, signature check and
//! template.

pub mod advance;
pub mod assign;
#[cfg(test)]
mod fixtures;
pub mod gates;
pub mod report;
pub mod revision;
pub mod select;
pub mod trust;

use edgefleet_crds::conditions::{self as cond, Status, reasons};
use edgefleet_crds::{EdgeDevice, EdgeModel, EdgeModelStatus, ModelPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::events::EventType;

pub use advance::{max_unavailable, step_targets};
pub use assign::Assignments;
pub use revision::verify_template;
pub use revision::{check_signature, keep_templates, revision, template};
pub use select::{Excluded, candidate, condition_true, quantity_bytes};
pub use trust::Trust;

use advance::{Outcome, Progress, StepState, Verdict};
use assign::Fleet;

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

/// The outcome of planning one EdgeModel.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// For each device whose assignment of this model must change: the new one (`None`
    /// removes it).
    pub assignments: Assignments,
    /// The status to write.
    pub status: EdgeModelStatus,
    /// Events to publish, in order.
    pub events: Vec<Event>,
}

/// Plans `model` over `devices` at `now`, within what the trust policies allow
/// (`trust`: the signature check with the resolved signers, the bound device pools and
/// the withdrawn revisions).
pub fn plan(model: &EdgeModel, devices: &[EdgeDevice], trust: &Trust<'_>, now: Timestamp) -> Plan {
    let signature = trust.signature;
    let key = model_key(model);
    let spec = &model.spec;
    let previous = model.status.clone().unwrap_or_default();
    let generation = model.metadata.generation;
    let rev = revision(spec);
    let mut events = Vec::new();
    let mut status = previous.clone();
    status.observed_generation = generation;

    // A new revision starts a new rollout at step 0.
    if previous.current_revision.as_deref() != Some(rev.as_str()) {
        status.current_revision = Some(rev.clone());
        status.current_step = Some(0);
        status.step_started_time = None;
        status.failed_revision = None;
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

    // Select, revoke the model from devices that are no longer candidates, withdraw
    // revisions no longer trusted, and set aside the devices that refused this one.
    let mut selection = select::select(spec, devices, trust.pools, now);
    let fleet = Fleet::new(&key, devices);
    let refused = trust::refused(&fleet, &selection.candidates, &rev);
    let (mut assignments, revoked) = assign::revoke(&fleet, &selection);
    events.extend(revoked);
    let (withdrawn, withdrawals) = trust::withdraw(
        &fleet,
        &selection.candidates,
        trust.withdrawn,
        stable.as_deref(),
        devices.iter().map(ResourceExt::name_any),
    );
    assignments.extend(withdrawn);
    events.extend(withdrawals);
    selection
        .candidates
        .retain(|name, _| !refused.contains_key(name));
    let (listed, refusals) = trust::refusal_events(&refused, &rev, &previous.refusals);
    status.refusals = listed;
    events.extend(refusals);
    let candidates = &selection.candidates;

    // Judge the gates on the devices already on the new revision.
    let n = candidates.len();
    let targets = step_targets(spec.rollout.steps.as_deref(), n);
    let last_step = targets.len().saturating_sub(1);
    let mut step = usize::try_from(status.current_step.unwrap_or(0))
        .unwrap_or(0)
        .min(last_step);
    let gates = &spec.rollout.health_gates;
    let health = gates::health(&fleet, candidates, &rev);
    let gate_failure = gates::gate_failure(
        &health,
        &fleet,
        gates,
        status.step_started_time.as_ref(),
        now,
    );
    let failed_before = status.failed_revision.as_deref() == Some(rev.as_str());
    let verdict = advance::verdict(gate_failure, signature.is_ok(), failed_before, n);

    // Moves the devices on `rev` back to the stable revision; says to which.
    let back_to_stable = |assignments: &mut Assignments| {
        let (stable, changes) =
            assign::back_to_stable(&fleet, candidates, stable.as_deref(), &rev)?;
        assignments.extend(changes);
        Some(stable)
    };
    let outcome = match verdict {
        Verdict::GateFailed(why) => {
            // Halt, and move devices back to the stable revision.
            status.failed_revision = Some(rev.clone());
            events.push((EventType::Warning, reasons::HEALTH_GATE_FAILED, why.clone()));
            if gates.rollback_on_failure
                && let Some(stable) = back_to_stable(&mut assignments)
            {
                events.push((
                    EventType::Warning,
                    reasons::ROLLED_BACK,
                    format!("rolled back to revision {stable}"),
                ));
            }
            Outcome::degraded(why)
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
                back_to_stable(&mut assignments);
            }
            Outcome::degraded(first.unwrap_or_else(|| {
                format!("revision {rev} failed its health gates; change the spec to roll out again")
            }))
        }
        Verdict::SignatureInvalid => {
            // Nothing moves to the unverified revision; devices keep the stable one.
            back_to_stable(&mut assignments);
            Outcome::settled(ModelPhase::Failed)
        }
        Verdict::NoCandidates => no_candidates(model, &selection, trust),
        Verdict::Advance => {
            // Is the current step done (all its devices ready, pause elapsed)?
            let progress = Progress {
                targets: &targets,
                steps: spec.rollout.steps.as_deref(),
                paused: spec.rollout.paused,
                candidates: n,
                updated: health.updated.len(),
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
            let outcome = if spec.rollout.paused {
                Outcome::paused(step, targets.len())
            } else {
                // Move more devices, in name order, within the unavailability budget.
                let budget = max_unavailable(spec.rollout.max_unavailable.as_ref(), n);
                let moved = assign::move_devices(&fleet, candidates, &health, &rev, target, budget);
                if !moved.is_empty() && status.step_started_time.is_none() {
                    status.step_started_time = Some(Time(now));
                }
                assignments.extend(moved);
                if advance::complete(step, &targets, health.ready.len()) {
                    if stable.as_deref() != Some(rev.as_str()) {
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
            };
            // Candidates outside the rollout's reach so far keep (or get) the stable
            // revision.
            if let Some(stable) = status.stable_revision.clone() {
                let filled = assign::fill_stable(&fleet, candidates, &assignments, &stable, &rev);
                assignments.extend(filled);
            }
            outcome
        }
    };
    status.current_step = Some(i32::try_from(step).unwrap_or(i32::MAX));

    // Counts and conditions, after this plan's assignments.
    let serving = report::serving_revision(outcome.phase, stable.as_deref(), &rev);
    let counts = report::counts(&fleet, candidates, &assignments, &rev, &serving);
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
    Plan {
        assignments,
        status,
        events,
    }
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
