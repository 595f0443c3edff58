//! Assignment: which devices' entries of this model change, and to what. The fleet as
//! one model sees it ([`Fleet`]: what each device is assigned and reports), and the
//! steps that produce assignment changes: revocation of devices that stopped being
//! candidates, rollback to the stable revision, moving devices to the new revision
//! within the unavailability budget, and giving the stable revision to candidates the
//! rollout has not reached. Each step returns only the changes (entries that differ
//! from what the device has); the plan merges them.

use std::collections::BTreeMap;

use edgefleet_crds::EdgeDevice;
use edgefleet_crds::conditions::{self as cond, reasons};
use edgefleet_crds::device::{DesiredModel, LoadedModel, ModelState};
use kube::ResourceExt;
use kube::runtime::events::EventType;

use super::Event;
use super::gates::Health;
use super::select::{Selection, condition_true};

/// For each device whose assignment of the model must change: the new one (`None`
/// removes it).
pub type Assignments = BTreeMap<String, Option<DesiredModel>>;

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

/// The devices by name, as the model `key` (`namespace/name`) sees them.
#[derive(Debug, Clone)]
pub struct Fleet<'a> {
    key: &'a str,
    by_name: BTreeMap<String, &'a EdgeDevice>,
}

impl<'a> Fleet<'a> {
    /// `devices` as the model `key` sees them.
    pub fn new(key: &'a str, devices: &'a [EdgeDevice]) -> Self {
        Self {
            key,
            by_name: devices.iter().map(|d| (d.name_any(), d)).collect(),
        }
    }

    /// The device called `name`.
    pub fn device(&self, name: &str) -> Option<&'a EdgeDevice> {
        self.by_name.get(name).copied()
    }

    /// The model's entry in `name`'s desiredModels.
    pub fn assigned(&self, name: &str) -> Option<&'a DesiredModel> {
        self.device(name).and_then(|d| assigned(d, self.key))
    }

    /// Whether `name` is assigned revision `rev`.
    pub fn on(&self, name: &str, rev: &str) -> bool {
        self.assigned(name).is_some_and(|a| a.revision == rev)
    }

    /// What `name` reports for the model at revision `rev`.
    pub fn state(&self, name: &str, rev: &str) -> Option<ModelState> {
        self.device(name).and_then(|d| reported(d, self.key, rev))
    }

    /// `name`'s whole report of the model at revision `rev`.
    pub fn report(&self, name: &str, rev: &str) -> Option<&'a LoadedModel> {
        self.device(name)?
            .status
            .as_ref()?
            .models
            .iter()
            .find(|m| m.model == self.key && m.revision == rev)
    }

    /// Whether `name` is `Ready` (its heartbeat lease holds).
    pub fn online(&self, name: &str) -> bool {
        self.device(name)
            .is_some_and(|d| condition_true(d, cond::READY))
    }

    /// The entry that assigns revision `rev` (with `variant`).
    pub fn desired(&self, rev: &str, variant: &Option<String>) -> DesiredModel {
        DesiredModel {
            model: self.key.to_owned(),
            revision: rev.to_owned(),
            variant: variant.clone(),
        }
    }

    /// Records `desired` for `name` in `changes` when it differs from what the device
    /// has.
    pub fn want(&self, changes: &mut Assignments, name: &str, desired: Option<DesiredModel>) {
        let current = self.assigned(name).cloned();
        if current != desired {
            changes.insert(name.to_owned(), desired);
        }
    }

    /// The revision `name` is assigned once `assignments` are applied.
    pub fn after(&self, assignments: &Assignments, name: &str) -> Option<String> {
        match assignments.get(name) {
            Some(a) => a.as_ref().map(|a| a.revision.clone()),
            None => self.assigned(name).map(|a| a.revision.clone()),
        }
    }
}

/// Revocation: devices that are assigned the model but are no longer candidates lose
/// it, each with a warning that says why.
pub fn revoke(fleet: &Fleet<'_>, selection: &Selection) -> (Assignments, Vec<Event>) {
    let mut changes = Assignments::new();
    let mut events = Vec::new();
    for (name, d) in &fleet.by_name {
        if !selection.candidates.contains_key(name) && assigned(d, fleet.key).is_some() {
            let why = selection
                .excluded
                .get(name)
                .map_or_else(String::new, |e| format!("{e:?}"));
            events.push((
                EventType::Warning,
                reasons::UNASSIGNED,
                format!("{name} no longer qualifies ({why}); model unassigned"),
            ));
            fleet.want(&mut changes, name, None);
        }
    }
    (changes, events)
}

/// Rollback: the candidates on `rev` move back to `stable`. `None` when there is no
/// stable revision other than `rev` (then nothing moves).
pub fn back_to_stable(
    fleet: &Fleet<'_>,
    candidates: &BTreeMap<String, Option<String>>,
    stable: Option<&str>,
    rev: &str,
) -> Option<(String, Assignments)> {
    let stable = stable.filter(|s| *s != rev)?;
    let mut changes = Assignments::new();
    for (name, variant) in candidates {
        if fleet.on(name, rev) {
            fleet.want(&mut changes, name, Some(fleet.desired(stable, variant)));
        }
    }
    Some((stable.to_owned(), changes))
}

/// Moves more candidates to `rev`, in name order, until `target` devices are on it or
/// `budget` devices would be not ready at once. Only `Ready` devices move.
pub fn move_devices(
    fleet: &Fleet<'_>,
    candidates: &BTreeMap<String, Option<String>>,
    health: &Health<'_>,
    rev: &str,
    target: usize,
    budget: usize,
) -> Assignments {
    let mut changes = Assignments::new();
    let unavailable = health.updated.len() - health.ready.len();
    let mut room = budget.saturating_sub(unavailable);
    let mut moving = health.updated.len();
    for (name, variant) in candidates {
        if moving >= target || room == 0 {
            break;
        }
        if !fleet.on(name, rev) && fleet.online(name) {
            fleet.want(&mut changes, name, Some(fleet.desired(rev, variant)));
            moving += 1;
            room -= 1;
        }
    }
    changes
}

/// Candidates outside the rollout's reach so far (assigned nothing, not moving to `rev`
/// in `assignments`, and `Ready`) get the `stable` revision.
pub fn fill_stable(
    fleet: &Fleet<'_>,
    candidates: &BTreeMap<String, Option<String>>,
    assignments: &Assignments,
    stable: &str,
    rev: &str,
) -> Assignments {
    let mut changes = Assignments::new();
    for (name, variant) in candidates {
        let on_any = fleet.assigned(name);
        let moving_now = assignments
            .get(name)
            .is_some_and(|a| a.as_ref().is_some_and(|a| a.revision == rev));
        if on_any.is_none() && !moving_now && stable != rev && fleet.online(name) {
            fleet.want(&mut changes, name, Some(fleet.desired(stable, variant)));
        }
    }
    changes
}
