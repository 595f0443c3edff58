//! The gateway's attestation service, without transport or Kubernetes: stateless
//! challenges with a short TTL (each nonce a sealed token, [`super::challenge_token`],
//! that any replica holding the device CA key can open; single use is enforced where
//! the result lands, by the gateway), evidence verification for each TEE kind against the
//! binding of {nonce, agent key, device}, TPM credential activation, Rego appraisal,
//! a signed attestation result, and the device's short-lived client certificate —
//! issued only when the policy allows, for the key in the device's CSR, which must be
//! the key the evidence binds.
//!
//! [`AttestationService::evidence`] is two steps, which the gateway runs apart so that
//! it can compare the evidence's [`HardwareIdentity`] with the device's recorded one in
//! between: [`AttestationService::verify`] (verification and appraisal) and
//! [`AttestationService::conclude`] (the signed result and the certificate).

use std::collections::HashMap;
use std::sync::Mutex;

use super::challenge_token::{Sealed, SealedTpm, Sealer};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::FromDer as _;

use super::dev::{self, DevEvidence};
use super::identity::{HardwareIdentity, HardwareMismatch};
use super::policy::{Decision, Policy, PolicyError};
use super::snp::{self, SnpOptions, SnpRoots};
use super::tdx::{self, TdxOptions};
use super::tpm::{self, ClockState, TpmEvidence, TpmOptions};
use super::{AttestationError, Claims, TeeKind, binding, tpm_enrol};

/// Longest challenge lifetime accepted in configuration.
pub const MAX_NONCE_TTL: Duration = Duration::from_secs(60);
/// How far ahead of this replica's clock a challenge's issue time may be (replicas'
/// clocks differ a little).
pub const MAX_CLOCK_SKEW_MS: u64 = 5_000;
/// Largest agent public key accepted.
const MAX_KEY_BYTES: usize = 2048;

/// Errors of the service, each a named rejection.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The nonce was never issued by this fleet, was altered, or expired.
    #[error("unknown or expired nonce")]
    UnknownNonce,
    /// The nonce was already answered (recorded in the device's status), or a newer
    /// challenge of the device was.
    #[error("the challenge was already used")]
    NonceUsed,
    /// The evidence request names another device or key than the challenge.
    #[error("the request does not match its challenge: {0}")]
    ChallengeMismatch(String),
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The evidence did not verify.
    #[error("evidence rejected: {0}")]
    Evidence(#[from] AttestationError),
    /// TPM: the credential challenge was not answered correctly.
    #[error("TPM credential activation failed: the AK is not bound to the EK")]
    CredentialMismatch,
    /// The CSR is malformed, badly signed, or for another key.
    #[error("CSR: {0}")]
    Csr(String),
    /// The policy failed to evaluate.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Certificate issuance failed.
    #[error("issuing the certificate: {0}")]
    Issue(String),
    /// The evidence comes from other hardware than the device's recorded identity.
    #[error(transparent)]
    HardwareMismatch(#[from] HardwareMismatch),
}

impl ServiceError {
    /// Stable CamelCase name for responses, events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ServiceError::UnknownNonce => "UnknownNonce",
            ServiceError::NonceUsed => "NonceUsed",
            ServiceError::ChallengeMismatch(_) => "ChallengeMismatch",
            ServiceError::BadRequest(_) => "BadRequest",
            ServiceError::Evidence(e) => e.reason(),
            ServiceError::CredentialMismatch => "CredentialMismatch",
            ServiceError::Csr(_) => "InvalidCsr",
            ServiceError::Policy(_) => "PolicyError",
            ServiceError::Issue(_) => "IssueFailed",
            ServiceError::HardwareMismatch(m) => m.reason(),
        }
    }
}

/// Trust anchors and lifetimes.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Challenge lifetime (at most [`MAX_NONCE_TTL`]).
    pub nonce_ttl: Duration,
    /// How long a positive decision (and the client certificate) lasts.
    pub result_ttl: Duration,
    /// AMD roots per CPU generation.
    pub snp_roots: Vec<SnpRoots>,
    /// Intel SGX root (DER).
    pub intel_root: Option<Vec<u8>>,
    /// Intel's TDX collateral directory ([`super::tdx_collateral`]), read for each quote
    /// so that a refreshed copy takes effect without a restart. Without it TDX claims
    /// carry `tcb_status: "unknown"`.
    pub tdx_collateral: Option<std::path::PathBuf>,
    /// EK CAs (DER) and their intermediates (DER).
    pub ek_cas: Vec<Vec<u8>>,
    /// EK intermediates (DER).
    pub ek_intermediates: Vec<Vec<u8>>,
}

