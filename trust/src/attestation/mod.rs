//! Device attestation: verifiers for AMD SEV-SNP reports, Intel TDX quotes and TPM 2.0
//! quotes, each turning genuine evidence into normalized [`Claims`], the Rego
//! appraisal that decides on them ([`policy`]), and the hardware identity that pins a
//! device's evidence to its hardware ([`identity`]).
//!
//! Every verifier takes an explicit `now` for certificate validity, so recorded
//! evidence verifies the same way forever and expiry is testable.

pub mod binding;
pub mod challenge_token;
pub mod claims;
mod der;
pub mod dev;
pub mod identity;
pub mod policy;
pub mod result;
pub mod service;
pub mod snp;
pub mod tdx;
pub mod tdx_collateral;
pub mod tpm;
pub mod tpm_enrol;

pub use crate::x509::NotValidAt;
pub use claims::{Claims, TeeKind};

use std::time::SystemTime;

use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;
use x509_parser::time::ASN1Time;

/// Why evidence did not verify. [`AttestationError::reason`] names each variant stably
/// for conditions, events and metrics.
#[derive(Debug, thiserror::Error)]
pub enum AttestationError {
    /// Evidence shorter than its format requires.
    #[error("{what} truncated: need {need} bytes, have {have}")]
    Truncated {
        /// The structure.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A field holds a value the format does not allow.
    #[error("malformed evidence: {0}")]
    Malformed(String),
    /// Version, algorithm or type not supported.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The evidence signature does not verify with the attesting key.
    #[error("evidence signature does not verify: {0}")]
    SignatureInvalid(String),
    /// A certificate could not be parsed.
    #[error("malformed certificate {which}: {reason}")]
    MalformedCertificate {
        /// Which certificate.
        which: String,
        /// Parser error.
        reason: String,
    },
    /// The certificate chain does not lead to the pinned root.
    #[error("certificate chain: {0}")]
    ChainInvalid(String),
    /// A certificate is not valid at `now`.
    #[error(transparent)]
    CertificateNotValidAt(NotValidAt),
    /// The reported TCB differs from the TCB the certificate was issued for.
    #[error("TCB {component}: report says {reported}, certificate says {certified}")]
    TcbMismatch {
        /// Component name.
        component: &'static str,
        /// In the report.
        reported: u64,
        /// In the certificate.
        certified: u64,
    },
    /// The guest or TD runs with debugging enabled.
    #[error("debug mode is enabled")]
    DebugEnabled,
    /// The report data does not carry the expected binding (nonce, key, device).
    #[error("report data does not match the expected binding")]
    ReportDataMismatch,
    /// TDX: the QE report does not bind the attestation key.
    #[error("QE report data does not bind the attestation key")]
    QeBindingMismatch,
    /// TPM: the quote's PCR digest differs from the digest of the reported PCR values.
    #[error("PCR digest in the quote does not match the reported PCR values")]
    PcrDigestMismatch,
    /// TPM: the TPM's clock or counters went backwards since the last quote.
    #[error("TPM clock rollback: {0}")]
    ClockRollback(String),
    /// TPM: `safe` is false (the clock may have gone back).
    #[error("TPM clock is not safe")]
    ClockNotSafe,
    /// A bad time.
    #[error("invalid time: {0}")]
    InvalidTime(String),
    /// TDX: the collateral is unreadable, unsigned, or for something else.
    #[error("TDX collateral: {0}")]
    CollateralInvalid(String),
    /// TDX: collateral is configured, but holds no TCB info for this platform's FMSPC.
    #[error("no TDX TCB info for FMSPC {0}")]
    CollateralMissing(String),
    /// TDX: a collateral document is not current at `now`.
    #[error(
        "TDX collateral {which} is not current at {now} (issued {issued}, next update {next_update})"
    )]
    CollateralExpired {
        /// `tcbInfo` or `enclaveIdentity`.
        which: String,
        /// Its issue date.
        issued: String,
        /// Its next update.
        next_update: String,
        /// Verification time.
        now: String,
    },
    /// TDX: no TCB level admits the platform, its module or its QE, or it is revoked.
    #[error("TDX TCB not supported: {0}")]
    TcbNotSupported(String),
    /// TDX: the quoting enclave is not the one Intel's QE identity names.
    #[error("the quoting enclave's {0} differs from Intel's QE identity")]
    QeIdentityMismatch(String),
}

