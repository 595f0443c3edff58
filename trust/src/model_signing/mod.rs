//! OpenSSF model-signing v1.0: verify and produce the bundles that the reference
//! `model_signing` 1.1.1 writes (key mode and certificate mode; `files` and `shards`
//! serialization).
//!
//! Verification is strict where the reference is lenient: certificate mode requires an
//! identity pin, checks validity at an explicit `now`, and needs key usage
//! digitalSignature (and EKU codeSigning when an EKU is present). The legacy v0.1
//! predicate, which carries no serialization parameters, is rejected.

pub mod bundle;
pub mod certs;
pub mod hashing;
pub mod keys;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest as _, Sha256};
use x509_parser::time::ASN1Time;

pub use bundle::Bundle;
pub use certs::PinnedRoot;
pub use hashing::Method;
pub use keys::{PrivateKey, PublicKey};

use bundle::{
    BUNDLE_MEDIA_TYPE, CertificateChain, DsseEnvelope, DsseSignature, IN_TOTO_PAYLOAD_TYPE,
    LEGACY_PREDICATE_TYPE, PREDICATE_TYPE, Predicate, PublicKeyIdentifier, RawCertificate,
    Resource, STATEMENT_TYPE, Serialization, Statement, Subject, VerificationMaterial,
};

/// Largest shard size accepted from a bundle (1 TiB); larger means one shard per file.
const MAX_SHARD_SIZE: u64 = 1 << 40;
/// Largest bundle accepted, in bytes.
pub const MAX_BUNDLE_BYTES: usize = 16 << 20;

/// Paths the reference always leaves out of a signature.
pub const DEFAULT_IGNORE_PATHS: [&str; 4] = [".git", ".gitattributes", ".github", ".gitignore"];

