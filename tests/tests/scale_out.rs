//! Scale-out, with a real operator and real agents:
//!
//! - an agent lists several gateways (`gateway.urls`: every operator replica serves
//!   devices); when the one it starts at is gone it moves to the next, and enrols,
//!   attests and turns `Ready` there;
//! - what a device runs is derived from the EdgeModel status: a rollout to several
//!   devices writes no EdgeDevice spec at all, and each device serves the revision its
//!   rank gives.

use std::path::Path;
use std::time::Duration;

use edgefleet_crds::conditions as cond;
use edgefleet_crds::{EdgeDevice, EdgeModel, ModelPhase};
use edgefleet_e2e::builders::{
    EdgeModelBuilder, Signer, allow_all_pools, apply_edge_model, assigned_revision, trust_signer,
};
use edgefleet_e2e::local_fleet::{self, Proc};
use edgefleet_e2e::wait::eventually;
use edgefleet_e2e::{ControlPlane, cache_dir, free_port};
use kube::api::Api;
use serde_json::json;

const NS: &str = "fleet";
const POOL: &str = "scale";
const PATIENCE: Duration = Duration::from_secs(180);

struct Logs<'a>(&'a Path, &'a [&'a str]);

impl Drop for Logs<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in self.1 {
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

fn ready(d: &EdgeDevice) -> bool {
    edgefleet_operator::rollout::condition_true(d, cond::READY)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_fail_over_along_their_gateway_list_and_run_what_their_rank_gives() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::start().await.unwrap();
    cp.install_crds().await.unwrap();
    let client = cp.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let names = ["till-1", "till-2", "till-3"];
    let _logs = Logs(d, &["operator", "till-1", "till-2", "till-3"]);
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
    let live = format!("https://127.0.0.1:{gw_port}");
    // A replica that is gone: nothing listens there.
    let gone = format!("https://127.0.0.1:{}", free_port().unwrap());
    local_fleet::create_pool_token(&client, POOL).await.unwrap();
    allow_all_pools(&client).await.unwrap();

    // Each agent lists [gone, live], in the order that puts `gone` where that agent
    // starts: every one of them has to fail over.
    let mut agents = Vec::new();
    for name in names {
        let list = if edgefleet_agent::gateway_session::first_endpoint(name, 2) == 0 {
            [gone.clone(), live.clone()]
        } else {
            [live.clone(), gone.clone()]
        };
        let port = free_port().unwrap();
        let child =
            local_fleet::spawn_agent_with_gateways(&spec(d, name, &list[0], port), &list[1..])
                .unwrap();
        agents.push((name, port, Proc(child)));
    }
    let devices: Api<EdgeDevice> = Api::all(client.clone());
    eventually(
        "every device Ready through the live gateway",
        PATIENCE,
        || async {
            let mut all = true;
            for name in names {
                all &= ready(&devices.get_opt(name).await.ok()??);
            }
            all.then_some(())
        },
    )
    .await;
    for name in names {
        let log = std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap();
        assert!(
            log.contains("gateway session ended") && log.contains(&gone),
            "{name} never tried the gone gateway first:\n{log}"
        );
    }

    // A model rolled out to all three: each serves the revision, and no EdgeDevice
    // spec was written for it (the operator derives, it does not assign).
    let publisher = Signer::generate().unwrap();
    trust_signer(&client, "models-team", &publisher.public_key, &[NS])
        .await
        .unwrap();
    let manifest = EdgeModelBuilder::new(NS, "smollm2")
        .served_name("smollm2")
        .artifact(
            "https://artifacts.example/smollm2.gguf",
            &digest,
            Some(size),
        )
        .inline_signature(&publisher.sign(&model).unwrap())
        .signer("models-team", &publisher.public_key)
        .pool(POOL)
        .attestation(&["dev"], Some("dev"))
        .rollout(json!({"steps": [{"count": 1}, {"percent": 100}], "maxUnavailable": 1}))
        .runtime(json!({"contextSize": 512, "threads": 1, "parallelSlots": 1}))
        .build();
    apply_edge_model(&client, &manifest).await.unwrap();
    let models: Api<EdgeModel> = Api::namespaced(client.clone(), NS);
    let rev = eventually("Available on 3 devices", PATIENCE, || async {
        let st = models.get("smollm2").await.ok()?.status?;
        (st.phase == Some(ModelPhase::Available) && st.ready_devices.as_deref() == Some("3/3"))
            .then_some(st.stable_revision?)
    })
    .await;
    let m = models.get("smollm2").await.unwrap();
    assert_eq!(
        m.status.as_ref().and_then(|s| s.rollout_rank),
        Some(edgefleet_crds::model::RANK_ALL)
    );
    for name in names {
        assert_eq!(
            assigned_revision(&client, NS, "smollm2", name)
                .await
                .as_ref(),
            Some(&rev)
        );
        let dev = devices.get(name).await.unwrap();
        let writers: Vec<String> = dev
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|f| f.subresource.is_none())
            .filter_map(|f| f.manager.clone())
            .filter(|m| m.starts_with("edgefleet-em/"))
            .collect();
        assert!(writers.is_empty(), "{name}'s spec written by {writers:?}");
    }
    let _ = agents;
}
