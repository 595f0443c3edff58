//! ECDSA keys on P-256, P-384 and P-521, each with its curve-matched hash (SHA-256,
//! SHA-384, SHA-512), as model-signing uses them.

use p256::elliptic_curve::pkcs8::AssociatedOid;
use p256::elliptic_curve::sec1::{ModulusSize, ValidatePublicKey};
use p256::elliptic_curve::{Curve, FieldBytesSize, SecretKey};
use p256::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePublicKey as _, LineEnding};
use sha2::{Digest as _, Sha256};

use super::SignatureError;

/// An ECDSA public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKey {
    /// NIST P-256, verified with SHA-256.
    P256(p256::ecdsa::VerifyingKey),
    /// NIST P-384, verified with SHA-384.
    P384(p384::ecdsa::VerifyingKey),
    /// NIST P-521, verified with SHA-512.
    P521(p521::PublicKey),
}

/// An ECDSA private key.
#[derive(Clone)]
pub enum PrivateKey {
    /// NIST P-256, signing with SHA-256.
    P256(p256::ecdsa::SigningKey),
    /// NIST P-384, signing with SHA-384.
    P384(p384::ecdsa::SigningKey),
    /// NIST P-521, signing with SHA-512.
    P521(p521::ecdsa::SigningKey),
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.write_str(match self {
            PrivateKey::P256(_) => "PrivateKey::P256(<redacted>)",
            PrivateKey::P384(_) => "PrivateKey::P384(<redacted>)",
            PrivateKey::P521(_) => "PrivateKey::P521(<redacted>)",
        })
    }
}

fn bad_key(what: &str, e: impl std::fmt::Display) -> SignatureError {
    SignatureError::MalformedKey(format!("{what}: {e}"))
}

impl PublicKey {
    /// Parses a SubjectPublicKeyInfo (DER) on one of the three curves.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, SignatureError> {
        if let Ok(k) = p256::PublicKey::from_public_key_der(der) {
            return Ok(Self::P256(k.into()));
        }
        if let Ok(k) = p384::PublicKey::from_public_key_der(der) {
            return Ok(Self::P384(k.into()));
        }
        if let Ok(k) = p521::PublicKey::from_public_key_der(der) {
            return Ok(Self::P521(k));
        }
        Err(SignatureError::UnsupportedKey(
            "not an ECDSA P-256, P-384 or P-521 SubjectPublicKeyInfo".into(),
        ))
    }

    /// Parses a PEM `PUBLIC KEY`.
    pub fn from_pem(pem: &str) -> Result<Self, SignatureError> {
        let (label, der) = pem_rfc7468_decode(pem)?;
        if label != "PUBLIC KEY" {
            return Err(bad_key(
                "public key PEM",
                format!("unexpected label {label:?}"),
            ));
        }
        Self::from_spki_der(&der)
    }

    /// The SubjectPublicKeyInfo DER.
    pub fn to_spki_der(&self) -> Result<Vec<u8>, SignatureError> {
        let doc = match self {
            PublicKey::P256(k) => p256::PublicKey::from(k).to_public_key_der(),
            PublicKey::P384(k) => p384::PublicKey::from(k).to_public_key_der(),
            PublicKey::P521(k) => k.to_public_key_der(),
        }
        .map_err(|e| bad_key("encoding public key", e))?;
        Ok(doc.into_vec())
    }

    /// The key in PEM, formatted as OpenSSL and Python's `cryptography` write it
    /// (64-column base64, LF line ends, trailing newline).
    pub fn to_pem(&self) -> Result<String, SignatureError> {
        let der = self.to_spki_der()?;
        let doc = p256::pkcs8::Document::try_from(der.as_slice())
            .map_err(|e| bad_key("encoding public key", e))?;
        doc.to_pem("PUBLIC KEY", LineEnding::LF)
            .map_err(|e| bad_key("encoding public key", e))
    }

    /// The model-signing key hint: hex SHA-256 of the key's PEM text.
    pub fn hint(&self) -> Result<String, SignatureError> {
        Ok(hex::encode(Sha256::digest(self.to_pem()?.as_bytes())))
    }

    /// Curve name, for messages.
    pub fn curve(&self) -> &'static str {
        match self {
            PublicKey::P256(_) => "P-256",
            PublicKey::P384(_) => "P-384",
            PublicKey::P521(_) => "P-521",
        }
    }

    /// Verifies a DER-encoded ECDSA signature over `msg` with the curve's hash.
    pub fn verify(&self, msg: &[u8], sig_der: &[u8]) -> Result<(), SignatureError> {
        use p256::ecdsa::signature::Verifier as _;
        let ok =
            match self {
                PublicKey::P256(k) => p256::ecdsa::Signature::from_der(sig_der)
                    .is_ok_and(|s| k.verify(msg, &s).is_ok()),
                PublicKey::P384(k) => p384::ecdsa::Signature::from_der(sig_der)
                    .is_ok_and(|s| k.verify(msg, &s).is_ok()),
                PublicKey::P521(k) => {
                    let vk = p521::ecdsa::VerifyingKey::from_affine(*k.as_affine());
                    p521::ecdsa::Signature::from_der(sig_der)
                        .is_ok_and(|s| vk.is_ok_and(|vk| vk.verify(msg, &s).is_ok()))
                }
            };
        if ok {
            Ok(())
        } else {
            Err(SignatureError::SignatureInvalid)
        }
    }
}

