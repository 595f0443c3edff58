//! The cluster's trust policies (`EdgeTrustPolicy`) as the operator applies them.
//!
//! - [`TrustPolicies`]: the watch cache of the policies (a reflector) with a tick per
//!   change. The gateway keeps one and shares it with the EdgeModel reconciler (as it
//!   shares its device cache); without a gateway the reconciler keeps its own. Every
//!   change re-plans every EdgeModel and wakes every device's desired-state poll.
//! - [`Grants`]: what the policies grant one namespace, a pure value: [`Grants::resolve`]
//!   turns an EdgeModel's `spec.signers` (bare names, or full signers that must equal
//!   the policy's) into the full signers its revision is verified against and devices
//!   receive, or the `UntrustedSigner` message; [`Grants::still_granted`] keeps the
//!   signers of a kept revision that the policies still grant (the rest withdraw it);
//!   [`Grants::pools`] are the device pools the namespace may target.
//! - [`all_signers`]: every signer of every policy, which the gateway sends devices as
//!   the set an agent with no local pins pins at first contact.
//!
//! Several policies are a union. No policy grants nothing: every signer is untrusted
//! and no device is in a pool.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use edgefleet_crds::TrustedSigner;
use edgefleet_crds::trust_policy::{EdgeTrustPolicy, PolicySigner, namespace_matches};
use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt as _;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};

/// The watch cache of EdgeTrustPolicies, and a tick per change. Clones share both.
#[derive(Debug, Clone)]
pub struct TrustPolicies {
    store: Store<EdgeTrustPolicy>,
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl TrustPolicies {
    /// The cache over `client`, and the future that keeps it (run it for as long as
    /// the cache is read).
    pub fn watch(
        client: kube::Client,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (store, writer) = reflector::store();
        let changed = Arc::new(tokio::sync::watch::channel(0u64).0);
        let this = Self {
            store,
            changed: changed.clone(),
        };
        let driver = async move {
            reflector::reflector(
                writer,
                watcher(
                    Api::<EdgeTrustPolicy>::all(client),
                    watcher::Config::default(),
                ),
            )
            .default_backoff()
            .touched_objects()
            .for_each(|e| {
                match e {
                    Ok(_) => changed.send_modify(|n| *n = n.wrapping_add(1)),
                    Err(e) => tracing::warn!(error = %e, "watching EdgeTrustPolicies"),
                }
                futures::future::ready(())
            })
            .await;
        };
        (this, driver)
    }

    /// Waits up to `wait` until the cache holds its first listing. Before that no
    /// plan may be made: an empty cache would withdraw every revision.
    pub async fn ready(&self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.store.wait_until_ready())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Every policy in the cache, by name.
    pub fn policies(&self) -> Vec<EdgeTrustPolicy> {
        let mut all: Vec<EdgeTrustPolicy> =
            self.store.state().iter().map(|p| (**p).clone()).collect();
        all.sort_by_key(|p| p.name_any());
        all
    }

    /// A tick per change to any policy (deletions included).
    pub fn changes(&self) -> impl futures::Stream<Item = ()> + Send + 'static + use<> {
        let rx = self.changed.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            rx.borrow_and_update();
            Some(((), rx))
        })
    }
}

/// A PEM text without its whitespace, for comparing keys and roots as written.
fn pem_key(pem: &str) -> String {
    pem.chars().filter(|c| !c.is_whitespace()).collect()
}

/// Whether `s` (a full signer) is `granted`, or `granted` narrowed: the same key, or
/// the same root with a subset of its identities.
fn matches(s: &TrustedSigner, granted: &PolicySigner) -> bool {
    if s.name != granted.name {
        return false;
    }
    match (&s.public_key, &s.certificate_root) {
        (Some(k), None) => granted
            .public_key
            .as_deref()
            .is_some_and(|g| pem_key(g) == pem_key(k)),
        (None, Some(root)) => {
            let same_root = granted
                .certificate_root
                .as_deref()
                .is_some_and(|g| pem_key(g) == pem_key(root));
            let allowed: BTreeSet<&String> = granted.identities.iter().flatten().collect();
            let asked = s.identities.iter().flatten().collect::<Vec<_>>();
            same_root && !asked.is_empty() && asked.iter().all(|i| allowed.contains(i))
        }
        _ => false,
    }
}

