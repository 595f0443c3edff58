//! Intel TDX quotes (versions 4 and 5, ECDSA P-256 attestation key).
//!
//! Four checks make a quote genuine: the quote signature by the attestation key over
//! header and body; the QE report signature by the PCK certificate's key; the QE report
//! data equal to SHA-256(attestation key ‖ QE authentication data), which binds the
//! attestation key to the quoting enclave; and the PCK chain up to the pinned Intel SGX
//! root at `now`. The TCB status comes from Intel's collateral (TCB info, QE identity)
//! when the options carry it ([`super::tdx_collateral`]); without it the claims say
//! `tcb_status: "unknown"`, and the policy decides whether that is enough.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use p256::ecdsa::signature::Verifier as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::tdx_collateral::{self, QuoteTcb, TdxCollateral};
use super::{
    AttestationError, Bytes, Claims, TeeKind, asn1_time, check_issued_by, check_validity,
    parse_cert,
};

const HEADER_LEN: usize = 48;
const BODY_V4_LEN: usize = 584;
const BODY_V15_LEN: usize = 648;
const QE_REPORT_LEN: usize = 384;
/// Attestation key type: ECDSA-256-with-P-256.
const AK_ECDSA_P256: u16 = 2;
/// TEE type: TDX.
const TEE_TDX: u32 = 0x81;
/// Certification data: QE report certification data.
const CERT_QE_REPORT: u16 = 6;
/// Certification data: PCK leaf, intermediate and root, PEM.
const CERT_PCK_CHAIN: u16 = 5;
/// TD attribute bit 0: the TD is debuggable.
const TD_ATTR_DEBUG: u8 = 1;

/// Verifier options.
#[derive(Debug, Clone, Default)]
pub struct TdxOptions {
    /// Accept debuggable TDs (never in production).
    pub allow_debug: bool,
    /// The report data the attester must have bound (64 bytes).
    pub expected_report_data: Option<Vec<u8>>,
    /// Intel's collateral; with it the TCB status is evaluated, and a quote it does not
    /// admit is rejected.
    pub collateral: Option<Arc<TdxCollateral>>,
}

fn p256_key(x_y: &[u8], what: &str) -> Result<p256::ecdsa::VerifyingKey, AttestationError> {
    let mut sec1 = Vec::with_capacity(65);
    sec1.push(0x04);
    sec1.extend_from_slice(x_y);
    p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
        .map_err(|e| AttestationError::Malformed(format!("{what} is not a P-256 point: {e}")))
}

fn raw_sig(r_s: &[u8], what: &str) -> Result<p256::ecdsa::Signature, AttestationError> {
    p256::ecdsa::Signature::from_slice(r_s)
        .map_err(|e| AttestationError::SignatureInvalid(format!("{what} encoding: {e}")))
}

