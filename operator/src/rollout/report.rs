//! Reporting: the device counts after the plan's assignments, and the `Available`,
//! `Progressing`, `Degraded` and `SignatureVerified` conditions (each keeps its
//! `lastTransitionTime` while its status stays the same), with the warning a new
//! signature failure raises.

use std::collections::BTreeMap;

use edgefleet_crds::ModelPhase;
use edgefleet_crds::conditions::{self as cond, Status, reasons};
use edgefleet_crds::device::ModelState;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;

use super::Event;
use super::advance::Outcome;
use super::assign::{Fleet, Position};

/// The revision whose readiness counts: the stable one (else the current one) while
/// the rollout is halted (`Degraded`) or refused (`Failed`), otherwise the current one.
pub fn serving_revision(phase: ModelPhase, stable: Option<&str>, rev: &str) -> String {
    if phase == ModelPhase::Degraded || phase == ModelPhase::Failed {
        stable.unwrap_or(rev).to_owned()
    } else {
        rev.to_owned()
    }
}

/// Candidates by state, at the rollout position the plan writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Deriving the current revision.
    pub updated: usize,
    /// `Ready` on the serving revision, deriving it, and `Ready` themselves.
    pub ready: usize,
    /// Reporting the current revision `Failed`.
    pub failed: usize,
}

/// Counts the `candidates` at position `after`, on the current revision `rev` and the
/// `serving` revision ([`serving_revision`]).
pub fn counts(
    fleet: &Fleet<'_>,
    candidates: &BTreeMap<String, Option<String>>,
    after: &Position,
    rev: &str,
    serving: &str,
) -> Counts {
    let after = |name: &str| after.revision(fleet.rank(name)).map(str::to_owned);
    let updated = candidates
        .keys()
        .filter(|n| after(n).as_deref() == Some(rev))
        .count();
    let ready = candidates
        .keys()
        .filter(|n| {
            fleet.state(n, serving) == Some(ModelState::Ready)
                && fleet.online(n)
                && after(n).as_deref() == Some(serving)
        })
        .count();
    let failed = candidates
        .keys()
        .filter(|n| fleet.state(n, rev) == Some(ModelState::Failed))
        .count();
    Counts {
        updated,
        ready,
        failed,
    }
}

/// The warning for a signature failure, unless `previous` conditions already said so
/// (`SignatureVerified` False with the same message).
pub fn signature_event(
    signature: &Result<(), (&'static str, String)>,
    previous: &[Condition],
) -> Option<Event> {
    if let Err((reason, msg)) = signature
        && previous
            .iter()
            .find(|c| c.type_ == cond::SIGNATURE_VERIFIED)
            .is_none_or(|c| Status::parse(&c.status) != Some(Status::False) || c.message != *msg)
    {
        return Some((EventType::Warning, reason, msg.clone()));
    }
    None
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
    let status = Status::from(ok).as_str().to_owned();
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

/// What the conditions describe.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The result of the signature check.
    pub signature: &'a Result<(), (&'static str, String)>,
    /// Candidates ready on the serving revision ([`Counts::ready`]).
    pub ready: usize,
    /// Devices targeted.
    pub targeted: i32,
    /// Of those, the ones that refused the current revision on their own authority.
    pub refused: usize,
    /// The `metadata.generation` described.
    pub generation: Option<i64>,
    /// The conditions before this plan.
    pub previous: &'a [Condition],
}

/// The four conditions of an EdgeModel, for `outcome` and what was `observed` at `now`.
pub fn conditions(outcome: Outcome, observed: &Observed<'_>, now: Timestamp) -> Vec<Condition> {
    let Observed {
        signature,
        ready,
        targeted,
        refused,
        generation,
        previous,
    } = *observed;
    let (sig_reason, sig_msg) = match signature {
        Ok(()) => (
            reasons::SIGNATURE_VALID,
            "the bundle verifies against spec.signers".to_owned(),
        ),
        Err((reason, msg)) => (*reason, msg.clone()),
    };
    // Devices that refused the revision are not waited for.
    let serving = i64::from(targeted) - i64::try_from(refused).unwrap_or(i64::MAX);
    let available = serving > 0 && i64::try_from(ready).is_ok_and(|r| r == serving);
    let refusals = if refused > 0 {
        format!(" ({refused} refused it)")
    } else {
        String::new()
    };
    let Outcome {
        phase,
        progressing,
        progressing_reason,
        progressing_message,
        degraded,
    } = outcome;
    vec![
        condition(
            cond::AVAILABLE,
            available,
            if phase == ModelPhase::Available {
                reasons::ALL_DEVICES_READY
            } else {
                reasons::NOT_ALL_DEVICES_READY
            },
            format!("{ready} of {targeted} targeted devices ready{refusals}"),
            generation,
            previous,
            now,
        ),
        condition(
            cond::PROGRESSING,
            progressing,
            progressing_reason,
            progressing_message,
            generation,
            previous,
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
            previous,
            now,
        ),
        condition(
            cond::SIGNATURE_VERIFIED,
            signature.is_ok(),
            sig_reason,
            sig_msg,
            generation,
            previous,
            now,
        ),
    ]
}
