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
    /// Run the EdgeModel controller until SIGINT or SIGTERM.
    Run,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    match Cli::parse().command {
        Cmd::Crd => {
            for crd in edgefleet_crds::generated_crds()? {
                print!("---\n{}", crd.yaml);
            }
        }
        Cmd::Run => {
            let client = kube::Client::try_default().await?;
            edgefleet_operator::edgemodel::run(client).await;
        }
    }
    Ok(())
}
