//! The WASI context a plugin instance gets: no arguments, no environment, no preopened
//! directories, no network and a frozen clock, unless its [`Grants`] say otherwise.

use std::time::Duration;

use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::PluginError;
use super::host::PluginState;
use super::limits::Grants;

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
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

/// The WASI context for an instance with `grants`.
pub(super) fn wasi_ctx(grants: &Grants) -> Result<WasiCtx, PluginError> {
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
        // wasmtime-wasi allows no TCP or UDP by default, whatever the address check.
        b.inherit_network()
            .allow_tcp(true)
            .allow_udp(true)
            .allow_ip_name_lookup(true);
    } else {
        b.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
    }
    Ok(b.build())
}
