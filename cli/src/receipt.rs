//! `edgefleet receipt verify`: checks a device's signed answer offline, with the
//! cluster's device CA alone ([`edgefleet_trust::receipt`]).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use edgefleet_trust::receipt;
use serde_json::json;

use crate::Outcome;

#[derive(Subcommand, Debug)]
pub enum ReceiptCommand {
    /// Verify a receipt: the device certificate chains to the CA, the signature
    /// verifies, the attestation result is the fleet's, affirming, for this device and
    /// key, and covers the receipt's time; with the bodies given, their digests match.
    /// Prints what the receipt attests; exits 1 naming the first check that fails.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["receipt", "stream"]))]
pub struct VerifyArgs {
    /// The cluster's device CA certificate(s), PEM (the gateway's `--device-ca-cert`).
    #[arg(long)]
    ca: PathBuf,
    /// A file holding the receipt (the `edgefleet-receipt` response header's value).
    #[arg(long)]
    receipt: Option<PathBuf>,
    /// A streamed answer as received (its raw server-sent events), which ends with
    /// its receipt's event; the response digest is checked against the bytes before it.
    #[arg(long, conflicts_with = "response")]
    stream: Option<PathBuf>,
    /// The request body that was sent, to check against the receipt.
    #[arg(long)]
    request: Option<PathBuf>,
    /// The response body that was received, to check against the receipt.
    #[arg(long)]
    response: Option<PathBuf>,
    /// Accept only attestations of these evidence kinds (repeatable: `sev-snp`, `tdx`,
    /// `tpm`, `dev`). Without it any kind the gateway's policy allowed is accepted,
    /// the development attester's too: check `attestation.tee` in the output.
    #[arg(long = "tee")]
    tees: Vec<String>,
    /// Accept only attestations decided by this policy: its name, or `name@sha256:...`
    /// with the hash of its text (repeatable).
    #[arg(long = "policy")]
    policies: Vec<String>,
}

fn read(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

pub fn run(cmd: ReceiptCommand) -> anyhow::Result<Outcome> {
    let ReceiptCommand::Verify(args) = cmd;
    let ca = read(&args.ca)?;
    let request = args.request.as_ref().map(read).transpose()?;
    let (text, response) = match (&args.receipt, &args.stream) {
        (Some(r), None) => {
            let text = String::from_utf8(read(r)?).context("the receipt is not UTF-8")?;
            (text, args.response.as_ref().map(read).transpose()?)
        }
        (None, Some(s)) => {
            let stream = read(s)?;
            let Some((body, receipt)) = receipt::split_stream(&stream) else {
                return Ok(failed(
                    "ReceiptMissing",
                    &format!(
                        "{} does not end with an `event: {}`",
                        s.display(),
                        receipt::SSE_EVENT
                    ),
                ));
            };
            (receipt.to_owned(), Some(body.to_vec()))
        }
        _ => bail!("give --receipt or --stream"),
    };
    let verified = match receipt::verify(&text, &ca).and_then(|v| {
        v.check_bodies(request.as_deref(), response.as_deref())
            .map(|()| v)
    }) {
        Ok(v) => v,
        Err(e) => return Ok(failed(e.reason(), &e.to_string())),
    };
    let c = &verified.claims;
    let a = &verified.attestation;
    let tee = a["edgefleet.tee"].as_str().unwrap_or_default();
    if !args.tees.is_empty() && !args.tees.iter().any(|t| t == tee) {
        return Ok(failed(
            "TeeNotAccepted",
            &format!(
                "the device attested with {tee:?}, not one of {:?}",
                args.tees
            ),
        ));
    }
    let policy = a["ear.appraisal-policy-id"].as_str().unwrap_or_default();
    let named = |p: &String| p == policy || policy.split_once('@').is_some_and(|(n, _)| n == p);
    if !args.policies.is_empty() && !args.policies.iter().any(named) {
        return Ok(failed(
            "PolicyNotAccepted",
            &format!(
                "the attestation was decided by {policy:?}, not one of {:?}",
                args.policies
            ),
        ));
    }
    let out = json!({
        "verified": true,
        "device": c.device,
        "time": c.time,
        "model": c.provenance.model,
        "plugins": c.provenance.plugins,
        "requestSha256": c.request_sha256,
        "responseSha256": c.response_sha256,
        "requestChecked": request.is_some(),
        "responseChecked": response.is_some(),
        "attestation": {
            "id": c.attestation_result_id,
            "status": a["ear.status"],
            "tee": a["edgefleet.tee"],
            "policy": a["ear.appraisal-policy-id"],
            "measurements": a["edgefleet.measurements"],
            "issuedAt": a["iat"],
            "expiresAt": a["exp"],
        },
    });
    Ok(Outcome::ok(serde_json::to_string_pretty(&out)?))
}

fn failed(reason: &str, message: &str) -> Outcome {
    Outcome::failed(
        serde_json::to_string_pretty(
            &json!({"verified": false, "reason": reason, "message": message}),
        )
        .unwrap_or_default(),
    )
}
