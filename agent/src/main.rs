//! edgefleet-agent, the device daemon. Today it attests the device to the gateway
//! (`edgefleet-agent attest`), once or on an interval, and keeps the client certificate
//! the gateway issues. Fetching, verifying and serving models arrive later.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use edgefleet_agent::attest::dev::DevAttester;
use edgefleet_agent::enrol::{Source, attest_loop, attest_once};
use edgefleet_agent::gateway_client::GatewayClient;
use edgefleet_trust::attestation::TeeKind;

#[derive(Parser, Debug)]
#[command(version, about = "edgefleet device agent")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum Tee {
    /// TPM 2.0 through a TCTI.
    Tpm,
    /// SEV-SNP guest (configfs-tsm).
    SevSnp,
    /// TDX guest (configfs-tsm).
    Tdx,
    /// Development key; the default policy rejects it.
    Dev,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Load and validate the layered configuration, and print it (secrets redacted).
    CheckConfig {
        /// Directory with agent.toml and agent.d/*.toml.
        #[arg(long, env = "EDGEFLEET_CONFIG_DIR", default_value = "/etc/edgefleet")]
        config_dir: PathBuf,
    },
    /// Run as a fleet device: enrol, attest, follow the gateway's desired state, serve
    /// and report (the systemd service's command).
    Run {
        /// Directory with agent.toml and agent.d/*.toml.
        #[arg(long, env = "EDGEFLEET_CONFIG_DIR", default_value = "/etc/edgefleet")]
        config_dir: PathBuf,
    },
    /// Serve a model standalone on the OpenAI-compatible API (no operator).
    Serve {
        /// The GGUF model file. Without one the agent serves no model (`/readyz` answers
        /// 503 "no model"): a device waiting for its first assignment.
        #[arg(long, env = "EDGEFLEET_MODEL")]
        model: Option<PathBuf>,
        /// OpenSSF model-signing bundle for the model; verified before loading.
        #[arg(long, requires = "public_key")]
        bundle: Option<PathBuf>,
        /// PEM public key the bundle must be signed with.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Load the model without a signature (development only).
        #[arg(long, conflicts_with = "bundle")]
        allow_unsigned: bool,
        /// Model id on the API (default: the file name without extension).
        #[arg(long)]
        served_name: Option<String>,
        /// Listen address.
        #[arg(long, env = "EDGEFLEET_LISTEN", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Context window per slot, in tokens.
        #[arg(long, default_value_t = 2048)]
        context_size: u32,
        /// CPU threads per slot (default: one fewer than the available cores, at least one,
        /// so that serving does not preempt llama.cpp's threads; see BENCHMARKS.md).
        #[arg(long)]
        threads: Option<i32>,
        /// Layers offloaded to a GPU.
        #[arg(long, default_value_t = 0)]
        gpu_layers: u32,
        /// Requests decoded concurrently.
        #[arg(long, default_value_t = 1)]
        parallel_slots: usize,
        /// Requests that may wait for a slot before the API answers 429.
        #[arg(long, default_value_t = 16)]
        queue_depth: usize,
        /// WebAssembly plugin component; repeat for a chain, run in the order given. Its
        /// name is the file name without `.wasm`. With --public-key, each plugin's
        /// signature bundle must sit beside it as `<file>.sig`.
        #[arg(long = "plugin", value_name = "WASM")]
        plugins: Vec<PathBuf>,
        /// Plugin configuration as NAME.KEY=VALUE (repeatable).
        #[arg(long = "plugin-config", value_name = "NAME.KEY=VALUE", value_parser = parse_plugin_config)]
        plugin_config: Vec<(String, String, String)>,
        /// Fuel per plugin call (default: no fuel bound, only the deadline).
        #[arg(long)]
        plugin_fuel: Option<u64>,
        /// Wall-clock bound per plugin call, in milliseconds.
        #[arg(long, default_value_t = 100)]
        plugin_deadline_ms: u64,
        /// Linear-memory cap per plugin instance, in bytes.
        #[arg(long, default_value_t = 64 << 20)]
        plugin_memory_bytes: u64,
        /// Directory for compiled plugin code, so that a restart does not compile again.
        #[arg(long, env = "EDGEFLEET_PLUGIN_CACHE")]
        plugin_cache: Option<PathBuf>,
    },
    /// Attest to the gateway and store the client certificate it issues.
    Attest {
        /// Gateway URL, e.g. https://gateway.edgefleet.svc:8443.
        #[arg(long, env = "EDGEFLEET_GATEWAY")]
        gateway: String,
        /// PEM CA that issued the gateway's certificate.
        #[arg(long, env = "EDGEFLEET_GATEWAY_CA")]
        gateway_ca: PathBuf,
        /// Bootstrap token (prefer the environment variable).
        #[arg(long, env = "EDGEFLEET_BOOTSTRAP_TOKEN", hide_env_values = true)]
        bootstrap_token: String,
        /// This device's name (its EdgeDevice).
        #[arg(long, env = "EDGEFLEET_DEVICE")]
        device: String,
        /// Evidence source.
        #[arg(long, value_enum, env = "EDGEFLEET_TEE")]
        tee: Tee,
        /// TPM TCTI (tpm only).
        #[arg(long, env = "EDGEFLEET_TCTI", default_value = "device:/dev/tpmrm0")]
        tcti: String,
        /// configfs-tsm report directory (sev-snp, tdx).
        #[arg(long, default_value = edgefleet_agent::attest::configfs_tsm::DEFAULT_ROOT)]
        tsm_root: PathBuf,
        /// State directory (agent key, certificate).
        #[arg(
            long,
            env = "EDGEFLEET_STATE_DIR",
            default_value = "/var/lib/edgefleet"
        )]
        state_dir: PathBuf,
        /// Keep re-attesting, at most this many seconds apart (0: attest once and exit).
        #[arg(long, default_value_t = 0)]
        interval: u64,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,llama-cpp-2=warn".into()),
        )
        .init();
    let cmd = Cli::parse().command;
    if let Cmd::CheckConfig { config_dir } = &cmd {
        let config = edgefleet_agent::config::load(config_dir, std::env::vars())?;
        println!("{config:#?}");
        return Ok(());
    }
    if let Cmd::Run { config_dir } = &cmd {
        let mut config = edgefleet_agent::config::load(config_dir, std::env::vars())?;
        if config.fleet.plugin_cache.is_none() {
            // systemd's CacheDirectory=.
            config.fleet.plugin_cache = std::env::var_os("CACHE_DIRECTORY").map(PathBuf::from);
        }
        let source = match config.attestation.tee.as_str() {
            "tpm" => Source::Tpm(edgefleet_agent::enrol::TpmSource::new(
                config.attestation.tcti.clone(),
            )),
            "sev-snp" => Source::ConfigfsTsm {
                root: config.attestation.tsm_root.clone(),
                kind: TeeKind::SevSnp,
            },
            "tdx" => Source::ConfigfsTsm {
                root: config.attestation.tsm_root.clone(),
                kind: TeeKind::Tdx,
            },
            _ => Source::Dev(DevAttester::generate()),
        };
        return edgefleet_agent::fleet::run(config, source, shutdown_signal()).await;
    }
    let Cmd::Attest {
        gateway,
        gateway_ca,
        bootstrap_token,
        device,
        tee,
        tcti,
        tsm_root,
        state_dir,
        interval,
    } = cmd
    else {
        return serve(cmd).await;
    };
    let ca =
        std::fs::read(&gateway_ca).with_context(|| format!("reading {}", gateway_ca.display()))?;
    let client = GatewayClient::new(&gateway, &ca, &bootstrap_token)?;
    let mut source = match tee {
        Tee::Tpm => Source::Tpm(edgefleet_agent::enrol::TpmSource::new(tcti)),
        Tee::SevSnp => Source::ConfigfsTsm {
            root: tsm_root,
            kind: TeeKind::SevSnp,
        },
        Tee::Tdx => Source::ConfigfsTsm {
            root: tsm_root,
            kind: TeeKind::Tdx,
        },
        Tee::Dev => Source::Dev(DevAttester::generate()),
    };
    if interval == 0 {
        let a = attest_once(&client, &device, &mut source, &state_dir).await?;
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "allow": a.decision.allow, "deny": a.decision.deny, "policy_hash": a.decision.policy_hash,
                "expires_at": a.expires_at, "certificate": a.certificate.is_some(),
            }))?
        );
        if !a.decision.allow {
            std::process::exit(1);
        }
        return Ok(());
    }
    attest_loop(
        client,
        device,
        source,
        state_dir,
        Duration::from_secs(interval),
    )
    .await;
    Ok(())
}