/// Why a model or bundle did not verify. Each variant is a distinct reason, named by
/// [`SignatureError::reason`] in conditions, events and metrics.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// Reading the model or bundle failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The bundle is not valid JSON of the expected shape.
    #[error("malformed bundle: {0}")]
    MalformedBundle(String),
    /// The bundle's mediaType is not a Sigstore bundle v0.3.
    #[error("unsupported bundle mediaType {0:?} (expected {BUNDLE_MEDIA_TYPE})")]
    UnsupportedMediaType(String),
    /// The bundle has no DSSE envelope.
    #[error("bundle has no dsseEnvelope")]
    NoEnvelope,
    /// The envelope has zero or several signatures.
    #[error("expected exactly one DSSE signature, found {0}")]
    SignatureCount(usize),
    /// The DSSE payload is not an in-toto statement.
    #[error("unsupported DSSE payloadType {0:?} (expected {IN_TOTO_PAYLOAD_TYPE})")]
    UnsupportedPayloadType(String),
    /// The payload or signature is not valid base64, or the statement is not valid JSON.
    #[error("malformed payload: {0}")]
    MalformedPayload(String),
    /// The statement `_type` is not in-toto Statement v1.
    #[error("unsupported statement type {0:?} (expected {STATEMENT_TYPE})")]
    UnsupportedStatementType(String),
    /// The predicate type is not model-signing v1.0.
    #[error("unsupported predicateType {0:?} (expected {PREDICATE_TYPE})")]
    UnsupportedPredicateType(String),
    /// Serialization method or hash type not supported.
    #[error("unsupported serialization: {0}")]
    UnsupportedSerialization(String),
    /// A resource entry is malformed.
    #[error("malformed resource {name:?}: {reason}")]
    MalformedResource {
        /// Resource name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The statement's subject digest does not match its resources.
    #[error("subject digest {claimed} does not match the resources, which hash to {computed}")]
    SubjectDigestMismatch {
        /// In the statement.
        claimed: String,
        /// Recomputed.
        computed: String,
    },
    /// Neither a public key hint nor certificates.
    #[error("bundle has no usable verification material")]
    NoVerificationMaterial,
    /// The bundle names a key that is not pinned, or uses a mode with no pinned signer.
    #[error("no trusted signer matches the bundle: {0}")]
    UntrustedSigner(String),
    /// A key could not be parsed.
    #[error("malformed key: {0}")]
    MalformedKey(String),
    /// A key is of an unsupported type or curve.
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    /// The ECDSA signature does not verify with the signer's key.
    #[error("signature does not verify")]
    SignatureInvalid,
    /// A certificate could not be parsed.
    #[error("malformed certificate ({which}): {reason}")]
    MalformedCertificate {
        /// Which certificate.
        which: String,
        /// Parser error.
        reason: String,
    },
    /// A certificate in the path is not valid at `now`.
    #[error("certificate {subject} is not valid at {now} (valid {not_before} to {not_after})")]
    CertificateNotValidAt {
        /// Subject.
        subject: String,
        /// Start of validity.
        not_before: String,
        /// End of validity.
        not_after: String,
        /// The verification time.
        now: String,
    },
    /// No path from the leaf to a pinned root.
    #[error("untrusted certificate chain: {0}")]
    UntrustedChain(String),
    /// Key usage forbids this use.
    #[error("key usage: {0}")]
    KeyUsage(String),
    /// Extended key usage forbids code signing.
    #[error("extended key usage: {0}")]
    ExtendedKeyUsage(String),
    /// The leaf carries none of the pinned identities.
    #[error("signer identity {found:?} matches none of the pinned identities {pinned:?}")]
    IdentityMismatch {
        /// Identities in the leaf.
        found: Vec<String>,
        /// Identities pinned.
        pinned: Vec<String>,
    },
    /// Signed files are missing from the model.
    #[error("missing from the model: {}", .0.join(", "))]
    MissingFiles(Vec<String>),
    /// The model has files the signature does not cover.
    #[error("not covered by the signature: {}", .0.join(", "))]
    ExtraFiles(Vec<String>),
    /// A file's content differs from what was signed.
    #[error("digest mismatch for {}", .0.join(", "))]
    DigestMismatch(Vec<String>),
    /// A symbolic link where the serialization forbids them.
    #[error("symbolic link not allowed: {0}")]
    Symlink(PathBuf),
    /// A path that is not UTF-8 cannot be named in a manifest.
    #[error("path is not UTF-8: {0}")]
    NonUtf8Path(PathBuf),
    /// A socket, device or FIFO in the model directory.
    #[error("not a regular file or directory: {0}")]
    UnsupportedFileType(PathBuf),
    /// `now` is not representable.
    #[error("invalid verification time: {0}")]
    InvalidTime(String),
    /// A bug: a worker failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl SignatureError {
    /// A stable CamelCase name for conditions, events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::Io { .. } => "IoError",
            SignatureError::MalformedBundle(_) => "MalformedBundle",
            SignatureError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            SignatureError::NoEnvelope => "NoEnvelope",
            SignatureError::SignatureCount(_) => "SignatureCount",
            SignatureError::UnsupportedPayloadType(_) => "UnsupportedPayloadType",
            SignatureError::MalformedPayload(_) => "MalformedPayload",
            SignatureError::UnsupportedStatementType(_) => "UnsupportedStatementType",
            SignatureError::UnsupportedPredicateType(_) => "UnsupportedPredicateType",
            SignatureError::UnsupportedSerialization(_) => "UnsupportedSerialization",
            SignatureError::MalformedResource { .. } => "MalformedResource",
            SignatureError::SubjectDigestMismatch { .. } => "SubjectDigestMismatch",
            SignatureError::NoVerificationMaterial => "NoVerificationMaterial",
            SignatureError::UntrustedSigner(_) => "UntrustedSigner",
            SignatureError::MalformedKey(_) => "MalformedKey",
            SignatureError::UnsupportedKey(_) => "UnsupportedKey",
            SignatureError::SignatureInvalid => "SignatureInvalid",
            SignatureError::MalformedCertificate { .. } => "MalformedCertificate",
            SignatureError::CertificateNotValidAt { .. } => "CertificateNotValidAt",
            SignatureError::UntrustedChain(_) => "UntrustedChain",
            SignatureError::KeyUsage(_) => "KeyUsage",
            SignatureError::ExtendedKeyUsage(_) => "ExtendedKeyUsage",
            SignatureError::IdentityMismatch { .. } => "IdentityMismatch",
            SignatureError::MissingFiles(_) => "MissingFiles",
            SignatureError::ExtraFiles(_) => "ExtraFiles",
            SignatureError::DigestMismatch(_) => "DigestMismatch",
            SignatureError::Symlink(_) => "SymlinkNotAllowed",
            SignatureError::NonUtf8Path(_) => "NonUtf8Path",
            SignatureError::UnsupportedFileType(_) => "UnsupportedFileType",
            SignatureError::InvalidTime(_) => "InvalidTime",
            SignatureError::Internal(_) => "Internal",
        }
    }
}

