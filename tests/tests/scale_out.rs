#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

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

/// An operator replica with its gateway on `port`, serving the artifacts in `d`,
/// auto-approving the pool's devices, logging to `d/<log>.log`.
fn operator(
    cp: &ControlPlane,
    pki: &local_fleet::GatewayPki,
    d: &Path,
    log: &str,
    port: u16,
    lease_seconds: u64,
    extra: &[&str],
) -> std::process::Child {
    local_fleet::spawn_operator_with(
        cp.kubeconfig_path(),
        pki,
        &local_fleet::OperatorSpec {
            gateway_addr: format!("127.0.0.1:{port}"),
            artifact_dir: d.join("artifacts"),
            approval: format!("auto:{}={POOL}", local_fleet::POOL_LABEL),
            ek_cas: vec![],
            ek_intermediates: vec![],
            heartbeat_lease_seconds: lease_seconds,
            artifact_ca: None,
            log: d.join(format!("{log}.log")),
        },
        extra,
    )
    .unwrap()
}

/// The model `smollm2` for the pool's dev devices, signed by a publisher the cluster
/// trusts from now on, rolled out as `rollout` says; applied.
async fn apply_model(
    client: &kube::Client,
    model: &Path,
    digest: &str,
    size: u64,
    rollout: serde_json::Value,
) {
    let publisher = Signer::generate().unwrap();
    trust_signer(client, "models-team", &publisher.public_key, &[NS])
        .await
        .unwrap();
    let manifest = EdgeModelBuilder::new(NS, "smollm2")
        .served_name("smollm2")
        .artifact("https://artifacts.example/smollm2.gguf", digest, Some(size))
        .inline_signature(&publisher.sign(model).unwrap())
        .signer("models-team", &publisher.public_key)
        .pool(POOL)
        .attestation(&["dev"], Some("dev"))
        .rollout(rollout)
        .runtime(json!({"contextSize": 512, "threads": 1, "parallelSlots": 1}))
        .build();
    apply_edge_model(client, &manifest).await.unwrap();
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
    let _operator = Proc(operator(&cp, &pki, d, "operator", gw_port, 30, &[]));
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
    apply_model(
        &client,
        &model,
        &digest,
        size,
        json!({"steps": [{"count": 1}, {"percent": 100}], "maxUnavailable": 1}),
    )
    .await;
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

/// The Ready condition of `d`: (status, lastTransitionTime).
fn ready_since(d: &EdgeDevice) -> Option<(String, String)> {
    let c = d
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == cond::READY)?;
    Some((c.status.clone(), c.last_transition_time.0.to_string()))
}

