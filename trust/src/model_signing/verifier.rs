//! Verification: [`verify_bundle`] checks a bundle's shape, its signer against the
//! [`TrustPolicy`] and the signature; [`verify`] also re-hashes the model and compares
//! every file (or shard) with the signed manifest.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest as _, Sha256};
use x509_parser::time::ASN1Time;

use super::bundle::{
    self, BUNDLE_MEDIA_TYPE, Bundle, IN_TOTO_PAYLOAD_TYPE, LEGACY_PREDICATE_TYPE, PREDICATE_TYPE,
    Predicate, STATEMENT_TYPE, Serialization, Statement, VerificationMaterial,
};
use super::certs::{self, PinnedRoot};
use super::hashing::{self, Method};
use super::keys::PublicKey;
use super::{MAX_BUNDLE_BYTES, SignatureError, SignerIdentity, TrustPolicy, TrustedSigner};

/// Largest shard size accepted from a bundle (1 TiB); larger means one shard per file.
const MAX_SHARD_SIZE: u64 = 1 << 40;

/// A model whose signature and every digest verified.
#[derive(Debug, Clone)]
pub struct VerifiedModel {
    /// Who signed it.
    pub signer: SignerIdentity,
    /// The statement's model name (informative only).
    pub model_name: String,
    /// `sha256:<hex>` over all resource digests: the model's identity.
    pub subject_digest: String,
    /// `files` or `shards` (with the shard size).
    pub method: Method,
    /// Every file (or shard) and its hex SHA-256, in manifest order.
    pub resources: Vec<(String, String)>,
}

fn asn1_time(now: SystemTime) -> Result<ASN1Time, SignatureError> {
    crate::x509::asn1_time(now).map_err(SignatureError::InvalidTime)
}

fn b64(what: &str, s: &str) -> Result<Vec<u8>, SignatureError> {
    B64.decode(s.trim())
        .map_err(|e| SignatureError::MalformedPayload(format!("{what}: {e}")))
}

/// The part of verification that needs no model files: bundle shape, signer trust and
/// the signature. Returns the signer and the verified statement.
pub fn verify_bundle(
    bundle_json: &[u8],
    policy: &TrustPolicy,
    now: SystemTime,
) -> Result<(SignerIdentity, Statement, Predicate), SignatureError> {
    if bundle_json.len() > MAX_BUNDLE_BYTES {
        return Err(SignatureError::MalformedBundle(format!(
            "larger than {MAX_BUNDLE_BYTES} bytes"
        )));
    }
    let bundle: Bundle = serde_json::from_slice(bundle_json)
        .map_err(|e| SignatureError::MalformedBundle(e.to_string()))?;
    if bundle.media_type != BUNDLE_MEDIA_TYPE {
        return Err(SignatureError::UnsupportedMediaType(bundle.media_type));
    }
    let env = bundle.dsse_envelope.ok_or(SignatureError::NoEnvelope)?;
    if env.signatures.len() != 1 {
        return Err(SignatureError::SignatureCount(env.signatures.len()));
    }
    if env.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(SignatureError::UnsupportedPayloadType(env.payload_type));
    }
    let payload = b64("payload", &env.payload)?;
    let sig = b64("signature", &env.signatures[0].sig)?;
    let signed = bundle::pae(&env.payload_type, &payload);

    let signer = verify_signer(&bundle.verification_material, policy, now, &signed, &sig)?;

    // Only now that the signature holds is the payload worth reading.
    let statement: Statement = serde_json::from_slice(&payload)
        .map_err(|e| SignatureError::MalformedPayload(e.to_string()))?;
    if statement.type_ != STATEMENT_TYPE {
        return Err(SignatureError::UnsupportedStatementType(statement.type_));
    }
    if statement.predicate_type != PREDICATE_TYPE {
        let mut t = statement.predicate_type;
        if t == LEGACY_PREDICATE_TYPE {
            t.push_str(" (legacy v0.1 predicate; re-sign with model-signing v1.0)");
        }
        return Err(SignatureError::UnsupportedPredicateType(t));
    }
    let predicate: Predicate = serde_json::from_value(statement.predicate.clone())
        .map_err(|e| SignatureError::MalformedPayload(format!("predicate: {e}")))?;
    if statement.subject.len() != 1 {
        return Err(SignatureError::MalformedPayload(format!(
            "expected one subject, found {}",
            statement.subject.len()
        )));
    }
    let claimed = statement.subject[0]
        .digest
        .get("sha256")
        .cloned()
        .unwrap_or_default();
    let mut hasher = Sha256::new();
    for r in &predicate.resources {
        let d = hex::decode(&r.digest)
            .ok()
            .filter(|d| d.len() == 32)
            .ok_or_else(|| SignatureError::MalformedResource {
                name: r.name.clone(),
                reason: "digest is not 64 hex digits".into(),
            })?;
        hasher.update(&d);
    }
    let computed = hex::encode(hasher.finalize());
    if !claimed.eq_ignore_ascii_case(&computed) {
        return Err(SignatureError::SubjectDigestMismatch { claimed, computed });
    }
    Ok((signer, statement, predicate))
}

