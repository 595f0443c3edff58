//! Standalone serving (`edgefleet-agent serve`): one model, and optionally a plugin
//! chain, from local files, with no operator or gateway. The files are checked against
//! a local public key (or, with `--allow-unsigned`, not at all), then put into service
//! through the same [`crate::activation`] steps the fleet agent takes.
//!
//! Plugins here get no grants (there are no flags for them), and pass the same consent
//! check as in fleet mode with an empty allowlist and the standard deny list (plus the
//! plugin cache): a device that needs grants for its plugins runs in fleet mode with
//! an `agent.toml` `[plugins]` allowlist.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use edgefleet_trust::model_signing::{PublicKey, TrustPolicy};

use crate::activation;
use crate::plugins::{Limits, PluginSpec};
use crate::serve::Serving;

/// The options of `edgefleet-agent serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// The GGUF model file. Without one the agent serves no model (`/readyz` answers
    /// 503 "no model"): a device waiting for its first assignment.
    #[arg(long, env = "EDGEFLEET_MODEL")]
    pub model: Option<PathBuf>,
    /// OpenSSF model-signing bundle for the model; verified before loading.
    #[arg(long, requires = "public_key")]
    pub bundle: Option<PathBuf>,
    /// PEM public key the bundle must be signed with.
    #[arg(long)]
    pub public_key: Option<PathBuf>,
    /// Load the model without a signature (development only).
    #[arg(long, conflicts_with = "bundle")]
    pub allow_unsigned: bool,
    /// Model id on the API (default: the file name without extension).
    #[arg(long)]
    pub served_name: Option<String>,
    /// Listen address.
    #[arg(long, env = "EDGEFLEET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Context window per slot, in tokens.
    #[arg(long, default_value_t = 2048)]
    pub context_size: u32,
    /// CPU threads per slot (default: one fewer than the available cores, at least one,
    /// so that serving does not preempt llama.cpp's threads; see BENCHMARKS.md).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Layers offloaded to a GPU.
    #[arg(long, default_value_t = 0)]
    pub gpu_layers: u32,
    /// Requests decoded concurrently.
    #[arg(long, default_value_t = 1)]
    pub parallel_slots: usize,
    /// Requests that may wait for a slot before the API answers 429.
    #[arg(long, default_value_t = 16)]
    pub queue_depth: usize,
    /// WebAssembly plugin component; repeat for a chain, run in the order given. Its
    /// name is the file name without `.wasm`. With --public-key, each plugin's
    /// signature bundle must sit beside it as `<file>.sig`.
    #[arg(long = "plugin", value_name = "WASM")]
    pub plugins: Vec<PathBuf>,
    /// Plugin configuration as NAME.KEY=VALUE (repeatable).
    #[arg(long = "plugin-config", value_name = "NAME.KEY=VALUE", value_parser = parse_plugin_config)]
    pub plugin_config: Vec<(String, String, String)>,
    /// Fuel per plugin call (default: no fuel bound, only the deadline).
    #[arg(long)]
    pub plugin_fuel: Option<u64>,
    /// Wall-clock bound per plugin call, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub plugin_deadline_ms: u64,
    /// Linear-memory cap per plugin instance, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub plugin_memory_bytes: u64,
    /// Directory for compiled plugin code, so that a restart does not compile again.
    #[arg(long, env = "EDGEFLEET_PLUGIN_CACHE")]
    pub plugin_cache: Option<PathBuf>,
}

