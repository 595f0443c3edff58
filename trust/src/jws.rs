//! Compact JWS with ES256 (RFC 7515, RFC 7518 §3.4), the one format of the fleet's
//! signed statements: attestation results ([`crate::attestation::result`]) and
//! receipts ([`crate::receipt`]). A signer's certificate chain, when sent, is the
//! protected header's `x5c` (RFC 7515 §4.1.6: base64 DER, leaf first), so that it is
//! signed with the rest.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use serde_json::{Value, json};

/// Largest token parsed.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// Signs `payload` with `key` as a compact JWS whose header has `typ` and, when
/// `chain` is not empty, `x5c`.
pub fn sign(key: &p256::ecdsa::SigningKey, typ: &str, chain: &[Vec<u8>], payload: &[u8]) -> String {
    let mut header = json!({"alg": "ES256", "typ": typ});
    if !chain.is_empty() {
        header["x5c"] = json!(chain.iter().map(|c| B64.encode(c)).collect::<Vec<_>>());
    }
    let input = format!(
        "{}.{}",
        B64URL.encode(header.to_string()),
        B64URL.encode(payload)
    );
    let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
    // Low-S only (see [`Jws::parse`]), so that a token has one signature, and one id.
    let sig = sig.normalize_s().unwrap_or(sig);
    format!("{input}.{}", B64URL.encode(sig.to_bytes()))
}

/// A parsed compact JWS, not verified yet.
#[derive(Debug, Clone)]
pub struct Jws {
    /// The protected header.
    pub header: Value,
    /// The payload's bytes.
    pub payload: Vec<u8>,
    input: String,
    signature: p256::ecdsa::Signature,
}

/// Why a token is not a JWS this module reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    /// Not a compact JWS, or a part does not decode.
    #[error("not a compact JWS: {0}")]
    Malformed(&'static str),
    /// Another algorithm than ES256.
    #[error("JWS algorithm {0} is not ES256")]
    Algorithm(String),
    /// The signature does not verify under the key.
    #[error("the signature does not verify")]
    Signature,
}

impl Jws {
    /// Parses `token` (ES256 only).
    pub fn parse(token: &str) -> Result<Self, JwsError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwsError::Malformed("too large"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwsError::Malformed("not three parts"));
        };
        let header: Value = B64URL
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwsError::Malformed("header"))?;
        if header["alg"] != "ES256" {
            return Err(JwsError::Algorithm(header["alg"].to_string()));
        }
        // No extension this reader would have to understand (RFC 7515 §4.1.11).
        if !header["crit"].is_null() {
            return Err(JwsError::Malformed("crit"));
        }
        let payload = B64URL
            .decode(p)
            .map_err(|_| JwsError::Malformed("payload"))?;
        let signature = B64URL
            .decode(s)
            .ok()
            .and_then(|b| p256::ecdsa::Signature::from_slice(&b).ok())
            .ok_or(JwsError::Malformed("signature"))?;
        // ECDSA's (r, n - s) verifies too: refusing the high-S twin keeps one valid
        // token per signed content, so a token's SHA-256 is an id nobody can vary.
        if signature.normalize_s().is_some() {
            return Err(JwsError::Malformed("signature (high S)"));
        }
        Ok(Self {
            header,
            payload,
            input: format!("{h}.{p}"),
            signature,
        })
    }

    /// Checks the signature with `key`.
    pub fn verify(&self, key: &p256::ecdsa::VerifyingKey) -> Result<(), JwsError> {
        key.verify(self.input.as_bytes(), &self.signature)
            .map_err(|_| JwsError::Signature)
    }

    /// The header's `x5c` chain as DER, leaf first (empty when absent).
    pub fn chain(&self) -> Result<Vec<Vec<u8>>, JwsError> {
        match &self.header["x5c"] {
            Value::Null => Ok(Vec::new()),
            Value::Array(certs) => certs
                .iter()
                .map(|c| {
                    c.as_str()
                        .and_then(|s| B64.decode(s).ok())
                        .ok_or(JwsError::Malformed("x5c"))
                })
                .collect(),
            _ => Err(JwsError::Malformed("x5c")),
        }
    }
}
