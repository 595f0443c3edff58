//! Small X.509 helpers shared by model signing and attestation, and the validity error
//! ([`NotValidAt`]) both report.

use x509_parser::certificate::X509Certificate;
use x509_parser::time::ASN1Time;

/// Why a certificate is not valid at a time: subject, validity bounds and the time. Both
/// [`crate::attestation::AttestationError`] and [`crate::model_signing::SignatureError`]
/// carry it as their `CertificateNotValidAt`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("certificate {subject} is not valid at {now} (valid {not_before} to {not_after})")]
pub struct NotValidAt {
    /// Subject.
    pub subject: String,
    /// Start of validity.
    pub not_before: String,
    /// End of validity.
    pub not_after: String,
    /// The verification time.
    pub now: String,
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

/// Every `CERTIFICATE` block of a PEM text, as DER, in order; the error is the parser's.
pub(crate) fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| e.to_string())?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    Ok(out)
}

/// `now` as an ASN.1 time; the error says why it cannot be one.
pub(crate) fn asn1_time(now: std::time::SystemTime) -> Result<ASN1Time, String> {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let secs = i64::try_from(secs).map_err(|e| e.to_string())?;
    ASN1Time::from_timestamp(secs).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::NotValidAt;

    #[test]
    fn not_valid_at_reads_the_same_in_both_error_types() {
        let e = NotValidAt {
            subject: "CN=leaf".into(),
            not_before: "b".into(),
            not_after: "a".into(),
            now: "n".into(),
        };
        let want = "certificate CN=leaf is not valid at n (valid b to a)";
        assert_eq!(e.to_string(), want);
        let attestation = crate::attestation::AttestationError::CertificateNotValidAt(e.clone());
        assert_eq!(attestation.to_string(), want);
        assert_eq!(attestation.reason(), "CertificateNotValidAt");
        let signature = crate::model_signing::SignatureError::CertificateNotValidAt(e);
        assert_eq!(signature.to_string(), want);
        assert_eq!(signature.reason(), "CertificateNotValidAt");
    }
}
