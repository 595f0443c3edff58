//! Signed answers (receipts): a device's statement that it, attested as its
//! attestation result says, answered this request with this response, on this model
//! behind these plugins, at this time.
//!
//! A receipt is a compact JWS (ES256, `typ` [`TYP`]) signed by the device's attested
//! key (the agent key its evidence binds). Its header's `x5c` holds the device's
//! certificate, issued by the cluster's device CA; its payload ([`Claims`]) holds the
//! SHA-256 of the request body and of the response body, the model's name, revision
//! and artifact digest, the plugins' digests, the time, and the attestation result (the
//! gateway's EAR token, itself a JWS whose `x5c` is the result signer's certificate
//! from the same CA) with its id. So a receipt verifies with the device CA alone
//! ([`verify`]), offline, and every failure is named ([`ReceiptError::reason`]):
//!
//! 1. the device certificate chains to the CA, names the device (SAN URI
//!    `edgefleet://device/<name>`) and is valid at the receipt's time;
//! 2. the receipt's signature verifies under that certificate's key;
//! 3. the attestation result's signer certificate chains to the CA and is the result
//!    signer's (SAN URI [`RESULT_SIGNER_URI`], which the CA never gives a device); its
//!    signature verifies; it is `affirming`, for this device and for this key (the
//!    SHA-256 of the certificate's SubjectPublicKeyInfo), and the receipt's time lies
//!    within it;
//! 4. with the bodies at hand ([`Verified::check_bodies`]), their digests match.
//!
//! What a receipt cannot prove: the time is the device's clock; and a device key that
//! leaked could sign receipts dated within its old attestation. A receipt is evidence
//! of what an attested device said, as strong as the attestation policy that let it
//! in.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::jws::{Jws, JwsError};
use crate::x509::NotValidAt;

/// The JWS `typ` of a receipt.
pub const TYP: &str = "edgefleet-receipt+jws";
/// The request header that asks for a receipt (value `1`), and the response header
/// that carries it on an answer that is not streamed.
pub const HEADER: &str = "edgefleet-receipt";
/// The name of the server-sent event that carries a streamed answer's receipt, after
/// `data: [DONE]`; its response digest covers every byte of the stream before it.
pub const SSE_EVENT: &str = "edgefleet-receipt";
/// The SAN URI of the certificate that signs attestation results.
pub const RESULT_SIGNER_URI: &str = "edgefleet://attestation-results";
/// The prefix of a device certificate's SAN URI.
pub const DEVICE_URI_PREFIX: &str = "edgefleet://device/";
/// How far before its attestation result's issue time a receipt may be dated (the
/// device's and the gateway's clocks differ a little).
pub const MAX_CLOCK_SKEW_SECONDS: i64 = 60;

/// The model that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelClaim {
    /// The EdgeModel, `namespace/name`.
    pub name: String,
    /// Its revision.
    pub revision: String,
    /// `sha256:<hex>` of the artifact whose signature the device verified (for an
    /// encrypted model, the ciphertext's).
    pub digest: String,
}

/// A plugin the request and response passed through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginClaim {
    /// Its name in the chain.
    pub name: String,
    /// `sha256:<hex>` of its component.
    pub digest: String,
}

/// What served a request: the model and its plugin chain, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provenance {
    /// The model.
    pub model: ModelClaim,
    /// The plugins, in chain order.
    pub plugins: Vec<PluginClaim>,
}

/// What a receipt says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claims {
    /// Format version (1).
    pub version: u32,
    /// The device (EdgeDevice name).
    pub device: String,
    /// When the device signed it (seconds since the epoch, the device's clock).
    pub time: i64,
    /// The model and plugins.
    #[serde(flatten)]
    pub provenance: Provenance,
    /// SHA-256 (hex) of the request body.
    pub request_sha256: String,
    /// SHA-256 (hex) of the response body (of a stream: every byte before the
    /// receipt's event).
    pub response_sha256: String,
    /// SHA-256 (hex) of the attestation result.
    pub attestation_result_id: String,
    /// The attestation result (the gateway's EAR token).
    pub attestation_result: String,
}

