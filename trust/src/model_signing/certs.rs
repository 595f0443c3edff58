//! Certificate mode: path building from the bundle's leaf through the bundle's
//! intermediates to a pinned root, validity at an explicit time, key usage, and identity
//! pins.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer as _;
use x509_parser::time::ASN1Time;

use super::SignatureError;
use super::keys::PublicKey;

/// Most intermediates accepted between the leaf and the root.
const MAX_INTERMEDIATES: usize = 4;

/// A trusted root with the identities a leaf under it may carry.
#[derive(Debug, Clone)]
pub struct PinnedRoot {
    /// Name of the signer, for results and messages.
    pub name: String,
    /// The root certificate, DER.
    pub der: Vec<u8>,
    /// SAN email / SAN URI / subject CN values accepted in the leaf (at least one).
    pub identities: Vec<String>,
}

/// What the chain proved.
#[derive(Debug, Clone)]
pub struct VerifiedChain {
    /// The leaf's public key, which must have made the DSSE signature.
    pub leaf_key: PublicKey,
    /// Index of the anchoring root in the pinned list.
    pub root: usize,
    /// The pinned identity the leaf matched.
    pub identity: String,
    /// The leaf's subject, for messages.
    pub leaf_subject: String,
}

fn parse(der: &[u8], what: String) -> Result<X509Certificate<'_>, SignatureError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(SignatureError::MalformedCertificate {
            which: what,
            reason: "trailing bytes after the certificate".into(),
        }),
        Err(e) => Err(SignatureError::MalformedCertificate {
            which: what,
            reason: e.to_string(),
        }),
    }
}

fn check_validity(cert: &X509Certificate<'_>, now: ASN1Time) -> Result<(), SignatureError> {
    crate::x509::validity_at(cert, now).map_err(SignatureError::CertificateNotValidAt)
}

fn ext_err(cert: &X509Certificate<'_>, e: impl std::fmt::Display) -> SignatureError {
    SignatureError::MalformedCertificate {
        which: cert.subject().to_string(),
        reason: e.to_string(),
    }
}

/// A CA may issue: basicConstraints CA=true, and keyCertSign when key usage is present.
fn check_issuer(cert: &X509Certificate<'_>) -> Result<(), SignatureError> {
    let ca = cert
        .basic_constraints()
        .map_err(|e| ext_err(cert, e))?
        .is_some_and(|bc| bc.value.ca);
    if !ca {
        return Err(SignatureError::UntrustedChain(format!(
            "{} is not a CA certificate",
            cert.subject()
        )));
    }
    if let Some(ku) = cert.key_usage().map_err(|e| ext_err(cert, e))?
        && !ku.value.key_cert_sign()
    {
        return Err(SignatureError::KeyUsage(format!(
            "{} may not sign certificates",
            cert.subject()
        )));
    }
    Ok(())
}

fn issued_by(child: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    child.issuer() == issuer.subject() && child.verify_signature(Some(issuer.public_key())).is_ok()
}

/// Identities the leaf carries: SAN emails and URIs, then subject common names.
pub fn leaf_identities(cert: &X509Certificate<'_>) -> Result<Vec<String>, SignatureError> {
    let mut ids = Vec::new();
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| ext_err(cert, e))?
    {
        for name in &san.value.general_names {
            match name {
                GeneralName::RFC822Name(s) | GeneralName::URI(s) => ids.push((*s).to_owned()),
                _ => {}
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            ids.push(s.to_owned());
        }
    }
    Ok(ids)
}

