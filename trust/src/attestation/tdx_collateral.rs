//! Intel TDX TCB status from Intel's collateral: the TCB info for the platform's FMSPC
//! and the TD quoting enclave's identity, both signed by the Intel SGX TCB Signing key
//! that chains to the pinned Intel SGX root.
//!
//! The collateral is what Intel's Provisioning Certification Service (or a caching PCCS)
//! serves, stored as files in one directory ([`TdxCollateral::load_dir`]):
//!
//! | file | PCS endpoint |
//! |---|---|
//! | `tcb_info_<fmspc>.json` | `/tdx/certification/v4/tcb?fmspc=<fmspc>` (body) |
//! | `td_qe_identity.json` | `/tdx/certification/v4/qe/identity` (body) |
//! | `tcb_signing_chain.pem` | the `TCB-Info-Issuer-Chain` header, URL-decoded |
//!
//! Evaluation ([`evaluate`]), following Intel's TDX DCAP quote verification:
//! 1. the signing chain is `Intel SGX TCB Signing` issued directly by the pinned root,
//!    valid at `now`; each document's signature (ECDSA P-256, raw r‖s) is over the exact
//!    bytes of its `tcbInfo` or `enclaveIdentity` member;
//! 2. each document is current: `issueDate <= now < nextUpdate`, so that a verifier never
//!    decides on stale advisories;
//! 3. the TCB info is for TDX (`id` "TDX", version 3), for the PCK certificate's FMSPC and
//!    PCE ID;
//! 4. platform level: the first TCB level whose SGX components and PCE SVN are at most the
//!    PCK certificate's, and whose TDX components are at most the quote's TEE_TCB_SVN
//!    (bytes 0 and 1 are left to the TDX module identity when the module's major version,
//!    byte 1, is non-zero);
//! 5. TDX module: for a non-zero major version, the identity `TDX_<major>` must match the
//!    quote's MRSIGNERSEAM and SEAMATTRIBUTES (masked), and its first level whose ISV SVN
//!    is at most byte 0 gives the module's status;
//! 6. QE identity (`TD_QE`, version 2): MRSIGNER, ISVPRODID, MISCSELECT and ATTRIBUTES
//!    (masked) must match the QE report; the first level whose ISV SVN is at most the
//!    QE's gives its status;
//! 7. the statuses converge into one (`OutOfDate` with a configuration need gives
//!    `OutOfDateConfigurationNeeded`, and so on); no matching level, or `Revoked`,
//!    rejects the quote. Every other status goes into the claims with the advisory IDs,
//!    and the policy decides.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use p256::ecdsa::signature::Verifier as _;
use serde::Deserialize;
use x509_parser::certificate::X509Certificate;

use super::{AttestationError, asn1_time, check_issued_by, check_validity, parse_cert};

/// Intel's SGX extension in PCK certificates: 1.2.840.113741.1.13.1.
const OID_SGX_EXTENSIONS: &str = "1.2.840.113741.1.13.1";
/// The DER body of that OID, the prefix of every sub-OID inside the extension.
const SGX_OID_BODY: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf8, 0x4d, 0x01, 0x0d, 0x01];
/// The subject common name of the certificate that signs TCB info and QE identities.
const TCB_SIGNING_CN: &str = "Intel SGX TCB Signing";

/// The collateral for a set of platforms: TCB info per FMSPC, the TD QE identity and the
/// chain that signs them, each kept as the exact text Intel served.
#[derive(Debug, Clone, Default)]
pub struct TdxCollateral {
    /// TCB info responses by FMSPC (lower-case hex).
    pub tcb_infos: BTreeMap<String, String>,
    /// The TD QE identity response.
    pub qe_identity: String,
    /// The TCB signing chain, PEM (leaf first; the root may follow).
    pub signing_chain: Vec<u8>,
}

