//! The plugin sandbox with the real example and hostile plugins (built for
//! wasm32-wasip2 from `plugins/` by scripts/test): what each example does, and that
//! every misbehaviour fails its request with a named error inside the deadline while the
//! chain keeps serving the next request.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use edgefleet_agent::engine::ChatMessage;
use edgefleet_agent::plugins::{
    Chain, ChainError, ChainRun, Grants, Limits, MAX_INFER_CALLS, PluginError, PluginMetrics,
    PluginRequest, PluginRuntime, PluginSpec, RequestOutcome, SubPrompt,
};

mod common;

fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(common::plugin(name)).unwrap()
}

fn spec(name: &str, config: &[(&str, &str)], limits: Limits) -> PluginSpec {
    PluginSpec {
        name: name.replace('_', "-"),
        wasm: wasm(name),
        limits,
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        grants: Grants::default(),
    }
}

fn deadline(ms: u64) -> Limits {
    Limits {
        fuel: None,
        deadline: Some(Duration::from_millis(ms)),
        memory_bytes: 32 << 20,
    }
}

/// A sub-prompt service that answers at once and counts its calls.
#[derive(Default)]
struct CountingInfer(AtomicU32);

impl SubPrompt for CountingInfer {
    fn infer(
        &self,
        _messages: Vec<ChatMessage>,
        max_tokens: u32,
        _temperature: f32,
        _deadline: Option<Instant>,
    ) -> Result<String, String> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(format!("ok ({max_tokens} tokens)"))
    }
}

fn build_chain(specs: Vec<PluginSpec>) -> (Chain, Arc<CountingInfer>) {
    let rt = PluginRuntime::new(None).unwrap();
    let loaded = specs.into_iter().map(|s| rt.load(s).unwrap()).collect();
    let infer = Arc::new(CountingInfer::default());
    let chain = rt.chain(
        loaded,
        Some(infer.clone() as Arc<dyn SubPrompt>),
        Arc::new(PluginMetrics::default()),
    );
    (chain, infer)
}

/// A chain of the one plugin `name`, configured with `config`, 100 ms per call.
fn chain_of(name: &str, config: &[(&str, &str)]) -> Chain {
    build_chain(vec![spec(name, config, deadline(100))]).0
}

fn request(text: &str) -> PluginRequest {
    PluginRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: text.into(),
        }],
        max_tokens: 64,
        temperature: 0.0,
        json_mode: false,
        streamed: false,
    }
}

fn proceed(outcome: Result<RequestOutcome, ChainError>) -> Vec<ChatMessage> {
    match outcome {
        Ok(RequestOutcome::Proceed(m)) => m,
        other => panic!("expected the request to proceed, got {other:?}"),
    }
}

/// A run of `chain` whose request `req` has proceeded, ready for the answer.
fn answering(chain: &Chain, req: &PluginRequest) -> ChainRun {
    let mut run = chain.start();
    proceed(run.on_request(req));
    run
}

#[test]
fn pii_redact_redacts_requests_answers_and_streams() {
    let chain = chain_of("pii_redact", &[]);
    let mut run = chain.start();
    let msgs = proceed(run.on_request(&request(
        "I am jane.doe@example.com, call me on +44 20 7946 0958",
    )));
    assert_eq!(msgs[0].content, "I am [EMAIL], call me on [PHONE]");
    assert_eq!(
        run.on_response("Write to bob@example.org.".into()).unwrap(),
        "Write to [EMAIL]."
    );

    // Streamed: an address split across chunks never reaches the client whole or in part.
    let mut run = answering(&chain, &request("hi"));
    let mut out = String::new();
    for piece in [
        "Mail ",
        "jo",
        "hn@ex",
        "ample.",
        "com or ring 555",
        " 123 ",
        "4567 today.",
    ] {
        out.push_str(&run.on_chunk(piece.into()).unwrap());
    }
    out.push_str(&run.on_stream_end().unwrap());
    assert_eq!(out, "Mail [EMAIL] or ring [PHONE] today.");

    // Each request gets a fresh instance: text held back in one stream is not seen by
    // another request.
    let mut first = answering(&chain, &request("hi"));
    assert_eq!(first.on_chunk("secret@exam".into()).unwrap(), "");
    let mut second = answering(&chain, &request("hi"));
    assert_eq!(second.on_stream_end().unwrap(), "");
}

#[test]
fn pii_redact_config_switches_kinds_off() {
    let chain = chain_of("pii_redact", &[("phone", "false")]);
    let msgs = proceed(
        chain
            .start()
            .on_request(&request("a@example.com 555-123-4567")),
    );
    assert_eq!(msgs[0].content, "[EMAIL] 555-123-4567");
}

