//! Bringing the device to its desired state: [`FleetAgent::converge`] on each new
//! desired state, [`FleetAgent::restore`] of the last-known-good model at start (only
//! within the recorded attestation lease), and the
//! fleet's activation of one model: check its plugins' grants against the device
//! owner's allowlist and narrow its signers to the device's own trust roots
//! ([`crate::activation::pins`]; both before anything is downloaded), fetch (or find on
//! disk), verify against those signers and the digests, then the shared
//! [`crate::activation`] steps, then record it as last-known-good. Each step is
//! reported as the model's state; a refused grant fails the model with
//! `PluginGrantDenied: <plugin>: <grant>: <why>`, a signer the device does not hold with
//! `UntrustedSigner: …` (both local refusals: the operator excludes only this device).
//! An unpinned device pins the desired state's `trustedSigners` at first contact.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_proto as proto;
use sha2::Digest as _;

use super::download::fetch;
use super::{DeviceClient, FleetAgent};
use crate::activation::store::{self, artifacts_dir};
use crate::activation::{self, ActivateError, GrantPolicy, trust_policy, verify_file};
use crate::plugins::Grants;

/// The grants a desired plugin asks for, as the sandbox takes them (each directory is
/// seen by the plugin at the path it was asked for).
fn asked_grants(p: &proto::DevicePlugin) -> Grants {
    Grants {
        env: p.grants.env.clone(),
        clocks: p.grants.clocks,
        read_only_dirs: p
            .grants
            .read_only_dirs
            .iter()
            .map(|d| (PathBuf::from(d), d.clone()))
            .collect(),
        network: p.grants.network,
    }
}