impl TdxCollateral {
    /// Reads a collateral directory (layout in the module docs). A missing or unreadable
    /// file is named; the contents are checked only when a quote is evaluated.
    pub fn load_dir(dir: &Path) -> Result<Self, AttestationError> {
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| {
                AttestationError::CollateralInvalid(format!("{}: {e}", dir.join(name).display()))
            })
        };
        let signing_chain = read("tcb_signing_chain.pem")?;
        let qe_identity = String::from_utf8(read("td_qe_identity.json")?).map_err(|_| {
            AttestationError::CollateralInvalid("td_qe_identity.json is not UTF-8".into())
        })?;
        let mut tcb_infos = BTreeMap::new();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| AttestationError::CollateralInvalid(format!("{}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(|e| {
                AttestationError::CollateralInvalid(format!("{}: {e}", dir.display()))
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(fmspc) = name
                .strip_prefix("tcb_info_")
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let text = String::from_utf8(read(&name)?)
                .map_err(|_| AttestationError::CollateralInvalid(format!("{name} is not UTF-8")))?;
            tcb_infos.insert(fmspc.to_ascii_lowercase(), text);
        }
        Ok(Self {
            tcb_infos,
            qe_identity,
            signing_chain,
        })
    }
}

/// A TCB status as Intel names it, ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TcbStatus {
    /// Fully patched.
    UpToDate,
    /// Patched; software mitigations are needed.
    SwHardeningNeeded,
    /// Patched; the platform's configuration needs a change.
    ConfigurationNeeded,
    /// Both of the above.
    ConfigurationAndSwHardeningNeeded,
    /// Not patched for the listed advisories.
    OutOfDate,
    /// Not patched, and the configuration needs a change.
    OutOfDateConfigurationNeeded,
    /// The platform's keys are revoked.
    Revoked,
}

impl TcbStatus {
    fn parse(s: &str) -> Result<Self, AttestationError> {
        Ok(match s {
            "UpToDate" => Self::UpToDate,
            "SWHardeningNeeded" => Self::SwHardeningNeeded,
            "ConfigurationNeeded" => Self::ConfigurationNeeded,
            "ConfigurationAndSWHardeningNeeded" => Self::ConfigurationAndSwHardeningNeeded,
            "OutOfDate" => Self::OutOfDate,
            "OutOfDateConfigurationNeeded" => Self::OutOfDateConfigurationNeeded,
            "Revoked" => Self::Revoked,
            other => {
                return Err(AttestationError::CollateralInvalid(format!(
                    "unknown tcbStatus {other:?}"
                )));
            }
        })
    }

    /// Intel's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UpToDate => "UpToDate",
            Self::SwHardeningNeeded => "SWHardeningNeeded",
            Self::ConfigurationNeeded => "ConfigurationNeeded",
            Self::ConfigurationAndSwHardeningNeeded => "ConfigurationAndSWHardeningNeeded",
            Self::OutOfDate => "OutOfDate",
            Self::OutOfDateConfigurationNeeded => "OutOfDateConfigurationNeeded",
            Self::Revoked => "Revoked",
        }
    }

    /// Converges several statuses into one that keeps every need any of them names.
    pub fn converge(all: &[TcbStatus]) -> TcbStatus {
        let any = |f: fn(TcbStatus) -> bool| all.iter().any(|&s| f(s));
        let revoked = any(|s| s == Self::Revoked);
        let out_of_date =
            any(|s| matches!(s, Self::OutOfDate | Self::OutOfDateConfigurationNeeded));
        let config = any(|s| {
            matches!(
                s,
                Self::ConfigurationNeeded
                    | Self::ConfigurationAndSwHardeningNeeded
                    | Self::OutOfDateConfigurationNeeded
            )
        });
        let sw = any(|s| {
            matches!(
                s,
                Self::SwHardeningNeeded | Self::ConfigurationAndSwHardeningNeeded
            )
        });
        match (revoked, out_of_date, config, sw) {
            (true, ..) => Self::Revoked,
            (false, true, true, _) => Self::OutOfDateConfigurationNeeded,
            (false, true, false, _) => Self::OutOfDate,
            (false, false, true, true) => Self::ConfigurationAndSwHardeningNeeded,
            (false, false, true, false) => Self::ConfigurationNeeded,
            (false, false, false, true) => Self::SwHardeningNeeded,
            (false, false, false, false) => Self::UpToDate,
        }
    }
}

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

