//! Advancement: what the rollout does this time ([`verdict`]: halt on a gate failure,
//! stay halted on a revision that failed before, hold on an unverified signature, wait
//! for candidates, or advance), how far the steps go ([`step_targets`],
//! [`max_unavailable`]), when the current step is done and the next one starts
//! ([`advance_step`]), and the phase and `Progressing`/`Degraded` conditions that
//! describe the result ([`Outcome`]).

use edgefleet_crds::ModelPhase;
use edgefleet_crds::conditions::reasons;
use edgefleet_crds::model::RolloutStep;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

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

/// What the rollout does this time, in order of precedence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A gate failed just now (the message says how): halt, mark the revision failed,
    /// and roll back when `rollbackOnFailure` is set.
    GateFailed(String),
    /// The revision failed its gates before: stay halted until the spec changes.
    FailedBefore,
    /// The signature did not verify: nothing moves to the revision.
    SignatureInvalid,
    /// No device is a candidate.
    NoCandidates,
    /// Advance through the steps.
    Advance,
}

/// The verdict: a gate failure counts only while the signature verifies and the
/// revision has not failed before.
pub fn verdict(
    gate_failure: Option<String>,
    signature_ok: bool,
    failed_before: bool,
    candidates: usize,
) -> Verdict {
    if let Some(why) = gate_failure.filter(|_| signature_ok && !failed_before) {
        Verdict::GateFailed(why)
    } else if failed_before {
        Verdict::FailedBefore
    } else if !signature_ok {
        Verdict::SignatureInvalid
    } else if candidates == 0 {
        Verdict::NoCandidates
    } else {
        Verdict::Advance
    }
}

/// Where the rollout stands among its steps.
#[derive(Debug, Clone, PartialEq)]
pub struct StepState {
    /// Index of the current step (0-based).
    pub step: usize,
    /// When the current step started (`status.stepStartedTime`).
    pub started: Option<Time>,
}

/// What a step's advancement depends on.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Cumulative device targets of the steps ([`step_targets`]; never empty).
    pub targets: &'a [usize],
    /// The spec's steps, for their pauses.
    pub steps: Option<&'a [RolloutStep]>,
    /// `spec.rollout.paused`.
    pub paused: bool,
    /// Number of candidates.
    pub candidates: usize,
    /// Candidates assigned the new revision.
    pub updated: usize,
    /// Of those, the ones ready on it.
    pub ready: usize,
}

/// The step state after [`advance_step`], and the event that announces a new step.
#[derive(Debug, Clone, PartialEq)]
pub struct Advanced {
    /// The new step state.
    pub state: StepState,
    /// The message of the `Progressing` event when the next step started.
    pub event: Option<String>,
}

/// Advances the step: a step is done when its target is updated and ready; its start
/// time is then kept (or set) and, once its pause has elapsed, the next step starts
/// (unless it is the last, or the rollout is paused). A step whose devices are all
/// assigned but not all ready starts its clock.
pub fn advance_step(state: StepState, p: &Progress<'_>, now: Timestamp) -> Advanced {
    let StepState { mut step, started } = state;
    let mut started = started;
    let mut event = None;
    let last_step = p.targets.len().saturating_sub(1);
    let n = p.candidates;
    let target = p.targets[step];
    let step_done = p.ready >= target && p.updated >= target;
    if step_done {
        let since = started.clone().unwrap_or(Time(now));
        started = Some(since.clone());
        let pause = p
            .steps
            .and_then(|s| s.get(step))
            .and_then(|s| s.pause_seconds)
            .unwrap_or(0);
        let elapsed = now.duration_since(since.0).as_secs();
        if step < last_step && elapsed >= i64::from(pause) && !p.paused {
            step += 1;
            started = None;
            event = Some(format!(
                "step {} reached ({} of {n} devices); starting step {}",
                step,
                p.targets[step - 1],
                step + 1
            ));
        }
    } else if started.is_none() && p.updated >= target {
        started = Some(Time(now));
    }
    Advanced {
        state: StepState { step, started },
        event,
    }
}

/// Whether the rollout is complete: the last step is reached and its target is ready.
pub fn complete(step: usize, targets: &[usize], ready: usize) -> bool {
    let last_step = targets.len().saturating_sub(1);
    step == last_step && ready >= targets[last_step]
}

/// The phase of the result, and what the `Progressing` and `Degraded` conditions say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `status.phase`.
    pub phase: ModelPhase,
    /// Whether `Progressing` is True.
    pub progressing: bool,
    /// The reason of `Progressing`.
    pub progressing_reason: &'static str,
    /// The message of `Progressing`.
    pub progressing_message: String,
    /// Why the rollout is degraded, when it is (`Degraded` is True).
    pub degraded: Option<String>,
}

impl Outcome {
    /// A settled outcome in `phase`: not progressing, not degraded.
    pub fn settled(phase: ModelPhase) -> Self {
        Self {
            phase,
            progressing: false,
            progressing_reason: reasons::ROLLOUT_COMPLETE,
            progressing_message: String::new(),
            degraded: None,
        }
    }

