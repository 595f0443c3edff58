//! Challenges that carry their own state, so that any gateway replica can check the
//! evidence that answers a challenge another replica issued, and no replica keeps a
//! table of outstanding challenges that a flood could fill.
//!
//! A challenge's nonce is a sealed token: AES-256-GCM over what the evidence will be
//! checked against (device, agent key, evidence kind, TPM credential material, issue and
//! expiry times), under a key of its own: HKDF-SHA256 from the device CA's private key
//! (which every replica holds to issue device certificates) and 32 random bytes the
//! token carries. A fresh key per token means a repeated random IV (anyone who knows a
//! device's public key may ask for challenges in a loop) never reuses a GCM key and
//! nonce pair. The device can read none of it (the TPM credential's secret must stay
//! hidden from it until `TPM2_ActivateCredential` recovers it), change none of it, and a
//! token sealed under another key does not open.
//!
//! A token stays valid until it expires, whichever replica sees it: single use is
//! enforced where the evidence's result lands, in the device's status (the gateway
//! records each used token's issue time and accepts only a strictly newer one, with a
//! resourceVersion precondition on that write).

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::TeeKind;

/// Version byte of the token format.
const VERSION: u8 = 2;
/// Random bytes per token, from which its key derives.
const SALT_LEN: usize = 32;
/// Associated data of every token.
const AAD: &[u8] = b"edgefleet attestation challenge v1";
/// Largest token accepted (a TPM challenge with RSA-2048 keys is about 1.2 KiB).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What a challenge binds, sealed into its nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Device (EdgeDevice name).
    pub device: String,
    /// The agent's public key (SPKI DER), base64.
    pub agent_key: String,
    /// The evidence kind the device will send.
    pub tee: TeeKind,
    /// When the challenge was issued (milliseconds since the epoch).
    pub issued_ms: u64,
    /// When it expires (milliseconds since the epoch).
    pub expires_ms: u64,
    /// Random bytes, base64: no two challenges are alike, even sealed under one key.
    pub salt: String,
    /// TPM only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<SealedTpm>,
}

/// The TPM credential material of a challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedTpm {
    /// The AK's SubjectPublicKeyInfo (DER), base64.
    pub ak_spki: String,
    /// The EK's SubjectPublicKeyInfo (DER), base64.
    pub ek_spki: String,
    /// The credential's secret, base64.
    pub secret: String,
}

/// Seals and opens challenge tokens under keys derived from the device CA's key.
pub struct Sealer {
    prk: hkdf::Prk,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

/// Why a token does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format, or sealed under another key, or altered.
    #[error("not a challenge this fleet issued")]
    Invalid,
    /// Sealing failed (no randomness, say).
    #[error("sealing a challenge failed")]
    Seal,
}

impl Sealer {
    /// The sealer whose key derives from `ca_key_pem` (every replica holding the same
    /// device CA key derives the same one).
    pub fn from_ca_key(ca_key_pem: &[u8]) -> Result<Self, TokenError> {
        let prk =
            hkdf::Salt::new(hkdf::HKDF_SHA256, b"edgefleet challenge tokens").extract(ca_key_pem);
        Ok(Self { prk })
    }

