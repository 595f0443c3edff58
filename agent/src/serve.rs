//! The device's OpenAI-compatible API: `POST /v1/chat/completions` (streamed as SSE or
//! not), `GET /v1/models`, and `/healthz`, `/readyz`, `/metrics`.
//!
//! Bad requests get 400 with an OpenAI error object naming the field; a full queue gets
//! 429 with `Retry-After`; a client that disconnects stops its generation (dropping the
//! response drops the event receiver, which the engine notices at the next token).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::engine::{ChatMessage, Engine, Event, Sampling, SubmitError, is_chat_role};
use crate::plugins::{Chain, ChainError, ChainRun, PluginRequest, RequestOutcome, SubPrompt};

/// Largest request body.
const MAX_BODY_BYTES: usize = 1 << 20;
/// Seconds a client should wait after a 429.
const RETRY_AFTER_SECONDS: &str = "1";

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            param: Some(param.to_owned()),
            code: None,
            message: message.into(),
        }
    }

    fn server(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            param: None,
            code: None,
            message: message.into(),
        }
    }

    /// A plugin refused or failed: 400 for a refused request, 502 for a refused answer
    /// (the model's output did not pass), 500 for a plugin that failed.
    fn plugin(e: ChainError) -> Self {
        let (status, kind, code) = match &e {
            ChainError::Rejected { hook, .. } if *hook == "on-request" => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "plugin_rejected",
            ),
            ChainError::Rejected { .. } => (
                StatusCode::BAD_GATEWAY,
                "server_error",
                "plugin_rejected_response",
            ),
            ChainError::Failed { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "plugin_failed",
            ),
        };
        Self {
            status,
            kind,
            param: None,
            code: Some(code),
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(
            json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}),
        );
        let mut resp = (self.status, body).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        resp
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A validated chat completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// Messages.
    pub messages: Vec<ChatMessage>,
    /// Sampling.
    pub sampling: Sampling,
    /// Stream as SSE.
    pub stream: bool,
    /// Include usage in the last streamed chunk.
    pub stream_usage: bool,
    /// `response_format: {"type": "json_object"}`: the client wants one JSON value.
    pub json_mode: bool,
}

