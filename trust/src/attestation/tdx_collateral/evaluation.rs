//! The evaluation of a quote's TCB against the collateral: the platform's TCB level,
//! the TDX module's identity and level, the QE identity and level, and the converged
//! status (steps in the parent module's docs).

use std::time::SystemTime;

use super::documents::{current, signed, signing_key};
use super::{EnclaveIdentity, PckTcb, QuoteTcb, TcbEvaluation, TcbInfo, TcbStatus, TdxCollateral};
use crate::attestation::AttestationError;

fn hex_field(s: &str, len: usize, what: &str) -> Result<Vec<u8>, AttestationError> {
    hex::decode(s)
        .ok()
        .filter(|v| v.len() == len)
        .ok_or_else(|| AttestationError::CollateralInvalid(format!("{what} is not {len} bytes")))
}

fn masked_eq(actual: &[u8], expected: &[u8], mask: &[u8]) -> bool {
    actual.len() == expected.len()
        && actual.len() == mask.len()
        && actual
            .iter()
            .zip(expected)
            .zip(mask)
            .all(|((a, e), m)| a & m == e & m)
}

/// Evaluates a quote's TCB against the collateral (steps in the module docs).
pub fn evaluate(
    collateral: &TdxCollateral,
    root_der: &[u8],
    now: SystemTime,
    pck: &PckTcb,
    quote: &QuoteTcb<'_>,
) -> Result<TcbEvaluation, AttestationError> {
    let key = signing_key(&collateral.signing_chain, root_der, now)?;
    let text = collateral
        .tcb_infos
        .get(&pck.fmspc)
        .ok_or_else(|| AttestationError::CollateralMissing(pck.fmspc.clone()))?;
    let info: TcbInfo = signed(text, "tcbInfo", &key)?;
    current("tcbInfo", &info.issue_date, &info.next_update, now)?;
    if info.id != "TDX" || info.version != 3 {
        return Err(AttestationError::CollateralInvalid(format!(
            "tcbInfo is {} version {}, not TDX version 3",
            info.id, info.version
        )));
    }
    if !info.fmspc.eq_ignore_ascii_case(&pck.fmspc)
        || !info.pce_id.eq_ignore_ascii_case(&pck.pce_id)
    {
        return Err(AttestationError::CollateralInvalid(format!(
            "tcbInfo is for FMSPC {} PCE {}, the PCK certificate for {} {}",
            info.fmspc, info.pce_id, pck.fmspc, pck.pce_id
        )));
    }
    let qe: EnclaveIdentity = signed(&collateral.qe_identity, "enclaveIdentity", &key)?;
    current("enclaveIdentity", &qe.issue_date, &qe.next_update, now)?;
    if qe.id != "TD_QE" || qe.version != 2 {
        return Err(AttestationError::CollateralInvalid(format!(
            "enclaveIdentity is {} version {}, not TD_QE version 2",
            qe.id, qe.version
        )));
    }

    let tee = quote.tee_tcb_svn;
    let major = tee.get(1).copied().unwrap_or(0);
    let mut advisories: Vec<String> = Vec::new();

    // Platform level.
    let tdx_from = if major > 0 { 2 } else { 0 };
    let level = info
        .tcb_levels
        .iter()
        .find(|l| {
            l.tcb.sgxtcbcomponents.len() == 16
                && l.tcb.tdxtcbcomponents.len() == 16
                && l.tcb
                    .sgxtcbcomponents
                    .iter()
                    .zip(pck.sgx_components)
                    .all(|(c, have)| have >= c.svn)
                && pck.pce_svn >= l.tcb.pcesvn
                && l.tcb
                    .tdxtcbcomponents
                    .iter()
                    .zip(tee)
                    .skip(tdx_from)
                    .all(|(c, &have)| have >= c.svn)
        })
        .ok_or_else(|| {
            AttestationError::TcbNotSupported(format!(
                "no TCB level of FMSPC {} admits the platform",
                pck.fmspc
            ))
        })?;
    let platform = TcbStatus::parse(&level.tcb_status)?;
    advisories.extend(level.advisory_ids.iter().cloned());

    // TDX module.
    let module = if major > 0 {
        let id = format!("TDX_{major:02X}");
        let ident = info
            .tdx_module_identities
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| {
                AttestationError::TcbNotSupported(format!("no TDX module identity {id}"))
            })?;
        check_module(
            &ident.mrsigner,
            &ident.attributes,
            &ident.attributes_mask,
            quote,
        )?;
        let svn = u16::from(tee.first().copied().unwrap_or(0));
        let l = ident
            .tcb_levels
            .iter()
            .find(|l| svn >= l.tcb.isvsvn)
            .ok_or_else(|| {
                AttestationError::TcbNotSupported(format!("TDX module {id} SVN {svn}"))
            })?;
        advisories.extend(l.advisory_ids.iter().cloned());
        Some(TcbStatus::parse(&l.tcb_status)?)
    } else {
        if let Some(m) = &info.tdx_module {
            check_module(&m.mrsigner, &m.attributes, &m.attributes_mask, quote)?;
        }
        None
    };

    // QE identity.
    let r = quote.qe_report;
    if r.len() != 384 {
        return Err(AttestationError::Malformed(
            "QE report is not 384 bytes".into(),
        ));
    }
    let mismatch = |what: &str| AttestationError::QeIdentityMismatch(what.to_owned());
    if r[128..160] != hex_field(&qe.mrsigner, 32, "QE mrsigner")?[..] {
        return Err(mismatch("MRSIGNER"));
    }
    if u16::from_le_bytes([r[256], r[257]]) != qe.isvprodid {
        return Err(mismatch("ISVPRODID"));
    }
    // MISCSELECT is a little-endian u32 in the report; the identity writes it big-endian.
    let mut misc = r[16..20].to_vec();
    misc.reverse();
    if !masked_eq(
        &misc,
        &hex_field(&qe.miscselect, 4, "QE miscselect")?,
        &hex_field(&qe.miscselect_mask, 4, "QE miscselectMask")?,
    ) {
        return Err(mismatch("MISCSELECT"));
    }
    if !masked_eq(
        &r[48..64],
        &hex_field(&qe.attributes, 16, "QE attributes")?,
        &hex_field(&qe.attributes_mask, 16, "QE attributesMask")?,
    ) {
        return Err(mismatch("ATTRIBUTES"));
    }
    let qe_svn = u16::from_le_bytes([r[258], r[259]]);
    let ql = qe
        .tcb_levels
        .iter()
        .find(|l| qe_svn >= l.tcb.isvsvn)
        .ok_or_else(|| AttestationError::TcbNotSupported(format!("TD QE SVN {qe_svn}")))?;
    let qe_status = TcbStatus::parse(&ql.tcb_status)?;
    advisories.extend(ql.advisory_ids.iter().cloned());

    let mut all = vec![platform, qe_status];
    all.extend(module);
    let status = TcbStatus::converge(&all);
    if status == TcbStatus::Revoked {
        return Err(AttestationError::TcbNotSupported(
            "the platform's TCB is revoked".into(),
        ));
    }
    advisories.sort();
    advisories.dedup();
    Ok(TcbEvaluation {
        status,
        platform,
        module,
        qe: qe_status,
        tcb_date: level.tcb_date.clone(),
        advisory_ids: advisories,
        evaluation_data_number: info.tcb_evaluation_data_number,
    })
}

fn check_module(
    mrsigner: &str,
    attributes: &str,
    mask: &str,
    quote: &QuoteTcb<'_>,
) -> Result<(), AttestationError> {
    if quote.mr_signer_seam != hex_field(mrsigner, 48, "TDX module mrsigner")?.as_slice() {
        return Err(AttestationError::TcbNotSupported(
            "MRSIGNERSEAM is not the TDX module signer the TCB info names".into(),
        ));
    }
    if !masked_eq(
        quote.seam_attributes,
        &hex_field(attributes, 8, "TDX module attributes")?,
        &hex_field(mask, 8, "TDX module attributesMask")?,
    ) {
        return Err(AttestationError::TcbNotSupported(
            "SEAMATTRIBUTES differ from the TDX module identity".into(),
        ));
    }
    Ok(())
}
