#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

//! Verifiable models and their SLOs: golden prompts (`spec.validation.goldenPrompts`) run by real
//! agents on the real SmolLM2 model behind the real operator and API server.
//!
//! - Met: the revision rolls out, each device reports its answer's digest, and the
//!   EdgeModel shows one answer from the one kind of hardware.
//! - Not met: the canary fails the revision (`GoldenPromptMismatch`) before serving it,
//!   keeps serving the stable revision, the rollout halts and rolls back, and the other
//!   device never gets the revision.
//! - A `regex` that does not compile refuses the revision (`GoldenPromptInvalid`); no
//!   device gets it.
//! - The API server refuses a golden prompt with no expectation or two, and two prompts
//!   of one name.
//! - Time to first token: a canary whose p95 is above `maxTimeToFirstTokenMillisP95`
//!   after `minRequests` halts and rolls back the rollout; one within it finishes.
//! - Encrypted models: the key broker releases the key (from a core/v1 Secret, through
//!   the harness's core-API shim) only to an approved device, attested as the model
//!   requires (a software TPM; the dev attester is refused), targeted and assigned
//!   that revision, asking with its attested key; the device serves the model from
//!   locked memory and no block of the plaintext reaches a file; every refusal is
//!   named.
//! - Receipts: a device's signed answer (a header, or a stream's last event) verifies
//!   offline with the device CA through `edgefleet receipt verify`, names the model,
//!   the plugins and the attestation result recorded in the device's status (dev
//!   attester and swtpm), and any changed byte of it or of the bodies fails it by name.
//!
//! Like `fleet_e2e` and `chaos`, these tests run in nextest's `fleet` group
//! (`.config/nextest.toml`): one at a time on a 2-core machine.

use std::path::PathBuf;
use std::time::Duration;

use edgefleet_crds::conditions::{self as cond, reasons};
use edgefleet_crds::device::ModelState;
use edgefleet_crds::{EdgeDevice, EdgeModel, EdgeModelStatus, ModelPhase};
use edgefleet_e2e::builders::{
    EdgeModelBuilder, SignedArtifact, Signer, allow_all_pools, apply_edge_model, assigned_revision,
    trust_signers_of,
};
use edgefleet_e2e::local_fleet::{self, Proc};
use edgefleet_e2e::wait::eventually;
use edgefleet_e2e::{ControlPlane, cache_dir, free_port};
use kube::Client;
use kube::api::Api;
use serde_json::{Value, json};

const NS: &str = "fleet";
const MODEL: &str = "smollm2";
const POOL: &str = "golden";
/// How long devices may take to enrol, attest and turn Ready.
const ENROL: Duration = Duration::from_secs(90);
/// How long a rollout (downloads, loads, golden prompts) may take.
const ROLLOUT: Duration = Duration::from_secs(180);
const SHORT: Duration = Duration::from_secs(30);
const CHAT: &str = r#"{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":8,"temperature":0}"#;

