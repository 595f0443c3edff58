//! The development attester: a software P-256 key signs the report data.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use edgefleet_trust::attestation::dev::{CONTEXT, DevEvidence};
use p256::ecdsa::signature::Signer as _;
use p256::pkcs8::EncodePublicKey as _;

use super::AttestError;

/// A development attester with its own key.
#[derive(Debug, Clone)]
pub struct DevAttester {
    key: p256::ecdsa::SigningKey,
}

impl DevAttester {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self {
            key: p256::ecdsa::SigningKey::random(&mut rand_core::OsRng),
        }
    }

    /// Evidence over `report_data`.
    pub fn evidence(&self, report_data: &[u8; 64]) -> Result<DevEvidence, AttestError> {
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(report_data);
        let sig: p256::ecdsa::Signature = self.key.sign(&msg);
        let spki = self
            .key
            .verifying_key()
            .to_public_key_der()
            .map_err(|e| AttestError::Encoding(e.to_string()))?;
        Ok(DevEvidence {
            public_key: B64.encode(spki.as_bytes()),
            report_data: hex::encode(report_data),
            signature: B64.encode(sig.to_der().as_bytes()),
        })
    }
}
