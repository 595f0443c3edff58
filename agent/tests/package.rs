//! The Debian package: built with dpkg-deb from the agent binary, installed by dpkg into
//! a scratch root, where the files, modes and conffiles are where systemd and the
//! configuration loader expect them, and the packaged configuration is valid once the
//! device is named.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_package_installs_into_a_scratch_root() {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/build-deb.sh");
    let deb = run(Command::new(&script)
        .arg(env!("CARGO_BIN_EXE_edgefleet-agent"))
        .arg(dir.path().join("out"))
        .env("DEB_COMPRESS", "none"));
    let deb = deb.trim();
    let info = run(Command::new("dpkg-deb").args(["--info", deb]));
    assert!(info.contains("Package: edgefleet-agent"), "{info}");
    assert!(
        info.contains("Depends:") && info.contains("libtss2"),
        "{info}"
    );

    // A scratch root with an empty dpkg database.
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates")).unwrap();
    std::fs::create_dir_all(root.join("var/lib/dpkg/info")).unwrap();
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-depends",
            "--force-script-chrootless",
            "--force-not-root",
            "--log=/dev/null",
            "-i",
            deb,
        ])
        .env("DPKG_ROOT", &root));
    let status = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-s", "edgefleet-agent"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(
        status.contains("/etc/edgefleet/agent.toml") && status.contains("/etc/edgefleet/agent.env"),
        "configuration files must be conffiles: {status}"
    );
    let bin = root.join("usr/bin/edgefleet-agent");
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let env = root.join("etc/edgefleet/agent.env");
    assert_eq!(
        std::fs::metadata(&env).unwrap().permissions().mode() & 0o077,
        0,
        "agent.env is private to the agent"
    );
    // The bootstrap token never sits in the environment: not in agent.env, nor in the
    // unit; agent.toml names its file in the state directory, deleted after enrolment.
    let env_text = std::fs::read_to_string(&env).unwrap();
    assert!(
        !env_text
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("TOKEN")),
        "{env_text}"
    );
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/edgefleet-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/edgefleet-agent run --config-dir /etc/edgefleet"));
    assert!(
        !unit
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("TOKEN")),
        "{unit}"
    );
    let toml = std::fs::read_to_string(root.join("etc/edgefleet/agent.toml")).unwrap();
    assert!(
        toml.contains("bootstrap_token_file = \"/var/lib/edgefleet/bootstrap-token\"")
            && toml.contains("delete_token_after_enrol = true"),
        "{toml}"
    );

    // The installed binary reads the installed configuration.
    let check = |name: Option<&str>| {
        let mut c = Command::new(&bin);
        c.args(["check-config", "--config-dir"])
            .arg(root.join("etc/edgefleet"));
        if let Some(n) = name {
            c.env("EDGEFLEET__DEVICE__NAME", n)
                .env("EDGEFLEET__GATEWAY__URL", "https://gateway.example:8443");
        }
        c.output().unwrap()
    };
    let unnamed = check(None);
    assert!(!unnamed.status.success());
    assert!(String::from_utf8_lossy(&unnamed.stderr).contains("device.name must be set"));
    let named = check(Some("till-1"));
    assert!(
        named.status.success(),
        "{}",
        String::from_utf8_lossy(&named.stderr)
    );
}