/// Parses `NAME.KEY=VALUE`.
fn parse_plugin_config(s: &str) -> Result<(String, String, String), String> {
    let (lhs, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME.KEY=VALUE"))?;
    let (name, key) = lhs
        .split_once('.')
        .filter(|(n, k)| !n.is_empty() && !k.is_empty())
        .ok_or_else(|| format!("{s:?}: expected NAME.KEY=VALUE"))?;
    Ok((name.to_owned(), key.to_owned(), value.to_owned()))
}

/// Checks the files against the public key, loads the plugins (a bad plugin stops the
/// agent at once), listens, then loads and serves the model (or serves none). Returns
/// when the server stops after `shutdown`.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ServeArgs {
        model,
        bundle,
        public_key,
        allow_unsigned,
        served_name,
        listen,
        context_size,
        threads,
        gpu_layers,
        parallel_slots,
        queue_depth,
        plugins,
        plugin_config,
        plugin_fuel,
        plugin_deadline_ms,
        plugin_memory_bytes,
        plugin_cache,
    } = args;
    let policy = match (&bundle, &public_key) {
        (Some(_), Some(key)) => {
            let key = PublicKey::from_pem(&std::fs::read_to_string(key)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
            Some(TrustPolicy::keys([("publisher".to_owned(), key)]))
        }
        _ if allow_unsigned => None,
        // Nothing to verify.
        _ if model.is_none() && plugins.is_empty() => None,
        _ => anyhow::bail!(
            "give --bundle and --public-key to verify the model, or --allow-unsigned for development"
        ),
    };
    let verify = |file: &Path, bundle: &Path| verify_signature(policy.as_ref(), file, bundle);
    if let Some(model) = &model {
        verify(model, bundle.as_deref().unwrap_or(model))?;
    }
    // Plugins load (and fail) before the model: a bad plugin stops the agent at once.
    let mut specs = Vec::new();
    for path in &plugins {
        let mut sig = path.clone().into_os_string();
        sig.push(".sig");
        let verified = verify(path, Path::new(&sig))?;
        let wasm = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        // The bytes compiled are the bytes verified: the file may not change in between.
        if policy.is_some() && verified.is_none() {
            anyhow::bail!(
                "refusing plugin {}: its bundle must sign the single file (files mode), so that the agent can check the bytes it compiles",
                path.display()
            );
        }
        if let Some(want) = verified {
            let got = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&wasm));
            if got != want {
                anyhow::bail!(
                    "refusing plugin {}: DigestMismatch: it changed after its signature was verified",
                    path.display()
                );
            }
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().replace('_', "-"))
            .unwrap_or_else(|| "plugin".into());
        let config = plugin_config
            .iter()
            .filter(|(n, _, _)| *n == name)
            .map(|(_, k, v)| (k.clone(), v.clone()))
            .collect();
        specs.push(PluginSpec {
            wasm,
            name,
            limits: Limits {
                fuel: plugin_fuel,
                deadline: Some(Duration::from_millis(plugin_deadline_ms)),
                memory_bytes: plugin_memory_bytes,
            },
            config,
            grants: Default::default(),
        });
    }
    // Standalone, the person running the command is both the device owner and the
    // source of the plugins: no grants are given, and none is allowed.
    let policy = activation::GrantPolicy::new(Default::default(), plugin_cache.clone());
    let prepared = activation::prepare(specs, plugin_cache.as_deref(), &policy)?;
    let _watchdog = crate::systemd::spawn_watchdog();
    // Listen first: /healthz answers and /readyz says "loading" until the model is in.
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let serving = Serving::new();
    let server = crate::serve::spawn(listener, serving.clone(), shutdown);
    let Some(model) = model else {
        tracing::info!(%listen, "serving no model");
        serving.set_no_model();
        crate::systemd::ready(&format!("serving no model on {listen}"));
        server.await??;
        return Ok(());
    };
    if !crate::engine::is_gguf(&model) {
        anyhow::bail!("{} is not a GGUF file", model.display());
    }
    let served_name = served_name.unwrap_or_else(|| {
        model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    crate::systemd::status(&format!("loading {}", model.display()));
    let config = crate::engine::EngineConfig {
        model_path: model,
        served_name,
        context_size,
        threads: threads.unwrap_or_else(activation::default_threads),
        gpu_layers,
        parallel_slots,
        queue_depth,
        plaintext: None,
        provenance: None,
    };
    let engine = prepared.serve(&serving, config).await?;
    tracing::info!(
        load_ms = engine.load_millis(),
        model_bytes = engine.model_bytes(),
        params = engine.model_params(),
        model = %engine.config().served_name,
        %listen,
        "serving"
    );
    let served = engine.config().served_name.clone();
    crate::systemd::ready(&format!("serving {served} on {listen}"));
    server.await??;
    Ok(())
}

/// Verifies `file` against the signature `bundle` under `policy`, and returns the
/// verified SHA-256 (hex) of a single-file artifact. No policy: nothing is verified
/// (`--allow-unsigned`, or nothing to verify), with a warning.
fn verify_signature(
    policy: Option<&TrustPolicy>,
    file: &Path,
    bundle: &Path,
) -> anyhow::Result<Option<String>> {
    let Some(policy) = policy else {
        tracing::warn!(file = %file.display(), "loading without a signature (--allow-unsigned)");
        return Ok(None);
    };
    let bundle = std::fs::read(bundle)
        .with_context(|| format!("reading the signature bundle {}", bundle.display()))?;
    let v = edgefleet_trust::model_signing::verify(
        &bundle,
        file,
        policy,
        std::time::SystemTime::now(),
        &[],
    )
    .map_err(|e| anyhow::anyhow!("refusing to load {}: {}: {e}", file.display(), e.reason()))?;
    tracing::info!(file = %file.display(), subject = %v.subject_digest, signer = %v.signer, "signature verified");
    Ok(match v.resources.as_slice() {
        [(_, digest)] => Some(digest.clone()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_config_is_name_dot_key_equals_value() {
        assert_eq!(
            parse_plugin_config("pii-redact.requests=false"),
            Ok(("pii-redact".into(), "requests".into(), "false".into()))
        );
        assert_eq!(
            parse_plugin_config("a.b=c=d"),
            Ok(("a".into(), "b".into(), "c=d".into()))
        );
        for bad in ["novalue", "nokey=1", ".k=v", "n.=v"] {
            assert!(parse_plugin_config(bad).is_err(), "{bad}");
        }
    }
}