/// Validates an OpenAI chat completion body, naming the offending field.
pub fn parse_chat_request(body: &Value, served: &str, n_ctx: u32) -> Result<ChatRequest, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad("body", "the body must be a JSON object"))?;
    if let Some(model) = obj.get("model") {
        let m = model
            .as_str()
            .ok_or_else(|| ApiError::bad("model", "model must be a string"))?;
        if m != served {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                param: Some("model".into()),
                code: Some("model_not_found"),
                message: format!("model {m:?} is not served here; this device serves {served:?}"),
            });
        }
    }
    let raw = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad("messages", "messages must be a non-empty array"))?;
    if raw.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "messages must be a non-empty array",
        ));
    }
    let mut messages = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::bad(&format!("messages[{i}].role"), "role must be a string")
        })?;
        if !is_chat_role(role) {
            return Err(ApiError::bad(
                &format!("messages[{i}].role"),
                format!("unsupported role {role:?}"),
            ));
        }
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => Ok(t.to_owned()),
                        _ => Err(ApiError::bad(
                            &format!("messages[{i}].content"),
                            "only text content parts are supported",
                        )),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(""),
            _ => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].content"),
                    "content must be a string",
                ));
            }
        };
        if content.contains('\0') {
            return Err(ApiError::bad(
                &format!("messages[{i}].content"),
                "content must not contain NUL",
            ));
        }
        messages.push(ChatMessage {
            role: role.to_owned(),
            content,
        });
    }
    let num = |name: &str| obj.get(name).filter(|v| !v.is_null());
    let max_tokens = match num("max_completion_tokens").or_else(|| num("max_tokens")) {
        None => 256.min(n_ctx / 2),
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 1 && n < u64::from(n_ctx))
            .ok_or_else(|| {
                ApiError::bad(
                    "max_tokens",
                    format!(
                        "max_tokens must be an integer from 1 to {}",
                        n_ctx.saturating_sub(1)
                    ),
                )
            })? as u32,
    };
    let temperature = match num("temperature") {
        None => 1.0,
        Some(v) => v
            .as_f64()
            .filter(|t| (0.0..=2.0).contains(t))
            .ok_or_else(|| ApiError::bad("temperature", "temperature must be between 0 and 2"))?
            as f32,
    };
    let top_p = match num("top_p") {
        None => 1.0,
        Some(v) => v
            .as_f64()
            .filter(|p| *p > 0.0 && *p <= 1.0)
            .ok_or_else(|| ApiError::bad("top_p", "top_p must be in (0, 1]"))?
            as f32,
    };
    let seed = match num("seed") {
        None => 0xED6E_F1EE,
        // u32::MAX is llama.cpp's "pick a random seed": a fixed seed must be below it.
        Some(v) => v
            .as_u64()
            .and_then(|s| u32::try_from(s).ok())
            .filter(|&s| s != u32::MAX)
            .ok_or_else(|| ApiError::bad("seed", "seed must be an integer from 0 to 4294967294"))?,
    };
    let stop = match num("stop") {
        None => vec![],
        Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().filter(|s| !s.is_empty()).map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::bad("stop", "stop must be a string or up to 4 non-empty strings")
            })?,
        Some(_) => {
            return Err(ApiError::bad(
                "stop",
                "stop must be a string or up to 4 non-empty strings",
            ));
        }
    };
    if let Some(n) = num("n")
        && n.as_u64() != Some(1)
    {
        return Err(ApiError::bad("n", "only n = 1 is supported"));
    }
    let stream = match num("stream") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::bad("stream", "stream must be a boolean"))?,
    };
    // An extension (as in vLLM): generate exactly max_tokens, for benchmarks.
    let ignore_eos = match num("ignore_eos") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::bad("ignore_eos", "ignore_eos must be a boolean"))?,
    };
    let stream_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let json_mode = match obj.get("response_format").filter(|v| !v.is_null()) {
        None => false,
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => false,
            Some("json_object") => true,
            _ => {
                return Err(ApiError::bad(
                    "response_format.type",
                    "response_format.type must be \"text\" or \"json_object\"",
                ));
            }
        },
    };
    Ok(ChatRequest {
        json_mode,
        messages,
        sampling: Sampling {
            max_tokens,
            temperature,
            top_p,
            seed,
            stop,
            ignore_eos,
        },
        stream,
        stream_usage,
    })
}

/// The model being served, with its plugin chain. Empty while the first model loads
/// (`/readyz` answers 503 "loading"). [`Serving::install`] swaps in a new engine for new
/// requests; requests in flight keep the engine (and plugins) they started on, whose
/// slots finish them, then exit and unload that model when the last one ends.
#[derive(Debug, Default)]
pub struct Serving {
    current: std::sync::RwLock<Option<Served>>,
    no_model: std::sync::atomic::AtomicBool,
}

/// One model and the plugins its requests pass through.
#[derive(Debug, Clone)]
struct Served {
    engine: Arc<Engine>,
    plugins: Option<Chain>,
}

impl Serving {
    /// Nothing served yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Says that no model is coming (rather than loading): `/readyz` answers "no model".
    pub fn set_no_model(&self) {
        self.no_model.store(true, Ordering::Relaxed);
    }

    /// Stops serving: new requests get 503 "no model"; requests in flight finish on the
    /// engine they started on. Returns the engine that was served.
    pub fn uninstall(&self) -> Option<Arc<Engine>> {
        self.set_no_model();
        let previous = match self.current.write() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        previous.map(|p| p.engine)
    }

    /// The engine served now.
    pub fn current_engine(&self) -> Option<Arc<Engine>> {
        self.engine().ok()
    }

    /// Serves `engine`, with no plugins, from now on; returns the previous engine (which
    /// drains once dropped).
    pub fn install(&self, engine: Engine) -> Option<Arc<Engine>> {
        self.install_with_plugins(Arc::new(engine), None)
    }

