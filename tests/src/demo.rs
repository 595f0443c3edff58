//! `edgefleet-dev demo`: the whole story on one machine. The local control plane (etcd
//! and the API server), the operator with its gateway, three agents as device processes
//! (till-1 attests with a software TPM, the others with the dev key), the model signed
//! with `edgefleet model sign`, the EdgeModel applied with `kubectl`, the rollout
//! watched until 3/3, and one chat completion through a device with the pii-redact
//! plugin's effect visible. Ctrl-C stops everything cleanly at any point.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use edgefleet_crds::{EdgeDevice, EdgeModel, ModelPhase};
use kube::api::Api;

use crate::local_fleet::{self, Proc};
use crate::{ControlPlane, cache_dir};

const NS: &str = "retail";

fn step(n: u32, what: &str) {
    println!("\n\x1b[1m[{n}/7] {what}\x1b[0m");
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the demo in `dir` (wiped first). With `hold`, keeps everything running until
/// Ctrl-C after the chat.
pub async fn demo(dir: &Path, hold: bool) -> anyhow::Result<()> {
    tokio::select! {
        r = story(dir, hold) => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted: stopping the agents, the operator and the control plane");
            Ok(())
        }
    }
}

fn model_path() -> PathBuf {
    std::env::var_os("EDGEFLEET_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

fn plugin_path() -> PathBuf {
    std::env::var_os("EDGEFLEET_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("target-wasm/wasm32-wasip2/release"))
        .join("pii_redact.wasm")
}

async fn story(dir: &Path, hold: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("wiping {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;

    step(1, "local control plane: etcd and the Kubernetes API server");
    let cp = ControlPlane::start_in(&dir.join("control-plane"))
        .await
        .context("starting the local control plane")?;
    let crds = cp.install_crds().await.context("installing CRDs")?;
    println!("  API server {}  CRDs {}", cp.server_url(), crds.join(", "));
    println!("  export KUBECONFIG={}", cp.kubeconfig_path().display());
    let client = cp.client().await?;

    step(
        2,
        "operator with its device gateway (HTTPS, mTLS after attestation)",
    );
    let pki = local_fleet::GatewayPki::write(dir, &[])?;
    let swtpm = crate::swtpm::Swtpm::start();
    let store = dir.join("artifacts");
    let gw_port = crate::free_port()?;
    let _operator = Proc(local_fleet::spawn_operator(
        cp.kubeconfig_path(),
        &pki,
        &local_fleet::OperatorSpec {
            gateway_addr: format!("127.0.0.1:{gw_port}"),
            artifact_dir: store.clone(),
            approval: "auto:edgefleet.io/pool=retail".into(),
            ek_cas: vec![swtpm.ca_path("swtpm-localca-rootca-cert.pem")],
            ek_intermediates: vec![swtpm.ca_path("issuercert.pem")],
            heartbeat_lease_seconds: 15,
            artifact_ca: None,
            log: dir.join("operator.log"),
        },
    )?);
    println!(
        "  gateway https://127.0.0.1:{gw_port}  log {}",
        dir.join("operator.log").display()
    );

    step(
        3,
        "three devices: till-1 (software TPM), till-2 and till-3 (dev key)",
    );
    // The devices enrol with an enrolment token (EdgeBootstrapToken) that gives them the
    // administrator's label edgefleet.io/pool=retail; only its hash is stored.
    let token = local_fleet::create_pool_token(&client, "retail").await?;
    println!(
        "  enrolment token {}.**************** (EdgeBootstrapToken, label edgefleet.io/pool=retail)",
        token.split('.').next().unwrap_or_default()
    );
    let mut agents = Vec::new();
    for (i, name) in ["till-1", "till-2", "till-3"].iter().enumerate() {
        let port = crate::free_port()?;
        let tpm = i == 0;
        let child = local_fleet::spawn_agent(&local_fleet::AgentSpec {
            name: (*name).into(),
            dir: dir.join(name),
            gateway: format!("https://127.0.0.1:{gw_port}"),
            gateway_ca: dir.join("gw-ca.crt"),
            port,
            tee: if tpm { "tpm" } else { "dev" }.into(),
            tcti: tpm.then(|| swtpm.tcti()),
            netns: None,
            pool: "retail".into(),
            log: dir.join(format!("{name}.log")),
        })?;
        agents.push((*name, port, Proc(child)));
    }
    let devices: Api<EdgeDevice> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut shown = String::new();
    loop {
        let list = devices.list(&Default::default()).await?.items;
        let attested = list
            .iter()
            .filter(|d| edgefleet_operator::rollout::condition_true(d, "Attested"))
            .count();
        let line = format!("  enrolled {} / attested {attested} of 3", list.len());
        if line != shown {
            println!("{line}");
            shown = line;
        }
        if attested == 3 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "devices did not attest within 2 minutes; see {}/till-*.log",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    print!("{}", run(cp.kubectl().args(["get", "edgedevices"]))?);

    step(
        4,
        "sign the model and the plugin with `edgefleet model sign`",
    );
    let key = dir.join("signing-key.pem");
    let public = dir.join("signing-key.pub");
    local_fleet::generate_signing_key(&key)?;
    run(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public))?;
    let cli = local_fleet::binary("edgefleet")?;
    let model = model_path();
    let plugin = plugin_path();
    for (file, bundle) in [
        (&model, dir.join("model.sig")),
        (&plugin, dir.join("pii_redact.sig")),
    ] {
        run(Command::new(&cli)
            .args(["model", "sign", "--key"])
            .arg(&key)
            .arg("-o")
            .arg(&bundle)
            .arg(file))?;
        println!("  {} -> {}", file.display(), bundle.display());
    }
    let (digest, size) = local_fleet::store_artifact(&store, &model)?;
    let (plugin_digest, plugin_size) = local_fleet::store_artifact(&store, &plugin)?;

    step(
        5,
        "kubectl apply the EdgeTrustPolicy (the cluster trusts demo-signer for retail) and the EdgeModel (plugin chain: pii-redact)",
    );
    let indent = |s: String, n: usize| {
        s.lines()
            .map(|l| format!("{}{l}", " ".repeat(n)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // The cluster's owner decides which signers and which devices the namespace may use;
    // the EdgeModel then names its signer only.
    let policy = format!(
        r#"apiVersion: edgefleet.io/v1alpha1
kind: EdgeTrustPolicy
metadata:
  name: demo
spec:
  signers:
    - name: demo-signer
      publicKey: |
{public_key}
      namespaces: [{NS}]
  devicePools:
    - name: stores
      selector: {{}}
      namespaces: [{NS}]
"#,
        public_key = indent(std::fs::read_to_string(&public)?, 8),
    );
    let policy_path = dir.join("edgetrustpolicy.yaml");
    std::fs::write(&policy_path, policy)?;
    print!(
        "{}",
        run(cp
            .kubectl()
            .args(["apply", "--server-side", "--field-manager=kubectl", "-f"])
            .arg(&policy_path))?
    );
    let manifest = format!(
        r#"apiVersion: edgefleet.io/v1alpha1
kind: EdgeModel
metadata:
  name: smollm2
  namespace: {NS}
spec:
  servedName: smollm2
  artifact:
    uri: https://artifacts.edgefleet.example/SmolLM2-135M-Instruct.Q4_1.gguf
    digest: {digest}
    sizeBytes: {size}
  signature:
    inline: |
{bundle}
  signers:
    - name: demo-signer
  selector:
    matchLabels:
      edgefleet.io/pool: retail
  attestation:
    teeKinds: [tpm, dev]
    policy: dev
  rollout:
    steps:
      - count: 1
      - percent: 100
    maxUnavailable: 1
  runtime:
    contextSize: 1024
    threads: 1
  plugins:
    - name: pii-redact
      artifact:
        uri: https://artifacts.edgefleet.example/pii_redact.wasm
        digest: {plugin_digest}
        sizeBytes: {plugin_size}
      signature:
        inline: |
{plugin_bundle}
      limits:
        deadlineMillis: 200
        memoryBytes: 33554432
      config:
        requests: "false"
"#,
        bundle = indent(std::fs::read_to_string(dir.join("model.sig"))?, 6),
        plugin_bundle = indent(std::fs::read_to_string(dir.join("pii_redact.sig"))?, 10),
    );
    let manifest_path = dir.join("edgemodel.yaml");
    std::fs::write(&manifest_path, manifest)?;
    print!(
        "{}",
        run(cp
            .kubectl()
            .args(["apply", "--server-side", "--field-manager=kubectl", "-f"])
            .arg(&manifest_path))?
    );

    step(6, "watch the rollout: kubectl get edgemodels -n retail");
    let models: Api<EdgeModel> = Api::namespaced(client.clone(), NS);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut shown = String::new();
    loop {
        let m = models.get("smollm2").await?;
        let st = m.status.unwrap_or_default();
        let line = format!(
            "  {:<8} ready {:<4} updated {} step {}",
            st.phase.unwrap_or(ModelPhase::Pending),
            st.ready_devices.clone().unwrap_or_else(|| "0/0".into()),
            st.devices.updated,
            st.current_step.map_or(0, |s| s + 1),
        );
        if line != shown {
            println!("{line}");
            shown = line;
        }
        if st.phase == Some(ModelPhase::Available) && st.ready_devices.as_deref() == Some("3/3") {
            break;
        }
        if st.phase == Some(ModelPhase::Failed) || st.phase == Some(ModelPhase::Degraded) {
            bail!("the rollout stopped: {:?}", st.conditions);
        }
        if Instant::now() > deadline {
            bail!(
                "the rollout did not reach 3/3 in 5 minutes; see {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    print!(
        "{}",
        run(cp.kubectl().args(["get", "edgemodels", "-n", NS]))?
    );

    step(
        7,
        "one chat completion through till-1, with pii-redact on the answers",
    );
    let (_, port, _) = &agents[0];
    let body = serde_json::json!({
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": "You repeat the user message word for word."},
            {"role": "user", "content": "The cat sat on the mat."},
            {"role": "assistant", "content": "The cat sat on the mat."},
            {"role": "user", "content": "Write to bob.smith@example.com or call 555-123-4567."},
        ],
        "max_tokens": 40, "temperature": 0,
    });
    let out = run(Command::new("curl")
        .args([
            "-sf",
            "-m",
            "120",
            "-H",
            "content-type: application/json",
            "-d",
        ])
        .arg(body.to_string())
        .arg(format!("http://127.0.0.1:{port}/v1/chat/completions")))?;
    let answer: serde_json::Value = serde_json::from_str(&out)?;
    println!("  user:      Write to bob.smith@example.com or call 555-123-4567.");
    println!(
        "  smollm2:   {}",
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
    );
    println!(
        "  (the model was asked to repeat the message; pii-redact rewrites phone numbers and e-mail addresses in answers)"
    );

    println!(
        "\ndone in {:.0} s. Devices:",
        started.elapsed().as_secs_f64()
    );
    for (name, port, _) in &agents {
        println!(
            "  {name}: http://127.0.0.1:{port}/v1/chat/completions  (logs {}/{name}.log)",
            dir.display()
        );
    }
    println!(
        "  kubectl: export KUBECONFIG={}",
        cp.kubeconfig_path().display()
    );
    if hold {
        println!("Everything keeps running; Ctrl-C stops it.");
        std::future::pending::<()>().await;
    }
    Ok(())
}
