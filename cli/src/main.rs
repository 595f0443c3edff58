//! `edgefleet`, the user command line.

mod model;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "edgefleet",
    version,
    about = "edgefleet: LLMs on fleets of edge devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Sign and verify models (OpenSSF model-signing v1.0).
    #[command(subcommand)]
    Model(model::ModelCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Model(cmd) => model::run(cmd),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("edgefleet: {err:#}");
            ExitCode::FAILURE
        }
    }
}
