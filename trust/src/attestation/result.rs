//! Signed attestation results: an EAR-style JWT (ES256) that tells relying parties what
//! the gateway decided, for which key, under which policy, until when.
//!
//! Claims: `iss`, `sub` (device), `iat`, `exp`, `ear.status` (`affirming` or
//! `contraindicated`), `ear.appraisal-policy-id` (policy name and sha256), and
//! `edgefleet.tee`, `edgefleet.measurements`, `edgefleet.key` (sha256 of the agent
//! key's SPKI), `edgefleet.deny` (reasons, when contraindicated).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use serde_json::{Value, json};

use super::AttestationError;

/// Signs `claims` as a compact JWS with ES256.
pub fn sign(key: &p256::ecdsa::SigningKey, claims: &Value) -> String {
    let header = B64URL.encode(json!({"alg": "ES256", "typ": "JWT"}).to_string());
    let payload = B64URL.encode(claims.to_string());
    let input = format!("{header}.{payload}");
    let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
    format!("{input}.{}", B64URL.encode(sig.to_bytes()))
}

/// Verifies a compact JWS made by [`sign`] and returns its claims, checking `exp`
/// against `now` (seconds since the epoch).
pub fn verify(
    key: &p256::ecdsa::VerifyingKey,
    token: &str,
    now: i64,
) -> Result<Value, AttestationError> {
    let bad = |m: &str| AttestationError::Malformed(format!("attestation result: {m}"));
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not a compact JWS"));
    };
    let header: Value = serde_json::from_slice(&B64URL.decode(h).map_err(|_| bad("header"))?)
        .map_err(|_| bad("header"))?;
    if header["alg"] != "ES256" {
        return Err(AttestationError::Unsupported(format!(
            "JWS alg {}",
            header["alg"]
        )));
    }
    let sig = p256::ecdsa::Signature::from_slice(&B64URL.decode(s).map_err(|_| bad("signature"))?)
        .map_err(|_| bad("signature"))?;
    key.verify(format!("{h}.{p}").as_bytes(), &sig)
        .map_err(|_| AttestationError::SignatureInvalid("attestation result".into()))?;
    let claims: Value = serde_json::from_slice(&B64URL.decode(p).map_err(|_| bad("payload"))?)
        .map_err(|_| bad("payload"))?;
    match claims["exp"].as_i64() {
        Some(exp) if exp > now => Ok(claims),
        Some(_) => Err(AttestationError::Malformed(
            "attestation result expired".into(),
        )),
        None => Err(bad("no exp")),
    }
}
