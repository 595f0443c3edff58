//! Streaming: server-sent events of a streamed completion ([`async_stream_events`]),
//! passing the engine's events through the plugins' chunk hooks ([`through_plugins`]),
//! and running plugin code on a blocking thread ([`blocking`]).

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::Event as SseEvent;
use serde_json::{Value, json};

use crate::engine::Event;
use crate::plugins::{ChainError, ChainRun};

/// Plugin code that did not come back.
#[derive(Debug, thiserror::Error)]
pub(super) enum Stuck {
    /// Its thread ended without a result.
    #[error("plugin task: {0}")]
    Died(String),
    /// It ran past what the plugins' limits allow ([`crate::plugins::Chain::walk_bound`]):
    /// held in a blocking host import, which the deadline cannot interrupt.
    #[error("Deadline: the plugins did not return within {} ms", .0.as_millis())]
    Timeout(Duration),
}

/// Runs plugin code on a blocking thread (a call may take up to its deadline), handing
/// the request's chain state there and back; gives up after `bound`, leaving the
/// thread (and the run, which holds the request's place in the chain's concurrency) to
/// end on its own.
pub(super) async fn blocking<R: Send + 'static, T: Send + 'static>(
    run: R,
    bound: Duration,
    f: impl FnOnce(&mut R) -> T + Send + 'static,
) -> Result<(R, T), Stuck> {
    let task = tokio::task::spawn_blocking(move || {
        let mut run = run;
        let out = f(&mut run);
        (run, out)
    });
    match tokio::time::timeout(bound, task).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(Stuck::Died(e.to_string())),
        Err(_) => Err(Stuck::Timeout(bound)),
    }
}

/// Where a streamed answer's events come from: the engine, or the plugins' chunk hooks.
pub(super) enum Events {
    /// Straight from the engine.
    Engine(tokio::sync::mpsc::UnboundedReceiver<Event>),
    /// Through the plugins ([`through_plugins`]), bounded.
    Plugins(tokio::sync::mpsc::Receiver<Event>),
}

impl Events {
    async fn recv(&mut self) -> Option<Event> {
        match self {
            Self::Engine(rx) => rx.recv().await,
            Self::Plugins(rx) => rx.recv().await,
        }
    }
}

/// Chunks the plugins' stage holds for a client that reads slowly: beyond it the
/// plugins wait, so a plugin that returns large chunks to a slow client cannot grow
/// the agent's memory without end.
pub const CHUNK_BUFFER: usize = 16;

/// How long a streamed answer through plugins waits for a client that reads nothing
/// once [`CHUNK_BUFFER`] is full: past it the answer ends, and with it the request's
/// place in the plugins (a client that stops reading cannot hold places for good).
pub const SEND_PATIENCE: Duration = Duration::from_secs(30);

/// Sends `ev` within [`SEND_PATIENCE`]; false when the client is gone or too slow.
async fn send(tx: &tokio::sync::mpsc::Sender<Event>, ev: Event) -> bool {
    send_within(tx, ev, SEND_PATIENCE).await
}

async fn send_within(tx: &tokio::sync::mpsc::Sender<Event>, ev: Event, patience: Duration) -> bool {
    matches!(
        tokio::time::timeout(patience, tx.send(ev)).await,
        Ok(Ok(()))
    )
}