/// How a PEM private key's DER is encoded, by its label.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    /// PKCS#8 `PrivateKeyInfo` (`PRIVATE KEY`).
    Pkcs8,
    /// SEC1 `ECPrivateKey` (`EC PRIVATE KEY`).
    Sec1,
}

impl Encoding {
    /// The key, when `der` is one on curve `C` in this encoding.
    fn secret_key<C>(self, der: &[u8]) -> Option<SecretKey<C>>
    where
        C: AssociatedOid + Curve + ValidatePublicKey,
        FieldBytesSize<C>: ModulusSize,
    {
        match self {
            Encoding::Pkcs8 => SecretKey::<C>::from_pkcs8_der(der).ok(),
            Encoding::Sec1 => SecretKey::<C>::from_sec1_der(der).ok(),
        }
    }
}

impl PrivateKey {
    /// Parses a PEM private key: PKCS#8 (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`).
    /// Encrypted keys are not supported.
    pub fn from_pem(pem: &str) -> Result<Self, SignatureError> {
        let (label, der) = pem_rfc7468_decode(pem)?;
        let (encoding, unsupported) = match label.as_str() {
            "PRIVATE KEY" => (
                Encoding::Pkcs8,
                "not an ECDSA P-256, P-384 or P-521 PKCS#8 key",
            ),
            "EC PRIVATE KEY" => (Encoding::Sec1, "not a P-256, P-384 or P-521 SEC1 key"),
            "ENCRYPTED PRIVATE KEY" => {
                return Err(SignatureError::UnsupportedKey(
                    "encrypted private keys are not supported; decrypt with `openssl pkcs8`".into(),
                ));
            }
            other => {
                return Err(bad_key(
                    "private key PEM",
                    format!("unexpected label {other:?}"),
                ));
            }
        };
        if let Some(k) = encoding.secret_key::<p256::NistP256>(&der) {
            return Ok(Self::P256(k.into()));
        }
        if let Some(k) = encoding.secret_key::<p384::NistP384>(&der) {
            return Ok(Self::P384(k.into()));
        }
        if let Some(k) = encoding.secret_key::<p521::NistP521>(&der) {
            return Self::p521(&k);
        }
        Err(SignatureError::UnsupportedKey(unsupported.into()))
    }

    fn p521(k: &p521::SecretKey) -> Result<Self, SignatureError> {
        let sk = p521::ecdsa::SigningKey::from_bytes(&k.to_bytes())
            .map_err(|e| bad_key("P-521 key", e))?;
        Ok(Self::P521(sk))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        match self {
            PrivateKey::P256(k) => PublicKey::P256(*k.verifying_key()),
            PrivateKey::P384(k) => PublicKey::P384(*k.verifying_key()),
            PrivateKey::P521(k) => {
                PublicKey::P521(p521::PublicKey::from_secret_scalar(k.as_nonzero_scalar()))
            }
        }
    }

    /// Signs `msg` with the curve's hash; returns the DER signature.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        use p256::ecdsa::signature::Signer as _;
        match self {
            PrivateKey::P256(k) => {
                let s: p256::ecdsa::Signature = k.sign(msg);
                s.to_der().as_bytes().to_vec()
            }
            PrivateKey::P384(k) => {
                let s: p384::ecdsa::Signature = k.sign(msg);
                s.to_der().as_bytes().to_vec()
            }
            PrivateKey::P521(k) => {
                let s: p521::ecdsa::Signature = k.sign(msg);
                s.to_der().as_bytes().to_vec()
            }
        }
    }
}

/// Decodes one PEM block, tolerating surrounding text (as OpenSSL does).
pub(crate) fn pem_rfc7468_decode(pem: &str) -> Result<(String, Vec<u8>), SignatureError> {
    let start = pem
        .find("-----BEGIN ")
        .ok_or_else(|| bad_key("PEM", "no BEGIN line"))?;
    let rest = &pem[start..];
    let end_line = rest
        .find("-----END ")
        .ok_or_else(|| bad_key("PEM", "no END line"))?;
    let end = rest[end_line + 9..]
        .find("-----")
        .map(|i| end_line + 9 + i + 5)
        .ok_or_else(|| bad_key("PEM", "unterminated END line"))?;
    let (label, der) = p256::pkcs8::der::pem::decode_vec(&rest.as_bytes()[..end])
        .map_err(|e| bad_key("PEM", e))?;
    Ok((label.to_owned(), der))
}
