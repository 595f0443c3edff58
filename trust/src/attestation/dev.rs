//! The `dev` attester's evidence: a software P-256 key signs the report data. It proves
//! possession of a key and nothing about the platform, so its claims say
//! `hardware_genuine: false` and the default policy rejects them. For development
//! clusters and the fleet simulator only.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::Verifier as _;
use p256::pkcs8::DecodePublicKey as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{AttestationError, Claims, TeeKind};

/// Domain separation for what the dev key signs.
pub const CONTEXT: &[u8] = b"edgefleet dev attestation v1\0";

/// Dev evidence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevEvidence {
    /// P-256 SubjectPublicKeyInfo DER, base64.
    pub public_key: String,
    /// The 64 bytes of report data, hex.
    pub report_data: String,
    /// DER ECDSA signature over [`CONTEXT`] ‖ report data, base64.
    pub signature: String,
}

/// Verifies dev evidence, and the binding when given.
pub fn verify(
    e: &DevEvidence,
    expected_report_data: Option<&[u8]>,
) -> Result<Claims, AttestationError> {
    let spki = B64
        .decode(&e.public_key)
        .map_err(|x| AttestationError::Malformed(format!("public_key: {x}")))?;
    let rd = hex::decode(&e.report_data)
        .map_err(|x| AttestationError::Malformed(format!("report_data: {x}")))?;
    let sig = B64
        .decode(&e.signature)
        .map_err(|x| AttestationError::Malformed(format!("signature: {x}")))?;
    let key = p256::ecdsa::VerifyingKey::from_public_key_der(&spki)
        .map_err(|x| AttestationError::Malformed(format!("public_key: {x}")))?;
    let sig = p256::ecdsa::Signature::from_der(&sig)
        .map_err(|x| AttestationError::SignatureInvalid(x.to_string()))?;
    let mut msg = CONTEXT.to_vec();
    msg.extend_from_slice(&rd);
    key.verify(&msg, &sig)
        .map_err(|_| AttestationError::SignatureInvalid("dev evidence signature".into()))?;
    let key_binding = super::check_binding(expected_report_data, &rd)?;
    Ok(Claims {
        tee: TeeKind::Dev,
        hardware_genuine: false,
        debug: true,
        measurements: BTreeMap::new(),
        tcb: BTreeMap::new(),
        report_data: hex::encode(&rd),
        key_binding,
        signer: hex::encode(Sha256::digest(&spki)),
        platform: BTreeMap::new(),
    })
}
