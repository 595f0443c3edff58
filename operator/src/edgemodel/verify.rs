//! What the reconciler checks before it plans an EdgeModel, under the trust policies
//! of its namespace ([`crate::trust_policy::Grants`]):
//!
//! - every bundle given by URI (the model's, its variants', its plugins') is fetched
//!   once;
//! - `spec.signers` resolve to the policies' full signers (else `UntrustedSigner`), the
//!   model's bundle verifies against them and names the artifact
//!   ([`rollout::check_signature`]), and the current revision's template (with the
//!   resolved signers, which devices receive) has every bundle verified
//!   ([`rollout::verify_template`]);
//! - each kept revision template is reviewed: its signers that the policies no longer
//!   grant are dropped, and a template left with no signer, or whose bundles no longer
//!   verify against those left, is *withdrawn* (its template is dropped, so no device
//!   derives it any more).

use std::collections::BTreeMap;
use std::time::SystemTime;

use edgefleet_crds::conditions::reasons;
use edgefleet_crds::model::RevisionTemplate;
use edgefleet_crds::{EdgeModel, EdgeTrustPolicy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt as _;

use crate::rollout;
use crate::trust_policy::Grants;

/// What [`verify`] found.
#[derive(Debug)]
pub(super) struct Verified {
    /// The signature check of the current spec.
    pub signature: Result<(), (&'static str, String)>,
    /// The current revision's template, when its signature verified.
    pub template: Option<RevisionTemplate>,
    /// The kept templates that still hold (their signers narrowed to those granted).
    pub kept: Vec<RevisionTemplate>,
    /// The kept revisions withdrawn, and why.
    pub withdrawn: BTreeMap<String, String>,
    /// The selectors of the device pools bound to the namespace.
    pub pools: Vec<LabelSelector>,
}

/// Checks `model` under `policies`, fetching URI bundles with `bundles`.
pub(super) async fn verify(
    model: &EdgeModel,
    bundles: Option<&crate::bundles::BundleFetcher>,
    policies: &[EdgeTrustPolicy],
) -> Verified {
    let now = SystemTime::now();
    let ns = model.namespace().unwrap_or_default();
    let grants = Grants::new(policies, &ns);
    let spec = &model.spec;
    let mut uris: Vec<&str> = Vec::new();
    uris.extend(spec.signature.uri.as_deref());
    for v in spec.variants.iter().flatten() {
        uris.extend(v.signature.uri.as_deref());
    }
    for p in spec.plugins.iter().flatten() {
        uris.extend(p.signature.uri.as_deref());
    }
    let mut fetched: BTreeMap<String, Result<String, String>> = BTreeMap::new();
    for uri in uris {
        if !fetched.contains_key(uri) {
            let r = match bundles {
                Some(fetcher) => fetcher.fetch(uri).await,
                None => Err("the operator has no bundle CA roots".into()),
            };
            fetched.insert(uri.to_owned(), r);
        }
    }
    let model_bundle = match (&spec.signature.uri, bundles) {
        (Some(uri), Some(_)) if spec.signature.inline.is_none() => fetched.get(uri),
        _ => None,
    };
    let resolved = grants.resolve(&spec.signers);
    let mut signature = match &resolved {
        Ok(signers) => rollout::check_signature(
            spec,
            signers,
            model_bundle.map(|r| r.as_deref().map_err(String::as_str)),
            now,
        ),
        Err(why) => Err((reasons::UNTRUSTED_SIGNER, why.clone())),
    };
    if signature.is_ok()
        && let Err(why) = rollout::revision::check_golden(spec)
    {
        signature = Err((reasons::GOLDEN_PROMPT_INVALID, why));
    }
    let rev = rollout::revision(spec);
    let previous: &[RevisionTemplate] = model
        .status
        .as_ref()
        .map_or(&[], |s| s.revisions.as_slice());
    let signers = resolved.unwrap_or_default();
    let template = match rollout::template(spec, &signers, &rev, |uri| {
        fetched.get(uri).and_then(|r| r.as_ref().ok()).cloned()
    }) {
        Ok(t) => Some(t),
        Err(why) => {
            if signature.is_ok() {
                signature = Err((reasons::SIGNATURE_NOT_FETCHED, why));
            }
            None
        }
    };
    // Every bundle of the current revision, unless this very template verified before.
    if signature.is_ok()
        && let Some(t) = &template
        && !previous.contains(t)
        && let Err(why) = rollout::verify_template(t, now)
    {
        signature = Err((reasons::SIGNATURE_INVALID, why));
    }
    let mut kept = Vec::new();
    let mut withdrawn = BTreeMap::new();
    for t in previous {
        if t.revision == rev && signature.is_ok() {
            continue; // replaced by the current template
        }
        match review(t, &grants, &ns, now) {
            Ok(t) => kept.push(t),
            Err(why) => {
                withdrawn.insert(t.revision.clone(), why);
            }
        }
    }
    Verified {
        signature,
        template,
        kept,
        withdrawn,
        pools: grants.pools().iter().map(|(_, s)| s.clone()).collect(),
    }
}

/// `t` with its signers narrowed to those `grants` still hold, or why it is withdrawn.
fn review(
    t: &RevisionTemplate,
    grants: &Grants,
    ns: &str,
    now: SystemTime,
) -> Result<RevisionTemplate, String> {
    let still = grants.still_granted(&t.signers);
    if still.is_empty() {
        let names: Vec<&str> = t.signers.iter().map(|s| s.name.as_str()).collect();
        return Err(format!(
            "no EdgeTrustPolicy grants its signer(s) {} to namespace {ns} any more",
            names.join(", ")
        ));
    }
    if still.len() == t.signers.len() {
        return Ok(t.clone()); // verified when it was made, against these same signers
    }
    let mut narrowed = t.clone();
    narrowed.signers = still;
    rollout::verify_template(&narrowed, now).map_err(|e| {
        format!("its bundles verify only against signers no longer granted to namespace {ns} ({e})")
    })?;
    Ok(narrowed)
}
