//! The TCB a PCK certificate was issued for ([`PckTcb`]): FMSPC, PCE ID, SGX component
//! SVNs and PCE SVN, read from Intel's SGX extension with a small DER reader; and the
//! platform's PPID from the same extension ([`pck_ppid`]).

use x509_parser::certificate::X509Certificate;

use crate::attestation::AttestationError;

/// Intel's SGX extension in PCK certificates: 1.2.840.113741.1.13.1.
const OID_SGX_EXTENSIONS: &str = "1.2.840.113741.1.13.1";
/// The DER body of that OID, the prefix of every sub-OID inside the extension.
const SGX_OID_BODY: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf8, 0x4d, 0x01, 0x0d, 0x01];

/// The TCB the PCK certificate was issued for, from its SGX extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PckTcb {
    /// FMSPC, lower-case hex.
    pub fmspc: String,
    /// PCE ID, lower-case hex.
    pub pce_id: String,
    /// SGX TCB component SVNs 1..=16.
    pub sgx_components: [u8; 16],
    /// PCE SVN.
    pub pce_svn: u16,
}

/// A DER TLV: (tag, contents, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => {
            let (&l, rest) = rest.split_first()?;
            (usize::from(l), rest)
        }
        0x82 => {
            let l = rest.get(..2)?;
            (usize::from(l[0]) << 8 | usize::from(l[1]), rest.get(2..)?)
        }
        _ => return None,
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

/// The (last arc, value TLV) pairs of a SEQUENCE OF SEQUENCE { OID, value } whose OIDs
/// are `prefix` and one more arc; entries under other OIDs are skipped.
fn sgx_entries<'a>(seq: &'a [u8], prefix: &[u8]) -> Option<Vec<(u8, &'a [u8])>> {
    let (tag, mut body, _) = tlv(seq)?;
    if tag != 0x30 {
        return None;
    }
    let mut out = Vec::new();
    while !body.is_empty() {
        let (tag, entry, rest) = tlv(body)?;
        if tag != 0x30 {
            return None;
        }
        let (otag, oid, value) = tlv(entry)?;
        if otag != 0x06 {
            return None;
        }
        if let Some(&[arc]) = oid.strip_prefix(prefix) {
            out.push((arc, value));
        }
        body = rest;
    }
    Some(out)
}

/// The PPID (Platform Provisioning ID, 16 bytes, lower-case hex) in a PCK certificate's
/// SGX extension: what names the platform across TCB levels and PCK certificates.
/// `None` when the extension or the PPID is missing or malformed.
pub fn pck_ppid(pck: &X509Certificate<'_>) -> Option<String> {
    let ext = pck
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == OID_SGX_EXTENSIONS)?;
    sgx_entries(ext.value, SGX_OID_BODY)?
        .iter()
        .find(|(arc, _)| *arc == 1)
        .and_then(|(_, value)| match tlv(value) {
            Some((0x04, body, _)) if body.len() == 16 => Some(hex::encode(body)),
            _ => None,
        })
}

/// Reads the FMSPC, PCE ID and TCB from a PCK certificate's SGX extension.
pub fn pck_tcb(pck: &X509Certificate<'_>) -> Result<PckTcb, AttestationError> {
    let bad = |what: &str| AttestationError::MalformedCertificate {
        which: "PCK leaf".into(),
        reason: format!("SGX extension: {what}"),
    };
    let ext = pck
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == OID_SGX_EXTENSIONS)
        .ok_or_else(|| bad("missing"))?;
    let entries =
        sgx_entries(ext.value, SGX_OID_BODY).ok_or_else(|| bad("not a sequence of entries"))?;
    let octets = |v: &[u8]| match tlv(v) {
        Some((0x04, body, _)) => Some(body.to_vec()),
        _ => None,
    };
    let integer = |v: &[u8]| match tlv(v) {
        Some((0x02, body, _)) if !body.is_empty() && body.len() <= 3 && body[0] & 0x80 == 0 => {
            Some(body.iter().fold(0u32, |a, &b| a << 8 | u32::from(b)))
        }
        _ => None,
    };
    let (mut fmspc, mut pce_id, mut tcb) = (None, None, None);
    for (arc, value) in &entries {
        match arc {
            2 => tcb = Some(*value),
            3 => pce_id = octets(value),
            4 => fmspc = octets(value),
            _ => {}
        }
    }
    let fmspc = fmspc.filter(|f| f.len() == 6).ok_or_else(|| bad("FMSPC"))?;
    let pce_id = pce_id
        .filter(|p| p.len() == 2)
        .ok_or_else(|| bad("PCE ID"))?;
    let tcb_prefix = [SGX_OID_BODY, &[2]].concat();
    let tcb = sgx_entries(tcb.ok_or_else(|| bad("TCB"))?, &tcb_prefix)
        .ok_or_else(|| bad("TCB entries"))?;
    let mut sgx_components = [0u8; 16];
    let mut seen = 0u32;
    let mut pce_svn = None;
    for (arc, value) in &tcb {
        match arc {
            1..=16 => {
                let svn = integer(value)
                    .and_then(|v| u8::try_from(v).ok())
                    .ok_or_else(|| bad("component SVN"))?;
                sgx_components[usize::from(arc - 1)] = svn;
                seen |= 1 << (arc - 1);
            }
            17 => {
                pce_svn = integer(value).and_then(|v| u16::try_from(v).ok());
            }
            _ => {}
        }
    }
    if seen != 0xffff {
        return Err(bad("fewer than 16 TCB components"));
    }
    Ok(PckTcb {
        fmspc: hex::encode(fmspc),
        pce_id: hex::encode(pce_id),
        sgx_components,
        pce_svn: pce_svn.ok_or_else(|| bad("PCE SVN"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_refuses_short_input() {
        assert_eq!(tlv(&[0x04, 0x02, 0x01]), None);
        assert_eq!(tlv(&[0x04, 0x83, 0, 0, 1]), None, "lengths over 64 KiB");
        assert_eq!(
            tlv(&[0x04, 0x01, 0x07, 0xff]),
            Some((0x04, &[0x07][..], &[0xff][..]))
        );
    }
}
