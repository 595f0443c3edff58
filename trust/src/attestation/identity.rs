//! Hardware identity: what pins a device's evidence to one piece of hardware, taken
//! from verified evidence ([`HardwareIdentity::of`]) and compared with the identity
//! recorded at the device's first allowed attestation ([`HardwareIdentity::check`]).
//!
//! What pins each kind:
//!
//! - `tpm`: the SHA-256 of the EK's SubjectPublicKeyInfo (DER), from the EK certificate
//!   that chained to a configured EK CA and whose key activated the credential. The AK
//!   is created afresh by the agent and is not pinned; the EK binds it.
//! - `sev-snp`: the report's CHIP_ID (hex), which the VCEK's hwID certifies. The
//!   reported TCB at enrolment is recorded, not compared (firmware updates raise it).
//!   A guest that masks its chip id (`MASK_CHIP_ID`) reports zeros: every such guest
//!   then has the same chip id, and only the kind is really pinned.
//! - `tdx`: the PCK certificate's PPID (`ppid:<hex>`, per platform), or where the PCK
//!   certificate carries none, the PCK certificate itself (`pck:sha256:<hex>`, which a
//!   TCB recovery changes). The FMSPC is recorded, not compared.
//! - `dev`: the development key's digest is recorded, not compared: the dev attester is
//!   software, proves nothing about hardware, and the agent makes a fresh key each time
//!   it starts. Only the kind is pinned, so a `tpm` device cannot fall back to `dev`.
//!
//! A different kind is always a mismatch.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Claims, TeeKind};

/// The hardware identity of verified evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HardwareIdentity {
    /// Evidence kind.
    pub kind: TeeKind,
    /// TPM: `sha256:<hex>` of the EK's SubjectPublicKeyInfo (DER).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_public_key_digest: Option<String>,
    /// SEV-SNP: CHIP_ID, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chip_id: Option<String>,
    /// SEV-SNP: the reported TCB's components (`bootloader`, `tee`, `snp`, `microcode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcb_at_enrolment: Option<BTreeMap<String, u64>>,
    /// TDX: `ppid:<hex>` from the PCK certificate, or `pck:sha256:<hex>` without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_id: Option<String>,
    /// TDX: the platform's FMSPC, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fmspc: Option<String>,
    /// dev: `sha256:<hex>` of the development key's SubjectPublicKeyInfo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_key_digest: Option<String>,
}

/// Evidence from other hardware than the device's recorded identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "hardware identity differs from the one recorded: {what} is {presented}, recorded {recorded}"
)]
pub struct HardwareMismatch {
    /// What differs (`kind`, `EK`, `chip id`, `platform id`).
    pub what: &'static str,
    /// The recorded value.
    pub recorded: String,
    /// The value in the evidence.
    pub presented: String,
}

