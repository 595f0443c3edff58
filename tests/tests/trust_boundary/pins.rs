//! The agent's local trust pins, with a real operator and two real agents serving the
//! real model:
//!
//! - `till-p` has a provisioned pin (the device owner's own key) in `<config>/trust`;
//!   `till-f` has an empty trust directory and pins the cluster's set at first contact.
//! - A model signed by a key the cluster trusts reaches both. `till-f` serves it and its
//!   first-use file holds exactly the cluster's key. `till-p` refuses it as
//!   `UntrustedSigner` before fetching anything: its EdgeDevice reports the model Failed
//!   with that reason, it serves nothing, and the operator counts a refusal (the model
//!   is Available on `till-f`, with no health-gate failure).
//! - The owner provisions the key on `till-p` and restarts it: it serves.
//! - The cluster then trusts a new signer and the model is re-signed with it: both
//!   devices refuse the new revision as `UntrustedSigner` (the first-use set is never
//!   widened by the control plane) and keep serving the revision they had.

use std::path::Path;
use std::time::Duration;

use edgefleet_crds::{EdgeDevice, EdgeModel, ModelPhase};
use edgefleet_e2e::builders::{
    EdgeModelBuilder, Signer, allow_all_pools, apply_edge_model, trust_signer,
};
use edgefleet_e2e::local_fleet::{self, Proc};
use edgefleet_e2e::wait::eventually;
use edgefleet_e2e::{ControlPlane, cache_dir, free_port};
use kube::api::Api;
use serde_json::{Value, json};

const NS: &str = "fleet";
const POOL: &str = "pins";
const PATIENCE: Duration = Duration::from_secs(180);

struct Logs<'a>(&'a Path);

impl Drop for Logs<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in ["operator", "till-p", "till-f"] {
                let text =
                    std::fs::read_to_string(self.0.join(format!("{n}.log"))).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                eprintln!(
                    "--- {n}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
}

fn spec(d: &Path, name: &str, gateway: &str, port: u16) -> local_fleet::AgentSpec {
    local_fleet::AgentSpec {
        name: name.into(),
        dir: d.join(name),
        gateway: gateway.into(),
        gateway_ca: d.join("gw-ca.crt"),
        port,
        tee: "dev".into(),
        tcti: None,
        netns: None,
        pool: POOL.into(),
        log: d.join(format!("{name}.log")),
    }
}

/// Writes one provisioned pin, as a device's provisioning would.
fn provision(d: &Path, device: &str, file: &str, name: &str, key: &Signer) {
    let dir = d.join(device).join("trust");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(file),
        serde_json::to_vec(&json!({"name": name, "publicKey": key.public_key})).unwrap(),
    )
    .unwrap();
}