    /// Serves `engine` behind `plugins` from now on; returns the previous engine.
    pub fn install_with_plugins(
        &self,
        engine: Arc<Engine>,
        plugins: Option<Chain>,
    ) -> Option<Arc<Engine>> {
        let next = Served {
            engine,
            plugins: plugins.filter(|c| !c.is_empty()),
        };
        let previous = match self.current.write() {
            Ok(mut g) => g.replace(next),
            Err(poisoned) => poisoned.into_inner().replace(next),
        };
        previous.map(|p| p.engine)
    }

    fn served(&self) -> Result<Served, ApiError> {
        let current = match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        current.ok_or_else(|| {
            ApiError::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the model is loading",
            )
        })
    }

    fn engine(&self) -> Result<Arc<Engine>, ApiError> {
        self.served().map(|s| s.engine)
    }
}

/// The `infer` import of plugins: a sub-prompt on the served model, through the same
/// bounded queue as API requests. Holds the engine weakly, so that a chain kept alive by
/// a request in flight does not keep an unloaded model in memory.
#[derive(Debug)]
pub struct EngineSubPrompt {
    engine: std::sync::Weak<Engine>,
    runtime: tokio::runtime::Handle,
}

impl EngineSubPrompt {
    /// Sub-prompts on `engine`, waited for on `runtime`.
    pub fn new(engine: &Arc<Engine>, runtime: tokio::runtime::Handle) -> Arc<Self> {
        Arc::new(Self {
            engine: Arc::downgrade(engine),
            runtime,
        })
    }
}

impl SubPrompt for EngineSubPrompt {
    fn infer(
        &self,
        messages: Vec<ChatMessage>,
        max_tokens: u32,
        temperature: f32,
        deadline: Option<std::time::Instant>,
    ) -> Result<String, String> {
        let engine = self.engine.upgrade().ok_or("the model was unloaded")?;
        if let Some((_, t)) = engine.control_token_in(&messages) {
            return Err(format!("content contains the control token {t:?}"));
        }
        if messages.is_empty() || messages.iter().any(|m| !is_chat_role(&m.role)) {
            return Err("messages must be non-empty, with roles system, user or assistant".into());
        }
        let sampling = Sampling {
            max_tokens,
            temperature,
            top_p: 1.0,
            seed: 0xED6E_F1EE,
            stop: vec![],
            ignore_eos: false,
        };
        let mut rx = engine
            .submit(messages, sampling)
            .map_err(|e| e.to_string())?;
        let collect = async move {
            let mut text = String::new();
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Delta(d) => text.push_str(&d),
                    Event::Done { .. } => return Ok(text),
                    Event::Failed(m) => return Err(m),
                }
            }
            Err("the generation ended without a result".to_owned())
        };
        // Runs on a blocking thread (plugins never run on the async workers); dropping
        // the receiver at the deadline stops the generation.
        self.runtime.block_on(async move {
            match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), collect)
                    .await
                    .unwrap_or_else(|_| Err("the call's deadline passed during infer".into())),
                None => collect.await,
            }
        })
    }
}

/// The API routes over whatever `serving` holds.
pub fn router(serving: Arc<Serving>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(serving)
}

async fn readyz(State(serving): State<Arc<Serving>>) -> Response {
    let engine = match serving.engine() {
        Ok(e) => e,
        Err(_) if serving.no_model.load(Ordering::Relaxed) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "no model").into_response();
        }
        Err(_) => return (StatusCode::SERVICE_UNAVAILABLE, "loading").into_response(),
    };
    if engine.has_capacity() {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no free slot").into_response()
    }
}

async fn models(State(serving): State<Arc<Serving>>) -> Result<Json<Value>, ApiError> {
    let engine = serving.engine()?;
    Ok(Json(
        json!({"object": "list", "data": [{"id": engine.config().served_name, "object": "model", "created": 0, "owned_by": "edgefleet"}]}),
    ))
}