    /// Halted on a failed revision, for the reason `why`.
    pub fn degraded(why: String) -> Self {
        Self {
            degraded: Some(why),
            ..Self::settled(ModelPhase::Degraded)
        }
    }

    /// No device is a candidate.
    pub fn no_candidates() -> Self {
        Self {
            progressing_reason: reasons::NO_DEVICES,
            progressing_message: "no approved, ready and attested device matches the selector"
                .into(),
            ..Self::settled(ModelPhase::Pending)
        }
    }

    /// None of the `candidates` is online: nothing moves, nothing is judged.
    pub fn waiting(candidates: usize) -> Self {
        Self {
            progressing: true,
            progressing_reason: reasons::ROLLING_OUT,
            progressing_message: format!(
                "waiting: none of the {candidates} candidate device(s) is online"
            ),
            ..Self::settled(ModelPhase::Progressing)
        }
    }

    /// Paused at `step` of `steps`.
    pub fn paused(step: usize, steps: usize) -> Self {
        Self {
            progressing_reason: reasons::PAUSED,
            progressing_message: format!("paused at step {} of {}", step + 1, steps),
            ..Self::settled(ModelPhase::Paused)
        }
    }

    /// Rolling out revision `rev`: at `step` of `steps`, `ready` of `target` devices
    /// ready.
    pub fn progressing(step: usize, steps: usize, ready: usize, target: usize, rev: &str) -> Self {
        Self {
            progressing: true,
            progressing_reason: reasons::ROLLING_OUT,
            progressing_message: format!(
                "step {} of {}: {} of {target} devices ready on revision {rev}",
                step + 1,
                steps,
                ready
            ),
            ..Self::settled(ModelPhase::Progressing)
        }
    }
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
    fn the_verdict_follows_its_precedence() {
        let why = || Some("a reported the revision Failed".to_owned());
        assert_eq!(
            verdict(why(), true, false, 3),
            Verdict::GateFailed("a reported the revision Failed".into())
        );
        // A gate failure does not count on a revision that failed before, or that is
        // not verified.
        assert_eq!(verdict(why(), true, true, 3), Verdict::FailedBefore);
        assert_eq!(verdict(why(), false, false, 3), Verdict::SignatureInvalid);
        assert_eq!(verdict(None, false, true, 3), Verdict::FailedBefore);
        assert_eq!(verdict(None, true, false, 0), Verdict::NoCandidates);
        assert_eq!(verdict(None, true, false, 3), Verdict::Advance);
    }

    fn at(seconds_ago: i64) -> Option<Time> {
        Some(crate::rollout::fixtures::ago(seconds_ago))
    }

    #[test]
    fn a_step_moves_on_once_its_devices_are_ready_and_its_pause_elapsed() {
        let now = crate::rollout::fixtures::now();
        let steps = [
            RolloutStep {
                pause_seconds: Some(60),
                ..step(Some(1), None)
            },
            step(None, Some(100)),
        ];
        let targets = step_targets(Some(&steps), 4);
        assert_eq!(targets, [1, 4]);
        let progress = |updated, ready| Progress {
            targets: &targets,
            steps: Some(&steps),
            paused: false,
            candidates: 4,
            updated,
            ready,
        };
        let state = |step, started| StepState { step, started };

        // Assigned but not ready: the step's clock starts (and then keeps running).
        let a = advance_step(state(0, None), &progress(1, 0), now);
        assert_eq!(a.state, state(0, Some(Time(now))));
        assert_eq!(a.event, None);
        let a = advance_step(state(0, at(5)), &progress(1, 0), now);
        assert_eq!(a.state, state(0, at(5)));

        // Ready, but the pause has not elapsed: stay.
        let a = advance_step(state(0, at(59)), &progress(1, 1), now);
        assert_eq!(a.state, state(0, at(59)));
        assert_eq!(a.event, None);

        // Ready and paused long enough: the next step starts, with no clock yet.
        let a = advance_step(state(0, at(60)), &progress(1, 1), now);
        assert_eq!(a.state, state(1, None));
        assert_eq!(
            a.event.as_deref(),
            Some("step 1 reached (1 of 4 devices); starting step 2")
        );

        // spec.rollout.paused holds the step.
        let held = Progress {
            paused: true,
            ..progress(1, 1)
        };
        assert_eq!(advance_step(state(0, at(600)), &held, now).state.step, 0);

        // Nothing assigned yet: no clock.
        let a = advance_step(state(1, None), &progress(1, 1), now);
        assert_eq!(a.state, state(1, None));
    }

    #[test]
    fn the_rollout_is_complete_when_the_last_step_is_ready() {
        assert!(!complete(0, &[1, 4], 4));
        assert!(!complete(1, &[1, 4], 3));
        assert!(complete(1, &[1, 4], 4));
        assert!(complete(0, &[0], 0));
    }
}
