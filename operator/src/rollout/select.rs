//! Selection: which devices may run the model at all (the candidates), which variant
//! each gets, and why the others are excluded. A candidate is selected, in a device
//! pool an EdgeTrustPolicy binds to the model's namespace, approved, `Attested` under
//! the required policy with an unexpired, allowed result of an accepted evidence kind,
//! and has the memory its variant (or the default artifact) needs.

use std::collections::BTreeMap;

use edgefleet_crds::conditions::{self as cond, Status};
use edgefleet_crds::model::ModelVariant;
use edgefleet_crds::{EdgeDevice, EdgeModelSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

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
    /// The selector matches, but the device is in no device pool that an
    /// EdgeTrustPolicy binds to the model's namespace.
    NotInNamespacePool,
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
        .is_some_and(|c| Status::parse(&c.status) == Some(Status::True))
}

/// The variant a device gets (`None`: the default artifact), or why it gets nothing.
/// `pools` are the selectors of the device pools bound to the model's namespace.
pub fn candidate(
    spec: &EdgeModelSpec,
    selector: &Selector,
    pools: &[Selector],
    device: &EdgeDevice,
    now: Timestamp,
) -> Result<Option<String>, Excluded> {
    if !selector.matches(device.labels()) {
        return Err(Excluded::NotSelected);
    }
    if !pools.iter().any(|p| p.matches(device.labels())) {
        return Err(Excluded::NotInNamespacePool);
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

/// The devices selected for a model, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// The candidates, in name order, with the variant each gets (`None`: the default
    /// artifact).
    pub candidates: BTreeMap<String, Option<String>>,
    /// Devices the model targets: the candidates, and the approved devices the selector
    /// matches in a bound pool that are not candidates (not attested, or too little
    /// memory).
    pub targeted: i32,
    /// Why each device that is not a candidate is excluded.
    pub excluded: BTreeMap<String, Excluded>,
}

/// Selects the candidates for `spec` among `devices` at `now`, within the device pools
/// `pools` (the selectors of the pools bound to the model's namespace). A selector
/// that does not parse selects no device; a pool whose selector does not parse holds
/// none.
pub fn select(
    spec: &EdgeModelSpec,
    devices: &[EdgeDevice],
    pools: &[LabelSelector],
    now: Timestamp,
) -> Selection {
    let selector: Result<Selector, _> = spec.selector.clone().try_into();
    let pools: Vec<Selector> = pools
        .iter()
        .filter_map(|p| p.clone().try_into().ok())
        .collect();
    let mut selection = Selection::default();
    for d in devices {
        let result = match &selector {
            Ok(sel) => candidate(spec, sel, &pools, d, now),
            Err(_) => Err(Excluded::NotSelected),
        };
        match result {
            Ok(variant) => {
                selection.targeted += 1;
                selection.candidates.insert(d.name_any(), variant);
            }
            Err(e) => {
                let outside = matches!(e, Excluded::NotSelected | Excluded::NotInNamespacePool);
                if !outside && d.spec.approved {
                    selection.targeted += 1;
                }
                selection.excluded.insert(d.name_any(), e);
            }
        }
    }
    selection
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
    fn selection_targets_approved_matches_and_keeps_only_attested_candidates() {
        use crate::rollout::fixtures::{attested, device, now, spec};
        let mut elsewhere = attested(device("elsewhere"));
        elsewhere
            .metadata
            .labels
            .get_or_insert_default()
            .insert("site".into(), "b".into());
        let mut unapproved = attested(device("unapproved"));
        unapproved.spec.approved = false;
        let mut small = attested(device("small"));
        small.spec.facts.memory = Quantity("1Mi".into());
        let mut spec = spec(serde_json::json!({"site": "a"}));
        spec.artifact.size_bytes = Some(2 << 20);
        let devices = [
            attested(device("a")),
            device("unattested"),
            elsewhere,
            unapproved,
            small,
        ];
        let s = select(&spec, &devices, &[LabelSelector::default()], now());
        assert_eq!(s.candidates, BTreeMap::from([("a".to_owned(), None)]));
        // The approved devices the selector matches count as targeted, candidates or not.
        assert_eq!(s.targeted, 3);
        assert_eq!(s.excluded["elsewhere"], Excluded::NotSelected);
        assert_eq!(s.excluded["unapproved"], Excluded::NotApproved);
        assert_eq!(s.excluded["small"], Excluded::TooLittleMemory);
        assert_eq!(
            s.excluded["unattested"],
            Excluded::NotAttested("no attestation".into())
        );
    }

    #[test]
    fn only_devices_in_a_pool_bound_to_the_namespace_are_candidates() {
        use crate::rollout::fixtures::{attested, device, now, spec};
        let mut store = attested(device("store"));
        store
            .metadata
            .labels
            .get_or_insert_default()
            .insert("pool".into(), "stores".into());
        let lab = attested(device("lab"));
        let devices = [store, lab];
        let spec = spec(serde_json::json!({"site": "a"}));
        let pool = |labels: serde_json::Value| -> LabelSelector {
            serde_json::from_value(serde_json::json!({"matchLabels": labels})).unwrap()
        };
        let bad: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchExpressions": [{"key": "pool", "operator": "Bogus"}]
        }))
        .unwrap();
        // (pools bound to the namespace, candidates, devices excluded NotInNamespacePool)
        let cases: [(Vec<LabelSelector>, &[&str], &[&str]); 5] = [
            (vec![LabelSelector::default()], &["lab", "store"], &[]),
            (
                vec![pool(serde_json::json!({"pool": "stores"}))],
                &["store"],
                &["lab"],
            ),
            (vec![], &[], &["lab", "store"]),
            (vec![bad], &[], &["lab", "store"]),
            (
                vec![
                    pool(serde_json::json!({"pool": "elsewhere"})),
                    pool(serde_json::json!({"site": "a"})),
                ],
                &["lab", "store"],
                &[],
            ),
        ];
        for (pools, want, outside) in cases {
            let s = select(&spec, &devices, &pools, now());
            let got: Vec<&str> = s.candidates.keys().map(String::as_str).collect();
            assert_eq!(got, want, "{pools:?}");
            for name in outside {
                assert_eq!(s.excluded[*name], Excluded::NotInNamespacePool, "{pools:?}");
            }
            // Devices outside every bound pool are not targeted either.
            assert_eq!(s.targeted, i32::try_from(want.len()).unwrap());
        }
    }
}