async fn readyz(port: u16) -> (u16, String) {
    match reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// `(state, reason)` of `revision` of the model in `device`'s reported models.
async fn reported(client: &kube::Client, device: &str, revision: &str) -> Option<(String, String)> {
    let d = Api::<EdgeDevice>::all(client.clone())
        .get(device)
        .await
        .ok()?;
    let m = d
        .status?
        .models
        .into_iter()
        .find(|m| m.model == format!("{NS}/smollm2") && m.revision == revision)?;
    Some((format!("{:?}", m.state), m.reason.unwrap_or_default()))
}

fn key_material(pem: &str) -> String {
    pem.chars().filter(|c| !c.is_whitespace()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_runs_only_what_its_own_pins_allow() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::start().await.unwrap();
    cp.install_crds().await.unwrap();
    let client = cp.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _logs = Logs(d);
    let pki = local_fleet::GatewayPki::write(d, &[]).unwrap();
    let store = d.join("artifacts");
    let model = std::env::var_os("EDGEFLEET_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let (digest, size) = local_fleet::store_artifact(&store, &model).unwrap();
    let gw_port = free_port().unwrap();
    let _operator = Proc(
        local_fleet::spawn_operator_with(
            cp.kubeconfig_path(),
            &pki,
            &local_fleet::OperatorSpec {
                gateway_addr: format!("127.0.0.1:{gw_port}"),
                artifact_dir: store,
                approval: format!("auto:{}={POOL}", local_fleet::POOL_LABEL),
                ek_cas: vec![],
                ek_intermediates: vec![],
                heartbeat_lease_seconds: 30,
                artifact_ca: None,
                log: d.join("operator.log"),
            },
            &[],
        )
        .unwrap(),
    );
    let gateway = format!("https://127.0.0.1:{gw_port}");
    local_fleet::create_pool_token(&client, POOL).await.unwrap();

    // The cluster trusts the publisher's key before the devices first connect.
    let owner = Signer::generate().unwrap();
    let publisher = Signer::generate().unwrap();
    allow_all_pools(&client).await.unwrap();
    trust_signer(&client, "models-team", &publisher.public_key, &[NS])
        .await
        .unwrap();
    provision(d, "till-p", "owner.json", "owner", &owner);
    let (port_p, port_f) = (free_port().unwrap(), free_port().unwrap());
    let mut till_p = Some(Proc(
        local_fleet::spawn_agent(&spec(d, "till-p", &gateway, port_p)).unwrap(),
    ));
    let _till_f = Proc(local_fleet::spawn_agent(&spec(d, "till-f", &gateway, port_f)).unwrap());

    let manifest = |signer: &Signer, name: &str| -> Value {
        EdgeModelBuilder::new(NS, "smollm2")
            .artifact(
                "https://artifacts.example/smollm2.gguf",
                &digest,
                Some(size),
            )
            .inline_signature(&signer.sign(&model).unwrap())
            .signer(name, &signer.public_key)
            .pool(POOL)
            .attestation(&["dev"], Some("dev"))
            .rollout(json!({"steps": [{"percent": 100}], "maxUnavailable": 2}))
            .runtime(json!({"contextSize": 512, "threads": 1, "parallelSlots": 1}))
            .build()
    };
    apply_edge_model(&client, &manifest(&publisher, "models-team"))
        .await
        .unwrap();
    let models: Api<EdgeModel> = Api::namespaced(client.clone(), NS);
    let rev = eventually("a revision", PATIENCE, || async {
        models.get("smollm2").await.ok()?.status?.current_revision
    })
    .await;

    // till-f pinned the cluster's set and serves; till-p refuses on its own authority.
    eventually("till-f serves", PATIENCE, || async {
        (readyz(port_f).await.0 == 200).then_some(())
    })
    .await;
    let first_use: Vec<Value> = serde_json::from_slice(
        &std::fs::read(d.join("till-f/state/trust/first-use.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(first_use.len(), 1, "{first_use:?}");
    assert_eq!(
        key_material(first_use[0]["publicKey"].as_str().unwrap()),
        key_material(&publisher.public_key)
    );
    let f_log = std::fs::read_to_string(d.join("till-f.log")).unwrap();
    assert!(f_log.contains("trust on first use: pinned"), "{f_log}");
    assert!(!d.join("till-p/state/trust/first-use.json").exists());

    eventually("till-p reports UntrustedSigner", PATIENCE, || async {
        let (state, reason) = reported(&client, "till-p", &rev).await?;
        (state == "Failed" && reason == "UntrustedSigner").then_some(())
    })
    .await;
    assert_eq!(readyz(port_p).await, (503, "no model".into()));
    let status = eventually("Available on till-f alone", PATIENCE, || async {
        let st = models.get("smollm2").await.ok()?.status?;
        (st.phase == Some(ModelPhase::Available) && st.devices.refused == 1).then_some(st)
    })
    .await;
    assert_eq!(status.devices.failed, 0, "{status:?}");
    assert_eq!(
        status
            .refusals
            .iter()
            .map(|r| (r.device.as_str(), r.reason.as_str()))
            .collect::<Vec<_>>(),
        vec![("till-p", "UntrustedSigner")]
    );
    let p_log = std::fs::read_to_string(d.join("till-p.log")).unwrap();
    assert!(
        !p_log.contains("signature verified") && !p_log.contains("converge: serving"),
        "till-p verified or served a model it does not trust: {p_log}"
    );
    let fetched = std::fs::read_dir(d.join("till-p/state/artifacts"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(fetched, 0, "till-p fetched an artifact it does not trust");

    // The owner provisions the publisher's key locally: after a restart, till-p serves.
    drop(till_p.take());
    provision(d, "till-p", "models-team.json", "models-team", &publisher);
    till_p = Some(Proc(
        local_fleet::spawn_agent(&spec(d, "till-p", &gateway, port_p)).unwrap(),
    ));
    eventually("till-p serves after the local change", PATIENCE, || async {
        (readyz(port_p).await.0 == 200).then_some(())
    })
    .await;

    // The cluster trusts a new signer and the model moves to it: no device widens.
    let newcomer = Signer::generate().unwrap();
    trust_signer(&client, "labs-team", &newcomer.public_key, &[NS])
        .await
        .unwrap();
    apply_edge_model(&client, &manifest(&newcomer, "labs-team"))
        .await
        .unwrap();
    let rev2 = eventually("a second revision", PATIENCE, || async {
        models
            .get("smollm2")
            .await
            .ok()?
            .status?
            .current_revision
            .filter(|r| *r != rev)
    })
    .await;
    for device in ["till-f", "till-p"] {
        eventually(
            &format!("{device} refuses the new signer"),
            PATIENCE,
            || async {
                let (state, reason) = reported(&client, device, &rev2).await?;
                (state == "Failed" && reason == "UntrustedSigner").then_some(())
            },
        )
        .await;
    }
    assert_eq!(readyz(port_f).await.0, 200, "till-f keeps serving");
    assert_eq!(readyz(port_p).await.0, 200, "till-p keeps serving");
    let again: Vec<Value> = serde_json::from_slice(
        &std::fs::read(d.join("till-f/state/trust/first-use.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(again, first_use, "the first-use pins were widened");
    drop(till_p);
}
