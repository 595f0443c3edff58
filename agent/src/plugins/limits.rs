//! Plugin limits: the per-call [`Limits`] and the sandbox's [`Grants`], the constants
//! that bound every instance (epoch tick, stack, memory reservation, transfer size), the
//! [`ResourceLimiter`] that caps memory and tables, arming fuel and the deadline before
//! each call ([`arm`]), and naming what stopped a call ([`classify`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use wasmtime::{ResourceLimiter, Store, Trap};

use super::PluginError;
use super::host::{InferBudgetExceeded, PluginState};

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
pub(super) const MEMORY_RESERVATION: u64 = 16 << 20;
/// Unmapped bytes after each linear memory.
pub(super) const MEMORY_GUARD: u64 = 64 << 10;
/// Extra reservation for growth before a memory has to move.
pub(super) const MEMORY_GROWTH_RESERVATION: u64 = 4 << 20;
/// Wasm stack per call.
pub(super) const MAX_WASM_STACK: usize = 512 << 10;
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
    pub(super) fn allows(&self, import: &str) -> bool {
        if ALWAYS_ALLOWED.iter().any(|p| import.starts_with(p)) {
            return true;
        }
        (import.starts_with("wasi:clocks/") && self.clocks)
            || (import.starts_with("wasi:filesystem/") && !self.read_only_dirs.is_empty())
            || (import.starts_with("wasi:sockets/") && self.network)
    }
}

/// Memory and table caps for the whole instance (all its memories together), and the
/// counts of core instances, memories and tables; remembers whether a growth was refused.
#[derive(Debug)]
pub(super) struct Limiter {
    pub(super) memory_bytes: usize,
    pub(super) used: usize,
    /// The last granted growth, (from, to), undone if the growth then fails.
    pub(super) last_grant: (usize, usize),
    pub(super) refused: bool,
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

/// Resets fuel and the deadline before a call.
pub(super) fn arm(store: &mut Store<PluginState>, limits: &Limits) -> Result<(), PluginError> {
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
pub(super) fn classify(
    e: wasmtime::Error,
    store: &Store<PluginState>,
    limits: &Limits,
) -> PluginError {
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
