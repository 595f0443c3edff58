//! Whom a verifier trusts and who signed: [`TrustPolicy`] of [`TrustedSigner`]s (pinned
//! public keys, pinned roots with identity pins), and the [`SignerIdentity`] a verified
//! bundle names.

use super::certs::{self, PinnedRoot};
use super::keys::PublicKey;

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
