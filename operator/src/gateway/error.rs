//! The gateway's refusals: [`ApiError`] (status, named [`Reason`], message), answered
//! as JSON `{"reason": "...", "message": "..."}`, and the check of JSON request bodies
//! both of its APIs share ([`json_body`]). Enrolment tokens are checked in
//! `devices/tokens.rs`.
//!
//! A reason's name is on the wire and in the `gateway_refusals_total{reason}` metric
//! label, so [`Reason::as_str`] must never change for an existing reason.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use edgefleet_trust::attestation::service::ServiceError;
use serde_json::json;

use crate::device_status::StatusError;

/// Why the gateway refused a request (the `reason` of its answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The body (or a field of it) is not what the endpoint takes.
    BadRequest,
    /// A new device asked to enrol without a bootstrap token.
    TokenRequired,
    /// The bootstrap token is not known: no token of that id, a wrong secret, or a
    /// malformed token (one answer for all, so that ids cannot be probed).
    UnknownToken,
    /// The bootstrap token is past its expiration time.
    TokenExpired,
    /// The bootstrap token has enrolled as many devices as its usage limit.
    TokenUsedUp,
    /// The bootstrap token does not allow this device name.
    DeviceNameNotAllowed,
    /// A label the device asked for is not under the device-owned prefix.
    LabelNotDeviceOwned,
    /// No EdgeDevice of that name.
    UnknownDevice,
    /// Writing the EdgeDevice's status failed.
    StatusWriteFailed,
    /// The key is not the one the device enrolled with.
    KeyMismatch,
    /// The evidence kind is not one the device enrolled with.
    TeeKindMismatch,
    /// The gateway is shutting down.
    ShuttingDown,
    /// A fault of the gateway's own.
    Internal,
    /// The Kubernetes API failed.
    KubeApi,
    /// A device endpoint was called without a client certificate.
    ClientCertificateRequired,
    /// The client certificate is unparsable or names no device.
    BadClientCertificate,
    /// The client certificate names another device.
    Impersonation,
    /// The device name is enrolled with another key.
    AlreadyEnrolled,
    /// The API server refused the EdgeDevice as invalid.
    Invalid,
    /// An assigned revision's template has not reached the cache yet.
    RevisionPending,
    /// More reports in one batch than [`edgefleet_proto::MAX_BATCH`].
    BatchTooLarge,
    /// An assigned artifact is being mirrored into the store.
    ArtifactFetching,
    /// Mirroring an assigned artifact failed.
    ArtifactMirrorFailed,
    /// An assigned artifact is not in the store and cannot be mirrored.
    ArtifactNotInStore,
    /// The artifact path names no `sha256:<64 lowercase hex>` digest.
    BadDigest,
    /// The artifact is not part of what the device is assigned.
    NotAssigned,
    /// The device is not approved (a model key request).
    NotApproved,
    /// The device's current attestation does not meet the model's requirement.
    NotAttested,
    /// The model does not target the device.
    NotTargeted,
    /// The revision asked a key for is not encrypted.
    NotEncrypted,
    /// A key request's signature is not the certified key's.
    KeyRequestSignatureInvalid,
    /// The Secret holding a model's key is missing or holds no 32-byte key.
    KeySecretUnavailable,
    /// The key Secret does not name the model in its grant annotation.
    KeySecretNotGranted,
    /// The attestation service's own reason ([`ServiceError::reason`]).
    Attestation(&'static str),
}

