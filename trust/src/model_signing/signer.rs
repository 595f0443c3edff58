//! Signing: [`sign`] hashes a model, writes the model-signing v1.0 statement and signs it
//! into a Sigstore bundle, in key mode or (with a certificate chain) certificate mode.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest as _, Sha256};

use super::bundle::{
    self, BUNDLE_MEDIA_TYPE, Bundle, CertificateChain, DsseEnvelope, DsseSignature,
    IN_TOTO_PAYLOAD_TYPE, PREDICATE_TYPE, Predicate, PublicKeyIdentifier, RawCertificate, Resource,
    STATEMENT_TYPE, Serialization, Statement, Subject, VerificationMaterial,
};
use super::certs;
use super::hashing::{self, Method};
use super::keys::PrivateKey;
use super::{DEFAULT_IGNORE_PATHS, SignatureError};

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
