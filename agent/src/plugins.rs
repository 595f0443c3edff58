//! WebAssembly plugins in the request path (the `edgefleet:plugin` WIT world in
//! `plugins/wit/`), run with wasmtime's component model.
//!
//! - **Compiled once.** [`PluginRuntime::load`] checks that the bytes are a component,
//!   that it imports nothing it was not granted, and compiles it; compiled code is kept
//!   in wasmtime's on-disk cache (keyed by the component's hash and the compiler
//!   settings), so a restart does not compile again.
//! - **A fresh instance per request.** [`Chain::start`] gives each request its own
//!   `Store` per plugin, created on first use; nothing one request leaves in a plugin's
//!   memory is seen by another.
//! - **Limits per call.** Fuel and/or an epoch deadline (a wall-clock bound, ticked every
//!   [`EPOCH_TICK`]) are reset before every call, and a [`ResourceLimiter`] caps linear
//!   memory and tables. Every failure maps to a named [`PluginError`].
//! - **No ambient authority.** The WASI context has no arguments, no environment, no
//!   preopened directories, no network, silent stdio and a frozen clock, unless the
//!   plugin's [`Grants`] say otherwise, and a component that *imports* a filesystem,
//!   socket or clock interface without the grant is refused at load time.
//!
//! Hooks run in chain order: `on-request` from the first plugin to the last (a plugin
//! may rewrite the messages, refuse, or answer directly, which ends the walk), then the
//! answer passes through the response hooks of the plugins that saw the request, in the
//! same order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::engine::{ChatMessage, is_chat_role};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../plugins/wit",
        world: "plugin",
        imports: { "edgefleet:plugin/host.infer": trappable },
    });
}

use bindings::edgefleet::plugin::types::{
    InferParams, LogLevel, Message, Request, RequestAction, ResponseAction,
};
use bindings::{Plugin, PluginPre};

/// How often the epoch advances: the granularity of plugin deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);
/// Most `infer` calls one request may make across its plugins' hooks.
pub const MAX_INFER_CALLS: u32 = 4;
/// Most tokens an `infer` call may generate.
pub const MAX_INFER_TOKENS: u32 = 256;
/// Virtual address space reserved up front for each linear memory. Small on purpose:
/// wasmtime's default (4 GiB plus guards, per memory) exhausts the address space of
/// small devices when a few requests run plugins at once; memories that grow past this
/// are moved, and bounds are checked explicitly.
const MEMORY_RESERVATION: u64 = 16 << 20;
/// Unmapped bytes after each linear memory.
const MEMORY_GUARD: u64 = 64 << 10;
/// Extra reservation for growth before a memory has to move.
const MEMORY_GROWTH_RESERVATION: u64 = 4 << 20;
/// Wasm stack per call.
const MAX_WASM_STACK: usize = 512 << 10;
/// Most table elements an instance may have.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Most core instances, memories and tables in one plugin component (a Rust
/// `wasm32-wasip2` component has a handful of each).
const MAX_CORE_INSTANCES: usize = 32;
const MAX_MEMORIES: usize = 4;
const MAX_TABLES: usize = 8;
/// Most bytes the host copies out of a plugin in one call (strings and lists it
/// returns, or passes to an import). Strings in a list may all point at the same guest
/// bytes, so without this bound a small guest could make the host allocate without end.
pub const MAX_TRANSFER_BYTES: usize = 8 << 20;
/// Longest deadline a call may have.
pub const MAX_DEADLINE: Duration = Duration::from_secs(60);

/// The interface prefixes a plugin may import without any grant. `wasi:cli/environment`
/// is among them because every Rust guest imports it; the environment itself is empty
/// unless granted.
const ALWAYS_ALLOWED: &[&str] = &[
    "edgefleet:plugin/",
    "wasi:io/",
    "wasi:random/",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-",
];