fn verify_signer(
    material: &VerificationMaterial,
    policy: &TrustPolicy,
    now: SystemTime,
    signed: &[u8],
    sig: &[u8],
) -> Result<SignerIdentity, SignatureError> {
    let chain: Vec<String> = match (&material.x509_certificate_chain, &material.certificate) {
        (Some(c), _) => c.certificates.iter().map(|c| c.raw_bytes.clone()).collect(),
        (None, Some(c)) => vec![c.raw_bytes.clone()],
        (None, None) => Vec::new(),
    };
    if !chain.is_empty() {
        let roots: Vec<(usize, &PinnedRoot)> = policy
            .signers
            .iter()
            .filter_map(|s| match s {
                TrustedSigner::Root(r) => Some(r),
                TrustedSigner::Key { .. } => None,
            })
            .enumerate()
            .collect();
        if roots.is_empty() {
            return Err(SignatureError::UntrustedSigner(
                "the bundle is certificate-signed and no root is pinned".into(),
            ));
        }
        let ders = chain
            .iter()
            .map(|c| b64("certificate", c))
            .collect::<Result<Vec<_>, _>>()?;
        let pinned: Vec<PinnedRoot> = roots.iter().map(|(_, r)| (*r).clone()).collect();
        let verified = certs::verify_chain(&ders, &pinned, asn1_time(now)?)?;
        verified.leaf_key.verify(signed, sig)?;
        return Ok(SignerIdentity::Certificate {
            name: pinned[verified.root].name.clone(),
            identity: verified.identity,
            subject: verified.leaf_subject,
        });
    }
    let Some(pk) = &material.public_key else {
        return Err(SignatureError::NoVerificationMaterial);
    };
    let keys: Vec<(&String, &PublicKey)> = policy
        .signers
        .iter()
        .filter_map(|s| match s {
            TrustedSigner::Key { name, key } => Some((name, key)),
            TrustedSigner::Root(_) => None,
        })
        .collect();
    if keys.is_empty() {
        return Err(SignatureError::UntrustedSigner(
            "the bundle is key-signed and no public key is pinned".into(),
        ));
    }
    let mut hinted = false;
    for (name, key) in keys {
        let hint = key.hint()?;
        if !pk.hint.is_empty() {
            if !pk.hint.eq_ignore_ascii_case(&hint) {
                continue;
            }
            hinted = true;
        }
        if key.verify(signed, sig).is_ok() {
            return Ok(SignerIdentity::Key {
                name: name.clone(),
                hint,
            });
        }
    }
    if pk.hint.is_empty() || hinted {
        Err(SignatureError::SignatureInvalid)
    } else {
        Err(SignatureError::UntrustedSigner(format!(
            "key hint {} names no pinned key",
            pk.hint
        )))
    }
}

