//! `EdgeTrustPolicy`: what the cluster's owner trusts, which no EdgeModel author can
//! widen. Cluster-scoped (short name `etp`): the signers whose bundles devices may run,
//! each granted to namespaces, and the device pools each namespace may target. Several
//! policies are a union. Without any policy nothing is trusted and no namespace may
//! target any device.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The prefix of the labels a device asks for itself (at enrolment). A pool must not
/// select on them: a device would choose its own pool.
pub const DEVICE_LABEL_PREFIX: &str = "device.edgefleet.io/";

/// Signers and device pools, each granted to namespaces.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "edgefleet.io",
    version = "v1alpha1",
    kind = "EdgeTrustPolicy",
    plural = "edgetrustpolicies",
    shortname = "etp",
    category = "edgefleet",
    derive = "PartialEq",
    doc = "EdgeTrustPolicy lists the signers devices may trust and the device pools each namespace may target; EdgeModels only pick from it.",
    printcolumn(
        name = "Signers",
        type_ = "string",
        json_path = ".spec.signers[*].name",
        description = "Signers"
    ),
    printcolumn(
        name = "Pools",
        type_ = "string",
        json_path = ".spec.devicePools[*].name",
        description = "Device pools"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeTrustPolicySpec {
    /// Identities trusted to sign models and plugins, and the namespaces whose
    /// EdgeModels may name each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub signers: Vec<PolicySigner>,
    /// Groups of devices (by the labels an administrator sets), and the namespaces whose
    /// EdgeModels may target each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub device_pools: Vec<DevicePool>,
}

/// A trusted signer (a pinned public key, or a pinned certificate root with the
/// identities a leaf certificate may carry), granted to namespaces.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.publicKey) != has(self.certificateRoot)")
    .message("a signer has exactly one of publicKey and certificateRoot"))]
#[x_kube(validation = Rule::new("!has(self.certificateRoot) || (has(self.identities) && size(self.identities) > 0)")
    .message("a certificateRoot signer must pin at least one identity"))]
#[x_kube(validation = Rule::new("!has(self.publicKey) || !has(self.identities)")
    .message("identities apply only to certificateRoot signers"))]
pub struct PolicySigner {
    /// The name EdgeModels pick the signer by (`spec.signers[].name`).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// PEM public key (P-256, P-384 or P-521) that signs bundles directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16384))]
    pub public_key: Option<String>,
    /// PEM root certificate the bundle's leaf certificate must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub certificate_root: Option<String>,
    /// Identities the leaf certificate must carry (SAN email, SAN URI or subject common
    /// name); an EdgeModel may narrow them to a subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 512)))]
    pub identities: Option<Vec<String>>,
    /// Namespaces whose EdgeModels may use this signer: names, or globs with `*`
    /// (`*` for all, `team-*`).
    #[schemars(
        length(min = 1, max = 64),
        inner(
            length(min = 1, max = 63),
            regex(pattern = r"^[a-z0-9*]([-a-z0-9*]*[a-z0-9*])?$")
        )
    )]
    pub namespaces: Vec<String>,
}

impl PolicySigner {
    /// The signer as an EdgeModel's resolved `spec.signers` entry (without namespaces).
    pub fn trusted(&self) -> crate::TrustedSigner {
        crate::TrustedSigner {
            name: self.name.clone(),
            public_key: self.public_key.clone(),
            certificate_root: self.certificate_root.clone(),
            identities: self.identities.clone(),
        }
    }
}

/// A group of devices, by the labels an administrator sets on EdgeDevices, granted to
/// namespaces.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DevicePool {
    /// The pool's name, for status messages.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The devices in the pool. An empty selector selects every device.
    #[serde(default)]
    pub selector: PoolSelector,
    /// Namespaces whose EdgeModels may target the pool: names, or globs with `*`.
    #[schemars(
        length(min = 1, max = 64),
        inner(
            length(min = 1, max = 63),
            regex(pattern = r"^[a-z0-9*]([-a-z0-9*]*[a-z0-9*])?$")
        )
    )]
    pub namespaces: Vec<String>,
}

