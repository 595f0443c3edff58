//! Condition types, their [`Status`] values, and reasons, shared by the operator (which
//! writes them) and by tests and tools (which read them). Values are part of the API:
//! do not rename.

/// `EdgeModel` condition: the model serves on enough targeted devices.
pub const AVAILABLE: &str = "Available";
/// `EdgeModel` condition: a rollout is moving devices to the current revision.
pub const PROGRESSING: &str = "Progressing";
/// `EdgeModel` condition: devices failed, or a health gate failed and the rollout stopped.
pub const DEGRADED: &str = "Degraded";
/// `EdgeModel` condition: the artifact signature did not verify against the signers.
pub const SIGNATURE_VERIFIED: &str = "SignatureVerified";

/// `EdgeDevice` condition: the agent heartbeats within its lease.
pub const READY: &str = "Ready";
/// `EdgeDevice` condition: the device's evidence passed the attestation policy and has
/// not lapsed.
pub const ATTESTED: &str = "Attested";
/// `EdgeDevice` condition: an administrator or the approval policy admitted the device.
pub const APPROVED: &str = "Approved";

/// The status of a condition. `Condition.status` is a string in the Kubernetes API;
/// these are its three values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known.
    Unknown,
}

impl Status {
    /// The status as written in `Condition.status`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }

    /// The status written as `s`, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "True" => Some(Self::True),
            "False" => Some(Self::False),
            "Unknown" => Some(Self::Unknown),
            _ => None,
        }
    }
}

impl From<bool> for Status {
    fn from(holds: bool) -> Self {
        if holds { Self::True } else { Self::False }
    }
}

/// Reasons used in conditions and Events.
pub mod reasons {
    /// Nothing has been observed yet.
    pub const PENDING: &str = "Pending";
    /// All targeted devices run the current revision and are healthy.
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    /// A rollout step is in progress.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// The rollout is paused by `spec.rollout.paused`.
    pub const PAUSED: &str = "Paused";
    /// A health gate failed; the rollout was rolled back.
    pub const HEALTH_GATE_FAILED: &str = "HealthGateFailed";
    /// The selector matches no eligible device.
    pub const NO_DEVICES: &str = "NoEligibleDevices";
    /// The model's signature or a digest did not verify.
    pub const SIGNATURE_INVALID: &str = "SignatureInvalid";
    /// The model's signature and every digest verified.
    pub const SIGNATURE_VALID: &str = "SignatureValid";
    /// The device heartbeat lease expired.
    pub const HEARTBEAT_EXPIRED: &str = "HeartbeatExpired";
    /// The device attestation was appraised and allowed.
    pub const ATTESTATION_PASSED: &str = "AttestationPassed";
    /// The device attestation failed verification or policy.
    pub const ATTESTATION_FAILED: &str = "AttestationFailed";
    /// The device attestation is older than its validity.
    pub const ATTESTATION_EXPIRED: &str = "AttestationExpired";
    /// The bundle is given by URI; devices verify it, the operator has not fetched it.
    pub const SIGNATURE_NOT_FETCHED: &str = "SignatureNotFetched";
    /// Devices on a failed revision were moved back to the stable revision.
    pub const ROLLED_BACK: &str = "RolledBack";
    /// A failed revision is rolled out again: an administrator asked
    /// (`edgefleet.io/retry`), or, without rollback, its devices are healthy again.
    pub const RETRYING: &str = "Retrying";
    /// A device stopped qualifying (selector, approval, readiness, attestation, memory)
    /// and lost the model.
    pub const UNASSIGNED: &str = "Unassigned";
    /// Every targeted device serves the model.
    pub const ALL_DEVICES_READY: &str = "AllDevicesReady";
    /// Some targeted devices do not serve the model (yet).
    pub const NOT_ALL_DEVICES_READY: &str = "NotAllDevicesReady";
    /// No gate has failed.
    pub const HEALTHY: &str = "Healthy";
    /// A signer the EdgeModel names is not granted to its namespace by any
    /// EdgeTrustPolicy, or differs from the policy's signer of that name.
    pub const UNTRUSTED_SIGNER: &str = "UntrustedSigner";
    /// A kept revision's signers no longer resolve under the trust policies: its
    /// devices were unassigned (or moved to a revision that still resolves).
    pub const REVISION_WITHDRAWN: &str = "RevisionWithdrawn";
    /// A device refused the model on its own authority (a local refusal such as
    /// `PluginGrantDenied`): it is excluded, and the rollout goes on without it.
    pub const DEVICE_REFUSED: &str = "DeviceRefused";
    /// A golden prompt's `regex` does not compile: the revision is refused.
    pub const GOLDEN_PROMPT_INVALID: &str = "GoldenPromptInvalid";
    /// A device's answer to a golden prompt did not meet its expectation.
    pub const GOLDEN_PROMPT_MISMATCH: &str = "GoldenPromptMismatch";
    /// No device pool that an EdgeTrustPolicy binds to the model's namespace holds a
    /// device the selector matches.
    pub const NO_POOL: &str = "NoDevicePool";
}

#[cfg(test)]
mod tests {
    use super::Status;

    #[test]
    fn statuses_read_back_as_written() {
        for s in [Status::True, Status::False, Status::Unknown] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::from(true), Status::True);
        assert_eq!(Status::from(false), Status::False);
        assert_eq!(Status::parse("true"), None);
    }
}