/// Why a plugin could not be loaded or a call into it failed. Each variant has a stable
/// name ([`PluginError::reason`]) used in API errors, logs and metrics.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PluginError {
    /// The bytes are not a WebAssembly component (a core module, or not Wasm at all).
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    /// The component did not compile.
    #[error("compiling the component: {0}")]
    Compile(String),
    /// The component imports interfaces its grants do not cover.
    #[error("imports not granted: {}", .0.join(", "))]
    ImportNotGranted(Vec<String>),
    /// The component does not fit the `edgefleet:plugin` world.
    #[error("instantiating: {0}")]
    Instantiate(String),
    /// The call ran past its wall-clock deadline.
    #[error("ran past its deadline of {0} ms")]
    Deadline(u64),
    /// The call used up its fuel.
    #[error("ran out of fuel ({0})")]
    OutOfFuel(u64),
    /// The plugin tried to grow its memory past the cap.
    #[error("tried to grow its memory past the cap of {0} bytes")]
    MemoryLimit(u64),
    /// The plugin trapped.
    #[error("trapped: {0}")]
    Trap(String),
    /// The plugin returned a string that is not UTF-8.
    #[error("returned a string that is not valid UTF-8")]
    InvalidUtf8,
    /// The plugin kept calling `infer` after its budget was spent.
    #[error("kept calling infer past the budget of {0} calls")]
    InferBudget(u32),
    /// The plugin tried to hand the host more than [`MAX_TRANSFER_BYTES`] in one call.
    #[error("tried to pass the host more than {MAX_TRANSFER_BYTES} bytes in one call")]
    OutputTooLarge,
    /// The plugin returned messages the API would not accept (an unknown role, NUL).
    #[error("returned an invalid message: {0}")]
    InvalidOutput(String),
    /// The limits are unusable (no fuel and no deadline, or a deadline above 60 s).
    #[error("invalid limits: {0}")]
    InvalidLimits(String),
}

impl PluginError {
    /// Stable name, for API errors and the `reason` label of metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotAComponent(_) => "NotAComponent",
            Self::Compile(_) => "Compile",
            Self::ImportNotGranted(_) => "ImportNotGranted",
            Self::Instantiate(_) => "Instantiate",
            Self::Deadline(_) => "Deadline",
            Self::OutOfFuel(_) => "OutOfFuel",
            Self::MemoryLimit(_) => "MemoryLimit",
            Self::Trap(_) => "Trap",
            Self::InvalidUtf8 => "InvalidUtf8",
            Self::InferBudget(_) => "InferBudget",
            Self::OutputTooLarge => "OutputTooLarge",
            Self::InvalidOutput(_) => "InvalidOutput",
            Self::InvalidLimits(_) => "InvalidLimits",
        }
    }
}

/// Per-call limits (`EdgeModel.spec.plugins[].limits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Fuel per call; `None` for no fuel bound.
    pub fuel: Option<u64>,
    /// Wall-clock bound per call; `None` for none. At least one of the two must be set.
    pub deadline: Option<Duration>,
    /// Linear-memory cap of the instance, in bytes.
    pub memory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel: None,
            deadline: Some(Duration::from_millis(100)),
            memory_bytes: 64 << 20,
        }
    }
}

/// Capabilities beyond the sandbox's default of none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Environment variables the plugin sees.
    pub env: BTreeMap<String, String>,
    /// The real wall and monotonic clocks (otherwise both read a fixed time).
    pub clocks: bool,
    /// Host directories the plugin may read, with the path it sees them at.
    pub read_only_dirs: Vec<(PathBuf, String)>,
    /// TCP/UDP sockets and name lookup.
    pub network: bool,
}

impl Grants {
    fn allows(&self, import: &str) -> bool {
        if ALWAYS_ALLOWED.iter().any(|p| import.starts_with(p)) {
            return true;
        }
        (import.starts_with("wasi:clocks/") && self.clocks)
            || (import.starts_with("wasi:filesystem/") && !self.read_only_dirs.is_empty())
            || (import.starts_with("wasi:sockets/") && self.network)
    }
}

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

/// The sub-prompt service behind the `infer` import: runs `messages` on the served model.
pub trait SubPrompt: Send + Sync {
    /// Generates at most `max_tokens` at `temperature`, giving up at `deadline`.
    fn infer(
        &self,
        messages: Vec<ChatMessage>,
        max_tokens: u32,
        temperature: f32,
        deadline: Option<Instant>,
    ) -> Result<String, String>;
}

