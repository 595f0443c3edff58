//! `edgefleet-dev fleet-bench`: one fleet SLI run. A fresh local control plane and one
//! operator replica (the binaries found by [`crate::local_fleet::binary`], so
//! `EDGEFLEET_BIN_DIR` picks release builds), then `edgefleet-sim` with one scenario,
//! while the operator's CPU time, peak RSS and file descriptors, and the API server's
//! write requests, are sampled. Prints one JSON object: the simulator's summary plus
//! those costs.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::ControlPlane;
use crate::builders::{EdgeModelBuilder, Signer};
use crate::local_fleet::{self, Proc};

/// The operator's resource use, from `/proc/<pid>`.
#[derive(Debug, Clone, Copy, Default)]
struct ProcStat {
    cpu_seconds: f64,
    rss_kib: u64,
    hwm_kib: u64,
    fds: u64,
}

fn proc_stat(pid: u32) -> ProcStat {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the name.
    let cpu_seconds = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    ProcStat {
        cpu_seconds,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        fds,
    }
}

/// A counter of the operator's `/metrics` (its address read from the process's
/// `--metrics-addr` argument), or `None` when it cannot be read.
fn operator_counter(pid: u32, name: &str) -> Option<f64> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let addr = args
        .iter()
        .position(|a| a == "--metrics-addr")
        .and_then(|i| args.get(i + 1))?;
    let out = Command::new("curl")
        .args(["-s", &format!("http://{addr}/metrics")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// Write requests (POST, PUT, PATCH, server-side APPLY, DELETE) the API server has answered.
fn api_writes(mut kubectl: Command) -> anyhow::Result<f64> {
    let out = kubectl.args(["get", "--raw", "/metrics"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            [
                "\"POST\"",
                "\"PUT\"",
                "\"PATCH\"",
                "\"APPLY\"",
                "\"DELETE\"",
            ]
            .iter()
            .any(|v| l.contains(&format!("verb={v}")))
        })
        .filter(|l| !l.contains("apiextensions.k8s.io"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum())
}

/// One run: `devices` simulated devices, `scenario`, heartbeats every `heartbeat` s,
/// the operator's heartbeat lease `lease` s.
pub async fn fleet_bench(
    dir: &Path,
    devices: usize,
    scenario: &str,
    heartbeat: u64,
    duration: u64,
    lease: u64,
) -> anyhow::Result<serde_json::Value> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let cp = ControlPlane::start_in(&dir.join("control-plane")).await?;
    cp.install_crds().await?;
    let pki = local_fleet::GatewayPki::write(dir, &[])?;
    let port = crate::free_port()?;
    let operator = Proc(local_fleet::spawn_operator(
        cp.kubeconfig_path(),
        &pki,
        &local_fleet::OperatorSpec {
            gateway_addr: format!("127.0.0.1:{port}"),
            artifact_dir: dir.join("artifacts"),
            approval: "auto:edgefleet.io/pool=sim".into(),
            ek_cas: vec![],
            ek_intermediates: vec![],
            heartbeat_lease_seconds: lease,
            artifact_ca: None,
            log: dir.join("operator.log"),
        },
    )?);
    let pid = operator.0.id();
    let started = Instant::now();
    loop {
        let ok = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("https://127.0.0.1:{port}/healthz"))
            .output()
            .is_ok_and(|o| o.stdout == b"200");
        if ok {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the gateway did not come up; see {}",
                dir.join("operator.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let manifest = sim_manifest(dir)?;
    trust_sim(&cp.client().await?, &manifest).await?;
    // The simulated devices enrol with the pool's token, which labels them.
    let token = local_fleet::create_pool_token(&cp.client().await?, "sim").await?;
    std::fs::write(dir.join("sim-token"), token)?;
    let before = proc_stat(pid);
    let writes_before = api_writes(cp.kubectl())?;
    let t0 = Instant::now();
    let mut sim = Command::new(local_fleet::binary("edgefleet-sim")?);
    sim.args(["--gateway", &format!("https://127.0.0.1:{port}")])
        .arg("--gateway-ca")
        .arg(dir.join("gw-ca.crt"))
        .arg("--token-file")
        .arg(dir.join("sim-token"))
        .args(["--devices", &devices.to_string()])
        .args(["--heartbeat-seconds", &heartbeat.to_string()])
        .args(["--scenario", scenario, "--duration", &duration.to_string()])
        .args(["--timeout", "1800"])
        .arg("--apply")
        .arg(&manifest)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = sim.spawn().context("starting edgefleet-sim")?;
    // When every device is connected the scenario starts: snapshot the costs then.
    let at_connected = {
        let stderr = child.stderr.take().context("simulator stderr")?;
        let kubectl = cp.kubectl();
        let (program, env) = (
            kubectl.get_program().to_owned(),
            kubectl
                .get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
                .collect::<Vec<_>>(),
        );
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let (mut snapshot, mut settled_fds) = (None, None);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("{line}");
                if line.starts_with("CONNECTED") && snapshot.is_none() {
                    let mut k = Command::new(&program);
                    k.envs(env.iter().map(|(a, b)| (a, b)));
                    snapshot = Some((Instant::now(), proc_stat(pid), api_writes(k).unwrap_or(0.0)));
                }
                // The outage scenario, a while after every device came back: what the
                // gateway still holds of the old connections.
                if line.starts_with("SETTLED") {
                    settled_fds = Some(proc_stat(pid).fds);
                }
            }
            (snapshot, settled_fds)
        })
    };
    // Sample the operator while the simulator runs.
    let mut peak = before;
    let sampler = {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut peak_fds, mut last_fds) = (0, 0);
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                last_fds = proc_stat(pid).fds;
                peak_fds = peak_fds.max(last_fds);
                std::thread::sleep(Duration::from_millis(500));
            }
            (peak_fds, last_fds)
        });
        (stop, handle)
    };
    let out = child.wait_with_output()?;
    let (connected, settled_fds) = at_connected.join().unwrap_or((None, None));
    sampler.0.store(true, std::sync::atomic::Ordering::Relaxed);
    // The peak is during the connection burst (enrolment connections beside the device
    // connections); the last sample is the steady state, one connection per device.
    let (peak_fds, last_fds) = sampler.1.join().unwrap_or((0, 0));
    let elapsed = t0.elapsed().as_secs_f64();
    let after = proc_stat(pid);
    peak.fds = peak_fds;
    let total_writes = api_writes(cp.kubectl())?;
    let writes = total_writes - writes_before;
    if !out.status.success() {
        bail!(
            "edgefleet-sim failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let mut summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    summary["heartbeat_seconds"] = serde_json::json!(heartbeat);
    summary["heartbeat_lease_seconds"] = serde_json::json!(lease);
    summary["operator"] = serde_json::json!({
        "cpu_seconds": after.cpu_seconds - before.cpu_seconds,
        "cpu_cores_mean": (after.cpu_seconds - before.cpu_seconds) / elapsed,
        "rss_mib": after.rss_kib as f64 / 1024.0,
        "peak_rss_mib": after.hwm_kib as f64 / 1024.0,
        "peak_fds": peak.fds,
        "fds": last_fds,
        "fds_settled": settled_fds,
    });
    // Connections the gateway closed because their device opened a newer one.
    summary["superseded_connections"] = serde_json::json!(operator_counter(
        pid,
        "edgefleet_operator_gateway_connections_superseded_total "
    ));
    summary["api_writes"] = serde_json::json!(writes);
    summary["api_writes_per_second"] = serde_json::json!(writes / elapsed);
    // The scenario phase alone (after every device connected).
    if let Some((t, stat, w)) = connected {
        let secs = t.elapsed().as_secs_f64();
        summary["scenario_api_writes_per_second"] = serde_json::json!((total_writes - w) / secs);
        summary["scenario_operator_cpu_cores"] =
            serde_json::json!((after.cpu_seconds - stat.cpu_seconds) / secs);
    }
    summary["wall_seconds"] = serde_json::json!(elapsed);
    drop(operator);
    Ok(summary)
}

/// What the cluster's administrator trusts for the simulated fleet: every device in a
/// pool bound to every namespace, and the signer of the model at `manifest` (written by
/// [`sim_manifest`]) for its namespace.
pub async fn trust_sim(client: &kube::Client, manifest: &Path) -> anyhow::Result<()> {
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest)?)?;
    crate::builders::allow_all_pools(client).await?;
    crate::builders::trust_signers_of(client, &manifest).await?;
    Ok(())
}

/// A signed stand-in artifact and an EdgeModel rolling it out to every simulated device
/// at once (the download is simulated; the signature is real and checked).
pub fn sim_manifest(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let file = dir.join("weights.gguf");
    std::fs::write(&file, b"GGUF simulated weights")?;
    let key = dir.join("signing-key.pem");
    local_fleet::generate_signing_key(&key)?;
    let signer = Signer::from_pem(&std::fs::read_to_string(&key)?)?;
    let manifest = EdgeModelBuilder::new("sim", "sim-model")
        .signed(
            "https://artifacts.example/weights.gguf",
            &signer.artifact(&file)?,
            "sim",
            &signer,
        )
        .pool("sim")
        .attestation(&["dev"], Some("dev"))
        .rollout(serde_json::json!({"maxUnavailable": "100%"}))
        .build();
    let path = dir.join("model.json");
    std::fs::write(&path, manifest.to_string())?;
    Ok(path)
}
