//! Trust in Intel's collateral documents: the TCB signing key checked against the pinned
//! root, each document's signature over the exact bytes of its member (`tcbInfo`,
//! `enclaveIdentity`), and whether a document is current at `now`.

use std::time::SystemTime;

use p256::ecdsa::signature::Verifier as _;
use serde::Deserialize;

use crate::attestation::{
    AttestationError, asn1_time, check_issued_by, check_validity, parse_cert,
};

/// The subject common name of the certificate that signs TCB info and QE identities.
const TCB_SIGNING_CN: &str = "Intel SGX TCB Signing";

/// The exact text of the top-level member `key` of a JSON object: the bytes Intel signed.
fn member_span<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    let mut in_string = false;
    let mut string_start = 0;
    while i < b.len() {
        let c = b[i];
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => {
                    in_string = false;
                    // A key at depth 1 followed by ':'.
                    if depth == 1 && &text[string_start + 1..i] == key {
                        let rest = &text[i + 1..];
                        let after = rest.trim_start().strip_prefix(':')?.trim_start();
                        let start = text.len() - after.len();
                        return value_end(text, start).map(|end| &text[start..end]);
                    }
                }
                _ => {}
            }
        } else {
            match c {
                b'"' => {
                    in_string = true;
                    string_start = i;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => depth = depth.checked_sub(1)?,
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// The end of the JSON object or array starting at `start`.
fn value_end(text: &str, start: usize) -> Option<usize> {
    let b = text.as_bytes();
    if !matches!(b.get(start), Some(b'{') | Some(b'[')) {
        return None;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut i = start;
    while i < b.len() {
        let c = b[i];
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match c {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Checks a signed document `{"<member>": {...}, "signature": "<hex r‖s>"}` and returns
/// the member parsed.
pub(super) fn signed<T: for<'de> Deserialize<'de>>(
    text: &str,
    member: &str,
    key: &p256::ecdsa::VerifyingKey,
) -> Result<T, AttestationError> {
    let invalid = |what: String| AttestationError::CollateralInvalid(format!("{member}: {what}"));
    #[derive(Deserialize)]
    struct Envelope {
        signature: String,
    }
    let envelope: Envelope =
        serde_json::from_str(text).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let body = member_span(text, member).ok_or_else(|| invalid("no such member".into()))?;
    let sig = hex::decode(&envelope.signature)
        .ok()
        .and_then(|s| p256::ecdsa::Signature::from_slice(&s).ok())
        .ok_or_else(|| invalid("signature is not 64 bytes of hex r‖s".into()))?;
    key.verify(body.as_bytes(), &sig)
        .map_err(|_| invalid("signature does not verify with the TCB signing key".into()))?;
    serde_json::from_str(body).map_err(|e| invalid(format!("fields: {e}")))
}

pub(super) fn current(
    which: &str,
    issue: &str,
    next: &str,
    now: SystemTime,
) -> Result<(), AttestationError> {
    let parse = |s: &str| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map_err(|e| AttestationError::CollateralInvalid(format!("{which} date {s:?}: {e}")))
    };
    let (issue_t, next_t) = (parse(issue)?, parse(next)?);
    let now_t = time::OffsetDateTime::from(now);
    if now_t < issue_t || now_t >= next_t {
        return Err(AttestationError::CollateralExpired {
            which: which.to_owned(),
            issued: issue.to_owned(),
            next_update: next.to_owned(),
            now: now_t
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        });
    }
    Ok(())
}

/// The signing key, after checking its chain to the pinned root at `now`.
pub(super) fn signing_key(
    chain_pem: &[u8],
    root_der: &[u8],
    now: SystemTime,
) -> Result<p256::ecdsa::VerifyingKey, AttestationError> {
    let chain = crate::attestation::pem_certificates(chain_pem)?;
    let Some(leaf_der) = chain.first() else {
        return Err(AttestationError::CollateralInvalid(
            "the TCB signing chain is empty".into(),
        ));
    };
    if chain.iter().skip(1).any(|c| c != root_der) {
        return Err(AttestationError::ChainInvalid(
            "the TCB signing chain's root is not the pinned Intel SGX root".into(),
        ));
    }
    let leaf = parse_cert(leaf_der, "TCB signing")?;
    let root = parse_cert(root_der, "pinned Intel SGX root")?;
    // Issued directly by the root: a PCK certificate (issued by a PCK CA) cannot pass.
    check_issued_by(&leaf, &root)?;
    let cn_ok = leaf
        .subject()
        .iter_common_name()
        .any(|cn| cn.as_str().ok() == Some(TCB_SIGNING_CN));
    if !cn_ok {
        return Err(AttestationError::ChainInvalid(format!(
            "{} is not the {TCB_SIGNING_CN} certificate",
            leaf.subject()
        )));
    }
    let now_asn1 = asn1_time(now)?;
    check_validity(&leaf, now_asn1)?;
    check_validity(&root, now_asn1)?;
    p256::ecdsa::VerifyingKey::from_sec1_bytes(leaf.public_key().subject_public_key.data.as_ref())
        .map_err(|e| AttestationError::MalformedCertificate {
            which: "TCB signing".into(),
            reason: format!("not a P-256 key: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_span_is_the_exact_text() {
        let t = r#"{"a":{"x":"}\"{","y":[1,{"z":2}]} , "signature":"00"}"#;
        assert_eq!(member_span(t, "a"), Some(r#"{"x":"}\"{","y":[1,{"z":2}]}"#));
        assert_eq!(member_span(t, "x"), None, "only top-level members");
        assert_eq!(member_span(r#"{"a":{"#, "a"), None, "unterminated");
    }
}