async fn serve(cmd: Cmd) -> anyhow::Result<()> {
    let Cmd::Serve {
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
    } = cmd
    else {
        anyhow::bail!("not a serve command");
    };
    let policy = match (&bundle, &public_key) {
        (Some(_), Some(key)) => {
            use edgefleet_trust::model_signing::{PublicKey, TrustPolicy};
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
    // Returns the verified SHA-256 (hex) of a single-file artifact.
    let verify = |file: &std::path::Path,
                  bundle: &std::path::Path|
     -> anyhow::Result<Option<String>> {
        let Some(policy) = &policy else {
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
    };
    if let Some(model) = &model {
        verify(model, bundle.as_deref().unwrap_or(model))?;
    }
    // Plugins load (and fail) before the model: a bad plugin stops the agent at once.
    let mut specs = Vec::new();
    for path in &plugins {
        let mut sig = path.clone().into_os_string();
        sig.push(".sig");
        let verified = verify(path, std::path::Path::new(&sig))?;
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
        specs.push(edgefleet_agent::plugins::PluginSpec {
            wasm,
            name,
            limits: edgefleet_agent::plugins::Limits {
                fuel: plugin_fuel,
                deadline: Some(Duration::from_millis(plugin_deadline_ms)),
                memory_bytes: plugin_memory_bytes,
            },
            config,
            grants: Default::default(),
        });
    }
    let loaded = if specs.is_empty() {
        None
    } else {
        let runtime = edgefleet_agent::plugins::PluginRuntime::new(plugin_cache.as_deref())?;
        let mut loaded = Vec::new();
        for spec in specs {
            let name = spec.name.clone();
            let started = std::time::Instant::now();
            loaded.push(
                runtime.load(spec).map_err(|e| {
                    anyhow::anyhow!("refusing plugin {name:?}: {}: {e}", e.reason())
                })?,
            );
            tracing::info!(plugin = %name, ms = started.elapsed().as_millis() as u64, "plugin loaded");
        }
        Some((runtime, loaded))
    };
    let _watchdog = edgefleet_agent::systemd::spawn_watchdog();
    // Listen first: /healthz answers and /readyz says "loading" until the model is in.
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let serving = edgefleet_agent::serve::Serving::new();
    let router = edgefleet_agent::serve::router(serving.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                shutdown_signal().await;
                edgefleet_agent::systemd::stopping();
            })
            .await
    });
    let Some(model) = model else {
        tracing::info!(%listen, "serving no model");
        serving.set_no_model();
        edgefleet_agent::systemd::ready(&format!("serving no model on {listen}"));
        server.await??;
        return Ok(());
    };
    if !edgefleet_agent::engine::is_gguf(&model) {
        anyhow::bail!("{} is not a GGUF file", model.display());
    }
    let served_name = served_name.unwrap_or_else(|| {
        model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| (n.get() as i32 - 1).max(1))
    });
    edgefleet_agent::systemd::status(&format!("loading {}", model.display()));
    let config = edgefleet_agent::engine::EngineConfig {
        model_path: model,
        served_name,
        context_size,
        threads,
        gpu_layers,
        parallel_slots,
        queue_depth,
    };
    let engine = tokio::task::spawn_blocking(move || edgefleet_agent::engine::Engine::load(config))
        .await??;
    tracing::info!(
        load_ms = engine.load_millis(),
        model_bytes = engine.model_bytes(),
        params = engine.model_params(),
        model = %engine.config().served_name,
        %listen,
        "serving"
    );
    let engine = std::sync::Arc::new(engine);
    let chain = loaded.map(|(runtime, loaded)| {
        let infer = edgefleet_agent::serve::EngineSubPrompt::new(
            &engine,
            tokio::runtime::Handle::current(),
        );
        runtime.chain(loaded, Some(infer), Default::default())
    });
    let served = engine.config().served_name.clone();
    serving.install_with_plugins(engine, chain);
    edgefleet_agent::systemd::ready(&format!("serving {served} on {listen}"));
    server.await??;
    Ok(())
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

/// SIGINT or SIGTERM (what systemd sends on stop).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