/// Passes a stream of engine events through the plugins' chunk hooks. Stops (and so
/// stops generation, by dropping the engine's receiver) when the client goes away, even
/// while a plugin holds every chunk back.
pub(super) fn through_plugins(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    run: ChainRun,
    bound: Duration,
    stats: std::sync::Arc<crate::engine::Stats>,
) -> tokio::sync::mpsc::Receiver<Event> {
    // A plugin that fails mid-stream fails the request on the server's side; the
    // engine counts it completed (or cancelled) too.
    let failed_count = stats.clone();
    let failed = move |e: &ChainError| {
        if matches!(e, ChainError::Failed { .. }) {
            failed_count
                .plugin_failures_after
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        stream_error(e)
    };
    let (tx, out) = tokio::sync::mpsc::channel(CHUNK_BUFFER);
    let count = stats;
    let stuck = move |e: Stuck| {
        count
            .plugin_failures_after
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("plugin_failed: {e}")
    };
    tokio::spawn(async move {
        let mut run = run;
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                () = tx.closed() => return,
            };
            let Some(ev) = ev else {
                send(
                    &tx,
                    Event::Failed("the generation ended without a result".into()),
                )
                .await;
                return;
            };
            let (next, result) = match ev {
                Event::Delta(d) => match blocking(run, bound, move |r| r.on_chunk(d)).await {
                    Ok(x) => x,
                    Err(e) => {
                        send(&tx, Event::Failed(stuck(e))).await;
                        return;
                    }
                },
                Event::Done { .. } => {
                    let (_, flushed) = match blocking(run, bound, |r| r.on_stream_end()).await {
                        Ok(x) => x,
                        Err(e) => {
                            send(&tx, Event::Failed(stuck(e))).await;
                            return;
                        }
                    };
                    match flushed {
                        Ok(text) => {
                            if !text.is_empty() {
                                send(&tx, Event::Delta(text)).await;
                            }
                            send(&tx, ev).await;
                        }
                        Err(e) => {
                            send(&tx, Event::Failed(failed(&e))).await;
                        }
                    }
                    return;
                }
                failed @ Event::Failed(_) => {
                    send(&tx, failed).await;
                    return;
                }
            };
            run = next;
            match result {
                Ok(text) if text.is_empty() => {}
                Ok(text) => {
                    if !send(&tx, Event::Delta(text)).await {
                        return;
                    }
                }
                Err(e) => {
                    send(&tx, Event::Failed(failed(&e))).await;
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
    rx: Events,
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
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Marks when it is dropped: a request's run, holding its place in the chain.
    struct Place(Arc<AtomicBool>);
    impl Drop for Place {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_client_that_reads_nothing_is_given_up_on() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let patience = Duration::from_millis(100);
        assert!(send_within(&tx, Event::Delta("a".into()), patience).await);
        // The buffer is full and nobody reads: given up within the patience.
        let started = std::time::Instant::now();
        assert!(!send_within(&tx, Event::Delta("b".into()), patience).await);
        assert!(started.elapsed() < Duration::from_secs(2));
        // Read, there is room again; gone, nothing is sent.
        assert!(matches!(rx.recv().await, Some(Event::Delta(_))));
        assert!(send_within(&tx, Event::Delta("c".into()), patience).await);
        drop(rx);
        assert!(!send_within(&tx, Event::Delta("d".into()), patience).await);
    }

    #[tokio::test]
    async fn plugin_code_held_past_its_bound_fails_the_request_and_keeps_its_place_until_it_returns()
     {
        let freed = Arc::new(AtomicBool::new(false));
        let started = std::time::Instant::now();
        // Held in something the epoch deadline cannot interrupt (a blocking import),
        // until the test lets it go.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let out = blocking(
            Place(freed.clone()),
            Duration::from_millis(200),
            move |_| {
                let _ = held.recv_timeout(Duration::from_secs(30));
            },
        )
        .await;
        assert!(matches!(out, Err(Stuck::Timeout(_))), "{:?}", out.err());
        assert!(started.elapsed() < Duration::from_millis(1000));
        assert!(
            out.err().unwrap().to_string().starts_with("Deadline"),
            "named like a deadline stop"
        );
        // The request is answered, but its place is held until the code returns.
        assert!(!freed.load(Ordering::SeqCst));
        release.send(()).unwrap();
        let returned = std::time::Instant::now();
        while !freed.load(Ordering::SeqCst) {
            assert!(
                returned.elapsed() < Duration::from_secs(10),
                "the place was not freed when the code returned"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Within the bound: the state and the result come back.
        let (place, n) = blocking(Place(Arc::default()), Duration::from_secs(5), |_| 7)
            .await
            .unwrap();
        assert_eq!(n, 7);
        drop(place);
    }
}
