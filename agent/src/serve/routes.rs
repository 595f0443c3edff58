//! The route handlers: `/readyz`, `/v1/models`, `/metrics` and
//! `POST /v1/chat/completions` (through the plugin chain, then the engine; answered
//! whole or streamed).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::receipts::AnsweredBy;
use super::request::parse_chat_request;
use super::streaming::{Events, Stuck, async_stream_events, blocking, through_plugins};
use super::{ApiError, Served, Serving, failed};
use crate::engine::{ChatMessage, Engine, Event, SubmitError};
use crate::plugins::{Chain, PluginRequest, RequestOutcome};

pub(super) async fn readyz(State(serving): State<Arc<Serving>>) -> Response {
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

pub(super) async fn models(State(serving): State<Arc<Serving>>) -> Result<Json<Value>, ApiError> {
    let engine = serving.engine()?;
    Ok(Json(
        json!({"object": "list", "data": [{"id": engine.config().served_name, "object": "model", "created": 0, "owned_by": "edgefleet"}]}),
    ))
}

pub(super) async fn metrics(State(serving): State<Arc<Serving>>) -> Result<Response, ApiError> {
    let Served { engine, plugins } = serving.served()?;
    let s = engine.stats();
    let generated = s.generated_tokens.load(Ordering::Relaxed);
    let micros = s.generation_micros.load(Ordering::Relaxed).max(1);
    let body = format!(
        "# TYPE edgefleet_requests_total counter\nedgefleet_requests_total {}\n\
         # TYPE edgefleet_request_failures_total counter\nedgefleet_request_failures_total {}\n\
         # TYPE edgefleet_requests_rejected_total counter\nedgefleet_requests_rejected_total {}\n\
         # TYPE edgefleet_generations_cancelled_total counter\nedgefleet_generations_cancelled_total {}\n\
         # TYPE edgefleet_generated_tokens_total counter\nedgefleet_generated_tokens_total {generated}\n\
         # TYPE edgefleet_prompt_tokens_total counter\nedgefleet_prompt_tokens_total {}\n\
         # TYPE edgefleet_generation_tokens_per_second gauge\nedgefleet_generation_tokens_per_second {:.3}\n\
         # TYPE edgefleet_queue_depth gauge\nedgefleet_queue_depth {}\n\
         # TYPE edgefleet_busy_slots gauge\nedgefleet_busy_slots {}\n\
         # TYPE edgefleet_model_load_seconds gauge\nedgefleet_model_load_seconds {:.3}\n",
        s.served(),
        s.server_failures(),
        s.rejected.load(Ordering::Relaxed),
        s.cancelled.load(Ordering::Relaxed),
        s.prompt_tokens.load(Ordering::Relaxed),
        generated as f64 * 1e6 / micros as f64,
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
    // Per model: latency and speed histograms (count, sum and buckets), for SLOs.
    let model = format!(
        "model=\"{}\"",
        crate::histogram::label_value(&engine.config().served_name)
    );
    body.push_str(&s.ttft_seconds.render(
        "edgefleet_request_time_to_first_token_seconds",
        "Seconds from a request's start to its first generated token.",
        &model,
    ));
    body.push_str(&s.duration_seconds.render(
        "edgefleet_request_duration_seconds",
        "Seconds from a request's start to its last generated token.",
        &model,
    ));
    body.push_str(&s.request_tokens_per_second.render(
        "edgefleet_request_tokens_per_second",
        "Generation speed of each request, after its prompt.",
        &model,
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

pub(super) async fn chat(
    State(serving): State<Arc<Serving>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let served = serving.served()?;
    // Which model and plugins answer, for a receipt (`receipts`).
    let by = served.engine.config().provenance.clone();
    let mut response = chat_on(served, body).await?;
    if let Some(by) = by {
        response.extensions_mut().insert(AnsweredBy(by));
    }
    Ok(response)
}

async fn chat_on(served: Served, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let Served { engine, plugins } = served;
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
    // Plugin work is admitted before the engine's queue, and bounded the same way.
    let mut run = match &plugins {
        Some(chain) => Some(chain.try_start().ok_or_else(|| {
            ApiError::server_code(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "plugins_busy",
                "as many requests as the model admits are in its plugins; try again shortly",
            )
        })?),
        None => None,
    };
    let bound = plugins.as_ref().map_or(Duration::ZERO, Chain::walk_bound);
    let mut messages = req.messages;
    if let Some(r) = run.take() {
        let pr = plugin_req.clone();
        let (r, outcome) = blocking(r, bound, move |r| r.on_request(&pr))
            .await
            .map_err(|e| stuck(&engine, e, false))?;
        match outcome.map_err(|e| plugin_error(&engine, e, false))? {
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
                        let (_, out) = blocking(r, bound, move |r| r.on_response(text))
                            .await
                            .map_err(|e| stuck(&engine, e, true))?;
                        text = out.map_err(|e| plugin_error(&engine, e, true))?;
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
        Some(r) => Events::Plugins(through_plugins(rx, r, bound, engine.shared_stats())),
        None => Events::Engine(rx),
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

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

/// A plugin's refusal or failure as the API answers it; a failure (trap, fuel,
/// deadline) is the server's and counts as the revision's, `after` the engine answered
/// or before.
fn plugin_error(
    engine: &crate::engine::Engine,
    e: crate::plugins::ChainError,
    after: bool,
) -> ApiError {
    if matches!(e, crate::plugins::ChainError::Failed { .. }) {
        let counter = if after {
            &engine.stats().plugin_failures_after
        } else {
            &engine.stats().plugin_failures_before
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    ApiError::plugin(e)
}

/// Plugin code that did not come back as the API answers it: a failure of the server,
/// counted as the revision's like a plugin failure.
fn stuck(engine: &crate::engine::Engine, e: Stuck, after: bool) -> ApiError {
    let counter = if after {
        &engine.stats().plugin_failures_after
    } else {
        &engine.stats().plugin_failures_before
    };
    counter.fetch_add(1, Ordering::Relaxed);
    ApiError::server_code(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "plugin_failed",
        e.to_string(),
    )
}
