//! TPM 2.0 quotes, parsed in pure Rust (TPMS_ATTEST and TPMT_SIGNATURE are big-endian).
//!
//! Checks: the quote structure (magic, type); the signature by the attestation key (RSA
//! PKCS#1 v1.5 or PSS, or ECDSA P-256/P-384); the nonce in `extraData`; the PCR digest
//! recomputed from the reported PCR values; `safe`; and, given the previous quote's clock
//! state, that reset/restart counters and the clock did not go back. Whether the AK itself
//! is trusted (EK certificate chain plus credential activation, or pre-registration) is
//! decided before this step and passed in as [`TpmOptions::ak_trusted`].

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::{AttestationError, Claims, TeeKind};

const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
const TPM_ALG_RSASSA: u16 = 0x0014;
const TPM_ALG_RSAPSS: u16 = 0x0016;
const TPM_ALG_ECDSA: u16 = 0x0018;
const TPM_ALG_SHA256: u16 = 0x000B;
const TPM_ALG_SHA384: u16 = 0x000C;

/// TPM evidence as the agent sends it (and as trustee records it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TpmEvidence {
    /// The AK public key, SubjectPublicKeyInfo DER, base64.
    pub ak_public: String,
    /// The quote.
    pub tpm_quote: TpmQuote,
}

/// A quote and the PCR values it covers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TpmQuote {
    /// TPMS_ATTEST, base64.
    pub message: String,
    /// TPMT_SIGNATURE, base64.
    pub signature: String,
    /// SHA-256 bank PCR values 0..23, hex.
    pub pcrs: Vec<String>,
}

/// The TPM clock and counters of a quote; the next quote must not be behind them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// Milliseconds the TPM has been powered (monotonic unless reset).
    pub clock: u64,
    /// TPM resets (power cycles).
    pub reset_count: u32,
    /// TPM restarts (resumes) since the last reset.
    pub restart_count: u32,
}

/// Verifier options.
#[derive(Debug, Clone, Default)]
pub struct TpmOptions {
    /// The nonce the quote's `extraData` must equal.
    pub expected_nonce: Option<Vec<u8>>,
    /// The previous quote's clock state for this device, if any.
    pub previous: Option<ClockState>,
    /// The AK is bound to a TPM: its EK chain and credential activation were checked,
    /// or it was registered out of band.
    pub ak_trusted: bool,
}

/// A big-endian reader.
struct Be<'a> {
    data: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Be<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AttestationError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(AttestationError::Truncated {
                what: self.what,
                need: self.at.saturating_add(n),
                have: self.data.len(),
            })?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, AttestationError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, AttestationError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, AttestationError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, AttestationError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn tpm2b(&mut self) -> Result<&'a [u8], AttestationError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

/// A parsed TPMS_ATTEST of type quote.
#[derive(Debug, Clone)]
pub struct Attest {
    /// Name of the signing key.
    pub qualified_signer: Vec<u8>,
    /// The caller's nonce.
    pub extra_data: Vec<u8>,
    /// Clock state.
    pub clock: ClockState,
    /// Whether the clock is known not to have gone back.
    pub safe: bool,
    /// Firmware version.
    pub firmware_version: u64,
    /// Selected PCRs per bank: (hash algorithm, PCR indices).
    pub selections: Vec<(u16, Vec<u8>)>,
    /// Digest of the selected PCR values.
    pub pcr_digest: Vec<u8>,
}