impl FleetAgent {
    /// Serves the last-known-good model, if one is recorded and still verifies.
    pub async fn restore(&self) {
        let Some(m) = store::last_known_good(self.state_dir()).await else {
            return;
        };
        if self.lease_expired() {
            tracing::warn!(model = %m.model, revision = %m.revision, reason = super::LEASE_EXPIRED, "{}: the last-known-good model is not served before the next successful attestation", super::LEASE_EXPIRED);
            self.set_model_state(
                &m,
                proto::ModelState::Failed,
                Some(format!(
                    "{}: no successful attestation within the attestation lease",
                    super::LEASE_EXPIRED
                )),
                None,
            );
            return;
        }
        if m.encryption.is_some() {
            // Its key is in memory only: gone with the process that held it.
            tracing::info!(model = %m.model, revision = %m.revision, "the last-known-good model is encrypted: it is served once the gateway releases its key again, after attestation");
            return;
        }
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
        // The device owner's consent first: a refused grant downloads nothing.
        let grants = GrantPolicy::for_device(&self.config);
        for p in &m.plugins {
            if let Err(e) = grants.check(&p.name, &asked_grants(p)) {
                tracing::warn!(plugin = %e.plugin, grant = %e.grant, why = %e.why, "PluginGrantDenied: refusing the plugin");
                return Err(e.into());
            }
        }
        // The device's own roots next: the gateway's signers narrowed to what it pins.
        let signers = self
            .pins
            .lock()
            .await
            .intersect(&m.signers)
            .inspect_err(|e| {
                tracing::warn!(model = %m.model, revision = %m.revision, "{e}");
            })?;
        let dir = artifacts_dir(self.state_dir());
        let policy = trust_policy(&signers)?;
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
        // An encrypted model: its key from the gateway, the plaintext into memory only.
        let encrypted = {
            let f = model_file.clone();
            tokio::task::spawn_blocking(move || activation::decrypt::is_encrypted(&f))
                .await
                .unwrap_or(false)
        };
        // The file says what it is before any key is asked for.
        if encrypted != m.encryption.is_some() {
            return Err(ActivateError::Encryption(if encrypted {
                "EncryptionMismatch: the artifact is encrypted and the revision names no key".into()
            } else {
                "EncryptionMismatch: the revision names a key and the artifact is not encrypted"
                    .into()
            }));
        }
        let plaintext = match (&m.encryption, client) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ActivateError::Encryption(
                    "KeyNeeded: an encrypted model is served only with a key the gateway released"
                        .into(),
                ));
            }
            (Some(e), Some(c)) => Some(self.decrypt(c, m, &e.key_path, &model_file).await?),
        };
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
                grants: asked_grants(p),
            });
        }
        self.set_model_state(m, proto::ModelState::Loading, None, None);
        let prepared =
            activation::prepare(specs, self.config.fleet.plugin_cache.as_deref(), &grants)?;
        let serve = &self.config.serve;
        let threads = m
            .runtime
            .threads
            .or((serve.threads > 0).then_some(serve.threads));
        let config = crate::engine::EngineConfig {
            model_path: plaintext.as_ref().map_or(model_file, |p| p.path()),
            served_name: m.served_name.clone(),
            context_size: m.runtime.context_size.max(128),
            threads: threads.map_or_else(activation::default_threads, |t| {
                i32::try_from(t).unwrap_or(1)
            }),
            gpu_layers: m.runtime.gpu_layers,
            parallel_slots: usize::try_from(m.runtime.parallel_slots.max(1)).unwrap_or(1),
            queue_depth: usize::try_from(m.runtime.queue_depth.max(1)).unwrap_or(1),
            plaintext,
            provenance: Some(edgefleet_trust::receipt::Provenance {
                model: edgefleet_trust::receipt::ModelClaim {
                    name: m.model.clone(),
                    revision: m.revision.clone(),
                    digest: m.artifact.digest.clone(),
                },
                plugins: m
                    .plugins
                    .iter()
                    .map(|p| edgefleet_trust::receipt::PluginClaim {
                        name: p.name.clone(),
                        digest: p.artifact.digest.clone(),
                    })
                    .collect(),
            }),
        };
        let loaded = prepared.load(config).await?;
        // Before any client's request and before Ready: the revision's golden prompts.
        // Not again when restoring the last-known-good at start (`client` is `None`):
        // it answered them before it was recorded, and serving it must not wait.
        let golden = if m.golden_prompts.is_empty() || client.is_none() {
            Vec::new()
        } else {
            let answers = crate::golden::run(loaded.engine(), &m.golden_prompts).await?;
            // The revision's serving counters count clients' requests only.
            loaded.engine().stats().reset();
            tracing::info!(model = %m.model, revision = %m.revision, prompts = answers.len(), "golden prompts answered as expected");
            answers
        };
        let engine = loaded.install(&self.serving);
        if let Ok(mut served) = self.served.lock() {
            *served = Some((engine.clone(), m.model.clone(), m.revision.clone()));
        }
        let load_millis = engine.load_millis();
        store::record_last_known_good(self.state_dir(), m).await?;
        let previous = store::previous(self.state_dir()).await;
        self.collect_artifacts(m, previous.as_ref()).await;
        *self.active.lock().await = Some(m.clone());
        if let Ok(mut r) = self.ready_report.lock() {
            *r = Some((m.revision.clone(), golden.clone(), Some(load_millis)));
        }
        self.report_model(m, proto::ModelState::Ready, None, Some(load_millis), golden);
        crate::systemd::status(&format!(
            "serving {} revision {}",
            m.served_name, m.revision
        ));
        tracing::info!(model = %m.model, revision = %m.revision, load_ms = load_millis, "serving");
        Ok(())
    }

    /// Gets the key of encrypted model `m` from the gateway (at `key_path`), sealed
    /// to a key made for this request and signed with the attested key, and decrypts
    /// the verified `file` into a sealed memfd with it.
    async fn decrypt(
        &self,
        client: &DeviceClient,
        m: &proto::DeviceModel,
        key_path: &str,
        file: &std::path::Path,
    ) -> Result<Arc<edgefleet_secmem::SealedModel>, ActivateError> {
        use base64::Engine as _;
        use edgefleet_trust::sealed::{self, Recipient, ReleaseFor};
        let b64 = base64::engine::general_purpose::STANDARD;
        let device = self.config.device.name.clone();
        let what = ReleaseFor {
            device: &device,
            model: &m.model,
            revision: &m.revision,
            digest: &m.artifact.digest,
        };
        let recipient = Recipient::generate();
        let message = sealed::key_request_message(&what, &recipient.public_key());
        let agent_key = crate::enrol::agent_key(self.state_dir())
            .map_err(|e| ActivateError::State(format!("the agent key: {e}")))?;
        let signature = rcgen::SigningKey::sign(&agent_key, &message)
            .map_err(|e| ActivateError::State(format!("signing the key request: {e}")))?;
        let release = client
            .key(
                key_path,
                &proto::KeyRequest {
                    model: m.model.clone(),
                    revision: m.revision.clone(),
                    digest: m.artifact.digest.clone(),
                    recipient: b64.encode(recipient.public_key()),
                    signature: b64.encode(signature),
                },
            )
            .await
            .map_err(|e| match e {
                crate::gateway_client::GatewayError::Rejected {
                    reason, message, ..
                } => ActivateError::Encryption(format!("KeyDenied: {reason}: {message}")),
                other => ActivateError::Encryption(format!("KeyDenied: {other}")),
            })?;
        if release.suite != sealed::KEY_RELEASE_SUITE {
            return Err(ActivateError::Encryption(format!(
                "KeyReleaseInvalid: suite {:?}",
                release.suite
            )));
        }
        let decode = |what: &str, v: &str| {
            b64.decode(v).map_err(|_| {
                ActivateError::Encryption(format!("KeyReleaseInvalid: {what} is not base64"))
            })
        };
        let enc = decode("encapsulatedKey", &release.encapsulated_key)?;
        let wrapped = decode("wrappedKey", &release.wrapped_key)?;
        let key = recipient
            .open(&what, &enc, &wrapped)
            .map_err(|e| ActivateError::Encryption(format!("{}: {e}", e.reason())))?;
        let held = activation::decrypt::hold(&key)?;
        drop(key);
        tracing::info!(model = %m.model, revision = %m.revision, "model key released; decrypting into memory");
        let file = file.to_path_buf();
        tokio::task::spawn_blocking(move || activation::decrypt::decrypt(&file, &held))
            .await
            .map_err(|e| ActivateError::State(e.to_string()))?
    }

    /// Frees the artifact store of what neither `served` nor `previous` (the
    /// last-known-good before it, to roll back to without a download) needs, within
    /// `fleet.artifacts_budget_bytes`.
    async fn collect_artifacts(
        &self,
        served: &proto::DeviceModel,
        previous: Option<&proto::DeviceModel>,
    ) {
        let keep: std::collections::HashSet<String> = store::needed_by(served)
            .into_iter()
            .chain(previous.map(store::needed_by).unwrap_or_default())
            .collect();
        let dir = artifacts_dir(self.state_dir());
        let budget = self.config.fleet.artifacts_budget_bytes;
        match tokio::task::spawn_blocking(move || {
            store::collect_garbage(&dir, &keep, budget, std::time::Duration::ZERO)
        })
        .await
        {
            Ok(Ok(c)) if !c.removed.is_empty() => {
                tracing::info!(
                    removed = c.removed.len(),
                    freed_bytes = c.freed,
                    left_bytes = c.left,
                    "artifacts no revision needs were removed"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "collecting unneeded artifacts"),
            Err(e) => tracing::warn!(error = %e, "collecting unneeded artifacts"),
        }
    }

    /// Brings the device to `desired`. Nothing restarts when it already runs it.
    pub async fn converge(&self, client: &DeviceClient, desired: &proto::DesiredState) {
        // An unpinned device pins the cluster's set the first time it sees one.
        if let Err(e) = self
            .pins
            .lock()
            .await
            .pin_first_use(&desired.trusted_signers)
            .await
        {
            tracing::error!(error = %e, "pinning the cluster's signers at first use");
        }
        let mut current = self.active.lock().await.clone();
        // What this device serves must still be vouched for by the cluster, whether or
        // not it is what the gateway assigns: a revision kept after the device refused
        // its successor, or restored as last-known-good, stops being served once the
        // cluster trusts none of its signers (the signer was removed from every
        // EdgeTrustPolicy). An empty set (no policy, or a gateway that sends none) is
        // left to the gateway's unassignment.
        if let Some(c) = current.as_ref().filter(|c| {
            !desired.trusted_signers.is_empty()
                && !crate::activation::pins::still_trusted(&c.signers, &desired.trusted_signers)
        }) {
            tracing::warn!(
                model = %c.model,
                revision = %c.revision,
                "SignerWithdrawn: the cluster trusts none of the served revision's signers any more; unloading it"
            );
            self.serving.uninstall();
            store::forget_last_known_good(self.state_dir()).await;
            *self.active.lock().await = None;
            crate::systemd::status("serving no model");
            current = None;
        }
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
            // Already running it (for example moved back after a failed revision, or a
            // new session): say so again, without reloading, with the answers and load
            // time it reported when it loaded it.
            let (golden, load_millis) = self
                .ready_report
                .lock()
                .ok()
                .and_then(|r| r.clone())
                .filter(|(rev, _, _)| *rev == want.revision)
                .map(|(_, g, l)| (g, l))
                .unwrap_or_default();
            self.report_model(want, proto::ModelState::Ready, None, load_millis, golden);
            return;
        }
        tracing::info!(model = %want.model, revision = %want.revision, "activating");
        if let Err(e) = self.activate(Some(client), want).await {
            tracing::warn!(model = %want.model, revision = %want.revision, error = %e, "activation failed; serving what was served before");
            self.set_model_state(want, proto::ModelState::Failed, Some(e.to_string()), None);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::serve::Serving;

    /// A recorded model whose one plugin asks for `grants`; its artifacts are not on
    /// disk, so anything past the grant check would fail with another reason.
    fn model_asking(grants: serde_json::Value) -> proto::DeviceModel {
        let art =
            serde_json::json!({ "digest": format!("sha256:{}", "0".repeat(64)), "path": "x" });
        serde_json::from_value(serde_json::json!({
            "model": "retail/smollm2", "revision": "r1", "servedName": "smollm2",
            "artifact": art, "bundle": "{}", "signers": [],
            "runtime": { "contextSize": 512, "gpuLayers": 0, "parallelSlots": 1, "queueDepth": 1 },
            "plugins": [{ "name": "exfiltrate", "artifact": art, "bundle": "{}",
                          "memoryBytes": 1048576, "grants": grants }],
            "port": 8080,
        }))
        .unwrap()
    }

    async fn restored(allow: &str, grants: serde_json::Value) -> proto::ModelReport {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(
            d.path().join("agent.toml"),
            format!(
                "state_dir = \"{}\"\n[device]\nname = \"till-1\"\n[gateway]\nurl = \"https://gw:8443\"\n[plugins]\n{allow}\n",
                state.display()
            ),
        )
        .unwrap();
        let config = crate::config::load(d.path(), Vec::new()).unwrap();
        let m = model_asking(grants);
        store::record_last_known_good(&state, &m).await.unwrap();
        use crate::gateway_session::lease::{Lease, record, unix_now};
        record(&state, &Lease::granted(unix_now(), 600)).unwrap();
        let agent = FleetAgent::new(config, Serving::new()).unwrap();
        agent.restore().await;
        let models = agent.shared.lock().unwrap().models.clone();
        models.into_iter().next().unwrap()
    }

    #[tokio::test]
    async fn a_grant_the_owner_did_not_allow_fails_the_model_with_its_reason() {
        let canary = tempfile::tempdir().unwrap();
        let dir = canary.path().display().to_string();
        let r = restored(
            "",
            serde_json::json!({ "readOnlyDirs": [dir], "network": true }),
        )
        .await;
        assert_eq!(r.state, proto::ModelState::Failed);
        let msg = r.message.unwrap();
        assert!(
            msg.starts_with("PluginGrantDenied: exfiltrate: network:"),
            "{msg}"
        );

        let r = restored(
            "allow_network = true",
            serde_json::json!({ "readOnlyDirs": ["/etc"], "network": true }),
        )
        .await;
        let msg = r.message.unwrap();
        assert!(
            msg.starts_with("PluginGrantDenied: exfiltrate: readOnlyDirs /etc:"),
            "{msg}"
        );

        // Allowed: the grant check passes and activation goes on to the (missing)
        // artifacts, failing for that reason instead.
        let r = restored(
            &format!("allow_network = true\nallow_read_dirs = [\"{dir}\"]"),
            serde_json::json!({ "readOnlyDirs": [dir], "network": true }),
        )
        .await;
        assert_eq!(r.state, proto::ModelState::Failed);
        let msg = r.message.unwrap();
        assert!(!msg.contains("PluginGrantDenied"), "{msg}");
    }

    const KEY_A: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEapxR2CK3oM+d9JePZz6HpWSsy77H\np0UQGha2jnt32/VjZs3dx3aUJOVxUVZKiAgs71XBzOUCkRsKcVMqkUlT/w==\n-----END PUBLIC KEY-----\n";
    const KEY_B: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEWqep+ntKqtGvIlvRREqF3VzddSes\nwKrO9gjU/JC4q1NFJgMrxSyyOOcuNvqo8R93bXPuV7uKd0mR/f0ZWzLTOw==\n-----END PUBLIC KEY-----\n";

    fn key_signer(name: &str, pem: &str) -> proto::Signer {
        serde_json::from_value(serde_json::json!({ "name": name, "publicKey": pem })).unwrap()
    }

    /// A revision this device serves although the gateway no longer assigns it (the
    /// device refused its successor): kept while the cluster trusts one of its signers,
    /// unloaded (and forgotten as last-known-good) once it trusts none.
    #[tokio::test]
    async fn a_served_revision_whose_signers_the_cluster_dropped_is_unloaded() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(
            d.path().join("agent.toml"),
            format!(
                "state_dir = \"{}\"\n[device]\nname = \"till-1\"\n[gateway]\nurl = \"https://gw:8443\"\n",
                state.display()
            ),
        )
        .unwrap();
        let config = crate::config::load(d.path(), Vec::new()).unwrap();
        let agent = FleetAgent::new(config, Serving::new()).unwrap();
        let mut served = model_asking(serde_json::json!({}));
        served.plugins.clear();
        served.signers = vec![key_signer("models-team", KEY_A)];
        store::record_last_known_good(&state, &served)
            .await
            .unwrap();
        *agent.active.lock().await = Some(served.clone());
        // Its successor asks for a grant this device does not allow: refused locally,
        // before anything is fetched (the client is never used).
        let mut successor = model_asking(serde_json::json!({ "network": true }));
        successor.revision = "r2".into();
        successor.signers = served.signers.clone();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["till-1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let client = DeviceClient::new(
            "https://127.0.0.1:9",
            cert.pem().as_bytes(),
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            "till-1",
            std::time::Duration::from_secs(1),
        )
        .unwrap();
        let desired = |trusted: Vec<proto::Signer>| {
            proto::DesiredState::with_trusted_signers(
                "till-1".into(),
                vec![successor.clone()],
                trusted,
            )
        };

        // The cluster still trusts its key (under another name, beside another key):
        // the device refuses r2 and keeps serving r1.
        agent
            .converge(
                &client,
                &desired(vec![key_signer("b", KEY_B), key_signer("renamed", KEY_A)]),
            )
            .await;
        assert_eq!(agent.active.lock().await.as_ref(), Some(&served));
        let r2 = agent.shared.lock().unwrap().models.clone();
        assert_eq!(r2.len(), 1);
        assert_eq!(r2[0].reason.as_deref(), Some("PluginGrantDenied"));
        assert!(store::last_known_good(&state).await.is_some());

        // The key is removed from every policy: r1 is unloaded and forgotten.
        agent
            .converge(&client, &desired(vec![key_signer("other", KEY_B)]))
            .await;
        assert_eq!(agent.active.lock().await.as_ref(), None);
        assert!(
            store::last_known_good(&state).await.is_none(),
            "forgotten as last-known-good"
        );
    }
}
