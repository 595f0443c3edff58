//! What the EdgeModel reconciler writes: the EdgeModel status (server-side apply under
//! [`STATUS_MANAGER`], only when it changed), and the plan's Events.

use edgefleet_crds::{EdgeModel, EdgeModelStatus};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::STATUS_MANAGER;
use crate::rollout;

/// Writes `status` as `model`'s status, unless the model already has it (no no-op
/// patches).
pub(super) async fn write_status(
    client: &Client,
    model: &EdgeModel,
    status: &EdgeModelStatus,
) -> Result<(), kube::Error> {
    // `keyReleases` is the gateways' (under their own field manager): neither
    // compared nor applied here, so that the reconciler never writes back a count it
    // read before a gateway added to it.
    let mut status = status.clone();
    status.key_releases = None;
    let status = &status;
    let mut current = model.status.clone();
    if let Some(c) = current.as_mut() {
        c.key_releases = None;
    }
    if current.as_ref() != Some(status) {
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
