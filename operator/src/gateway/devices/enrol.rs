//! `POST /v1/enrol`: a device asks to join the fleet with its name, facts, labels and
//! identity key. A new device needs a bootstrap token (`tokens`), which allows its name
//! and gives it the administrator's labels; one usage of the token is counted. The
//! labels the device asks for itself are stored under the device-owned prefix
//! `device.edgefleet.io/` (any other prefix is refused `LabelNotDeviceOwned`). The
//! gateway creates the EdgeDevice, annotated with the token's id and approved when the
//! [`Approval`] policy says so. Enrolling again with the same key needs no token and is
//! answered from the existing EdgeDevice; another key for the same name is refused.

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

use edgefleet_crds::token::TOKEN_ANNOTATION;
use edgefleet_crds::trust_policy::DEVICE_LABEL_PREFIX;

use super::Fleet;
use crate::gateway::error::{ApiError, Reason, json_body};

/// Who is approved at enrolment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// An administrator sets `spec.approved`.
    Manual,
    /// Devices whose labels at enrolment (the token's, and the device's own under
    /// `device.edgefleet.io/`) include all of these (none: every device).
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

/// Labels from a device's reported facts, under the device-owned prefix (they are what
/// the device says, so no pool may select on them; a model's selector may):
/// `device.edgefleet.io/arch` (`uname -m`), `device.edgefleet.io/memory-gib` (whole
/// GiB, rounded down) and `device.edgefleet.io/accelerator.<name>=true` per
/// accelerator (`nvidia.com/gpu` becomes `accelerator.nvidia.com-gpu`). A value that
/// cannot be a label is left out, never rejected: the facts themselves are kept whole.
pub fn fact_labels(f: &proto::Facts) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut put = |k: String, v: String| {
        if valid_label(&k, &v) {
            labels.insert(k, v);
        }
    };
    put(format!("{DEVICE_LABEL_PREFIX}arch"), f.arch.clone());
    put(
        format!("{DEVICE_LABEL_PREFIX}memory-gib"),
        (f.memory_bytes >> 30).to_string(),
    );
    for a in f.accelerators.iter().take(8) {
        let name: String = a
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        put(
            format!("{DEVICE_LABEL_PREFIX}accelerator.{name}"),
            "true".into(),
        );
    }
    labels
}

/// The labels a device asked for, as stored: bare names and names already under
/// [`DEVICE_LABEL_PREFIX`] go under it; a key with any other prefix is refused
/// (`LabelNotDeviceOwned`), since only administrators set those.
pub fn device_owned_labels(
    asked: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    asked
        .iter()
        .map(|(k, v)| match k.rsplit_once('/') {
            None => Ok((format!("{DEVICE_LABEL_PREFIX}{k}"), v.clone())),
            Some(_) if k.starts_with(DEVICE_LABEL_PREFIX) => Ok((k.clone(), v.clone())),
            Some(_) => Err(format!(
                "label {k}: a device may ask only for bare label names, stored under \
                 {DEVICE_LABEL_PREFIX}; other prefixes are set by administrators (on the \
                 bootstrap token's deviceLabels)"
            )),
        })
        .collect()
}

