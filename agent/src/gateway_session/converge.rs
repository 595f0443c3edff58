//! Bringing the device to its desired state: [`FleetAgent::converge`] on each new
//! desired state, [`FleetAgent::restore`] of the last-known-good model at start, and the
//! fleet's activation of one model: fetch (or find on disk), verify against the desired
//! state's signers and digests, then the shared [`crate::activation`] steps, then
//! record it as last-known-good. Each step is reported as the model's state.

use std::path::PathBuf;
use std::time::Duration;

use edgefleet_proto as proto;
use sha2::Digest as _;

use super::download::fetch;
use super::{DeviceClient, FleetAgent};
use crate::activation::store::{self, artifacts_dir};
use crate::activation::{self, ActivateError, trust_policy, verify_file};

impl FleetAgent {
    /// Serves the last-known-good model, if one is recorded and still verifies.
    pub async fn restore(&self) {
        let Some(m) = store::last_known_good(self.state_dir()).await else {
            return;
        };
        tracing::info!(model = %m.model, revision = %m.revision, "restoring the last-known-good model");
        match self.activate(None, &m).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(model = %m.model, error = %e, "the last-known-good model does not load");
                self.set_model_state(&m, proto::ModelState::Failed, Some(e.to_string()), None);
            }
        }
    }

    /// Fetches (when `client` is given; otherwise only from disk), verifies, loads and
    /// serves `m`, then records it as last-known-good.
    async fn activate(
        &self,
        client: Option<&DeviceClient>,
        m: &proto::DeviceModel,
    ) -> Result<(), ActivateError> {
        let dir = artifacts_dir(self.state_dir());
        let policy = trust_policy(&m.signers)?;
        let get = |a: proto::ArtifactRef| {
            let dir = dir.clone();
            async move {
                match client {
                    Some(c) => fetch(c, &a, &dir).await,
                    None => store::stored(&a, &dir).await,
                }
            }
        };
        self.set_model_state(m, proto::ModelState::Downloading, None, None);
        let model_file = get(m.artifact.clone()).await?;
        let mut plugin_files = Vec::new();
        for p in &m.plugins {
            plugin_files.push(get(p.artifact.clone()).await?);
        }
        self.set_model_state(m, proto::ModelState::Verifying, None, None);
        {
            let (f, b, d, pol) = (
                model_file.clone(),
                m.bundle.clone(),
                m.artifact.digest.clone(),
                policy.clone(),
            );
            tokio::task::spawn_blocking(move || verify_file(&f, &b, &pol, &d))
                .await
                .map_err(|e| ActivateError::State(e.to_string()))??;
        }
        let mut specs = Vec::new();
        for (p, file) in m.plugins.iter().zip(&plugin_files) {
            let wasm = tokio::fs::read(file)
                .await
                .map_err(|e| ActivateError::State(format!("{}: {e}", file.display())))?;
            // The bytes compiled are the bytes verified.
            let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&wasm)));
            if digest != p.artifact.digest {
                return Err(ActivateError::Digest(format!(
                    "plugin {} changed on disk",
                    p.name
                )));
            }
            let (f, b, d, pol) = (
                file.clone(),
                p.bundle.clone(),
                p.artifact.digest.clone(),
                policy.clone(),
            );
            tokio::task::spawn_blocking(move || verify_file(&f, &b, &pol, &d))
                .await
                .map_err(|e| ActivateError::State(e.to_string()))?
                .map_err(|e| ActivateError::Plugin(format!("{}: {e}", p.name)))?;
            specs.push(crate::plugins::PluginSpec {
                wasm,
                name: p.name.clone(),
                limits: crate::plugins::Limits {
                    fuel: p.fuel,
                    deadline: p.deadline_millis.map(Duration::from_millis),
                    memory_bytes: p.memory_bytes,
                },
                config: p.config.clone(),
                grants: crate::plugins::Grants {
                    env: p.grants.env.clone(),
                    clocks: p.grants.clocks,
                    read_only_dirs: p
                        .grants
                        .read_only_dirs
                        .iter()
                        .map(|d| (PathBuf::from(d), d.clone()))
                        .collect(),
                    network: p.grants.network,
                },
            });
        }
        self.set_model_state(m, proto::ModelState::Loading, None, None);
        let prepared = activation::prepare(specs, self.config.fleet.plugin_cache.as_deref())?;
        let serve = &self.config.serve;
        let threads = m
            .runtime
            .threads
            .or((serve.threads > 0).then_some(serve.threads));
        let config = crate::engine::EngineConfig {
            model_path: model_file,
            served_name: m.served_name.clone(),
            context_size: m.runtime.context_size.max(128),
            threads: threads.map_or_else(activation::default_threads, |t| {
                i32::try_from(t).unwrap_or(1)
            }),
            gpu_layers: m.runtime.gpu_layers,
            parallel_slots: usize::try_from(m.runtime.parallel_slots.max(1)).unwrap_or(1),
            queue_depth: usize::try_from(m.runtime.queue_depth.max(1)).unwrap_or(1),
        };
        let engine = prepared.serve(&self.serving, config).await?;
        let load_millis = engine.load_millis();
        store::record_last_known_good(self.state_dir(), m).await?;
        *self.active.lock().await = Some(m.clone());
        self.set_model_state(m, proto::ModelState::Ready, None, Some(load_millis));
        crate::systemd::status(&format!(
            "serving {} revision {}",
            m.served_name, m.revision
        ));
        tracing::info!(model = %m.model, revision = %m.revision, load_ms = load_millis, "serving");
        Ok(())
    }

    /// Brings the device to `desired`. Nothing restarts when it already runs it.
    pub async fn converge(&self, client: &DeviceClient, desired: &proto::DesiredState) {
        let current = self.active.lock().await.clone();
        let Some(want) = desired.models.first() else {
            if let Some(c) = current {
                tracing::info!(model = %c.model, "unassigned; unloading");
                self.serving.uninstall();
                store::forget_last_known_good(self.state_dir()).await;
                *self.active.lock().await = None;
                crate::systemd::status("serving no model");
            }
            self.set_models(vec![]);
            return;
        };
        if desired.models.len() > 1 {
            tracing::warn!(
                count = desired.models.len(),
                "this agent serves one model at a time; the first is served"
            );
        }
        if current.as_ref() == Some(want) {
            // Already running it (for example moved back after a failed revision): say
            // so again, without reloading.
            self.set_model_state(want, proto::ModelState::Ready, None, None);
            return;
        }
        tracing::info!(model = %want.model, revision = %want.revision, "activating");
        if let Err(e) = self.activate(Some(client), want).await {
            tracing::warn!(model = %want.model, revision = %want.revision, error = %e, "activation failed; serving what was served before");
            self.set_model_state(want, proto::ModelState::Failed, Some(e.to_string()), None);
        }
    }
}