async fn metrics(State(serving): State<Arc<Serving>>) -> Result<Response, ApiError> {
    let Served { engine, plugins } = serving.served()?;
    let s = engine.stats();
    let generated = s.generated_tokens.load(Ordering::Relaxed);
    let micros = s.generation_micros.load(Ordering::Relaxed).max(1);
    let body = format!(
        "# TYPE edgefleet_requests_total counter\nedgefleet_requests_total {}\n\
         # TYPE edgefleet_request_failures_total counter\nedgefleet_request_failures_total {}\n\
         # TYPE edgefleet_generations_cancelled_total counter\nedgefleet_generations_cancelled_total {}\n\
         # TYPE edgefleet_generated_tokens_total counter\nedgefleet_generated_tokens_total {generated}\n\
         # TYPE edgefleet_prompt_tokens_total counter\nedgefleet_prompt_tokens_total {}\n\
         # TYPE edgefleet_generation_tokens_per_second gauge\nedgefleet_generation_tokens_per_second {:.3}\n\
         # TYPE edgefleet_time_to_first_token_seconds_sum counter\nedgefleet_time_to_first_token_seconds_sum {:.6}\n\
         # TYPE edgefleet_queue_depth gauge\nedgefleet_queue_depth {}\n\
         # TYPE edgefleet_busy_slots gauge\nedgefleet_busy_slots {}\n\
         # TYPE edgefleet_model_load_seconds gauge\nedgefleet_model_load_seconds {:.3}\n",
        s.requests.load(Ordering::Relaxed),
        s.failures.load(Ordering::Relaxed),
        s.cancelled.load(Ordering::Relaxed),
        s.prompt_tokens.load(Ordering::Relaxed),
        generated as f64 * 1e6 / micros as f64,
        s.ttft_micros.load(Ordering::Relaxed) as f64 / 1e6,
        s.waiting(),
        s.busy.load(Ordering::Relaxed),
        engine.load_millis() as f64 / 1e3,
    );
    let mut body = body;
    body.push_str(&format!(
        "# TYPE edgefleet_model_size_bytes gauge\nedgefleet_model_size_bytes {}\n\
         # TYPE edgefleet_model_parameters gauge\nedgefleet_model_parameters {}\n",
        engine.model_bytes(),
        engine.model_params(),
    ));
    if let Some(rss) = resident_bytes() {
        body.push_str(&format!(
            "# TYPE edgefleet_process_resident_memory_bytes gauge\nedgefleet_process_resident_memory_bytes {rss}\n"
        ));
    }
    if let Some(chain) = plugins {
        body.push_str(&chain.metrics().render());
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

async fn chat(
    State(serving): State<Arc<Serving>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let Served { engine, plugins } = serving.served()?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad("body", format!("invalid JSON: {e}")))?;
    let req = parse_chat_request(
        &value,
        &engine.config().served_name,
        engine.config().context_size,
    )?;
    refuse_control_tokens(&engine, &req.messages)?;
    let id = format!(
        "chatcmpl-{:016x}",
        rand_core::RngCore::next_u64(&mut rand_core::OsRng)
    );
    let model = engine.config().served_name.clone();
    let created = now();
    let plugin_req = PluginRequest {
        messages: req.messages.clone(),
        max_tokens: req.sampling.max_tokens,
        temperature: req.sampling.temperature,
        json_mode: req.json_mode,
        streamed: req.stream,
    };
    let mut run = plugins.as_ref().map(Chain::start);
    let mut messages = req.messages;
    if let Some(r) = run.take() {
        let pr = plugin_req.clone();
        let (r, outcome) = blocking(r, move |r| r.on_request(&pr)).await?;
        match outcome.map_err(ApiError::plugin)? {
            RequestOutcome::Proceed(m) => {
                // A plugin's rewrite must not smuggle in role markers either.
                refuse_control_tokens(&engine, &m)?;
                messages = m;
            }
            RequestOutcome::Answered(text) => {
                return Ok(answer_directly(
                    id,
                    model,
                    created,
                    text,
                    req.stream,
                    req.stream_usage,
                ));
            }
        }
        run = Some(r);
    }
    let rx = engine.submit(messages, req.sampling).map_err(|e| match e {
        SubmitError::QueueFull(_) => ApiError::server(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            e.to_string(),
        ),
        SubmitError::Stopped => ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            e.to_string(),
        ),
    })?;
    if !req.stream {
        let mut rx = rx;
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Delta(d) => text.push_str(&d),
                Event::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    if let Some(r) = run {
                        let (_, out) = blocking(r, move |r| r.on_response(text)).await?;
                        text = out.map_err(ApiError::plugin)?;
                    }
                    return Ok(Json(json!({
                        "id": id, "object": "chat.completion", "created": created, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
                    }))
                    .into_response());
                }
                Event::Failed(m) => return Err(failed(m)),
            }
        }
        return Err(failed("the generation ended without a result".into()));
    }
    let rx = match run {
        Some(r) => through_plugins(rx, r),
        None => rx,
    };
    let include_usage = req.stream_usage;
    // A null delta makes the usage-only chunk (no choices), as OpenAI sends it.
    let chunk = move |delta: Value, finish: Value, usage: Option<Value>| {
        let choices = if delta.is_null() {
            json!([])
        } else {
            json!([{"index": 0, "delta": delta, "finish_reason": finish}])
        };
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices});
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        SseEvent::default().data(c.to_string())
    };
    let stream = async_stream_events(rx, chunk, include_usage);
    Ok(Sse::new(stream).into_response())
}

