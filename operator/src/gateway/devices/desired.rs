//! `GET /v1/devices/{name}/desired?version=V&waitSeconds=N`: the device's desired
//! state, derived from every EdgeModel's status ([`crate::rollout::desired`]: the
//! models it is a candidate of, each at the revision its rank gives, resolved through
//! the model's `status.revisions` template), answered at once when it differs from
//! `V`, else held until it changes or `N` seconds pass (304). Only approved devices
//! with an allowed, unexpired attestation of an accepted kind, in a device pool bound
//! to the model's namespace, get models. Every device is told every signer of the
//! EdgeTrustPolicies (`trustedSigners`): an agent with no local pins pins that set at
//! first contact; the signers of each model are those its revision resolved to.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use edgefleet_crds::EdgeDevice;
use edgefleet_crds::EdgeModel;
use edgefleet_crds::device::DesiredModel;
use edgefleet_crds::model::RevisionTemplate;
use edgefleet_proto as proto;
use kube::ResourceExt as _;
use kube::runtime::reflector::ObjectRef;

use super::{Fleet, PeerCertificate};
use crate::gateway::error::{ApiError, Reason};
use crate::metrics::FleetCounters;

impl Fleet {
    /// What `device` runs of each EdgeModel in the cache, derived now.
    pub(super) fn assigned(&self, device: &EdgeDevice) -> Vec<DesiredModel> {
        self.assigned_under(device, &self.inner.policies.policies())
    }

    /// [`Fleet::assigned`] under `policies` (read once by a caller that needs them too).
    fn assigned_under(
        &self,
        device: &EdgeDevice,
        policies: &[edgefleet_crds::EdgeTrustPolicy],
    ) -> Vec<DesiredModel> {
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut pools: std::collections::HashMap<String, Vec<_>> = Default::default();
        let mut assigned = Vec::new();
        for model in self.inner.models.state() {
            let ns = model.namespace().unwrap_or_default();
            let pools = pools.entry(ns).or_insert_with_key(|ns| {
                crate::trust_policy::Grants::new(policies, ns)
                    .pools()
                    .iter()
                    .map(|(_, p)| p.clone())
                    .collect()
            });
            assigned.extend(crate::rollout::desired(&model, device, pools, now));
        }
        assigned.sort_by(|a, b| a.model.cmp(&b.model));
        assigned
    }

    /// The device's desired state now; `Err` while an assigned revision's template has
    /// not reached the cache yet.
    pub(super) fn desired_state(&self, device: &EdgeDevice) -> Result<proto::DesiredState, String> {
        let name = device.name_any();
        let policies = self.inner.policies.policies();
        let mut models = Vec::new();
        for d in self.assigned_under(device, &policies) {
            models.push(self.device_model(&name, &d)?);
        }
        let trusted = crate::trust_policy::all_signers(&policies)
            .iter()
            .map(signer)
            .collect();
        Ok(proto::DesiredState::with_trusted_signers(
            name, models, trusted,
        ))
    }

    /// The EdgeModel (from the cache) whose template `d` names.
    pub(super) fn model_of(&self, d: &DesiredModel) -> Result<Arc<EdgeModel>, String> {
        let (ns, name) = d
            .model
            .split_once('/')
            .ok_or_else(|| format!("bad model key {:?}", d.model))?;
        self.inner
            .models
            .get(&ObjectRef::new(name).within(ns))
            .ok_or_else(|| format!("EdgeModel {} is not in the cache", d.model))
    }

