//! Attestation throughput on one core: SEV-SNP report verification (signature, chain,
//! TCB) plus Rego appraisal, against the bare P-384 signature check of the same report
//! (with the same library, AWS-LC) as the in-run baseline. Run by `bench/attest.sh`.
//!
//! Two full paths: a re-attestation (the VCEK's chain signatures verified before, as on
//! the gateway where the same devices attest on an interval), and a first attestation
//! (fresh roots each time, so every RSA-4096 chain signature is checked; this includes
//! reading the small root bundle). Ring's bare P-384 rate is printed for comparison.

use std::path::PathBuf;
use std::time::{Duration, Instant, UNIX_EPOCH};

use edgefleet_trust::attestation::policy::Policy;
use edgefleet_trust::attestation::snp::{self, SnpOptions, SnpRoots};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let fixtures = root.join("../shared/fixtures/attestation");
    let report = std::fs::read(fixtures.join("trustee-snp-report.bin"))?;
    let vcek = std::fs::read(fixtures.join("trustee-snp-vcek.der"))?;
    let bundle = std::fs::read(fixtures.join("trustee-milan_ask_ark_asvk.pem"))?;
    let roots = vec![SnpRoots::from_pem("Milan", &bundle)?];
    let policy = Policy::load(
        "attestation",
        &std::fs::read_to_string(root.join("policies/attestation.rego"))?,
        &std::fs::read_to_string(root.join("policies/reference.json"))?,
    )?;
    let now = UNIX_EPOCH + Duration::from_secs(1_780_272_000);
    let bound = report[0x50..0x90].to_vec();
    let opts = SnpOptions {
        allow_debug: false,
        expected_report_data: Some(bound),
    };

    // Baseline: the report signature alone.
    let (_, cert) = <x509_parser::certificate::X509Certificate<'_> as x509_parser::prelude::FromDer<'_, _>>::from_der(&vcek)?;
    let point = cert.public_key().subject_public_key.data.to_vec();
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED,
        point.clone(),
    );
    let ring_key =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P384_SHA384_FIXED, point);
    let le = |f: &[u8]| -> [u8; 48] {
        let mut o = [0u8; 48];
        for (a, b) in o.iter_mut().zip(f[..48].iter().rev()) {
            *a = *b;
        }
        o
    };
    let mut sig = [0u8; 96];
    sig[..48].copy_from_slice(&le(&report[0x2A0..0x2E8]));
    sig[48..].copy_from_slice(&le(&report[0x2E8..0x330]));

    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let window = Duration::from_secs(2);
    let mut full = Vec::new();
    let mut first = Vec::new();
    let mut bare = Vec::new();
    let mut ring_bare = Vec::new();
    // Calls `f` for one window; its rate per second.
    type BenchResult = Result<(), Box<dyn std::error::Error>>;
    let per_second =
        |f: &mut dyn FnMut() -> BenchResult| -> Result<f64, Box<dyn std::error::Error>> {
            let (mut n, start) = (0u64, Instant::now());
            while start.elapsed() < window {
                f()?;
                n += 1;
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        };
    let verify_and_appraise = |roots: &[SnpRoots]| -> BenchResult {
        let claims = snp::verify(&report, &vcek, roots, now, &opts)?;
        let d = policy.evaluate(&claims)?;
        assert!(d.allow, "{:?}", d.deny);
        Ok(())
    };
    for _ in 0..rounds {
        full.push(per_second(&mut || verify_and_appraise(&roots))?);
        first.push(per_second(&mut || {
            verify_and_appraise(&[SnpRoots::from_pem("Milan", &bundle)?])
        })?);
        ring_bare.push(per_second(&mut || {
            ring_key
                .verify(&report[..0x2A0], &sig)
                .map_err(|_| "bare verify failed".into())
        })?);
        bare.push(per_second(&mut || {
            key.verify(&report[..0x2A0], &sig)
                .map_err(|_| "bare verify failed".into())
        })?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (f, b) = (median(&mut full), median(&mut bare));
    let (c, r) = (median(&mut first), median(&mut ring_bare));
    println!(
        "rounds={rounds} snp_verify_plus_policy_per_s={f:.0} bare_p384_verify_per_s={b:.0} ratio={:.3} first_attestation_per_s={c:.0} ring_bare_p384_per_s={r:.0}",
        f / b
    );
    Ok(())
}
