//! The device's hardware identity in its EdgeDevice status (`status.hardwareIdentity`),
//! which pins its evidence to one TPM (EK), SEV-SNP chip or TDX platform:
//!
//! - [`recorded`] reads it, [`check`] compares fresh evidence with it (a different kind
//!   or key is `HardwareMismatch`);
//! - [`DeviceStatus::pin_hardware_identity`] records it at the device's first allowed
//!   attestation (trust on first use), under its own field manager
//!   ([`IDENTITY_MANAGER`]) so that the gateway's other status writes never drop it,
//!   with the device's `resourceVersion` as precondition, so that of two replicas or two
//!   racing requests only the first writes (the CRD also refuses to change a recorded
//!   identity); the loser reads the winner's identity and is compared with it.
//!
//! Re-keying is an administrator's act: removing `status.hardwareIdentity` (or deleting
//! the EdgeDevice); see docs/fleet.md.

use edgefleet_crds::device::{EdgeDevice, SnpTcb};
use edgefleet_trust::attestation::identity::{HardwareIdentity, HardwareMismatch};
use kube::api::{Patch, PatchParams};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::device_status::{DeviceStatus, StatusError};

/// Field manager of `status.hardwareIdentity`.
pub const IDENTITY_MANAGER: &str = "edgefleet-gateway-identity";
/// Writes tried when other writes to the device keep moving its `resourceVersion`.
const MAX_TRIES: usize = 5;

/// What [`DeviceStatus::pin_hardware_identity`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pinned {
    /// This call recorded the identity.
    Recorded,
    /// An identity was recorded already (by an earlier or a racing writer).
    Existing(HardwareIdentity),
}

fn tee(kind: edgefleet_crds::TeeKind) -> Option<edgefleet_trust::attestation::TeeKind> {
    serde_json::from_value(json!(kind)).ok()
}

/// The hardware identity recorded in `device`'s status, if any.
pub fn recorded(device: &EdgeDevice) -> Option<HardwareIdentity> {
    let r = device.status.as_ref()?.hardware_identity.as_ref()?;
    Some(HardwareIdentity {
        kind: tee(r.kind)?,
        ek_public_key_digest: r.ek_public_key_digest.clone(),
        chip_id: r.chip_id.clone(),
        tcb_at_enrolment: r.tcb_at_enrolment.map(|t| {
            [
                ("bootloader", t.bootloader),
                ("tee", t.tee),
                ("snp", t.snp),
                ("microcode", t.microcode),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), u64::try_from(v).unwrap_or(0)))
            .collect()
        }),
        platform_id: r.platform_id.clone(),
        fmspc: r.fmspc.clone(),
        dev_key_digest: r.dev_key_digest.clone(),
    })
}

/// Compares `presented` (from fresh evidence) with the identity recorded on `device`;
/// a device without one passes (it is recorded when its evidence is allowed).
pub fn check(device: &EdgeDevice, presented: &HardwareIdentity) -> Result<(), HardwareMismatch> {
    match recorded(device) {
        Some(r) => presented.check(&r),
        None => Ok(()),
    }
}

/// `identity` as the status field, recorded at `now`.
pub fn status_value(identity: &HardwareIdentity, now: OffsetDateTime) -> serde_json::Value {
    let component = |name: &str| {
        identity
            .tcb_at_enrolment
            .as_ref()
            .and_then(|t| t.get(name))
            .and_then(|v| i32::try_from(*v).ok())
            .unwrap_or(0)
    };
    let tcb = identity.tcb_at_enrolment.as_ref().map(|_| SnpTcb {
        bootloader: component("bootloader"),
        tee: component("tee"),
        snp: component("snp"),
        microcode: component("microcode"),
    });
    let mut v = json!({
        "kind": identity.kind,
        "recordedTime": now.format(&Rfc3339).unwrap_or_default(),
    });
    for (key, value) in [
        ("ekPublicKeyDigest", &identity.ek_public_key_digest),
        ("chipId", &identity.chip_id),
        ("platformId", &identity.platform_id),
        ("fmspc", &identity.fmspc),
        ("devKeyDigest", &identity.dev_key_digest),
    ] {
        if let Some(value) = value {
            v[key] = json!(value);
        }
    }
    if let Some(tcb) = tcb {
        v["tcbAtEnrolment"] = json!(tcb);
    }
    v
}