    /// The key of the token with `salt`.
    fn key(&self, salt: &[u8]) -> Result<LessSafeKey, TokenError> {
        struct Len;
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                32
            }
        }
        let info: [&[u8]; 2] = [b"aes-256-gcm v2", salt];
        let okm = self.prk.expand(&info, Len).map_err(|_| TokenError::Seal)?;
        let mut bytes = [0u8; 32];
        okm.fill(&mut bytes).map_err(|_| TokenError::Seal)?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| TokenError::Seal)?;
        Ok(LessSafeKey::new(key))
    }

    /// The token for `sealed`.
    pub fn seal(&self, sealed: &Sealed) -> Result<Vec<u8>, TokenError> {
        let mut salt = [0u8; SALT_LEN];
        let mut iv = [0u8; NONCE_LEN];
        rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut salt)
            .map_err(|_| TokenError::Seal)?;
        rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut iv)
            .map_err(|_| TokenError::Seal)?;
        let mut body = serde_json::to_vec(sealed).map_err(|_| TokenError::Seal)?;
        self.key(&salt)?
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(iv), Aad::from(AAD), &mut body)
            .map_err(|_| TokenError::Seal)?;
        let mut token = Vec::with_capacity(1 + SALT_LEN + NONCE_LEN + body.len());
        token.push(VERSION);
        token.extend_from_slice(&salt);
        token.extend_from_slice(&iv);
        token.extend_from_slice(&body);
        Ok(token)
    }

    /// What `token` seals, when this fleet sealed it and nobody altered it.
    pub fn open(&self, token: &[u8]) -> Result<Sealed, TokenError> {
        if token.len() > MAX_TOKEN_BYTES || token.len() < 1 + SALT_LEN + NONCE_LEN {
            return Err(TokenError::Invalid);
        }
        let (version, rest) = token.split_at(1);
        if version != [VERSION] {
            return Err(TokenError::Invalid);
        }
        let (salt, rest) = rest.split_at(SALT_LEN);
        let (iv, body) = rest.split_at(NONCE_LEN);
        let iv: [u8; NONCE_LEN] = iv.try_into().map_err(|_| TokenError::Invalid)?;
        let mut body = body.to_vec();
        let plain = self
            .key(salt)?
            .open_in_place(Nonce::assume_unique_for_key(iv), Aad::from(AAD), &mut body)
            .map_err(|_| TokenError::Invalid)?;
        serde_json::from_slice(plain).map_err(|_| TokenError::Invalid)
    }
}

/// Base64 of `bytes`.
pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sealed() -> Sealed {
        Sealed {
            device: "till-1".into(),
            agent_key: b64(b"key"),
            tee: TeeKind::Tpm,
            issued_ms: 1_000,
            expires_ms: 31_000,
            salt: b64(&[7; 16]),
            tpm: Some(SealedTpm {
                ak_spki: b64(b"ak"),
                ek_spki: b64(b"ek"),
                secret: b64(&[9; 32]),
            }),
        }
    }

    #[test]
    fn a_token_opens_under_the_same_ca_key_only_and_hides_what_it_seals() {
        let a = Sealer::from_ca_key(b"ca key A").unwrap();
        let replica = Sealer::from_ca_key(b"ca key A").unwrap();
        let other = Sealer::from_ca_key(b"ca key B").unwrap();
        let token = a.seal(&sealed()).unwrap();
        assert_eq!(replica.open(&token).unwrap(), sealed());
        assert_eq!(other.open(&token), Err(TokenError::Invalid));
        // The TPM secret is not readable in the token.
        let secret = b64(&[9; 32]);
        assert!(
            !String::from_utf8_lossy(&token).contains(&secret),
            "the secret shows"
        );
        // Two seals of the same content differ (fresh IV).
        assert_ne!(a.seal(&sealed()).unwrap(), token);
    }

    #[test]
    fn an_altered_truncated_or_foreign_token_is_invalid() {
        let s = Sealer::from_ca_key(b"ca key A").unwrap();
        let token = s.seal(&sealed()).unwrap();
        for i in [0, 1, 13, token.len() / 2, token.len() - 1] {
            let mut t = token.clone();
            t[i] ^= 1;
            assert_eq!(s.open(&t), Err(TokenError::Invalid), "byte {i}");
        }
        assert_eq!(s.open(&token[..token.len() - 1]), Err(TokenError::Invalid));
        assert_eq!(s.open(&[]), Err(TokenError::Invalid));
        assert_eq!(s.open(&[0u8; 32]), Err(TokenError::Invalid));
        assert_eq!(
            s.open(&vec![1u8; MAX_TOKEN_BYTES + 1]),
            Err(TokenError::Invalid)
        );
    }
}