/// One signer the verifier trusts.
#[derive(Debug, Clone)]
pub enum TrustedSigner {
    /// A pinned public key (key mode).
    Key {
        /// Signer name.
        name: String,
        /// The key.
        key: PublicKey,
    },
    /// A pinned root with identity pins (certificate mode).
    Root(PinnedRoot),
}

/// The signers trusted for a model: pinned public keys, pinned roots with identity
/// pins, or both.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    /// Trusted signers.
    pub signers: Vec<TrustedSigner>,
}

impl TrustedSigner {
    /// A signer as EdgeModels write them: a PEM public key (key mode), or a PEM root
    /// certificate and the identities a leaf must carry (certificate mode). `Err` names
    /// the signer and what is wrong.
    pub fn from_pem(
        name: &str,
        public_key: Option<&str>,
        certificate_root: Option<&str>,
        identities: &[String],
    ) -> Result<Self, String> {
        match (public_key, certificate_root) {
            (Some(pem), None) => Ok(Self::Key {
                name: name.to_owned(),
                key: PublicKey::from_pem(pem)
                    .map_err(|e| format!("signer {name}: public key: {e}"))?,
            }),
            (None, Some(pem)) => {
                let der = certs::pem_certificates(pem)
                    .map_err(|e| format!("signer {name}: certificate root: {e}"))?
                    .into_iter()
                    .next()
                    .ok_or_else(|| format!("signer {name}: no certificate in certificateRoot"))?;
                if identities.is_empty() {
                    return Err(format!(
                        "signer {name}: a certificate root needs identities"
                    ));
                }
                Ok(Self::Root(PinnedRoot {
                    name: name.to_owned(),
                    der,
                    identities: identities.to_vec(),
                }))
            }
            _ => Err(format!(
                "signer {name}: exactly one of publicKey and certificateRoot"
            )),
        }
    }
}

impl TrustPolicy {
    /// Trust exactly these keys.
    pub fn keys(keys: impl IntoIterator<Item = (String, PublicKey)>) -> Self {
        Self {
            signers: keys
                .into_iter()
                .map(|(name, key)| TrustedSigner::Key { name, key })
                .collect(),
        }
    }

    /// Trust leaves under these roots that carry one of the root's identities.
    pub fn roots(roots: impl IntoIterator<Item = PinnedRoot>) -> Self {
        Self {
            signers: roots.into_iter().map(TrustedSigner::Root).collect(),
        }
    }
}

/// Who signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignerIdentity {
    /// A pinned key.
    Key {
        /// Signer name from the policy.
        name: String,
        /// The key hint (hex SHA-256 of its PEM).
        hint: String,
    },
    /// A certificate under a pinned root.
    Certificate {
        /// Signer name from the policy.
        name: String,
        /// The pinned identity the leaf matched.
        identity: String,
        /// The leaf's subject.
        subject: String,
    },
}

impl std::fmt::Display for SignerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignerIdentity::Key { name, hint } => {
                write!(f, "{name} (key {})", &hint[..hint.len().min(16)])
            }
            SignerIdentity::Certificate { name, identity, .. } => write!(f, "{name} ({identity})"),
        }
    }
}

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
    let mut expected = std::collections::BTreeMap::new();
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
    let actual: std::collections::BTreeMap<String, String> = actual
        .iter()
        .map(|h| (h.name(), hex::encode(h.digest)))
        .collect();

    let missing: Vec<String> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(SignatureError::MissingFiles(missing));
    }
    let extra: Vec<String> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .cloned()
        .collect();
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