    fn device_model(&self, device: &str, d: &DesiredModel) -> Result<proto::DeviceModel, String> {
        let model = self.model_of(d)?;
        let t: &RevisionTemplate = template_of(&model, d)
            .ok_or_else(|| format!("{} has no template of revision {}", d.model, d.revision))?;
        let (artifact, signature) = match &d.variant {
            Some(v) => {
                let v = t
                    .variants
                    .iter()
                    .find(|x| &x.name == v)
                    .ok_or_else(|| format!("{} has no variant {v}", d.model))?;
                (&v.artifact, &v.signature)
            }
            None => (&t.artifact, &t.signature),
        };
        let art = |a: &edgefleet_crds::Artifact| proto::ArtifactRef {
            digest: a.digest.clone(),
            size_bytes: a.size_bytes.and_then(|b| u64::try_from(b).ok()),
            path: format!("/v1/devices/{device}/artifacts/{}", a.digest),
        };
        let pos = |v: i32| u32::try_from(v).unwrap_or(0);
        Ok(proto::DeviceModel {
            model: d.model.clone(),
            revision: d.revision.clone(),
            variant: d.variant.clone(),
            served_name: t.served_name.clone(),
            artifact: art(artifact),
            bundle: signature.inline.clone().unwrap_or_default(),
            signers: t.signers.iter().map(signer).collect(),
            runtime: proto::Runtime {
                context_size: pos(t.runtime.context_size),
                threads: t.runtime.threads.map(pos),
                gpu_layers: pos(t.runtime.gpu_layers),
                parallel_slots: pos(t.runtime.parallel_slots),
                queue_depth: pos(t.runtime.queue_depth),
            },
            plugins: t
                .plugins
                .iter()
                .map(|p| proto::DevicePlugin {
                    name: p.name.clone(),
                    artifact: art(&p.artifact),
                    bundle: p.signature.inline.clone().unwrap_or_default(),
                    fuel: p.limits.fuel.and_then(|f| u64::try_from(f).ok()),
                    deadline_millis: p.limits.deadline_millis.and_then(|f| u64::try_from(f).ok()),
                    memory_bytes: u64::try_from(p.limits.memory_bytes).unwrap_or(0),
                    config: p.config.clone(),
                    grants: p
                        .grants
                        .as_ref()
                        .map(|g| proto::Grants {
                            env: g.env.clone(),
                            clocks: g.clocks,
                            read_only_dirs: g.read_only_dirs.clone(),
                            network: g.network,
                        })
                        .unwrap_or_default(),
                })
                .collect(),
            port: u16::try_from(t.port).unwrap_or(8080),
            encryption: t.encryption.as_ref().map(|_| proto::ModelEncryption {
                key_path: format!("/v1/devices/{device}/keys"),
            }),
            golden_prompts: t
                .validation
                .iter()
                .flat_map(|v| &v.golden_prompts)
                .map(|g| proto::GoldenPrompt {
                    name: g.name.clone(),
                    prompt: g.prompt.clone(),
                    exact: g.exact.clone(),
                    contains: g.contains.clone(),
                    regex: g.regex.clone(),
                    max_tokens: u32::try_from(g.max_tokens).unwrap_or(1).clamp(1, 256),
                })
                .collect(),
        })
    }
}

/// A signer as devices receive it.
fn signer(s: &edgefleet_crds::TrustedSigner) -> proto::Signer {
    proto::Signer {
        name: s.name.clone(),
        public_key: s.public_key.clone(),
        certificate_root: s.certificate_root.clone(),
        identities: s.identities.clone().unwrap_or_default(),
    }
}

/// The revision template of `model` that `d` names.
pub(super) fn template_of<'a>(
    model: &'a EdgeModel,
    d: &DesiredModel,
) -> Option<&'a RevisionTemplate> {
    model
        .status
        .as_ref()
        .and_then(|s| s.revisions.iter().find(|t| t.revision == d.revision))
}

/// Query of the desired-state long-poll.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredQuery {
    /// The version the device has.
    #[serde(default)]
    version: Option<String>,
    /// Seconds to wait for a change (at most [`proto::MAX_WAIT_SECONDS`]).
    #[serde(default)]
    wait_seconds: Option<u64>,
}

pub(super) async fn desired(
    State(fleet): State<Fleet>,
    Extension(peer): Extension<PeerCertificate>,
    Path(name): Path<String>,
    Query(q): Query<DesiredQuery>,
) -> Result<Response, ApiError> {
    fleet.identify(&peer, &name).await?;
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(q.wait_seconds.unwrap_or(0).min(proto::MAX_WAIT_SECONDS));
    let notify = fleet.notifier(&name);
    let mut models_changed = fleet.inner.models_changed.subscribe();
    let counters = fleet.inner.counters.clone();
    counters.waiting.inc();
    struct Done(Arc<FleetCounters>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.waiting.dec();
        }
    }
    let _done = Done(counters);
    loop {
        // Register for wake-ups before reading, so that no change slips in between.
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        models_changed.borrow_and_update();
        let device = fleet.device(&name).await??;
        match fleet.desired_state(&device) {
            Ok(state) if q.version.as_deref() != Some(state.version.as_str()) => {
                return Ok(Json(state).into_response());
            }
            Ok(_) => {}
            Err(why) if q.version.is_none() => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Reason::RevisionPending,
                    why,
                ));
            }
            Err(why) => tracing::debug!(device = %name, %why, "desired state incomplete; waiting"),
        }
        tokio::select! {
            () = woken => {}
            r = models_changed.changed() => if r.is_err() { break },
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    Ok(StatusCode::NOT_MODIFIED.into_response())
}