/// What the quote says about the TD's TCB and its quoting enclave.
#[derive(Debug, Clone)]
pub struct QuoteTcb<'a> {
    /// TEE_TCB_SVN (16 bytes).
    pub tee_tcb_svn: &'a [u8],
    /// MRSIGNERSEAM (48 bytes).
    pub mr_signer_seam: &'a [u8],
    /// SEAMATTRIBUTES (8 bytes).
    pub seam_attributes: &'a [u8],
    /// The QE report (384 bytes).
    pub qe_report: &'a [u8],
}

/// The outcome of a TCB evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcbEvaluation {
    /// The converged status.
    pub status: TcbStatus,
    /// The platform level's status.
    pub platform: TcbStatus,
    /// The TDX module's status (when the module has an identity of its own).
    pub module: Option<TcbStatus>,
    /// The QE's status.
    pub qe: TcbStatus,
    /// The platform level's date.
    pub tcb_date: String,
    /// Advisories of the matched levels, sorted, once each.
    pub advisory_ids: Vec<String>,
    /// The TCB info's evaluation data number.
    pub evaluation_data_number: u64,
}

// ---- documents --------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TcbInfo {
    id: String,
    version: u32,
    issue_date: String,
    next_update: String,
    fmspc: String,
    pce_id: String,
    tcb_evaluation_data_number: u64,
    #[serde(default)]
    tdx_module: Option<ModuleIdentity>,
    #[serde(default)]
    tdx_module_identities: Vec<ModuleIdentityLevels>,
    tcb_levels: Vec<PlatformLevel>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModuleIdentity {
    mrsigner: String,
    attributes: String,
    attributes_mask: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModuleIdentityLevels {
    id: String,
    mrsigner: String,
    attributes: String,
    attributes_mask: String,
    tcb_levels: Vec<IsvLevel>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PlatformLevel {
    tcb: PlatformTcb,
    tcb_date: String,
    tcb_status: String,
    #[serde(default, rename = "advisoryIDs")]
    advisory_ids: Vec<String>,
}

#[derive(Deserialize)]
struct PlatformTcb {
    sgxtcbcomponents: Vec<Component>,
    pcesvn: u16,
    tdxtcbcomponents: Vec<Component>,
}

#[derive(Deserialize)]
struct Component {
    svn: u8,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IsvLevel {
    tcb: IsvTcb,
    tcb_status: String,
    #[serde(default, rename = "advisoryIDs")]
    advisory_ids: Vec<String>,
}

#[derive(Deserialize)]
struct IsvTcb {
    isvsvn: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnclaveIdentity {
    id: String,
    version: u32,
    issue_date: String,
    next_update: String,
    miscselect: String,
    miscselect_mask: String,
    attributes: String,
    attributes_mask: String,
    mrsigner: String,
    isvprodid: u16,
    tcb_levels: Vec<IsvLevel>,
}

// ---- PCK certificate ---------------------------------------------------------------

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

// ---- signed documents --------------------------------------------------------------

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
fn signed<T: for<'de> Deserialize<'de>>(
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

fn current(which: &str, issue: &str, next: &str, now: SystemTime) -> Result<(), AttestationError> {
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

/// The signing key, after checking its chain to the pinned root at `now`.
fn signing_key(
    chain_pem: &[u8],
    root_der: &[u8],
    now: SystemTime,
) -> Result<p256::ecdsa::VerifyingKey, AttestationError> {
    let chain = super::pem_certificates(chain_pem)?;
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

    #[test]
    fn statuses_converge_keeping_every_need() {
        use TcbStatus::*;
        assert_eq!(TcbStatus::converge(&[UpToDate, UpToDate]), UpToDate);
        assert_eq!(
            TcbStatus::converge(&[ConfigurationNeeded, OutOfDate]),
            OutOfDateConfigurationNeeded
        );
        assert_eq!(
            TcbStatus::converge(&[SwHardeningNeeded, ConfigurationNeeded]),
            ConfigurationAndSwHardeningNeeded
        );
        assert_eq!(TcbStatus::converge(&[UpToDate, Revoked]), Revoked);
        assert_eq!(
            TcbStatus::converge(&[SwHardeningNeeded, UpToDate]),
            SwHardeningNeeded
        );
    }

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
