//! Smoke run of the fleet simulator (CI): 1,000 simulated devices enrol, attest over the
//! real gateway, stream their desired state and heartbeat, against the real API server
//! and one operator process; a rollout reaches all of them. The speed of it is measured
//! by `bench/fleet.sh`, not here: this checks that every device gets through, with no
//! refusal and no lost report along the way.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;

use edgefleet_e2e::ControlPlane;
use edgefleet_e2e::local_fleet::{self, Proc};

#[tokio::test]
async fn a_thousand_simulated_devices_connect_heartbeat_and_take_a_rollout() {
    let cp = ControlPlane::start().await.expect("control plane starts");
    cp.install_crds().await.expect("CRDs install");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = local_fleet::GatewayPki::write(d, &[]).unwrap();
    let port = edgefleet_e2e::free_port().unwrap();
    let _operator = Proc(
        local_fleet::spawn_operator(
            cp.kubeconfig_path(),
            &pki,
            &local_fleet::OperatorSpec {
                gateway_addr: format!("127.0.0.1:{port}"),
                artifact_dir: d.join("artifacts"),
                approval: "auto:edgefleet.io/pool=sim".into(),
                ek_cas: vec![],
                ek_intermediates: vec![],
                heartbeat_lease_seconds: 60,
                artifact_ca: None,
                log: d.join("operator.log"),
            },
        )
        .unwrap(),
    );
    let manifest = edgefleet_e2e::bench::sim_manifest(d).unwrap();
    // The simulated devices enrol with the pool's token, which labels them.
    let token = local_fleet::create_pool_token(&cp.client().await.unwrap(), "sim")
        .await
        .unwrap();
    std::fs::write(d.join("sim-token"), token).unwrap();
    edgefleet_e2e::bench::trust_sim(&cp.client().await.unwrap(), &manifest)
        .await
        .unwrap();
    let out = Command::new(local_fleet::binary("edgefleet-sim").unwrap())
        .args(["--gateway", &format!("https://127.0.0.1:{port}")])
        .arg("--gateway-ca")
        .arg(d.join("gw-ca.crt"))
        .arg("--token-file")
        .arg(d.join("sim-token"))
        .args([
            "--devices",
            "1000",
            "--heartbeat-seconds",
            "5",
            "--scenario",
            "rollout",
        ])
        .args(["--timeout", "240"])
        .arg("--apply")
        .arg(&manifest)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .output()
        .unwrap();
    let log = std::fs::read_to_string(d.join("operator.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "simulator failed: {}\n{}\n--- operator\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["devices"], 1000, "{summary}");
    assert_eq!(summary["attested"], 1000, "{summary}");
    assert_eq!(summary["ready_devices"], "1000/1000", "{summary}");
    assert_eq!(summary["cloud_to_edge_ms"]["count"], 1000, "{summary}");
    assert!(
        summary["heartbeat_rtt_ms"]["count"].as_u64().unwrap() >= 1000,
        "{summary}"
    );
    assert_eq!(
        summary["failures"],
        serde_json::json!({}),
        "{summary}\n--- operator\n{}",
        log.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(
        summary["simulated"],
        serde_json::json!(["download", "inference"])
    );
}
