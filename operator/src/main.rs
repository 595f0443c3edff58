//! edgefleet-operator. Today it prints the CRDs it serves (`edgefleet-operator crd`);
//! the reconcilers and the device gateway join it in later releases.

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Crd => {
            for crd in edgefleet_crds::generated_crds()? {
                print!("---\n{}", crd.yaml);
            }
        }
    }
    Ok(())
}
