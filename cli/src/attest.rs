//! `edgefleet evidence verify` and `edgefleet policy eval`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use edgefleet_trust::attestation::policy::Policy;
use edgefleet_trust::attestation::snp::{self, SnpOptions, SnpRoots};
use edgefleet_trust::attestation::tdx::{self, TdxOptions};
use edgefleet_trust::attestation::tdx_collateral::TdxCollateral;
use edgefleet_trust::attestation::tpm::{self, TpmEvidence, TpmOptions};
use edgefleet_trust::attestation::{Claims, pem_certificates};

use crate::Outcome;

#[derive(Subcommand, Debug)]
pub enum EvidenceCommand {
    /// Verify evidence offline and print its normalized claims as JSON.
    Verify(VerifyArgs),
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Appraise claims (JSON) with a Rego policy; exit 0 when allowed, 1 when denied.
    Eval(EvalArgs),
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Kind {
    /// AMD SEV-SNP attestation report (binary).
    Snp,
    /// Intel TDX quote (binary).
    Tdx,
    /// TPM 2.0 quote (JSON: ak_public, tpm_quote {message, signature, pcrs}).
    Tpm,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Evidence kind.
    #[arg(long)]
    kind: Kind,
    /// The evidence file.
    #[arg(long)]
    evidence: PathBuf,
    /// SNP: the VCEK or VLEK certificate (DER or PEM).
    #[arg(long)]
    vcek: Option<PathBuf>,
    /// SNP: PEM bundle with the ARK and ASK (and ASVK) of the CPU generation.
    #[arg(long)]
    chain: Option<PathBuf>,
    /// TDX: the Intel SGX root certificate (PEM or DER).
    #[arg(long)]
    root: Option<PathBuf>,
    /// TDX: Intel's collateral directory (`tcb_info_<fmspc>.json`, `td_qe_identity.json`,
    /// `tcb_signing_chain.pem`); with it the TCB status is evaluated.
    #[arg(long)]
    collateral: Option<PathBuf>,
    /// Expected binding, hex: report data (SNP, TDX; 64 bytes) or quote nonce (TPM).
    #[arg(long)]
    nonce: Option<String>,
    /// Accept debuggable guests (development only).
    #[arg(long)]
    allow_debug: bool,
    /// Verify certificates as of this time (RFC 3339) instead of now.
    #[arg(long)]
    now: Option<String>,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The Rego policy (package edgefleet.attestation).
    #[arg(long)]
    policy: PathBuf,
    /// Claims JSON, as `edgefleet evidence verify` prints it.
    #[arg(long)]
    claims: PathBuf,
    /// Reference values (JSON, becomes `data`).
    #[arg(long)]
    data: Option<PathBuf>,
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// A certificate file as DER: the first PEM certificate, or the bytes themselves.
fn der_or_pem(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = read(path)?;
    if bytes.starts_with(b"-----") {
        pem_certificates(&bytes)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("{}: no certificate", path.display()))
    } else {
        Ok(bytes)
    }
}

pub fn parse_now(now: Option<&str>) -> anyhow::Result<SystemTime> {
    match now {
        None => Ok(SystemTime::now()),
        Some(s) => Ok(time::OffsetDateTime::parse(
            s,
            &time::format_description::well_known::Rfc3339,
        )
        .with_context(|| format!("--now {s:?} is not an RFC 3339 time"))?
        .into()),
    }
}

pub fn evidence(cmd: EvidenceCommand) -> anyhow::Result<Outcome> {
    let EvidenceCommand::Verify(args) = cmd;
    let now = parse_now(args.now.as_deref())?;
    let nonce = args
        .nonce
        .as_deref()
        .map(|h| hex::decode(h).with_context(|| format!("--nonce {h:?} is not hex")))
        .transpose()?;
    let evidence = read(&args.evidence)?;
    let rejected = |e: edgefleet_trust::attestation::AttestationError| {
        anyhow!("evidence rejected: {}: {e}", e.reason())
    };
    let claims: Claims = match args.kind {
        Kind::Snp => {
            let vcek = der_or_pem(
                args.vcek
                    .as_deref()
                    .ok_or_else(|| anyhow!("--kind snp needs --vcek"))?,
            )?;
            let chain_path = args
                .chain
                .as_deref()
                .ok_or_else(|| anyhow!("--kind snp needs --chain (ARK and ASK PEM)"))?;
            let roots = SnpRoots::from_pem("pinned", &read(chain_path)?)?;
            let opts = SnpOptions {
                allow_debug: args.allow_debug,
                expected_report_data: nonce,
            };
            snp::verify(&evidence, &vcek, &[roots], now, &opts).map_err(rejected)?
        }
        Kind::Tdx => {
            let root = der_or_pem(
                args.root
                    .as_deref()
                    .ok_or_else(|| anyhow!("--kind tdx needs --root (Intel SGX root)"))?,
            )?;
            let collateral = match &args.collateral {
                Some(dir) => Some(std::sync::Arc::new(
                    TdxCollateral::load_dir(dir).map_err(rejected)?,
                )),
                None => None,
            };
            let opts = TdxOptions {
                allow_debug: args.allow_debug,
                expected_report_data: nonce,
                collateral,
            };
            tdx::verify(&evidence, &root, now, &opts).map_err(rejected)?
        }
        Kind::Tpm => {
            let ev: TpmEvidence = serde_json::from_slice(&evidence).map_err(|e| {
                anyhow!(
                    "evidence rejected: Malformed: {}: {e}",
                    args.evidence.display()
                )
            })?;
            let opts = TpmOptions {
                expected_nonce: nonce,
                previous: None,
                ak_trusted: false,
            };
            tpm::verify(&ev, &opts).map_err(rejected)?.0
        }
    };
    Ok(Outcome::ok(serde_json::to_string_pretty(&claims)?))
}

pub fn policy(cmd: PolicyCommand) -> anyhow::Result<Outcome> {
    let PolicyCommand::Eval(args) = cmd;
    let rego = String::from_utf8(read(&args.policy)?).context("the policy is not UTF-8")?;
    let data = match &args.data {
        Some(p) => String::from_utf8(read(p)?).context("the data is not UTF-8")?,
        None => "{}".to_owned(),
    };
    let claims = String::from_utf8(read(&args.claims)?).context("the claims are not UTF-8")?;
    if serde_json::from_str::<serde_json::Value>(&claims).is_err() {
        bail!("{} is not JSON", args.claims.display());
    }
    let name = args
        .policy
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let policy = Policy::load(&name, &rego, &data)?;
    let decision = policy.evaluate_json(&claims)?;
    let out = serde_json::to_string_pretty(&decision)?;
    Ok(if decision.allow {
        Outcome::ok(out)
    } else {
        Outcome::failed(out)
    })
}