fn refuse_control_tokens(engine: &Engine, messages: &[ChatMessage]) -> Result<(), ApiError> {
    match engine.control_token_in(messages) {
        Some((i, t)) => Err(ApiError::bad(
            &format!("messages[{i}].content"),
            format!("content contains the control token {t:?}"),
        )),
        None => Ok(()),
    }
}

/// Runs plugin code on a blocking thread (a call may take up to its deadline), handing
/// the request's chain state there and back.
async fn blocking<T: Send + 'static>(
    run: ChainRun,
    f: impl FnOnce(&mut ChainRun) -> T + Send + 'static,
) -> Result<(ChainRun, T), ApiError> {
    tokio::task::spawn_blocking(move || {
        let mut run = run;
        let out = f(&mut run);
        (run, out)
    })
    .await
    .map_err(|e| {
        ApiError::server(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("plugin task: {e}"),
        )
    })
}

/// The answer a plugin gave instead of the model (no tokens used).
fn answer_directly(
    id: String,
    model: String,
    created: u64,
    text: String,
    stream: bool,
    include_usage: bool,
) -> Response {
    if !stream {
        return Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        Ok::<_, Infallible>(SseEvent::default().data(
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            .to_string(),
        ))
    };
    let mut events = vec![
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": text}), Value::Null),
        chunk(json!({}), json!("stop")),
    ];
    if include_usage {
        events.push(Ok(SseEvent::default().data(
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
            .to_string(),
        )));
    }
    events.push(Ok(SseEvent::default().data("[DONE]")));
    Sse::new(futures::stream::iter(events)).into_response()
}

/// Passes a stream of engine events through the plugins' chunk hooks. Stops (and so
/// stops generation, by dropping the engine's receiver) when the client goes away, even
/// while a plugin holds every chunk back.
fn through_plugins(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    run: ChainRun,
) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    let (tx, out) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut run = run;
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                () = tx.closed() => return,
            };
            let Some(ev) = ev else {
                let _ = tx.send(Event::Failed(
                    "the generation ended without a result".into(),
                ));
                return;
            };
            let (next, result) = match ev {
                Event::Delta(d) => match blocking(run, move |r| r.on_chunk(d)).await {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Event::Failed(e.message));
                        return;
                    }
                },
                Event::Done { .. } => {
                    let (_, flushed) = match blocking(run, |r| r.on_stream_end()).await {
                        Ok(x) => x,
                        Err(e) => {
                            let _ = tx.send(Event::Failed(e.message));
                            return;
                        }
                    };
                    match flushed {
                        Ok(text) => {
                            if !text.is_empty() {
                                let _ = tx.send(Event::Delta(text));
                            }
                            let _ = tx.send(ev);
                        }
                        Err(e) => {
                            let _ = tx.send(Event::Failed(stream_error(&e)));
                        }
                    }
                    return;
                }
                failed @ Event::Failed(_) => {
                    let _ = tx.send(failed);
                    return;
                }
            };
            run = next;
            match result {
                Ok(text) if text.is_empty() => {}
                Ok(text) => {
                    if tx.send(Event::Delta(text)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Event::Failed(stream_error(&e)));
                    return;
                }
            }
        }
    });
    out
}

