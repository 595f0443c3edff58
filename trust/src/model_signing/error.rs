//! [`SignatureError`]: why a model or bundle did not verify (or could not be signed), one
//! variant per reason, each with the stable name conditions, events and metrics use.

use std::path::PathBuf;

use crate::x509::NotValidAt;

use super::bundle::{BUNDLE_MEDIA_TYPE, IN_TOTO_PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE};

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
    #[error(transparent)]
    CertificateNotValidAt(NotValidAt),
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
            SignatureError::CertificateNotValidAt(_) => "CertificateNotValidAt",
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
