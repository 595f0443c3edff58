//! The plugins of one served model ([`Chain`]) and one request's walk through them
//! ([`ChainRun`]): `on-request` from the first plugin to the last, then the answer (or
//! each streamed chunk, and the end of the stream) through the response hooks of the
//! plugins that saw the request. Each request gets a fresh instance per plugin.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store};

use super::bindings::Plugin;
use super::bindings::edgefleet::plugin::types::{Message, Request, RequestAction, ResponseAction};
use super::host::PluginState;
use super::limits::{Limiter, MAX_DEADLINE, MAX_TRANSFER_BYTES, arm, classify};
use super::metrics::PluginMetrics;
use super::runtime::LoadedPlugin;
use super::wasi::wasi_ctx;
use super::{PluginError, SubPrompt};
use crate::engine::{ChatMessage, is_chat_role};

/// The plugins of one served model, in order.
#[derive(Clone)]
pub struct Chain {
    pub(super) engine: Engine,
    pub(super) plugins: Vec<Arc<LoadedPlugin>>,
    pub(super) infer: Option<Arc<dyn SubPrompt>>,
    pub(super) metrics: Arc<PluginMetrics>,
    /// Requests in the chain at once ([`Chain::try_start`]), shared by its clones.
    pub(super) permits: Arc<tokio::sync::Semaphore>,
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
    pub(super) fn instantiate(
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

    /// Per-request state: one lazily created instance per plugin. Not counted against
    /// the chain's concurrency ([`Chain::try_start`] is).
    pub fn start(&self) -> ChainRun {
        ChainRun {
            chain: self.clone(),
            instances: self.plugins.iter().map(|_| None).collect(),
            saw_request: self.plugins.len(),
            seen: Vec::with_capacity(self.plugins.len()),
            infer_calls: Arc::new(AtomicU64::new(0)),
            _permit: None,
        }
    }

    /// [`Chain::start`], if fewer than the chain's concurrency
    /// ([`Chain::with_concurrency`]) requests are in it now; `None` when it is full. The
    /// request holds its place until its run is dropped, which is after the plugin
    /// code it started has returned (a call stuck in a host import past its deadline
    /// keeps counting), so plugin instances, their memory and the threads they run on
    /// stay bounded whatever clients send.
    pub fn try_start(&self) -> Option<ChainRun> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        let mut run = self.start();
        run._permit = Some(permit);
        Some(run)
    }

    /// This chain, admitting at most `n` (at least 1) requests at once.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.permits = Arc::new(tokio::sync::Semaphore::new(n.max(1)));
        self
    }

    /// The longest one hook's walk through the chain may take by the plugins' limits:
    /// each plugin's deadline (or [`MAX_DEADLINE`] for a plugin bounded by fuel alone),
    /// summed, plus a second for instantiation. The serving side stops waiting then,
    /// even for a call held in a blocking host import that the deadline cannot
    /// interrupt.
    pub fn walk_bound(&self) -> std::time::Duration {
        self.plugins
            .iter()
            .map(|p| p.limits.deadline.unwrap_or(MAX_DEADLINE).min(MAX_DEADLINE))
            .sum::<std::time::Duration>()
            + std::time::Duration::from_secs(1)
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

/// A plugin hook of the `edgefleet:plugin` world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// `on-request`: sees (and may rewrite, refuse or answer) the request.
    Request,
    /// `on-response`: sees the whole answer of a request that was not streamed.
    Response,
    /// `on-chunk`: sees each streamed piece of the answer.
    Chunk,
    /// `on-stream-end`: flushes what the plugin held back of a stream.
    StreamEnd,
}

impl Hook {
    /// The hook's WIT name, as it appears in errors, logs and the `hook` label of metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Request => "on-request",
            Hook::Response => "on-response",
            Hook::Chunk => "on-chunk",
            Hook::StreamEnd => "on-stream-end",
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a chain step did not pass.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ChainError {
    /// A plugin refused, on purpose, with a reason for the client.
    #[error("plugin {plugin:?} refused ({hook}): {reason}")]
    Rejected {
        /// Which plugin.
        plugin: String,
        /// The hook that refused: [`Hook::Request`] refuses the request, the others the
        /// answer.
        hook: Hook,
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

/// A live instance of a plugin, in its own store.
pub(super) struct Live {
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
    /// Its place in the chain's concurrency, when it took one.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl std::fmt::Debug for ChainRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainRun")
            .field("plugins", &self.chain.names())
            .field("saw_request", &self.saw_request)
            .finish_non_exhaustive()
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
            .record_call(&name, hook.as_str(), started.elapsed());
        result.map_err(|error| {
            self.chain.metrics.record_failure(&name, error.reason());
            tracing::warn!(plugin = %name, hook = hook.as_str(), reason = error.reason(), %error, "plugin failed");
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
            hook,
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
