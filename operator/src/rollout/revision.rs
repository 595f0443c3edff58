//! What a revision is: the digest of what devices run ([`revision`]), the check of its
//! signature bundle against the trusted signers ([`check_signature`]; the signers are
//! `spec.signers` as the trust policies resolve them), the self-contained template
//! devices are served from ([`template`], [`keep_templates`]), and the check of every
//! bundle in a template against its signers ([`verify_template`]), by which a kept
//! revision stays or is withdrawn when the trust policies change.

use std::collections::BTreeMap;

use edgefleet_crds::SignatureSource;
use edgefleet_crds::conditions::reasons;
use edgefleet_crds::model::RevisionTemplate;
use edgefleet_crds::{EdgeModelSpec, TrustedSigner};
use sha2::{Digest, Sha256};

/// The revision of a spec: 16 hex digits of SHA-256 over what the device runs.
pub fn revision(spec: &EdgeModelSpec) -> String {
    let runs = serde_json::json!({
        "artifact": spec.artifact,
        "signature": spec.signature,
        "variants": spec.variants,
        "runtime": spec.runtime,
        "plugins": spec.plugins,
        "port": spec.port,
    });
    // Golden prompts are part of what a device does with a revision; a spec without
    // them hashes as it did before they existed (no revision changes on upgrade).
    let mut runs = runs;
    if let Some(v) = golden(spec) {
        runs["validation"] = serde_json::json!(v);
    }
    if let Some(e) = &spec.encryption {
        runs["encryption"] = serde_json::json!(e);
    }
    let digest = Sha256::digest(runs.to_string().as_bytes());
    hex::encode(&digest[..8])
}

/// Checks the signature bundle against `signers` (the resolved `spec.signers`), and
/// that it names the artifact. `fetched` is the bundle fetched from `signature.uri` (or
/// why it could not be); an inline bundle is used as it is. `Err` carries the condition
/// reason and message.
pub fn check_signature(
    spec: &EdgeModelSpec,
    signers: &[TrustedSigner],
    fetched: Option<Result<&str, &str>>,
    now: std::time::SystemTime,
) -> Result<(), (&'static str, String)> {
    use edgefleet_trust::model_signing as ms;
    let inline = match (&spec.signature.inline, fetched) {
        (Some(inline), _) => inline.as_str(),
        (None, Some(Ok(fetched))) => fetched,
        (None, Some(Err(why))) => {
            return Err((
                reasons::SIGNATURE_NOT_FETCHED,
                format!("fetching signature.uri: {why}"),
            ));
        }
        (None, None) => {
            return Err((
                reasons::SIGNATURE_NOT_FETCHED,
                "signature.uri is not fetched (the operator has no bundle CA roots); give signature.inline".into(),
            ));
        }
    };
    let policy = trust_policy(signers).map_err(|e| (reasons::SIGNATURE_INVALID, e))?;
    let (_, _, predicate) = ms::verify_bundle(inline.as_bytes(), &policy, now)
        .map_err(|e| (reasons::SIGNATURE_INVALID, format!("{}: {e}", e.reason())))?;
    let want = spec
        .artifact
        .digest
        .strip_prefix("sha256:")
        .unwrap_or(&spec.artifact.digest);
    match predicate.resources.as_slice() {
        [r] if r.name == "." && r.algorithm == "sha256" && r.digest != want => {
            return Err((
                reasons::SIGNATURE_INVALID,
                format!(
                    "DigestMismatch: the bundle signs sha256:{} but artifact.digest is {}",
                    r.digest, spec.artifact.digest
                ),
            ));
        }
        // Directories and shards: the whole-file digest is checked on the device.
        _ => {}
    }
    Ok(())
}

fn trust_policy(
    signers: &[TrustedSigner],
) -> Result<edgefleet_trust::model_signing::TrustPolicy, String> {
    let signers = signers
        .iter()
        .map(|s| {
            edgefleet_trust::model_signing::TrustedSigner::from_pem(
                &s.name,
                s.public_key.as_deref(),
                s.certificate_root.as_deref(),
                s.identities.as_deref().unwrap_or_default(),
            )
        })
        .collect::<Result<_, _>>()?;
    Ok(edgefleet_trust::model_signing::TrustPolicy { signers })
}

/// Verifies every bundle of `t` (the model's, its variants', its plugins') against
/// `t.signers`; `Err` names the first that does not verify. Digests are the devices'
/// to check.
pub fn verify_template(t: &RevisionTemplate, now: std::time::SystemTime) -> Result<(), String> {
    use edgefleet_trust::model_signing as ms;
    let policy = trust_policy(&t.signers)?;
    let bundles = std::iter::once(("the model".to_owned(), &t.signature))
        .chain(
            t.variants
                .iter()
                .map(|v| (format!("variant {}", v.name), &v.signature)),
        )
        .chain(
            t.plugins
                .iter()
                .map(|p| (format!("plugin {}", p.name), &p.signature)),
        );
    for (what, s) in bundles {
        let bundle = s.inline.as_deref().unwrap_or_default();
        ms::verify_bundle(bundle.as_bytes(), &policy, now)
            .map_err(|e| format!("{what}: {}: {e}", e.reason()))?;
    }
    Ok(())
}