/// How to sign.
#[derive(Debug, Clone)]
pub struct SignOptions {
    /// Files or shards.
    pub method: Method,
    /// Paths (relative to the model) to leave out, besides [`DEFAULT_IGNORE_PATHS`].
    pub ignore_paths: Vec<String>,
}

impl Default for SignOptions {
    fn default() -> Self {
        Self {
            method: Method::Files,
            ignore_paths: Vec::new(),
        }
    }
}

/// Signs the model at `model_path` with `key`. With `chain` (leaf certificate first, then
/// intermediates, DER) the bundle is in certificate mode, else in key mode. Returns the
/// bundle JSON.
pub fn sign(
    model_path: &Path,
    key: &PrivateKey,
    chain: Option<&[Vec<u8>]>,
    options: &SignOptions,
) -> Result<Vec<u8>, SignatureError> {
    let mut ignore: Vec<String> = DEFAULT_IGNORE_PATHS
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for p in &options.ignore_paths {
        if !ignore.contains(p) {
            ignore.push(p.clone());
        }
    }
    let hashed = hashing::hash_model(model_path, options.method, &ignore, false)?;
    let algorithm = options.method.algorithm();
    let mut root = Sha256::new();
    let resources: Vec<Resource> = hashed
        .iter()
        .map(|h| {
            root.update(h.digest);
            Resource {
                name: h.name(),
                algorithm: algorithm.clone(),
                digest: hex::encode(h.digest),
            }
        })
        .collect();
    let model_name = model_path
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| ".".into());
    let serialization = Serialization {
        method: match options.method {
            Method::Files => "files".into(),
            Method::Shards(_) => "shards".into(),
        },
        hash_type: "sha256".into(),
        allow_symlinks: false,
        ignore_paths: ignore,
        shard_size: match options.method {
            Method::Files => None,
            Method::Shards(n) => Some(n.into()),
        },
    };
    let predicate = serde_json::to_value(Predicate {
        serialization,
        resources,
    })
    .map_err(|e| SignatureError::Internal(e.to_string()))?;
    let statement = Statement {
        type_: STATEMENT_TYPE.into(),
        subject: vec![Subject {
            name: model_name,
            digest: [("sha256".to_owned(), hex::encode(root.finalize()))]
                .into_iter()
                .collect(),
        }],
        predicate_type: PREDICATE_TYPE.into(),
        predicate,
    };
    let payload =
        serde_json::to_vec(&statement).map_err(|e| SignatureError::Internal(e.to_string()))?;
    let sig = key.sign(&bundle::pae(IN_TOTO_PAYLOAD_TYPE, &payload));

    let verification_material = match chain {
        Some(chain) => {
            let leaf = chain
                .first()
                .ok_or(SignatureError::NoVerificationMaterial)?;
            let verified_leaf = certs::leaf_key(leaf)?;
            if verified_leaf != key.public_key() {
                return Err(SignatureError::MalformedKey(
                    "the private key does not match the leaf certificate".into(),
                ));
            }
            VerificationMaterial {
                x509_certificate_chain: Some(CertificateChain {
                    certificates: chain
                        .iter()
                        .map(|d| RawCertificate {
                            raw_bytes: B64.encode(d),
                        })
                        .collect(),
                }),
                ..VerificationMaterial::default()
            }
        }
        None => VerificationMaterial {
            public_key: Some(PublicKeyIdentifier {
                hint: key.public_key().hint()?,
            }),
            ..VerificationMaterial::default()
        },
    };
    let bundle = Bundle {
        media_type: BUNDLE_MEDIA_TYPE.into(),
        verification_material,
        dsse_envelope: Some(DsseEnvelope {
            payload: B64.encode(&payload),
            payload_type: IN_TOTO_PAYLOAD_TYPE.into(),
            signatures: vec![DsseSignature {
                sig: B64.encode(sig),
                keyid: Some(String::new()),
            }],
        }),
    };
    serde_json::to_vec_pretty(&bundle).map_err(|e| SignatureError::Internal(e.to_string()))
}
