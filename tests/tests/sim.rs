//! Smoke run of the fleet simulator (CI): 1,000 simulated devices enrol, attest over the
//! real gateway, stream their desired state and heartbeat, against the real API server
//! and one operator process; a rollout reaches all of them. The speed of it is measured
//! by `bench/fleet.sh`, not here: this checks that every device gets through, with no
//! refusal and no lost report along the way.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;

use edgefleet_e2e::ControlPlane;
use edgefleet_e2e::fleet::{self, Proc};

/// A signed stand-in artifact and the EdgeModel that rolls it out to every simulated
/// device at once.
pub fn manifest(dir: &std::path::Path, pool: &str) -> serde_json::Value {
    use p256::pkcs8::EncodePrivateKey as _;
    let file = dir.join("weights.gguf");
    std::fs::write(&file, b"GGUF simulated weights").unwrap();
    let key = p256::SecretKey::random(&mut rand_core::OsRng)
        .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
        .unwrap()
        .to_string();
    let signer = edgefleet_trust::model_signing::PrivateKey::from_pem(&key).unwrap();
    let bundle =
        edgefleet_trust::model_signing::sign(&file, &signer, None, &Default::default()).unwrap();
    serde_json::json!({
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "sim-model", "namespace": "sim"},
        "spec": {
            "servedName": "sim-model",
            "artifact": {"uri": "https://artifacts.example/weights.gguf",
                         "digest": fleet::digest_of(&file).unwrap(), "sizeBytes": 22},
            "signature": {"inline": String::from_utf8(bundle).unwrap()},
            "signers": [{"name": "sim", "publicKey": signer.public_key().to_pem().unwrap()}],
            "selector": {"matchLabels": {"edgefleet.io/pool": pool}},
            "attestation": {"teeKinds": ["dev"], "policy": "dev"},
            "rollout": {"maxUnavailable": "100%"},
        }
    })
}

#[tokio::test]
async fn a_thousand_simulated_devices_connect_heartbeat_and_take_a_rollout() {
    let cp = ControlPlane::start().await.expect("control plane starts");
    cp.install_crds().await.expect("CRDs install");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = fleet::GatewayPki::write(d, &[]).unwrap();
    let port = edgefleet_e2e::free_port().unwrap();
    let _operator = Proc(
        fleet::spawn_operator(
            cp.kubeconfig_path(),
            &pki,
            &fleet::OperatorSpec {
                gateway_addr: format!("127.0.0.1:{port}"),
                artifact_dir: d.join("artifacts"),
                approval: "auto:edgefleet.io/pool=sim".into(),
                ek_cas: vec![],
                ek_intermediates: vec![],
                heartbeat_lease_seconds: 60,
                log: d.join("operator.log"),
            },
        )
        .unwrap(),
    );
    std::fs::write(d.join("model.json"), manifest(d, "sim").to_string()).unwrap();
    let out = Command::new(fleet::binary("edgefleet-sim").unwrap())
        .args(["--gateway", &format!("https://127.0.0.1:{port}")])
        .arg("--gateway-ca")
        .arg(d.join("gw-ca.crt"))
        .arg("--token-file")
        .arg(d.join("token"))
        .args([
            "--devices",
            "1000",
            "--heartbeat-seconds",
            "5",
            "--scenario",
            "rollout",
        ])
        .args(["--label", "edgefleet.io/pool=sim", "--timeout", "240"])
        .arg("--apply")
        .arg(d.join("model.json"))
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
