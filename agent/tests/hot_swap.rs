//! Swapping the served model keeps requests in flight: a streamed request started on
//! the old model finishes there, new requests go to the new one, and `/readyz` says
//! "loading" until a model is installed. Uses the real SmolLM2 model (twice).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use edgefleet_agent::engine::{Engine, EngineConfig};
use edgefleet_agent::serve::{Serving, router};
use serde_json::json;

mod common;

fn engine(name: &str) -> Engine {
    Engine::load(EngineConfig {
        model_path: common::model(),
        served_name: name.into(),
        context_size: 512,
        threads: 1,
        gpu_layers: 0,
        parallel_slots: 1,
        queue_depth: 2,
        plaintext: None,
        provenance: None,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_swap_keeps_requests_in_flight() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let serving = Serving::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, router(serving.clone())).into_future());
    let http = reqwest::Client::new();

    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.text().await.unwrap(), "loading");
    let chat = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!(chat.send().await.unwrap().status(), 503, "no model yet");

    assert!(
        serving
            .install(tokio::task::spawn_blocking(|| engine("old")).await.unwrap())
            .is_none()
    );
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let mut stream = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "old", "messages": [{"role": "user", "content": "Tell me about lighthouses."}],
            "max_tokens": 48, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut body = stream.chunk().await.unwrap().unwrap().to_vec();

    // Swap while the request is mid-stream; nothing keeps the old engine but the request.
    let old = serving
        .install(tokio::task::spawn_blocking(|| engine("new")).await.unwrap())
        .unwrap();
    let weak = std::sync::Arc::downgrade(&old);
    drop(old);

    while let Some(chunk) = stream.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("\"finish_reason\":\"length\"")
            || text.contains("\"finish_reason\":\"stop\""),
        "{text}"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        weak.upgrade().is_none(),
        "the old engine is released once its request ends"
    );

    let ask = |model: &str| {
        http.post(format!("{base}/v1/chat/completions"))
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
            .send()
    };
    assert_eq!(ask("old").await.unwrap().status(), 404);
    assert_eq!(ask("new").await.unwrap().status(), 200);
}
