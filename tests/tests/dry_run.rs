//! The shipped custom resources pass a server-side dry run against the real API server
//! (schema, CEL rules, defaults), and a broken copy is refused with the rule's message.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use edgefleet_e2e::{ControlPlane, workspace_root};

#[tokio::test]
async fn the_examples_pass_a_server_side_dry_run_and_a_broken_one_does_not() {
    let cp = ControlPlane::start().await.expect("control plane starts");
    cp.install_crds().await.expect("CRDs install");
    let out = cp
        .kubectl()
        .args(["apply", "--server-side", "--dry-run=server", "-f"])
        .arg(workspace_root().join("examples"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(
            "edgemodel.edgefleet.io/smollm2-135m-instruct serverside-applied (server dry run)"
        ),
        "{text}"
    );
    assert!(text.contains("edgedevice.edgefleet.io/"), "{text}");
    // Nothing was stored.
    let got = cp
        .kubectl()
        .args(["get", "em", "-A", "-o", "name"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "");

    let example =
        std::fs::read_to_string(workspace_root().join("examples/edgemodel-smollm2.yaml")).unwrap();
    let broken = example.replacen("digest: sha256:", "digest: md5:", 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, broken).unwrap();
    let out = cp
        .kubectl()
        .args(["apply", "--server-side", "--dry-run=server", "-f"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("digest must have the form sha256:<64 lowercase hex digits>"),
        "{err}"
    );
}
