//! Assignment, derived: a candidate runs the current revision when its rank for the
//! model ([`device_rank`]) is below `status.rolloutRank`, and the stable revision
//! otherwise ([`edgefleet_crds::model::derived_revision`]). Nothing is written per
//! device: the gateway derives each device's desired state from the EdgeModel status
//! the same way, so an advance, a rollback or a revocation is one status write.
//!
//! [`Fleet`] is the fleet as one model sees it: what each device runs by derivation
//! before this plan, and what it reports. [`advance_rank`] moves the rollout over more
//! devices, in rank order, within the unavailability budget.

use std::collections::BTreeMap;

use edgefleet_crds::EdgeDevice;
use edgefleet_crds::conditions as cond;
use edgefleet_crds::device::{LoadedModel, ModelState};
use edgefleet_crds::model::{derived_revision, device_rank};
use kube::ResourceExt;

use super::gates::Health;
use super::select::condition_true;

/// Where a rollout stands: the revisions and the rank below which devices run the
/// current one (the EdgeModel status fields of the same names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    /// `status.currentRevision`.
    pub current: Option<String>,
    /// `status.stableRevision`.
    pub stable: Option<String>,
    /// `status.rolloutRank`.
    pub rank: i64,
}

impl Position {
    /// The revision a candidate of `rank` runs.
    pub fn revision(&self, rank: i64) -> Option<&str> {
        derived_revision(
            self.current.as_deref(),
            self.stable.as_deref(),
            Some(self.rank),
            rank,
        )
    }
}

/// The devices by name, as the model `key` (`namespace/name`) sees them.
#[derive(Debug, Clone)]
pub struct Fleet<'a> {
    key: &'a str,
    by_name: BTreeMap<String, &'a EdgeDevice>,
    /// Each candidate's rank for the model.
    ranks: BTreeMap<String, i64>,
    /// What each candidate runs before this plan.
    before: BTreeMap<String, String>,
}

impl<'a> Fleet<'a> {
    /// `devices` as the model `key` with UID `uid` sees them, the `candidates` at the
    /// rollout `position`.
    pub fn new<'c>(
        key: &'a str,
        uid: &str,
        devices: &'a [EdgeDevice],
        candidates: impl IntoIterator<Item = &'c String>,
        position: &Position,
    ) -> Self {
        let ranks: BTreeMap<String, i64> = candidates
            .into_iter()
            .map(|n| (n.clone(), device_rank(uid, n)))
            .collect();
        let before = ranks
            .iter()
            .filter_map(|(n, r)| Some((n.clone(), position.revision(*r)?.to_owned())))
            .collect();
        Self::with(key, devices, ranks, before)
    }

    /// `devices` where each device in `before` runs the revision it names (tests, and
    /// steps that need no ranks).
    pub fn with(
        key: &'a str,
        devices: &'a [EdgeDevice],
        ranks: BTreeMap<String, i64>,
        before: BTreeMap<String, String>,
    ) -> Self {
        Self {
            key,
            by_name: devices.iter().map(|d| (d.name_any(), d)).collect(),
            ranks,
            before,
        }
    }

    /// The model's key (`namespace/name`).
    pub fn key(&self) -> &'a str {
        self.key
    }

    /// The device called `name`.
    pub fn device(&self, name: &str) -> Option<&'a EdgeDevice> {
        self.by_name.get(name).copied()
    }

    /// `name`'s rank (0 for a device that is not a candidate).
    pub fn rank(&self, name: &str) -> i64 {
        self.ranks.get(name).copied().unwrap_or(0)
    }

    /// Whether `name` is a candidate.
    pub fn is_candidate(&self, name: &str) -> bool {
        self.ranks.contains_key(name)
    }

    /// Whether candidate `name` runs revision `rev` before this plan.
    pub fn on(&self, name: &str, rev: &str) -> bool {
        self.before.get(name).is_some_and(|r| r == rev)
    }

    /// What `name` reports for the model at revision `rev`.
    pub fn state(&self, name: &str, rev: &str) -> Option<ModelState> {
        self.report(name, rev).map(|m| m.state)
    }

    /// `name`'s whole report of the model at revision `rev`.
    pub fn report(&self, name: &str, rev: &str) -> Option<&'a LoadedModel> {
        self.reports(name).find(|m| m.revision == rev)
    }

    /// `name`'s reports of the model, at any revision.
    pub fn reports(&self, name: &str) -> impl Iterator<Item = &'a LoadedModel> + use<'a, '_> {
        self.device(name)
            .and_then(|d| d.status.as_ref())
            .map(|s| s.models.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|m| m.model == self.key)
    }

    /// Since when `name` has been `Ready` (its Ready condition's last transition).
    pub fn online_since(&self, name: &str) -> Option<k8s_openapi::jiff::Timestamp> {
        self.device(name)?
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == cond::READY)
            .map(|c| c.last_transition_time.0)
    }

    /// Whether `name` is `Ready` (its heartbeat lease holds).
    pub fn online(&self, name: &str) -> bool {
        self.device(name)
            .is_some_and(|d| condition_true(d, cond::READY))
    }

    /// The names of the devices.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.by_name.keys()
    }
}