/// What the trust policies grant one namespace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grants {
    namespace: String,
    /// The signers granted here (policy name, signer).
    signers: Vec<(String, PolicySigner)>,
    /// Names of signers some policy holds but grants only to other namespaces.
    elsewhere: BTreeSet<String>,
    /// The device pools bound here: `policy/pool` and its selector.
    pools: Vec<(String, LabelSelector)>,
}

impl Grants {
    /// What `policies` grant `namespace`. A pool selecting on device-owned labels is
    /// ignored (the API server refuses one; this holds for any that bypassed it).
    pub fn new(policies: &[EdgeTrustPolicy], namespace: &str) -> Self {
        let mut g = Self {
            namespace: namespace.to_owned(),
            ..Self::default()
        };
        let granted =
            |patterns: &[String]| patterns.iter().any(|p| namespace_matches(p, namespace));
        for p in policies {
            let policy = p.name_any();
            for s in &p.spec.signers {
                if granted(&s.namespaces) {
                    g.signers.push((policy.clone(), s.clone()));
                } else {
                    g.elsewhere.insert(s.name.clone());
                }
            }
            for pool in &p.spec.device_pools {
                if granted(&pool.namespaces) && !pool.selector.uses_device_labels() {
                    g.pools.push((
                        format!("{policy}/{}", pool.name),
                        pool.selector.label_selector(),
                    ));
                }
            }
        }
        g
    }

    /// The full signers `refs` resolve to, in order: a bare name picks the signer of
    /// that name granted here (refused when two differ); a full signer must equal one
    /// granted here (a certificate root may narrow its identities). `Err` is the
    /// `UntrustedSigner` message naming every signer that does not resolve.
    pub fn resolve(&self, refs: &[TrustedSigner]) -> Result<Vec<TrustedSigner>, String> {
        let mut out = Vec::new();
        let mut refused = Vec::new();
        for r in refs {
            let named: Vec<&PolicySigner> = self
                .signers
                .iter()
                .map(|(_, s)| s)
                .filter(|s| s.name == r.name)
                .collect();
            let ns = &self.namespace;
            if named.is_empty() {
                refused.push(if self.elsewhere.contains(&r.name) {
                    format!(
                        "signer {} is not granted to namespace {ns} by any EdgeTrustPolicy",
                        r.name
                    )
                } else {
                    format!(
                        "no EdgeTrustPolicy lets namespace {ns} use signer {}",
                        r.name
                    )
                });
                continue;
            }
            let bare = r.public_key.is_none() && r.certificate_root.is_none();
            if bare {
                let mut distinct: Vec<TrustedSigner> = Vec::new();
                for s in &named {
                    let t = s.trusted();
                    if !distinct.contains(&t) {
                        distinct.push(t);
                    }
                }
                match distinct.as_slice() {
                    [one] => out.push(one.clone()),
                    _ => refused.push(format!(
                        "signer {} is ambiguous: the EdgeTrustPolicies granting it to namespace {ns} hold {} different signers by that name; name it in full",
                        r.name,
                        distinct.len()
                    )),
                }
            } else if named.iter().any(|s| matches(r, s)) {
                out.push(r.clone());
            } else {
                refused.push(format!(
                    "signer {} differs from every EdgeTrustPolicy signer of that name granted to namespace {ns} (another key or root, or identities it does not allow)",
                    r.name
                ));
            }
        }
        if refused.is_empty() {
            Ok(out)
        } else {
            Err(refused.join("; "))
        }
    }