impl Reason {
    /// The reason's name, as answered and counted.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "BadRequest",
            Self::TokenRequired => "TokenRequired",
            Self::UnknownToken => "UnknownToken",
            Self::TokenExpired => "TokenExpired",
            Self::TokenUsedUp => "TokenUsedUp",
            Self::DeviceNameNotAllowed => "DeviceNameNotAllowed",
            Self::LabelNotDeviceOwned => "LabelNotDeviceOwned",
            Self::UnknownDevice => "UnknownDevice",
            Self::StatusWriteFailed => "StatusWriteFailed",
            Self::KeyMismatch => "KeyMismatch",
            Self::TeeKindMismatch => "TeeKindMismatch",
            Self::ShuttingDown => "ShuttingDown",
            Self::Internal => "Internal",
            Self::KubeApi => "KubeApi",
            Self::ClientCertificateRequired => "ClientCertificateRequired",
            Self::BadClientCertificate => "BadClientCertificate",
            Self::Impersonation => "Impersonation",
            Self::AlreadyEnrolled => "AlreadyEnrolled",
            Self::Invalid => "Invalid",
            Self::RevisionPending => "RevisionPending",
            Self::BatchTooLarge => "BatchTooLarge",
            Self::ArtifactFetching => "ArtifactFetching",
            Self::ArtifactMirrorFailed => "ArtifactMirrorFailed",
            Self::ArtifactNotInStore => "ArtifactNotInStore",
            Self::BadDigest => "BadDigest",
            Self::NotAssigned => "NotAssigned",
            Self::NotApproved => "NotApproved",
            Self::NotAttested => "NotAttested",
            Self::NotTargeted => "NotTargeted",
            Self::NotEncrypted => "NotEncrypted",
            Self::KeyRequestSignatureInvalid => "KeyRequestSignatureInvalid",
            Self::KeySecretUnavailable => "KeySecretUnavailable",
            Self::KeySecretNotGranted => "KeySecretNotGranted",
            Self::Attestation(reason) => reason,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An API error: status code, reason, message.
#[derive(Debug)]
pub struct ApiError(StatusCode, Reason, String);

impl ApiError {
    /// A refusal with `status`, `reason` and `message`.
    pub fn new(status: StatusCode, reason: Reason, message: impl Into<String>) -> Self {
        Self(status, reason, message.into())
    }

    /// A 500 `Internal`: a failure of the gateway itself (I/O, a task that died), not of
    /// the request.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Reason::Internal,
            e.to_string(),
        )
    }

    /// The status code answered.
    pub fn status(&self) -> StatusCode {
        self.0
    }

    /// The named reason.
    pub fn reason(&self) -> Reason {
        self.1
    }

    /// The detail.
    pub fn message(&self) -> &str {
        &self.2
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let reason = self.1.as_str();
        tracing::warn!(reason, message = %self.2, "gateway request rejected");
        (self.0, Json(json!({"reason": reason, "message": self.2}))).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let code = match &e {
            ServiceError::Issue(_) | ServiceError::Policy(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ServiceError::UnknownNonce => StatusCode::UNAUTHORIZED,
            ServiceError::NonceUsed => StatusCode::CONFLICT,
            _ => StatusCode::FORBIDDEN,
        };
        ApiError(code, Reason::Attestation(e.reason()), e.to_string())
    }
}

impl From<StatusError> for ApiError {
    fn from(e: StatusError) -> Self {
        match &e {
            StatusError::UnknownDevice(_) => {
                ApiError(StatusCode::NOT_FOUND, Reason::UnknownDevice, e.to_string())
            }
            StatusError::Kube { .. } | StatusError::Conflict(_) => ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                Reason::StatusWriteFailed,
                e.to_string(),
            ),
        }
    }
}

/// The request body as `T`, or a 400 `BadRequest` naming what is wrong with it.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            Reason::BadRequest,
            format!("request body: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are on the wire and in metric labels: they are the variants' names.
    #[test]
    fn reasons_keep_their_names() {
        for r in [
            Reason::BadRequest,
            Reason::TokenRequired,
            Reason::UnknownToken,
            Reason::TokenExpired,
            Reason::TokenUsedUp,
            Reason::DeviceNameNotAllowed,
            Reason::LabelNotDeviceOwned,
            Reason::UnknownDevice,
            Reason::StatusWriteFailed,
            Reason::KeyMismatch,
            Reason::TeeKindMismatch,
            Reason::ShuttingDown,
            Reason::Internal,
            Reason::KubeApi,
            Reason::ClientCertificateRequired,
            Reason::BadClientCertificate,
            Reason::Impersonation,
            Reason::AlreadyEnrolled,
            Reason::Invalid,
            Reason::RevisionPending,
            Reason::BatchTooLarge,
            Reason::ArtifactFetching,
            Reason::ArtifactMirrorFailed,
            Reason::ArtifactNotInStore,
            Reason::BadDigest,
            Reason::NotAssigned,
            Reason::NotApproved,
            Reason::NotAttested,
            Reason::NotTargeted,
            Reason::NotEncrypted,
            Reason::KeyRequestSignatureInvalid,
            Reason::KeySecretUnavailable,
            Reason::KeySecretNotGranted,
        ] {
            assert_eq!(r.as_str(), format!("{r:?}"));
        }
        assert_eq!(Reason::Attestation("UnknownNonce").as_str(), "UnknownNonce");
    }
}
