//! Attesting to the gateway: one round (challenge, evidence, decision), and the
//! re-attestation loop that repeats it before the result lapses. The agent's identity
//! key lives in the state directory; the certificate the gateway issues for it is
//! written beside it atomically.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use edgefleet_trust::attestation::TeeKind;
use edgefleet_trust::attestation::service::{
    Appraisal, ChallengeRequest, Evidence, EvidenceRequest, TpmEnrolment,
};

use crate::attest::configfs_tsm::ConfigfsTsm;
use crate::attest::dev::DevAttester;
use crate::attest::tpm::TpmAttester;
use crate::gateway_client::{GatewayClient, GatewayError};

/// SNP certificate-table GUID of the VCEK.
const VCEK_GUID: [u8; 16] = [
    0x63, 0xda, 0x75, 0x8d, 0xe6, 0x64, 0x45, 0x64, 0xad, 0xc5, 0xf4, 0xb9, 0x3b, 0xe8, 0xac, 0xcd,
];

/// Errors of an attestation round.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// The gateway refused or could not be reached.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// The attester failed.
    #[error(transparent)]
    Attester(#[from] crate::attest::AttestError),
    /// The state directory could not be used.
    #[error("state {path}: {source}")]
    State {
        /// Path.
        path: PathBuf,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// Something the round needs is missing or malformed.
    #[error("{0}")]
    Invalid(String),
    /// The device is not enrolled and the agent has no bootstrap token to enrol it.
    #[error(
        "NoBootstrapToken: {0} is not enrolled and this agent has no bootstrap token; write one \
         (`edgefleet token create`) to gateway.bootstrap_token_file (mode 0600) or the systemd \
         credential `bootstrap-token`"
    )]
    NoBootstrapToken(String),
}

/// Where evidence comes from.
#[derive(Debug)]
pub enum Source {
    /// A TPM; the attester (EK and AK) is kept across rounds.
    Tpm(TpmSource),
    /// configfs-tsm at `root`, on a guest of `kind` (SEV-SNP or TDX).
    ConfigfsTsm {
        /// Normally `/sys/kernel/config/tsm/report`.
        root: PathBuf,
        /// `SevSnp` or `Tdx`.
        kind: TeeKind,
    },
    /// The development key.
    Dev(DevAttester),
}

impl Source {
    /// The evidence source of a `kind` device: the TPM at `tcti`, configfs-tsm at
    /// `tsm_root` (SEV-SNP, TDX), or a freshly generated development key.
    pub fn new(kind: TeeKind, tcti: String, tsm_root: PathBuf) -> Self {
        match kind {
            TeeKind::Tpm => Self::Tpm(TpmSource::new(tcti)),
            TeeKind::SevSnp | TeeKind::Tdx => Self::ConfigfsTsm {
                root: tsm_root,
                kind,
            },
            TeeKind::Dev => Self::Dev(DevAttester::generate()),
        }
    }
}

/// A TPM opened on first use and kept, so that re-attestation reuses its AK (creating
/// an RSA key takes seconds on a real TPM). After a failed round it is opened afresh.
#[derive(Debug)]
pub struct TpmSource {
    tcti: String,
    attester: Option<TpmAttester>,
}

impl TpmSource {
    /// The TPM at `tcti` (for example `device:/dev/tpmrm0`).
    pub fn new(tcti: impl Into<String>) -> Self {
        Self {
            tcti: tcti.into(),
            attester: None,
        }
    }

