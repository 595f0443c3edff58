//! EdgeDevice status written by the gateway: the latest attestation result and the
//! `Attested` condition, under the `edgefleet-gateway` field manager with server-side
//! apply (conditions are a map keyed by type, so the operator's own conditions stay its
//! own). A lapsed attestation turns `Attested` False, which stops model assignment.
//! The hardware identity is written apart, under a manager of its own
//! ([`crate::device_identity`]).

use edgefleet_crds::conditions::{self, reasons};
use edgefleet_crds::device::EdgeDevice;
use edgefleet_trust::attestation::Claims;
use edgefleet_trust::attestation::policy::Decision;
use edgefleet_trust::attestation::tpm::ClockState;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Field manager of the gateway's status writes.
pub const FIELD_MANAGER: &str = "edgefleet-gateway";
/// Measurements copied into the status (the rest are summarized by their digest).
const MAX_MEASUREMENTS: usize = 8;

/// Errors writing device status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The device is not enrolled.
    #[error("unknown device {0:?}")]
    UnknownDevice(String),
    /// The device changed since it was read (a resourceVersion precondition failed).
    #[error("EdgeDevice {0} changed since it was read")]
    Conflict(String),
    /// The API server refused or failed.
    #[error("writing EdgeDevice {device} status: {source}")]
    Kube {
        /// Device.
        device: String,
        /// Client error.
        #[source]
        source: kube::Error,
    },
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// The `Attested` condition, keeping `lastTransitionTime` when the status is unchanged.
fn attested_condition(
    current: Option<&EdgeDevice>,
    status: bool,
    reason: &str,
    message: &str,
    generation: i64,
    now: OffsetDateTime,
) -> Value {
    let status_str = conditions::Status::from(status).as_str();
    let previous = current.and_then(|d| d.status.as_ref()).and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == conditions::ATTESTED)
    });
    let since = match previous {
        Some(c) if c.status == status_str => {
            serde_json::to_value(&c.last_transition_time).unwrap_or(Value::Null)
        }
        _ => json!(rfc3339(now)),
    };
    json!({
        "type": conditions::ATTESTED,
        "status": status_str,
        "reason": reason,
        "message": message.chars().take(1024).collect::<String>(),
        "observedGeneration": generation,
        "lastTransitionTime": since,
    })
}

/// The ends of an allowed appraisal: of the attestation result, and of the device's
/// attestation lease (how long it may serve without attesting again).
#[derive(Debug, Clone, Copy)]
pub struct Expiries {
    /// When the result lapses unless the device attests again.
    pub result: OffsetDateTime,
    /// When the device must stop serving unless it attests again.
    pub lease: OffsetDateTime,
}

/// A status patch with `condition`, re-asserting the attestation summary this manager
/// already owns so that server-side apply keeps it. Written only on the resourceVersion
/// `device` was read at ([`DeviceStatus::apply_unchanged`]): re-asserting a summary read
/// before a newer attestation landed would put back its older `challengeIssuedMillis`
/// (reopening a used challenge) and its older expiry.
fn with_kept_attestation(device: &EdgeDevice, condition: Value) -> Value {
    let mut status = json!({"conditions": [condition]});
    if let Some(att) = device.status.as_ref().and_then(|s| s.attestation.as_ref())
        && let Ok(v) = serde_json::to_value(att)
    {
        status["attestation"] = v;
    }
    status
}

/// Every EdgeDevice: from `cache` (a watch cache) when given, else listed from the
/// API server.
pub async fn all_devices(
    api: &Api<EdgeDevice>,
    cache: Option<&kube::runtime::reflector::Store<EdgeDevice>>,
) -> Result<Vec<std::sync::Arc<EdgeDevice>>, kube::Error> {
    Ok(match cache {
        Some(cache) => cache.state(),
        None => api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(std::sync::Arc::new)
            .collect(),
    })
}

