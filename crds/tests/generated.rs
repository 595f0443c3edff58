#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

//! The committed CRD YAML matches the types, and the examples parse as the types.

use std::path::Path;

use edgefleet_crds::{EdgeDevice, EdgeModel, generated_crds};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn committed_crds_match_the_types() {
    let crds = generated_crds().unwrap();
    let mut names: Vec<&str> = crds.iter().map(|c| c.file_name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "edgebootstraptokens.edgefleet.io.yaml",
            "edgedevices.edgefleet.io.yaml",
            "edgegatewayreplicas.edgefleet.io.yaml",
            "edgemodels.edgefleet.io.yaml",
            "edgetrustpolicies.edgefleet.io.yaml",
        ]
    );
    for crd in crds {
        let path = root().join("crds/generated").join(&crd.file_name);
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} missing: {e}", path.display()));
        assert!(
            committed == crd.yaml,
            "{} drifted from the types; run `cargo run -p edgefleet-crds --bin crdgen -- --out crds/generated`",
            path.display()
        );
    }
}

#[test]
fn the_chart_ships_the_same_crds() {
    for crd in generated_crds().unwrap() {
        let path = root().join("charts/edgefleet/crds").join(&crd.file_name);
        let copy = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} missing: {e}", path.display()));
        assert!(
            copy == crd.yaml,
            "{} differs from crds/generated; copy it again",
            path.display()
        );
    }
}

#[test]
fn generated_schema_carries_cel_rules_and_docs() {
    let crds = generated_crds().unwrap();
    let model = &crds
        .iter()
        .find(|c| c.file_name == "edgemodels.edgefleet.io.yaml")
        .unwrap()
        .yaml;
    for needle in [
        "x-kubernetes-validations",
        "digest must have the form sha256:<64 lowercase hex digits>",
        "servedName is immutable",
        "percent must be between 1 and 100",
        "memoryBytes must be greater than 0",
        "SHA-256 of the whole file",
    ] {
        assert!(model.contains(needle), "EdgeModel CRD lacks {needle:?}");
    }
    // A drifted or hand-edited rule would show up here as well.
    assert!(!model.contains("self.matches('^sha256:.*$')"));
}

#[test]
fn examples_parse_as_typed_resources() {
    let model: EdgeModel = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("examples/edgemodel-smollm2.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(model.spec.served_name, "smollm2-135m-instruct");
    assert_eq!(model.spec.artifact.size_bytes, Some(98_362_432));
    assert_eq!(model.spec.rollout.steps.as_ref().map(Vec::len), Some(3));
    let device: EdgeDevice = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("examples/edgedevice-store-042.yaml")).unwrap(),
    )
    .unwrap();
    assert!(device.spec.approved);
    assert_eq!(device.spec.facts.cpu_cores, 4);
    let policy: edgefleet_crds::EdgeTrustPolicy = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("examples/edgetrustpolicy.yaml")).unwrap(),
    )
    .unwrap();
    // The signer and pool the example EdgeModel needs.
    assert_eq!(policy.spec.signers[0].name, "models-team");
    assert_eq!(policy.spec.signers[0].namespaces, ["retail"]);
    assert_eq!(policy.spec.device_pools[0].namespaces, ["retail"]);
}

#[test]
fn a_model_without_an_artifact_does_not_parse() {
    let err = serde_yaml::from_str::<EdgeModel>(
        "apiVersion: edgefleet.io/v1alpha1\nkind: EdgeModel\nmetadata: {name: x}\nspec:\n  servedName: x\n  signature: {uri: 'https://a/b'}\n  signers: []\n",
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("missing field `artifact`"),
        "{err}"
    );
}