fn gateway_of(d: &EdgeDevice) -> Option<String> {
    d.status.as_ref()?.gateway.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_serves_devices_and_a_dead_replicas_devices_move_without_going_not_ready() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cp = ControlPlane::start().await.unwrap();
    cp.install_crds().await.unwrap();
    let client = cp.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Two devices start at each replica (their place in the list is a hash of the name).
    let mut first = Vec::new();
    let mut second = Vec::new();
    for i in 0..64 {
        let name = format!("till-{i}");
        let at = edgefleet_agent::gateway_session::first_endpoint(&name, 2);
        let side = if at == 0 { &mut first } else { &mut second };
        if side.len() < 2 {
            side.push(name);
        }
    }
    let names: Vec<String> = first.iter().chain(&second).cloned().collect();
    let mut logged: Vec<&str> = vec!["op-a", "op-b"];
    logged.extend(names.iter().map(String::as_str));
    let _logs = Logs(d, &logged);
    let pki = local_fleet::GatewayPki::write(d, &[]).unwrap();
    let store = d.join("artifacts");
    let model = std::env::var_os("EDGEFLEET_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let (digest, size) = local_fleet::store_artifact(&store, &model).unwrap();
    let lease_seconds = 10;
    // No model state is written to a device's status: the leader knows the states the
    // other replica's devices report only from its publication.
    let replica = |identity: &str, port: u16| {
        let id = format!("--identity={identity}");
        operator(
            &cp,
            &pki,
            d,
            identity,
            port,
            lease_seconds,
            &[&id, "--status-change-per-second=0"],
        )
    };
    let (port_a, port_b) = (free_port().unwrap(), free_port().unwrap());
    let op_a = Proc(replica("op-a", port_a));
    let url_a = format!("https://127.0.0.1:{port_a}");
    let url_b = format!("https://127.0.0.1:{port_b}");
    // op-a leads (it starts first); op-b stands by, and serves devices all the same.
    eventually("op-a leads", PATIENCE, || async {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), "edgefleet-system");
        let spec = leases.get_opt("edgefleet-operator").await.ok()??.spec?;
        (spec.holder_identity.as_deref() == Some("op-a")).then_some(())
    })
    .await;
    let _op_b = Proc(replica("op-b", port_b));
    // Both gateways listen before the devices start (else those that start at op-b
    // would fail over to op-a, as they should, and stay there).
    for port in [port_a, port_b] {
        eventually("the gateway listening", PATIENCE, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
    }
    local_fleet::create_pool_token(&client, POOL).await.unwrap();
    allow_all_pools(&client).await.unwrap();
    let mut agents = Vec::new();
    for name in &names {
        let port = free_port().unwrap();
        let child = local_fleet::spawn_agent_with_gateways(
            &spec(d, name, &url_a, port),
            std::slice::from_ref(&url_b),
        )
        .unwrap();
        agents.push(Proc(child));
    }
    let devices: Api<EdgeDevice> = Api::all(client.clone());
    // Each device is Ready, judged by the replica it reports to.
    eventually(
        "every device Ready at its own replica",
        PATIENCE,
        || async {
            for name in &first {
                let dev = devices.get_opt(name).await.ok()??;
                (ready(&dev) && gateway_of(&dev).as_deref() == Some("op-a")).then_some(())?;
            }
            for name in &second {
                let dev = devices.get_opt(name).await.ok()??;
                (ready(&dev) && gateway_of(&dev).as_deref() == Some("op-b")).then_some(())?;
            }
            Some(())
        },
    )
    .await;

    // A rollout planned by the leader reaches the devices of both replicas, and
    // completes on what they report to either (no model state is written to a status).
    apply_model(
        &client,
        &model,
        &digest,
        size,
        json!({"steps": [{"percent": 100}], "maxUnavailable": 4}),
    )
    .await;
    let models: Api<EdgeModel> = Api::namespaced(client.clone(), NS);
    eventually("Available on 4 devices", PATIENCE, || async {
        let st = models.get("smollm2").await.ok()?.status?;
        (st.phase == Some(ModelPhase::Available) && st.ready_devices.as_deref() == Some("4/4"))
            .then_some(())
    })
    .await;
    let mut before = std::collections::BTreeMap::new();
    for name in &names {
        before.insert(name.clone(), ready_since(&devices.get(name).await.unwrap()));
    }

    let sessions = |name: &str| {
        std::fs::read_to_string(d.join(format!("{name}.log")))
            .unwrap()
            .matches("connected to the gateway")
            .count()
    };
    let sessions_before: Vec<usize> = first.iter().map(|n| sessions(n)).collect();
    // The leader dies. Its devices move to op-b, which takes the lead; nobody marks a
    // device not ready for the move.
    drop(op_a);
    eventually("every device at op-b", PATIENCE, || async {
        for name in &names {
            let dev = devices.get_opt(name).await.ok()??;
            (gateway_of(&dev).as_deref() == Some("op-b")).then_some(())?;
        }
        Some(())
    })
    .await;
    // Two heartbeat leases later, the gone replica's Lease has long run out and the new
    // leader sweeps: still no device went not ready.
    tokio::time::sleep(Duration::from_secs(2 * lease_seconds)).await;
    for name in &names {
        let dev = devices.get(name).await.unwrap();
        assert_eq!(
            ready_since(&dev),
            before[name],
            "{name} went not ready when its replica died"
        );
        assert_eq!(gateway_of(&dev).as_deref(), Some("op-b"));
    }
    let st = models.get("smollm2").await.unwrap().status.unwrap();
    assert_eq!(st.ready_devices.as_deref(), Some("4/4"));
    assert_eq!(st.phase, Some(ModelPhase::Available));
    // The moved devices kept their session: a gateway that stops answering is a
    // passing trouble, so they went to op-b under the certificate they had, without
    // enrolling or attesting again (which would cost API writes in a storm).
    for (name, before) in first.iter().zip(sessions_before) {
        let log = std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap();
        assert!(
            log.contains("gateway unreachable; keeping the session"),
            "{name} did not keep its session:\n{log}"
        );
        assert_eq!(
            sessions(name),
            before,
            "{name} attested again to move:\n{log}"
        );
    }
    for name in &names {
        let recorded = devices.get(name).await.unwrap().status.unwrap().models;
        assert!(
            recorded.is_empty(),
            "{name}: {recorded:?} written despite a zero budget"
        );
    }

    // Negative: a device that really goes silent is marked not ready by the replica
    // that holds it.
    let silent = names[0].clone();
    drop(agents.remove(0));
    eventually("the silent device not ready", PATIENCE, || async {
        let dev = devices.get_opt(&silent).await.ok()??;
        (!ready(&dev) && gateway_of(&dev).is_none()).then_some(())
    })
    .await;
}
