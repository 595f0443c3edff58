//! Activating a model: the one path by which both the fleet agent
//! ([`crate::gateway_session`]) and the standalone `serve` command
//! ([`crate::standalone`]) put a verified model, behind its verified plugins, into
//! service. Each caller first checks its artifacts in its own way (the fleet against
//! the desired state's signers and digests, standalone against a local public key),
//! then takes the same two steps:
//!
//! 1. [`prepare`]: check every plugin's grants against the device owner's consent
//!    ([`consent::GrantPolicy`]: a grant beyond the allowlist, or on the deny list,
//!    refuses the plugin before any of it is compiled or run), then compile and check
//!    the plugins (a bad plugin fails here, before the model loads);
//! 2. [`Prepared::serve`]: load the model with llama.cpp on a blocking thread, put the
//!    plugins in front of it (their `infer` runs on it), and swap both into
//!    [`Serving`] at once; requests in flight finish on what they started on.
//!
//! Also here: [`ActivateError`], the named reasons the fleet reports, [`consent`] (the
//! plugin grant allowlist and deny list), [`verify`]
//! (signature checks against a desired model's signers) and [`store`] (artifacts and the
//! last-known-good record on disk).

use std::path::Path;
use std::sync::Arc;

use crate::engine::{Engine, EngineConfig, EngineError};
use crate::plugins::{LoadedPlugin, PluginError, PluginRuntime, PluginSpec};
use crate::serve::{EngineSubPrompt, Serving};

pub mod consent;
pub mod decrypt;
pub mod pins;
pub mod store;
pub mod verify;

pub use consent::{GrantDenied, GrantPolicy};

pub use store::file_sha256;
pub use verify::{trust_policy, verify_file};

/// Why activating a model failed; the name goes into the report.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The download failed.
    #[error("DownloadFailed: {0}")]
    Download(String),
    /// The file's SHA-256 is not the expected digest.
    #[error("DigestMismatch: {0}")]
    Digest(String),
    /// The file grew beyond its declared size.
    #[error("TooLarge: {0}")]
    TooLarge(String),
    /// The signature bundle does not verify.
    #[error("SignatureInvalid: {0}")]
    Signature(String),
    /// llama.cpp refused the model.
    #[error("LoadFailed: {0}")]
    Load(String),
    /// A plugin was refused.
    #[error("PluginRefused: {0}")]
    Plugin(String),
    /// A plugin asked for a grant the device owner did not allow.
    #[error("PluginGrantDenied: {0}")]
    GrantDenied(#[from] GrantDenied),
    /// None of the model's signers is among the device's own trust roots.
    #[error("{0}")]
    Untrusted(#[from] pins::Untrusted),
    /// Local storage failed.
    #[error("StateDirectory: {0}")]
    State(String),
    /// A golden prompt's answer did not meet its expectation, or could not be had.
    #[error("{0}")]
    Golden(#[from] crate::golden::GoldenError),
    /// An encrypted model's key was not released, or the model did not decrypt; the
    /// text starts with the reason's name (`KeyDenied`, `CiphertextTampered`,
    /// `WrongModelKey`, `PlaintextNotLockable`, ...).
    #[error("{0}")]
    Encryption(String),
}

/// Why one of the two shared steps failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The plugin runtime did not start.
    #[error("{0}")]
    Runtime(PluginError),
    /// A plugin asked for a grant the device does not allow.
    #[error("PluginGrantDenied: {0}")]
    GrantDenied(#[from] GrantDenied),
    /// A plugin was refused.
    #[error("refusing plugin {plugin:?}: {}: {error}", error.reason())]
    Plugin {
        /// Its name.
        plugin: String,
        /// Why.
        error: PluginError,
    },
    /// llama.cpp refused the model.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The loading task ended abnormally.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

impl From<LoadError> for ActivateError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Runtime(e) => Self::Plugin(e.to_string()),
            LoadError::GrantDenied(e) => Self::GrantDenied(e),
            LoadError::Plugin { plugin, error } => {
                Self::Plugin(format!("{plugin}: {}: {error}", error.reason()))
            }
            LoadError::Engine(e) => Self::Load(e.to_string()),
            LoadError::Task(e) => Self::Load(e.to_string()),
        }
    }
}