/// Verifies `chain` (leaf first, then intermediates) up to one of `roots` at `now`.
pub fn verify_chain(
    chain: &[Vec<u8>],
    roots: &[PinnedRoot],
    now: ASN1Time,
) -> Result<VerifiedChain, SignatureError> {
    let certs = chain
        .iter()
        .enumerate()
        .map(|(i, der)| parse(der, format!("bundle certificate {i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let pinned = roots
        .iter()
        .map(|r| parse(&r.der, format!("pinned root {}", r.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = certs
        .first()
        .ok_or(SignatureError::NoVerificationMaterial)?;

    check_validity(leaf, now)?;
    let ku = leaf.key_usage().map_err(|e| ext_err(leaf, e))?;
    if !ku.is_some_and(|ku| ku.value.digital_signature()) {
        return Err(SignatureError::KeyUsage(format!(
            "leaf {} lacks key usage digitalSignature",
            leaf.subject()
        )));
    }
    if let Some(eku) = leaf.extended_key_usage().map_err(|e| ext_err(leaf, e))?
        && !eku.value.code_signing
    {
        return Err(SignatureError::ExtendedKeyUsage(format!(
            "leaf {} is not for code signing",
            leaf.subject()
        )));
    }

    let mut current = leaf;
    let mut used = vec![false; certs.len()];
    used[0] = true;
    let mut anchored = None;
    let mut path_ca: Vec<&X509Certificate<'_>> = Vec::new();
    for _ in 0..=MAX_INTERMEDIATES {
        if let Some(i) = pinned.iter().position(|root| issued_by(current, root)) {
            check_validity(&pinned[i], now)?;
            anchored = Some(i);
            break;
        }
        let next = (0..certs.len()).find(|&j| !used[j] && issued_by(current, &certs[j]));
        let Some(j) = next else {
            return Err(SignatureError::UntrustedChain(format!(
                "no pinned root or bundle intermediate issued {} (issuer {})",
                current.subject(),
                current.issuer()
            )));
        };
        check_validity(&certs[j], now)?;
        check_issuer(&certs[j])?;
        used[j] = true;
        current = &certs[j];
        path_ca.push(current);
    }
    let root = anchored.ok_or_else(|| {
        SignatureError::UntrustedChain(format!("more than {MAX_INTERMEDIATES} intermediates"))
    })?;
    check_issuer(&pinned[root])?;
    path_ca.push(&pinned[root]);

    // pathLenConstraint: a CA at position k above the leaf may have at most its
    // pathLen intermediates below it.
    for (k, ca) in path_ca.iter().enumerate() {
        if let Some(bc) = ca.basic_constraints().map_err(|e| ext_err(ca, e))?
            && let Some(max) = bc.value.path_len_constraint
            && k > max as usize
        {
            return Err(SignatureError::UntrustedChain(format!(
                "{} allows {max} intermediates below it, the chain has {k}",
                ca.subject()
            )));
        }
    }
    // A critical extension we do not understand means we cannot honour it.
    for cert in std::iter::once(leaf).chain(path_ca.iter().copied()) {
        for ext in cert.extensions() {
            if ext.critical
                && matches!(
                    ext.parsed_extension(),
                    x509_parser::extensions::ParsedExtension::UnsupportedExtension { .. }
                )
            {
                return Err(SignatureError::UntrustedChain(format!(
                    "{} has an unsupported critical extension {}",
                    cert.subject(),
                    ext.oid
                )));
            }
        }
    }

    // Several signers may pin the same root with different identities: any of them may
    // match, and the result names the signer whose pin matched.
    let found = leaf_identities(leaf)?;
    let mut pins = Vec::new();
    let mut matched = None;
    for (i, r) in roots
        .iter()
        .enumerate()
        .filter(|(_, r)| r.der == roots[root].der)
    {
        pins.extend(r.identities.iter().cloned());
        if matched.is_none()
            && let Some(pin) = r
                .identities
                .iter()
                .find(|pin| found.iter().any(|id| id == *pin))
        {
            matched = Some((i, pin.clone()));
        }
    }
    let (root, identity) = matched.ok_or_else(|| SignatureError::IdentityMismatch {
        found: found.clone(),
        pinned: pins,
    })?;
    let leaf_key = PublicKey::from_spki_der(leaf.public_key().raw)?;
    Ok(VerifiedChain {
        leaf_key,
        root,
        identity,
        leaf_subject: leaf.subject().to_string(),
    })
}

/// The public key of a DER certificate.
pub fn leaf_key(der: &[u8]) -> Result<PublicKey, SignatureError> {
    let cert = parse(der, "leaf certificate".into())?;
    PublicKey::from_spki_der(cert.public_key().raw)
}

/// Parses every certificate in a PEM text (a chain file), in order.
pub fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, SignatureError> {
    crate::x509::pem_certificates(pem.as_bytes()).map_err(|reason| {
        SignatureError::MalformedCertificate {
            which: "PEM".into(),
            reason,
        }
    })
}