/// Why a receipt does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// Not a receipt: not a JWS, another `typ`, or its payload is not a receipt's.
    #[error("not a receipt: {0}")]
    Malformed(String),
    /// Another signature algorithm than ES256, or another receipt version.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The device certificate is not one the CA issued to the device.
    #[error("device certificate: {0}")]
    CertificateUntrusted(String),
    /// The device certificate is not valid at the receipt's time.
    #[error(transparent)]
    CertificateNotValidAt(#[from] NotValidAt),
    /// The receipt's signature does not verify under the device certificate's key.
    #[error("the receipt's signature does not verify under the device's key")]
    SignatureInvalid,
    /// The attestation result is not one the fleet's result signer signed.
    #[error("attestation result: {0}")]
    AttestationResultUntrusted(String),
    /// The attestation result is for another device or key, or is not the one the
    /// receipt names.
    #[error("attestation result: {0}")]
    AttestationResultMismatch(String),
    /// The attestation result did not affirm the device.
    #[error("the attestation result is {0}, not affirming")]
    AttestationNotAffirming(String),
    /// The receipt is dated outside its attestation result.
    #[error("the receipt's time {time} lies outside its attestation ({issued} to {expires})")]
    OutsideAttestation {
        /// The receipt's time.
        time: i64,
        /// The result's issue time.
        issued: i64,
        /// The result's expiry.
        expires: i64,
    },
    /// The request body is not the one signed.
    #[error("the request's SHA-256 is {actual}; the receipt signs {signed}")]
    RequestMismatch {
        /// Signed.
        signed: String,
        /// Given.
        actual: String,
    },
    /// The response body is not the one signed.
    #[error("the response's SHA-256 is {actual}; the receipt signs {signed}")]
    ResponseMismatch {
        /// Signed.
        signed: String,
        /// Given.
        actual: String,
    },
}

impl ReceiptError {
    /// Stable CamelCase name.
    pub fn reason(&self) -> &'static str {
        match self {
            ReceiptError::Malformed(_) => "ReceiptMalformed",
            ReceiptError::Unsupported(_) => "ReceiptUnsupported",
            ReceiptError::CertificateUntrusted(_) => "CertificateUntrusted",
            ReceiptError::CertificateNotValidAt(_) => "CertificateNotValidAt",
            ReceiptError::SignatureInvalid => "ReceiptSignatureInvalid",
            ReceiptError::AttestationResultUntrusted(_) => "AttestationResultUntrusted",
            ReceiptError::AttestationResultMismatch(_) => "AttestationResultMismatch",
            ReceiptError::AttestationNotAffirming(_) => "AttestationNotAffirming",
            ReceiptError::OutsideAttestation { .. } => "OutsideAttestation",
            ReceiptError::RequestMismatch { .. } => "RequestMismatch",
            ReceiptError::ResponseMismatch { .. } => "ResponseMismatch",
        }
    }
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Splits a streamed answer as received (the raw server-sent events) into the bytes
/// its receipt covers and the receipt: the last event, `event: edgefleet-receipt`.
/// `None` when the stream does not end with one.
pub fn split_stream(stream: &[u8]) -> Option<(&[u8], &str)> {
    let marker = format!("event: {SSE_EVENT}\n");
    let at = stream
        .windows(marker.len())
        .rposition(|w| w == marker.as_bytes())?;
    // The event starts a line.
    if at > 0 && stream[at - 1] != b'\n' {
        return None;
    }
    let rest = std::str::from_utf8(&stream[at + marker.len()..]).ok()?;
    let data = rest.strip_prefix("data: ")?.trim_end_matches('\n');
    if data.contains('\n') {
        return None;
    }
    Some((&stream[..at], data))
}

/// Signs `claims` with the device's key; `chain` is its certificate (DER), leaf first.
pub fn sign(key: &p256::ecdsa::SigningKey, chain: &[Vec<u8>], claims: &Claims) -> String {
    // Serialising these plain structs cannot fail; an empty payload would not verify.
    let payload = serde_json::to_vec(claims).unwrap_or_default();
    crate::jws::sign(key, TYP, chain, &payload)
}

/// A receipt that verified: what it says, and what its attestation result says.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The receipt's claims.
    pub claims: Claims,
    /// The attestation result's claims.
    pub attestation: serde_json::Value,
}