fn model_file() -> PathBuf {
    std::env::var_os("EDGEFLEET_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// The control plane, one operator and `agents` dev agents, the signed model in the
/// artifact store; killed and removed when dropped.
struct Fleet {
    agents: Vec<(String, u16, Proc)>,
    _operator: Proc,
    /// The operator's API server: the test API server behind the core-API shim (its
    /// Secrets are the core/v1 API).
    shim: edgefleet_e2e::core_shim::CoreShim,
    _tpm: Option<edgefleet_e2e::swtpm::Swtpm>,
    gateway_port: u16,
    client: Client,
    cp: ControlPlane,
    artifact: SignedArtifact,
    signer: Signer,
    dir: tempfile::TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, _, _) in &self.agents {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                eprintln!(
                    "--- {name}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            let op =
                std::fs::read_to_string(self.dir.path().join("operator.log")).unwrap_or_default();
            let tail: Vec<&str> = op.lines().rev().take(20).collect();
            eprintln!(
                "--- operator\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            eprintln!("{}", self.cp.log_tails());
            let state = self
                .cp
                .kubectl()
                .args(["get", "em", "-A", "-o", "yaml", "--request-timeout=10s"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let state: Vec<&str> = state
                .lines()
                .filter(|l| !l.contains("inline:") && l.len() < 300)
                .collect();
            eprintln!("{}", state.join("\n"));
        }
    }
}

impl Fleet {
    async fn start(agents: usize) -> Self {
        Self::start_kinds(&vec!["dev"; agents]).await
    }

    /// A fleet of one agent per entry of `kinds`: `dev` (the dev attester) or `tpm` (a
    /// software TPM, whose EK CA the operator trusts).
    async fn start_kinds(kinds: &[&str]) -> Self {
        let agents = kinds.len();
        let tpm = kinds
            .contains(&"tpm")
            .then(edgefleet_e2e::swtpm::Swtpm::start);
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cp = ControlPlane::start().await.expect("control plane starts");
        cp.install_crds().await.expect("CRDs install");
        let client = cp.client().await.unwrap();
        allow_all_pools(&client).await.unwrap();
        local_fleet::create_pool_token(&client, POOL).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pki = local_fleet::GatewayPki::write(d, &[]).unwrap();
        let model = model_file();
        let (digest, size) = local_fleet::store_artifact(&d.join("artifacts"), &model).unwrap();
        let signer = Signer::generate().unwrap();
        let artifact = SignedArtifact {
            digest,
            size,
            bundle: signer.sign(&model).unwrap(),
        };
        let port = free_port().unwrap();
        let shim = edgefleet_e2e::core_shim::CoreShim::start(&cp, d)
            .await
            .unwrap();
        let operator = Proc(
            local_fleet::spawn_operator(
                shim.kubeconfig_path(),
                &pki,
                &local_fleet::OperatorSpec {
                    gateway_addr: format!("127.0.0.1:{port}"),
                    artifact_dir: d.join("artifacts"),
                    approval: format!("auto:{}={POOL}", local_fleet::POOL_LABEL),
                    ek_cas: tpm
                        .iter()
                        .map(|t| t.ca_path("swtpm-localca-rootca-cert.pem"))
                        .collect(),
                    ek_intermediates: tpm.iter().map(|t| t.ca_path("issuercert.pem")).collect(),
                    heartbeat_lease_seconds: 30,
                    artifact_ca: None,
                    log: d.join("operator.log"),
                },
            )
            .unwrap(),
        );
        let mut started = Vec::new();
        for i in 1..=agents {
            let name = format!("till-{i}");
            let api = free_port().unwrap();
            // The agent's own temporary directory, searched for plaintext too.
            let tmp = d.join(&name).join("tmp");
            std::fs::create_dir_all(&tmp).unwrap();
            let env = [("TMPDIR".to_owned(), tmp.display().to_string())];
            let child = local_fleet::spawn_agent_with_env(
                &local_fleet::AgentSpec {
                    name: name.clone(),
                    dir: d.join(&name),
                    gateway: format!("https://127.0.0.1:{port}"),
                    gateway_ca: d.join("gw-ca.crt"),
                    port: api,
                    tee: kinds[i - 1].into(),
                    tcti: (kinds[i - 1] == "tpm")
                        .then(|| tpm.as_ref().map(|t| t.tcti()))
                        .flatten(),
                    netns: None,
                    pool: POOL.into(),
                    log: d.join(format!("{name}.log")),
                },
                &[],
                &env,
            )
            .unwrap();
            started.push((name, api, Proc(child)));
        }
        let fleet = Self {
            agents: started,
            _operator: operator,
            shim,
            _tpm: tpm,
            gateway_port: port,
            client,
            cp,
            artifact,
            signer,
            dir,
        };
        let devices: Api<EdgeDevice> = Api::all(fleet.client.clone());
        for (name, _, _) in &fleet.agents {
            eventually(&format!("{name} enrolled and Ready"), ENROL, || async {
                let d = devices.get_opt(name).await.ok()??;
                let ready = d
                    .status
                    .as_ref()?
                    .conditions
                    .iter()
                    .any(|c| c.type_ == cond::READY && c.status == "True");
                (d.spec.approved && ready).then_some(())
            })
            .await;
        }
        fleet
    }

    /// The model with `context` (a different size is a new revision), `rollout`, and
    /// `validation` when given.
    fn manifest(&self, context: i32, rollout: Value, validation: Option<Value>) -> Value {
        let mut m = EdgeModelBuilder::new(NS, MODEL)
            .artifact(
                "https://artifacts.example/smollm2.gguf",
                &self.artifact.digest,
                Some(self.artifact.size),
            )
            .inline_signature(&self.artifact.bundle)
            .signer("models-team", &self.signer.public_key)
            .pool(POOL)
            .attestation(&["dev"], Some("dev"))
            .rollout(rollout)
            .runtime(json!({"contextSize": context, "threads": 1, "parallelSlots": 1}))
            .build();
        if let Some(v) = validation {
            m["spec"]["validation"] = v;
        }
        m
    }

    async fn apply(&self, manifest: &Value) {
        trust_signers_of(&self.client, manifest).await.unwrap();
        apply_edge_model(&self.client, manifest).await.unwrap();
    }

    async fn status(&self) -> Option<EdgeModelStatus> {
        Api::<EdgeModel>::namespaced(self.client.clone(), NS)
            .get(MODEL)
            .await
            .ok()?
            .status
    }

    /// Waits until the model is Available with every device ready on a stable revision
    /// other than `not` (when given); returns it.
    async fn available(&self, not: Option<&str>) -> String {
        let want = format!("{n}/{n}", n = self.agents.len());
        eventually(&format!("Available, {want} ready"), ROLLOUT, || async {
            let st = self.status().await?;
            let stable = st.stable_revision.clone()?;
            (st.phase == Some(ModelPhase::Available)
                && st.ready_devices.as_deref() == Some(want.as_str())
                && st.current_revision.as_deref() == Some(stable.as_str())
                && not != Some(stable.as_str()))
            .then_some(stable)
        })
        .await
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// POSTs `body` to agent `i`'s chat API asking for a receipt (`edgefleet-receipt`
    /// set to `header`): (status, the receipt header, the response's bytes as received).
    async fn signed_chat(
        &self,
        i: usize,
        body: &str,
        header: &str,
    ) -> (u16, Option<String>, Vec<u8>) {
        let resp = reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{}/v1/chat/completions",
                self.agents[i].1
            ))
            .timeout(Duration::from_secs(60))
            .header("content-type", "application/json")
            .header("edgefleet-receipt", header)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let receipt = resp
            .headers()
            .get("edgefleet-receipt")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, receipt, resp.bytes().await.unwrap().to_vec())
    }

    /// Runs `edgefleet receipt verify --ca <the device CA> ARGS` on `files` (name,
    /// content) written into the test's directory: (success, its JSON output).
    fn verify_receipt(&self, ca: &str, files: &[(&str, &[u8])], args: &[&str]) -> (bool, Value) {
        let dir = self.dir.path().join("receipts");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, content) in files {
            std::fs::write(dir.join(name), content).unwrap();
        }
        let out = std::process::Command::new(local_fleet::binary("edgefleet").unwrap())
            .current_dir(&dir)
            .args(["receipt", "verify", "--ca"])
            .arg(self.dir.path().join(ca))
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| {
            panic!("not JSON: {text}\n{}", String::from_utf8_lossy(&out.stderr))
        });
        (out.status.success(), v)
    }

    /// `edgefleet receipt verify` of a receipt with its request and answer
    /// ([`ANSWER_ARGS`]).
    fn verify_answer(&self, receipt: &str, request: &str, answer: &[u8]) -> (bool, Value) {
        let files: [(&str, &[u8]); 3] = [
            ("receipt", receipt.as_bytes()),
            ("request.json", request.as_bytes()),
            ("response.json", answer),
        ];
        self.verify_receipt("dev-ca.crt", &files, &ANSWER_ARGS)
    }

    /// The device's attestation summary in its EdgeDevice status.
    async fn attestation(&self, name: &str) -> edgefleet_crds::device::AttestationSummary {
        Api::<EdgeDevice>::all(self.client.clone())
            .get(name)
            .await
            .unwrap()
            .status
            .and_then(|s| s.attestation)
            .unwrap()
    }

    /// POSTs a chat to agent `i`'s API: (status, body).
    fn chat(&self, i: usize) -> (u16, String) {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-m",
                "60",
                "-w",
                "\n%{http_code}",
                "-H",
                "content-type: application/json",
            ])
            .args(["-d", CHAT])
            .arg(format!(
                "http://127.0.0.1:{}/v1/chat/completions",
                self.agents[i].1
            ))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }
}