/// What `spec` runs at revision `rev`, verified against `signers` (the resolved
/// `spec.signers`), with every signature bundle resolved by `resolve` (given a
/// `signature.uri`; inline bundles are used as they are). `Err` names the first bundle
/// that is not available.
pub fn template(
    spec: &EdgeModelSpec,
    signers: &[TrustedSigner],
    rev: &str,
    resolve: impl Fn(&str) -> Option<String>,
) -> Result<RevisionTemplate, String> {
    let inline = |what: &str, s: &SignatureSource| -> Result<SignatureSource, String> {
        let bundle = match (&s.inline, &s.uri) {
            (Some(b), _) => b.clone(),
            (None, Some(uri)) => resolve(uri)
                .ok_or_else(|| format!("the bundle of {what} ({uri}) is not fetched"))?,
            (None, None) => return Err(format!("{what} has no signature")),
        };
        Ok(SignatureSource {
            inline: Some(bundle),
            uri: None,
        })
    };
    let mut variants = Vec::new();
    for v in spec.variants.iter().flatten() {
        let mut v = v.clone();
        v.signature = inline(&format!("variant {}", v.name), &v.signature)?;
        variants.push(v);
    }
    let mut plugins = Vec::new();
    for p in spec.plugins.iter().flatten() {
        let mut p = p.clone();
        p.signature = inline(&format!("plugin {}", p.name), &p.signature)?;
        plugins.push(p);
    }
    Ok(RevisionTemplate {
        revision: rev.to_owned(),
        served_name: spec.served_name.clone(),
        artifact: spec.artifact.clone(),
        signature: inline("the model", &spec.signature)?,
        variants,
        signers: signers.to_vec(),
        runtime: spec.runtime.clone(),
        plugins,
        port: spec.port,
        validation: golden(spec).cloned(),
        encryption: spec.encryption.clone(),
    })
}

/// `spec.validation` when it has golden prompts.
fn golden(spec: &EdgeModelSpec) -> Option<&edgefleet_crds::model::Validation> {
    spec.validation
        .as_ref()
        .filter(|v| !v.golden_prompts.is_empty())
}

/// Checks what the API server cannot: that each golden prompt's `regex` compiles
/// (within the size the device allows, [`edgefleet_proto::GOLDEN_REGEX_SIZE_LIMIT`]). `Err` names the
/// prompt and why.
pub fn check_golden(spec: &EdgeModelSpec) -> Result<(), String> {
    for p in golden(spec).map_or(&[][..], |v| v.golden_prompts.as_slice()) {
        if let Some(re) = &p.regex {
            regex::RegexBuilder::new(re)
                .size_limit(edgefleet_proto::GOLDEN_REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| format!("golden prompt {}: regex: {e}", p.name))?;
        }
    }
    Ok(())
}

/// The templates to keep: `previous` with `current` added (or replaced), restricted to
/// the revisions in `keep`, in revision order.
pub fn keep_templates(
    previous: &[RevisionTemplate],
    current: Option<RevisionTemplate>,
    keep: &std::collections::BTreeSet<String>,
) -> Vec<RevisionTemplate> {
    let mut by_rev: BTreeMap<String, RevisionTemplate> = previous
        .iter()
        .map(|t| (t.revision.clone(), t.clone()))
        .collect();
    if let Some(t) = current {
        by_rev.insert(t.revision.clone(), t);
    }
    by_rev.retain(|r, _| keep.contains(r));
    by_rev.into_values().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn golden_prompts_are_part_of_the_revision_only_when_there_are_some() {
        let base = crate::rollout::fixtures::spec(serde_json::json!({}));
        let mut empty = base.clone();
        empty.validation = Some(edgefleet_crds::model::Validation::default());
        assert_eq!(
            revision(&base),
            revision(&empty),
            "no prompts: the revision of before"
        );
        let mut golden = base.clone();
        golden.validation = Some(
            serde_json::from_value(serde_json::json!({"goldenPrompts": [
                {"name": "capital", "prompt": "What is the capital of France?", "regex": "(?i)paris"}
            ]}))
            .unwrap(),
        );
        assert_ne!(revision(&base), revision(&golden));
        assert_eq!(check_golden(&golden), Ok(()));
        let mut bad = golden.clone();
        if let Some(v) = bad.validation.as_mut() {
            v.golden_prompts[0].regex = Some("(unclosed".into());
        }
        let why = check_golden(&bad).unwrap_err();
        assert!(why.starts_with("golden prompt capital: regex: "), "{why}");
        // Too large once compiled: refused as the device would.
        if let Some(v) = bad.validation.as_mut() {
            v.golden_prompts[0].regex = Some(r"\w{1000}\w{1000}\w{1000}".into());
        }
        assert!(check_golden(&bad).unwrap_err().contains("size limit"));
    }

    #[test]
    fn revision_follows_what_the_device_runs() {
        let spec: EdgeModelSpec = serde_json::from_value(serde_json::json!({
            "servedName": "m",
            "artifact": {"uri": "https://x/m.gguf", "digest": format!("sha256:{}", "a".repeat(64))},
            "signature": {"inline": "{}"},
            "signers": [{"name": "s", "publicKey": "k"}],
        }))
        .unwrap();
        let base = revision(&spec);
        assert_eq!(base.len(), 16);
        let mut paused = spec.clone();
        paused.rollout.paused = true;
        assert_eq!(revision(&paused), base, "pausing is not a new revision");
        let mut bigger = spec.clone();
        bigger.runtime.context_size = 4096;
        assert_ne!(revision(&bigger), base);
        let mut other = spec;
        other.artifact.digest = format!("sha256:{}", "b".repeat(64));
        assert_ne!(revision(&other), base);
    }
}