/// The new `rolloutRank`: the rollout moves over more `candidates` in rank order until
/// `target` online devices run `rev`, or `budget` online devices would be updating at
/// once. The rank stops just past the last online device it takes, so it passes only
/// the offline devices whose ranks lie between those it takes (about the offline
/// share of a step): those neither count toward the target nor use the budget, and get
/// the revision when they come back. It never moves back, and only the plan's
/// completion makes it `RANK_ALL`.
pub fn advance_rank(
    fleet: &Fleet<'_>,
    candidates: &BTreeMap<String, Option<String>>,
    health: &Health<'_>,
    rank: i64,
    target: usize,
    budget: usize,
) -> i64 {
    let online_updated = health.updated.len() - health.offline.len();
    let unavailable = online_updated - health.ready.len();
    let mut room = budget.saturating_sub(unavailable);
    let mut moving = online_updated;
    let mut waiting: Vec<(i64, &String)> = candidates
        .keys()
        .map(|n| (fleet.rank(n), n))
        .filter(|(r, _)| *r >= rank)
        .collect();
    waiting.sort();
    let mut last_taken = None;
    for (r, name) in waiting {
        if !fleet.online(name) {
            continue;
        }
        if moving >= target || room == 0 {
            break;
        }
        moving += 1;
        room -= 1;
        last_taken = Some(r);
    }
    // A device that shares the last taken device's rank comes along (ranks are 48-bit:
    // ties are rare).
    last_taken.map_or(rank, |t| (t + 1).max(rank))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::fixtures::{KEY, device, online, reporting};

    fn fleet_of<'a>(
        devices: &'a [EdgeDevice],
        names: &'a BTreeMap<String, Option<String>>,
    ) -> Fleet<'a> {
        Fleet::new(KEY, "uid", devices, names.keys(), &Position::default())
    }

    #[test]
    fn the_rank_moves_over_online_devices_in_rank_order_within_the_budget() {
        let devices: Vec<EdgeDevice> = (0..6)
            .map(|i| {
                let d = device(&format!("d{i}"));
                if i == 2 { d } else { online(d) }
            })
            .collect();
        let names: BTreeMap<String, Option<String>> =
            devices.iter().map(|d| (d.name_any(), None)).collect();
        let fleet = fleet_of(&devices, &names);
        let mut by_rank: Vec<(i64, String)> =
            names.keys().map(|n| (fleet.rank(n), n.clone())).collect();
        by_rank.sort();
        let online_in_order: Vec<&(i64, String)> =
            by_rank.iter().filter(|(_, n)| n != "d2").collect();
        let health = Health::default();
        // Target 2, budget 5: the rank stops just past the second online device.
        let r = advance_rank(&fleet, &names, &health, 0, 2, 5);
        assert_eq!(r, online_in_order[1].0 + 1);
        let below: Vec<&String> = names.keys().filter(|n| fleet.rank(n) < r).collect();
        let online_below = below.iter().filter(|n| n.as_str() != "d2").count();
        assert_eq!(online_below, 2, "{below:?}");
        // Budget 1 stops after one device, whatever the target.
        let r1 = advance_rank(&fleet, &names, &health, 0, 5, 1);
        assert_eq!(r1, online_in_order[0].0 + 1);
        // Every online candidate taken: the rank stops just past the last one, so the
        // offline devices beyond it are not passed (RANK_ALL is the plan's completion).
        let last_online = online_in_order.last().unwrap().0;
        assert_eq!(
            advance_rank(&fleet, &names, &health, 0, 6, 6),
            last_online + 1
        );
        // Nothing to move: the rank stays where it is (never goes back).
        let held = advance_rank(&fleet, &names, &health, r, 0, 5);
        assert_eq!(held, r);
    }

    #[test]
    fn updating_devices_use_the_budget_and_offline_ones_do_not() {
        let devices = [
            online(reporting(device("a"), "r2", ModelState::Loading)),
            reporting(device("b"), "r2", ModelState::Ready),
            online(device("c")),
            online(device("d")),
        ];
        // a and b are on the revision already; c and d wait.
        let names: BTreeMap<String, Option<String>> =
            ["c", "d"].map(|n| (n.to_owned(), None)).into();
        let fleet = fleet_of(&devices, &names);
        let (a, b) = (&"a".to_owned(), &"b".to_owned());
        let health = Health {
            updated: vec![a, b],
            failed: vec![],
            ready: vec![],
            offline: vec![b],
        };
        let start = 0;
        // Budget 1 is used by a (online, loading): nothing moves.
        assert_eq!(advance_rank(&fleet, &names, &health, start, 4, 1), start);
        // Budget 2: one more online device moves; offline b used none of it.
        let r = advance_rank(&fleet, &names, &health, start, 4, 2);
        let moved: Vec<&String> = names
            .keys()
            .filter(|n| (start..r).contains(&fleet.rank(n)))
            .collect();
        assert_eq!(moved.len(), 1, "{moved:?}");
        assert!(["c", "d"].contains(&moved[0].as_str()));
    }
}
