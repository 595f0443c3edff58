//! The trust boundary's steps of a rollout:
//!
//! - withdrawal: a revision whose signers the trust policies no longer grant (a
//!   *withdrawn* revision) loses its template, so devices on it derive the stable
//!   revision when it still holds and they are candidates, and nothing otherwise;
//!   [`withdrawal_events`] names each withdrawn revision once (`RevisionWithdrawn`).
//! - [`refused`]: candidates that report the current revision `Failed` with a local
//!   refusal reason ([`edgefleet_proto::LOCAL_REFUSALS`]: the device's owner refused a
//!   plugin grant, or the device does not hold the signer's root). They keep deriving
//!   the revision (they serve nothing of it, and would only refuse again), taken out
//!   of the rollout (no gate failure, no step counts them), and counts them;
//!   [`refusal_events`] announces each once (`DeviceRefused`).

use std::collections::{BTreeMap, BTreeSet};

use edgefleet_crds::conditions::reasons;
use edgefleet_crds::device::ModelState;
use edgefleet_crds::model::Refusal;
use kube::runtime::events::EventType;

use super::Event;
use super::assign::Fleet;

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

/// One Warning event (`RevisionWithdrawn`) per `withdrawn` revision, saying where the
/// devices that report it go: to `stable` (when it is not withdrawn itself and the
/// device is a candidate), or nowhere. The plan itself moves nobody: a withdrawn
/// revision has no template, so no device derives it.
pub fn withdrawal_events(
    fleet: &Fleet<'_>,
    withdrawn: &BTreeMap<String, String>,
    stable: Option<&str>,
) -> Vec<Event> {
    let stable = stable.filter(|s| !withdrawn.contains_key(*s));
    withdrawn
        .iter()
        .map(|(rev, why)| {
            let (mut to_stable, mut unassigned) = (0, 0);
            for name in fleet.names() {
                if fleet.report(name, rev).is_some() {
                    if stable.is_some() && fleet.is_candidate(name) {
                        to_stable += 1;
                    } else {
                        unassigned += 1;
                    }
                }
            }
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
        .collect()
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
    use crate::rollout::fixtures::{
        KEY, device, fleet, on, online, rank_between, refusing, reporting,
    };
    use crate::rollout::revision_after;
    use edgefleet_crds::model::RANK_ALL;
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
        let fleet = fleet(&devices);
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
    fn a_withdrawn_revision_is_announced_with_where_its_devices_go() {
        let devices = [
            reporting(device("a"), "r1", ModelState::Ready),
            reporting(device("b"), "r2", ModelState::Ready),
            reporting(device("c"), "r3", ModelState::Ready),
            device("d"),
        ];
        // c is no longer a candidate.
        let ranks = ["a", "b", "d"].map(|n| (n.to_owned(), 0)).into();
        let fleet = Fleet::with(KEY, &devices, ranks, BTreeMap::new());
        let why = |revs: &[&str]| -> BTreeMap<String, String> {
            revs.iter()
                .map(|r| ((*r).to_owned(), "signer gone".to_owned()))
                .collect()
        };
        // r2 and r3 withdrawn, stable r1 holds: b (a candidate) goes to r1, c to nothing.
        let events = withdrawal_events(&fleet, &why(&["r2", "r3"]), Some("r1"));
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].1, reasons::REVISION_WITHDRAWN);
        assert_eq!(
            events[0].2,
            "revision r2 withdrawn: signer gone; 1 device(s) moved to revision r1, 0 unassigned"
        );
        assert_eq!(
            events[1].2,
            "revision r3 withdrawn: signer gone; 1 device(s) unassigned"
        );
        // The stable revision withdrawn too: everyone on a withdrawn revision loses it.
        let events = withdrawal_events(&fleet, &why(&["r1", "r2"]), Some("r1"));
        assert_eq!(
            events[0].2,
            "revision r1 withdrawn: signer gone; 1 device(s) unassigned"
        );
        // Nothing withdrawn: nothing to say.
        assert!(withdrawal_events(&fleet, &BTreeMap::new(), Some("r1")).is_empty());
    }

    /// The fixture spec as an EdgeModel `ns/m` whose rollout of its revision has begun
    /// (step 0) up to `rank`, with `stable` as the stable revision.
    fn model(stable: Option<&str>, rank: i64) -> (edgefleet_crds::EdgeModel, String) {
        let spec = crate::rollout::fixtures::spec(serde_json::json!({"site": "a"}));
        let rev = crate::rollout::revision(&spec);
        let mut m = edgefleet_crds::EdgeModel::new("m", spec);
        m.metadata.namespace = Some("ns".into());
        m.status = Some(edgefleet_crds::EdgeModelStatus {
            current_revision: Some(rev.clone()),
            current_step: Some(0),
            stable_revision: stable.map(str::to_owned),
            rollout_rank: Some(rank),
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
        let (m, rev) = model(None, RANK_ALL);
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
                // The refusing device keeps its revision, and only it is listed.
                assert_eq!(revision_after(&p.status, "", "b"), Some(rev.clone()));
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
        let (m, rev) = model(Some("old"), rank_between("", &["a"], &["b"]));
        let all = [Default::default()];
        let devices = [
            online(attested(reporting(
                on(device("b"), "old"),
                "old",
                ModelState::Ready,
            ))),
            online(attested(reporting(
                on(device("a"), &rev),
                &rev,
                ModelState::Loading,
            ))),
        ];
        let withdrawn = BTreeMap::from([("old".to_owned(), "signer gone".to_owned())]);
        let p = plan_with(&m, &devices, &all, &withdrawn);
        assert_eq!(p.status.stable_revision, None);
        assert_eq!(revision_after(&p.status, "", "b"), None);
        assert_eq!(revision_after(&p.status, "", "a"), Some(rev.clone()));
        assert!(p.events.iter().any(|e| e.1 == reasons::REVISION_WITHDRAWN));
        // Not withdrawn: b keeps the stable revision.
        let p = plan_with(&m, &devices, &all, &BTreeMap::new());
        assert_eq!(p.status.stable_revision.as_deref(), Some("old"));
        assert_eq!(revision_after(&p.status, "", "b").as_deref(), Some("old"));
        assert!(!p.events.iter().any(|e| e.1 == reasons::REVISION_WITHDRAWN));
    }

    #[test]
    fn without_a_bound_pool_there_is_no_candidate_and_the_status_says_why() {
        use crate::rollout::fixtures::attested;
        let (m, rev) = model(None, 0);
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
        assert_eq!(revision_after(&p.status, "", "a"), None);
        let p = plan_with(&m, &devices, &[Default::default()], &BTreeMap::new());
        assert_eq!(
            revision_after(&p.status, "", "a"),
            Some(rev),
            "a bound pool holding the device: it is assigned"
        );
    }
}
