//! Plugin overhead per request: what the `passthrough` plugin adds to a request (a fresh
//! instance, `on-request` and `on-response`), against the same walk through an empty
//! chain, in alternating rounds. Run by bench/plugins.sh in release mode.
//!
//! Usage: plugin_bench PASSTHROUGH.wasm [REQUESTS_PER_ROUND] [ROUNDS]
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is the report

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_agent::engine::ChatMessage;
use edgefleet_agent::plugins::{
    Chain, Limits, PluginMetrics, PluginRequest, PluginRuntime, PluginSpec, RequestOutcome,
};

fn request() -> PluginRequest {
    PluginRequest {
        messages: vec![
            ChatMessage {
                role: "system".into(),
                content: "You are a helpful assistant on a shop's till.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "What is the capital of France? Answer in one sentence.".into(),
            },
        ],
        max_tokens: 64,
        temperature: 0.0,
        json_mode: false,
        streamed: false,
    }
}

const ANSWER: &str = "The capital of France is Paris, a city on the Seine known for its museums.";

/// One request's walk through `chain`: both hooks (and, with plugins, instantiation).
fn one(chain: &Chain, req: &PluginRequest) -> Duration {
    let started = Instant::now();
    let mut run = chain.start();
    match run.on_request(req).unwrap() {
        RequestOutcome::Proceed(m) => assert_eq!(m.len(), 2),
        RequestOutcome::Answered(_) => panic!("passthrough answered"),
    }
    let text = run.on_response(ANSWER.to_owned()).unwrap();
    assert_eq!(text.len(), ANSWER.len());
    drop(run);
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn main() {
    let mut args = std::env::args().skip(1);
    let wasm = args
        .next()
        .expect("usage: plugin_bench PASSTHROUGH.wasm [N] [ROUNDS]");
    let n: usize = args.next().map_or(20_000, |s| s.parse().unwrap());
    let rounds: usize = args.next().map_or(5, |s| s.parse().unwrap());

    let rt = PluginRuntime::new(None).unwrap();
    let compile = Instant::now();
    let loaded = rt
        .load(PluginSpec {
            name: "passthrough".into(),
            wasm: std::fs::read(&wasm).unwrap(),
            limits: Limits {
                fuel: Some(10_000_000),
                deadline: Some(Duration::from_millis(100)),
                memory_bytes: 16 << 20,
            },
            config: Default::default(),
            grants: Default::default(),
        })
        .unwrap();
    let compile_ms = compile.elapsed().as_secs_f64() * 1e3;
    let metrics = Arc::new(PluginMetrics::default());
    let with = rt.chain(vec![loaded], None, metrics.clone());
    let without = rt.chain(vec![], None, metrics);
    let req = request();

    for _ in 0..1000 {
        one(&with, &req);
        one(&without, &req);
    }
    let (mut plugin, mut baseline) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plugin.extend((0..n).map(|_| one(&with, &req)));
        baseline.extend((0..n).map(|_| one(&without, &req)));
    }
    plugin.sort();
    baseline.sort();
    let (p50, p99) = (percentile(&plugin, 0.5), percentile(&plugin, 0.99));
    let (b50, b99) = (percentile(&baseline, 0.5), percentile(&baseline, 0.99));
    println!(
        "requests={} compile_ms={compile_ms:.1} plugin_p50_us={p50:.1} plugin_p99_us={p99:.1} \
         empty_chain_p50_us={b50:.2} empty_chain_p99_us={b99:.2} overhead_p50_us={:.1}",
        plugin.len(),
        p50 - b50
    );
}
