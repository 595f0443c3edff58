//! `POST /v1/devices/{name}/keys`: the key broker of encrypted models.
//!
//! A device asks for the key of an encrypted revision it is assigned, with a
//! one-request X25519 public key and its signature over the request by the key its
//! attestation bound (the key its client certificate certifies). The key is released,
//! sealed to that public key by HPKE ([`edgefleet_trust::sealed::release`]), only when
//! every check holds, each refusal named:
//!
//! - the certificate names the device and carries its enrolled key (`identify`);
//! - the model targets the device through what an administrator owns or the
//!   attestation proved, never a label the device chose (its selector, a device pool
//!   bound to the namespace), the device is approved (`NotApproved`), and its current
//!   attestation is allowed, unexpired, under the model's policy and of a kind it
//!   accepts (`NotAttested`); otherwise `NotTargeted`;
//! - it is assigned that revision and artifact now (`NotAssigned`), and the revision
//!   is encrypted (`NotEncrypted`);
//! - the signature verifies (`KeyRequestSignatureInvalid`);
//! - the Secret the revision names grants its key to this model (annotation
//!   `edgefleet.io/edgemodels`, `KeySecretNotGranted`) and holds a 32-byte key
//!   (`KeySecretUnavailable`).
//!
//! Each release is logged, counted (`gateway_key_releases_total`, and
//! `gateway_refusals_total{reason}` for each refusal), published as an event on the
//! EdgeDevice (`KeyReleased`), and added to the EdgeModel's `status.keyReleases` by
//! [`Fleet::flush_key_releases`].

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine as _;
use edgefleet_crds::EdgeModel;
use edgefleet_proto as proto;
use edgefleet_trust::sealed::{self, ModelKey, ReleaseFor};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;

use super::{Fleet, PeerCertificate};
use crate::gateway::error::{ApiError, Reason, json_body};

/// The annotation on a key Secret naming the EdgeModels (of its namespace,
/// comma-separated) whose key it is.
pub const GRANT_ANNOTATION: &str = "edgefleet.io/edgemodels";

/// The field manager of the gateway's `status.keyReleases` writes.
pub const KEY_BROKER_MANAGER: &str = "edgefleet-key-broker";

fn refuse(status: StatusCode, reason: Reason, message: impl Into<String>) -> ApiError {
    ApiError::new(status, reason, message)
}

