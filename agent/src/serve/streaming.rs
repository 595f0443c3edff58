//! Streaming: server-sent events of a streamed completion ([`async_stream_events`]),
//! passing the engine's events through the plugins' chunk hooks ([`through_plugins`]),
//! and running plugin code on a blocking thread ([`blocking`]).

use std::convert::Infallible;

use axum::http::StatusCode;
use axum::response::sse::Event as SseEvent;
use serde_json::{Value, json};

use super::ApiError;
use crate::engine::Event;
use crate::plugins::{ChainError, ChainRun};

/// Runs plugin code on a blocking thread (a call may take up to its deadline), handing
/// the request's chain state there and back.
pub(super) async fn blocking<T: Send + 'static>(
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

/// Passes a stream of engine events through the plugins' chunk hooks. Stops (and so
/// stops generation, by dropping the engine's receiver) when the client goes away, even
/// while a plugin holds every chunk back.
pub(super) fn through_plugins(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    run: ChainRun,
    stats: std::sync::Arc<crate::engine::Stats>,
) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    // A plugin that fails mid-stream fails the request on the server's side; the
    // engine counts it completed (or cancelled) too.
    let failed = move |e: &ChainError| {
        if matches!(e, ChainError::Failed { .. }) {
            stats
                .plugin_failures_after
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        stream_error(e)
    };
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
                            let _ = tx.send(Event::Failed(failed(&e)));
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
                    let _ = tx.send(Event::Failed(failed(&e)));
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

/// SSE events: a role chunk, content chunks, the final chunk (finish reason), with
/// `stream_options.include_usage` a usage chunk with no choices, then `[DONE]`.
pub(super) fn async_stream_events(
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