/// A label selector (as `metav1.LabelSelector`, bounded) over the labels an
/// administrator sets: keys under `device.edgefleet.io/`, which devices choose
/// themselves, are refused.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.matchLabels) || self.matchLabels.all(k, !k.startsWith('device.edgefleet.io/'))")
    .message("a device pool must not select on device-owned labels (device.edgefleet.io/)"))]
#[x_kube(validation = Rule::new("!has(self.matchExpressions) || self.matchExpressions.all(e, !e.key.startsWith('device.edgefleet.io/'))")
    .message("a device pool must not select on device-owned labels (device.edgefleet.io/)"))]
pub struct PoolSelector {
    /// Labels a device must carry, with these values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded_labels")]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Requirements on labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub match_expressions: Option<Vec<PoolRequirement>>,
}

fn bounded_labels(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 16,
        "additionalProperties": {"type": "string", "maxLength": 63},
    })
}

/// One requirement of a pool selector (as `metav1.LabelSelectorRequirement`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolRequirement {
    /// The label key.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    #[schemars(regex(pattern = r"^(In|NotIn|Exists|DoesNotExist)$"))]
    pub operator: String,
    /// Values, for `In` and `NotIn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(max = 63)))]
    pub values: Option<Vec<String>>,
}

impl PoolSelector {
    /// The same selector as a `metav1.LabelSelector`.
    pub fn label_selector(&self) -> LabelSelector {
        LabelSelector {
            match_labels: self.match_labels.clone(),
            match_expressions: self.match_expressions.as_ref().map(|es| {
                es.iter()
                    .map(|e| LabelSelectorRequirement {
                        key: e.key.clone(),
                        operator: e.operator.clone(),
                        values: e.values.clone(),
                    })
                    .collect()
            }),
        }
    }

    /// Whether the selector names a device-owned label (the API server refuses such a
    /// pool; this is the same check for policies it never validated).
    pub fn uses_device_labels(&self) -> bool {
        self.match_labels
            .iter()
            .flatten()
            .any(|(k, _)| k.starts_with(DEVICE_LABEL_PREFIX))
            || self
                .match_expressions
                .iter()
                .flatten()
                .any(|e| e.key.starts_with(DEVICE_LABEL_PREFIX))
    }
}

/// Whether namespace `ns` matches `pattern`: a name, or a glob where `*` stands for any
/// run of characters (`*`, `team-*`, `*-prod`); the same glob as a token's device name
/// pattern ([`crate::token::name_matches`]).
pub fn namespace_matches(pattern: &str, ns: &str) -> bool {
    crate::token::name_matches(pattern, ns)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn namespace_patterns_match_names_and_globs() {
        for (pattern, ns, want) in [
            ("retail", "retail", true),
            ("retail", "retail-eu", false),
            ("retail", "xretail", false),
            ("*", "anything", true),
            ("team-*", "team-a", true),
            ("team-*", "team-", true),
            ("team-*", "teams", false),
            ("*-prod", "shop-prod", true),
            ("*-prod", "shop-dev", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxcyyb", false),
            ("ab*ba", "aba", false),
        ] {
            assert_eq!(namespace_matches(pattern, ns), want, "{pattern} ~ {ns}");
        }
    }

    #[test]
    fn a_pool_selector_reads_as_a_label_selector_and_names_device_labels() {
        let s: PoolSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"site": "a"},
            "matchExpressions": [{"key": "device.edgefleet.io/pool", "operator": "Exists"}],
        }))
        .unwrap();
        assert!(s.uses_device_labels());
        let l = s.label_selector();
        assert_eq!(l.match_labels.unwrap()["site"], "a");
        let ok: PoolSelector =
            serde_json::from_value(serde_json::json!({"matchLabels": {"site": "a"}})).unwrap();
        assert!(!ok.uses_device_labels());
    }
}