/// Plugin call counters and timings, for `/metrics`.
/// Calls and microseconds, by (plugin, hook).
type CallCounts = BTreeMap<(String, &'static str), (u64, u64)>;

#[derive(Debug, Default)]
pub struct PluginMetrics {
    calls: Mutex<CallCounts>,
    failures: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl PluginMetrics {
    fn record_call(&self, plugin: &str, hook: &'static str, elapsed: Duration) {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let e = calls.entry((plugin.to_owned(), hook)).or_default();
        e.0 += 1;
        e.1 += elapsed.as_micros() as u64;
    }

    fn record_failure(&self, plugin: &str, reason: &'static str) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        *f.entry((plugin.to_owned(), reason)).or_default() += 1;
    }

    /// Failures of `plugin` for `reason` so far.
    pub fn failures(&self, plugin: &str, reason: &str) -> u64 {
        let f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.iter()
            .filter(|((p, r), _)| p == plugin && *r == reason)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Prometheus text exposition of the counters, one family at a time.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = String::from(
            "# HELP edgefleet_plugin_calls_total Calls into plugin hooks.\n\
             # TYPE edgefleet_plugin_calls_total counter\n",
        );
        for ((plugin, hook), (n, _)) in &calls {
            let _ = writeln!(
                out,
                "edgefleet_plugin_calls_total{{plugin=\"{plugin}\",hook=\"{hook}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP edgefleet_plugin_call_seconds_total Time spent in plugin hooks, including instantiation.\n\
             # TYPE edgefleet_plugin_call_seconds_total counter\n",
        );
        for ((plugin, hook), (_, micros)) in &calls {
            let _ = writeln!(
                out,
                "edgefleet_plugin_call_seconds_total{{plugin=\"{plugin}\",hook=\"{hook}\"}} {:.6}",
                *micros as f64 / 1e6
            );
        }
        out.push_str(
            "# HELP edgefleet_plugin_failures_total Plugin refusals and failures, by reason.\n\
             # TYPE edgefleet_plugin_failures_total counter\n",
        );
        for ((plugin, reason), n) in &failures {
            let _ = writeln!(
                out,
                "edgefleet_plugin_failures_total{{plugin=\"{plugin}\",reason=\"{reason}\"}} {n}"
            );
        }
        out
    }
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
        }
    }
}

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
    name: String,
    pre: PluginPre<PluginState>,
    limits: Limits,
    config: Arc<BTreeMap<String, String>>,
    grants: Grants,
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

/// Memory and table caps for the whole instance (all its memories together), and the
/// counts of core instances, memories and tables; remembers whether a growth was refused.
#[derive(Debug)]
struct Limiter {
    memory_bytes: usize,
    used: usize,
    /// The last granted growth, (from, to), undone if the growth then fails.
    last_grant: (usize, usize),
    refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.used.saturating_sub(current).saturating_add(desired);
        let ok = total <= self.memory_bytes;
        if ok {
            self.used = total;
            self.last_grant = (current, desired);
        } else {
            self.refused = true;
        }
        Ok(ok)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // Granted here but failed below (the guest sees the failure): undo the grant.
        let (from, to) = self.last_grant;
        self.used = self.used.saturating_sub(to).saturating_add(from);
        Ok(())
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// An error a host import raises to stop the plugin.
#[derive(Debug, thiserror::Error)]
#[error("infer budget of {0} calls exceeded")]
struct InferBudgetExceeded(u32);

/// What one plugin instance's store holds.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    plugin: String,
    config: Arc<BTreeMap<String, String>>,
    infer: Option<Arc<dyn SubPrompt>>,
    infer_calls: Arc<AtomicU64>,
    /// This instance was already told the infer budget is spent.
    infer_refused: bool,
    deadline: Option<Instant>,
}

impl std::fmt::Debug for PluginState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginState")
            .field("plugin", &self.plugin)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::edgefleet::plugin::types::Host for PluginState {}

impl bindings::edgefleet::plugin::host::Host for PluginState {
    fn infer(
        &mut self,
        messages: Vec<Message>,
        params: InferParams,
    ) -> wasmtime::Result<Result<String, String>> {
        let spent = self
            .infer_calls
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < u64::from(MAX_INFER_CALLS)).then_some(n + 1)
            })
            .is_err();
        if spent {
            if self.infer_refused {
                // Told once already, and called again: stop this plugin.
                return Err(wasmtime::Error::new(InferBudgetExceeded(MAX_INFER_CALLS)));
            }
            self.infer_refused = true;
            return Ok(Err(format!(
                "infer budget of {MAX_INFER_CALLS} calls per request is spent"
            )));
        }
        let Some(infer) = self.infer.clone() else {
            return Ok(Err("no model is available to infer".into()));
        };
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Err("the call's deadline has passed".into()));
        }
        let messages = messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect();
        let max_tokens = params.max_tokens.clamp(1, MAX_INFER_TOKENS);
        let temperature = if params.temperature.is_finite() {
            params.temperature.clamp(0.0, 2.0)
        } else {
            0.0
        };
        Ok(infer.infer(messages, max_tokens, temperature, self.deadline))
    }

    fn log(&mut self, level: LogLevel, message: String) {
        let message: String = message.chars().take(1024).collect();
        let plugin = &self.plugin;
        match level {
            LogLevel::Debug => tracing::debug!(%plugin, "{message}"),
            LogLevel::Info => tracing::info!(%plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(%plugin, "{message}"),
            LogLevel::Error => tracing::error!(%plugin, "{message}"),
        }
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }
}

