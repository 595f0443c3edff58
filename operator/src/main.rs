//! edgefleet-operator: `run` reconciles EdgeModels onto EdgeDevices against the cluster
//! (KUBECONFIG or in-cluster configuration); `crd` prints the CRDs it serves.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about = "edgefleet operator")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the CustomResourceDefinitions of the edgefleet.io API as YAML.
    Crd,
    /// Run the EdgeModel controller until SIGINT or SIGTERM, while holding the operator
    /// Lease (other replicas wait as candidates).
    Run {
        /// Namespace of the Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "edgefleet-system")]
        lease_namespace: String,
        /// This replica's name in the Lease (default: host name and process id).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Lease duration in seconds; the holder renews every third of it.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
        lease_seconds: u64,
        /// Address of /metrics, /healthz and /readyz (ready while this replica leads).
        #[arg(long, env = "EDGEFLEET_METRICS_ADDR", default_value = "0.0.0.0:8081")]
        metrics_addr: std::net::SocketAddr,
        /// PEM roots trusted when fetching signature bundles given by https:// URI.
        #[arg(
            long,
            env = "EDGEFLEET_BUNDLE_CA",
            default_value = "/etc/ssl/certs/ca-certificates.crt"
        )]
        bundle_ca: std::path::PathBuf,
        /// Seconds without a heartbeat after which a device is marked not Ready.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(2..=3600))]
        heartbeat_lease_seconds: u64,
        /// Label this replica's Pod (POD_NAME in POD_NAMESPACE) `edgefleet.io/role=leader`
        /// while it leads (for people: every replica serves devices, and the chart's
        /// gateway Service selects them all).
        #[arg(long, env = "EDGEFLEET_LABEL_LEADER_POD")]
        label_leader_pod: bool,
        /// The device gateway.
        #[command(flatten)]
        gateway: Box<edgefleet_operator::gateway::options::GatewayOptions>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        // Colours only on a terminal: plain text in journald and in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    match Cli::parse().command {
        Cmd::Crd => {
            for crd in edgefleet_crds::generated_crds()? {
                print!("---\n{}", crd.yaml);
            }
        }
        Cmd::Run {
            lease_namespace,
            identity,
            lease_seconds,
            heartbeat_lease_seconds,
            metrics_addr,
            bundle_ca,
            gateway,
            label_leader_pod,
        } => {
            match edgefleet_operator::process::raise_open_files_limit() {
                Ok((before, after)) => {
                    tracing::info!(?before, ?after, "open files limit (soft)");
                }
                Err(e) => tracing::warn!(error = %e, "raising the open files limit"),
            }
            let bundles = match std::fs::read(&bundle_ca) {
                Ok(pem) => match edgefleet_operator::bundles::BundleFetcher::new(&pem) {
                    Ok(f) => Some(f),
                    Err(e) => anyhow::bail!("{}: {e}", bundle_ca.display()),
                },
                Err(e) => {
                    tracing::warn!(path = %bundle_ca.display(), error = %e, "no bundle CA roots: signature.uri bundles will not be fetched");
                    None
                }
            };
            let client = kube::Client::try_default().await?;
            let metrics = std::sync::Arc::new(edgefleet_operator::metrics::Metrics::default());
            let listener = tokio::net::TcpListener::bind(metrics_addr).await?;
            let router = edgefleet_operator::metrics::router(metrics.clone());
            tokio::spawn(async move { axum::serve(listener, router).await });
            let identity = identity.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "operator".into());
                format!("{host}-{}", std::process::id())
            });
            let election = edgefleet_operator::leader::LeaderElection::new(
                client.clone(),
                &lease_namespace,
                identity.clone(),
                std::time::Duration::from_secs(lease_seconds),
            );
            let pod = label_leader_pod.then(|| identity.clone());
            if let Some(pod) = &pod {
                // A restarted leader's Pod may still carry the mark.
                if let Err(e) =
                    edgefleet_operator::leader::label_pod(&client, &lease_namespace, pod, false)
                        .await
                {
                    tracing::warn!(error = %e, "removing the leader label from this Pod");
                }
            }
            let lease = std::time::Duration::from_secs(heartbeat_lease_seconds);
            // Every replica serves devices (enrolment, attestation, desired state,
            // reports, artifacts) and judges the liveness of those that report to it;
            // the leader alone plans rollouts, and also judges the devices no live
            // replica holds.
            let gateway = gateway
                .start(client.clone(), lease, metrics.gateway.clone())
                .await?;
            let Some((heartbeats, devices, gateway)) = gateway else {
                // No gateway here: the leader plans, and judges every device's liveness.
                tracing::info!(%identity, "waiting for the operator lease");
                election.acquire().await;
                label_leader(&client, &lease_namespace, pod.as_deref()).await;
                metrics.set_leading(true);
                tracing::info!(%identity, "leading");
                let heartbeats =
                    edgefleet_operator::heartbeat::Heartbeats::new(client.clone(), lease);
                tokio::select! {
                    () = edgefleet_operator::edgemodel::run_with(client, metrics, bundles, Default::default()) => {}
                    () = heartbeats.expire_loop() => {}
                    () = election.hold() => anyhow::bail!("lost the operator lease; exiting so that this replica restarts as a candidate"),
                }
                return Ok(());
            };
            let heartbeats = heartbeats.with_replica(identity.clone(), &lease_namespace);
            // The reconciler plans on the gateway's device cache, with the model states
            // devices report to this replica laid over the recorded ones.
            let publish = edgefleet_operator::replicas::publish_loop(
                client.clone(),
                lease_namespace.clone(),
                identity.clone(),
                heartbeats.reported(),
                devices.store.clone(),
                devices.models.clone(),
                lease,
            );
            let sources = edgefleet_operator::edgemodel::Sources {
                reported: Some(heartbeats.reported()),
                devices: Some(devices),
                replicas: Some(edgefleet_operator::edgemodel::ReplicaSource {
                    identity: identity.clone(),
                    namespace: lease_namespace.clone(),
                    lease,
                }),
            };
            let presence = edgefleet_operator::replicas::Presence::new(
                client.clone(),
                &lease_namespace,
                identity.clone(),
                lease,
            );
            let leading = {
                let heartbeats = heartbeats.clone();
                let metrics = metrics.clone();
                let client = client.clone();
                async move {
                    tracing::info!(%identity, "serving devices; waiting for the operator lease");
                    election.acquire().await;
                    label_leader(&client, &lease_namespace, pod.as_deref()).await;
                    metrics.set_leading(true);
                    heartbeats.sweep_orphans();
                    tracing::info!(%identity, "leading");
                    tokio::select! {
                        () = edgefleet_operator::edgemodel::run_with(client, metrics, bundles, sources) => {}
                        () = election.hold() => {}
                    }
                }
            };
            tokio::select! {
                r = gateway => anyhow::bail!("the device gateway stopped: {r:?}"),
                () = presence.run(heartbeats.clone()) => {}
                () = publish => {}
                () = heartbeats.expire_loop() => {}
                () = leading => anyhow::bail!("lost the operator lease; exiting so that this replica restarts as a candidate"),
            }
        }
    }
    Ok(())
}

/// Labels this replica's Pod as the leader's, when asked to (`--label-leader-pod`).
async fn label_leader(client: &kube::Client, namespace: &str, pod: Option<&str>) {
    if let Some(pod) = pod
        && let Err(e) = edgefleet_operator::leader::label_pod(client, namespace, pod, true).await
    {
        tracing::warn!(error = %e, "labelling this Pod as the leader");
    }
}