    /// The signers among `signers` (a kept revision's, in full) the policies still
    /// grant here.
    pub fn still_granted(&self, signers: &[TrustedSigner]) -> Vec<TrustedSigner> {
        signers
            .iter()
            .filter(|s| self.signers.iter().any(|(_, g)| matches(s, g)))
            .cloned()
            .collect()
    }

    /// The device pools bound here: `policy/pool` and its selector.
    pub fn pools(&self) -> &[(String, LabelSelector)] {
        &self.pools
    }
}

/// Every signer of `policies`, each once, in name order: what devices are told the
/// cluster trusts.
pub fn all_signers(policies: &[EdgeTrustPolicy]) -> Vec<TrustedSigner> {
    let mut by_key: BTreeMap<(String, String), TrustedSigner> = BTreeMap::new();
    for s in policies.iter().flat_map(|p| &p.spec.signers) {
        let t = s.trusted();
        let key = serde_json::to_string(&t).unwrap_or_default();
        by_key.insert((t.name.clone(), key), t);
    }
    by_key.into_values().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn policy(name: &str, spec: serde_json::Value) -> EdgeTrustPolicy {
        serde_json::from_value(json!({
            "apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeTrustPolicy",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap()
    }

    fn signer(v: serde_json::Value) -> TrustedSigner {
        serde_json::from_value(v).unwrap()
    }

    const KEY_A: &str = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
    const KEY_B: &str = "-----BEGIN PUBLIC KEY-----\nBBBB\n-----END PUBLIC KEY-----\n";
    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nRRRR\n-----END CERTIFICATE-----\n";

    fn policies() -> Vec<EdgeTrustPolicy> {
        vec![
            policy(
                "models",
                json!({"signers": [
                    {"name": "models-team", "publicKey": KEY_A, "namespaces": ["retail", "team-*"]},
                    {"name": "ci", "certificateRoot": ROOT,
                     "identities": ["ci@example.com", "release@example.com"], "namespaces": ["*"]},
                    {"name": "labs", "publicKey": KEY_B, "namespaces": ["labs"]},
                ]}),
            ),
            policy(
                "pools",
                json!({"devicePools": [
                    {"name": "stores", "selector": {"matchLabels": {"site": "store"}}, "namespaces": ["retail"]},
                    {"name": "sneaky", "selector": {"matchLabels": {"device.edgefleet.io/pool": "x"}}, "namespaces": ["*"]},
                    {"name": "lab", "selector": {}, "namespaces": ["labs"]},
                ]}),
            ),
        ]
    }

    #[test]
    fn signers_resolve_only_as_the_policies_grant_them() {
        let retail = Grants::new(&policies(), "retail");
        let full_a = signer(json!({"name": "models-team", "publicKey": KEY_A}));
        let narrowed = signer(
            json!({"name": "ci", "certificateRoot": ROOT, "identities": ["ci@example.com"]}),
        );
        // (what the EdgeModel names, what it resolves to or the start of the refusal)
        type Case = (Vec<TrustedSigner>, Result<Vec<TrustedSigner>, &'static str>);
        let cases: Vec<Case> = vec![
            // A bare name picks the policy's signer.
            (
                vec![signer(json!({"name": "models-team"}))],
                Ok(vec![full_a.clone()]),
            ),
            // The same key in full (other line breaks) resolves to itself.
            (
                vec![signer(
                    json!({"name": "models-team", "publicKey": KEY_A.replace('\n', "\r\n")}),
                )],
                Ok(vec![signer(
                    json!({"name": "models-team", "publicKey": KEY_A.replace('\n', "\r\n")}),
                )]),
            ),
            // A certificate root may narrow its identities…
            (vec![narrowed.clone()], Ok(vec![narrowed])),
            // …but not widen them.
            (
                vec![signer(
                    json!({"name": "ci", "certificateRoot": ROOT, "identities": ["me@evil.example"]}),
                )],
                Err("signer ci differs from every EdgeTrustPolicy signer"),
            ),
            // Another key under a granted name.
            (
                vec![signer(json!({"name": "models-team", "publicKey": KEY_B}))],
                Err("signer models-team differs"),
            ),
            // A signer granted to another namespace only.
            (
                vec![signer(json!({"name": "labs"}))],
                Err("signer labs is not granted to namespace retail"),
            ),
            // A name no policy holds.
            (
                vec![signer(json!({"name": "stranger", "publicKey": KEY_B}))],
                Err("no EdgeTrustPolicy lets namespace retail use signer stranger"),
            ),
        ];
        for (refs, want) in cases {
            match (retail.resolve(&refs), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(got), Err(want)) => assert!(got.starts_with(want), "{got}"),
                (got, want) => panic!("{refs:?}: got {got:?}, want {want:?}"),
            }
        }
        // Globs grant namespaces.
        assert!(
            Grants::new(&policies(), "team-x")
                .resolve(&[signer(json!({"name": "models-team"}))])
                .is_ok()
        );
        assert!(
            Grants::new(&policies(), "teams")
                .resolve(&[signer(json!({"name": "models-team"}))])
                .is_err()
        );
    }

    #[test]
    fn no_policy_trusts_nothing_and_binds_no_pool() {
        let none = Grants::new(&[], "retail");
        assert_eq!(
            none.resolve(&[signer(json!({"name": "models-team", "publicKey": KEY_A}))])
                .unwrap_err(),
            "no EdgeTrustPolicy lets namespace retail use signer models-team"
        );
        assert!(none.pools().is_empty());
        assert!(all_signers(&[]).is_empty());
    }

    #[test]
    fn a_bare_name_with_two_different_signers_is_ambiguous() {
        let mut ps = policies();
        ps.push(policy(
            "rotation",
            json!({"signers": [{"name": "models-team", "publicKey": KEY_B, "namespaces": ["retail"]}]}),
        ));
        let g = Grants::new(&ps, "retail");
        let err = g
            .resolve(&[signer(json!({"name": "models-team"}))])
            .unwrap_err();
        assert!(err.contains("ambiguous"), "{err}");
        // In full, either key resolves.
        for key in [KEY_A, KEY_B] {
            let full = signer(json!({"name": "models-team", "publicKey": key}));
            assert_eq!(g.resolve(std::slice::from_ref(&full)).unwrap(), vec![full]);
        }
        // The same signer in two policies is not ambiguous.
        let mut same = policies();
        same.push(policy(
            "again",
            json!({"signers": [{"name": "models-team", "publicKey": KEY_A, "namespaces": ["retail"]}]}),
        ));
        assert!(
            Grants::new(&same, "retail")
                .resolve(&[signer(json!({"name": "models-team"}))])
                .is_ok()
        );
        assert_eq!(all_signers(&same).len(), 3);
    }

    #[test]
    fn kept_signers_are_those_still_granted() {
        let a = signer(json!({"name": "models-team", "publicKey": KEY_A}));
        let b = signer(json!({"name": "labs", "publicKey": KEY_B}));
        let retail = Grants::new(&policies(), "retail");
        assert_eq!(
            retail.still_granted(&[a.clone(), b.clone()]),
            vec![a.clone()]
        );
        // The signer removed from the policy: nothing is granted.
        let mut ps = policies();
        ps[0].spec.signers.retain(|s| s.name != "models-team");
        assert!(Grants::new(&ps, "retail").still_granted(&[a]).is_empty());
        assert_eq!(
            Grants::new(&ps, "labs").still_granted(std::slice::from_ref(&b)),
            vec![b]
        );
    }

    #[test]
    fn pools_bind_only_their_namespaces_and_never_device_labels() {
        let names = |ns: &str| {
            Grants::new(&policies(), ns)
                .pools()
                .iter()
                .map(|(n, _)| n.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("retail"), ["pools/stores"]);
        assert_eq!(names("labs"), ["pools/lab"]);
        assert!(
            names("other").is_empty(),
            "the device-label pool binds nothing"
        );
    }
}