/// The gateway's view of EdgeDevices.
#[derive(Debug, Clone)]
pub struct DeviceStatus {
    pub(crate) api: Api<EdgeDevice>,
    cache: Option<kube::runtime::reflector::Store<EdgeDevice>>,
}

impl DeviceStatus {
    /// Uses `client`.
    pub fn new(client: kube::Client) -> Self {
        Self {
            api: Api::all(client),
            cache: None,
        }
    }

    /// Sweeps lapsed attestations over `cache` (a watch cache of every EdgeDevice)
    /// instead of listing them from the API server each time: a list of a large fleet
    /// every sweep is what loads the API server most (see BENCHMARKS.md).
    pub fn with_cache(mut self, cache: kube::runtime::reflector::Store<EdgeDevice>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The enrolled device, or [`StatusError::UnknownDevice`].
    pub async fn get(&self, device: &str) -> Result<EdgeDevice, StatusError> {
        match self.api.get_opt(device).await {
            Ok(Some(d)) => Ok(d),
            Ok(None) => Err(StatusError::UnknownDevice(device.to_owned())),
            Err(source) => Err(StatusError::Kube {
                device: device.to_owned(),
                source,
            }),
        }
    }

    /// Records an appraisal: the attestation summary and `Attested`.
    /// `ends`: when the result lapses, and when the device's attestation lease ends
    /// (written only for an allowed appraisal; a denied one keeps the stored end).
    /// `challenge_issued_ms` is recorded on the condition that `device` is unchanged
    /// since it was read (its resourceVersion): a concurrent answer to the same
    /// challenge, on this replica or another, finds [`StatusError::Conflict`].
    /// `result` is the signed attestation result, kept for relying parties.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_decision(
        &self,
        device: &EdgeDevice,
        claims: &Claims,
        decision: &Decision,
        tpm_clock: Option<&ClockState>,
        verified: OffsetDateTime,
        ends: Expiries,
        challenge_issued_ms: u64,
        result: &str,
    ) -> Result<(), StatusError> {
        let Expiries {
            result: expires,
            lease: lease_expires,
        } = ends;
        let generation = device.metadata.generation.unwrap_or(0);
        let measurements: serde_json::Map<String, Value> = claims
            .measurements
            .iter()
            .take(MAX_MEASUREMENTS)
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let message = if decision.allow {
            String::new()
        } else {
            decision.deny.join("; ")
        };
        let (reason, ok) = if decision.allow {
            (reasons::ATTESTATION_PASSED, true)
        } else {
            (reasons::ATTESTATION_FAILED, false)
        };
        // The clock advances only with an allowed quote; otherwise the stored one stays.
        let stored = device
            .status
            .as_ref()
            .and_then(|s| s.attestation.as_ref())
            .and_then(|a| a.tpm_clock);
        let clock = match tpm_clock.filter(|_| decision.allow) {
            Some(c) => Some(json!({
                "clock": i64::try_from(c.clock).unwrap_or(i64::MAX),
                "resetCount": i64::from(c.reset_count),
                "restartCount": i64::from(c.restart_count),
            })),
            None => stored.map(|c| json!(c)),
        };
        let mut status = json!({
            "attestation": {
                "teeKind": claims.tee,
                "allowed": decision.allow,
                "policy": decision.policy,
                "policyHash": decision.policy_hash,
                "measurementsDigest": claims.measurements_digest(),
                "measurements": measurements,
                "verifiedTime": rfc3339(verified),
                "expiryTime": rfc3339(expires),
                "message": message,
                "result": result,
                "resultId": edgefleet_trust::receipt::sha256_hex(result.as_bytes()),
            },
            "conditions": [attested_condition(Some(device), ok, reason, &message, generation, verified)],
        });
        if let Some(clock) = clock {
            status["attestation"]["tpmClock"] = clock;
        }
        // The device may serve until then without attesting again; a denied appraisal
        // renews nothing, so the stored end stays.
        let stored_lease = device
            .status
            .as_ref()
            .and_then(|s| s.attestation.as_ref())
            .and_then(|a| a.lease_expiry_time.as_ref());
        if decision.allow {
            status["attestation"]["leaseExpiryTime"] = json!(rfc3339(lease_expires));
        } else if let Some(t) = stored_lease {
            status["attestation"]["leaseExpiryTime"] = json!(t);
        }
        status["attestation"]["challengeIssuedMillis"] =
            json!(i64::try_from(challenge_issued_ms).unwrap_or(i64::MAX));
        self.apply_unchanged(device, status).await
    }