/// Parses TPMS_ATTEST.
pub fn parse_attest(msg: &[u8]) -> Result<Attest, AttestationError> {
    let mut r = Be {
        data: msg,
        at: 0,
        what: "TPMS_ATTEST",
    };
    let magic = r.u32()?;
    if magic != TPM_GENERATED_VALUE {
        return Err(AttestationError::Malformed(format!(
            "TPMS_ATTEST magic {magic:#x} is not TPM_GENERATED_VALUE"
        )));
    }
    let ty = r.u16()?;
    if ty != TPM_ST_ATTEST_QUOTE {
        return Err(AttestationError::Unsupported(format!(
            "TPMS_ATTEST type {ty:#x} is not a quote"
        )));
    }
    let qualified_signer = r.tpm2b()?.to_vec();
    let extra_data = r.tpm2b()?.to_vec();
    let clock = r.u64()?;
    let reset_count = r.u32()?;
    let restart_count = r.u32()?;
    let safe = r.u8()? == 1;
    let firmware_version = r.u64()?;
    let count = r.u32()?;
    if count > 16 {
        return Err(AttestationError::Malformed(format!(
            "{count} PCR selections"
        )));
    }
    let mut selections = Vec::new();
    for _ in 0..count {
        let alg = r.u16()?;
        let size = usize::from(r.u8()?);
        if size > 4 {
            return Err(AttestationError::Malformed(format!(
                "PCR select of {size} bytes"
            )));
        }
        let bits = r.take(size)?;
        let idx = (0..size * 8)
            .filter(|i| bits[i / 8] >> (i % 8) & 1 == 1)
            .filter_map(|i| u8::try_from(i).ok())
            .collect();
        selections.push((alg, idx));
    }
    let pcr_digest = r.tpm2b()?.to_vec();
    if r.at != msg.len() {
        return Err(AttestationError::Malformed(format!(
            "{} trailing bytes after TPMS_ATTEST",
            msg.len() - r.at
        )));
    }
    Ok(Attest {
        qualified_signer,
        extra_data,
        clock: ClockState {
            clock,
            reset_count,
            restart_count,
        },
        safe,
        firmware_version,
        selections,
        pcr_digest,
    })
}

fn verify_signature(
    ak_spki: &[u8],
    msg: &[u8],
    sig: &[u8],
) -> Result<&'static str, AttestationError> {
    let mut r = Be {
        data: sig,
        at: 0,
        what: "TPMT_SIGNATURE",
    };
    let alg = r.u16()?;
    let hash = r.u16()?;
    let (_, spki) = SubjectPublicKeyInfo::from_der(ak_spki)
        .map_err(|e| AttestationError::Malformed(format!("AK public key: {e}")))?;
    let key_bits = spki.subject_public_key.data.as_ref();
    let bad = || AttestationError::SignatureInvalid("quote signature by the AK".into());
    match alg {
        TPM_ALG_RSASSA | TPM_ALG_RSAPSS => {
            let s = r.tpm2b()?;
            let params: &dyn ring::signature::VerificationAlgorithm = match (alg, hash) {
                (TPM_ALG_RSASSA, TPM_ALG_SHA256) => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                (TPM_ALG_RSASSA, TPM_ALG_SHA384) => &ring::signature::RSA_PKCS1_2048_8192_SHA384,
                (TPM_ALG_RSAPSS, TPM_ALG_SHA256) => &ring::signature::RSA_PSS_2048_8192_SHA256,
                (TPM_ALG_RSAPSS, TPM_ALG_SHA384) => &ring::signature::RSA_PSS_2048_8192_SHA384,
                _ => {
                    return Err(AttestationError::Unsupported(format!(
                        "RSA signature with hash {hash:#x}"
                    )));
                }
            };
            ring::signature::UnparsedPublicKey::new(params, key_bits)
                .verify(msg, s)
                .map_err(|_| bad())?;
            Ok(if alg == TPM_ALG_RSASSA {
                "rsassa"
            } else {
                "rsapss"
            })
        }
        TPM_ALG_ECDSA => {
            let sr = r.tpm2b()?;
            let ss = r.tpm2b()?;
            let (params, size): (&dyn ring::signature::VerificationAlgorithm, usize) = match hash {
                TPM_ALG_SHA256 => (&ring::signature::ECDSA_P256_SHA256_FIXED, 32),
                TPM_ALG_SHA384 => (&ring::signature::ECDSA_P384_SHA384_FIXED, 48),
                _ => {
                    return Err(AttestationError::Unsupported(format!(
                        "ECDSA with hash {hash:#x}"
                    )));
                }
            };
            // r ‖ s, each left-padded to the curve size, as ring's fixed format wants.
            let mut fixed = vec![0u8; 2 * size];
            for (half, v) in [sr, ss].into_iter().enumerate() {
                let v = &v[v.iter().take_while(|&&b| b == 0).count()..];
                if v.len() > size {
                    return Err(bad());
                }
                fixed[(half + 1) * size - v.len()..(half + 1) * size].copy_from_slice(v);
            }
            ring::signature::UnparsedPublicKey::new(params, key_bits)
                .verify(msg, &fixed)
                .map_err(|_| bad())?;
            Ok("ecdsa")
        }
        other => Err(AttestationError::Unsupported(format!(
            "TPM signature scheme {other:#x}"
        ))),
    }
}

