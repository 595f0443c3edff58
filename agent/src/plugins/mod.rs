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
//!   [`EPOCH_TICK`]) are reset before every call, and a `ResourceLimiter` caps linear
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
//!
//! Here: [`PluginError`] and the [`SubPrompt`] service behind the `infer` import. The
//! rest, by what it does: `runtime` (engine, loading), `chain` (a model's plugins and a
//! request's walk through them), `limits` (limits, grants, resource limiter, naming a
//! failed call), `host` (instance state, host imports), `wasi` (the sandbox's WASI
//! context) and `metrics` (counters for `/metrics`).

use std::time::Instant;

use crate::engine::ChatMessage;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../plugins/wit",
        world: "plugin",
        imports: { "edgefleet:plugin/host.infer": trappable },
    });
}

mod chain;
mod host;
mod limits;
mod metrics;
mod runtime;
mod wasi;

pub use chain::{Chain, ChainError, ChainRun, Hook, PluginRequest, RequestOutcome};
pub use host::PluginState;
pub use limits::{
    EPOCH_TICK, Grants, Limits, MAX_DEADLINE, MAX_INFER_CALLS, MAX_INFER_TOKENS, MAX_TRANSFER_BYTES,
};
pub use metrics::PluginMetrics;
pub use runtime::{LoadedPlugin, PluginRuntime, PluginSpec};

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
