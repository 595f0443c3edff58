//! Small X.509 helpers shared by model signing and attestation.

use x509_parser::certificate::X509Certificate;
use x509_parser::time::ASN1Time;

/// Why a certificate is not valid at a time: subject, validity bounds and the time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotValidAt {
    pub(crate) subject: String,
    pub(crate) not_before: String,
    pub(crate) not_after: String,
    pub(crate) now: String,
}

/// Checks `not_before <= now <= not_after`.
pub(crate) fn validity_at(cert: &X509Certificate<'_>, now: ASN1Time) -> Result<(), NotValidAt> {
    let v = cert.validity();
    if v.not_before <= now && now <= v.not_after {
        Ok(())
    } else {
        Err(NotValidAt {
            subject: cert.subject().to_string(),
            not_before: v.not_before.to_string(),
            not_after: v.not_after.to_string(),
            now: now.to_string(),
        })
    }
}