/// The error event text for a plugin that refused or failed mid-stream: the same
/// message and code the non-streamed API would give.
fn stream_error(e: &ChainError) -> String {
    let code = match e {
        ChainError::Rejected { .. } => "plugin_rejected_response",
        ChainError::Failed { .. } => "plugin_failed",
    };
    format!("{code}: {e}")
}

/// The process's resident memory (`VmRSS`, Linux).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn failed(message: String) -> ApiError {
    if message.contains("exceeds the context") {
        return ApiError::bad("max_tokens", message);
    }
    ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
}

/// SSE events: a role chunk, content chunks, the final chunk (finish reason), with
/// `stream_options.include_usage` a usage chunk with no choices, then `[DONE]`.
fn async_stream_events(
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    chunk: impl Fn(Value, Value, Option<Value>) -> SseEvent + Send + 'static,
    include_usage: bool,
) -> impl futures::Stream<Item = Result<SseEvent, Infallible>> {
    use std::collections::VecDeque;
    let first = chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
        None,
    );
    let state = (rx, VecDeque::from([first]), false, chunk);
    futures::stream::unfold(
        state,
        move |(mut rx, mut pending, done, chunk)| async move {
            if let Some(ev) = pending.pop_front() {
                return Some((Ok(ev), (rx, pending, done, chunk)));
            }
            if done {
                return None;
            }
            match rx.recv().await {
                Some(Event::Delta(d)) => {
                    let ev = chunk(json!({"content": d}), Value::Null, None);
                    Some((Ok(ev), (rx, pending, false, chunk)))
                }
                Some(Event::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    let last = chunk(json!({}), json!(finish_reason), None);
                    if include_usage {
                        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens});
                        pending.push_back(chunk(Value::Null, Value::Null, Some(usage)));
                    }
                    pending.push_back(SseEvent::default().data("[DONE]"));
                    Some((Ok(last), (rx, pending, true, chunk)))
                }
                Some(Event::Failed(m)) => {
                    let ev = SseEvent::default()
                        .data(json!({"error": {"message": m, "type": "server_error"}}).to_string());
                    pending.push_back(SseEvent::default().data("[DONE]"));
                    Some((Ok(ev), (rx, pending, true, chunk)))
                }
                // The engine went away without a result: say so rather than just stop.
                None => {
                    let ev = SseEvent::default().data(
                        json!({"error": {"message": "the generation ended without a result", "type": "server_error"}})
                            .to_string(),
                    );
                    pending.push_back(SseEvent::default().data("[DONE]"));
                    Some((Ok(ev), (rx, pending, true, chunk)))
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(body: Value) -> Result<ChatRequest, ApiError> {
        parse_chat_request(&body, "m", 1024)
    }

    fn hi() -> Value {
        json!([{"role": "user", "content": "hi"}])
    }

    #[test]
    fn response_format_sets_json_mode() {
        assert!(!parse(json!({"messages": hi()})).unwrap().json_mode);
        let text = json!({"messages": hi(), "response_format": {"type": "text"}});
        assert!(!parse(text).unwrap().json_mode);
        let json_object = json!({"messages": hi(), "response_format": {"type": "json_object"}});
        assert!(parse(json_object).unwrap().json_mode);
        for bad in [json!({"type": "json_schema"}), json!("json"), json!({})] {
            let e = parse(json!({"messages": hi(), "response_format": bad})).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("response_format.type"), "{bad}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn ignore_eos_is_a_boolean_extension() {
        assert!(
            !parse(json!({"messages": hi()}))
                .unwrap()
                .sampling
                .ignore_eos
        );
        let on = json!({"messages": hi(), "ignore_eos": true});
        assert!(parse(on).unwrap().sampling.ignore_eos);
        let e = parse(json!({"messages": hi(), "ignore_eos": "yes"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("ignore_eos"));
    }
}
