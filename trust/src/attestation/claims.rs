//! Normalized claims: what every verifier outputs and every policy reads.
//!
//! ```json
//! {
//!   "tee": "sev-snp" | "tdx" | "tpm" | "dev",
//!   "hardware_genuine": true,          // evidence chains to a vendor root (false for dev)
//!   "debug": false,                    // the guest/TD can be debugged by the host
//!   "measurements": { "<name>": "<hex>" },   // launch digest, MRTD/RTMRs, PCRs
//!   "tcb": { "<component>": <number or hex string> },   // TDX adds "fmspc", and
//!                                      // "tcb_status" ("unknown" without Intel's
//!                                      // collateral; with it also "advisory_ids": [..],
//!                                      // "tcb_date", platform/module/QE statuses)
//!   "report_data": "<hex>",            // what the attester bound into the evidence
//!   "key_binding": "<hex>",            // the binding the verifier expected, when checked
//!   "signer": "<hex or name>",         // attesting key identity (chip id, PCK, AK)
//!   "platform": { "<name>": "<value>" }      // further facts: policy bits, product, vmpl,
//!                                      // the TDX PCK certificate's "ppid"
//! }
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Evidence kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TeeKind {
    /// AMD SEV-SNP.
    #[serde(rename = "sev-snp")]
    SevSnp,
    /// Intel TDX.
    #[serde(rename = "tdx")]
    Tdx,
    /// TPM 2.0.
    #[serde(rename = "tpm")]
    Tpm,
    /// Development attester (software key).
    #[serde(rename = "dev")]
    Dev,
}

/// Normalized claims (see the module docs for the JSON shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// Evidence kind.
    pub tee: TeeKind,
    /// The evidence chains to a hardware vendor root.
    pub hardware_genuine: bool,
    /// Debugging of the workload is possible.
    pub debug: bool,
    /// Measurements by name, hex.
    pub measurements: BTreeMap<String, String>,
    /// TCB components.
    pub tcb: BTreeMap<String, serde_json::Value>,
    /// Report data (hex) as the evidence carries it.
    pub report_data: String,
    /// The expected binding (hex), present when the verifier was given one and it matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_binding: Option<String>,
    /// Identity of the attesting key.
    pub signer: String,
    /// Further platform facts.
    pub platform: BTreeMap<String, serde_json::Value>,
}

impl Claims {
    /// SHA-256 over the measurements (name=value lines, sorted), for summaries.
    pub fn measurements_digest(&self) -> String {
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        for (k, v) in &self.measurements {
            h.update(k.as_bytes());
            h.update(b"=");
            h.update(v.as_bytes());
            h.update(b"\n");
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    }
}
