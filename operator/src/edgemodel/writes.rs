//! What the EdgeModel reconciler writes: each device's assignment of a model (one
//! entry of `EdgeDevice.spec.desiredModels`, applied with server-side apply under a
//! field manager of the model's own), the EdgeModel status (server-side apply under
//! [`STATUS_MANAGER`], only when it changed), and the plan's Events.

use edgefleet_crds::device::DesiredModel;
use edgefleet_crds::{EdgeDevice, EdgeModel, EdgeModelStatus};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::STATUS_MANAGER;
use crate::rollout;

/// The field manager that owns `model`'s entries in devices' `desiredModels`.
pub fn assignment_manager(model: &EdgeModel) -> String {
    // Field managers are at most 128 bytes; namespace and name are at most 63 + 253.
    let key = rollout::model_key(model);
    if key.len() <= 100 {
        format!("edgefleet-em/{key}")
    } else {
        use sha2::Digest as _;
        format!(
            "edgefleet-em/{}",
            hex::encode(&sha2::Sha256::digest(key.as_bytes())[..16])
        )
    }
}

/// Applies (or, with `None`, removes) `model`'s entry in `device`'s desiredModels;
/// returns the device as written.
pub async fn assign(
    client: &Client,
    manager: &str,
    device: &str,
    desired: Option<&DesiredModel>,
) -> Result<EdgeDevice, kube::Error> {
    let api: Api<EdgeDevice> = Api::all(client.clone());
    let entries: Vec<&DesiredModel> = desired.into_iter().collect();
    let patch = json!({
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeDevice",
        "metadata": {"name": device},
        "spec": {"desiredModels": entries},
    });
    api.patch(device, &PatchParams::apply(manager), &Patch::Apply(&patch))
        .await
}

/// Writes `status` as `model`'s status, unless the model already has it (no no-op
/// patches).
pub(super) async fn write_status(
    client: &Client,
    model: &EdgeModel,
    status: &EdgeModelStatus,
) -> Result<(), kube::Error> {
    if model.status.as_ref() != Some(status) {
        let api: Api<EdgeModel> =
            Api::namespaced(client.clone(), &model.namespace().unwrap_or_default());
        let patch = json!({
            "apiVersion": "edgefleet.io/v1alpha1",
            "kind": "EdgeModel",
            "status": status,
        });
        api.patch_status(
            &model.name_any(),
            &PatchParams::apply(STATUS_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(())
}

/// Publishes `events` on `model` (notes cut to 1024 characters); a failure is logged,
/// not returned.
pub(super) async fn publish(recorder: &Recorder, model: &EdgeModel, events: &[rollout::Event]) {
    let reference = model.object_ref(&());
    for (kind, reason, note) in events {
        let ev = Event {
            type_: *kind,
            reason: (*reason).to_owned(),
            note: Some(note.chars().take(1024).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %e, "publishing an event");
        }
    }
}