impl AttestationError {
    /// Stable CamelCase name.
    pub fn reason(&self) -> &'static str {
        match self {
            AttestationError::Truncated { .. } => "Truncated",
            AttestationError::Malformed(_) => "Malformed",
            AttestationError::Unsupported(_) => "Unsupported",
            AttestationError::SignatureInvalid(_) => "SignatureInvalid",
            AttestationError::MalformedCertificate { .. } => "MalformedCertificate",
            AttestationError::ChainInvalid(_) => "ChainInvalid",
            AttestationError::CertificateNotValidAt(_) => "CertificateNotValidAt",
            AttestationError::TcbMismatch { .. } => "TcbMismatch",
            AttestationError::DebugEnabled => "DebugEnabled",
            AttestationError::ReportDataMismatch => "ReportDataMismatch",
            AttestationError::QeBindingMismatch => "QeBindingMismatch",
            AttestationError::PcrDigestMismatch => "PcrDigestMismatch",
            AttestationError::ClockRollback(_) => "ClockRollback",
            AttestationError::ClockNotSafe => "ClockNotSafe",
            AttestationError::InvalidTime(_) => "InvalidTime",
            AttestationError::CollateralInvalid(_) => "CollateralInvalid",
            AttestationError::CollateralMissing(_) => "CollateralMissing",
            AttestationError::CollateralExpired { .. } => "CollateralExpired",
            AttestationError::TcbNotSupported(_) => "TcbNotSupported",
            AttestationError::QeIdentityMismatch(_) => "QeIdentityMismatch",
        }
    }
}

/// Compares the evidence's report data with the expected binding, when one is given;
/// returns the binding (hex) for the claims.
pub(crate) fn check_binding(
    expected: Option<&[u8]>,
    actual: &[u8],
) -> Result<Option<String>, AttestationError> {
    match expected {
        Some(e) if e == actual => Ok(Some(hex::encode(e))),
        Some(_) => Err(AttestationError::ReportDataMismatch),
        None => Ok(None),
    }
}

pub(crate) fn asn1_time(now: SystemTime) -> Result<ASN1Time, AttestationError> {
    crate::x509::asn1_time(now).map_err(AttestationError::InvalidTime)
}

pub(crate) fn parse_cert<'a>(
    der: &'a [u8],
    which: &str,
) -> Result<X509Certificate<'a>, AttestationError> {
    match X509Certificate::from_der(der) {
        Ok((_, cert)) => Ok(cert),
        Err(e) => Err(AttestationError::MalformedCertificate {
            which: which.to_owned(),
            reason: e.to_string(),
        }),
    }
}

pub(crate) fn check_validity(
    cert: &X509Certificate<'_>,
    now: ASN1Time,
) -> Result<(), AttestationError> {
    crate::x509::validity_at(cert, now).map_err(AttestationError::CertificateNotValidAt)
}

/// Checks that `child` names `issuer` as its issuer and carries its signature.
pub(crate) fn check_issued_by(
    child: &X509Certificate<'_>,
    issuer: &X509Certificate<'_>,
) -> Result<(), AttestationError> {
    if child.issuer() != issuer.subject() {
        return Err(AttestationError::ChainInvalid(format!(
            "{} is issued by {}, not by {}",
            child.subject(),
            child.issuer(),
            issuer.subject()
        )));
    }
    child
        .verify_signature(Some(issuer.public_key()))
        .map_err(|e| {
            AttestationError::ChainInvalid(format!(
                "signature of {} by {}: {e}",
                child.subject(),
                issuer.subject()
            ))
        })
}

/// Reads PEM certificates (in order) from text.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, AttestationError> {
    crate::x509::pem_certificates(pem).map_err(|reason| AttestationError::MalformedCertificate {
        which: "PEM".into(),
        reason,
    })
}

/// A bounds-checked little-endian reader over evidence bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bytes<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) what: &'static str,
}

impl<'a> Bytes<'a> {
    pub(crate) fn new(data: &'a [u8], what: &'static str) -> Self {
        Self { data, what }
    }

    pub(crate) fn slice(&self, at: usize, len: usize) -> Result<&'a [u8], AttestationError> {
        let end = at.checked_add(len).ok_or(AttestationError::Truncated {
            what: self.what,
            need: usize::MAX,
            have: self.data.len(),
        })?;
        self.data.get(at..end).ok_or(AttestationError::Truncated {
            what: self.what,
            need: end,
            have: self.data.len(),
        })
    }

    pub(crate) fn u16_le(&self, at: usize) -> Result<u16, AttestationError> {
        let b = self.slice(at, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32_le(&self, at: usize) -> Result<u32, AttestationError> {
        let b = self.slice(at, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64_le(&self, at: usize) -> Result<u64, AttestationError> {
        let b = self.slice(at, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}