/// Verifies TPM evidence. Returns the claims and the quote's clock state, which the
/// caller stores to pass as [`TpmOptions::previous`] next time.
pub fn verify(
    evidence: &TpmEvidence,
    options: &TpmOptions,
) -> Result<(Claims, ClockState), AttestationError> {
    let b64 = |what: &str, s: &str| {
        B64.decode(s.trim())
            .map_err(|e| AttestationError::Malformed(format!("{what}: {e}")))
    };
    let ak = b64("ak_public", &evidence.ak_public)?;
    let msg = b64("quote message", &evidence.tpm_quote.message)?;
    let sig = b64("quote signature", &evidence.tpm_quote.signature)?;
    let scheme = verify_signature(&ak, &msg, &sig)?;
    let attest = parse_attest(&msg)?;

    if let Some(nonce) = &options.expected_nonce
        && nonce.as_slice() != attest.extra_data.as_slice()
    {
        return Err(AttestationError::ReportDataMismatch);
    }
    // `safe` is NO after an unclean shutdown (a power cut) until the TPM next saves its
    // clock (at most about 70 minutes of operation): the clock may then repeat values
    // it reported before the cut. Those were reported under an earlier reset count, and
    // clocks are compared only within one reset, so given the device's previous quote
    // the checks below still hold: across the reboot the reset count must have risen,
    // and within the power cycle that follows (a re-attestation, an agent restart) the
    // clock must not go back from the last quote accepted. Such a quote is accepted and
    // marked (`platform.clock_safe` false) for the policy to decide. With no previous
    // quote nothing can be compared, and it is refused until the clock is safe again.
    if !attest.safe && options.previous.is_none() {
        return Err(AttestationError::ClockNotSafe);
    }
    if let Some(prev) = options.previous {
        let now = attest.clock;
        if now.reset_count < prev.reset_count {
            return Err(AttestationError::ClockRollback(format!(
                "resetCount {} < {}",
                now.reset_count, prev.reset_count
            )));
        }
        if now.reset_count == prev.reset_count {
            if now.restart_count < prev.restart_count {
                return Err(AttestationError::ClockRollback(format!(
                    "restartCount {} < {}",
                    now.restart_count, prev.restart_count
                )));
            }
            if now.clock < prev.clock {
                return Err(AttestationError::ClockRollback(format!(
                    "clock {} < {}",
                    now.clock, prev.clock
                )));
            }
        }
    }

    // Recompute the PCR digest from the reported values.
    let pcrs = evidence
        .tpm_quote
        .pcrs
        .iter()
        .map(|p| hex::decode(p).ok().filter(|v| v.len() == 32))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            AttestationError::Malformed("PCR values must be 32-byte hex (SHA-256 bank)".into())
        })?;
    let mut h = Sha256::new();
    let mut measurements = BTreeMap::new();
    for (alg, idx) in &attest.selections {
        if *alg != TPM_ALG_SHA256 {
            return Err(AttestationError::Unsupported(format!(
                "PCR bank {alg:#x} (only SHA-256)"
            )));
        }
        for &i in idx {
            let v = pcrs.get(usize::from(i)).ok_or_else(|| {
                AttestationError::Malformed(format!("PCR {i} selected but not reported"))
            })?;
            h.update(v);
            measurements.insert(format!("pcr{i:02}"), hex::encode(v));
        }
    }
    if h.finalize()[..] != attest.pcr_digest[..] {
        return Err(AttestationError::PcrDigestMismatch);
    }

    let mut tcb = BTreeMap::new();
    tcb.insert(
        "firmware_version".into(),
        json!(format!("{:#018x}", attest.firmware_version)),
    );
    let mut platform = BTreeMap::new();
    platform.insert("reset_count".into(), json!(attest.clock.reset_count));
    platform.insert("restart_count".into(), json!(attest.clock.restart_count));
    platform.insert("clock".into(), json!(attest.clock.clock));
    platform.insert("clock_safe".into(), json!(attest.safe));
    platform.insert("signature_scheme".into(), json!(scheme));
    platform.insert(
        "ak_name".into(),
        json!(hex::encode(&attest.qualified_signer)),
    );
    let claims = Claims {
        tee: TeeKind::Tpm,
        hardware_genuine: options.ak_trusted,
        debug: false,
        measurements,
        tcb,
        report_data: hex::encode(&attest.extra_data),
        key_binding: options.expected_nonce.as_ref().map(hex::encode),
        signer: hex::encode(Sha256::digest(&ak)),
        platform,
    };
    Ok((claims, attest.clock))
}