    fn take(&mut self) -> Result<TpmAttester, EnrolError> {
        match self.attester.take() {
            Some(a) => Ok(a),
            None => Ok(TpmAttester::open(&self.tcti)?),
        }
    }
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> EnrolError + '_ {
    move |source| EnrolError::State {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads the agent key from `state/agent-key.pem`, creating it (mode 0600) if absent.
pub fn agent_key(state: &Path) -> Result<rcgen::KeyPair, EnrolError> {
    let path = state.join("agent-key.pem");
    match std::fs::read_to_string(&path) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem)
            .map_err(|e| EnrolError::Invalid(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(state).map_err(state_err(state))?;
            let key = rcgen::KeyPair::generate().map_err(|e| EnrolError::Invalid(e.to_string()))?;
            // Whole or not at all (a torn key would leave a device that never attests),
            // and never replacing a key another process created meanwhile.
            if crate::durable::create(&path, key.serialize_pem().as_bytes(), 0o600)
                .map_err(state_err(&path))?
            {
                Ok(key)
            } else {
                agent_key(state)
            }
        }
        Err(e) => Err(EnrolError::State { path, source: e }),
    }
}

/// Finds the VCEK in an SNP certificate table (GUID, offset, length entries ending in a
/// zero GUID; offsets are from the start of the table).
pub fn vcek_from_cert_table(table: &[u8]) -> Option<Vec<u8>> {
    let mut at = 0;
    while let Some(entry) = table.get(at..at + 24) {
        let guid = &entry[..16];
        if guid.iter().all(|&b| b == 0) {
            return None;
        }
        let offset = u32::from_le_bytes([entry[16], entry[17], entry[18], entry[19]]) as usize;
        let len = u32::from_le_bytes([entry[20], entry[21], entry[22], entry[23]]) as usize;
        if guid == VCEK_GUID {
            return table
                .get(offset..offset.checked_add(len)?)
                .map(<[u8]>::to_vec);
        }
        at += 24;
    }
    None
}

/// One attestation round. On success with an allowed decision, writes the client
/// certificate to `state/agent-cert.pem` and returns the appraisal.
pub async fn attest_once(
    client: &GatewayClient,
    device: &str,
    source: &mut Source,
    state: &Path,
) -> Result<Appraisal, EnrolError> {
    let key = agent_key(state)?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|c| c.pem())
        .map_err(|e| EnrolError::Invalid(format!("CSR: {e}")))?;

    let mut tpm = match source {
        Source::Tpm(t) => Some(t.take()?),
        _ => None,
    };
    let (tee, enrol) = match (&source, tpm.as_mut()) {
        (Source::Tpm(_), Some(t)) => (
            TeeKind::Tpm,
            Some(TpmEnrolment {
                ek_certificate: B64.encode(t.ek_certificate()?),
                ak_public_area: B64.encode(t.ak_public_area()?),
            }),
        ),
        (Source::ConfigfsTsm { kind, .. }, _) => (*kind, None),
        (Source::Dev(_), _) => (TeeKind::Dev, None),
        (Source::Tpm(_), None) => return Err(EnrolError::Invalid("TPM not open".into())),
    };
    let challenge = client
        .challenge(&ChallengeRequest {
            device: device.to_owned(),
            agent_public_key: B64.encode(&spki),
            tee,
            tpm: enrol,
        })
        .await?;
    let report_data: [u8; 64] = hex::decode(&challenge.report_data)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| EnrolError::Invalid("gateway sent bad report data".into()))?;

    let evidence = match (&mut *source, tpm.as_mut()) {
        (Source::Tpm(_), Some(t)) => {
            let cred = challenge
                .credential
                .as_ref()
                .ok_or_else(|| EnrolError::Invalid("no credential challenge".into()))?;
            let id = B64
                .decode(&cred.id_object)
                .map_err(|e| EnrolError::Invalid(e.to_string()))?;
            let enc = B64
                .decode(&cred.encrypted_secret)
                .map_err(|e| EnrolError::Invalid(e.to_string()))?;
            let secret = t.activate_credential(&id, &enc)?;
            // TPMs quote SHA-256 of the binding: TPM2B_DATA is too small for 64 bytes.
            let qualifying =
                edgefleet_trust::attestation::binding::tpm_qualifying_data(&report_data);
            Evidence::Tpm {
                evidence: t.quote(&qualifying)?,
                credential: B64.encode(secret),
            }
        }
        (Source::ConfigfsTsm { root, .. }, _) => {
            let report = ConfigfsTsm::new(root.clone()).report(&report_data)?;
            match report.provider.as_str() {
                "sev_guest" => {
                    let vcek = report
                        .auxblob
                        .as_deref()
                        .and_then(vcek_from_cert_table)
                        .ok_or_else(|| {
                            EnrolError::Invalid(
                                "the host supplied no VCEK in the SNP certificate table".into(),
                            )
                        })?;
                    Evidence::SevSnp {
                        report: B64.encode(report.outblob),
                        vcek: B64.encode(vcek),
                    }
                }
                "tdx_guest" => Evidence::Tdx {
                    quote: B64.encode(report.outblob),
                },
                other => {
                    return Err(EnrolError::Invalid(format!(
                        "unknown configfs-tsm provider {other:?}"
                    )));
                }
            }
        }
        (Source::Dev(dev), _) => Evidence::Dev {
            evidence: dev.evidence(&report_data)?,
        },
        (Source::Tpm(_), None) => return Err(EnrolError::Invalid("TPM not open".into())),
    };
    let appraisal = client
        .evidence(&EvidenceRequest {
            device: device.to_owned(),
            nonce: challenge.nonce,
            csr,
            evidence,
        })
        .await?;
    if let (Source::Tpm(t), Some(a)) = (source, tpm) {
        t.attester = Some(a);
    }
    if let Some(cert) = &appraisal.certificate {
        let path = state.join("agent-cert.pem");
        crate::durable::write(&path, cert.as_bytes(), 0o644).map_err(state_err(&path))?;
    }
    Ok(appraisal)
}

