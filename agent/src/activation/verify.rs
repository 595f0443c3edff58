//! Checking artifacts against their signatures: the signers of a desired model as a
//! [`TrustPolicy`] ([`trust_policy`]), and verifying a file against its bundle and the
//! digest the gateway gave for it ([`verify_file`]).

use std::path::Path;

use edgefleet_proto as proto;
use edgefleet_trust::model_signing::{TrustPolicy, TrustedSigner};

use super::ActivateError;

/// The signers of a desired model as a trust policy.
pub fn trust_policy(signers: &[proto::Signer]) -> Result<TrustPolicy, ActivateError> {
    let signers = signers
        .iter()
        .map(|s| {
            TrustedSigner::from_pem(
                &s.name,
                s.public_key.as_deref(),
                s.certificate_root.as_deref(),
                &s.identities,
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(ActivateError::Signature)?;
    Ok(TrustPolicy { signers })
}

/// Verifies `file` against `bundle` and, for a single-file bundle, that it signs the
/// same digest as `digest` (the gateway's word, already checked on the bytes).
pub fn verify_file(
    file: &Path,
    bundle: &str,
    policy: &TrustPolicy,
    digest: &str,
) -> Result<(), ActivateError> {
    let v = edgefleet_trust::model_signing::verify(
        bundle.as_bytes(),
        file,
        policy,
        std::time::SystemTime::now(),
        &[],
    )
    .map_err(|e| ActivateError::Signature(format!("{}: {e}", e.reason())))?;
    if let [(_, signed)] = v.resources.as_slice()
        && format!("sha256:{signed}") != digest
    {
        return Err(ActivateError::Signature(format!(
            "the bundle signs sha256:{signed}, not {digest}"
        )));
    }
    tracing::info!(file = %file.display(), signer = %v.signer, "signature verified");
    Ok(())
}
