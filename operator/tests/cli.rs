//! The operator binary's command line.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;

#[test]
fn crd_prints_the_generated_crds() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgefleet-operator"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for name in ["edgemodels.edgefleet.io", "edgedevices.edgefleet.io"] {
        let committed =
            std::fs::read_to_string(root.join(format!("crds/generated/{name}.yaml"))).unwrap();
        assert!(
            text.contains(&committed),
            "{name} differs from crds/generated"
        );
    }
}

#[test]
fn run_without_a_cluster_fails_with_a_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgefleet-operator"))
        .arg("run")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("kubeconfig"), "{err}");
}