/// A clock that always reads the same time: what a plugin without the `clocks` grant
/// sees, so that it cannot time anything.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

fn wasi_ctx(grants: &Grants) -> Result<WasiCtx, PluginError> {
    let mut b = wasmtime_wasi::WasiCtxBuilder::new();
    b.allow_blocking_current_thread(true);
    for (k, v) in &grants.env {
        b.env(k, v);
    }
    if !grants.clocks {
        b.wall_clock(FrozenClock).monotonic_clock(FrozenClock);
    }
    for (host, guest) in &grants.read_only_dirs {
        b.preopened_dir(host, guest, wasmtime_wasi::FsPerms::ReadOnly)
            .map_err(|e| PluginError::Instantiate(format!("preopening {}: {e}", host.display())))?;
    }
    if grants.network {
        b.inherit_network().allow_ip_name_lookup(true);
    } else {
        b.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
    }
    Ok(b.build())
}

/// The plugins of one served model, in order.
#[derive(Clone)]
pub struct Chain {
    engine: Engine,
    plugins: Vec<Arc<LoadedPlugin>>,
    infer: Option<Arc<dyn SubPrompt>>,
    metrics: Arc<PluginMetrics>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("plugins", &self.plugins)
            .finish_non_exhaustive()
    }
}

impl Chain {
    /// True when there are no plugins.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Plugin names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.plugins.iter().map(|p| p.name.as_str()).collect()
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<PluginMetrics> {
        &self.metrics
    }

    /// A fresh instance of `p` in its own store, with its limits armed.
    fn instantiate(
        &self,
        p: &LoadedPlugin,
        infer_calls: Arc<AtomicU64>,
    ) -> Result<Live, PluginError> {
        let state = PluginState {
            wasi: wasi_ctx(&p.grants)?,
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_bytes: usize::try_from(p.limits.memory_bytes).unwrap_or(usize::MAX),
                used: 0,
                last_grant: (0, 0),
                refused: false,
            },
            plugin: p.name.clone(),
            config: p.config.clone(),
            infer: self.infer.clone(),
            infer_calls,
            infer_refused: false,
            deadline: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_hostcall_fuel(MAX_TRANSFER_BYTES);
        arm(&mut store, &p.limits)?;
        let plugin = p
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(e, &store, &p.limits))?;
        Ok(Live { store, plugin })
    }

    /// Per-request state: one lazily created instance per plugin.
    pub fn start(&self) -> ChainRun {
        ChainRun {
            chain: self.clone(),
            instances: self.plugins.iter().map(|_| None).collect(),
            saw_request: self.plugins.len(),
            seen: Vec::with_capacity(self.plugins.len()),
            infer_calls: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// A plugin's request field values.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginRequest {
    /// The messages.
    pub messages: Vec<ChatMessage>,
    /// Token budget.
    pub max_tokens: u32,
    /// Temperature.
    pub temperature: f32,
    /// `response_format` asks for JSON.
    pub json_mode: bool,
    /// Streamed.
    pub streamed: bool,
}

impl PluginRequest {
    fn to_wit(&self) -> Request {
        Request {
            messages: self
                .messages
                .iter()
                .map(|m| Message {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect(),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            json_mode: self.json_mode,
            streamed: self.streamed,
        }
    }
}

/// What the request hooks decided.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestOutcome {
    /// Call the model with these messages.
    Proceed(Vec<ChatMessage>),
    /// A plugin answered; this text (already through the response hooks) is the answer.
    Answered(String),
}

/// Why a chain step did not pass.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ChainError {
    /// A plugin refused, on purpose, with a reason for the client.
    #[error("plugin {plugin:?} refused ({hook}): {reason}")]
    Rejected {
        /// Which plugin.
        plugin: String,
        /// The hook that refused: `on-request` refuses the request, the others the answer.
        hook: &'static str,
        /// Its reason.
        reason: String,
    },
    /// A plugin failed (trap, limit, bad output).
    #[error("plugin {plugin:?} failed ({}): {error}", error.reason())]
    Failed {
        /// Which plugin.
        plugin: String,
        /// What went wrong.
        #[source]
        error: PluginError,
    },
}

struct Live {
    store: Store<PluginState>,
    plugin: Plugin,
}

/// One request's walk through the chain.
pub struct ChainRun {
    chain: Chain,
    instances: Vec<Option<Live>>,
    /// How many plugins (from the front) saw the request, and so see the response.
    saw_request: usize,
    /// The request as each plugin saw it: its response hook gets the same one, so a
    /// plugin after a redactor never sees what the redactor removed.
    seen: Vec<Request>,
    infer_calls: Arc<AtomicU64>,
}

impl std::fmt::Debug for ChainRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainRun")
            .field("plugins", &self.chain.names())
            .field("saw_request", &self.saw_request)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy)]
