//! `edgefleet evidence verify` and `edgefleet policy eval` on recorded evidence.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{assert_exit, edgefleet, text};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/attestation")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn f(name: &str) -> String {
    fixtures().join(name).to_str().unwrap().to_owned()
}

const NOW: &str = "2026-06-01T00:00:00Z";

/// `edgefleet evidence verify --kind <kind> --evidence <evidence> <options…>`.
fn verify(kind: &str, evidence: &str, options: &[&str]) -> Output {
    edgefleet(
        &[
            &["evidence", "verify", "--kind", kind, "--evidence", evidence],
            options,
        ]
        .concat(),
    )
}

/// `verify` of an SNP report against the recorded VCEK and AMD chain, at `NOW`.
fn verify_snp(report: &str) -> Output {
    let (vcek, chain) = (
        f("trustee-snp-vcek.der"),
        f("trustee-milan_ask_ark_asvk.pem"),
    );
    verify(
        "snp",
        report,
        &["--vcek", &vcek, "--chain", &chain, "--now", NOW],
    )
}

/// `verify` of the recorded TDX quote against Intel's root, with `options`.
fn verify_tdx(options: &[&str]) -> Output {
    let (quote, root) = (f("gotdx-quote-v5.dat"), f("intel-sgx-root.pem"));
    verify(
        "tdx",
        &quote,
        &[&["--root", root.as_str()], options].concat(),
    )
}

/// `edgefleet policy eval` of the repository's attestation policy and reference data.
fn policy_eval(claims: &Path) -> Output {
    let policy = repo().join("policies/attestation.rego");
    let data = repo().join("policies/reference.json");
    edgefleet(&[
        "policy",
        "eval",
        "--policy",
        policy.to_str().unwrap(),
        "--claims",
        claims.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ])
}

#[test]
fn snp_evidence_prints_claims_and_tampering_is_named() {
    let out = verify_snp(&f("trustee-snp-report.bin"));
    assert!(out.status.success(), "{}", text(&out));
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["tee"], "sev-snp");
    assert_eq!(claims["tcb"]["microcode"], 115);

    let dir = tempfile::tempdir().unwrap();
    let mut report = std::fs::read(fixtures().join("trustee-snp-report.bin")).unwrap();
    report[0x90] ^= 1;
    let tampered = dir.path().join("report.bin");
    std::fs::write(&tampered, report).unwrap();
    let out = verify_snp(tampered.to_str().unwrap());
    assert_exit(&out, 1, &["evidence rejected: SignatureInvalid"]);
}

#[test]
fn tdx_and_tpm_evidence_verify_and_bindings_are_checked() {
    let out = verify_tdx(&["--now", NOW]);
    assert!(out.status.success(), "{}", text(&out));
    let out = verify_tdx(&["--now", NOW, "--nonce", &"00".repeat(64)]);
    assert_exit(&out, 1, &["ReportDataMismatch"]);

    let out = verify("tpm", &f("trustee-tpm_evidence.json"), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let out = verify("tpm", &f("trustee-tpm_evidence.json"), &["--nonce", "00"]);
    assert_exit(&out, 1, &["ReportDataMismatch"]);
}

#[test]
fn missing_inputs_and_garbage_are_named() {
    let out = verify("snp", &f("trustee-snp-report.bin"), &[]);
    assert_exit(&out, 1, &["--kind snp needs --vcek"]);
    let out = verify("tpm", &f("intel-sgx-root.pem"), &[]);
    assert_exit(&out, 1, &["evidence rejected: Malformed"]);
}

#[test]
fn policy_eval_allows_and_denies_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let verify = verify_snp(&f("trustee-snp-report.bin"));
    let mut claims: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    claims["key_binding"] = claims["report_data"].clone();
    let bound = dir.path().join("claims.json");
    std::fs::write(&bound, claims.to_string()).unwrap();
    let out = policy_eval(&bound);
    assert!(out.status.success(), "{}", text(&out));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["allow"], true);
    assert!(d["policy_hash"].as_str().unwrap().starts_with("sha256:"));

    claims["debug"] = serde_json::json!(true);
    std::fs::write(&bound, claims.to_string()).unwrap();
    let out = policy_eval(&bound);
    assert_eq!(out.status.code(), Some(1));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["allow"], false);
    assert_eq!(d["deny"], serde_json::json!(["debugging is enabled"]));
}

#[test]
fn tdx_with_intels_collateral_prints_the_tcb_status_and_names_stale_collateral() {
    let collateral = repo().join("trust/tests/data/tdx-collateral");
    let run = |now: &str| verify_tdx(&["--collateral", collateral.to_str().unwrap(), "--now", now]);
    let out = run("2026-02-01T20:00:00Z");
    assert!(out.status.success(), "{}", text(&out));
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["tcb"]["tcb_status"], "UpToDate", "{claims}");
    assert_eq!(claims["tcb"]["fmspc"], "90c06f000000");
    // Four months later the same documents are stale: named, exit 1.
    let out = run(NOW);
    assert_exit(&out, 1, &["CollateralExpired"]);
}
