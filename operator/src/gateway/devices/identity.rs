//! Who a device request may act as: the connection's client certificate
//! ([`PeerCertificate`]) must name the device of the path and carry the key the
//! EdgeDevice enrolled with; anything else is refused by name, logged and counted.

use std::sync::Arc;

use axum::http::StatusCode;
use edgefleet_crds::EdgeDevice;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use sha2::Digest as _;

use super::Fleet;
use crate::gateway::error::{ApiError, Reason};

/// The client certificate of a connection (leaf, DER), put into each request by the
/// TLS accept loop, with the connection's slot in the gateway's connection table (a
/// request identified as a device claims the connection for it).
#[derive(Debug, Clone, Default)]
pub struct PeerCertificate(
    pub Option<Arc<Vec<u8>>>,
    pub Option<Arc<crate::gateway::connections::Slot>>,
);

impl Fleet {
    /// The device a request may act as, after checking its certificate against `name`.
    pub(super) async fn identify(
        &self,
        peer: &PeerCertificate,
        name: &str,
    ) -> Result<Arc<EdgeDevice>, ApiError> {
        // The certificate first: anonymous or foreign requests cost no API call.
        let result = match Self::certified_key(peer, name) {
            Ok(fingerprint) => match self.device(name).await {
                Ok(Ok(device)) if device.spec.facts.agent_key_fingerprint == fingerprint => {
                    if let Some(slot) = &peer.1 {
                        slot.claim(name);
                    }
                    Ok(device)
                }
                Ok(Ok(_)) => Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    Reason::KeyMismatch,
                    format!("the certificate's key is not the one {name} enrolled with"),
                )),
                Ok(Err(e)) | Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.count_refusal(e.reason());
            let (reason, message) = (e.reason().as_str(), e.message());
            tracing::warn!(device = name, reason, %message, "device request refused");
        }
        result
    }

    /// The EdgeDevice from the watch cache, or (when the cache has not seen it yet, as
    /// right after enrolment) from the API server.
    pub(super) async fn device(
        &self,
        name: &str,
    ) -> Result<Result<Arc<EdgeDevice>, ApiError>, ApiError> {
        if let Some(d) = self.inner.devices.get(&ObjectRef::new(name)) {
            return Ok(Ok(d));
        }
        let api: Api<EdgeDevice> = Api::all(self.inner.client.clone());
        match api.get_opt(name).await {
            Ok(Some(d)) => Ok(Ok(Arc::new(d))),
            Ok(None) => Ok(Err(ApiError::new(
                StatusCode::NOT_FOUND,
                Reason::UnknownDevice,
                format!("no EdgeDevice {name:?}"),
            ))),
            Err(e) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Reason::KubeApi,
                e.to_string(),
            )),
        }
    }

    /// Checks that the client certificate names `name`; returns its key's fingerprint.
    fn certified_key(peer: &PeerCertificate, name: &str) -> Result<String, ApiError> {
        let der = peer.0.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                Reason::ClientCertificateRequired,
                "device endpoints need the client certificate issued at attestation",
            )
        })?;
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                Reason::BadClientCertificate,
                format!("unparsable client certificate: {e}"),
            )
        })?;
        let named = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|g| match g {
                    x509_parser::extensions::GeneralName::URI(u) => {
                        u.strip_prefix("edgefleet://device/").map(str::to_owned)
                    }
                    _ => None,
                })
            })
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    Reason::BadClientCertificate,
                    "the client certificate names no device",
                )
            })?;
        if named != name {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                Reason::Impersonation,
                format!("the certificate of {named:?} may not act as {name:?}"),
            ));
        }
        Ok(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(cert.public_key().raw))
        ))
    }
}