    /// Applies `status` to `device` only if it still has the resourceVersion it was read
    /// with.
    async fn apply_unchanged(&self, device: &EdgeDevice, status: Value) -> Result<(), StatusError> {
        let name = device.metadata.name.clone().unwrap_or_default();
        let patch = json!({
            "apiVersion": "edgefleet.io/v1alpha1",
            "kind": "EdgeDevice",
            "metadata": {"resourceVersion": device.metadata.resource_version},
            "status": status,
        });
        match self
            .api
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Err(StatusError::Conflict(name)),
            Err(source) => Err(StatusError::Kube {
                device: name,
                source,
            }),
        }
    }

    /// Records evidence that did not verify.
    pub async fn record_failure(
        &self,
        device: &EdgeDevice,
        reason_detail: &str,
        now: OffsetDateTime,
    ) -> Result<(), StatusError> {
        let name = device.metadata.name.clone().unwrap_or_default();
        let generation = device.metadata.generation.unwrap_or(0);
        let cond = attested_condition(
            Some(device),
            false,
            reasons::ATTESTATION_FAILED,
            reason_detail,
            generation,
            now,
        );
        match self
            .apply_unchanged(device, with_kept_attestation(device, cond))
            .await
        {
            // The device changed since it was read (a newer attestation, say): this
            // failure is no longer the latest news about it.
            Err(StatusError::Conflict(_)) => {
                tracing::info!(device = %name, "not recording a failure over a newer status");
                Ok(())
            }
            other => other,
        }
    }

    /// Turns `Attested` False (reason `AttestationExpired`) on every device whose
    /// attestation lapsed before `now`. Returns the devices changed.
    pub async fn lapse_expired(&self, now: OffsetDateTime) -> Result<Vec<String>, StatusError> {
        let devices = all_devices(&self.api, self.cache.as_ref())
            .await
            .map_err(|source| StatusError::Kube {
                device: "*".into(),
                source,
            })?;
        let mut lapsed = Vec::new();
        for device in devices {
            let device = device.as_ref();
            let Some(status) = device.status.as_ref() else {
                continue;
            };
            let Some(att) = status.attestation.as_ref() else {
                continue;
            };
            let attested = status.conditions.iter().any(|c| {
                c.type_ == conditions::ATTESTED
                    && conditions::Status::parse(&c.status) == Some(conditions::Status::True)
            });
            let expiry = serde_json::to_value(&att.expiry_time).ok().and_then(|v| {
                v.as_str()
                    .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
            });
            if attested && expiry.is_some_and(|e| e <= now) {
                let name = device.metadata.name.clone().unwrap_or_default();
                let generation = device.metadata.generation.unwrap_or(0);
                let cond = attested_condition(
                    Some(device),
                    false,
                    reasons::ATTESTATION_EXPIRED,
                    "the device did not re-attest before its attestation lapsed",
                    generation,
                    now,
                );
                match self
                    .apply_unchanged(device, with_kept_attestation(device, cond))
                    .await
                {
                    // Changed since the cache saw it (re-attested just now, say): judged
                    // again at the next sweep.
                    Err(StatusError::Conflict(_)) => continue,
                    other => other?,
                }
                lapsed.push(name);
            }
        }
        Ok(lapsed)
    }
}