fn golden(expect: Value) -> Value {
    let mut p =
        json!({"name": "capital", "prompt": "What is the capital of France?", "maxTokens": 16});
    for (k, v) in expect.as_object().unwrap() {
        p[k] = v.clone();
    }
    json!({"goldenPrompts": [p]})
}

fn rollout(gate: bool) -> Value {
    json!({
        "steps": [{"count": 1}, {"percent": 100}],
        "maxUnavailable": 1,
        "healthGates": {"readyTimeoutSeconds": 300, "goldenPrompts": gate, "rollbackOnFailure": true},
    })
}

/// `name`'s recorded answers to revision `rev`'s golden prompts.
async fn answers(c: &Client, name: &str, rev: &str) -> Vec<(String, String)> {
    let d = Api::<EdgeDevice>::all(c.clone()).get(name).await.unwrap();
    d.status
        .iter()
        .flat_map(|s| &s.models)
        .filter(|m| m.revision == rev && m.state == ModelState::Ready)
        .flat_map(|m| m.golden.iter().map(|g| (g.name.clone(), g.digest.clone())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_prompts_met_roll_out_and_the_fleet_shows_one_answer_per_kind() {
    let f = Fleet::start(2).await;
    f.apply(&f.manifest(
        512,
        rollout(true),
        Some(golden(json!({"contains": "Paris"}))),
    ))
    .await;
    let rev = f.available(None).await;
    // Each device answered before it reported Ready, the same answer.
    let mut digests = Vec::new();
    for (name, _, _) in &f.agents {
        assert!(
            f.log(name).contains("golden prompts answered as expected"),
            "{name}:\n{}",
            f.log(name)
        );
        let a = eventually(&format!("{name}'s answer recorded"), SHORT, || async {
            let a = answers(&f.client, name, &rev).await;
            (!a.is_empty()).then_some(a)
        })
        .await;
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].0, "capital");
        assert!(a[0].1.starts_with("sha256:") && a[0].1.len() == 71, "{a:?}");
        digests.push(a[0].1.clone());
    }
    assert_eq!(digests[0], digests[1], "greedy answers of one build differ");
    let st = eventually("the consistency in status", SHORT, || async {
        let st = f.status().await?;
        (st.golden_prompts.first()?.kinds.first()?.devices == 2).then_some(st)
    })
    .await;
    let g = &st.golden_prompts[0];
    assert_eq!(
        (g.name.as_str(), g.distinct_answers),
        ("capital", 1),
        "{g:?}"
    );
    assert_eq!(g.kinds.len(), 1, "{g:?}");
    assert_eq!(
        (
            g.kinds[0].arch.as_str(),
            g.kinds[0].tee.as_str(),
            g.kinds[0].distinct_answers
        ),
        (std::env::consts::ARCH, "dev", 1),
        "{g:?}"
    );
    let (code, body) = f.chat(0);
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_golden_mismatch_fails_the_revision_before_serving_it_and_halts_the_rollout() {
    let f = Fleet::start(2).await;
    f.apply(&f.manifest(512, rollout(false), None)).await;
    let stable = f.available(None).await;
    // The same model, now expected to say what it does not.
    f.apply(&f.manifest(
        1024,
        rollout(false),
        Some(golden(json!({"contains": "Lyon"}))),
    ))
    .await;
    let failed = eventually("the revision failed and rolled back", ROLLOUT, || async {
        let st = f.status().await?;
        let failed = st.failed_revision.clone()?;
        (failed != stable).then_some(failed)
    })
    .await;
    let st = f.status().await.unwrap();
    let degraded = st
        .conditions
        .iter()
        .find(|c| c.type_ == cond::DEGRADED && c.status == "True")
        .unwrap_or_else(|| panic!("not Degraded: {st:?}"));
    assert_eq!(degraded.reason, reasons::HEALTH_GATE_FAILED, "{degraded:?}");
    // The canary failed it by name (the gate says which device and why, and the
    // agent logged the answer); the other never got it.
    let canary = f
        .agents
        .iter()
        .map(|(n, _, _)| n.clone())
        .find(|n| {
            degraded.message.contains(&format!(
                "{n} reported the revision Failed (GoldenPromptMismatch)"
            ))
        })
        .unwrap_or_else(|| panic!("no device named: {degraded:?}"));
    let canary = (canary, ());
    let log = f.log(&canary.0);
    assert!(
        log.contains(
            "GoldenPromptMismatch: golden prompt capital: the answer \"The capital of France is Paris.\" does not contain \"Lyon\""
        ),
        "{log}"
    );
    let devices = Api::<EdgeDevice>::all(f.client.clone());
    for (i, (name, _, _)) in f.agents.iter().enumerate() {
        if *name != canary.0 {
            let d = devices.get(name).await.unwrap();
            assert!(
                d.status
                    .iter()
                    .flat_map(|s| &s.models)
                    .all(|m| m.revision != failed),
                "{name} was given the failed revision: {:?}",
                d.status
            );
        }
        // Every device serves the stable revision (the canary never stopped).
        assert_eq!(
            assigned_revision(&f.client, NS, MODEL, name)
                .await
                .as_deref(),
            Some(stable.as_str())
        );
        let (code, body) = f.chat(i);
        assert_eq!(code, 200, "{name}: {body}");
    }
    // The canary never served the failed revision: it answered the golden prompt on
    // the loaded engine, before installing it.
    let log = f.log(&canary.0);
    assert!(
        !log.lines()
            .any(|l| l.contains(": serving ") && l.contains(&format!("revision={failed}"))),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_golden_regex_refuses_the_revision_and_the_api_refuses_malformed_prompts() {
    let f = Fleet::start(1).await;
    f.apply(&f.manifest(512, rollout(false), None)).await;
    let stable = f.available(None).await;
    let invalid = f.manifest(
        1024,
        rollout(false),
        Some(golden(json!({"regex": "(unclosed"}))),
    );
    f.apply(&invalid).await;
    // The operator planned the spec as applied (a stale operator binary, built before
    // golden prompts, would plan and roll out another revision).
    let spec: edgefleet_crds::EdgeModelSpec =
        serde_json::from_value(invalid["spec"].clone()).unwrap();
    let want = edgefleet_operator::rollout::revision(&spec);
    eventually("the new revision planned", SHORT, || async {
        (f.status().await?.current_revision? == want).then_some(())
    })
    .await;
    let cond_ = eventually("the revision refused", SHORT, || async {
        let st = f.status().await?;
        st.conditions
            .into_iter()
            .find(|c| c.type_ == cond::SIGNATURE_VERIFIED && c.status == "False")
    })
    .await;
    assert_eq!(cond_.reason, reasons::GOLDEN_PROMPT_INVALID, "{cond_:?}");
    assert!(
        cond_.message.starts_with("golden prompt capital: regex: "),
        "{cond_:?}"
    );
    let st = f.status().await.unwrap();
    assert_eq!(st.stable_revision.as_deref(), Some(stable.as_str()));
    assert_eq!(
        assigned_revision(&f.client, NS, MODEL, "till-1")
            .await
            .as_deref(),
        Some(stable.as_str())
    );
    let (code, body) = f.chat(0);
    assert_eq!(code, 200, "{body}");

    // What the API server refuses, by its message.
    for (validation, message) in [
        (
            golden(json!({})),
            "a golden prompt expects exactly one of exact, contains and regex",
        ),
        (
            golden(json!({"exact": "Paris", "contains": "Paris"})),
            "a golden prompt expects exactly one of exact, contains and regex",
        ),
        (
            json!({"goldenPrompts": [
                {"name": "a", "prompt": "x", "contains": "y"},
                {"name": "a", "prompt": "z", "contains": "y"},
            ]}),
            "goldenPrompts names must be unique",
        ),
        (
            golden(json!({"contains": "Paris", "maxTokens": 0})),
            "maxTokens",
        ),
    ] {
        let m = f.manifest(2048, rollout(false), Some(validation.clone()));
        let err = match apply_edge_model(&f.client, &m).await {
            Err(edgefleet_e2e::HarnessError::Kube { source, .. }) => source.to_string(),
            other => panic!("{validation}: not refused by the API server: {other:?}"),
        };
        assert!(err.contains(message), "{validation}: {err}");
    }
}

/// The rollout with a canary step that pauses `pause` seconds, judged on time to first
/// token (`max` ms at the 95th percentile) after 2 requests.
fn ttft_rollout(max: i32, pause: i32) -> Value {
    json!({
        "steps": [{"count": 1, "pauseSeconds": pause}, {"percent": 100}],
        "maxUnavailable": 1,
        "healthGates": {
            "readyTimeoutSeconds": 300,
            "minRequests": 2,
            "maxTimeToFirstTokenMillisP95": max,
            "rollbackOnFailure": true,
        },
    })
}

/// The device agent index the new revision `rev` reached first (the canary), once it
/// serves it.
async fn canary_on(f: &Fleet, rev: &str) -> usize {
    eventually("the canary serving the new revision", ROLLOUT, || async {
        for (i, (name, _, _)) in f.agents.iter().enumerate() {
            let d = Api::<EdgeDevice>::all(f.client.clone())
                .get(name)
                .await
                .ok()?;
            let ready = d
                .status
                .iter()
                .flat_map(|s| &s.models)
                .any(|m| m.revision == rev && m.state == ModelState::Ready);
            if ready {
                return Some(i);
            }
        }
        None
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_token_halts_the_rollout_and_a_met_slo_lets_it_finish() {
    let f = Fleet::start(2).await;
    f.apply(&f.manifest(512, rollout(false), None)).await;
    let stable = f.available(None).await;
    // No CPU answers its first token within 1 ms (the lowest estimate the agent's
    // buckets give is 4.75 ms): the canary's p95 fails the gate once it has served 2.
    let slow = f.manifest(1024, ttft_rollout(1, 600), None);
    f.apply(&slow).await;
    let spec: edgefleet_crds::EdgeModelSpec = serde_json::from_value(slow["spec"].clone()).unwrap();
    let rev = edgefleet_operator::rollout::revision(&spec);
    let canary = canary_on(&f, &rev).await;
    for _ in 0..2 {
        let (code, body) = f.chat(canary);
        assert_eq!(code, 200, "{body}");
    }
    let name = f.agents[canary].0.clone();
    let degraded = eventually("the TTFT gate failed", ROLLOUT, || async {
        let st = f.status().await?;
        st.conditions
            .into_iter()
            .find(|c| c.type_ == cond::DEGRADED && c.status == "True")
    })
    .await;
    assert_eq!(degraded.reason, reasons::HEALTH_GATE_FAILED, "{degraded:?}");
    assert!(
        degraded
            .message
            .contains(&format!("{name} time to first token p95 "))
            && degraded.message.contains(" ms is above 1 ms"),
        "{degraded:?}"
    );
    let st = f.status().await.unwrap();
    assert_eq!(st.failed_revision.as_deref(), Some(rev.as_str()), "{st:?}");
    assert_eq!(st.stable_revision.as_deref(), Some(stable.as_str()));
    // The gate judged the canary's own estimate (the status shows it too; fleet_e2e
    // checks that the estimates reach EdgeDevice status).
    let p95: f64 = degraded
        .message
        .split(" time to first token p95 ")
        .nth(1)
        .and_then(|r| r.split(" ms").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no p95 in {degraded:?}"));
    assert!(p95 > 1.0, "{degraded:?}");

    // Met: a minute per first token is far above what the canary takes; it serves
    // its 2 requests within the pause and the rollout finishes.
    let met = f.manifest(2048, ttft_rollout(60_000, 20), None);
    f.apply(&met).await;
    let spec: edgefleet_crds::EdgeModelSpec = serde_json::from_value(met["spec"].clone()).unwrap();
    let rev = edgefleet_operator::rollout::revision(&spec);
    let canary = canary_on(&f, &rev).await;
    for _ in 0..2 {
        let (code, body) = f.chat(canary);
        assert_eq!(code, 200, "{body}");
    }
    let done = f.available(Some(stable.as_str())).await;
    assert_eq!(done, rev);
    let st = f.status().await.unwrap();
    assert!(
        !st.conditions
            .iter()
            .any(|c| c.type_ == cond::DEGRADED && c.status == "True"),
        "{st:?}"
    );
}

/// The model encrypted under a new key in the fleet's directory: (file, key).
fn encrypted_model(f: &Fleet) -> (PathBuf, edgefleet_trust::sealed::ModelKey) {
    use edgefleet_trust::sealed;
    let key = sealed::ModelKey::generate().unwrap();
    let plain = model_file();
    let out = f.dir.path().join("smollm2.enc");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&out).unwrap());
    sealed::encrypt(
        std::io::BufReader::new(std::fs::File::open(&plain).unwrap()),
        std::fs::metadata(&plain).unwrap().len(),
        &sealed::file_digest(&plain).unwrap(),
        &key,
        sealed::DEFAULT_CHUNK_SIZE,
        &mut w,
    )
    .unwrap();
    std::io::Write::flush(&mut w).unwrap();
    (out, key)
}

const KEY_SECRET: &str = "smollm2-key";

impl Fleet {
    /// The manifest of `file` (encrypted, signed here) with `spec.encryption` naming
    /// [`KEY_SECRET`], attested by `kinds` under `policy`.
    fn encrypted_manifest(&self, file: &std::path::Path, kinds: &[&str], policy: &str) -> Value {
        let (digest, size) =
            local_fleet::store_artifact(&self.dir.path().join("artifacts"), file).unwrap();
        let bundle = self.signer.sign(file).unwrap();
        let mut m = EdgeModelBuilder::new(NS, MODEL)
            .artifact("https://artifacts.example/smollm2.enc", &digest, Some(size))
            .inline_signature(&bundle)
            .signer("models-team", &self.signer.public_key)
            .pool(POOL)
            .attestation(kinds, Some(policy))
            .rollout(rollout(false))
            .runtime(json!({"contextSize": 512, "threads": 1, "parallelSlots": 1}))
            .build();
        m["spec"]["encryption"] = json!({"keySecretRef": {"name": KEY_SECRET}});
        m
    }

    /// Stores `key` in the core/v1 Secret [`KEY_SECRET`] (through the core-API shim).
    async fn key_secret(&self, key: &[u8]) {
        use k8s_openapi::api::core::v1::Secret;
        let api: Api<Secret> = Api::namespaced(self.shim.client().await.unwrap(), NS);
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": KEY_SECRET, "annotations": {"edgefleet.io/edgemodels": format!("other,{MODEL}")}},
            "data": {"key": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key)},
        }))
        .unwrap();
        api.create(&Default::default(), &secret).await.unwrap();
        // Read back through the core API: the operator sees the same.
        let back = api.get(KEY_SECRET).await.unwrap();
        assert_eq!(back.data.unwrap()["key"].0, key);
    }

    /// A client of the gateway as device `name` (its own certificate and key).
    fn device_client(&self, name: &str) -> (reqwest::Client, String) {
        use rustls::pki_types::pem::PemObject as _;
        let state = self.dir.path().join(name).join("state");
        let cert = std::fs::read_to_string(state.join("agent-cert.pem")).unwrap();
        let key = std::fs::read_to_string(state.join("agent-key.pem")).unwrap();
        let ca = std::fs::read(self.dir.path().join("gw-ca.crt")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
            roots.add(c.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        (http, key)
    }

    /// Asks the gateway for the key of revision `rev` as device `name`, signing with
    /// `signing_key_pem` (PKCS#8): (status, reason, the key if released).
    async fn ask_key(
        &self,
        name: &str,
        rev: &str,
        digest: &str,
        signing_key_pem: Option<&str>,
    ) -> (u16, String, Option<Vec<u8>>) {
        use base64::Engine as _;
        use edgefleet_trust::sealed::{self, Recipient, ReleaseFor};
        use p256::ecdsa::signature::Signer as _;
        use p256::pkcs8::DecodePrivateKey as _;
        let (http, own_key) = self.device_client(name);
        let b64 = base64::engine::general_purpose::STANDARD;
        let model = format!("{NS}/{MODEL}");
        let what = ReleaseFor {
            device: name,
            model: &model,
            revision: rev,
            digest,
        };
        let recipient = Recipient::generate();
        let message = sealed::key_request_message(&what, &recipient.public_key());
        let signer =
            p256::ecdsa::SigningKey::from_pkcs8_pem(signing_key_pem.unwrap_or(&own_key)).unwrap();
        let sig: p256::ecdsa::DerSignature = signer.sign(&message);
        let port = self.gateway_port();
        let resp = http
            .post(format!("https://127.0.0.1:{port}/v1/devices/{name}/keys"))
            .json(&json!({
                "model": model,
                "revision": rev,
                "digest": digest,
                "recipient": b64.encode(recipient.public_key()),
                "signature": b64.encode(sig.as_bytes()),
            }))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or_default();
        if status != 200 {
            return (status, v["reason"].as_str().unwrap_or("").to_owned(), None);
        }
        let enc = b64.decode(v["encapsulatedKey"].as_str().unwrap()).unwrap();
        let wrapped = b64.decode(v["wrappedKey"].as_str().unwrap()).unwrap();
        let key = recipient.open(&what, &enc, &wrapped).unwrap();
        (status, String::new(), Some(key.bytes().to_vec()))
    }

    fn gateway_port(&self) -> u16 {
        self.gateway_port
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_model_is_released_only_to_the_attested_approved_target_and_never_lands_on_disk()
 {
    let f = Fleet::start(1).await;
    let (file, key) = encrypted_model(&f);
    f.key_secret(key.bytes()).await;
    let manifest = f.encrypted_manifest(&file, &["dev"], "dev");
    f.apply(&manifest).await;
    let rev = f.available(None).await;
    let digest = manifest["spec"]["artifact"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, body) = f.chat(0);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("Paris"), "{body}");
    let (name, _, _) = &f.agents[0];
    let log = f.log(name);
    assert!(
        log.contains("model key released; decrypting into memory"),
        "{log}"
    );
    // Recorded: the count in status (added by the gateway), and an event on the device.
    eventually("status.keyReleases", SHORT, || async {
        (f.status().await?.key_releases? >= 1).then_some(())
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(f.client.clone());
    eventually("a KeyReleased event on the device", SHORT, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("KeyReleased")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
            })
            .then_some(())
    })
    .await;

    // No 4 KiB block of the plaintext in any file under the agent's directories (its
    // state, artifact store, caches and temporary directory), while it serves.
    let plain = std::fs::read(model_file()).unwrap();
    let blocks = edgefleet_e2e::leaks::samples(&plain, 64);
    let agent_dir = f.dir.path().join(name);
    assert!(agent_dir.join("tmp").is_dir());
    let found = edgefleet_e2e::leaks::files_holding(&agent_dir, &blocks);
    assert!(found.is_empty(), "plaintext in {found:?}");
    // The device's encrypted artifact is there (the search looks at what it stored).
    let stored: Vec<_> = std::fs::read_dir(agent_dir.join("state/artifacts"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        stored
            .iter()
            .any(|p| std::fs::read(p).unwrap().starts_with(b"EFMSEAL1")),
        "{stored:?}"
    );

    // The broker itself: the device's own signed request gets the key; another key's
    // signature, another revision, and (once unapproved) the device itself do not.
    let (status, reason, got) = f.ask_key(name, &rev, &digest, None).await;
    assert_eq!((status, reason.as_str()), (200, ""));
    assert_eq!(got.as_deref(), Some(&key.bytes()[..]));
    let stranger = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let stranger_pem =
        p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&stranger, Default::default()).unwrap();
    let (status, reason, _) = f.ask_key(name, &rev, &digest, Some(&stranger_pem)).await;
    assert_eq!(
        (status, reason.as_str()),
        (403, "KeyRequestSignatureInvalid")
    );
    let (status, reason, _) = f.ask_key(name, "0000000000000000", &digest, None).await;
    assert_eq!((status, reason.as_str()), (403, "NotAssigned"));
    // The decrypted model is in the agent's memory only: a sealed memfd, locked and
    // left out of core dumps, and the agent's memory is locked as a whole.
    let pid = f.agents[0].2.0.id();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    // The VmFlags of each mapping of the memfd: the agent's own (locked, left out of
    // dumps) and llama.cpp's (locked; the process is non-dumpable besides).
    let mut flags = Vec::new();
    let mut in_memfd = false;
    for l in smaps.lines() {
        let header = l.split_whitespace().next().is_some_and(|t| {
            t.contains('-') && t.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        });
        if header {
            in_memfd = l.contains("/memfd:edgefleet-model");
        }
        if in_memfd && l.starts_with("VmFlags:") {
            flags.push(l.to_owned());
        }
    }
    assert!(!flags.is_empty(), "no memfd mapping in smaps");
    assert!(flags.iter().all(|f| f.contains(" lo")), "{flags:?}");
    assert!(flags.iter().any(|f| f.contains(" dd")), "{flags:?}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let locked_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        locked_kib * 1024 >= plain.len() as u64,
        "VmLck {locked_kib} kB"
    );

    // A Secret that does not grant its key to this model: refused by name (a model
    // cannot borrow another team's key).
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(f.shim.client().await.unwrap(), NS);
    secrets
        .patch(
            KEY_SECRET,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"annotations": {"edgefleet.io/edgemodels": "other"}}}),
            ),
        )
        .await
        .unwrap();
    let (status, reason, _) = f.ask_key(name, &rev, &digest, None).await;
    assert_eq!((status, reason.as_str()), (403, "KeySecretNotGranted"));
    // Granted, but not a 32-byte key.
    secrets
        .patch(
            KEY_SECRET,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({
                "metadata": {"annotations": {"edgefleet.io/edgemodels": MODEL}},
                "data": {"key": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0u8; 31])},
            })),
        )
        .await
        .unwrap();
    let (status, reason, _) = f.ask_key(name, &rev, &digest, None).await;
    assert_eq!((status, reason.as_str()), (503, "KeySecretUnavailable"));
    // Another device's path with this device's certificate: not even looked at.
    let (http, _) = f.device_client(name);
    let resp = http
        .post(format!(
            "https://127.0.0.1:{}/v1/devices/till-9/keys",
            f.gateway_port()
        ))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["reason"], "Impersonation", "{v}");

    let devices: Api<EdgeDevice> = Api::all(f.client.clone());
    devices
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"approved": false}})),
        )
        .await
        .unwrap();
    let reason = eventually("the unapproved device refused", SHORT, || async {
        let (status, reason, _) = f.ask_key(name, &rev, &digest, None).await;
        (status == 403 && reason == "NotApproved").then_some(reason)
    })
    .await;
    assert_eq!(reason, "NotApproved");

    // After the agent is gone, nothing of the plaintext is left behind either.
    let mut f = f;
    let (_, _, mut proc_) = f.agents.remove(0);
    proc_.0.kill().unwrap();
    proc_.0.wait().unwrap();
    let found = edgefleet_e2e::leaks::files_holding(&agent_dir, &blocks);
    assert!(found.is_empty(), "plaintext in {found:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_refused_to_a_device_whose_attestation_the_model_does_not_accept_and_tampered_ciphertext_is_refused()
 {
    let f = Fleet::start(1).await;
    let (file, key) = encrypted_model(&f);
    f.key_secret(key.bytes()).await;
    // The model asks for a TPM under the default policy; the device attests with the
    // dev attester under the dev policy: it is never assigned the model, and the
    // broker refuses it by name when it asks anyway.
    let manifest = f.encrypted_manifest(&file, &["tpm"], "default");
    f.apply(&manifest).await;
    let spec: edgefleet_crds::EdgeModelSpec =
        serde_json::from_value(manifest["spec"].clone()).unwrap();
    let rev = edgefleet_operator::rollout::revision(&spec);
    eventually("the revision planned", SHORT, || async {
        (f.status().await?.current_revision? == rev).then_some(())
    })
    .await;
    let digest = manifest["spec"]["artifact"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let (name, _, _) = &f.agents[0];
    let (status, reason, got) = f.ask_key(name, &rev, &digest, None).await;
    assert_eq!((status, reason.as_str(), got), (403, "NotAttested", None));
    assert_eq!(assigned_revision(&f.client, NS, MODEL, name).await, None);

    // Accepted attestation, but a selector the device does not match: NotTargeted.
    let mut elsewhere = f.encrypted_manifest(&file, &["dev"], "dev");
    elsewhere["spec"]["selector"] = json!({"matchLabels": {"edgefleet.io/pool": "elsewhere"}});
    f.apply(&elsewhere).await;
    let spec: edgefleet_crds::EdgeModelSpec =
        serde_json::from_value(elsewhere["spec"].clone()).unwrap();
    let rev = edgefleet_operator::rollout::revision(&spec);
    eventually("the untargeted revision planned", SHORT, || async {
        (f.status().await?.current_revision? == rev).then_some(())
    })
    .await;
    let (status, reason, _) = f.ask_key(name, &rev, &digest, None).await;
    assert_eq!((status, reason.as_str()), (403, "NotTargeted"));

    // Accepted attestation, and the ciphertext in the gateway's store tampered with
    // (a byte of its third chunk flipped): the device refuses the download by its
    // digest, never asks for the key, and serves nothing of it.
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x01;
    let manifest = f.encrypted_manifest(&file, &["dev"], "dev");
    let digest = manifest["spec"]["artifact"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let stored = f
        .dir
        .path()
        .join("artifacts")
        .join(&digest["sha256:".len()..]);
    std::fs::remove_file(&stored).unwrap();
    std::fs::write(&stored, &bytes).unwrap();
    f.apply(&manifest).await;
    let failed = eventually(
        "the device refused the tampered artifact",
        ROLLOUT,
        || async {
            let d = Api::<EdgeDevice>::all(f.client.clone())
                .get(name)
                .await
                .ok()?;
            d.status?
                .models
                .into_iter()
                .find(|m| m.state == ModelState::Failed)
        },
    )
    .await;
    assert_eq!(
        failed.reason.as_deref(),
        Some("DigestMismatch"),
        "{failed:?}"
    );
    assert!(
        !f.log(name).contains("model key released"),
        "{}",
        f.log(name)
    );
    let st = f.status().await.unwrap();
    assert_eq!(st.key_releases, None, "{st:?}");

    // A plain revision, served: it has no key to release.
    f.apply(&f.manifest(512, rollout(false), None)).await;
    let plain = f.available(None).await;
    let (status, reason, _) = f
        .ask_key(name, &plain, &f.artifact.digest.clone(), None)
        .await;
    assert_eq!((status, reason.as_str()), (404, "NotEncrypted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_released_to_an_attested_swtpm_device_and_refused_to_the_dev_attester_when_tpm_is_required()
 {
    let f = Fleet::start_kinds(&["tpm", "dev"]).await;
    let (file, key) = encrypted_model(&f);
    f.key_secret(key.bytes()).await;
    let manifest = f.encrypted_manifest(&file, &["tpm"], "dev");
    f.apply(&manifest).await;
    let spec: edgefleet_crds::EdgeModelSpec =
        serde_json::from_value(manifest["spec"].clone()).unwrap();
    let rev = edgefleet_operator::rollout::revision(&spec);
    let digest = manifest["spec"]["artifact"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    // Both devices are targeted; only the TPM device's attestation is accepted: it
    // gets the key and serves.
    eventually("Available on the TPM device alone", ROLLOUT, || async {
        let st = f.status().await?;
        let devices = &st.devices;
        (st.phase == Some(ModelPhase::Available)
            && st.ready_devices.as_deref() == Some("1/2")
            && (devices.targeted, devices.attested, devices.ready) == (2, 1, 1)
            && st.stable_revision.as_deref() == Some(rev.as_str()))
        .then_some(())
    })
    .await;
    let (tpm_device, dev_device) = (f.agents[0].0.clone(), f.agents[1].0.clone());
    let d = Api::<EdgeDevice>::all(f.client.clone())
        .get(&tpm_device)
        .await
        .unwrap();
    assert_eq!(
        d.status.and_then(|s| s.attestation).map(|a| a.tee_kind),
        Some(edgefleet_crds::common::TeeKind::Tpm)
    );
    let (code, body) = f.chat(0);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("Paris"), "{body}");
    assert!(
        f.log(&tpm_device)
            .contains("model key released; decrypting into memory")
    );
    eventually("status.keyReleases", SHORT, || async {
        (f.status().await?.key_releases? >= 1).then_some(())
    })
    .await;
    // The dev attester is never assigned it, and asking anyway is refused by name.
    assert_eq!(
        assigned_revision(&f.client, NS, MODEL, &dev_device).await,
        None
    );
    let (status, reason, got) = f.ask_key(&dev_device, &rev, &digest, None).await;
    assert_eq!((status, reason.as_str(), got), (403, "NotAttested", None));
    assert!(!f.log(&dev_device).contains("model key released"));
}

/// `edgefleet receipt verify` arguments for the files [`Fleet::verify_answer`] writes.
const ANSWER_ARGS: [&str; 6] = [
    "--receipt",
    "receipt",
    "--request",
    "request.json",
    "--response",
    "response.json",
];

/// The request body of a signed chat; `stream` asks for server-sent events.
fn receipt_request(stream: bool) -> String {
    json!({"model": MODEL, "max_tokens": 8, "temperature": 0, "stream": stream,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    .to_string()
}

/// `bytes` with the byte at `i` changed.
fn flipped(bytes: &[u8], i: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[i] ^= 0x01;
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_answer_verifies_offline_with_the_device_ca_and_any_change_fails_it() {
    let f = Fleet::start(1).await;
    f.apply(&f.manifest(512, rollout(false), None)).await;
    let rev = f.available(None).await;
    let name = f.agents[0].0.clone();
    let request = receipt_request(false);
    let (code, receipt, answer) = f.signed_chat(0, &request, "1").await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&answer));
    assert!(String::from_utf8_lossy(&answer).contains("Paris"));
    let receipt = receipt.expect("the receipt header");
    let (ok, out) = f.verify_answer(&receipt, &request, &answer);
    assert!(ok, "{out}");
    assert_eq!(out["device"], name.as_str());
    assert_eq!(out["model"]["name"], format!("{NS}/{MODEL}"));
    assert_eq!(out["model"]["revision"], rev.as_str());
    assert_eq!(out["model"]["digest"], f.artifact.digest.as_str());
    assert_eq!(out["plugins"], json!([]));
    assert_eq!(out["attestation"]["status"], "affirming");
    assert_eq!(out["attestation"]["tee"], "dev");
    let policy_id = out["attestation"]["policy"].as_str().unwrap().to_owned();
    assert_eq!(
        (
            out["requestChecked"].clone(),
            out["responseChecked"].clone()
        ),
        (json!(true), json!(true))
    );
    // The attestation result it embeds is the one the gateway recorded in the device's
    // status.
    let a = f.attestation(&name).await;
    assert_eq!(out["attestation"]["id"].as_str(), a.result_id.as_deref());
    let verified = edgefleet_trust::receipt::verify(
        &receipt,
        &std::fs::read(f.dir.path().join("dev-ca.crt")).unwrap(),
    )
    .unwrap();
    assert_eq!(Some(verified.claims.attestation_result), a.result);

    // Any change fails it, by name: one byte of the answer, of the request, of the
    // receipt; and another CA.
    let changed = flipped(&answer, answer.len() / 2);
    let args = ANSWER_ARGS;
    let (ok, out) = f.verify_receipt("dev-ca.crt", &[("response.json", &changed)], &args);
    assert_eq!(
        (ok, out["reason"].as_str()),
        (false, Some("ResponseMismatch")),
        "{out}"
    );
    let changed = flipped(request.as_bytes(), 10);
    let (ok, out) = f.verify_receipt(
        "dev-ca.crt",
        &[("response.json", &answer), ("request.json", &changed)],
        &args,
    );
    assert_eq!(
        (ok, out["reason"].as_str()),
        (false, Some("RequestMismatch")),
        "{out}"
    );
    // One bit of the signature's r (decoded, flipped, encoded again).
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (signed, signature) = receipt.rsplit_once('.').unwrap();
    let signature = flipped(&base64::Engine::decode(&b64, signature).unwrap(), 3);
    let changed = format!("{signed}.{}", base64::Engine::encode(&b64, signature));
    let (ok, out) = f.verify_receipt(
        "dev-ca.crt",
        &[
            ("request.json", request.as_bytes()),
            ("receipt", changed.as_bytes()),
        ],
        &args,
    );
    assert_eq!(
        (ok, out["reason"].as_str()),
        (false, Some("ReceiptSignatureInvalid")),
        "{out}"
    );
    let (ok, out) = f.verify_receipt("gw-ca.crt", &[("receipt", receipt.as_bytes())], &args);
    assert_eq!(
        (ok, out["reason"].as_str()),
        (false, Some("CertificateUntrusted")),
        "{out}"
    );
    // A relying party's pins: the evidence kind and the policy.
    let pinned = |extra: &[&'static str]| [&args[..], extra].concat();
    let (ok, out) = f.verify_receipt(
        "dev-ca.crt",
        &[],
        &pinned(&["--tee", "tpm", "--tee", "sev-snp"]),
    );
    assert_eq!(
        (ok, out["reason"].as_str()),
        (false, Some("TeeNotAccepted")),
        "{out}"
    );
    let (ok, out) = f.verify_receipt("dev-ca.crt", &[], &pinned(&["--policy", "production"]));
    assert_eq!(
        (ok, out["reason"].as_str()),
        (false, Some("PolicyNotAccepted")),
        "{out}"
    );
    let name = policy_id.split_once('@').unwrap().0;
    let mut both = ANSWER_ARGS.to_vec();
    both.extend(["--tee", "dev", "--policy", "production", "--policy", name]);
    let (ok, out) = f.verify_receipt("dev-ca.crt", &[], &both);
    assert!(ok, "{out}");

    // Asking with another value than 1 is refused before any work; not asking gets
    // no receipt.
    let (code, receipt, body) = f.signed_chat(0, &request, "yes").await;
    assert_eq!((code, receipt), (400, None));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["param"], "edgefleet-receipt", "{body}");
    let (code, _) = f.chat(0);
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_ends_with_its_receipt_after_done_and_the_stream_verifies() {
    let f = Fleet::start(1).await;
    f.apply(&f.manifest(512, rollout(false), None)).await;
    f.available(None).await;
    let request = receipt_request(true);
    let (code, header, stream) = f.signed_chat(0, &request, "1").await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&stream));
    assert_eq!(header, None, "a stream's receipt is its last event");
    let text = String::from_utf8_lossy(&stream).into_owned();
    let done = text.find("data: [DONE]").expect("[DONE]");
    let event = text
        .find("event: edgefleet-receipt")
        .expect("the receipt event");
    assert!(done < event, "{text}");
    // Clients that stop at [DONE] (the OpenAI ones) read a stream as before.
    assert!(text[..done].contains("chat.completion.chunk"), "{text}");
    let files: [(&str, &[u8]); 2] = [
        ("stream.txt", &stream),
        ("request.json", request.as_bytes()),
    ];
    let args = ["--stream", "stream.txt", "--request", "request.json"];
    let (ok, out) = f.verify_receipt("dev-ca.crt", &files, &args);
    assert!(ok, "{out}");
    assert_eq!(out["responseChecked"], true);
    // A token changed in the stream fails it.
    let at = text.find("\"content\"").unwrap() + 12;
    let changed = flipped(&stream, at);
    let (ok, out) = f.verify_receipt("dev-ca.crt", &[("stream.txt", &changed)], &args);
    assert_eq!(
        (ok, out["reason"].as_str()),
        (false, Some("ResponseMismatch")),
        "{out}"
    );
    // A stream cut before its receipt names that.
    let cut = &stream[..event];
    let (ok, out) = f.verify_receipt("dev-ca.crt", &[("stream.txt", cut)], &args);
    assert_eq!(
        (ok, out["reason"].as_str()),
        (false, Some("ReceiptMissing")),
        "{out}"
    );
    // Not asked for: no receipt event.
    let resp = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            f.agents[0].1
        ))
        .header("content-type", "application/json")
        .body(request)
        .send()
        .await
        .unwrap();
    let plain = resp.text().await.unwrap();
    assert!(
        plain.contains("data: [DONE]") && !plain.contains("edgefleet-receipt"),
        "{plain}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_model_on_a_swtpm_device_signs_receipts_naming_the_tpm_and_the_ciphertext() {
    let f = Fleet::start_kinds(&["tpm"]).await;
    let (file, key) = encrypted_model(&f);
    f.key_secret(key.bytes()).await;
    let manifest = f.encrypted_manifest(&file, &["tpm"], "dev");
    f.apply(&manifest).await;
    f.available(None).await;
    let name = f.agents[0].0.clone();
    let request = receipt_request(false);
    let (code, receipt, answer) = f.signed_chat(0, &request, "1").await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&answer));
    let receipt = receipt.expect("the receipt header");
    let (ok, out) = f.verify_answer(&receipt, &request, &answer);
    assert!(ok, "{out}");
    // The artifact the device verified is the ciphertext; the attestation is the
    // TPM's, with the measurements the gateway recorded.
    assert_eq!(
        out["model"]["digest"],
        manifest["spec"]["artifact"]["digest"]
    );
    assert_ne!(out["model"]["digest"], f.artifact.digest.as_str());
    assert_eq!(out["attestation"]["tee"], "tpm");
    let a = f.attestation(&name).await;
    assert_eq!(
        out["attestation"]["measurements"].as_str(),
        a.measurements_digest.as_deref()
    );
    assert_eq!(out["attestation"]["id"].as_str(), a.result_id.as_deref());
    // A file that is not a receipt is named as such.
    let other = f.verify_receipt("dev-ca.crt", &[], &["--receipt", "request.json"]);
    assert_eq!(other.1["reason"], "ReceiptMalformed", "{}", other.1);
}