pub(super) async fn enrol(
    State(fleet): State<Fleet>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<proto::EnrolResponse>, ApiError> {
    let result = enrol_inner(&fleet, &headers, &body).await;
    if let Err(e) = &result {
        fleet.count_refusal(e.reason());
    }
    result
}

/// The answer to a device that is enrolled already. With its own key it needs no token
/// (its token may be used up or deleted by now): the answer tells it its approval and
/// lease. Another key for the name is refused, to the holder of a valid token only.
async fn existing(
    fleet: &Fleet,
    headers: &HeaderMap,
    name: &str,
    fingerprint: &str,
    d: EdgeDevice,
) -> Result<Json<proto::EnrolResponse>, ApiError> {
    if d.spec.facts.agent_key_fingerprint == fingerprint {
        return Ok(Json(proto::EnrolResponse {
            device: name.to_owned(),
            created: false,
            approved: d.spec.approved,
            attestation_lease_seconds: Some(fleet.inner.config.attestation_lease.as_secs()),
        }));
    }
    fleet
        .inner
        .tokens
        .check(&fleet.inner.client, headers, name)
        .await?;
    Err(ApiError::new(
        StatusCode::CONFLICT,
        Reason::AlreadyEnrolled,
        format!("{name} is enrolled with another key; delete the EdgeDevice to enrol it again"),
    ))
}

async fn enrol_inner(
    fleet: &Fleet,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Json<proto::EnrolResponse>, ApiError> {
    let req: proto::EnrolRequest = json_body(body)?;
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
    let client = &fleet.inner.client;
    let api: Api<EdgeDevice> = Api::all(client.clone());
    let kube_err = |e: kube::Error| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::KubeApi,
            e.to_string(),
        )
    };
    // The cache answers for devices enrolled a while ago; a new one costs only the create.
    if let Some(d) = fleet.inner.devices.get(&ObjectRef::new(&req.device)) {
        return existing(fleet, headers, &req.device, &fingerprint, (*d).clone()).await;
    }
    let asked = device_owned_labels(&req.labels)
        .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, Reason::LabelNotDeviceOwned, m))?;
    let admission = fleet
        .inner
        .tokens
        .check(client, headers, &req.device)
        .await?;
    // Written after the check, read before the create: a device enrolled meanwhile (by a
    // request the cache has not seen yet) is answered as enrolled, using no token.
    if let Some(d) = api.get_opt(&req.device).await.map_err(kube_err)? {
        return existing(fleet, headers, &req.device, &fingerprint, d).await;
    }
    let admission = fleet
        .inner
        .tokens
        .consume(client, headers, admission, &req.device)
        .await?;
    // What the device reports of itself is labelled under its own prefix too (so that
    // models can select on it; pools, which grant trust, cannot), over what it asked;
    // the token's labels are the administrator's and win over both.
    let mut labels = asked;
    labels.extend(fact_labels(f));
    labels.extend(admission.labels());
    let approved = fleet.inner.config.approval.approves(&labels);
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
        },
    );
    device.metadata.labels = Some(labels);
    if let Some(id) = admission.id() {
        device.metadata.annotations = Some([(TOKEN_ANNOTATION.to_owned(), id)].into());
    }
    let created = api.create(&PostParams::default(), &device).await;
    if created.is_err() {
        fleet
            .inner
            .tokens
            .give_back(client, &admission, &req.device)
            .await;
    }
    match created {
        Ok(_) => {
            // A new device of an old name: nothing it reported before applies.
            fleet.inner.heartbeats.reported().forget(&req.device);
            tracing::info!(device = %req.device, approved, token = ?admission.id(), "device enrolled");
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
            existing(fleet, headers, &req.device, &fingerprint, d).await
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

    #[test]
    fn facts_are_labelled_under_the_device_prefix_and_unlabelable_ones_left_out() {
        let facts = |arch: &str, accelerators: &[&str]| proto::Facts {
            arch: arch.into(),
            cpu_cores: 4,
            memory_bytes: (8 << 30) + 5,
            accelerators: accelerators.iter().map(|a| (*a).to_owned()).collect(),
            tee_kinds: vec![],
            agent_version: String::new(),
        };
        let l = fact_labels(&facts("x86_64", &["nvidia.com/gpu"]));
        assert_eq!(
            l,
            BTreeMap::from([
                (
                    "device.edgefleet.io/accelerator.nvidia.com-gpu".to_owned(),
                    "true".to_owned()
                ),
                ("device.edgefleet.io/arch".to_owned(), "x86_64".to_owned()),
                ("device.edgefleet.io/memory-gib".to_owned(), "8".to_owned()),
            ])
        );
        // Not a label value (a space), a key ending in a dash, or too long a key: left out.
        let l = fact_labels(&facts("arm 64", &["gpu/", &"a".repeat(80)]));
        assert_eq!(
            l.keys().collect::<Vec<_>>(),
            ["device.edgefleet.io/memory-gib"]
        );
        // Every key is device-owned: no pool can select on a fact.
        assert!(
            fact_labels(&facts("aarch64", &["apple.com/metal"]))
                .keys()
                .all(|k| k.starts_with(DEVICE_LABEL_PREFIX))
        );
    }

    #[test]
    fn a_device_asks_only_for_device_owned_labels() {
        let asked = |pairs: &[(&str, &str)]| {
            device_owned_labels(
                &pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            )
        };
        assert_eq!(
            asked(&[("zone", "front"), ("device.edgefleet.io/gpu", "none")]).unwrap(),
            BTreeMap::from([
                ("device.edgefleet.io/gpu".to_owned(), "none".to_owned()),
                ("device.edgefleet.io/zone".to_owned(), "front".to_owned()),
            ])
        );
        let refused = asked(&[("edgefleet.io/pool", "retail")]).unwrap_err();
        assert!(refused.contains("edgefleet.io/pool"), "{refused}");
        assert!(asked(&[("example.com/x", "y")]).is_err());
        assert!(asked(&[]).unwrap().is_empty());
    }
}
