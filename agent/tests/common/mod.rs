//! What the agent's integration tests share: where scripts/test leaves the SmolLM2
//! model, the Python venv and the wasm plugins (each `$EDGEFLEET_…` variable, else its
//! place under the cache), failing the test with a hint when one is missing; and a free
//! local port to serve on.
#![allow(dead_code)] // each test binary uses only some of these

use std::net::TcpListener;
use std::path::PathBuf;

/// `$EDGEFLEET_CACHE`, else `~/.cache/edgefleet` (as scripts/lib.sh sets it).
fn cache() -> PathBuf {
    std::env::var_os("EDGEFLEET_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/edgefleet"))
}

/// `$var` if set, else `rel` under the cache.
fn env_or_cache(var: &str, rel: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| cache().join(rel))
}

fn existing(p: PathBuf, hint: &str) -> PathBuf {
    assert!(p.exists(), "{} missing: {hint}", p.display());
    p
}

/// The SmolLM2-135M-Instruct model from scripts/fetch-model.sh.
pub fn model() -> PathBuf {
    existing(
        env_or_cache("EDGEFLEET_MODEL", "models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        "run scripts/fetch-model.sh (scripts/test does)",
    )
}

/// The venv's Python, with the `openai` client that scripts/test installs.
pub fn python() -> PathBuf {
    existing(
        env_or_cache("EDGEFLEET_PYTHON", "venv/bin/python"),
        "run scripts/test, which installs the openai client",
    )
}

/// `plugins/<name>` built for wasm32-wasip2.
pub fn plugin(name: &str) -> PathBuf {
    let dir = env_or_cache("EDGEFLEET_PLUGINS", "target-wasm/wasm32-wasip2/release");
    existing(
        dir.join(format!("{name}.wasm")),
        "scripts/test builds the plugins (cargo build --target wasm32-wasip2 in plugins/)",
    )
}

/// A local TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