/// TPM enrolment material sent with a challenge request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TpmEnrolment {
    /// EK certificate, DER, base64.
    pub ek_certificate: String,
    /// AK TPMT_PUBLIC, base64.
    pub ak_public_area: String,
}

/// `POST /v1/attestation/challenge`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChallengeRequest {
    /// Device (EdgeDevice name).
    pub device: String,
    /// The agent's public key (SPKI DER, base64) that the certificate will carry.
    pub agent_public_key: String,
    /// Evidence kind the device will send.
    pub tee: TeeKind,
    /// TPM only: EK certificate and AK public area.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmEnrolment>,
}

/// A TPM credential challenge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialChallenge {
    /// TPM2B_ID_OBJECT contents, base64.
    pub id_object: String,
    /// TPM2B_ENCRYPTED_SECRET contents, base64.
    pub encrypted_secret: String,
}

/// The challenge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Challenge {
    /// Single-use nonce, base64.
    pub nonce: String,
    /// Seconds until it expires.
    pub expires_in_seconds: u64,
    /// The 64 bytes to put in the evidence's report data, hex.
    pub report_data: String,
    /// TPM only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialChallenge>,
}

/// Evidence by kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Evidence {
    /// SEV-SNP report and VCEK (DER), base64.
    SevSnp {
        /// Report.
        report: String,
        /// VCEK or VLEK.
        vcek: String,
    },
    /// TDX quote, base64.
    Tdx {
        /// Quote.
        quote: String,
    },
    /// TPM quote and the activated credential.
    Tpm {
        /// The quote.
        evidence: TpmEvidence,
        /// The secret recovered by TPM2_ActivateCredential, base64.
        credential: String,
    },
    /// Development key.
    Dev {
        /// The evidence.
        evidence: DevEvidence,
    },
}

/// `POST /v1/attestation/evidence`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvidenceRequest {
    /// Device.
    pub device: String,
    /// The challenge's nonce, base64.
    pub nonce: String,
    /// PKCS#10 CSR (PEM) for the agent key.
    pub csr: String,
    /// The evidence.
    pub evidence: Evidence,
}

/// The outcome of an appraisal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Appraisal {
    /// The policy's decision.
    pub decision: Decision,
    /// The verified claims.
    pub claims: Claims,
    /// Signed attestation result (EAR-style JWT, ES256).
    pub attestation_result: String,
    /// The device's client certificate (PEM), only when allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// When the result and certificate lapse (seconds since the epoch).
    pub expires_at: i64,
    /// TPM clock state to compare with at the next attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_clock: Option<ClockState>,
    /// The hardware the evidence came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_identity: Option<HardwareIdentity>,
}

/// Evidence that verified and was appraised, before the result is signed and the
/// certificate issued ([`AttestationService::conclude`]).
#[derive(Debug)]
pub struct Verified {
    /// The device.
    pub device: String,
    /// The policy's decision.
    pub decision: Decision,
    /// The verified claims.
    pub claims: Claims,
    /// The hardware the evidence came from.
    pub hardware_identity: HardwareIdentity,
    /// TPM clock state of the quote.
    pub tpm_clock: Option<ClockState>,
    /// When the answered challenge was issued (milliseconds since the epoch): the
    /// gateway records it and accepts only a strictly newer challenge of the device.
    pub challenge_issued_ms: u64,
    agent_key: Vec<u8>,
}

/// The service. Cheap to share behind an `Arc`.
pub struct AttestationService {
    config: ServiceConfig,
    policy: Policy,
    sealer: Sealer,
    /// The last allowed TPM clock state by device and EK digest: a clock belongs to one
    /// TPM, so another TPM of the same device (after re-keying) starts afresh.
    tpm_clocks: Mutex<HashMap<(String, String), ClockState>>,
    result_key: p256::ecdsa::SigningKey,
    /// The result key's certificate from the device CA (DER) and its validity
    /// (seconds since the epoch), renewed before it lapses ([`Self::result_chain`]).
    result_cert: Mutex<Option<(Vec<u8>, std::ops::Range<i64>)>>,
    ca_issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_cert_pem: String,
}

/// How long the result signer's certificate lasts, and how long before its end a new
/// one is issued (an attestation result that outlives its signer's certificate would
/// not verify).
const RESULT_CERT_DAYS: i64 = 30;
const RESULT_CERT_RENEW_DAYS: i64 = 2;

