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
    replicas: usize,
) -> anyhow::Result<serde_json::Value> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let replicas = replicas.max(1);
    let cp = ControlPlane::start_in(&dir.join("control-plane")).await?;
    cp.install_crds().await?;
    let pki = local_fleet::GatewayPki::write(dir, &[])?;
    // The scenarios the harness plays a part in: `restart` (the harness restarts the
    // gateways) and its baseline `restart-naive` (devices re-attest on any error).
    let (sim_scenario, sim_extra): (&str, &[&str]) = match scenario {
        "restart-naive" => ("restart", &["--reattest-on-error"]),
        s => (s, &[]),
    };
    // Every replica serves devices; op-1 starts first and leads.
    let mut operators = Vec::new();
    let mut gateways = Vec::new();
    let mut specs = Vec::new();
    for k in 1..=replicas {
        let port = crate::free_port()?;
        let spec = local_fleet::OperatorSpec {
            gateway_addr: format!("127.0.0.1:{port}"),
            artifact_dir: dir.join("artifacts"),
            approval: "auto:edgefleet.io/pool=sim".into(),
            ek_cas: vec![],
            ek_intermediates: vec![],
            heartbeat_lease_seconds: lease,
            artifact_ca: None,
            log: dir.join(if k == 1 {
                "operator.log".to_owned()
            } else {
                format!("operator-{k}.log")
            }),
        };
        operators.push(start_replica(cp.kubeconfig_path(), &pki, &spec, k)?);
        gateways.push(format!("https://127.0.0.1:{port}"));
        specs.push(spec);
    }
    let mut pids: Vec<u32> = operators.iter().map(|o| o.0.id()).collect();
    let live_pids = std::sync::Arc::new(std::sync::Mutex::new(pids.clone()));
    let stat = |pids: &[u32]| {
        pids.iter()
            .map(|p| proc_stat(*p))
            .fold(ProcStat::default(), |a, b| ProcStat {
                cpu_seconds: a.cpu_seconds + b.cpu_seconds,
                rss_kib: a.rss_kib + b.rss_kib,
                hwm_kib: a.hwm_kib + b.hwm_kib,
                fds: a.fds + b.fds,
            })
    };
    let manifest = sim_manifest(dir)?;
    let start_file = dir.join("start");
    trust_sim(&cp.client().await?, &manifest).await?;
    // The simulated devices enrol with the pool's token, which labels them.
    let token = local_fleet::create_pool_token(&cp.client().await?, "sim").await?;
    std::fs::write(dir.join("sim-token"), token)?;
    // One simulator process per MAX_SIM_DEVICES devices (or `FLEET_SIM_PER_PROCESS`):
    // each holds a connection per device, under one process's descriptor limit.
    let per_process = std::env::var("FLEET_SIM_PER_PROCESS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|v| *v > 0)
        .unwrap_or(MAX_SIM_DEVICES);
    let processes = devices.div_ceil(per_process).max(1);
    if sim_scenario == "slowloris" && processes > 1 {
        bail!(
            "slowloris runs one simulator process (each would flood on its own); give at most {per_process} devices"
        );
    }
    let mut before = stat(&pids);
    let writes_before = api_writes(cp.kubectl())?;
    let t0 = Instant::now();
    let mut children = Vec::new();
    for k in 0..processes {
        let share = devices / processes + usize::from(k < devices % processes);
        let mut sim = Command::new(local_fleet::binary("edgefleet-sim")?);
        for g in &gateways {
            sim.args(["--gateway", g]);
        }
        let prefix = if processes == 1 {
            "sim".to_owned()
        } else {
            format!("sim{k}")
        };
        sim.arg("--gateway-ca")
            .arg(dir.join("gw-ca.crt"))
            .arg("--token-file")
            .arg(dir.join("sim-token"))
            .args(["--prefix", &prefix])
            .args(["--devices", &share.to_string()])
            .args(["--fleet-devices", &devices.to_string()])
            .args(["--heartbeat-seconds", &heartbeat.to_string()])
            .args([
                "--scenario",
                sim_scenario,
                "--duration",
                &duration.to_string(),
            ])
            .args(sim_extra)
            .args(["--timeout", "3600"])
            .arg("--start-file")
            .arg(&start_file)
            .arg("--apply")
            .arg(&manifest)
            .env("KUBECONFIG", cp.kubeconfig_path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        children.push(sim.spawn().context("starting edgefleet-sim")?);
    }
    // When every process has connected all its devices the scenario starts (they wait
    // for the start file): snapshot the costs then.
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let settled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let snapshot: std::sync::Arc<std::sync::Mutex<Option<(Instant, ProcStat, f64)>>> =
        std::sync::Arc::default();
    let settled_fds: std::sync::Arc<std::sync::Mutex<Option<u64>>> = std::sync::Arc::default();
    let mut readers = Vec::new();
    for child in &mut children {
        let stderr = child.stderr.take().context("simulator stderr")?;
        let kubectl = cp.kubectl();
        let (program, env) = (
            kubectl.get_program().to_owned(),
            kubectl
                .get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
                .collect::<Vec<_>>(),
        );
        let (connected, settled, snapshot, settled_fds, start_file, pids) = (
            connected.clone(),
            settled.clone(),
            snapshot.clone(),
            settled_fds.clone(),
            start_file.clone(),
            pids.clone(),
        );
        readers.push(std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("{line}");
                if line.starts_with("CONNECTED")
                    && connected.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == processes
                {
                    let mut k = Command::new(&program);
                    k.envs(env.iter().map(|(a, b)| (a, b)));
                    let all =
                        pids.iter()
                            .map(|p| proc_stat(*p))
                            .fold(ProcStat::default(), |a, b| ProcStat {
                                cpu_seconds: a.cpu_seconds + b.cpu_seconds,
                                ..a
                            });
                    if let Ok(mut s) = snapshot.lock() {
                        *s = Some((Instant::now(), all, api_writes(k).unwrap_or(0.0)));
                    }
                    let _ = std::fs::write(&start_file, b"go");
                }
                // The outage scenario, a while after every device came back: what the
                // gateways still hold of the old connections.
                if line.starts_with("SETTLED")
                    && settled.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == processes
                    && let Ok(mut f) = settled_fds.lock()
                {
                    *f = Some(pids.iter().map(|p| proc_stat(*p).fds).sum());
                }
            }
        }));
    }
    // Sample the operators while the simulators run.
    let sampler = {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, pids) = (stop.clone(), live_pids.clone());
        let handle = std::thread::spawn(move || {
            let (mut peak_fds, mut last_fds, mut peak_rss_kib) = (0, 0, 0);
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let now: Vec<ProcStat> = pids
                    .lock()
                    .map(|p| p.iter().map(|p| proc_stat(*p)).collect())
                    .unwrap_or_default();
                last_fds = now.iter().map(|s| s.fds).sum();
                peak_rss_kib = peak_rss_kib.max(now.iter().map(|s| s.rss_kib).sum());
                peak_fds = peak_fds.max(last_fds);
                std::thread::sleep(Duration::from_millis(500));
            }
            (peak_fds, last_fds, peak_rss_kib)
        });
        (stop, handle)
    };
    // The restart scenario: once the scenario starts, every gateway is killed and started
    // again on its address, and the simulators are told when all answer.
    let mut restarted_at = None;
    if sim_scenario == "restart" {
        let deadline = Instant::now() + Duration::from_secs(3600);
        while !start_file.exists() {
            if Instant::now() > deadline
                || children
                    .iter_mut()
                    .any(|c| matches!(c.try_wait(), Ok(Some(_))))
            {
                bail!("the simulators never all connected; see {}", dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let t = Instant::now();
        // What the old processes used, counted before they go.
        let old = stat(&pids);
        before.cpu_seconds -= old.cpu_seconds;
        // SIGKILL, as a crash or an evicted pod: nothing is closed gracefully.
        operators.clear();
        pids.clear();
        for (k, spec) in specs.iter().enumerate() {
            let spec = local_fleet::OperatorSpec {
                log: spec.log.with_extension("restarted.log"),
                ..spec.clone()
            };
            operators.push(start_replica(cp.kubeconfig_path(), &pki, &spec, k + 1)?);
            pids.extend(operators.last().map(|o| o.0.id()));
            if let Ok(mut p) = live_pids.lock() {
                p.clone_from(&pids);
            }
        }
        std::fs::write(start_file.with_extension("restarted"), b"up")?;
        restarted_at = Some(t.elapsed().as_secs_f64());
    }
    let mut outputs = Vec::new();
    for child in children {
        outputs.push(child.wait_with_output()?);
    }
    for r in readers {
        let _ = r.join();
    }
    sampler.0.store(true, std::sync::atomic::Ordering::Relaxed);
    // The peak is during the connection burst (enrolment connections beside the device
    // connections); the last sample is the steady state, one connection per device.
    let (peak_fds, last_fds, peak_rss_kib) = sampler.1.join().unwrap_or((0, 0, 0));
    let elapsed = t0.elapsed().as_secs_f64();
    let after = stat(&pids);
    let total_writes = api_writes(cp.kubectl())?;
    let writes = total_writes - writes_before;
    let mut summaries = Vec::new();
    for out in &outputs {
        if !out.status.success() {
            bail!(
                "edgefleet-sim failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        summaries.push(serde_json::from_slice::<serde_json::Value>(&out.stdout)?);
    }
    let mut summary = merge_summaries(&summaries);
    summary["replicas"] = serde_json::json!(replicas);
    summary["sim_processes"] = serde_json::json!(processes);
    summary["heartbeat_seconds"] = serde_json::json!(heartbeat);
    summary["heartbeat_lease_seconds"] = serde_json::json!(lease);
    summary["operator"] = serde_json::json!({
        "cpu_seconds": after.cpu_seconds - before.cpu_seconds,
        "cpu_cores_mean": (after.cpu_seconds - before.cpu_seconds) / elapsed,
        "rss_mib": after.rss_kib as f64 / 1024.0,
        "peak_rss_mib": after.hwm_kib as f64 / 1024.0,
        "peak_fds": peak_fds,
        "peak_rss_sampled_mib": peak_rss_kib as f64 / 1024.0,
        "fds": last_fds,
        "fds_settled": settled_fds.lock().ok().and_then(|f| *f),
    });
    summary["operator_rss_mib"] = serde_json::json!(after.rss_kib as f64 / 1024.0);
    // Connections the gateways closed because their device opened a newer one.
    summary["superseded_connections"] = serde_json::json!(
        pids.iter()
            .filter_map(|p| local_fleet::operator_counter(
                *p,
                "edgefleet_operator_gateway_connections_superseded_total "
            ))
            .sum::<f64>()
    );
    summary["unidentified_evicted"] = serde_json::json!(
        pids.iter()
            .filter_map(|p| local_fleet::operator_counter(
                *p,
                "edgefleet_operator_gateway_unidentified_evicted_total "
            ))
            .sum::<f64>()
    );
    summary["scenario"] = serde_json::json!(scenario);
    summary["gateways_restarted_seconds"] = serde_json::json!(restarted_at);
    summary["api_writes"] = serde_json::json!(writes);
    summary["api_writes_per_second"] = serde_json::json!(writes / elapsed);
    // The scenario phase alone (after every device connected).
    let snap = snapshot.lock().ok().and_then(|s| *s);
    if let Some((t, stat, w)) = snap {
        let secs = t.elapsed().as_secs_f64();
        summary["scenario_api_writes"] = serde_json::json!(total_writes - w);
        summary["scenario_seconds"] = serde_json::json!(secs);
        summary["scenario_api_writes_per_second"] = serde_json::json!((total_writes - w) / secs);
        // (After a restart the old processes' CPU is gone.)
        if restarted_at.is_none() {
            summary["scenario_operator_cpu_cores"] =
                serde_json::json!((after.cpu_seconds - stat.cpu_seconds) / secs);
        }
    }
    // Devices on the new revision at the end (the rollout scenario).
    if scenario == "rollout" {
        let models: kube::Api<edgefleet_crds::EdgeModel> =
            kube::Api::namespaced(cp.client().await?, "sim");
        let ready = models
            .list(&Default::default())
            .await?
            .items
            .first()
            .and_then(|m| m.status.as_ref())
            .map(|s| s.devices.ready);
        summary["ready"] = serde_json::json!(ready);
    }
    summary["heartbeat_p99_ms"] = summary["heartbeat_rtt_ms"]["p99"].clone();
    // What the fleet's EdgeDevices weigh in etcd, per device (JSON, as the API server
    // lists them; etcd stores protobuf-free JSON for custom resources).
    let listed = cp
        .kubectl()
        .args(["get", "--raw", "/apis/edgefleet.io/v1alpha1/edgedevices"])
        .output()?;
    if listed.status.success() && devices > 0 {
        summary["edgedevice_json_bytes"] =
            serde_json::json!(listed.stdout.len() as f64 / devices as f64);
    }
    summary["wall_seconds"] = serde_json::json!(elapsed);
    drop(operators);
    Ok(summary)
}

/// Starts operator replica `k` (`op-k`) as `spec` says and waits until its gateway
/// answers.
fn start_replica(
    kubeconfig: &Path,
    pki: &local_fleet::GatewayPki,
    spec: &local_fleet::OperatorSpec,
    k: usize,
) -> anyhow::Result<Proc> {
    let identity = format!("op-{k}");
    let operator = Proc(local_fleet::spawn_operator_with(
        kubeconfig,
        pki,
        spec,
        &[&format!("--identity={identity}")],
    )?);
    let started = Instant::now();
    loop {
        let ok = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("https://{}/healthz", spec.gateway_addr))
            .output()
            .is_ok_and(|o| o.stdout == b"200");
        if ok {
            return Ok(operator);
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the gateway of {identity} did not come up; see {}",
                spec.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Devices one simulator process holds at most (a connection each, under the 20,000
/// descriptors one process may have here).
pub const MAX_SIM_DEVICES: usize = 15_000;

/// One summary of several simulator processes' (each an `edgefleet-sim` summary):
/// counts add up, times are the slowest process's, and of each latency distribution
/// the count adds up, p50 is the middle process's and p99 and max the largest (an upper
/// bound of the fleet's).
pub fn merge_summaries(parts: &[serde_json::Value]) -> serde_json::Value {
    let Some(first) = parts.first() else {
        return serde_json::json!({});
    };
    if parts.len() == 1 {
        return first.clone();
    }
    let mut out = first.clone();
    let sum = |key: &str| parts.iter().filter_map(|p| p[key].as_f64()).sum::<f64>();
    let max = |key: &str| {
        parts
            .iter()
            .filter_map(|p| p[key].as_f64())
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
    };
    for key in [
        "devices",
        "attested",
        "reattested",
        "reports",
        "churn_started",
    ] {
        if out.get(key).is_some() {
            out[key] = serde_json::json!(sum(key));
        }
    }
    for key in [
        "connect_seconds",
        "rollout_seconds",
        "all_devices_saw_change_seconds",
        "storm_recovery_seconds",
        "restart_recovery_seconds",
        "gateway_down_seconds",
        "churn_rounds",
        "settle_seconds",
    ] {
        if let Some(v) = max(key) {
            out[key] = serde_json::json!(v);
        }
    }
    for key in ["heartbeat_rtt_ms", "cloud_to_edge_ms", "churn_join_ms"] {
        let dists: Vec<&serde_json::Value> = parts
            .iter()
            .map(|p| &p[key])
            .filter(|d| d.is_object())
            .collect();
        if dists.is_empty() {
            continue;
        }
        let field = |f: &str| -> Vec<f64> { dists.iter().filter_map(|d| d[f].as_f64()).collect() };
        let mut p50 = field("p50");
        p50.sort_by(f64::total_cmp);
        out[key] = serde_json::json!({
            "count": field("count").iter().sum::<f64>(),
            "p50": p50.get(p50.len() / 2),
            "p99": field("p99").into_iter().fold(f64::NAN, f64::max),
            "max": field("max").into_iter().fold(f64::NAN, f64::max),
        });
    }
    let mut failures = serde_json::Map::new();
    let mut retries = serde_json::Map::new();
    for p in parts {
        for (map, key) in [
            (&mut failures, "failures"),
            (&mut retries, "connect_retries"),
        ] {
            for (k, v) in p[key].as_object().into_iter().flatten() {
                let n = map
                    .get(k)
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0)
                    + v.as_f64().unwrap_or(0.0);
                map.insert(k.clone(), serde_json::json!(n));
            }
        }
    }
    out["failures"] = serde_json::Value::Object(failures);
    out["connect_retries"] = serde_json::Value::Object(retries);
    out
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn several_processes_summaries_merge_into_the_fleets() {
        let a = serde_json::json!({"devices": 3, "scenario": "rollout", "rollout_seconds": 4.0,
            "heartbeat_rtt_ms": {"count": 10, "p50": 2.0, "p99": 9.0, "max": 12.0},
            "failures": {"x": 1}, "connect_retries": {}});
        let b = serde_json::json!({"devices": 2, "scenario": "rollout", "rollout_seconds": 6.5,
            "heartbeat_rtt_ms": {"count": 5, "p50": 3.0, "p99": 7.0, "max": 20.0},
            "failures": {"x": 2, "y": 1}, "connect_retries": {}});
        let m = merge_summaries(&[a.clone(), b]);
        assert_eq!(m["devices"], 5.0);
        assert_eq!(m["rollout_seconds"], 6.5);
        assert_eq!(m["heartbeat_rtt_ms"]["count"], 15.0);
        assert_eq!(m["heartbeat_rtt_ms"]["p99"], 9.0);
        assert_eq!(m["heartbeat_rtt_ms"]["max"], 20.0);
        assert_eq!(m["failures"]["x"], 3.0);
        assert_eq!(m["failures"]["y"], 1.0);
        // One process: its summary as it is.
        assert_eq!(merge_summaries(std::slice::from_ref(&a)), a);
    }
}