pub(super) async fn keys(
    State(fleet): State<Fleet>,
    Extension(peer): Extension<PeerCertificate>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<proto::KeyRelease>, ApiError> {
    let device = fleet.identify(&peer, &name).await?;
    let result = fleet.release(&peer, &device, &body).await;
    match &result {
        Ok((model, _)) => {
            fleet.inner.counters.key_releases.inc();
            tracing::info!(device = %name, model = %model, "released a model key");
        }
        Err(e) => {
            fleet.count_refusal(e.reason());
            tracing::warn!(device = %name, reason = e.reason().as_str(), message = %e.message(), "model key refused");
        }
    }
    let (model, release) = result?;
    fleet
        .publish_device_event(
            &device,
            "KeyReleased",
            format!("released the key of {model} to this device, sealed to its request key"),
        )
        .await;
    if let Ok(mut pending) = fleet.inner.key_releases.lock() {
        *pending.entry(model).or_default() += 1;
    }
    Ok(Json(release))
}

impl Fleet {
    /// Checks a key request from `device` and seals the key for it: the model's key
    /// (`namespace/name`) and the release.
    async fn release(
        &self,
        peer: &PeerCertificate,
        device: &edgefleet_crds::EdgeDevice,
        body: &[u8],
    ) -> Result<(String, proto::KeyRelease), ApiError> {
        let req: proto::KeyRequest = json_body(body)?;
        let name = device.name_any();
        let (ns, model_name) = req.model.split_once('/').ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                Reason::BadRequest,
                "model must be namespace/name",
            )
        })?;
        let model: std::sync::Arc<EdgeModel> = self
            .inner
            .models
            .get(&ObjectRef::new(model_name).within(ns))
            .ok_or_else(|| {
                refuse(
                    StatusCode::FORBIDDEN,
                    Reason::NotAssigned,
                    format!("no EdgeModel {}", req.model),
                )
            })?;
        // Targeting, approval and the current attestation, named.
        let policies = self.inner.policies.policies();
        let pools: Vec<_> = crate::trust_policy::Grants::new(&policies, ns)
            .pools()
            .iter()
            .map(|(_, p)| p.clone())
            .collect();
        let now = k8s_openapi::jiff::Timestamp::now();
        let selector: kube::core::Selector =
            model.spec.selector.clone().try_into().map_err(|_| {
                refuse(
                    StatusCode::FORBIDDEN,
                    Reason::NotTargeted,
                    format!("{}'s selector does not parse", req.model),
                )
            })?;
        let pool_selectors: Vec<kube::core::Selector> = pools
            .iter()
            .filter_map(|p| p.clone().try_into().ok())
            .collect();
        if let Err(why) =
            crate::rollout::select::candidate(&model.spec, &selector, &pool_selectors, device, now)
        {
            use crate::rollout::select::Excluded;
            let (reason, message) = match why {
                Excluded::NotApproved => (Reason::NotApproved, format!("{name} is not approved")),
                Excluded::NotAttested(why) => {
                    (Reason::NotAttested, format!("{name}'s attestation: {why}"))
                }
                other => (
                    Reason::NotTargeted,
                    format!("{} does not target {name}: {other:?}", req.model),
                ),
            };
            return Err(refuse(StatusCode::FORBIDDEN, reason, message));
        }
        // Assigned that revision and that artifact now.
        let desired = crate::rollout::desired(&model, device, &pools, now)
            .filter(|d| d.revision == req.revision);
        let template = desired.as_ref().and_then(|d| {
            let t = super::desired::template_of(&model, d)?;
            let artifact = match &d.variant {
                Some(v) => &t.variants.iter().find(|x| &x.name == v)?.artifact,
                None => &t.artifact,
            };
            (artifact.digest == req.digest).then_some(t)
        });
        let Some(template) = template else {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                Reason::NotAssigned,
                format!(
                    "{name} is not assigned revision {} with artifact {}",
                    req.revision, req.digest
                ),
            ));
        };
        let Some(encryption) = &template.encryption else {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                Reason::NotEncrypted,
                format!(
                    "revision {} of {} is not encrypted",
                    req.revision, req.model
                ),
            ));
        };
        // Signed by the attested key, for this request key.
        let b64 = base64::engine::general_purpose::STANDARD;
        let bad_request = |what: &str| {
            refuse(
                StatusCode::BAD_REQUEST,
                Reason::BadRequest,
                format!("{what} is not base64"),
            )
        };
        let recipient = b64
            .decode(&req.recipient)
            .map_err(|_| bad_request("recipient"))?;
        let signature = b64
            .decode(&req.signature)
            .map_err(|_| bad_request("signature"))?;
        if recipient.len() != 32 {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                Reason::BadRequest,
                "recipient must be a 32-byte X25519 public key",
            ));
        }
        let what = ReleaseFor {
            device: &name,
            model: &req.model,
            revision: &req.revision,
            digest: &req.digest,
        };
        verify_request(
            peer,
            &sealed::key_request_message(&what, &recipient),
            &signature,
        )?;
        // The key, from the Secret the revision names, when the Secret grants it to
        // this model.
        let key = self
            .model_key(ns, model_name, &encryption.key_secret_ref)
            .await?;
        let (enc, wrapped) = sealed::release(&recipient, &what, &key).map_err(|e| {
            refuse(
                StatusCode::BAD_REQUEST,
                Reason::BadRequest,
                format!("recipient: {e}"),
            )
        })?;
        Ok((
            req.model.clone(),
            proto::KeyRelease {
                suite: sealed::KEY_RELEASE_SUITE.into(),
                encapsulated_key: b64.encode(enc),
                wrapped_key: b64.encode(wrapped),
            },
        ))
    }

    /// The 32-byte key in `secret` of namespace `ns`, for EdgeModel `model`: the
    /// Secret must name the model in its [`GRANT_ANNOTATION`]. Whoever may write
    /// EdgeModels in a namespace may name any Secret there; only whoever may write the
    /// Secret decides which models its key serves (`KeySecretNotGranted`), so a model
    /// cannot borrow another team's key to have its ciphertext decrypted on devices
    /// the key's owner never chose.
    async fn model_key(
        &self,
        ns: &str,
        model: &str,
        secret: &edgefleet_crds::model::KeySecretRef,
    ) -> Result<ModelKey, ApiError> {
        let unavailable = |why: String| {
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                Reason::KeySecretUnavailable,
                format!("Secret {ns}/{}: {why}", secret.name),
            )
        };
        let api: Api<Secret> = Api::namespaced(self.inner.client.clone(), ns);
        let s = api
            .get_opt(&secret.name)
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .ok_or_else(|| unavailable("not found".into()))?;
        let granted = s
            .annotations()
            .get(GRANT_ANNOTATION)
            .is_some_and(|v| v.split(',').any(|m| m.trim() == model));
        if !granted {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                Reason::KeySecretNotGranted,
                format!(
                    "Secret {ns}/{} does not grant its key to EdgeModel {model} (annotation {GRANT_ANNOTATION})",
                    secret.name
                ),
            ));
        }
        let bytes = s
            .data
            .as_ref()
            .and_then(|d| d.get(&secret.key))
            .ok_or_else(|| unavailable(format!("no data key {:?}", secret.key)))?;
        ModelKey::from_bytes(&bytes.0).map_err(|e| unavailable(e.to_string()))
    }

    /// Adds the releases counted since the last call to each EdgeModel's
    /// `status.keyReleases` (read, then a merge patch conditional on the read's
    /// resourceVersion, so that replicas never overwrite each other's counts); a count
    /// that is not written stays for the next call.
    pub async fn flush_key_releases(&self) {
        let pending: Vec<(String, u64)> = match self.inner.key_releases.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => return,
        };
        for (model, n) in pending {
            if let Err(e) = self.add_key_releases(&model, n).await {
                tracing::debug!(model = %model, error = %e, "keyReleases not written yet");
                if let Ok(mut p) = self.inner.key_releases.lock() {
                    *p.entry(model).or_default() += n;
                }
            }
        }
    }

    async fn add_key_releases(&self, model: &str, n: u64) -> Result<(), kube::Error> {
        let Some((ns, name)) = model.split_once('/') else {
            return Ok(());
        };
        let api: Api<EdgeModel> = Api::namespaced(self.inner.client.clone(), ns);
        let Some(m) = api.get_opt(name).await? else {
            return Ok(());
        };
        let before = m.status.as_ref().and_then(|s| s.key_releases).unwrap_or(0);
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": m.resource_version()},
            "status": {"keyReleases": before.saturating_add(i64::try_from(n).unwrap_or(i64::MAX))},
        });
        api.patch_status(
            name,
            &PatchParams {
                field_manager: Some(KEY_BROKER_MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Merge(&patch),
        )
        .await?;
        Ok(())
    }
}

