//! The simulator's command line: it says what it fakes, and refuses bad arguments by
//! name before touching the network.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgefleet-sim"))
}

#[test]
fn help_says_what_is_simulated() {
    let out = sim().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("download and inference faked"), "{text}");
}

#[test]
fn bad_arguments_are_refused_by_name() {
    let out = sim()
        .args([
            "--gateway",
            "https://127.0.0.1:1",
            "--gateway-ca",
            "/nonexistent",
        ])
        .args(["--token-file", "/nonexistent", "--label", "pool"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected KEY=VALUE"));
    let out = sim()
        .args([
            "--gateway",
            "https://127.0.0.1:1",
            "--gateway-ca",
            "/nonexistent",
        ])
        .args(["--token-file", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));
}
