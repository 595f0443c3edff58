//! What the CLI's integration tests share: running the `edgefleet` binary and asserting
//! on its exit code and what it printed.
#![allow(dead_code)] // each test binary uses only some of these

use std::process::{Command, Output};

/// Runs `edgefleet <args…>` to completion.
pub fn edgefleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgefleet"))
        .args(args)
        .output()
        .unwrap()
}

/// Standard output, then standard error.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts that `out` printed each of `needles` (on stdout or stderr).
#[track_caller]
pub fn assert_says(out: &Output, needles: &[&str]) {
    let text = text(out);
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} not in: {text}");
    }
}

/// Asserts that `out` exited with `code` and printed each of `needles`.
#[track_caller]
pub fn assert_exit(out: &Output, code: i32, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(code), "{}", text(out));
    assert_says(out, needles);
}
