//! The trust boundary's steps of a rollout:
//!
//! - [`withdraw`]: devices assigned a revision whose signers the trust policies no
//!   longer grant (a *withdrawn* revision) move to the stable revision when it still
//!   holds and they are candidates, and lose the model otherwise; one Warning event
//!   (`RevisionWithdrawn`) names each withdrawn revision.
//! - [`refused`]: candidates that report the current revision `Failed` with a local
//!   refusal reason ([`edgefleet_proto::LOCAL_REFUSALS`]: the device's owner refused a
//!   plugin grant, or the device does not hold the signer's root). The plan keeps their
//!   assignment (they serve nothing of it, and would only refuse again), takes them out
//!   of the rollout (no gate failure, no step counts them), and counts them;
//!   [`refusal_events`] announces each once (`DeviceRefused`).

use std::collections::{BTreeMap, BTreeSet};

use edgefleet_crds::conditions::reasons;
use edgefleet_crds::device::ModelState;
use edgefleet_crds::model::Refusal;
use kube::runtime::events::EventType;

use super::Event;
use super::assign::{Assignments, Fleet};

/// At most this many refusals are listed in `status.refusals`.
pub const MAX_LISTED_REFUSALS: usize = 128;

/// What the trust policies and the signature check decided about one EdgeModel, for
/// [`plan`](super::plan).
#[derive(Debug, Clone, Copy)]
pub struct Trust<'a> {
    /// The result of [`check_signature`](super::check_signature) for the current spec,
    /// with `spec.signers` resolved (`UntrustedSigner` when they do not resolve).
    pub signature: &'a Result<(), (&'static str, String)>,
    /// The selectors of the device pools bound to the model's namespace.
    pub pools: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector],
    /// Kept revisions withdrawn, and why.
    pub withdrawn: &'a BTreeMap<String, String>,
}