/// Checks `signature` (ECDSA P-256 SHA-256, DER) over `message` with the key the
/// connection's client certificate certifies (the device's attested key).
fn verify_request(
    peer: &PeerCertificate,
    message: &[u8],
    signature: &[u8],
) -> Result<(), ApiError> {
    let invalid = |why: &str| {
        refuse(
            StatusCode::FORBIDDEN,
            Reason::KeyRequestSignatureInvalid,
            why.to_owned(),
        )
    };
    let der = peer
        .0
        .as_ref()
        .ok_or_else(|| invalid("no client certificate"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| invalid("unparsable client certificate"))?;
    let point = &cert.public_key().subject_public_key.data;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, point)
        .verify(message, signature)
        .map_err(|_| invalid("the signature is not the certified key's over this request"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use super::*;

    /// A self-signed certificate for a fresh key, as the connection would carry it.
    fn certified() -> (PeerCertificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["dev-1".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (
            PeerCertificate(Some(std::sync::Arc::new(cert.der().to_vec())), None),
            key,
        )
    }

    #[test]
    fn only_the_certified_keys_signature_over_this_request_verifies() {
        let (peer, key) = certified();
        let what = ReleaseFor {
            device: "dev-1",
            model: "ns/m",
            revision: "r1",
            digest: "sha256:ab",
        };
        let message = sealed::key_request_message(&what, &[7; 32]);
        let sig = rcgen::SigningKey::sign(&key, &message).unwrap();
        assert!(verify_request(&peer, &message, &sig).is_ok());
        // Another recipient key, another key's signature, garbage, no certificate.
        let other = sealed::key_request_message(&what, &[8; 32]);
        let e = verify_request(&peer, &other, &sig).unwrap_err();
        assert_eq!(e.reason(), Reason::KeyRequestSignatureInvalid);
        let (_, stranger) = certified();
        let forged = rcgen::SigningKey::sign(&stranger, &message).unwrap();
        assert_eq!(
            verify_request(&peer, &message, &forged)
                .unwrap_err()
                .reason(),
            Reason::KeyRequestSignatureInvalid
        );
        assert!(verify_request(&peer, &message, b"not a signature").is_err());
        let none = PeerCertificate(None, None);
        assert_eq!(
            verify_request(&none, &message, &sig).unwrap_err().reason(),
            Reason::KeyRequestSignatureInvalid
        );
    }
}
