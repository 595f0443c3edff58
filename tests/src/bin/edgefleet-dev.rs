//! `edgefleet-dev up`: the embedded local control plane for development and the demo.
//!
//! Starts etcd and the API server on loopback, installs the edgefleet CRDs, applies the
//! given manifests with `kubectl apply --server-side`, prints `kubectl get em,ed`, and
//! either exits (tearing everything down) or, with `--hold`, keeps running until Ctrl-C
//! so that `KUBECONFIG=<printed path> kubectl …` works from another shell.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use edgefleet_e2e::{ControlPlane, cache_dir};

#[derive(Parser, Debug)]
#[command(version, about = "edgefleet local control plane")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start the control plane, install CRDs, apply manifests and show them.
    Up {
        /// Manifests (files or directories of *.yaml) to apply after the CRDs.
        #[arg(long = "apply", env = "EDGEFLEET_DEV_APPLY")]
        apply: Vec<PathBuf>,
        /// State directory (wiped on start).
        #[arg(long, env = "EDGEFLEET_DEV_DIR")]
        dir: Option<PathBuf>,
        /// Keep running until interrupted.
        #[arg(long)]
        hold: bool,
    },
    /// The whole story: control plane, operator and gateway, three device agents (one
    /// on a software TPM), a signed model rolled out to 3/3, and a chat through a device.
    /// One fleet SLI run (see bench/fleet.sh): a fresh control plane and operator, and
    /// edgefleet-sim with one scenario; prints the simulator's summary and the costs.
    FleetBench {
        /// Working directory (wiped on start).
        #[arg(long)]
        dir: PathBuf,
        /// Simulated devices.
        #[arg(long)]
        devices: usize,
        /// steady, rollout, storm, outage, churn, restart, restart-naive (the restart's
        /// baseline: devices re-attest after any error) or slowloris (its flood's size
        /// from `EDGEFLEET_SIM_SLOW_HEADERS` and `EDGEFLEET_SIM_JUNK_TLS`, by default
        /// 5,000 and 1,000).
        #[arg(long, default_value = "rollout")]
        scenario: String,
        /// Heartbeat interval of the devices, seconds.
        #[arg(long, default_value_t = 10)]
        heartbeat_seconds: u64,
        /// Seconds of the steady and churn scenarios.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// The operator's heartbeat lease, seconds (status writes per device are bounded
        /// by three per lease).
        #[arg(long, default_value_t = 60)]
        lease_seconds: u64,
        /// Operator replicas (each serves devices; one leads). Default: enough to keep
        /// each under about 18,000 devices, one process's limit here.
        #[arg(long)]
        replicas: Option<usize>,
    },
    Demo {
        /// Working directory (wiped on start).
        #[arg(long, env = "EDGEFLEET_DEV_DIR")]
        dir: Option<PathBuf>,
        /// Keep everything running after the chat, until Ctrl-C.
        #[arg(long)]
        hold: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_client::client::builder=off".into()),
        )
        // Colours only on a terminal: plain text in journald and in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let (apply, dir, hold) = match Cli::parse().command {
        Cmd::Up { apply, dir, hold } => (apply, dir, hold),
        Cmd::FleetBench {
            dir,
            devices,
            scenario,
            heartbeat_seconds,
            duration,
            lease_seconds,
            replicas,
        } => {
            let summary = edgefleet_e2e::bench::fleet_bench(
                &dir,
                devices,
                &scenario,
                heartbeat_seconds,
                duration,
                lease_seconds,
                replicas.unwrap_or_else(|| devices.div_ceil(18_000).max(1)),
            )
            .await?;
            println!("{}", serde_json::to_string(&summary)?);
            return Ok(());
        }
        Cmd::Demo { dir, hold } => {
            let dir = dir.unwrap_or_else(|| cache_dir().join("demo"));
            return edgefleet_e2e::demo::demo(&dir, hold).await;
        }
    };
    let dir = dir.unwrap_or_else(|| cache_dir().join("dev"));
    let cp = ControlPlane::start_in(&dir)
        .await
        .context("starting the local control plane")?;
    println!("API server  {}", cp.server_url());
    println!("kubeconfig  {}", cp.kubeconfig_path().display());
    let crds = cp.install_crds().await.context("installing CRDs")?;
    println!("CRDs        {}", crds.join(", "));

    for path in &apply {
        run(cp
            .kubectl()
            .args([
                "apply",
                "--server-side",
                "--field-manager=edgefleet-dev",
                "-f",
            ])
            .arg(path))?;
    }
    run(cp
        .kubectl()
        .args(["get", "edgemodels,edgedevices", "--all-namespaces"]))?;

    if hold {
        println!(
            "\nControl plane running. In another shell:\n  export KUBECONFIG={}\n  kubectl get em,ed -A\nCtrl-C stops it.",
            cp.kubeconfig_path().display()
        );
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
    }
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