#[test]
fn system_prompt_prepends_and_refuses_without_config() {
    let chain = chain_of("system_prompt", &[("prompt", "Answer in French.")]);
    let msgs = proceed(chain.start().on_request(&request("hello")));
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].role, "system");
    assert_eq!(msgs[0].content, "Answer in French.");
    assert_eq!(msgs[1].content, "hello");

    let unconfigured = chain_of("system_prompt", &[]);
    match unconfigured.start().on_request(&request("hello")) {
        Err(ChainError::Rejected { plugin, reason, .. }) => {
            assert_eq!(plugin, "system-prompt");
            assert!(reason.contains("not configured"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn json_guard_refuses_non_json_answers_only_in_json_mode() {
    let chain = chain_of("json_guard", &[]);
    let mut json_req = request("give me json");
    json_req.json_mode = true;

    let mut run = answering(&chain, &json_req);
    assert_eq!(
        run.on_response("```json\n{\"a\": 1}\n```".into()).unwrap(),
        "{\"a\": 1}"
    );
    let mut run = answering(&chain, &json_req);
    match run.on_response("Sure! Here it is: {\"a\": 1}".into()) {
        Err(ChainError::Rejected { plugin, reason, .. }) => {
            assert_eq!(plugin, "json-guard");
            assert!(
                reason.starts_with("the answer is not valid JSON"),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Not asked for JSON: prose passes.
    let mut run = answering(&chain, &request("hi"));
    assert_eq!(
        run.on_response("Hello there".into()).unwrap(),
        "Hello there"
    );

    // Streamed JSON is held back and checked whole.
    let mut run = answering(&chain, &json_req);
    assert_eq!(run.on_chunk("{\"a\":".into()).unwrap(), "");
    assert_eq!(run.on_chunk(" 2}".into()).unwrap(), "");
    assert_eq!(run.on_stream_end().unwrap(), "{\"a\": 2}");
    let mut run = answering(&chain, &json_req);
    assert_eq!(run.on_chunk("{\"a\":".into()).unwrap(), "");
    assert!(matches!(
        run.on_stream_end(),
        Err(ChainError::Rejected { .. })
    ));
}

#[test]
fn chain_runs_in_order_and_stream_flushes_pass_later_plugins() {
    // system-prompt, then pii-redact: the redactor sees (and redacts) the system message
    // the first plugin added.
    let (chain, _) = build_chain(vec![
        spec(
            "system_prompt",
            &[("prompt", "Escalate to ops@example.com.")],
            deadline(100),
        ),
        spec("pii_redact", &[], deadline(100)),
    ]);
    let msgs = proceed(chain.start().on_request(&request("hi")));
    assert_eq!(msgs[0].content, "Escalate to [EMAIL].");

    // json-guard holds a JSON stream to the end; its flush then passes pii-redact.
    let (chain, _) = build_chain(vec![
        spec("json_guard", &[], deadline(100)),
        spec("pii_redact", &[], deadline(100)),
    ]);
    let mut req = request("json please");
    req.json_mode = true;
    let mut run = answering(&chain, &req);
    assert_eq!(
        run.on_chunk("{\"mail\": \"x@example.com\"".into()).unwrap(),
        ""
    );
    assert_eq!(run.on_chunk("}".into()).unwrap(), "");
    assert_eq!(run.on_stream_end().unwrap(), "{\"mail\": \"[EMAIL]\"}");
}

fn hostile(mode: &str, limits: Limits) -> (Chain, Arc<CountingInfer>) {
    build_chain(vec![spec(
        "hostile",
        &[("mode", mode), ("trigger", "EVIL")],
        limits,
    )])
}

/// Loads `hostile` in `mode` and has a triggering request fail with `want`, as
/// `expect_failure` checks it.
fn hostile_fails(mode: &str, limits: Limits, want: &str) -> (PluginError, Duration) {
    let (chain, _) = hostile(mode, limits);
    expect_failure(&chain, want)
}

/// As `hostile_fails` with a 100 ms deadline, and the error's message mentions `detail`.
#[track_caller]
fn hostile_error_mentions(mode: &str, want: &str, detail: &str) {
    let (error, _) = hostile_fails(mode, deadline(100), want);
    assert!(error.to_string().contains(detail), "{error}");
}

fn expect_failure(chain: &Chain, want: &str) -> (PluginError, Duration) {
    let started = Instant::now();
    let got = chain.start().on_request(&request("EVIL please"));
    let took = started.elapsed();
    match got {
        Err(ChainError::Failed { plugin, error }) => {
            assert_eq!(plugin, "hostile");
            assert_eq!(error.reason(), want, "{error}");
            // The chain keeps serving: the next, ordinary request passes.
            let msgs = proceed(chain.start().on_request(&request("hello")));
            assert_eq!(msgs[0].content, "hello");
            assert_eq!(chain.metrics().failures("hostile", want), 1);
            (error, took)
        }
        other => panic!("expected {want}, got {other:?}"),
    }
}

#[test]
fn endless_loop_stops_at_the_deadline() {
    let (error, took) = hostile_fails("loop", deadline(50), "Deadline");
    assert_eq!(error, PluginError::Deadline(50));
    assert!(took >= Duration::from_millis(50), "{took:?}");
    assert!(took < Duration::from_millis(1000), "{took:?}");
}

#[test]
fn endless_loop_runs_out_of_fuel() {
    let limits = Limits {
        fuel: Some(50_000_000),
        deadline: None,
        memory_bytes: 32 << 20,
    };
    let (error, took) = hostile_fails("loop", limits, "OutOfFuel");
    assert_eq!(error, PluginError::OutOfFuel(50_000_000));
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn allocation_past_the_cap_is_refused() {
    let (error, took) = hostile_fails("alloc", deadline(2000), "MemoryLimit");
    assert_eq!(error, PluginError::MemoryLimit(32 << 20));
    assert!(took < Duration::from_millis(2000), "{took:?}");
}

#[test]
fn trap_is_named() {
    hostile_error_mentions("trap", "Trap", "unreachable");
}

#[test]
fn invalid_utf8_is_refused() {
    hostile_fails("bad-utf8", deadline(100), "InvalidUtf8");
}

#[test]
fn infer_in_a_loop_is_stopped_after_the_budget() {
    let (chain, infer) = hostile("infer-loop", deadline(1000));
    let (error, took) = expect_failure(&chain, "InferBudget");
    assert_eq!(error, PluginError::InferBudget(MAX_INFER_CALLS));
    assert_eq!(infer.0.load(Ordering::SeqCst), MAX_INFER_CALLS);
    assert!(took < Duration::from_millis(1000), "{took:?}");
}

#[test]
fn aliased_output_is_stopped_before_the_host_copies_it() {
    let (chain, _) = hostile("amplify", deadline(2000));
    let started = Instant::now();
    let (error, took) = expect_failure(&chain, "OutputTooLarge");
    assert_eq!(error, PluginError::OutputTooLarge);
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn messages_the_api_would_refuse_are_invalid_output() {
    hostile_error_mentions("bad-role", "InvalidOutput", "\"tool\"");
}

#[test]
fn a_later_plugin_sees_the_request_as_redacted_in_its_response_hook() {
    let (chain, _) = build_chain(vec![
        spec("pii_redact", &[("responses", "false")], deadline(100)),
        spec(
            "hostile",
            &[("mode", "echo-request"), ("hook", "response")],
            deadline(100),
        ),
    ]);
    let mut run = answering(&chain, &request("mail me at jane@example.com"));
    let answer = run.on_response("model answer".into()).unwrap();
    assert_eq!(answer, "mail me at [EMAIL]");
}

#[test]
fn misbehaving_response_hook_fails_the_answer() {
    let chain = chain_of(
        "hostile",
        &[("mode", "trap"), ("hook", "response"), ("trigger", "EVIL")],
    );
    let req = request("EVIL");
    let mut run = answering(&chain, &req);
    match run.on_response("answer".into()) {
        Err(ChainError::Failed { error, .. }) => assert_eq!(error.reason(), "Trap"),
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[test]
fn not_a_component_is_refused_at_load() {
    let rt = PluginRuntime::new(None).unwrap();
    let mut core_module = spec("passthrough", &[], deadline(100));
    core_module.wasm = b"\0asm\x01\0\0\0".to_vec();
    let e = rt.load(core_module).unwrap_err();
    assert_eq!(e.reason(), "NotAComponent");
    assert!(e.to_string().contains("core WebAssembly module"), "{e}");

    let mut garbage = spec("passthrough", &[], deadline(100));
    garbage.wasm = b"#!/bin/sh\nrm -rf /\n".to_vec();
    assert_eq!(rt.load(garbage).unwrap_err().reason(), "NotAComponent");

    let mut truncated = spec("passthrough", &[], deadline(100));
    truncated.wasm.truncate(truncated.wasm.len() / 2);
    assert_eq!(rt.load(truncated).unwrap_err().reason(), "Compile");

    // The same runtime still loads a good plugin.
    rt.load(spec("passthrough", &[], deadline(100))).unwrap();
}

#[test]
fn imports_beyond_the_grants_are_refused_at_load() {
    let rt = PluginRuntime::new(None).unwrap();
    let e = rt
        .load(spec("hostile_net", &[], deadline(100)))
        .unwrap_err();
    let PluginError::ImportNotGranted(imports) = &e else {
        panic!("expected ImportNotGranted, got {e:?}");
    };
    assert!(
        imports.iter().any(|i| i.starts_with("wasi:sockets/tcp")),
        "{imports:?}"
    );
    assert!(
        imports.iter().any(|i| i.starts_with("wasi:filesystem/")),
        "{imports:?}"
    );
    // Granted network, clocks and a read-only directory, the same component loads.
    let mut granted = spec("hostile_net", &[], deadline(100));
    granted.grants = Grants {
        network: true,
        clocks: true,
        read_only_dirs: vec![(std::env::temp_dir(), "/data".into())],
        ..Grants::default()
    };
    rt.load(granted).unwrap();
}

#[test]
fn limits_without_fuel_or_deadline_are_refused() {
    let rt = PluginRuntime::new(None).unwrap();
    let unbounded = Limits {
        fuel: None,
        deadline: None,
        memory_bytes: 1 << 20,
    };
    let e = rt.load(spec("passthrough", &[], unbounded)).unwrap_err();
    assert_eq!(e.reason(), "InvalidLimits");
    assert!(e.to_string().contains("fuel or a deadline"), "{e}");
    for ms in [0, 60_001] {
        let e = rt.load(spec("passthrough", &[], deadline(ms))).unwrap_err();
        assert_eq!(e.reason(), "InvalidLimits", "{ms} ms");
    }
    rt.load(spec("passthrough", &[], deadline(60_000))).unwrap();
}

#[test]
fn compiled_code_is_cached_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let rt = PluginRuntime::new(Some(dir.path())).unwrap();
    rt.load(spec("passthrough", &[], deadline(100))).unwrap();
    let files = walk(dir.path());
    assert!(
        !files.is_empty(),
        "nothing cached under {}",
        dir.path().display()
    );
    // A second runtime (a restarted agent) loads from the cache and works.
    let rt2 = PluginRuntime::new(Some(dir.path())).unwrap();
    let loaded = rt2.load(spec("passthrough", &[], deadline(100))).unwrap();
    let chain = rt2.chain(vec![loaded], None, Arc::new(PluginMetrics::default()));
    assert_eq!(
        proceed(chain.start().on_request(&request("hi")))[0].content,
        "hi"
    );
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

// --- The device owner's consent to plugin grants (`[plugins]` in agent.toml). ---

mod consent {
    use std::io::Read as _;
    use std::net::TcpListener;

    use edgefleet_agent::activation::{self, ActivateError, GrantPolicy, LoadError};
    use edgefleet_agent::config::PluginsSection;

    use super::*;

    const CANARY: &str = "canary-7f3a9c-device-private-key";

    /// A directory holding the canary file, and a local listener the plugin is told to
    /// send it to.
    struct Bait {
        dir: tempfile::TempDir,
        listener: TcpListener,
    }

    impl Bait {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("canary"), CANARY).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            Self { dir, listener }
        }

        fn path(&self) -> String {
            self.dir.path().display().to_string()
        }

        /// `exfiltrate`, asking for the canary's directory and the network.
        fn spec(&self) -> PluginSpec {
            let mut s = spec(
                "exfiltrate",
                &[
                    ("file", &format!("{}/canary", self.path())),
                    ("addr", &self.listener.local_addr().unwrap().to_string()),
                ],
                deadline(2000),
            );
            // Its sockets need the clocks too.
            s.grants = Grants {
                network: true,
                clocks: true,
                read_only_dirs: vec![(self.dir.path().to_owned(), self.path())],
                ..Grants::default()
            };
            s
        }

        /// What reached the listener (nothing: `None`).
        fn received(&self) -> Option<String> {
            let (mut s, _) = self.listener.accept().ok()?;
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut got = String::new();
            s.read_to_string(&mut got).unwrap();
            Some(got)
        }
    }

    fn allowing(dirs: &[&std::path::Path], network: bool) -> PluginsSection {
        PluginsSection {
            allow_read_dirs: dirs.iter().map(|d| d.to_path_buf()).collect(),
            allow_network: network,
            allow_clocks: network,
            ..PluginsSection::default()
        }
    }

    #[test]
    fn a_plugin_granted_more_than_the_device_allows_is_never_run() {
        let bait = Bait::new();
        let policy = GrantPolicy::new(PluginsSection::default(), []);
        let err = activation::prepare(vec![bait.spec()], None, &policy).unwrap_err();
        assert!(matches!(err, LoadError::GrantDenied(_)), "{err:?}");
        let reported = ActivateError::from(err).to_string();
        assert!(
            reported.starts_with("PluginGrantDenied: exfiltrate: network: "),
            "{reported}"
        );
        // Only the network allowed: the directory is refused, by name.
        let policy = GrantPolicy::new(allowing(&[], true), []);
        let err = activation::prepare(vec![bait.spec()], None, &policy).unwrap_err();
        let reported = ActivateError::from(err).to_string();
        assert!(
            reported.starts_with(&format!(
                "PluginGrantDenied: exfiltrate: readOnlyDirs {}: ",
                bait.path()
            )),
            "{reported}"
        );
        assert!(!reported.contains(CANARY), "{reported}");
        // Never instantiated (`prepare` refused before any instance existed): nothing
        // was sent anywhere.
        assert_eq!(bait.received(), None);
    }

    #[test]
    fn the_same_grants_are_accepted_when_the_owner_allows_them() {
        let bait = Bait::new();
        let policy = GrantPolicy::new(allowing(&[bait.dir.path()], true), []);
        activation::prepare(vec![bait.spec()], None, &policy).unwrap();
        // Run it, to show what the refusal above prevented: it reads the canary and
        // sends it away.
        let mut specs = vec![bait.spec()];
        activation::check_grants(&mut specs, &policy).unwrap();
        let (chain, _) = build_chain(specs);
        match chain.start().on_request(&request("hi")) {
            Err(ChainError::Rejected { reason, .. }) => {
                assert!(reason.contains(CANARY), "{reason}");
            }
            other => panic!("expected the plugin's report, got {other:?}"),
        }
        assert_eq!(bait.received().as_deref(), Some(CANARY));
    }

    #[test]
    fn the_deny_list_holds_even_when_the_owner_allows_everything() {
        let root = tempfile::tempdir().unwrap();
        let (state, conf, ok) = (
            root.path().join("state"),
            root.path().join("conf"),
            root.path().join("ok"),
        );
        for d in [&state, &conf, &ok] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(state.join("artifacts")).unwrap();
        std::fs::write(
            conf.join("agent.toml"),
            format!(
                "state_dir = \"{}\"\n[device]\nname = \"till-1\"\n[gateway]\nurl = \"https://gw:8443\"\n[plugins]\nallow_read_dirs = [\"/\"]\n",
                state.display()
            ),
        )
        .unwrap();
        let config = edgefleet_agent::config::load(&conf, Vec::new()).unwrap();
        let policy = GrantPolicy::for_device(&config);
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&state, &link).unwrap();
        let link_to_conf = ok.join("innocent");
        std::os::unix::fs::symlink(&conf, &link_to_conf).unwrap();
        let refused = [
            "/".to_owned(),
            "/etc".to_owned(),
            "/etc/edgefleet".to_owned(),
            "/proc/self".to_owned(),
            "/sys".to_owned(),
            "/dev".to_owned(),
            "/var/lib".to_owned(),
            "/run/credentials".to_owned(),
            state.display().to_string(),
            state.join("artifacts").display().to_string(),
            conf.display().to_string(),
            root.path().display().to_string(),
            link.display().to_string(),
            link.join("artifacts").display().to_string(),
            link_to_conf.display().to_string(),
        ];
        for dir in &refused {
            let mut s = spec("exfiltrate", &[], deadline(100));
            s.grants.read_only_dirs = vec![(PathBuf::from(dir), dir.clone())];
            let err = activation::prepare(vec![s], None, &policy).unwrap_err();
            let reported = ActivateError::from(err).to_string();
            assert!(
                reported.starts_with(&format!(
                    "PluginGrantDenied: exfiltrate: readOnlyDirs {dir}: "
                )),
                "{dir}: {reported}"
            );
        }
        // A directory clear of the deny list is allowed under `/`, resolved.
        let mut s = spec("exfiltrate", &[], deadline(100));
        let ok_dir = ok.display().to_string();
        s.grants.read_only_dirs = vec![(ok.clone(), ok_dir.clone())];
        let mut specs = vec![s];
        activation::check_grants(&mut specs, &policy).unwrap();
        assert_eq!(
            specs[0].grants.read_only_dirs,
            vec![(std::fs::canonicalize(&ok).unwrap(), ok_dir)]
        );
    }
}
