//! `edgefleet-agent serve` with the real SmolLM2-135M-Instruct model, driven by the
//! official `openai` Python client (installed by scripts/test; the model comes from
//! scripts/fetch-model.sh).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{free_port, model, python};

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .args([
            "serve",
            "--allow-unsigned",
            "--served-name",
            "smollm2",
            "--threads",
            "2",
            "--context-size",
            "1024",
        ])
        .arg("--model")
        .arg(model())
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        if Command::new("curl")
            .args(["-sf", &format!("{base}/readyz")])
            .output()
            .unwrap()
            .status
            .success()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the agent did not become ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Server { child, base }
}

fn client(server: &Server, scenario: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/openai_client.py");
    let out: Output = Command::new(python())
        .arg(script)
        .args([&server.base, "smollm2", scenario])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{scenario}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{scenario}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn metrics_text(server: &Server) -> String {
    let out = Command::new("curl")
        .args(["-sf", &format!("{}/metrics", server.base)])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn metric(server: &Server, name: &str) -> f64 {
    metrics_text(server)
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

#[test]
fn a_non_streamed_completion_answers_with_usage() {
    let s = start(&[]);
    let r = client(&s, "non-stream");
    assert!(r["content"].as_str().unwrap().contains("Paris"), "{r}");
    assert_eq!(r["finish"], "stop");
    assert_eq!(r["model"], "smollm2");
    assert_eq!(r["object"], "chat.completion");
    let (p, c, t) = (
        r["prompt_tokens"].as_u64().unwrap(),
        r["completion_tokens"].as_u64().unwrap(),
        r["total_tokens"].as_u64().unwrap(),
    );
    assert!(p > 5 && c > 0 && t == p + c, "{r}");
}

#[test]
fn streaming_yields_the_same_greedy_text_in_chunks() {
    let s = start(&[]);
    let r = client(&s, "stream");
    assert_eq!(
        r["streamed"], r["whole"],
        "greedy decoding is deterministic: {r}"
    );
    assert!(r["chunks"].as_u64().unwrap() > 1, "{r}");
    assert_eq!(r["finish"], "stop");
    assert_eq!(r["usage"], r["whole_tokens"]);
}

#[test]
fn concurrent_clients_are_all_served() {
    let s = start(&["--parallel-slots", "2", "--queue-depth", "2"]);
    let r = client(&s, "concurrent");
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    for (i, text) in r["results"].as_array().unwrap().iter().enumerate() {
        assert!(
            !text.as_str().unwrap_or("").is_empty(),
            "client {i} got nothing: {r}"
        );
    }
    assert_eq!(metric(&s, "edgefleet_requests_total"), 3.0);
    // Per model, the latency histograms count every request, with a sum.
    for name in [
        "edgefleet_request_time_to_first_token_seconds",
        "edgefleet_request_duration_seconds",
        "edgefleet_request_tokens_per_second",
    ] {
        assert_eq!(
            metric(&s, &format!("{name}_count{{model=\"smollm2\"}}")),
            3.0,
            "{name}"
        );
        assert!(
            metric(&s, &format!("{name}_sum{{model=\"smollm2\"}}")) > 0.0,
            "{name}"
        );
        assert_eq!(
            metric(
                &s,
                &format!("{name}_bucket{{model=\"smollm2\",le=\"+Inf\"}}")
            ),
            3.0,
            "{name}"
        );
    }
    // Load time and memory are reported.
    assert!(metric(&s, "edgefleet_model_load_seconds") > 0.0);
    let size = metric(&s, "edgefleet_model_size_bytes");
    assert!((50e6..200e6).contains(&size), "{size}");
    assert!(metric(&s, "edgefleet_model_parameters") > 100e6);
    assert!(metric(&s, "edgefleet_process_resident_memory_bytes") > size / 2.0);
}

#[test]
fn a_client_that_disconnects_stops_its_generation() {
    let s = start(&[]);
    let r = client(&s, "disconnect");
    assert_eq!(r["received"], 3);
    // The engine notices at the next token and stops; it never generates the 400 asked.
    let started = Instant::now();
    while metric(&s, "edgefleet_generations_cancelled_total") < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "generation did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(metric(&s, "edgefleet_generated_tokens_total") < 50.0);
    assert_eq!(metric(&s, "edgefleet_busy_slots"), 0.0);
}

#[test]
fn without_a_model_the_agent_is_healthy_but_not_ready() {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        // scripts/test exports the model's path, which `--model` would pick up.
        .env_remove("EDGEFLEET_MODEL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let get = |path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-w", " %{http_code}", &format!("{}{path}", s.base)])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let started = Instant::now();
    while get("/healthz") != "ok 200" {
        assert!(started.elapsed() < Duration::from_secs(20), "not healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get("/readyz"), "no model 503");
    assert!(get("/v1/models").ends_with(" 503"));
}

#[test]
fn ignore_eos_generates_exactly_max_tokens() {
    let s = start(&[]);
    let r = client(&s, "ignore-eos");
    assert_eq!(r["plain_finish"], "stop", "{r}");
    assert!(r["plain_tokens"].as_u64().unwrap() < 40, "{r}");
    assert_eq!(r["forced_finish"], "length", "{r}");
    assert_eq!(r["forced_tokens"], 40, "{r}");
}

#[test]
fn a_full_queue_is_answered_429_with_retry_after() {
    let s = start(&["--parallel-slots", "1", "--queue-depth", "1"]);
    let r = client(&s, "busy");
    assert_eq!(r["second"], "429", "{r}");
    assert_eq!(r["retry_after"], "1");
    assert_eq!(r["type"], "rate_limit_error");
}

#[test]
fn malformed_requests_get_400_naming_the_field() {
    let s = start(&[]);
    let r = client(&s, "bad-requests");
    for field in [
        "body",
        "messages",
        "temperature",
        "max_tokens",
        "messages[0].role",
    ] {
        assert_eq!(r[field]["status"], 400, "{field}: {r}");
        assert_eq!(r[field]["param"], field, "{field}: {r}");
        assert_eq!(r[field]["type"], "invalid_request_error");
    }
    assert_eq!(r["model"]["status"], 404, "{r}");
    // A prompt that does not fit the context is the client's mistake: 400, counted as
    // rejected, never as a failure (which the fleet's error-rate gate judges).
    assert_eq!(r["context"]["status"], 400, "{r}");
    assert_eq!(r["context"]["param"], "max_tokens", "{r}");
    assert_eq!(metric(&s, "edgefleet_request_failures_total"), 0.0);
    assert_eq!(metric(&s, "edgefleet_requests_rejected_total"), 1.0);
    // The server is still healthy afterwards.
    assert!(
        client(&s, "non-stream")["content"]
            .as_str()
            .unwrap()
            .contains("Paris")
    );
}

#[test]
fn serve_refuses_an_unsigned_or_untrusted_model() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .arg("serve")
        .arg("--model")
        .arg(model())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("give --bundle and --public-key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Signed by one key, verified against another: refused before loading.
    let dir = tempfile::tempdir().unwrap();
    let signer = new_key();
    sign(&model(), &signer, &dir.path().join("model.sig"));
    write_public_key(dir.path(), "other.pub", &new_key());
    write_public_key(dir.path(), "signer.pub", &signer);
    let run = |key: &str| serve_signed(dir.path(), key).output().unwrap();
    let out = run("other.pub");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("UntrustedSigner"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With the right key the signature verifies (and binding a TEST-NET address then fails).
    let out = run("signer.pub");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("refusing to load"), "{err}");
}

fn plugin(name: &str) -> String {
    common::plugin(name).to_string_lossy().into_owned()
}

#[test]
fn a_redaction_plugin_visibly_changes_the_answer() {
    // The same greedy prompt, without and with pii-redact on answers only (so that the
    // model still sees the number and repeats it, and the plugin has to catch it).
    let plain = client(&start(&[]), "echo-pii");
    let whole = plain["whole"].as_str().unwrap();
    assert!(
        whole.contains("555-123-4567"),
        "the prompt should make the model repeat the number: {plain}"
    );
    let redacting = start(&[
        "--plugin",
        &plugin("pii_redact"),
        "--plugin-config",
        "pii-redact.requests=false",
    ]);
    let r = client(&redacting, "echo-pii");
    for key in ["whole", "streamed"] {
        let text = r[key].as_str().unwrap();
        assert!(!text.contains("555-123-4567"), "{key}: {r}");
        assert_eq!(text, whole.replace("555-123-4567", "[PHONE]"), "{key}: {r}");
    }
    let m = metrics_text(&redacting);
    for hook in ["on-request", "on-response", "on-chunk", "on-stream-end"] {
        assert!(
            m.contains(&format!(
                "edgefleet_plugin_calls_total{{plugin=\"pii-redact\",hook=\"{hook}\"}}"
            )),
            "{hook}: {m}"
        );
    }
}

#[test]
fn a_hostile_plugin_fails_only_its_request_inside_the_deadline() {
    let s = start(&[
        "--plugin",
        &plugin("hostile"),
        "--plugin-config",
        "hostile.mode=loop",
        "--plugin-config",
        "hostile.trigger=EVIL",
        "--plugin-deadline-ms",
        "200",
    ]);
    let r = client(&s, "hostile");
    assert_eq!(r["failed"]["status"], 500, "{r}");
    assert_eq!(r["failed"]["code"], "plugin_failed", "{r}");
    assert_eq!(r["failed"]["type"], "server_error", "{r}");
    let message = r["failed"]["message"].as_str().unwrap();
    assert!(
        message.contains("Deadline") && message.contains("200 ms"),
        "{message}"
    );
    assert!(r["seconds"].as_f64().unwrap() < 2.0, "{r}");
    assert!(r["next"].as_str().unwrap().contains("Paris"), "{r}");
    assert!(
        metrics_text(&s)
            .contains("edgefleet_plugin_failures_total{plugin=\"hostile\",reason=\"Deadline\"} 1"),
        "{}",
        metrics_text(&s)
    );
    // The plugin's failure is the server's: one of the two requests served failed (what
    // the fleet's error-rate gate reads).
    assert_eq!(metric(&s, "edgefleet_requests_total"), 2.0);
    assert_eq!(metric(&s, "edgefleet_request_failures_total"), 1.0);
}

#[test]
fn a_plugin_sub_prompt_runs_on_the_served_model() {
    let s = start(&[
        "--plugin",
        &plugin("hostile"),
        "--plugin-config",
        "hostile.mode=infer-answer",
        "--plugin-config",
        "hostile.trigger=ASK",
        // The deadline bounds the whole call, sub-prompt included. This test is about the
        // sub-prompt's path, not its speed: on a loaded two-core CI machine eight tokens
        // took longer than 5 s (the deadline itself is tested by the hostile loop above).
        "--plugin-deadline-ms",
        "60000",
    ]);
    let r = client(&s, "ask");
    let answer = r["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{r}");
    // The plugin answered, so the request itself used no tokens; the sub-prompt went
    // through the engine's queue like any request.
    assert_eq!(r["completion_tokens"], 0, "{r}");
    // Streamed, the plugin's answer arrives the same, with the usage chunk asked for.
    assert_eq!(r["streamed"], r["content"], "{r}");
    assert_eq!(r["streamed_usage"], 0, "{r}");
    assert_eq!(metric(&s, "edgefleet_requests_total"), 2.0);
}

#[test]
fn serve_refuses_a_plugin_that_is_not_a_component_or_imports_too_much() {
    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    for (file, reason) in [
        (core.to_string_lossy().into_owned(), "NotAComponent"),
        (plugin("hostile_net"), "ImportNotGranted"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
            .args([
                "serve",
                "--allow-unsigned",
                "--listen",
                "127.0.0.1:0",
                "--plugin",
            ])
            .arg(&file)
            .arg("--model")
            .arg(model())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{file}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(reason), "{file}: {err}");
    }
}

#[test]
fn signed_serving_verifies_each_plugin_too() {
    let dir = tempfile::tempdir().unwrap();
    let signer = new_key();
    let other = new_key();
    sign(&model(), &signer, &dir.path().join("model.sig"));
    write_public_key(dir.path(), "signer.pub", &signer);
    let wasm = dir.path().join("passthrough.wasm");
    std::fs::copy(plugin("passthrough"), &wasm).unwrap();
    let run = |plugin_signer: Option<&SigningKey>| {
        let sig = dir.path().join("passthrough.wasm.sig");
        let _ = std::fs::remove_file(&sig);
        if let Some(k) = plugin_signer {
            sign(&wasm, k, &sig);
        }
        serve_signed(dir.path(), "signer.pub")
            .arg("--plugin")
            .arg(&wasm)
            .output()
            .unwrap()
    };
    let err = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    // Unsigned, the missing bundle is named; signed by another key, the signer is refused.
    for (plugin_signer, refused) in [
        (None, "passthrough.wasm.sig"),
        (Some(&other), "UntrustedSigner"),
    ] {
        let out = run(plugin_signer);
        assert!(!out.status.success(), "{refused}: {}", err(&out));
        assert!(err(&out).contains(refused), "{}", err(&out));
    }
    let good = run(Some(&signer));
    assert!(!err(&good).contains("refusing"), "{}", err(&good));
    assert!(err(&good).contains("plugin loaded"), "{}", err(&good));
}

type SigningKey = edgefleet_trust::model_signing::PrivateKey;

/// A fresh P-256 signing key.
fn new_key() -> SigningKey {
    SigningKey::from_pem(&p256_pem()).unwrap()
}

/// Writes `key`'s public half to `dir/name`.
fn write_public_key(dir: &Path, name: &str, key: &SigningKey) {
    std::fs::write(dir.join(name), key.public_key().to_pem().unwrap()).unwrap();
}

/// Signs `path` (a model, or a plugin) with `key` into the model-signing bundle `sig`.
fn sign(path: &Path, key: &SigningKey, sig: &Path) {
    let bundle =
        edgefleet_trust::model_signing::sign(path, key, None, &Default::default()).unwrap();
    std::fs::write(sig, bundle).unwrap();
}

/// `serve` of the model signed into `dir/model.sig`, trusting `dir/<public_key>`. On a
/// TEST-NET address: startup gets past every check, then cannot bind.
fn serve_signed(dir: &Path, public_key: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"));
    cmd.args(["serve", "--listen", "192.0.2.1:80", "--model"])
        .arg(model())
        .arg("--bundle")
        .arg(dir.join("model.sig"))
        .arg("--public-key")
        .arg(dir.join(public_key));
    cmd
}

fn p256_pem() -> String {
    use p256::pkcs8::EncodePrivateKey as _;
    let key = p256::SecretKey::random(&mut rand_core::OsRng);
    key.to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
        .unwrap()
        .to_string()
}

#[test]
fn plugin_work_is_admitted_only_as_far_as_the_engine_admits() {
    // One slot and a queue of one: two requests at once in the plugins, no more.
    let s = start(&[
        "--parallel-slots",
        "1",
        "--queue-depth",
        "1",
        "--plugin",
        &plugin("hostile"),
        "--plugin-config",
        "hostile.mode=loop",
        "--plugin-config",
        "hostile.trigger=EVIL",
        "--plugin-deadline-ms",
        "1500",
    ]);
    let post = |content: &'static str, base: String| {
        std::thread::spawn(move || {
            let body = format!(
                r#"{{"model":"smollm2","messages":[{{"role":"user","content":"{content}"}}],"max_tokens":4}}"#
            );
            let out = Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "-",
                    "-w",
                    "\n%{http_code}",
                    "-H",
                    "content-type: application/json",
                ])
                .args(["--data", &body, &format!("{base}/v1/chat/completions")])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (body, code) = text.rsplit_once('\n').unwrap();
            (code.to_owned(), body.to_owned())
        })
    };
    let held: Vec<_> = (0..3).map(|_| post("EVIL", s.base.clone())).collect();
    let mut results: Vec<(String, String)> = held.into_iter().map(|h| h.join().unwrap()).collect();
    results.sort();
    let codes: Vec<&str> = results.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(codes, ["429", "500", "500"], "{results:?}");
    assert!(results[0].1.contains("plugins_busy"), "{results:?}");
    assert!(results[1].1.contains("plugin_failed"), "{results:?}");
    // The places are free again once the requests are done.
    let (code, body) = post("What is the capital of France?", s.base.clone())
        .join()
        .unwrap();
    assert_eq!(code, "200", "{body}");
}