/// Verifies a TDX quote against the pinned Intel SGX root (DER).
pub fn verify(
    quote: &[u8],
    intel_root_der: &[u8],
    now: SystemTime,
    options: &TdxOptions,
) -> Result<Claims, AttestationError> {
    let q = Bytes::new(quote, "TDX quote");
    let version = q.u16_le(0)?;
    let ak_type = q.u16_le(2)?;
    let tee_type = q.u32_le(4)?;
    if ak_type != AK_ECDSA_P256 {
        return Err(AttestationError::Unsupported(format!(
            "attestation key type {ak_type} (only 2, ECDSA P-256)"
        )));
    }
    if tee_type != TEE_TDX {
        return Err(AttestationError::Unsupported(format!(
            "TEE type {tee_type:#x} (only 0x81, TDX)"
        )));
    }
    let (body_at, body_len) = match version {
        4 => (HEADER_LEN, BODY_V4_LEN),
        5 => {
            let body_type = q.u16_le(HEADER_LEN)?;
            let body_size = usize::try_from(q.u32_le(HEADER_LEN + 2)?).unwrap_or(usize::MAX);
            let expected = match body_type {
                2 => BODY_V4_LEN,
                3 => BODY_V15_LEN,
                other => {
                    return Err(AttestationError::Unsupported(format!(
                        "quote v5 body type {other}"
                    )));
                }
            };
            if body_size != expected {
                return Err(AttestationError::Malformed(format!(
                    "body type {body_type} with size {body_size}"
                )));
            }
            (HEADER_LEN + 6, body_size)
        }
        other => {
            return Err(AttestationError::Unsupported(format!(
                "quote version {other}"
            )));
        }
    };
    let body = q.slice(body_at, body_len)?;
    let signed_end = body_at + body_len;
    let sig_len = usize::try_from(q.u32_le(signed_end)?).unwrap_or(usize::MAX);
    let sd = Bytes::new(q.slice(signed_end + 4, sig_len)?, "TDX signature data");

    // 1. Quote signature by the attestation key.
    let ak_bytes = sd.slice(64, 64)?;
    let ak = p256_key(ak_bytes, "attestation key")?;
    ak.verify(
        &quote[..signed_end],
        &raw_sig(sd.slice(0, 64)?, "quote signature")?,
    )
    .map_err(|_| {
        AttestationError::SignatureInvalid("quote signature by the attestation key".into())
    })?;

    let cert_type = sd.u16_le(128)?;
    if cert_type != CERT_QE_REPORT {
        return Err(AttestationError::Unsupported(format!(
            "certification data type {cert_type} (expected 6)"
        )));
    }
    let cert_size = usize::try_from(sd.u32_le(130)?).unwrap_or(usize::MAX);
    let cd = Bytes::new(sd.slice(134, cert_size)?, "QE certification data");
    let qe_report = cd.slice(0, QE_REPORT_LEN)?;
    let qe_sig = cd.slice(QE_REPORT_LEN, 64)?;
    let auth_len = usize::from(cd.u16_le(QE_REPORT_LEN + 64)?);
    let auth = cd.slice(QE_REPORT_LEN + 66, auth_len)?;
    let inner_at = QE_REPORT_LEN + 66 + auth_len;
    let inner_type = cd.u16_le(inner_at)?;
    if inner_type != CERT_PCK_CHAIN {
        return Err(AttestationError::Unsupported(format!(
            "QE certification data type {inner_type} (expected 5, PCK chain)"
        )));
    }
    let inner_size = usize::try_from(cd.u32_le(inner_at + 2)?).unwrap_or(usize::MAX);
    let pem = cd.slice(inner_at + 6, inner_size)?;

    // 4. PCK chain to the pinned root.
    let now_asn1 = asn1_time(now)?;
    let chain = super::pem_certificates(pem)?;
    let [leaf_der, inter_der, ..] = chain.as_slice() else {
        return Err(AttestationError::ChainInvalid(format!(
            "PCK chain has {} certificates, need leaf and intermediate",
            chain.len()
        )));
    };
    let leaf = parse_cert(leaf_der, "PCK leaf")?;
    let inter = parse_cert(inter_der, "PCK intermediate")?;
    let root = parse_cert(intel_root_der, "pinned Intel SGX root")?;
    if let Some(embedded) = chain.get(2)
        && embedded != intel_root_der
    {
        return Err(AttestationError::ChainInvalid(
            "the quote's root is not the pinned Intel SGX root".into(),
        ));
    }
    check_issued_by(&leaf, &inter)?;
    check_issued_by(&inter, &root)?;
    check_issued_by(&root, &root)?;
    for cert in [&leaf, &inter, &root] {
        check_validity(cert, now_asn1)?;
    }

    // 2. QE report signature by the PCK key.
    let pck_point = leaf.public_key().subject_public_key.data.as_ref();
    let pck = p256::ecdsa::VerifyingKey::from_sec1_bytes(pck_point).map_err(|e| {
        AttestationError::MalformedCertificate {
            which: "PCK leaf".into(),
            reason: format!("not a P-256 key: {e}"),
        }
    })?;
    pck.verify(qe_report, &raw_sig(qe_sig, "QE report signature")?)
        .map_err(|_| AttestationError::SignatureInvalid("QE report signature by the PCK".into()))?;

    // 3. QE report data binds the attestation key.
    let mut h = Sha256::new();
    h.update(ak_bytes);
    h.update(auth);
    let expected = h.finalize();
    let qe_report_data = &qe_report[320..384];
    if qe_report_data[..32] != expected[..] || qe_report_data[32..].iter().any(|&b| b != 0) {
        return Err(AttestationError::QeBindingMismatch);
    }

    let b = Bytes::new(body, "TD report body");
    let td_attributes = b.slice(120, 8)?;
    let debug = td_attributes[0] & TD_ATTR_DEBUG != 0;
    if debug && !options.allow_debug {
        return Err(AttestationError::DebugEnabled);
    }
    let report_data = b.slice(520, 64)?;
    let key_binding = super::check_binding(options.expected_report_data.as_deref(), report_data)?;

    let mut measurements = BTreeMap::new();
    for (name, at, len) in [
        ("mr_seam", 16, 48),
        ("mr_signer_seam", 64, 48),
        ("mr_td", 136, 48),
        ("mr_config_id", 184, 48),
        ("mr_owner", 232, 48),
        ("mr_owner_config", 280, 48),
        ("rtmr0", 328, 48),
        ("rtmr1", 376, 48),
        ("rtmr2", 424, 48),
        ("rtmr3", 472, 48),
    ] {
        measurements.insert(name.to_owned(), hex::encode(b.slice(at, len)?));
    }
    if body_len == BODY_V15_LEN {
        measurements.insert("mr_service_td".into(), hex::encode(b.slice(600, 48)?));
    }
    let mut tcb = BTreeMap::new();
    tcb.insert("tee_tcb_svn".into(), json!(hex::encode(b.slice(0, 16)?)));
    if body_len == BODY_V15_LEN {
        tcb.insert("tee_tcb_svn2".into(), json!(hex::encode(b.slice(584, 16)?)));
    }
    tcb.insert("qe_svn".into(), json!(q.u16_le(8)?));
    tcb.insert("pce_svn".into(), json!(q.u16_le(10)?));
    let pck_tcb = tdx_collateral::pck_tcb(&leaf);
    if let Ok(p) = &pck_tcb {
        tcb.insert("fmspc".into(), json!(p.fmspc));
        tcb.insert("pck_pce_svn".into(), json!(p.pce_svn));
        tcb.insert("pck_sgx_tcb".into(), json!(hex::encode(p.sgx_components)));
    }
    match &options.collateral {
        None => {
            tcb.insert("tcb_status".into(), json!("unknown"));
        }
        Some(collateral) => {
            let e = tdx_collateral::evaluate(
                collateral,
                intel_root_der,
                now,
                &pck_tcb?,
                &QuoteTcb {
                    tee_tcb_svn: b.slice(0, 16)?,
                    mr_signer_seam: b.slice(64, 48)?,
                    seam_attributes: b.slice(112, 8)?,
                    qe_report,
                },
            )?;
            tcb.insert("tcb_status".into(), json!(e.status.as_str()));
            tcb.insert("platform_tcb_status".into(), json!(e.platform.as_str()));
            tcb.insert("qe_tcb_status".into(), json!(e.qe.as_str()));
            if let Some(m) = e.module {
                tcb.insert("module_tcb_status".into(), json!(m.as_str()));
            }
            tcb.insert("tcb_date".into(), json!(e.tcb_date));
            tcb.insert("advisory_ids".into(), json!(e.advisory_ids));
            tcb.insert(
                "tcb_evaluation_data_number".into(),
                json!(e.evaluation_data_number),
            );
        }
    }
    let mut platform = BTreeMap::new();
    platform.insert("quote_version".into(), json!(version));
    platform.insert("td_attributes".into(), json!(hex::encode(td_attributes)));
    platform.insert(
        "seam_attributes".into(),
        json!(hex::encode(b.slice(112, 8)?)),
    );
    platform.insert("xfam".into(), json!(hex::encode(b.slice(128, 8)?)));
    platform.insert("qe_vendor_id".into(), json!(hex::encode(q.slice(12, 16)?)));
    platform.insert("pck_subject".into(), json!(leaf.subject().to_string()));
    if let Some(ppid) = tdx_collateral::pck_ppid(&leaf) {
        platform.insert("ppid".into(), json!(ppid));
    }

    Ok(Claims {
        tee: TeeKind::Tdx,
        hardware_genuine: true,
        debug,
        measurements,
        tcb,
        report_data: hex::encode(report_data),
        key_binding,
        signer: hex::encode(Sha256::digest(leaf_der)),
        platform,
    })
}