/// Moves the devices assigned a `withdrawn` revision to `stable` (when it is not
/// withdrawn itself and the device is a candidate), or unassigns them.
pub fn withdraw(
    fleet: &Fleet<'_>,
    candidates: &BTreeMap<String, Option<String>>,
    withdrawn: &BTreeMap<String, String>,
    stable: Option<&str>,
    devices: impl Iterator<Item = String>,
) -> (Assignments, Vec<Event>) {
    let stable = stable.filter(|s| !withdrawn.contains_key(*s));
    let mut changes = Assignments::new();
    let mut moved: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for name in devices {
        let Some(rev) = fleet.assigned(&name).map(|a| a.revision.clone()) else {
            continue;
        };
        let Some((rev, _)) = withdrawn.get_key_value(&rev) else {
            continue;
        };
        let to = match (stable, candidates.get(&name)) {
            (Some(stable), Some(variant)) => Some(fleet.desired(stable, variant)),
            _ => None,
        };
        let counts = moved.entry(rev).or_default();
        if to.is_some() {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
        fleet.want(&mut changes, &name, to);
    }
    let events = withdrawn
        .iter()
        .map(|(rev, why)| {
            let (to_stable, unassigned) = moved.get(rev.as_str()).copied().unwrap_or_default();
            let devices = match stable {
                Some(s) if to_stable > 0 => format!(
                    "; {to_stable} device(s) moved to revision {s}, {unassigned} unassigned"
                ),
                _ => format!("; {unassigned} device(s) unassigned"),
            };
            (
                EventType::Warning,
                reasons::REVISION_WITHDRAWN,
                format!("revision {rev} withdrawn: {why}{devices}"),
            )
        })
        .collect();
    (changes, events)
}

/// The candidates that refused revision `rev` on their own authority, with the reason.
pub fn refused(
    fleet: &Fleet<'_>,
    candidates: &BTreeMap<String, Option<String>>,
    rev: &str,
) -> BTreeMap<String, String> {
    candidates
        .keys()
        .filter(|n| fleet.on(n, rev))
        .filter_map(|n| {
            let r = fleet.report(n, rev)?;
            let reason = r.reason.as_deref()?;
            (r.state == ModelState::Failed && edgefleet_proto::is_local_refusal(reason))
                .then(|| (n.clone(), reason.to_owned()))
        })
        .collect()
}

/// The refusals to list in status (at most [`MAX_LISTED_REFUSALS`]), and an event for
/// each one the `previous` list did not hold.
pub fn refusal_events(
    refused: &BTreeMap<String, String>,
    rev: &str,
    previous: &[Refusal],
) -> (Vec<Refusal>, Vec<Event>) {
    let known: BTreeSet<(&str, &str)> = previous
        .iter()
        .map(|r| (r.device.as_str(), r.revision.as_str()))
        .collect();
    let mut events = Vec::new();
    let mut listed = Vec::new();
    for (device, reason) in refused.iter().take(MAX_LISTED_REFUSALS) {
        if !known.contains(&(device.as_str(), rev)) {
            events.push((
                EventType::Warning,
                reasons::DEVICE_REFUSED,
                format!(
                    "{device} refused revision {rev} ({reason}); it is excluded from the rollout, which goes on without it"
                ),
            ));
        }
        listed.push(Refusal {
            device: device.clone(),
            revision: rev.to_owned(),
            reason: reason.clone(),
        });
    }
    (listed, events)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::rollout::fixtures::{KEY, device, on, online, refusing, reporting};
    use edgefleet_crds::{EdgeDevice, ModelPhase};

    fn names(devices: &[EdgeDevice]) -> BTreeMap<String, Option<String>> {
        devices
            .iter()
            .map(|d| (d.metadata.name.clone().unwrap(), None))
            .collect()
    }

    #[test]
    fn only_a_named_local_refusal_of_the_current_revision_excludes_a_device() {
        // (device, whether it is refused)
        let cases = [
            (
                refusing(on(device("grant"), "r2"), "r2", "PluginGrantDenied"),
                true,
            ),
            (
                refusing(on(device("root"), "r2"), "r2", "UntrustedSigner"),
                true,
            ),
            // Any other failure is the revision's: the gates judge it.
            (
                refusing(on(device("broken"), "r2"), "r2", "DigestMismatch"),
                false,
            ),
            (
                reporting(on(device("plain"), "r2"), "r2", ModelState::Failed),
                false,
            ),
            // A refusal of another revision than the current one.
            (
                refusing(on(device("old"), "r1"), "r1", "PluginGrantDenied"),
                false,
            ),
            (
                online(reporting(on(device("fine"), "r2"), "r2", ModelState::Ready)),
                false,
            ),
        ];
        let devices: Vec<EdgeDevice> = cases.iter().map(|(d, _)| d.clone()).collect();
        let fleet = Fleet::new(KEY, &devices);
        let got = refused(&fleet, &names(&devices), "r2");
        let want: Vec<String> = cases
            .iter()
            .filter(|(_, r)| *r)
            .map(|(d, _)| d.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(got.keys().cloned().collect::<Vec<_>>(), want);
        assert_eq!(got["grant"], "PluginGrantDenied");
    }

    #[test]
    fn a_refusal_is_announced_once() {
        let refused = BTreeMap::from([("a".to_owned(), "PluginGrantDenied".to_owned())]);
        let (listed, events) = refusal_events(&refused, "r2", &[]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1, reasons::DEVICE_REFUSED);
        assert!(
            events[0]
                .2
                .starts_with("a refused revision r2 (PluginGrantDenied)"),
            "{}",
            events[0].2
        );
        let (again, events) = refusal_events(&refused, "r2", &listed);
        assert_eq!(again, listed);
        assert!(events.is_empty());
        // The same device refusing a new revision is news.
        let (_, events) = refusal_events(&refused, "r3", &listed);
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn devices_on_a_withdrawn_revision_move_to_a_stable_one_that_holds_or_lose_the_model() {
        let devices = [
            on(device("a"), "r1"),
            on(device("b"), "r2"),
            on(device("c"), "r3"),
            device("d"),
        ];
        let fleet = Fleet::new(KEY, &devices);
        let mut candidates = names(&devices);
        candidates.remove("c"); // no longer a candidate
        let why = |revs: &[&str]| -> BTreeMap<String, String> {
            revs.iter()
                .map(|r| ((*r).to_owned(), "signer gone".to_owned()))
                .collect()
        };
        let all = || devices.iter().map(|d| d.metadata.name.clone().unwrap());
        let revision_of = |a: &Assignments, n: &str| a[n].as_ref().map(|d| d.revision.clone());

        // r2 and r3 withdrawn, stable r1 holds: b (a candidate) moves to r1, c loses it.
        let (a, events) = withdraw(&fleet, &candidates, &why(&["r2", "r3"]), Some("r1"), all());
        assert_eq!(a.len(), 2, "{a:?}");
        assert_eq!(revision_of(&a, "b").as_deref(), Some("r1"));
        assert_eq!(revision_of(&a, "c"), None);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].1, reasons::REVISION_WITHDRAWN);
        assert_eq!(
            events[0].2,
            "revision r2 withdrawn: signer gone; 1 device(s) moved to revision r1, 0 unassigned"
        );

        // The stable revision withdrawn too: everyone on a withdrawn revision loses it.
        let (a, events) = withdraw(&fleet, &candidates, &why(&["r1", "r2"]), Some("r1"), all());
        assert_eq!(a.keys().cloned().collect::<Vec<_>>(), ["a", "b"]);
        assert!(a.values().all(Option::is_none));
        assert_eq!(
            events[0].2,
            "revision r1 withdrawn: signer gone; 1 device(s) unassigned"
        );

        // Nothing withdrawn: nothing changes.
        let (a, events) = withdraw(&fleet, &candidates, &BTreeMap::new(), Some("r1"), all());
        assert!(a.is_empty() && events.is_empty());
    }

    /// The fixture spec as an EdgeModel `ns/m` whose rollout of its revision has begun
    /// (step 0), with `stable` as the stable revision.
    fn model(stable: Option<&str>) -> (edgefleet_crds::EdgeModel, String) {
        let spec = crate::rollout::fixtures::spec(serde_json::json!({"site": "a"}));
        let rev = crate::rollout::revision(&spec);
        let mut m = edgefleet_crds::EdgeModel::new("m", spec);
        m.metadata.namespace = Some("ns".into());
        m.status = Some(edgefleet_crds::EdgeModelStatus {
            current_revision: Some(rev.clone()),
            current_step: Some(0),
            stable_revision: stable.map(str::to_owned),
            ..Default::default()
        });
        (m, rev)
    }

    fn plan_with(
        m: &edgefleet_crds::EdgeModel,
        devices: &[EdgeDevice],
        pools: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector],
        withdrawn: &BTreeMap<String, String>,
    ) -> crate::rollout::Plan {
        let trust = Trust {
            signature: &Ok(()),
            pools,
            withdrawn,
        };
        crate::rollout::plan(m, devices, &trust, crate::rollout::fixtures::now())
    }

    #[test]
    fn a_local_refusal_excludes_one_device_while_any_other_failure_fails_the_gate() {
        use crate::rollout::fixtures::attested;
        let (m, rev) = model(None);
        let all = [Default::default()];
        let ready = online(attested(reporting(
            on(device("a"), &rev),
            &rev,
            ModelState::Ready,
        )));
        // (the other device's report reason, phase, failed count, refused count, event)
        let cases = [
            (
                "PluginGrantDenied",
                ModelPhase::Available,
                0,
                1,
                reasons::DEVICE_REFUSED,
            ),
            (
                "UntrustedSigner",
                ModelPhase::Available,
                0,
                1,
                reasons::DEVICE_REFUSED,
            ),
            (
                "DigestMismatch",
                ModelPhase::Degraded,
                1,
                0,
                reasons::HEALTH_GATE_FAILED,
            ),
        ];
        for (reason, phase, failed, refused, event) in cases {
            let other = online(attested(refusing(on(device("b"), &rev), &rev, reason)));
            let p = plan_with(&m, &[ready.clone(), other], &all, &BTreeMap::new());
            assert_eq!(p.status.phase, Some(phase), "{reason}: {:?}", p.status);
            assert_eq!(p.status.devices.failed, failed, "{reason}");
            assert_eq!(p.status.devices.refused, refused, "{reason}");
            assert!(
                p.events.iter().any(|e| e.1 == event),
                "{reason}: {:?}",
                p.events
            );
            if refused == 1 {
                // The refusing device keeps its assignment, and only it is listed.
                assert!(!p.assignments.contains_key("b"), "{:?}", p.assignments);
                assert_eq!(p.status.refusals[0].device, "b");
                assert_eq!(p.status.stable_revision.as_deref(), Some(rev.as_str()));
                let available = p
                    .status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Available")
                    .unwrap();
                assert_eq!(available.status, "True", "{available:?}");
                assert_eq!(
                    available.message,
                    "1 of 2 targeted devices ready (1 refused it)"
                );
            }
        }
    }

    #[test]
    fn a_withdrawn_stable_revision_is_no_rollback_target_and_its_devices_lose_it() {
        use crate::rollout::fixtures::attested;
        let (m, rev) = model(Some("old"));
        let all = [Default::default()];
        let devices = [
            online(attested(reporting(
                on(device("a"), "old"),
                "old",
                ModelState::Ready,
            ))),
            online(attested(reporting(
                on(device("b"), &rev),
                &rev,
                ModelState::Loading,
            ))),
        ];
        let withdrawn = BTreeMap::from([("old".to_owned(), "signer gone".to_owned())]);
        let p = plan_with(&m, &devices, &all, &withdrawn);
        assert_eq!(p.status.stable_revision, None);
        assert_eq!(p.assignments.get("a"), Some(&None), "{:?}", p.assignments);
        assert!(p.events.iter().any(|e| e.1 == reasons::REVISION_WITHDRAWN));
        // Not withdrawn: a keeps the stable revision.
        let p = plan_with(&m, &devices, &all, &BTreeMap::new());
        assert_eq!(p.status.stable_revision.as_deref(), Some("old"));
        assert!(!p.assignments.contains_key("a"));
        assert!(!p.events.iter().any(|e| e.1 == reasons::REVISION_WITHDRAWN));
    }

    #[test]
    fn without_a_bound_pool_there_is_no_candidate_and_the_status_says_why() {
        use crate::rollout::fixtures::attested;
        let (m, _) = model(None);
        let devices = [online(attested(device("a")))];
        let progressing = |p: &crate::rollout::Plan| {
            let c = p
                .status
                .conditions
                .iter()
                .find(|c| c.type_ == "Progressing")
                .unwrap();
            (c.reason.clone(), c.message.clone())
        };
        let p = plan_with(&m, &devices, &[], &BTreeMap::new());
        assert_eq!(p.status.phase, Some(ModelPhase::Pending));
        assert_eq!(
            progressing(&p),
            (
                reasons::NO_POOL.to_owned(),
                "no EdgeTrustPolicy binds a device pool to namespace ns".to_owned()
            )
        );
        let elsewhere: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector =
            serde_json::from_value(serde_json::json!({"matchLabels": {"site": "b"}})).unwrap();
        let p = plan_with(&m, &devices, &[elsewhere], &BTreeMap::new());
        assert_eq!(
            progressing(&p).1,
            "the selector matches 1 device(s), none in a device pool bound to namespace ns"
        );
        assert!(p.assignments.is_empty());
        let p = plan_with(&m, &devices, &[Default::default()], &BTreeMap::new());
        assert_eq!(
            p.assignments.len(),
            1,
            "a bound pool holding the device: it is assigned"
        );
    }
}
