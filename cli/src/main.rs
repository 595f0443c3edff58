//! `edgefleet`, the user command line: `model` (`model.rs`), `evidence` and `policy`
//! (`attest.rs`), `token` (`token.rs`), `device` (`device.rs`), `receipt`
//! (`receipt.rs`).

mod attest;
mod device;
mod model;
mod receipt;
mod token;

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
    /// Verify device attestation evidence (SEV-SNP, TDX, TPM).
    #[command(subcommand)]
    Evidence(attest::EvidenceCommand),
    /// Evaluate attestation policies.
    #[command(subcommand)]
    Policy(attest::PolicyCommand),
    /// Enrolment tokens (EdgeBootstrapToken) on the cluster of the current kubeconfig.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Devices (EdgeDevice) on the cluster of the current kubeconfig: re-keying.
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// Verify devices' signed answers (receipts) offline, with the device CA.
    #[command(subcommand)]
    Receipt(receipt::ReceiptCommand),
}

/// What a command prints, and whether it succeeded.
#[derive(Debug)]
pub struct Outcome {
    stdout: String,
    success: bool,
}

impl Outcome {
    fn ok(stdout: String) -> Self {
        Self {
            stdout,
            success: true,
        }
    }
    fn failed(stdout: String) -> Self {
        Self {
            stdout,
            success: false,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Model(cmd) => model::run(cmd).map(Outcome::ok),
        Command::Evidence(cmd) => attest::evidence(cmd),
        Command::Policy(cmd) => attest::policy(cmd),
        Command::Token(cmd) => token::run(cmd).map(Outcome::ok),
        Command::Device(cmd) => device::run(cmd).map(Outcome::ok),
        Command::Receipt(cmd) => receipt::run(cmd),
    };
    match result {
        Ok(out) => {
            println!("{}", out.stdout);
            if out.success {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("edgefleet: {err:#}");
            ExitCode::FAILURE
        }
    }
}
