//! `edgefleet-agent`, the device daemon's binary: sets up logging, parses the command
//! line and runs the command. The commands themselves live in the library
//! ([`edgefleet_agent::cli`]).

use std::process::ExitCode;

use clap::Parser as _;
use edgefleet_agent::cli::Cli;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,llama-cpp-2=warn".into()),
        )
        // Colours only on a terminal: plain text in journald and in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    edgefleet_agent::cli::run(Cli::parse()).await
}