fn method_of(s: &Serialization) -> Result<Method, SignatureError> {
    if s.hash_type != "sha256" {
        return Err(SignatureError::UnsupportedSerialization(format!(
            "hash_type {:?} (only sha256)",
            s.hash_type
        )));
    }
    match s.method.as_str() {
        "files" => Ok(Method::Files),
        "shards" => {
            let n = s.shard_size.as_ref().ok_or_else(|| {
                SignatureError::UnsupportedSerialization("shards without shard_size".into())
            })?;
            let size = n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f <= MAX_SHARD_SIZE as f64)
                    .map(|f| f as u64)
            });
            match size {
                Some(size) if (1..=MAX_SHARD_SIZE).contains(&size) => Ok(Method::Shards(size)),
                _ => Err(SignatureError::UnsupportedSerialization(format!(
                    "shard_size {n} is not a positive whole number of bytes"
                ))),
            }
        }
        other => Err(SignatureError::UnsupportedSerialization(format!(
            "method {other:?}"
        ))),
    }
}

fn check_resource_name(name: &str, method: Method) -> Result<(), SignatureError> {
    let path = match method {
        Method::Files => name.to_owned(),
        Method::Shards(_) => hashing::parse_shard_name(name)
            .map(|(p, _, _)| p)
            .ok_or_else(|| SignatureError::MalformedResource {
                name: name.into(),
                reason: "expected path:start:end".into(),
            })?,
    };
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.split('/').any(|c| c.is_empty() || c == "..")
        || (path.split('/').any(|c| c == ".") && path != ".");
    if bad {
        return Err(SignatureError::MalformedResource {
            name: name.into(),
            reason: "not a normalized relative path".into(),
        });
    }
    Ok(())
}

/// The names of `these` that `those` lacks, in order.
fn names_not_in(these: &BTreeMap<String, String>, those: &BTreeMap<String, String>) -> Vec<String> {
    these
        .keys()
        .filter(|k| !those.contains_key(*k))
        .cloned()
        .collect()
}

/// Verifies `bundle_json` and the model at `model_path` (a file or a directory) against
/// `policy` at `now`. Every file is re-hashed; missing, extra and changed files fail.
/// `extra_ignore` names further paths relative to the model (for example the bundle
/// itself when it lives inside the model directory).
pub fn verify(
    bundle_json: &[u8],
    model_path: &Path,
    policy: &TrustPolicy,
    now: SystemTime,
    extra_ignore: &[String],
) -> Result<VerifiedModel, SignatureError> {
    let (signer, statement, predicate) = verify_bundle(bundle_json, policy, now)?;
    let method = method_of(&predicate.serialization)?;
    let algorithm = method.algorithm();
    let mut expected = BTreeMap::new();
    for r in &predicate.resources {
        check_resource_name(&r.name, method)?;
        if r.algorithm != algorithm {
            return Err(SignatureError::MalformedResource {
                name: r.name.clone(),
                reason: format!(
                    "algorithm {:?} where the serialization implies {algorithm:?}",
                    r.algorithm
                ),
            });
        }
        if expected
            .insert(r.name.clone(), r.digest.to_ascii_lowercase())
            .is_some()
        {
            return Err(SignatureError::MalformedResource {
                name: r.name.clone(),
                reason: "listed twice".into(),
            });
        }
    }
    let mut ignore = predicate.serialization.ignore_paths.clone();
    ignore.extend(extra_ignore.iter().cloned());
    let actual = hashing::hash_model(
        model_path,
        method,
        &ignore,
        predicate.serialization.allow_symlinks,
    )?;
    let actual: BTreeMap<String, String> = actual
        .iter()
        .map(|h| (h.name(), hex::encode(h.digest)))
        .collect();

    let missing = names_not_in(&expected, &actual);
    if !missing.is_empty() {
        return Err(SignatureError::MissingFiles(missing));
    }
    let extra = names_not_in(&actual, &expected);
    if !extra.is_empty() {
        return Err(SignatureError::ExtraFiles(extra));
    }
    let changed: Vec<String> = expected
        .iter()
        .filter(|(k, v)| actual.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    if !changed.is_empty() {
        return Err(SignatureError::DigestMismatch(changed));
    }
    Ok(VerifiedModel {
        signer,
        model_name: statement.subject[0].name.clone(),
        subject_digest: format!(
            "sha256:{}",
            statement.subject[0]
                .digest
                .get("sha256")
                .cloned()
                .unwrap_or_default()
        ),
        method,
        resources: predicate
            .resources
            .into_iter()
            .map(|r| (r.name, r.digest))
            .collect(),
    })
}
