//! The `edgefleet-agent` command line ([`Cli`]) and running its commands ([`run`]):
//! `check-config` prints the layered configuration, `run` is fleet mode
//! ([`crate::gateway_session`]), `serve` is standalone serving ([`crate::standalone`]),
//! and `attest` attests to the gateway once or on an interval ([`crate::enrol`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use edgefleet_trust::attestation::TeeKind;

use crate::enrol::{Source, attest_loop, attest_once};
use crate::gateway_client::GatewayClient;
use crate::standalone::ServeArgs;

/// The command line.
#[derive(Parser, Debug)]
#[command(name = "edgefleet-agent", version, about = "edgefleet device agent")]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Load and validate the layered configuration, and print it (secrets redacted).
    CheckConfig {
        /// Directory with agent.toml and agent.d/*.toml.
        #[arg(long, env = "EDGEFLEET_CONFIG_DIR", default_value = "/etc/edgefleet")]
        config_dir: PathBuf,
    },
    /// Run as a fleet device: enrol, attest, follow the gateway's desired state, serve
    /// and report (the systemd service's command).
    Run {
        /// Directory with agent.toml and agent.d/*.toml.
        #[arg(long, env = "EDGEFLEET_CONFIG_DIR", default_value = "/etc/edgefleet")]
        config_dir: PathBuf,
    },
    /// Serve a model standalone on the OpenAI-compatible API (no operator).
    Serve(ServeArgs),
    /// Attest to the gateway and store the client certificate it issues (the device must
    /// be enrolled; attestation needs its key and evidence, no bootstrap token).
    Attest {
        /// Gateway URL, e.g. https://gateway.edgefleet.svc:8443.
        #[arg(long, env = "EDGEFLEET_GATEWAY")]
        gateway: String,
        /// PEM CA that issued the gateway's certificate.
        #[arg(long, env = "EDGEFLEET_GATEWAY_CA")]
        gateway_ca: PathBuf,
        /// This device's name (its EdgeDevice).
        #[arg(long, env = "EDGEFLEET_DEVICE")]
        device: String,
        /// Evidence source.
        #[arg(long, env = "EDGEFLEET_TEE", value_parser = tee_parser())]
        tee: TeeKind,
        /// TPM TCTI (tpm only).
        #[arg(long, env = "EDGEFLEET_TCTI", default_value = "device:/dev/tpmrm0")]
        tcti: String,
        /// configfs-tsm report directory (sev-snp, tdx).
        #[arg(long, default_value = crate::attest::configfs_tsm::DEFAULT_ROOT)]
        tsm_root: PathBuf,
        /// State directory (agent key, certificate).
        #[arg(
            long,
            env = "EDGEFLEET_STATE_DIR",
            default_value = "/var/lib/edgefleet"
        )]
        state_dir: PathBuf,
        /// Keep re-attesting, at most this many seconds apart (0: attest once and exit).
        #[arg(long, default_value_t = 0)]
        interval: u64,
    },
}

/// `--tee`: the kinds [`crate::config::parse_tee_kind`] accepts, listed in `--help`.
fn tee_parser() -> impl TypedValueParser<Value = TeeKind> {
    PossibleValuesParser::new([
        PossibleValue::new("tpm").help("TPM 2.0 through a TCTI"),
        PossibleValue::new("sev-snp").help("SEV-SNP guest (configfs-tsm)"),
        PossibleValue::new("tdx").help("TDX guest (configfs-tsm)"),
        PossibleValue::new("dev").help("Development key; the default policy rejects it"),
    ])
    .try_map(|s| crate::config::parse_tee_kind(&s))
}

/// Runs the command. The exit code is a failure when an attestation was denied.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::CheckConfig { config_dir } => {
            let config = crate::config::load(&config_dir, std::env::vars())?;
            println!("{config:#?}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { config_dir } => {
            let mut config = crate::config::load(&config_dir, std::env::vars())?;
            if config.fleet.plugin_cache.is_none() {
                // systemd's CacheDirectory=.
                config.fleet.plugin_cache = std::env::var_os("CACHE_DIRECTORY").map(PathBuf::from);
            }
            let a = &config.attestation;
            let source = Source::new(a.tee_kind()?, a.tcti.clone(), a.tsm_root.clone());
            crate::gateway_session::run(config, source, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve(args) => {
            crate::standalone::serve(args, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Attest {
            gateway,
            gateway_ca,
            device,
            tee,
            tcti,
            tsm_root,
            state_dir,
            interval,
        } => {
            let ca = std::fs::read(&gateway_ca)
                .with_context(|| format!("reading {}", gateway_ca.display()))?;
            let client = GatewayClient::new(&gateway, &ca, "")?;
            let mut source = Source::new(tee, tcti, tsm_root);
            if interval == 0 {
                let a = attest_once(&client, &device, &mut source, &state_dir).await?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "allow": a.decision.allow, "deny": a.decision.deny, "policy_hash": a.decision.policy_hash,
                        "expires_at": a.expires_at, "certificate": a.certificate.is_some(),
                    }))?
                );
                return Ok(if a.decision.allow {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            attest_loop(
                client,
                device,
                source,
                state_dir,
                Duration::from_secs(interval),
            )
            .await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// SIGINT or SIGTERM (what systemd sends on stop).
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attest_tee_is_parsed_and_an_unknown_kind_is_refused() {
        let attest = |tee: &str| {
            Cli::try_parse_from([
                "edgefleet-agent",
                "attest",
                "--gateway",
                "https://gw:8443",
                "--gateway-ca",
                "/ca.pem",
                "--device",
                "till-1",
                "--tee",
                tee,
            ])
        };
        match attest("sev-snp").unwrap().command {
            Cmd::Attest { tee, .. } => assert_eq!(tee, TeeKind::SevSnp),
            other => panic!("{other:?}"),
        }
        let err = attest("sgx").unwrap_err().to_string();
        assert!(err.contains("sgx"), "{err}");
    }
}