impl DeviceStatus {
    /// Records `identity` as `device`'s hardware identity unless one is recorded already,
    /// with the `resourceVersion` last read as precondition: when another write came
    /// first, the device is read again and, if it now has an identity, that one is
    /// returned ([`Pinned::Existing`]) for the caller to compare.
    pub async fn pin_hardware_identity(
        &self,
        device: &EdgeDevice,
        identity: &HardwareIdentity,
        now: OffsetDateTime,
    ) -> Result<Pinned, StatusError> {
        let name = device.metadata.name.clone().unwrap_or_default();
        let mut current = device.clone();
        let mut last = None;
        for _ in 0..MAX_TRIES {
            if let Some(existing) = recorded(&current) {
                return Ok(Pinned::Existing(existing));
            }
            let patch = json!({
                "apiVersion": "edgefleet.io/v1alpha1",
                "kind": "EdgeDevice",
                "metadata": {"name": name, "resourceVersion": current.metadata.resource_version},
                "status": {"hardwareIdentity": status_value(identity, now)},
            });
            match self
                .api
                .patch_status(
                    &name,
                    &PatchParams::apply(IDENTITY_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => return Ok(Pinned::Recorded),
                // 409: the device changed since it was read; 422: the CRD refused to
                // change an identity recorded meanwhile. Either way: read it again.
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 422 => {
                    last = Some(kube::Error::Api(s));
                    current = self.get(&name).await?;
                }
                Err(source) => {
                    return Err(StatusError::Kube {
                        device: name,
                        source,
                    });
                }
            }
        }
        match (recorded(&current), last) {
            (Some(existing), _) => Ok(Pinned::Existing(existing)),
            (None, Some(source)) => Err(StatusError::Kube {
                device: name,
                source,
            }),
            (None, None) => Err(StatusError::UnknownDevice(name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_trust::attestation::identity::sha256_digest;
    use edgefleet_trust::attestation::{Claims, TeeKind};
    use std::collections::BTreeMap;

    fn device_with(status: Option<serde_json::Value>) -> EdgeDevice {
        let mut d: EdgeDevice = serde_json::from_value(json!({
            "apiVersion": "edgefleet.io/v1alpha1",
            "kind": "EdgeDevice",
            "metadata": {"name": "till-1"},
            "spec": {"facts": {"arch": "x86_64", "cpuCores": 2, "memory": "1Gi",
                "agentKeyFingerprint": format!("sha256:{}", "a".repeat(64))}},
        }))
        .unwrap();
        if let Some(s) = status {
            d.status = Some(serde_json::from_value(json!({"hardwareIdentity": s})).unwrap());
        }
        d
    }

    fn claims(tee: TeeKind, signer: &str) -> Claims {
        Claims {
            tee,
            hardware_genuine: true,
            debug: false,
            measurements: BTreeMap::new(),
            tcb: [
                ("bootloader", 3),
                ("tee", 0),
                ("snp", 8),
                ("microcode", 115),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), json!(v)))
            .collect(),
            report_data: String::new(),
            key_binding: None,
            signer: signer.into(),
            platform: BTreeMap::new(),
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    /// What the gateway writes reads back as the same identity, and matches itself.
    #[test]
    fn a_recorded_identity_reads_back_and_matches_the_same_hardware() {
        for (kind, ek) in [
            (TeeKind::Tpm, Some(&b"EK A"[..])),
            (TeeKind::SevSnp, None),
            (TeeKind::Tdx, None),
            (TeeKind::Dev, None),
        ] {
            let id = HardwareIdentity::of(&claims(kind, "aabb"), ek);
            let d = device_with(Some(status_value(&id, now())));
            let back = recorded(&d).unwrap();
            assert_eq!(back, id, "{kind:?}");
            assert_eq!(check(&d, &id), Ok(()));
        }
        let tpm = device_with(Some(status_value(
            &HardwareIdentity::of(&claims(TeeKind::Tpm, "ak"), Some(b"EK A")),
            now(),
        )));
        let s = tpm.status.unwrap().hardware_identity.unwrap();
        assert_eq!(
            s.ek_public_key_digest.as_deref(),
            Some(sha256_digest(b"EK A").as_str())
        );
        assert_eq!(s.recorded_time.0.to_string(), "2027-01-15T08:00:00Z");
    }

    #[test]
    fn another_ek_another_chip_or_another_kind_is_a_mismatch() {
        let tpm_a = HardwareIdentity::of(&claims(TeeKind::Tpm, "ak"), Some(b"EK A"));
        let d = device_with(Some(status_value(&tpm_a, now())));
        let tpm_b = HardwareIdentity::of(&claims(TeeKind::Tpm, "ak"), Some(b"EK B"));
        let err = check(&d, &tpm_b).unwrap_err();
        assert_eq!((err.reason(), err.what), ("HardwareMismatch", "EK"));
        let dev = HardwareIdentity::of(&claims(TeeKind::Dev, "00"), None);
        assert_eq!(check(&d, &dev).unwrap_err().what, "kind");

        let chip_a = HardwareIdentity::of(&claims(TeeKind::SevSnp, "aa"), None);
        let d = device_with(Some(status_value(&chip_a, now())));
        let chip_b = HardwareIdentity::of(&claims(TeeKind::SevSnp, "bb"), None);
        assert_eq!(check(&d, &chip_b).unwrap_err().what, "chip id");
        assert_eq!(check(&d, &chip_a), Ok(()));
    }

    #[test]
    fn a_device_without_an_identity_accepts_any_hardware() {
        let d = device_with(None);
        assert_eq!(recorded(&d), None);
        let any = HardwareIdentity::of(&claims(TeeKind::Tpm, "ak"), Some(b"EK"));
        assert_eq!(check(&d, &any), Ok(()));
    }
}
