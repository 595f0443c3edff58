//! The plugin runtime: one wasmtime engine (with its epoch ticker and on-disk compile
//! cache) for all plugins, and loading a plugin ([`PluginRuntime::load`]): check that
//! the bytes are a component, that the limits are usable, that it imports nothing it
//! was not granted, compile it, pre-link it and instantiate it once as a probe.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use super::bindings::{Plugin, PluginPre};
use super::chain::Chain;
use super::host::PluginState;
use super::limits::{
    EPOCH_TICK, Grants, Limits, MAX_DEADLINE, MAX_WASM_STACK, MEMORY_GROWTH_RESERVATION,
    MEMORY_GUARD, MEMORY_RESERVATION,
};
use super::metrics::PluginMetrics;
use super::{PluginError, SubPrompt};

/// A plugin to load.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// Name, unique in the chain; used in errors, logs and metrics.
    pub name: String,
    /// The component's bytes (already signature-checked by the caller).
    pub wasm: Vec<u8>,
    /// Per-call limits.
    pub limits: Limits,
    /// What the `config` import returns.
    pub config: BTreeMap<String, String>,
    /// Capabilities.
    pub grants: Grants,
}

/// The wasmtime engine all plugins share, and the thread that ticks its epoch.
#[derive(Clone)]
pub struct PluginRuntime {
    engine: Engine,
    linker: Arc<Linker<PluginState>>,
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime").finish_non_exhaustive()
    }
}

impl PluginRuntime {
    /// A runtime whose compiled code is cached under `cache_dir` (none: no disk cache).
    pub fn new(cache_dir: Option<&Path>) -> Result<Self, PluginError> {
        let mut config = Config::new();
        config
            .consume_fuel(true)
            .epoch_interruption(true)
            .memory_reservation(MEMORY_RESERVATION)
            .memory_guard_size(MEMORY_GUARD)
            .memory_reservation_for_growth(MEMORY_GROWTH_RESERVATION)
            .max_wasm_stack(MAX_WASM_STACK)
            .wasm_component_model(true);
        if let Some(dir) = cache_dir {
            let mut cache = wasmtime::CacheConfig::new();
            cache.with_directory(dir);
            let cache =
                wasmtime::Cache::new(cache).map_err(|e| PluginError::Compile(e.to_string()))?;
            config.cache(Some(cache));
        }
        let engine = Engine::new(&config).map_err(|e| PluginError::Compile(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| PluginError::Compile(e.to_string()))?;
        Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Compile(e.to_string()))?;
        // The epoch ticker holds only a weak handle, and ends with the engine.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| PluginError::Compile(format!("starting the epoch thread: {e}")))?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
        })
    }

    /// Checks, compiles (or fetches from the cache) and pre-links a plugin.
    pub fn load(&self, spec: PluginSpec) -> Result<LoadedPlugin, PluginError> {
        check_component_header(&spec.wasm)?;
        if spec.limits.fuel.is_none() && spec.limits.deadline.is_none() {
            return Err(PluginError::InvalidLimits(
                "limits need fuel or a deadline (or both)".into(),
            ));
        }
        if spec
            .limits
            .deadline
            .is_some_and(|d| d > MAX_DEADLINE || d.is_zero())
        {
            return Err(PluginError::InvalidLimits(format!(
                "the deadline must be from 1 ms to {} s",
                MAX_DEADLINE.as_secs()
            )));
        }
        if spec.limits.fuel == Some(0) || spec.limits.memory_bytes == 0 {
            return Err(PluginError::InvalidLimits(
                "fuel and memoryBytes must be above zero".into(),
            ));
        }
        for (host, guest) in &spec.grants.read_only_dirs {
            if !host.is_absolute() || !guest.starts_with('/') || guest.contains("..") {
                return Err(PluginError::InvalidLimits(format!(
                    "read-only directory {} -> {guest}: both must be absolute, without '..'",
                    host.display()
                )));
            }
        }
        let component = Component::new(&self.engine, &spec.wasm)
            .map_err(|e| PluginError::Compile(format!("{e:#}")))?;
        let ty = component.component_type();
        let refused: Vec<String> = ty
            .imports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .filter(|name| !spec.grants.allows(name))
            .collect();
        if !refused.is_empty() {
            return Err(PluginError::ImportNotGranted(refused));
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
        let pre = PluginPre::new(pre).map_err(|e| PluginError::Instantiate(format!("{e:#}")))?;
        let loaded = LoadedPlugin {
            name: spec.name,
            pre,
            limits: spec.limits,
            config: Arc::new(spec.config),
            grants: spec.grants,
        };
        // Instantiate once now, under the plugin's own limits, so that a plugin that
        // cannot start (initial memory above its cap, a trapping start function, an
        // unopenable directory) fails here rather than on every request.
        let probe = self.chain(vec![], None, Arc::new(PluginMetrics::default()));
        probe.instantiate(&loaded, Arc::new(AtomicU64::new(0)))?;
        Ok(loaded)
    }

    /// A chain of loaded plugins, in order, with the sub-prompt service behind `infer`.
    pub fn chain(
        &self,
        plugins: Vec<LoadedPlugin>,
        infer: Option<Arc<dyn SubPrompt>>,
        metrics: Arc<PluginMetrics>,
    ) -> Chain {
        Chain {
            engine: self.engine.clone(),
            plugins: plugins.into_iter().map(Arc::new).collect(),
            infer,
            metrics,
            permits: Arc::new(tokio::sync::Semaphore::new(DEFAULT_CONCURRENCY)),
        }
    }
}

/// Requests a chain admits at once unless told otherwise ([`Chain::with_concurrency`]).
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Tells a component (`\0asm`, layer 1) from a core module or other bytes.
fn check_component_header(wasm: &[u8]) -> Result<(), PluginError> {
    match wasm.get(..8) {
        Some([0x00, 0x61, 0x73, 0x6d, _, _, 0x01, 0x00]) => Ok(()),
        Some([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]) => Err(PluginError::NotAComponent(
            "this is a core WebAssembly module; build the plugin as a component (wasm32-wasip2)"
                .into(),
        )),
        _ => Err(PluginError::NotAComponent(
            "the file does not start with the WebAssembly magic number".into(),
        )),
    }
}

/// A compiled, pre-linked plugin.
pub struct LoadedPlugin {
    pub(super) name: String,
    pub(super) pre: PluginPre<PluginState>,
    pub(super) limits: Limits,
    pub(super) config: Arc<BTreeMap<String, String>>,
    pub(super) grants: Grants,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}