/// CPU threads per slot when none are configured: one fewer than the available cores,
/// at least one, so that serving does not preempt llama.cpp's threads.
pub fn default_threads() -> i32 {
    std::thread::available_parallelism().map_or(1, |n| (n.get() as i32 - 1).max(1))
}

/// Plugins compiled and checked, waiting for their model ([`Prepared::serve`]).
#[derive(Debug)]
pub struct Prepared {
    plugins: Option<(PluginRuntime, Vec<LoadedPlugin>)>,
}

/// Refuses any of `plugins` whose grants `policy` does not allow (and logs it); gives
/// the others their checked grants (directories resolved).
pub fn check_grants(plugins: &mut [PluginSpec], policy: &GrantPolicy) -> Result<(), GrantDenied> {
    for spec in plugins {
        match policy.check(&spec.name, &spec.grants) {
            Ok(grants) => spec.grants = grants,
            Err(e) => {
                tracing::warn!(plugin = %e.plugin, grant = %e.grant, why = %e.why, "PluginGrantDenied: refusing the plugin");
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Step one: checks every plugin's grants against `policy` ([`check_grants`]; nothing
/// is compiled or run when one is refused), then compiles and checks `plugins`, in
/// chain order, with compiled code cached under `cache` (none: no disk cache). No
/// plugins: nothing to compile.
pub fn prepare(
    mut plugins: Vec<PluginSpec>,
    cache: Option<&Path>,
    policy: &GrantPolicy,
) -> Result<Prepared, LoadError> {
    if plugins.is_empty() {
        return Ok(Prepared { plugins: None });
    }
    check_grants(&mut plugins, policy)?;
    let runtime = PluginRuntime::new(cache).map_err(LoadError::Runtime)?;
    let mut loaded = Vec::new();
    for spec in plugins {
        let name = spec.name.clone();
        let started = std::time::Instant::now();
        loaded.push(runtime.load(spec).map_err(|error| LoadError::Plugin {
            plugin: name.clone(),
            error,
        })?);
        tracing::info!(plugin = %name, ms = started.elapsed().as_millis() as u64, "plugin loaded");
    }
    Ok(Prepared {
        plugins: Some((runtime, loaded)),
    })
}

impl Prepared {
    /// Step two: loads the model in `config` on a blocking thread, chains the plugins in
    /// front of it (their `infer` import runs on it), and serves both through `serving`
    /// from now on. Returns the engine now served.
    pub async fn serve(
        self,
        serving: &Serving,
        config: EngineConfig,
    ) -> Result<Arc<Engine>, LoadError> {
        Ok(self.load(config).await?.install(serving))
    }

    /// Loads the model with llama.cpp, not serving it yet ([`Loaded::install`]).
    pub async fn load(self, config: EngineConfig) -> Result<Loaded, LoadError> {
        // As many requests in the plugins at once as the engine admits (slots and
        // queue): plugin work never holds more than the engine would take.
        let concurrency = config.parallel_slots.saturating_add(config.queue_depth);
        let engine = tokio::task::spawn_blocking(move || Engine::load(config)).await??;
        Ok(Loaded {
            engine: Arc::new(engine),
            plugins: self.plugins,
            concurrency,
        })
    }
}

/// A loaded model with its plugins, not serving yet: its engine answers the device's
/// own checks (golden prompts) before any client's request.
#[allow(missing_debug_implementations)] // holds the engine and the plugin runtime
pub struct Loaded {
    engine: Arc<Engine>,
    plugins: Option<(PluginRuntime, Vec<LoadedPlugin>)>,
    concurrency: usize,
}

impl Loaded {
    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Serves it: the API's requests go to it from now on.
    pub fn install(self, serving: &Serving) -> Arc<Engine> {
        let engine = self.engine;
        let concurrency = self.concurrency;
        let chain = self.plugins.map(|(runtime, loaded)| {
            let infer = EngineSubPrompt::new(&engine, tokio::runtime::Handle::current());
            runtime
                .chain(loaded, Some(infer), Default::default())
                .with_concurrency(concurrency)
        });
        serving.install_with_plugins(engine.clone(), chain);
        engine
    }
}