impl Verified {
    /// Checks the request and response bodies at hand against the signed digests.
    pub fn check_bodies(
        &self,
        request: Option<&[u8]>,
        response: Option<&[u8]>,
    ) -> Result<(), ReceiptError> {
        if let Some(r) = request {
            let actual = sha256_hex(r);
            if actual != self.claims.request_sha256 {
                return Err(ReceiptError::RequestMismatch {
                    signed: self.claims.request_sha256.clone(),
                    actual,
                });
            }
        }
        if let Some(r) = response {
            let actual = sha256_hex(r);
            if actual != self.claims.response_sha256 {
                return Err(ReceiptError::ResponseMismatch {
                    signed: self.claims.response_sha256.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }
}

/// Verifies `receipt` against the device CA certificates in `ca_pem` (any of them may
/// be the issuer: a CA being rotated has two).
pub fn verify(receipt: &str, ca_pem: &[u8]) -> Result<Verified, ReceiptError> {
    let cas = crate::x509::pem_certificates(ca_pem)
        .map_err(|e| ReceiptError::CertificateUntrusted(format!("the CA file: {e}")))?;
    if cas.is_empty() {
        return Err(ReceiptError::CertificateUntrusted(
            "the CA file holds no certificate".into(),
        ));
    }
    let mut anchors = Vec::new();
    for der in &cas {
        let (_, ca) = X509Certificate::from_der(der)
            .map_err(|e| ReceiptError::CertificateUntrusted(format!("the CA certificate: {e}")))?;
        // Only a CA may be an anchor: a device certificate put in the file by mistake
        // must not let its device issue itself a result signer's certificate.
        let signs_certificates = ca
            .key_usage()
            .ok()
            .flatten()
            .is_none_or(|ku| ku.value.key_cert_sign());
        if !ca.is_ca() || !signs_certificates {
            return Err(ReceiptError::CertificateUntrusted(format!(
                "{} in the CA file is not a CA certificate",
                ca.subject()
            )));
        }
        anchors.push(ca);
    }
    let jws = Jws::parse(receipt.trim()).map_err(|e| jws_error(e, "receipt"))?;
    if jws.header["typ"] != TYP {
        return Err(ReceiptError::Malformed(format!(
            "typ {} is not {TYP}",
            jws.header["typ"]
        )));
    }
    let claims: Claims = serde_json::from_slice(&jws.payload)
        .map_err(|e| ReceiptError::Malformed(format!("payload: {e}")))?;
    if claims.version != 1 {
        return Err(ReceiptError::Unsupported(format!(
            "receipt version {}",
            claims.version
        )));
    }
    let time = asn1(claims.time)?;

    // 1. The device's certificate.
    let chain = jws.chain().map_err(|e| jws_error(e, "receipt"))?;
    let [leaf_der] = chain.as_slice() else {
        return Err(ReceiptError::CertificateUntrusted(format!(
            "x5c holds {} certificates, not the device's one",
            chain.len()
        )));
    };
    let (_, leaf) = X509Certificate::from_der(leaf_der)
        .map_err(|e| ReceiptError::CertificateUntrusted(format!("not a certificate: {e}")))?;
    issued_by(&leaf, &anchors).map_err(ReceiptError::CertificateUntrusted)?;
    let device_uri = format!("{DEVICE_URI_PREFIX}{}", claims.device);
    if uris(&leaf) != [device_uri.as_str()] {
        return Err(ReceiptError::CertificateUntrusted(format!(
            "it names {:?}, not {device_uri}",
            uris(&leaf)
        )));
    }
    let client_auth = leaf
        .extended_key_usage()
        .ok()
        .flatten()
        .is_some_and(|e| e.value.client_auth);
    if !client_auth || leaf.is_ca() {
        return Err(ReceiptError::CertificateUntrusted(
            "not a device certificate (no clientAuth, or a CA)".into(),
        ));
    }
    crate::x509::validity_at(&leaf, time)?;

    // 2. The receipt's signature.
    let spki = leaf.tbs_certificate.subject_pki.raw;
    let key = verifying_key(spki).map_err(ReceiptError::CertificateUntrusted)?;
    jws.verify(&key)
        .map_err(|_| ReceiptError::SignatureInvalid)?;

    // 3. The attestation result.
    let attestation = attestation_result(&claims, &anchors, spki)?;
    Ok(Verified {
        claims,
        attestation,
    })
}

/// Checks the receipt's attestation result (step 3 of [`verify`]); returns its claims.
fn attestation_result(
    claims: &Claims,
    anchors: &[X509Certificate<'_>],
    device_spki: &[u8],
) -> Result<serde_json::Value, ReceiptError> {
    let untrusted = ReceiptError::AttestationResultUntrusted;
    if sha256_hex(claims.attestation_result.as_bytes()) != claims.attestation_result_id {
        return Err(ReceiptError::AttestationResultMismatch(
            "its SHA-256 is not the id the receipt signs".into(),
        ));
    }
    let jws = Jws::parse(&claims.attestation_result).map_err(|e| untrusted(e.to_string()))?;
    if jws.header["typ"] != crate::attestation::result::TYP {
        return Err(untrusted(format!(
            "typ {} is not an attestation result's",
            jws.header["typ"]
        )));
    }
    let chain = jws.chain().map_err(|e| untrusted(e.to_string()))?;
    let [signer_der] = chain.as_slice() else {
        return Err(untrusted(format!(
            "x5c holds {} certificates, not the result signer's one",
            chain.len()
        )));
    };
    let (_, signer) = X509Certificate::from_der(signer_der)
        .map_err(|e| untrusted(format!("signer: not a certificate: {e}")))?;
    issued_by(&signer, anchors).map_err(|e| untrusted(format!("signer: {e}")))?;
    if uris(&signer) != [RESULT_SIGNER_URI] || signer.is_ca() {
        return Err(untrusted(format!(
            "the signer names {:?}, not {RESULT_SIGNER_URI}",
            uris(&signer)
        )));
    }
    let key = verifying_key(signer.tbs_certificate.subject_pki.raw).map_err(untrusted)?;
    jws.verify(&key)
        .map_err(|_| untrusted("the signature does not verify under the signer's key".into()))?;
    let (ear, issued, expires) = result_claims(&jws.payload)?;
    let at = x509_parser::time::ASN1Time::from_timestamp(issued)
        .map_err(|_| untrusted(format!("iat {issued}")))?;
    crate::x509::validity_at(&signer, at).map_err(|e| untrusted(format!("signer: {e}")))?;
    affirms(&ear, &claims.device, device_spki)?;
    if claims.time < issued - MAX_CLOCK_SKEW_SECONDS || claims.time > expires {
        return Err(ReceiptError::OutsideAttestation {
            time: claims.time,
            issued,
            expires,
        });
    }
    Ok(ear)
}

/// The claims of an attestation result's payload, with its issue and expiry times.
pub fn result_claims(payload: &[u8]) -> Result<(serde_json::Value, i64, i64), ReceiptError> {
    let untrusted = ReceiptError::AttestationResultUntrusted;
    let ear: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| untrusted(format!("payload: {e}")))?;
    let (Some(issued), Some(expires)) = (ear["iat"].as_i64(), ear["exp"].as_i64()) else {
        return Err(untrusted("no iat or exp".into()));
    };
    Ok((ear, issued, expires))
}

/// Whether the attestation result claims `ear` are for `device`, for the key whose
/// SubjectPublicKeyInfo (DER) is `spki`, and affirming: what a verifier requires of
/// a receipt's result, and what a device checks before signing with one.
pub fn affirms(ear: &serde_json::Value, device: &str, spki: &[u8]) -> Result<(), ReceiptError> {
    if ear["sub"] != device {
        return Err(ReceiptError::AttestationResultMismatch(format!(
            "it is for {}, not {device}",
            ear["sub"]
        )));
    }
    if ear["edgefleet.key"] != sha256_hex(spki).as_str() {
        return Err(ReceiptError::AttestationResultMismatch(
            "it attests another key than the device certificate's".into(),
        ));
    }
    if ear["ear.status"] != "affirming" {
        return Err(ReceiptError::AttestationNotAffirming(
            ear["ear.status"].to_string(),
        ));
    }
    Ok(())
}

fn jws_error(e: JwsError, what: &str) -> ReceiptError {
    match e {
        JwsError::Algorithm(alg) => ReceiptError::Unsupported(format!("{what}: JWS alg {alg}")),
        JwsError::Malformed(m) => ReceiptError::Malformed(format!("{what}: {m}")),
        JwsError::Signature => ReceiptError::SignatureInvalid,
    }
}

fn asn1(t: i64) -> Result<x509_parser::time::ASN1Time, ReceiptError> {
    x509_parser::time::ASN1Time::from_timestamp(t)
        .map_err(|_| ReceiptError::Malformed(format!("time {t}")))
}

/// Whether one of `anchors` issued `cert` (names and signature).
fn issued_by(cert: &X509Certificate<'_>, anchors: &[X509Certificate<'_>]) -> Result<(), String> {
    let issuer = anchors.iter().find(|ca| {
        ca.subject() == cert.issuer() && cert.verify_signature(Some(ca.public_key())).is_ok()
    });
    match issuer {
        Some(_) => Ok(()),
        None => Err(format!(
            "{} is not issued by the device CA (issuer {})",
            cert.subject(),
            cert.issuer()
        )),
    }
}

/// The certificate's SAN URIs.
fn uris<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a str> {
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn verifying_key(spki: &[u8]) -> Result<p256::ecdsa::VerifyingKey, String> {
    use p256::pkcs8::DecodePublicKey as _;
    p256::ecdsa::VerifyingKey::from_public_key_der(spki)
        .map_err(|e| format!("not a P-256 key: {e}"))
}