/// Attests now and again before each result lapses (at two thirds of its lifetime,
/// at most every `max_interval`), retrying failures with capped backoff.
pub async fn attest_loop(
    client: GatewayClient,
    device: String,
    mut source: Source,
    state: PathBuf,
    max_interval: Duration,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let wait = match attest_once(&client, &device, &mut source, &state).await {
            Ok(a) => {
                backoff = Duration::from_secs(1);
                tracing::info!(allow = a.decision.allow, deny = ?a.decision.deny, expires_at = a.expires_at, "attested");
                reattest_in(a.expires_at, max_interval)
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "attestation failed");
                let w = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(300));
                w
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcek_is_found_in_the_certificate_table() {
        let mut table = Vec::new();
        let ask_guid = [0x4a; 16];
        table.extend(ask_guid);
        table.extend(72u32.to_le_bytes());
        table.extend(3u32.to_le_bytes());
        table.extend(VCEK_GUID);
        table.extend(75u32.to_le_bytes());
        table.extend(4u32.to_le_bytes());
        table.extend([0u8; 24]);
        table.extend(b"ASKVCEK");
        assert_eq!(vcek_from_cert_table(&table), Some(b"VCEK".to_vec()));
        let mut no_vcek = table.clone();
        no_vcek[24..40].copy_from_slice(&[0x11; 16]);
        assert_eq!(vcek_from_cert_table(&no_vcek), None);
        assert_eq!(vcek_from_cert_table(&table[..30]), None, "truncated");
        let mut bad_len = table;
        bad_len[44..48].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(vcek_from_cert_table(&bad_len), None, "length past the end");
    }
}

/// How long until the next attestation, given a result expiring at `expires_at` (the
/// gateway's clock, seconds since the epoch) and at most `max_interval`: two thirds of
/// the result's remaining life as this device's clock sees it. A result that looks
/// expired already, or nearly so, says that this device's clock is ahead of the
/// gateway's (a result is issued for far longer): then `max_interval` alone is used, so
/// that a device with a wrong clock does not attest again every few seconds.
pub fn reattest_in(expires_at: i64, max_interval: Duration) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    reattest_in_at(expires_at, now, max_interval)
}

/// [`reattest_in`] at `now`.
pub fn reattest_in_at(expires_at: i64, now: i64, max_interval: Duration) -> Duration {
    let remaining = expires_at.saturating_sub(now);
    if remaining < MIN_PLAUSIBLE_RESULT_LIFE {
        tracing::warn!(
            expires_at,
            now,
            "ClockSkew: the attestation result looks expired by this device's clock; is the clock ahead of the gateway's? Attesting again within the interval"
        );
        return max_interval;
    }
    Duration::from_secs(u64::try_from(remaining * 2 / 3).unwrap_or(0)).min(max_interval)
}

/// Less remaining life than this on a result just issued is this device's clock, not
/// the result (results live for minutes to hours).
const MIN_PLAUSIBLE_RESULT_LIFE: i64 = 30;

#[cfg(test)]
mod reattest_tests {
    use super::*;

    #[test]
    fn a_device_attests_again_at_two_thirds_of_the_result_and_a_clock_ahead_does_not_loop() {
        let hour = Duration::from_secs(3600);
        // In step with the gateway: two thirds of the remaining life, within the cap.
        assert_eq!(
            reattest_in_at(1_000 + 3600, 1_000, hour),
            Duration::from_secs(2400)
        );
        assert_eq!(
            reattest_in_at(1_000 + 3600, 1_000, Duration::from_secs(600)),
            Duration::from_secs(600)
        );
        // A clock an hour ahead sees the result as expired: the interval, not seconds.
        assert_eq!(reattest_in_at(1_000 + 3600, 1_000 + 7200, hour), hour);
        assert_eq!(reattest_in_at(1_000 + 3600, 1_000 + 3590, hour), hour);
        // A clock behind sees a longer life: still capped.
        assert_eq!(reattest_in_at(1_000 + 3600, 1_000 - 7200, hour), hour);
    }
}
