//! `edgefleet device reset NAME`: the administrator's re-key of a device whose hardware
//! changed (a replaced mainboard or TPM, a guest reinstalled on another host). It
//! removes the hardware identity the gateway pinned at the first allowed attestation
//! (`status.hardwareIdentity`), conditional on the object being the one it read, so an
//! identity recorded in between is never removed unseen. The next allowed attestation
//! records the hardware it comes from. The agent key stays bound to the name; to enrol
//! a new key under it, delete the EdgeDevice (the device then enrols again with a
//! token).

use anyhow::{Context as _, bail};
use clap::Subcommand;
use edgefleet_crds::EdgeDevice;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// `edgefleet device …`.
#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Forget a device's pinned hardware identity: its next allowed attestation
    /// records the hardware it attests from.
    Reset {
        /// The EdgeDevice's name.
        name: String,
    },
}

/// Runs a `device` command; returns what it prints on stdout.
pub fn run(cmd: DeviceCommand) -> anyhow::Result<String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run_async(cmd))
}

async fn run_async(cmd: DeviceCommand) -> anyhow::Result<String> {
    let api: Api<EdgeDevice> = Api::all(crate::token::client().await?);
    match cmd {
        DeviceCommand::Reset { name } => reset(&api, &name).await,
    }
}

async fn reset(api: &Api<EdgeDevice>, name: &str) -> anyhow::Result<String> {
    let Some(device) = api
        .get_opt(name)
        .await
        .with_context(|| format!("reading EdgeDevice {name}"))?
    else {
        bail!("no EdgeDevice {name}");
    };
    let Some(identity) = device.status.and_then(|s| s.hardware_identity) else {
        bail!("EdgeDevice {name} has no recorded hardware identity: nothing to reset");
    };
    let Some(rv) = device.metadata.resource_version else {
        bail!("EdgeDevice {name} has no resourceVersion");
    };
    // The resourceVersion in a patch is a precondition: 409 if the device changed.
    let patch = json!({
        "metadata": {"resourceVersion": rv},
        "status": {"hardwareIdentity": null},
    });
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            bail!("EdgeDevice {name} changed while it was being reset; read it and run again")
        }
        Err(e) => return Err(e).with_context(|| format!("resetting EdgeDevice {name}")),
    }
    Ok(format!(
        "reset the hardware identity of {name} (was {}); its next allowed attestation \
         records the hardware it attests from",
        serde_json::to_string(&identity)?
    ))
}
