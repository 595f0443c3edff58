//! edgefleet-agent, the device daemon. Attestation, model fetch and verification, and
//! serving arrive in later releases; this binary only reports its version today.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about = "edgefleet device agent")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!(
        "edgefleet-agent {}: no device functions are built yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
