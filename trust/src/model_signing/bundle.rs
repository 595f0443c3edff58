//! The Sigstore bundle v0.3 (JSON) and the in-toto Statement v1 it carries, as far as
//! model-signing uses them. Unknown fields are ignored, as in the protobuf JSON mapping.

use serde::{Deserialize, Serialize};

/// Bundle media type written and accepted.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// DSSE payload type of an in-toto statement.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// in-toto Statement v1 type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The model-signing v1.0 predicate.
pub const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
/// The pre-1.0 predicate, which names only files and no serialization; not accepted.
pub const LEGACY_PREDICATE_TYPE: &str = "https://model_signing/Digests/v0.1";

/// A Sigstore bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    /// Must be [`BUNDLE_MEDIA_TYPE`].
    pub media_type: String,
    /// The signer's key hint or certificate chain.
    pub verification_material: VerificationMaterial,
    /// The signed statement.
    pub dsse_envelope: Option<DsseEnvelope>,
}

/// Key hint, or certificates.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerificationMaterial {
    /// Key mode: the hint names the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKeyIdentifier>,
    /// Certificate mode: leaf first, then intermediates (the root is not included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_certificate_chain: Option<CertificateChain>,
    /// Certificate mode with a single leaf certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<RawCertificate>,
    /// Transparency log entries; model-signing's key and certificate modes write none.
    #[serde(default)]
    pub tlog_entries: Vec<serde_json::Value>,
}

/// `publicKey`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublicKeyIdentifier {
    /// Hex SHA-256 of the PEM public key.
    #[serde(default)]
    pub hint: String,
}

/// `x509CertificateChain`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateChain {
    /// Leaf first.
    pub certificates: Vec<RawCertificate>,
}

/// A DER certificate, base64 in JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawCertificate {
    /// Base64 of the DER.
    pub raw_bytes: String,
}

/// A DSSE envelope.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DsseEnvelope {
    /// Base64 of the statement JSON.
    pub payload: String,
    /// Must be [`IN_TOTO_PAYLOAD_TYPE`].
    pub payload_type: String,
    /// Exactly one.
    pub signatures: Vec<DsseSignature>,
}

/// One DSSE signature.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DsseSignature {
    /// Base64 of the DER ECDSA signature over the PAE.
    pub sig: String,
    /// Unused by model-signing; written empty, read as empty or null.
    #[serde(default)]
    pub keyid: Option<String>,
}

/// The DSSE pre-authentication encoding: what is actually signed.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// in-toto Statement v1 with the model-signing predicate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Statement {
    /// Must be [`STATEMENT_TYPE`].
    #[serde(rename = "_type")]
    pub type_: String,
    /// Exactly one: the model name and the digest over all resource digests.
    pub subject: Vec<Subject>,
    /// Must be [`PREDICATE_TYPE`].
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    /// Serialization and resources.
    pub predicate: serde_json::Value,
}

/// The statement's subject.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Subject {
    /// Model name (informative only).
    pub name: String,
    /// `{"sha256": "<hex>"}`.
    pub digest: std::collections::BTreeMap<String, String>,
}

/// The model-signing predicate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Predicate {
    /// How the model was cut into resources.
    pub serialization: Serialization,
    /// One entry per file or shard.
    pub resources: Vec<Resource>,
}

/// `predicate.serialization`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Serialization {
    /// `files` or `shards`.
    pub method: String,
    /// Only `sha256` is accepted.
    pub hash_type: String,
    /// Whether symbolic links were followed.
    #[serde(default)]
    pub allow_symlinks: bool,
    /// Paths (relative to the model root) left out of the signature.
    #[serde(default)]
    pub ignore_paths: Vec<String>,
    /// Shard size in bytes (shards only). The reference writes it as a float.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_size: Option<serde_json::Number>,
}

/// `predicate.resources[]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resource {
    /// Relative POSIX path (files) or `path:start:end` (shards); `.` for a single-file model.
    pub name: String,
    /// `sha256` (files) or `sha256-sharded-<size>` (shards).
    pub algorithm: String,
    /// Hex digest.
    pub digest: String,
}