enum Hook {
    Request,
    Response,
    Chunk,
    StreamEnd,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Request => "on-request",
            Hook::Response => "on-response",
            Hook::Chunk => "on-chunk",
            Hook::StreamEnd => "on-stream-end",
        }
    }
}

impl ChainRun {
    fn live(&mut self, i: usize) -> Result<&mut Live, PluginError> {
        if self.instances[i].is_none() {
            let live = self
                .chain
                .instantiate(&self.chain.plugins[i], self.infer_calls.clone())?;
            self.instances[i] = Some(live);
        }
        self.instances[i]
            .as_mut()
            .ok_or_else(|| PluginError::Instantiate("instance missing".into()))
    }

    /// Runs one hook of plugin `i`, with fresh limits, recording time and failures.
    fn call<T>(
        &mut self,
        i: usize,
        hook: Hook,
        f: impl FnOnce(&Plugin, &mut Store<PluginState>) -> wasmtime::Result<T>,
    ) -> Result<T, ChainError> {
        let started = Instant::now();
        let limits = self.chain.plugins[i].limits.clone();
        let name = self.chain.plugins[i].name.clone();
        let result = (|| {
            let live = self.live(i)?;
            arm(&mut live.store, &limits)?;
            f(&live.plugin, &mut live.store).map_err(|e| classify(e, &live.store, &limits))
        })();
        self.chain
            .metrics
            .record_call(&name, hook.name(), started.elapsed());
        result.map_err(|error| {
            self.chain.metrics.record_failure(&name, error.reason());
            tracing::warn!(plugin = %name, hook = hook.name(), reason = error.reason(), %error, "plugin failed");
            // A failed instance is not reused: its state is unknown.
            self.instances[i] = None;
            ChainError::Failed {
                plugin: name,
                error,
            }
        })
    }

    /// Runs the request hooks in order.
    pub fn on_request(&mut self, req: &PluginRequest) -> Result<RequestOutcome, ChainError> {
        let mut req = req.clone();
        self.seen.clear();
        for i in 0..self.chain.plugins.len() {
            let wit = req.to_wit();
            self.seen.push(wit.clone());
            let action = self.call(i, Hook::Request, |p, s| p.call_on_request(s, &wit))?;
            match action {
                RequestAction::Proceed(messages) => {
                    req.messages = self.checked_messages(i, messages)?;
                }
                RequestAction::Reject(reason) => {
                    self.saw_request = i;
                    return Err(self.rejected(i, Hook::Request, reason));
                }
                RequestAction::Respond(text) => {
                    self.saw_request = i;
                    let text = self.on_response(text)?;
                    return Ok(RequestOutcome::Answered(text));
                }
            }
        }
        Ok(RequestOutcome::Proceed(req.messages))
    }

    /// Messages a plugin returned, held to what the API accepts from a client.
    fn checked_messages(
        &mut self,
        i: usize,
        messages: Vec<Message>,
    ) -> Result<Vec<ChatMessage>, ChainError> {
        let bad = messages.iter().enumerate().find_map(|(n, m)| {
            if !is_chat_role(&m.role) {
                Some(format!("message {n} has the role {:?}", m.role))
            } else if m.content.contains('\0') {
                Some(format!("message {n} contains NUL"))
            } else {
                None
            }
        });
        let bad = bad.or_else(|| messages.is_empty().then(|| "no messages".to_owned()));
        if let Some(why) = bad {
            let error = PluginError::InvalidOutput(why);
            let plugin = self.chain.plugins[i].name.clone();
            self.chain.metrics.record_failure(&plugin, error.reason());
            self.instances[i] = None;
            return Err(ChainError::Failed { plugin, error });
        }
        Ok(messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect())
    }

