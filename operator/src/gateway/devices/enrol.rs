//! `POST /v1/enrol` (bootstrap token): a device asks to join the fleet with its name,
//! facts, labels and identity key; the gateway creates its EdgeDevice, approved when
//! the [`Approval`] policy says so. Enrolling again with the same key is answered from
//! the existing EdgeDevice; another key for the same name is refused.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use edgefleet_crds::EdgeDevice;
use edgefleet_crds::device::EdgeDeviceSpec;
use edgefleet_proto as proto;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use sha2::Digest as _;

use super::Fleet;
use crate::gateway::error::{ApiError, Reason, authorize, json_body};

/// Who is approved at enrolment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// An administrator sets `spec.approved`.
    Manual,
    /// Devices whose requested labels include all of these (none: every device).
    Auto(BTreeMap<String, String>),
}

impl Approval {
    /// `manual`, `auto`, or `auto:key=value,key=value`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "manual" => Ok(Self::Manual),
            None if s == "auto" => Ok(Self::Auto(BTreeMap::new())),
            Some(("auto", labels)) => {
                let mut want = BTreeMap::new();
                for kv in labels.split(',').filter(|s| !s.is_empty()) {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| format!("{kv:?}: expected key=value"))?;
                    want.insert(k.to_owned(), v.to_owned());
                }
                Ok(Self::Auto(want))
            }
            _ => Err(format!(
                "{s:?}: expected manual, auto or auto:key=value,..."
            )),
        }
    }

    fn approves(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Manual => false,
            Self::Auto(want) => want.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }
}

/// Whether `name` is a DNS-1123 subdomain (what Kubernetes object names must be).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn valid_label(k: &str, v: &str) -> bool {
    let (prefix, name) = k.rsplit_once('/').unwrap_or(("", k));
    let part = |s: &str| {
        s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
    };
    (prefix.is_empty() || valid_name(prefix)) && !name.is_empty() && part(name) && part(v)
}

pub(super) async fn enrol(
    State(fleet): State<Fleet>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<proto::EnrolResponse>, ApiError> {
    authorize(&headers, &fleet.inner.config.bootstrap_token)
        .inspect_err(|e| fleet.count_refusal(e.reason()))?;
    let req: proto::EnrolRequest = json_body(&body)?;
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, Reason::BadRequest, m);
    if !valid_name(&req.device) {
        return Err(bad(format!("{:?} is not a valid device name", req.device)));
    }
    let f = &req.facts;
    if f.arch.is_empty()
        || f.arch.len() > 32
        || !(1..=4096).contains(&f.cpu_cores)
        || f.memory_bytes == 0
    {
        return Err(bad(
            "facts: arch (1-32 chars), cpuCores (1-4096) and memoryBytes (> 0) are required".into(),
        ));
    }
    let mut tee_kinds = Vec::new();
    for t in &f.tee_kinds {
        let kind: edgefleet_crds::TeeKind = serde_json::from_value(json!(t))
            .map_err(|_| bad(format!("facts.teeKinds: unknown kind {t:?}")))?;
        tee_kinds.push(kind);
    }
    if let Some((k, v)) = req.labels.iter().find(|(k, v)| !valid_label(k, v)) {
        return Err(bad(format!(
            "label {k}={v} is not a valid Kubernetes label"
        )));
    }
    let key = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        req.agent_public_key.trim(),
    )
    .map_err(|e| bad(format!("agentPublicKey: {e}")))?;
    use x509_parser::prelude::FromDer as _;
    if x509_parser::x509::SubjectPublicKeyInfo::from_der(&key).is_err() {
        return Err(bad(
            "agentPublicKey is not a DER SubjectPublicKeyInfo".into()
        ));
    }
    let fingerprint = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&key)));
    let api: Api<EdgeDevice> = Api::all(fleet.inner.client.clone());
    let kube_err = |e: kube::Error| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::KubeApi,
            e.to_string(),
        )
    };
    let existing = |d: EdgeDevice| {
        if d.spec.facts.agent_key_fingerprint == fingerprint {
            Ok(Json(proto::EnrolResponse {
                device: req.device.clone(),
                created: false,
                approved: d.spec.approved,
                attestation_lease_seconds: Some(fleet.inner.config.attestation_lease.as_secs()),
            }))
        } else {
            fleet.count_refusal(Reason::AlreadyEnrolled);
            Err(ApiError::new(
                StatusCode::CONFLICT,
                Reason::AlreadyEnrolled,
                format!(
                    "{} is enrolled with another key; delete the EdgeDevice to enrol it again",
                    req.device
                ),
            ))
        }
    };
    // The cache answers for devices enrolled a while ago; a new one costs only the create.
    if let Some(d) = fleet.inner.devices.get(&ObjectRef::new(&req.device)) {
        return existing((*d).clone());
    }
    let approved = fleet.inner.config.approval.approves(&req.labels);
    let mut device = EdgeDevice::new(
        &req.device,
        EdgeDeviceSpec {
            facts: edgefleet_crds::device::DeviceFacts {
                arch: f.arch.clone(),
                cpu_cores: i32::try_from(f.cpu_cores).unwrap_or(i32::MAX),
                memory: Quantity(f.memory_bytes.to_string()),
                accelerators: f.accelerators.iter().take(8).cloned().collect(),
                tee_kinds,
                agent_version: Some(f.agent_version.chars().take(64).collect()),
                agent_key_fingerprint: fingerprint.clone(),
            },
            approved,
            desired_models: vec![],
        },
    );
    device.metadata.labels = Some(req.labels.clone());
    match api.create(&PostParams::default(), &device).await {
        Ok(_) => {
            // A new device of an old name: nothing it reported before applies.
            fleet.inner.heartbeats.reported().forget(&req.device);
            tracing::info!(device = %req.device, approved, "device enrolled");
            Ok(Json(proto::EnrolResponse {
                device: req.device.clone(),
                created: true,
                approved,
                attestation_lease_seconds: Some(fleet.inner.config.attestation_lease.as_secs()),
            }))
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // Enrolled concurrently: the same key is the same device.
            let d = api.get(&req.device).await.map_err(kube_err)?;
            existing(d)
        }
        Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            Reason::Invalid,
            s.message,
        )),
        Err(e) => Err(kube_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approval_policies_parse_and_decide() {
        let labels: BTreeMap<String, String> =
            [("edgefleet.io/pool".to_owned(), "retail".to_owned())].into();
        assert!(!Approval::parse("manual").unwrap().approves(&labels));
        assert!(Approval::parse("auto").unwrap().approves(&labels));
        assert!(
            Approval::parse("auto:edgefleet.io/pool=retail")
                .unwrap()
                .approves(&labels)
        );
        assert!(
            !Approval::parse("auto:edgefleet.io/pool=lab")
                .unwrap()
                .approves(&labels)
        );
        assert!(Approval::parse("sometimes").is_err());
        assert!(Approval::parse("auto:pool").is_err());
    }

    #[test]
    fn names_and_labels_are_checked() {
        assert!(valid_name("store-042"));
        assert!(valid_name("a.b-c"));
        assert!(!valid_name("Store"));
        assert!(!valid_name("-x"));
        assert!(!valid_name("../etc"));
        assert!(!valid_name(""));
        assert!(valid_label("edgefleet.io/pool", "retail"));
        assert!(!valid_label("edgefleet.io/pool", "re tail"));
        assert!(!valid_label("Bad_Prefix/x", "y"));
    }
}
