//! The README's main command works: `edgefleet-dev demo` (what `scripts/demo` runs once
//! everything is installed) reaches 3/3 with a TPM device among them, and its chat
//! answer went through pii-redact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;

#[test]
fn the_demo_rolls_out_to_three_devices_and_chats_through_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(edgefleet_e2e::local_fleet::binary("edgefleet-dev").unwrap())
        .args(["demo", "--dir"])
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("attested 3 of 3"), "{text}");
    let table = text
        .lines()
        .skip_while(|l| !l.starts_with("NAME      SIGNER"))
        .nth(1)
        .unwrap_or_default();
    assert!(
        table.contains("smollm2") && table.contains("3/3") && table.contains("Available"),
        "{text}"
    );
    assert!(
        text.contains("till-1   true       True    True       tpm"),
        "{text}"
    );
    let answer = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("smollm2:"))
        .unwrap();
    assert!(!answer.trim().is_empty(), "{text}");
    assert!(!answer.contains("555-123-4567"), "not redacted: {answer}");
}
