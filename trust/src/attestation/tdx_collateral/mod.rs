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
//!
//! This module holds the collateral, the evaluation's inputs and outcome, and the shapes
//! of the TCB info and QE identity documents. The evaluation itself (steps 3 to 7: TCB
//! level matching, the module and QE identity checks) is in `evaluation`; the signing
//! chain, signatures and dates (steps 1 and 2) in `documents`; the PCK certificate's TCB
//! in `pck`; the statuses in `status`.

mod documents;
mod evaluation;
mod pck;
mod status;

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::AttestationError;

pub use evaluation::evaluate;
pub use pck::{PckTcb, pck_ppid, pck_tcb};
pub use status::TcbStatus;

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