    fn rejected(&self, i: usize, hook: Hook, reason: String) -> ChainError {
        let plugin = self.chain.plugins[i].name.clone();
        self.chain.metrics.record_failure(&plugin, "Rejected");
        ChainError::Rejected {
            plugin,
            hook: hook.name(),
            reason: reason.chars().take(1024).collect(),
        }
    }

    fn response_action(
        &self,
        i: usize,
        hook: Hook,
        action: ResponseAction,
    ) -> Result<String, ChainError> {
        match action {
            ResponseAction::Proceed(text) => Ok(text),
            ResponseAction::Reject(reason) => Err(self.rejected(i, hook, reason)),
        }
    }

    /// Runs the whole answer through the response hooks. Each plugin gets the request
    /// as it saw it in `on-request`.
    pub fn on_response(&mut self, text: String) -> Result<String, ChainError> {
        let mut text = text;
        for i in 0..self.saw_request.min(self.seen.len()) {
            let req = self.seen[i].clone();
            let action = self.call(i, Hook::Response, |p, s| p.call_on_response(s, &req, &text))?;
            text = self.response_action(i, Hook::Response, action)?;
        }
        Ok(text)
    }

    fn chunk_from(&mut self, first: usize, chunk: String) -> Result<String, ChainError> {
        let mut chunk = chunk;
        for i in first..self.saw_request {
            if chunk.is_empty() {
                break;
            }
            let action = self.call(i, Hook::Chunk, |p, s| p.call_on_chunk(s, &chunk))?;
            chunk = self.response_action(i, Hook::Chunk, action)?;
        }
        Ok(chunk)
    }

    /// Runs one streamed piece through the chunk hooks; the result may be empty.
    pub fn on_chunk(&mut self, chunk: String) -> Result<String, ChainError> {
        self.chunk_from(0, chunk)
    }

    /// Ends a stream: each plugin, in order, flushes what it held back, and that passes
    /// through the chunk hooks of the plugins after it.
    pub fn on_stream_end(&mut self) -> Result<String, ChainError> {
        let mut out = String::new();
        for i in 0..self.saw_request {
            let action = self.call(i, Hook::StreamEnd, |p, s| p.call_on_stream_end(s))?;
            let flushed = self.response_action(i, Hook::StreamEnd, action)?;
            out.push_str(&self.chunk_from(i + 1, flushed)?);
        }
        Ok(out)
    }
}

/// Resets fuel and the deadline before a call.
fn arm(store: &mut Store<PluginState>, limits: &Limits) -> Result<(), PluginError> {
    store.data_mut().limiter.refused = false;
    store
        .set_fuel(limits.fuel.unwrap_or(u64::MAX))
        .map_err(|e| PluginError::Instantiate(e.to_string()))?;
    match limits.deadline {
        Some(d) => {
            let ticks = d.as_micros().div_ceil(EPOCH_TICK.as_micros()).max(1) as u64;
            store.set_epoch_deadline(ticks);
            store.data_mut().deadline = Some(Instant::now() + d);
        }
        None => {
            store.set_epoch_deadline(u64::MAX / 2);
            store.data_mut().deadline = None;
        }
    }
    store.epoch_deadline_trap();
    Ok(())
}

/// Names what went wrong in a call: the trap codes first (a deadline or fuel stop is
/// what ended the call even if a growth was refused earlier), then a refused growth
/// (the guest's allocator aborts with `unreachable`), then data-transfer errors.
fn classify(e: wasmtime::Error, store: &Store<PluginState>, limits: &Limits) -> PluginError {
    if let Some(b) = e.downcast_ref::<InferBudgetExceeded>() {
        return PluginError::InferBudget(b.0);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => {
            return PluginError::Deadline(
                limits
                    .deadline
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            );
        }
        Some(Trap::OutOfFuel) => return PluginError::OutOfFuel(limits.fuel.unwrap_or(0)),
        _ => {}
    }
    if store.data().limiter.refused {
        return PluginError::MemoryLimit(limits.memory_bytes);
    }
    if e.downcast_ref::<std::str::Utf8Error>().is_some()
        || e.downcast_ref::<std::char::DecodeUtf16Error>().is_some()
    {
        return PluginError::InvalidUtf8;
    }
    if let Some(t) = e.downcast_ref::<Trap>() {
        return PluginError::Trap(t.to_string());
    }
    // wasmtime's hostcall-fuel error type is private; its message is stable.
    let text = format!("{e:#}");
    if text.contains("too much data is being copied between the host and the guest") {
        return PluginError::OutputTooLarge;
    }
    PluginError::Trap(text)
}