impl std::fmt::Debug for AttestationService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttestationService")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn b64(what: &str, s: &str) -> Result<Vec<u8>, ServiceError> {
    B64.decode(s.trim())
        .map_err(|e| ServiceError::BadRequest(format!("{what}: {e}")))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl AttestationService {
    /// Builds the service from its trust anchors, the appraisal policy (chosen by the
    /// gateway's configuration, never by the device), the key that signs results, and the
    /// device CA (certificate and key, PEM) that issues client certificates.
    pub fn new(
        mut config: ServiceConfig,
        policy: Policy,
        result_key: p256::ecdsa::SigningKey,
        ca_cert_pem: &str,
        ca_key_pem: &str,
    ) -> Result<Self, ServiceError> {
        config.nonce_ttl = config.nonce_ttl.min(MAX_NONCE_TTL);
        let key = rcgen::KeyPair::from_pem(ca_key_pem)
            .map_err(|e| ServiceError::Issue(format!("CA key: {e}")))?;
        let ca_issuer = rcgen::Issuer::from_ca_cert_pem(ca_cert_pem, key)
            .map_err(|e| ServiceError::Issue(format!("CA certificate: {e}")))?;
        let sealer = Sealer::from_ca_key(ca_key_pem.as_bytes())
            .map_err(|e| ServiceError::Issue(format!("challenge key: {e}")))?;
        Ok(Self {
            config,
            policy,
            sealer,
            tpm_clocks: Mutex::new(HashMap::new()),
            result_key,
            result_cert: Mutex::new(None),
            ca_issuer,
            ca_cert_pem: ca_cert_pem.to_owned(),
        })
    }

    /// The key that verifies attestation results.
    pub fn result_verifying_key(&self) -> p256::ecdsa::VerifyingKey {
        *self.result_key.verifying_key()
    }

    /// The device CA certificate (PEM).
    pub fn ca_certificate(&self) -> &str {
        &self.ca_cert_pem
    }

    /// Issues a challenge. For TPM devices, verifies the EK certificate and the AK's
    /// attributes now, and returns a credential the device must activate.
    pub fn challenge(
        &self,
        req: &ChallengeRequest,
        now: SystemTime,
    ) -> Result<Challenge, ServiceError> {
        if req.device.is_empty() || req.device.len() > 253 {
            return Err(ServiceError::BadRequest("device name".into()));
        }
        let agent_key = b64("agent_public_key", &req.agent_public_key)?;
        if agent_key.len() > MAX_KEY_BYTES
            || !matches!(x509_parser::x509::SubjectPublicKeyInfo::from_der(&agent_key), Ok((rest, _)) if rest.is_empty())
        {
            return Err(ServiceError::BadRequest(
                "agent_public_key must be a SubjectPublicKeyInfo (DER)".into(),
            ));
        }
        let mut salt = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut salt);
        let mut secret = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut secret);
        let (tpm, credential) = match (req.tee, &req.tpm) {
            (TeeKind::Tpm, Some(e)) => {
                let ek_cert = b64("ek_certificate", &e.ek_certificate)?;
                let ek_spki = self
                    .config
                    .ek_cas
                    .iter()
                    .find_map(|ca| {
                        tpm_enrol::verify_ek_certificate(
                            &ek_cert,
                            &self.config.ek_intermediates,
                            ca,
                            now,
                        )
                        .ok()
                    })
                    .ok_or(AttestationError::ChainInvalid(
                        "the EK certificate does not chain to a configured EK CA".into(),
                    ))?;
                let ak = tpm_enrol::parse_ak_public(&b64("ak_public_area", &e.ak_public_area)?)?;
                let (id_object, encrypted) =
                    tpm_enrol::make_credential(&ek_spki, &ak.name, &secret)?;
                (
                    Some(SealedTpm {
                        ak_spki: B64.encode(tpm_enrol::ak_spki_der(&ak)?),
                        ek_spki: B64.encode(ek_spki),
                        secret: B64.encode(secret),
                    }),
                    Some(CredentialChallenge {
                        id_object: B64.encode(id_object),
                        encrypted_secret: B64.encode(encrypted),
                    }),
                )
            }
            (TeeKind::Tpm, None) => {
                return Err(ServiceError::BadRequest(
                    "a TPM challenge needs the EK certificate and AK".into(),
                ));
            }
            _ => (None, None),
        };
        let issued_ms = unix_ms(now);
        let token = self
            .sealer
            .seal(&Sealed {
                device: req.device.clone(),
                agent_key: B64.encode(&agent_key),
                tee: req.tee,
                issued_ms,
                expires_ms: issued_ms
                    .saturating_add(u64::try_from(self.config.nonce_ttl.as_millis()).unwrap_or(0)),
                salt: B64.encode(salt),
                tpm,
            })
            .map_err(|e| ServiceError::Issue(e.to_string()))?;
        let report_data = binding::report_data(&token, &agent_key, &req.device);
        Ok(Challenge {
            nonce: B64.encode(&token),
            expires_in_seconds: self.config.nonce_ttl.as_secs(),
            report_data: hex::encode(report_data),
            credential,
        })
    }

    /// Verifies evidence against its challenge, appraises it, and issues the result (and,
    /// when allowed, the certificate): [`Self::verify`], then [`Self::conclude`]. The
    /// service keeps no record of used challenges: the caller enforces single use with
    /// [`Verified::challenge_issued_ms`] where it records the result.
    pub fn evidence(
        &self,
        req: &EvidenceRequest,
        now: SystemTime,
    ) -> Result<Appraisal, ServiceError> {
        let verified = self.verify(req, now, None)?;
        self.conclude(verified, now)
    }

    /// Verifies evidence against its challenge and appraises it; signs nothing and
    /// issues nothing. With the device's
    /// `recorded` hardware identity, evidence from other hardware is refused
    /// ([`ServiceError::HardwareMismatch`]); a TPM's EK is compared before its quote, so
    /// that another TPM is named as such rather than judged by this one's clock.
    pub fn verify(
        &self,
        req: &EvidenceRequest,
        now: SystemTime,
        recorded: Option<&HardwareIdentity>,
    ) -> Result<Verified, ServiceError> {
        let token = b64("nonce", &req.nonce)?;
        let sealed = self
            .sealer
            .open(&token)
            .map_err(|_| ServiceError::UnknownNonce)?;
        if sealed.expires_ms <= unix_ms(now) {
            return Err(ServiceError::UnknownNonce);
        }
        // Issued by a replica whose clock runs ahead: single use is ordered by issue
        // time, so such a challenge would shut out the device's next ones.
        if sealed.issued_ms > unix_ms(now).saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(ServiceError::UnknownNonce);
        }
        if sealed.device != req.device {
            return Err(ServiceError::ChallengeMismatch(format!(
                "challenge was for {:?}",
                sealed.device
            )));
        }
        let agent_key = b64("sealed agent key", &sealed.agent_key)?;
        let expected = binding::report_data(&token, &agent_key, &sealed.device);

        // The CSR must be for the key the evidence binds, and signed by it.
        let csr_der = x509_parser::pem::parse_x509_pem(req.csr.as_bytes())
            .map_err(|e| ServiceError::Csr(format!("not PEM: {e}")))?
            .1
            .contents;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&csr_der)
                .map_err(|e| ServiceError::Csr(e.to_string()))?;
        csr.verify_signature()
            .map_err(|e| ServiceError::Csr(format!("signature: {e}")))?;
        if csr.certification_request_info.subject_pki.raw != agent_key.as_slice() {
            return Err(ServiceError::Csr(
                "the CSR's key is not the key in the challenge".into(),
            ));
        }

        let tpm_sealed = match &sealed.tpm {
            Some(t) => Some((
                b64("sealed AK", &t.ak_spki)?,
                b64("sealed EK", &t.ek_spki)?,
                b64("sealed secret", &t.secret)?,
            )),
            None => None,
        };
        let (claims, tpm_clock, ek_spki) = match (&req.evidence, sealed.tee) {
            (Evidence::SevSnp { report, vcek }, TeeKind::SevSnp) => {
                let opts = SnpOptions {
                    allow_debug: false,
                    expected_report_data: Some(expected.to_vec()),
                };
                (
                    snp::verify(
                        &b64("report", report)?,
                        &b64("vcek", vcek)?,
                        &self.config.snp_roots,
                        now,
                        &opts,
                    )?,
                    None,
                    None,
                )
            }
            (Evidence::Tdx { quote }, TeeKind::Tdx) => {
                let root =
                    self.config
                        .intel_root
                        .as_deref()
                        .ok_or(AttestationError::ChainInvalid(
                            "no Intel root configured".into(),
                        ))?;
                let collateral = match &self.config.tdx_collateral {
                    Some(dir) => Some(std::sync::Arc::new(
                        super::tdx_collateral::TdxCollateral::load_dir(dir)?,
                    )),
                    None => None,
                };
                let opts = TdxOptions {
                    allow_debug: false,
                    expected_report_data: Some(expected.to_vec()),
                    collateral,
                };
                (
                    tdx::verify(&b64("quote", quote)?, root, now, &opts)?,
                    None,
                    None,
                )
            }
            (
                Evidence::Tpm {
                    evidence,
                    credential,
                },
                TeeKind::Tpm,
            ) => {
                let (ak_spki, ek_spki, secret) = tpm_sealed
                    .as_ref()
                    .ok_or(ServiceError::CredentialMismatch)?;
                let answered = b64("credential", credential)?;
                if !constant_time_eq(&answered, secret) {
                    return Err(ServiceError::CredentialMismatch);
                }
                if b64("ak_public", &evidence.ak_public)? != *ak_spki {
                    return Err(ServiceError::ChallengeMismatch(
                        "the quote is signed by another AK than the enrolled one".into(),
                    ));
                }
                let ek = HardwareIdentity::of_ek(ek_spki);
                if let Some(recorded) = recorded {
                    ek.check(recorded)?;
                }
                let previous = self.tpm_clocks.lock().ok().and_then(|m| {
                    m.get(&(
                        req.device.clone(),
                        ek.ek_public_key_digest.unwrap_or_default(),
                    ))
                    .copied()
                });
                let opts = TpmOptions {
                    expected_nonce: Some(binding::tpm_qualifying_data(&expected).to_vec()),
                    previous,
                    ak_trusted: true,
                };
                let (claims, clock) = tpm::verify(evidence, &opts)?;
                (claims, Some(clock), Some(ek_spki.as_slice()))
            }
            (Evidence::Dev { evidence }, TeeKind::Dev) => {
                (dev::verify(evidence, Some(&expected))?, None, None)
            }
            _ => {
                return Err(ServiceError::ChallengeMismatch(
                    "evidence kind differs from the challenge".into(),
                ));
            }
        };
        let decision = self.policy.evaluate(&claims)?;
        let hardware_identity = HardwareIdentity::of(&claims, ek_spki);
        if let Some(recorded) = recorded {
            hardware_identity.check(recorded)?;
        }
        Ok(Verified {
            device: req.device.clone(),
            decision,
            claims,
            hardware_identity,
            tpm_clock,
            challenge_issued_ms: sealed.issued_ms,
            agent_key,
        })
    }

    /// Signs the attestation result of `verified` and, when the policy allowed it,
    /// issues the device's certificate; an allowed TPM quote moves the device's
    /// remembered TPM clock forward.
    pub fn conclude(&self, verified: Verified, now: SystemTime) -> Result<Appraisal, ServiceError> {
        let Verified {
            device,
            decision,
            claims,
            hardware_identity,
            tpm_clock,
            agent_key,
            ..
        } = verified;
        // Only an allowed quote moves the device's TPM clock state forward.
        if decision.allow
            && let (Some(clock), Some(ek), Ok(mut clocks)) = (
                tpm_clock,
                hardware_identity.ek_public_key_digest.clone(),
                self.tpm_clocks.lock(),
            )
        {
            clocks.insert((device.clone(), ek), clock);
        }
        let expires_at = unix(now + self.config.result_ttl);
        let chain = self.result_chain(now)?;
        let result = super::result::sign_with_chain(
            &self.result_key,
            &chain,
            &json!({
                "iss": "edgefleet-gateway",
                "sub": device,
                "iat": unix(now),
                "exp": expires_at,
                "ear.status": if decision.allow { "affirming" } else { "contraindicated" },
                "ear.appraisal-policy-id": format!("{}@{}", decision.policy, decision.policy_hash),
                "edgefleet.tee": claims.tee,
                "edgefleet.measurements": claims.measurements_digest(),
                "edgefleet.key": hex::encode(Sha256::digest(&agent_key)),
                "edgefleet.deny": decision.deny,
            }),
        );
        let certificate = if decision.allow {
            Some(self.issue(&agent_key, &device, now)?)
        } else {
            None
        };
        Ok(Appraisal {
            decision,
            claims,
            attestation_result: result,
            certificate,
            expires_at,
            tpm_clock,
            hardware_identity: Some(hardware_identity),
        })
    }

    /// Seeds the TPM clock state of the device's TPM whose EK digest is
    /// `ek_public_key_digest` (its recorded hardware identity) from storage (the
    /// EdgeDevice status), so that rollback is caught across gateway restarts and
    /// replicas. Keeps whichever of the remembered and the stored state is further along.
    pub fn remember_tpm_clock(&self, device: &str, ek_public_key_digest: &str, stored: ClockState) {
        let key = |c: &ClockState| (c.reset_count, c.restart_count, c.clock);
        if let Ok(mut clocks) = self.tpm_clocks.lock() {
            let entry = clocks
                .entry((device.to_owned(), ek_public_key_digest.to_owned()))
                .or_insert(stored);
            if key(&stored) > key(entry) {
                *entry = stored;
            }
        }
    }

    /// The result signer's certificate chain (its certificate from the device CA, SAN
    /// URI [`crate::receipt::RESULT_SIGNER_URI`], which no device certificate has), so
    /// that a relying party holding only the CA can check a result: issued on first
    /// use and again before it lapses.
    pub fn result_chain(&self, now: SystemTime) -> Result<Vec<Vec<u8>>, ServiceError> {
        let at = unix(now);
        let mut cert = self
            .result_cert
            .lock()
            .map_err(|_| ServiceError::Issue("result certificate lock".into()))?;
        let needs_result_ttl = self.config.result_ttl.as_secs() as i64;
        match &*cert {
            // Valid now (a clock stepped back is before it) and long enough.
            Some((der, valid))
                if valid.start <= at
                    && valid.end - at > RESULT_CERT_RENEW_DAYS * 86_400 + needs_result_ttl =>
            {
                Ok(vec![der.clone()])
            }
            _ => {
                let issued = self.issue_result_cert(now)?;
                *cert = Some(issued.clone());
                Ok(vec![issued.0])
            }
        }
    }

    fn issue_result_cert(
        &self,
        now: SystemTime,
    ) -> Result<(Vec<u8>, std::ops::Range<i64>), ServiceError> {
        use p256::pkcs8::EncodePublicKey as _;
        let issue = |e: &dyn std::fmt::Display| ServiceError::Issue(format!("result signer: {e}"));
        let spki = self
            .result_key
            .verifying_key()
            .to_public_key_der()
            .map_err(|e| issue(&e))?;
        let key = rcgen::SubjectPublicKeyInfo::from_der(spki.as_bytes()).map_err(|e| issue(&e))?;
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| issue(&e))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edgefleet attestation results");
        params.subject_alt_names = vec![rcgen::SanType::URI(
            crate::receipt::RESULT_SIGNER_URI
                .try_into()
                .map_err(|e: rcgen::Error| issue(&e))?,
        )];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        let start = unix(now) - 60;
        let end = unix(now) + RESULT_CERT_DAYS * 86_400;
        params.not_before =
            time::OffsetDateTime::from_unix_timestamp(start).map_err(|e| issue(&e))?;
        params.not_after = time::OffsetDateTime::from_unix_timestamp(end).map_err(|e| issue(&e))?;
        let cert = params
            .signed_by(&key, &self.ca_issuer)
            .map_err(|e| issue(&e))?;
        Ok((cert.der().to_vec(), start..end))
    }

    /// A client certificate for `spki` with the device name as CN and SAN URI
    /// `edgefleet://device/<name>`, valid until the result lapses.
    fn issue(&self, spki: &[u8], device: &str, now: SystemTime) -> Result<String, ServiceError> {
        let key = rcgen::SubjectPublicKeyInfo::from_der(spki)
            .map_err(|e| ServiceError::Issue(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| ServiceError::Issue(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, device);
        params.subject_alt_names = vec![rcgen::SanType::URI(
            format!("edgefleet://device/{device}")
                .try_into()
                .map_err(|e: rcgen::Error| ServiceError::Issue(e.to_string()))?,
        )];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(random_serial());
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let start = time::OffsetDateTime::from_unix_timestamp(unix(now) - 60)
            .map_err(|e| ServiceError::Issue(e.to_string()))?;
        params.not_before = start;
        params.not_after =
            start + time::Duration::seconds(self.config.result_ttl.as_secs() as i64 + 60);
        let cert = params
            .signed_by(&key, &self.ca_issuer)
            .map_err(|e| ServiceError::Issue(e.to_string()))?;
        Ok(cert.pem())
    }
}

/// A fresh random serial for a certificate (RFC 5280: unique per issuer; positive,
/// at most 20 bytes).
fn random_serial() -> rcgen::SerialNumber {
    let mut serial = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut serial);
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    rcgen::SerialNumber::from_slice(&serial)
}

/// Compares secrets without leaking where they differ (`subtle`); lengths are not secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}
