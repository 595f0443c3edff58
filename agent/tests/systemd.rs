//! The agent under systemd: `Type=notify` readiness, the watchdog, `STOPPING=1` on
//! SIGTERM (driven through a real notify socket), the packaged unit as
//! `systemd-analyze verify` sees it, and the packaged default configuration.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `serve` with no model under a notify socket; returns the agent and socket.
fn start(dir: &Path, watchdog_usec: Option<&str>) -> (Agent, UnixDatagram) {
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let port = common::free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("NOTIFY_SOCKET", &sock_path)
        .env_remove("EDGEFLEET_MODEL")
        .env_remove("WATCHDOG_PID")
        .env_remove("WATCHDOG_USEC")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(usec) = watchdog_usec {
        cmd.env("WATCHDOG_USEC", usec);
    }
    (Agent(cmd.spawn().unwrap()), sock)
}

/// Datagrams received within `window`.
fn receive(sock: &UnixDatagram, window: Duration) -> Vec<String> {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < window {
        if let Ok(n) = sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    out
}

#[test]
fn notifies_ready_pings_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, sock) = start(dir.path(), Some("200000"));
    let got = receive(&sock, Duration::from_secs(3));
    let ready = got
        .iter()
        .find(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {got:?}"));
    assert!(
        ready.contains("STATUS=serving no model on 127.0.0.1:"),
        "{ready}"
    );
    let pings = got.iter().filter(|m| m.trim() == "WATCHDOG=1").count();
    // 200 ms watchdog, pinged every 100 ms: well over 5 pings in 3 s.
    assert!(pings >= 5, "{pings} pings in {got:?}");

    let status = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let got = receive(&sock, Duration::from_secs(2));
    assert!(
        got.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "{got:?}"
    );
    let mut agent = agent;
    let started = Instant::now();
    let exit = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn without_a_watchdog_there_are_no_pings() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, sock) = start(dir.path(), None);
    let got = receive(&sock, Duration::from_secs(2));
    assert!(got.iter().any(|m| m.contains("READY=1")), "{got:?}");
    assert!(!got.iter().any(|m| m.contains("WATCHDOG=1")), "{got:?}");
}

fn packaging() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

/// `systemd-analyze verify` on the unit (pointing at the built agent); its complaints.
fn verify(unit_text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("edgefleet-agent.service");
    std::fs::write(
        &unit,
        unit_text.replace(
            "/usr/bin/edgefleet-agent",
            env!("CARGO_BIN_EXE_edgefleet-agent"),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_packaged_unit_verifies_cleanly() {
    if !Path::new("/usr/bin/systemd-analyze").exists() {
        eprintln!("systemd-analyze is not installed; skipping the unit check");
        return;
    }
    let text = std::fs::read_to_string(packaging().join("edgefleet-agent.service")).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/tpmrm0 rw",
        "StateDirectory=edgefleet",
    ] {
        assert!(text.contains(needed), "the unit lacks {needed}");
    }
    assert_eq!(verify(&text), "", "systemd-analyze complained");
    // The check can fail: a misspelt directive is reported.
    let broken = text.replace("Restart=on-failure", "Restart=on-failure\nRestartt=always");
    assert!(verify(&broken).contains("Unknown key 'Restartt'"));
}

#[test]
fn the_packaged_configuration_is_valid_once_the_device_is_named() {
    let check = |env: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
            .args(["check-config", "--config-dir"])
            .arg(packaging())
            .envs(env.iter().copied())
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    // As shipped, the per-device settings are missing, and the error says which.
    let out = check(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("device.name must be set"), "{err}");
    // The per-device layer (here the environment) completes it.
    let out = check(&[
        ("EDGEFLEET__DEVICE__NAME", "store-042-till-1"),
        (
            "EDGEFLEET__GATEWAY__URL",
            "https://gateway.edgefleet.example:8443",
        ),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/var/lib/edgefleet"), "{text}");
    assert!(text.contains("device:/dev/tpmrm0"), "{text}");
}
