//! TPM 2.0 attester (tss-esapi 7.7 over a TCTI: `device:/dev/tpmrm0`, or
//! `swtpm:host=127.0.0.1,port=2321` for swtpm).
//!
//! Creates the RSA-2048 EK from the default template and an RSA-2048 restricted signing
//! AK under it, answers the gateway's credential challenge (TPM2_ActivateCredential with
//! the EK under a PolicySecret(endorsement) session), and quotes all 24 SHA-256 PCRs with
//! the gateway's nonce. Objects stay loaded for the attester's lifetime; sessions are
//! flushed after each use, because swtpm has no resource manager.

use std::str::FromStr as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use edgefleet_trust::attestation::tpm::{TpmEvidence, TpmQuote};
use edgefleet_trust::attestation::tpm_enrol;
use tss_esapi::Context;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, DefaultKey, ak, ek};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, PcrHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, DigestValues, EncryptedSecret, IdObject, PcrSelectionListBuilder, PcrSlot,
    Public, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall as _;

use super::AttestError;

const RSA2048: AsymmetricAlgorithmSelection =
    AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048);

const SLOTS: [PcrSlot; 24] = [
    PcrSlot::Slot0,
    PcrSlot::Slot1,
    PcrSlot::Slot2,
    PcrSlot::Slot3,
    PcrSlot::Slot4,
    PcrSlot::Slot5,
    PcrSlot::Slot6,
    PcrSlot::Slot7,
    PcrSlot::Slot8,
    PcrSlot::Slot9,
    PcrSlot::Slot10,
    PcrSlot::Slot11,
    PcrSlot::Slot12,
    PcrSlot::Slot13,
    PcrSlot::Slot14,
    PcrSlot::Slot15,
    PcrSlot::Slot16,
    PcrSlot::Slot17,
    PcrSlot::Slot18,
    PcrSlot::Slot19,
    PcrSlot::Slot20,
    PcrSlot::Slot21,
    PcrSlot::Slot22,
    PcrSlot::Slot23,
];

/// A TPM with its EK and AK loaded.
pub struct TpmAttester {
    ctx: Context,
    ek: KeyHandle,
    ak: KeyHandle,
    ak_public: Public,
}

impl std::fmt::Debug for TpmAttester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmAttester").finish_non_exhaustive()
    }
}

impl TpmAttester {
    /// Opens the TPM at `tcti` and creates the EK and a fresh AK.
    pub fn open(tcti: &str) -> Result<Self, AttestError> {
        let mut ctx = Context::new(TctiNameConf::from_str(tcti)?)?;
        let ek = ek::create_ek_object_2(&mut ctx, RSA2048, DefaultKey)?;
        let created = ak::create_ak_2(
            &mut ctx,
            ek,
            HashingAlgorithm::Sha256,
            RSA2048,
            SignatureSchemeAlgorithm::RsaSsa,
            None,
            DefaultKey,
        )?;
        let ak_public = created.out_public.clone();
        let ak = ak::load_ak(&mut ctx, ek, None, created.out_private, created.out_public)?;
        Ok(Self {
            ctx,
            ek,
            ak,
            ak_public,
        })
    }

    /// The EK certificate from the TPM's NV index (DER).
    pub fn ek_certificate(&mut self) -> Result<Vec<u8>, AttestError> {
        Ok(ek::retrieve_ek_pubcert(&mut self.ctx, RSA2048)?)
    }

    /// The AK's TPMT_PUBLIC, which the gateway parses and names.
    pub fn ak_public_area(&self) -> Result<Vec<u8>, AttestError> {
        Ok(self.ak_public.marshall()?)
    }

    /// The AK's name as the TPM computes it.
    pub fn ak_name(&mut self) -> Result<Vec<u8>, AttestError> {
        Ok(self.ctx.tr_get_name(self.ak.into())?.value().to_vec())
    }

    /// Answers a credential challenge: returns the secret only if the AK named in the
    /// challenge is loaded beside the EK it was encrypted to.
    pub fn activate_credential(
        &mut self,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, AttestError> {
        let blob = IdObject::try_from(id_object.to_vec())?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec())?;
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )?
            .ok_or_else(|| AttestError::Encoding("the TPM returned no policy session".into()))?;
        let result = (|| {
            let policy = PolicySession::try_from(session)?;
            self.ctx.execute_with_nullauth_session(|ctx| {
                ctx.policy_secret(
                    policy,
                    AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })?;
            let (ak, ek) = (self.ak, self.ek);
            let digest = self.ctx.execute_with_sessions(
                (Some(AuthSession::Password), Some(session), None),
                |ctx| ctx.activate_credential(ak, ek, blob, secret),
            )?;
            Ok::<_, AttestError>(digest.value().to_vec())
        })();
        let _ = self.ctx.flush_context(SessionHandle::from(session).into());
        result
    }

    /// Quotes the SHA-256 PCR bank with `nonce` (at most 64 bytes).
    pub fn quote(&mut self, nonce: &[u8]) -> Result<TpmEvidence, AttestError> {
        let selection = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &SLOTS)
            .build()?;
        let ak = self.ak;
        let data = Data::try_from(nonce.to_vec())?;
        let (attest, signature) = self.ctx.execute_with_nullauth_session(|ctx| {
            ctx.quote(ak, data, SignatureScheme::Null, selection.clone())
        })?;
        let pcr_data = self
            .ctx
            .execute_without_session(|ctx| tss_esapi::abstraction::pcr::read_all(ctx, selection))?;
        let bank = pcr_data
            .pcr_bank(HashingAlgorithm::Sha256)
            .ok_or_else(|| AttestError::Encoding("no SHA-256 PCR bank".into()))?;
        let pcrs = SLOTS
            .iter()
            .map(|s| bank.get_digest(*s).map(|d| hex::encode(d.value())))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| AttestError::Encoding("a PCR is missing from the read".into()))?;
        let ak_area = self.ak_public.marshall()?;
        let ak_spki = tpm_enrol::parse_ak_public(&ak_area)
            .and_then(|a| tpm_enrol::ak_spki_der(&a))
            .map_err(|e| AttestError::Encoding(e.to_string()))?;
        Ok(TpmEvidence {
            ak_public: B64.encode(ak_spki),
            tpm_quote: TpmQuote {
                message: B64.encode(attest.marshall()?),
                signature: B64.encode(signature.marshall()?),
                pcrs,
            },
        })
    }

    /// Extends PCR 16 (the debug PCR) with a SHA-256 digest; for tests and tools.
    pub fn extend_debug_pcr(&mut self, digest: [u8; 32]) -> Result<(), AttestError> {
        let mut values = DigestValues::new();
        values.set(HashingAlgorithm::Sha256, Digest::try_from(digest.to_vec())?);
        self.ctx
            .execute_with_nullauth_session(|ctx| ctx.pcr_extend(PcrHandle::Pcr16, values))?;
        Ok(())
    }
}
