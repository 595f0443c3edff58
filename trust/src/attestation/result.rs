//! Signed attestation results: an EAR-style JWT (ES256) that tells relying parties what
//! the gateway decided, for which key, under which policy, until when.
//!
//! Claims: `iss`, `sub` (device), `iat`, `exp`, `ear.status` (`affirming` or
//! `contraindicated`), `ear.appraisal-policy-id` (policy name and sha256), and
//! `edgefleet.tee`, `edgefleet.measurements`, `edgefleet.key` (sha256 of the agent
//! key's SPKI), `edgefleet.deny` (reasons, when contraindicated).

use serde_json::Value;

use super::AttestationError;
use crate::jws::{Jws, JwsError};

/// The JWS `typ` of an attestation result.
pub const TYP: &str = "JWT";

/// Signs `claims` as a compact JWS with ES256.
pub fn sign(key: &p256::ecdsa::SigningKey, claims: &Value) -> String {
    sign_with_chain(key, &[], claims)
}

/// Signs `claims` as a compact JWS with ES256, with the signer's certificate `chain`
/// (DER, leaf first) in the header's `x5c`, so that a relying party holding only the
/// device CA can check it ([`crate::receipt`]).
pub fn sign_with_chain(key: &p256::ecdsa::SigningKey, chain: &[Vec<u8>], claims: &Value) -> String {
    crate::jws::sign(key, TYP, chain, claims.to_string().as_bytes())
}

/// Verifies a compact JWS made by [`sign`] and returns its claims, checking `exp`
/// against `now` (seconds since the epoch).
pub fn verify(
    key: &p256::ecdsa::VerifyingKey,
    token: &str,
    now: i64,
) -> Result<Value, AttestationError> {
    let bad = |m: &str| AttestationError::Malformed(format!("attestation result: {m}"));
    let jws = Jws::parse(token).map_err(|e| match e {
        JwsError::Algorithm(alg) => AttestationError::Unsupported(format!("JWS alg {alg}")),
        JwsError::Malformed(m) => bad(m),
        JwsError::Signature => bad("signature"),
    })?;
    jws.verify(key)
        .map_err(|_| AttestationError::SignatureInvalid("attestation result".into()))?;
    let claims: Value = serde_json::from_slice(&jws.payload).map_err(|_| bad("payload"))?;
    match claims["exp"].as_i64() {
        Some(exp) if exp > now => Ok(claims),
        Some(_) => Err(AttestationError::Malformed(
            "attestation result expired".into(),
        )),
        None => Err(bad("no exp")),
    }
}
