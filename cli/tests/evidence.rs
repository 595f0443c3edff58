//! `edgefleet evidence verify` and `edgefleet policy eval` on recorded evidence.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/attestation")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn f(name: &str) -> String {
    fixtures().join(name).to_str().unwrap().to_owned()
}

fn edgefleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgefleet"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const NOW: &str = "2026-06-01T00:00:00Z";

#[test]
fn snp_evidence_prints_claims_and_tampering_is_named() {
    let out = edgefleet(&[
        "evidence",
        "verify",
        "--kind",
        "snp",
        "--evidence",
        &f("trustee-snp-report.bin"),
        "--vcek",
        &f("trustee-snp-vcek.der"),
        "--chain",
        &f("trustee-milan_ask_ark_asvk.pem"),
        "--now",
        NOW,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["tee"], "sev-snp");
    assert_eq!(claims["tcb"]["microcode"], 115);

    let dir = tempfile::tempdir().unwrap();
    let mut report = std::fs::read(fixtures().join("trustee-snp-report.bin")).unwrap();
    report[0x90] ^= 1;
    let tampered = dir.path().join("report.bin");
    std::fs::write(&tampered, report).unwrap();
    let out = edgefleet(&[
        "evidence",
        "verify",
        "--kind",
        "snp",
        "--evidence",
        tampered.to_str().unwrap(),
        "--vcek",
        &f("trustee-snp-vcek.der"),
        "--chain",
        &f("trustee-milan_ask_ark_asvk.pem"),
        "--now",
        NOW,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("evidence rejected: SignatureInvalid"),
        "{}",
        text(&out)
    );
}

#[test]
fn tdx_and_tpm_evidence_verify_and_bindings_are_checked() {
    let out = edgefleet(&[
        "evidence",
        "verify",
        "--kind",
        "tdx",
        "--evidence",
        &f("gotdx-quote-v5.dat"),
        "--root",
        &f("intel-sgx-root.pem"),
        "--now",
        NOW,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = edgefleet(&[
        "evidence",
        "verify",
        "--kind",
        "tdx",
        "--evidence",
        &f("gotdx-quote-v5.dat"),
        "--root",
        &f("intel-sgx-root.pem"),
        "--now",
        NOW,
        "--nonce",
        &"00".repeat(64),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("ReportDataMismatch"), "{}", text(&out));

    let out = edgefleet(&[
        "evidence",
        "verify",
        "--kind",
        "tpm",
        "--evidence",
        &f("trustee-tpm_evidence.json"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = edgefleet(&[
        "evidence",
        "verify",
        "--kind",
        "tpm",
        "--evidence",
        &f("trustee-tpm_evidence.json"),
        "--nonce",
        "00",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("ReportDataMismatch"), "{}", text(&out));
}

#[test]
fn missing_inputs_and_garbage_are_named() {
    let out = edgefleet(&[
        "evidence",
        "verify",
        "--kind",
        "snp",
        "--evidence",
        &f("trustee-snp-report.bin"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("--kind snp needs --vcek"),
        "{}",
        text(&out)
    );
    let out = edgefleet(&[
        "evidence",
        "verify",
        "--kind",
        "tpm",
        "--evidence",
        &f("intel-sgx-root.pem"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("evidence rejected: Malformed"),
        "{}",
        text(&out)
    );
}

#[test]
fn policy_eval_allows_and_denies_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let verify = edgefleet(&[
        "evidence",
        "verify",
        "--kind",
        "snp",
        "--evidence",
        &f("trustee-snp-report.bin"),
        "--vcek",
        &f("trustee-snp-vcek.der"),
        "--chain",
        &f("trustee-milan_ask_ark_asvk.pem"),
        "--now",
        NOW,
    ]);
    let mut claims: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    claims["key_binding"] = claims["report_data"].clone();
    let bound = dir.path().join("claims.json");
    std::fs::write(&bound, claims.to_string()).unwrap();
    let policy = repo().join("policies/attestation.rego");
    let data = repo().join("policies/reference.json");
    let out = edgefleet(&[
        "policy",
        "eval",
        "--policy",
        policy.to_str().unwrap(),
        "--claims",
        bound.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["allow"], true);
    assert!(d["policy_hash"].as_str().unwrap().starts_with("sha256:"));

    claims["debug"] = serde_json::json!(true);
    std::fs::write(&bound, claims.to_string()).unwrap();
    let out = edgefleet(&[
        "policy",
        "eval",
        "--policy",
        policy.to_str().unwrap(),
        "--claims",
        bound.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["allow"], false);
    assert_eq!(d["deny"], serde_json::json!(["debugging is enabled"]));
}

#[test]
fn tdx_with_intels_collateral_prints_the_tcb_status_and_names_stale_collateral() {
    let collateral = repo().join("trust/tests/data/tdx-collateral");
    let run = |now: &str| {
        edgefleet(&[
            "evidence",
            "verify",
            "--kind",
            "tdx",
            "--evidence",
            &f("gotdx-quote-v5.dat"),
            "--root",
            &f("intel-sgx-root.pem"),
            "--collateral",
            collateral.to_str().unwrap(),
            "--now",
            now,
        ])
    };
    let out = run("2026-02-01T20:00:00Z");
    assert!(out.status.success(), "{}", text(&out));
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["tcb"]["tcb_status"], "UpToDate", "{claims}");
    assert_eq!(claims["tcb"]["fmspc"], "90c06f000000");
    // Four months later the same documents are stale: named, exit 1.
    let out = run(NOW);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("CollateralExpired"), "{}", text(&out));
}
