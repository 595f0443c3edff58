//! What a plugin instance's store holds ([`PluginState`]), and the host side of the
//! `edgefleet:plugin/host` imports: `infer` (a bounded sub-prompt on the served model),
//! `log` and `config`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::WasiCtx;

use super::SubPrompt;
use super::bindings;
use super::bindings::edgefleet::plugin::types::{InferParams, LogLevel, Message};
use super::limits::{Limiter, MAX_INFER_CALLS, MAX_INFER_TOKENS};
use crate::engine::ChatMessage;

/// An error a host import raises to stop the plugin.
#[derive(Debug, thiserror::Error)]
#[error("infer budget of {0} calls exceeded")]
pub(super) struct InferBudgetExceeded(pub(super) u32);

/// What one plugin instance's store holds.
pub struct PluginState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limiter: Limiter,
    pub(super) plugin: String,
    pub(super) config: Arc<BTreeMap<String, String>>,
    pub(super) infer: Option<Arc<dyn SubPrompt>>,
    pub(super) infer_calls: Arc<AtomicU64>,
    /// This instance was already told the infer budget is spent.
    pub(super) infer_refused: bool,
    pub(super) deadline: Option<Instant>,
}

impl std::fmt::Debug for PluginState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginState")
            .field("plugin", &self.plugin)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
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