impl HardwareMismatch {
    /// Stable name for responses, events and metrics.
    pub fn reason(&self) -> &'static str {
        "HardwareMismatch"
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn claim_str(map: &BTreeMap<String, serde_json::Value>, key: &str) -> Option<String> {
    map.get(key).and_then(|v| v.as_str()).map(str::to_owned)
}

fn tee_name(kind: TeeKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl HardwareIdentity {
    /// The identity of verified evidence: its `claims`, and for TPM evidence the EK's
    /// SubjectPublicKeyInfo that the credential activation proved.
    pub fn of(claims: &Claims, ek_spki: Option<&[u8]>) -> Self {
        let mut id = Self {
            kind: claims.tee,
            ek_public_key_digest: None,
            chip_id: None,
            tcb_at_enrolment: None,
            platform_id: None,
            fmspc: None,
            dev_key_digest: None,
        };
        match claims.tee {
            TeeKind::Tpm => id.ek_public_key_digest = ek_spki.map(sha256_digest),
            TeeKind::SevSnp => {
                id.chip_id = Some(claims.signer.clone());
                id.tcb_at_enrolment = Some(
                    ["bootloader", "tee", "snp", "microcode"]
                        .into_iter()
                        .filter_map(|c| Some((c.to_owned(), claims.tcb.get(c)?.as_u64()?)))
                        .collect(),
                );
            }
            TeeKind::Tdx => {
                id.platform_id = Some(match claim_str(&claims.platform, "ppid") {
                    Some(ppid) => format!("ppid:{ppid}"),
                    None => format!("pck:sha256:{}", claims.signer),
                });
                id.fmspc = claim_str(&claims.tcb, "fmspc");
            }
            TeeKind::Dev => id.dev_key_digest = Some(format!("sha256:{}", claims.signer)),
        }
        id
    }

    /// The identity of a TPM by its EK's SubjectPublicKeyInfo (DER) alone.
    pub fn of_ek(ek_spki: &[u8]) -> Self {
        Self {
            kind: TeeKind::Tpm,
            ek_public_key_digest: Some(sha256_digest(ek_spki)),
            chip_id: None,
            tcb_at_enrolment: None,
            platform_id: None,
            fmspc: None,
            dev_key_digest: None,
        }
    }

    /// Whether `self` (from fresh evidence) is the hardware `recorded` names: the same
    /// kind, and the same EK, chip id or platform id for that kind (see the module docs).
    pub fn check(&self, recorded: &HardwareIdentity) -> Result<(), HardwareMismatch> {
        let differs = |what, r: &Option<String>, p: &Option<String>| HardwareMismatch {
            what,
            recorded: r.clone().unwrap_or_else(|| "nothing".into()),
            presented: p.clone().unwrap_or_else(|| "nothing".into()),
        };
        if self.kind != recorded.kind {
            return Err(HardwareMismatch {
                what: "kind",
                recorded: tee_name(recorded.kind),
                presented: tee_name(self.kind),
            });
        }
        let (what, r, p) = match self.kind {
            TeeKind::Tpm => (
                "EK",
                &recorded.ek_public_key_digest,
                &self.ek_public_key_digest,
            ),
            TeeKind::SevSnp => ("chip id", &recorded.chip_id, &self.chip_id),
            TeeKind::Tdx => ("platform id", &recorded.platform_id, &self.platform_id),
            TeeKind::Dev => return Ok(()),
        };
        if r == p && r.is_some() {
            Ok(())
        } else {
            Err(differs(what, r, p))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(tee: TeeKind, signer: &str) -> Claims {
        Claims {
            tee,
            hardware_genuine: tee != TeeKind::Dev,
            debug: false,
            measurements: BTreeMap::new(),
            tcb: BTreeMap::new(),
            report_data: String::new(),
            key_binding: None,
            signer: signer.into(),
            platform: BTreeMap::new(),
        }
    }

    fn tpm(ek: &[u8]) -> HardwareIdentity {
        HardwareIdentity::of(&claims(TeeKind::Tpm, "ak"), Some(ek))
    }

    fn snp(chip: &str, snp_svn: u64) -> HardwareIdentity {
        let mut c = claims(TeeKind::SevSnp, chip);
        for (k, v) in [
            ("bootloader", 3),
            ("tee", 0),
            ("snp", snp_svn),
            ("microcode", 115),
        ] {
            c.tcb.insert(k.into(), json!(v));
        }
        c.tcb.insert("guest_svn".into(), json!(1));
        HardwareIdentity::of(&c, None)
    }

    #[test]
    fn the_same_tpm_matches_and_another_ek_does_not() {
        let a = tpm(b"EK of TPM A");
        assert_eq!(
            a.ek_public_key_digest.as_deref(),
            Some(sha256_digest(b"EK of TPM A").as_str())
        );
        assert_eq!(tpm(b"EK of TPM A").check(&a), Ok(()));
        let err = tpm(b"EK of TPM B").check(&a).unwrap_err();
        assert_eq!((err.reason(), err.what), ("HardwareMismatch", "EK"));
        assert_eq!(err.recorded, sha256_digest(b"EK of TPM A"));
    }

    #[test]
    fn the_same_chip_matches_whatever_its_tcb_and_another_chip_does_not() {
        let a = snp("aa", 8);
        assert_eq!(a.chip_id.as_deref(), Some("aa"));
        let tcb = a.tcb_at_enrolment.clone().unwrap();
        assert_eq!(tcb.len(), 4, "{tcb:?}");
        assert_eq!(tcb["snp"], 8);
        // A firmware update raises the TCB: the same chip.
        assert_eq!(snp("aa", 9).check(&a), Ok(()));
        let err = snp("bb", 8).check(&a).unwrap_err();
        assert_eq!((err.reason(), err.what), ("HardwareMismatch", "chip id"));
    }

    #[test]
    fn a_kind_change_is_a_mismatch() {
        let a = tpm(b"EK of TPM A");
        let dev = HardwareIdentity::of(&claims(TeeKind::Dev, "00ff"), None);
        assert_eq!(dev.dev_key_digest.as_deref(), Some("sha256:00ff"));
        let err = dev.check(&a).unwrap_err();
        assert_eq!(
            (err.what, err.recorded.as_str(), err.presented.as_str()),
            ("kind", "tpm", "dev")
        );
        assert_eq!(a.check(&dev).unwrap_err().what, "kind");
        assert_eq!(snp("aa", 8).check(&a).unwrap_err().what, "kind");
    }

    #[test]
    fn dev_pins_the_kind_only() {
        let a = HardwareIdentity::of(&claims(TeeKind::Dev, "01"), None);
        let b = HardwareIdentity::of(&claims(TeeKind::Dev, "02"), None);
        assert_eq!(b.check(&a), Ok(()));
    }

    #[test]
    fn tdx_pins_the_ppid_or_else_the_pck_certificate() {
        let mut c = claims(TeeKind::Tdx, "beef");
        c.tcb.insert("fmspc".into(), json!("00906ed50000"));
        let by_pck = HardwareIdentity::of(&c, None);
        assert_eq!(by_pck.platform_id.as_deref(), Some("pck:sha256:beef"));
        assert_eq!(by_pck.fmspc.as_deref(), Some("00906ed50000"));
        c.platform.insert("ppid".into(), json!("0102"));
        let a = HardwareIdentity::of(&c, None);
        assert_eq!(a.platform_id.as_deref(), Some("ppid:0102"));
        c.signer = "another PCK certificate, same platform".into();
        assert_eq!(HardwareIdentity::of(&c, None).check(&a), Ok(()));
        c.platform.insert("ppid".into(), json!("0304"));
        let err = HardwareIdentity::of(&c, None).check(&a).unwrap_err();
        assert_eq!(err.what, "platform id");
    }

    #[test]
    fn a_recorded_identity_without_its_pin_matches_nothing() {
        let mut recorded = tpm(b"EK");
        recorded.ek_public_key_digest = None;
        assert_eq!(tpm(b"EK").check(&recorded).unwrap_err().recorded, "nothing");
        let unpinned = HardwareIdentity::of(&claims(TeeKind::Tpm, "ak"), None);
        assert!(unpinned.check(&recorded).is_err());
    }
}
