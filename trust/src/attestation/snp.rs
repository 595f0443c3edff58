//! AMD SEV-SNP attestation reports (versions 2 and 3).
//!
//! Checks, in order: layout and version; the ECDSA P-384 signature over bytes
//! [0, 0x2A0) by the VCEK (or VLEK); the chain VCEK → ASK → ARK (or VLEK → ASVK → ARK)
//! to the pinned roots of the CPU generation, at `now`; the certificate's TCB against
//! the report's reported TCB (rollback); the chip id; the debug policy bit; and, when
//! given, the expected report data.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::json;
use x509_parser::certificate::X509Certificate;

use super::{
    AttestationError, Bytes, Claims, TeeKind, asn1_time, check_issued_by, check_validity, der,
    parse_cert,
};

/// Size of an attestation report.
pub const REPORT_LEN: usize = 0x4A0;
/// The signed part.
const SIGNED_LEN: usize = 0x2A0;
/// Guest policy bit: debugging allowed.
const POLICY_DEBUG: u64 = 1 << 19;
/// Guest policy bit: migration agent allowed.
const POLICY_MIGRATE_MA: u64 = 1 << 18;
/// Guest policy bit: SMT allowed.
const POLICY_SMT: u64 = 1 << 16;

/// Pinned roots for one CPU generation (Milan, Genoa, …).
#[derive(Debug, Clone)]
pub struct SnpRoots {
    /// Generation name, for messages (e.g. `Milan`).
    pub generation: String,
    /// AMD Root Key, DER.
    pub ark: Vec<u8>,
    /// AMD SEV Key (issues VCEKs), DER.
    pub ask: Vec<u8>,
    /// AMD SEV VLEK key (issues VLEKs), DER, if VLEK reports are accepted.
    pub asvk: Option<Vec<u8>>,
    /// Certificate signatures already verified under these roots.
    verified: VerifiedSignatures,
}

/// Certificate signatures that verified, by SHA-256 over (child, issuer) DER, so that a
/// device re-attesting with the same VCEK costs no RSA-4096 checks: a device's VCEK
/// changes only with its TCB. Names, validity at `now` and the TCB are still checked on
/// every report; only the signature check is remembered. Bounded: cleared when full.
#[derive(Debug, Clone, Default)]
struct VerifiedSignatures(std::sync::Arc<std::sync::Mutex<std::collections::HashSet<[u8; 32]>>>);

/// How many (child, issuer) pairs are remembered: a fleet's VCEKs, with room to spare.
const VERIFIED_CAPACITY: usize = 65_536;

impl VerifiedSignatures {
    fn issued_by(
        &self,
        child_der: &[u8],
        child: &x509_parser::certificate::X509Certificate<'_>,
        issuer_der: &[u8],
        issuer: &x509_parser::certificate::X509Certificate<'_>,
    ) -> Result<(), AttestationError> {
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        h.update((child_der.len() as u64).to_le_bytes());
        h.update(child_der);
        h.update(issuer_der);
        let key: [u8; 32] = h.finalize().into();
        if self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
        {
            return Ok(());
        }
        check_issued_by(child, issuer)?;
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() >= VERIFIED_CAPACITY {
            set.clear();
        }
        set.insert(key);
        Ok(())
    }
}

impl SnpRoots {
    /// Reads the ASK, ARK and optional ASVK from a PEM bundle in any order, telling them
    /// apart by subject CN (`ARK-*`, `SEV-VLEK-*`, `SEV-*`).
    pub fn from_pem(generation: &str, pem: &[u8]) -> Result<Self, AttestationError> {
        let (mut ark, mut ask, mut asvk) = (None, None, None);
        for der in super::pem_certificates(pem)? {
            let cert = parse_cert(&der, "AMD root bundle")?;
            let cn = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|c| c.as_str().ok())
                .unwrap_or("")
                .to_owned();
            if cn.starts_with("ARK-") {
                ark = Some(der);
            } else if cn.starts_with("SEV-VLEK-") {
                asvk = Some(der);
            } else if cn.starts_with("SEV-") {
                ask = Some(der);
            }
        }
        Ok(Self {
            generation: generation.to_owned(),
            ark: ark.ok_or_else(|| {
                AttestationError::ChainInvalid("no ARK in the root bundle".into())
            })?,
            ask: ask.ok_or_else(|| {
                AttestationError::ChainInvalid("no ASK in the root bundle".into())
            })?,
            asvk,
            verified: VerifiedSignatures::default(),
        })
    }
}

/// Verifier options.
#[derive(Debug, Clone, Default)]
pub struct SnpOptions {
    /// Accept reports whose guest policy allows debugging (never in production).
    pub allow_debug: bool,
    /// The report data the attester must have bound (64 bytes).
    pub expected_report_data: Option<Vec<u8>>,
}

/// A TCB version (Milan/Genoa layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tcb {
    /// Boot loader SPL.
    pub bootloader: u8,
    /// TEE (PSP OS) SPL.
    pub tee: u8,
    /// SNP firmware SPL.
    pub snp: u8,
    /// Microcode SPL.
    pub microcode: u8,
}

impl Tcb {
    fn from_u64(v: u64) -> Self {
        let b = v.to_le_bytes();
        Self {
            bootloader: b[0],
            tee: b[1],
            snp: b[6],
            microcode: b[7],
        }
    }

    fn components(&self) -> [(&'static str, u8); 4] {
        [
            ("bootloader", self.bootloader),
            ("tee", self.tee),
            ("snp", self.snp),
            ("microcode", self.microcode),
        ]
    }
}

/// The certificate must be for exactly the TCB the report claims: a lower reported
/// value is a rollback, a higher one means the certificate belongs to another TCB.
pub fn check_tcb(reported: &Tcb, certified: &Tcb) -> Result<(), AttestationError> {
    for ((name, r), (_, c)) in reported
        .components()
        .into_iter()
        .zip(certified.components())
    {
        if r != c {
            return Err(AttestationError::TcbMismatch {
                component: name,
                reported: r.into(),
                certified: c.into(),
            });
        }
    }
    Ok(())
}

const OID_BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_HWID: &str = "1.3.6.1.4.1.3704.1.4";
const OID_PRODUCT: &str = "1.3.6.1.4.1.3704.1.2";

fn ext<'a>(cert: &'a X509Certificate<'_>, oid: &str) -> Option<&'a [u8]> {
    cert.extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == oid)
        .map(|e| e.value)
}

fn cert_tcb(cert: &X509Certificate<'_>) -> Result<Tcb, AttestationError> {
    let get = |oid: &str, name: &str| -> Result<u8, AttestationError> {
        ext(cert, oid)
            .and_then(der::integer)
            .and_then(|v| u8::try_from(v).ok())
            .ok_or_else(|| AttestationError::MalformedCertificate {
                which: "VCEK".into(),
                reason: format!("missing or bad {name} SPL extension {oid}"),
            })
    };
    Ok(Tcb {
        bootloader: get(OID_BL_SPL, "boot loader")?,
        tee: get(OID_TEE_SPL, "TEE")?,
        snp: get(OID_SNP_SPL, "SNP")?,
        microcode: get(OID_UCODE_SPL, "microcode")?,
    })
}

/// Turns a little-endian 72-byte field into a big-endian 48-byte P-384 scalar.
fn le_scalar(field: &[u8]) -> Result<[u8; 48], AttestationError> {
    if field[48..].iter().any(|&b| b != 0) {
        return Err(AttestationError::SignatureInvalid(
            "signature component exceeds 384 bits".into(),
        ));
    }
    let mut out = [0u8; 48];
    for (o, i) in out.iter_mut().zip(field[..48].iter().rev()) {
        *o = *i;
    }
    Ok(out)
}

/// Verifies an SNP report with its VCEK/VLEK (DER) against the pinned roots.
pub fn verify(
    report: &[u8],
    vcek_der: &[u8],
    roots: &[SnpRoots],
    now: SystemTime,
    options: &SnpOptions,
) -> Result<Claims, AttestationError> {
    let r = Bytes::new(report, "SNP report");
    if report.len() != REPORT_LEN {
        return Err(AttestationError::Truncated {
            what: "SNP report",
            need: REPORT_LEN,
            have: report.len(),
        });
    }
    let version = r.u32_le(0x00)?;
    if !(2..=3).contains(&version) {
        return Err(AttestationError::Unsupported(format!(
            "SNP report version {version}"
        )));
    }
    let sig_algo = r.u32_le(0x34)?;
    if sig_algo != 1 {
        return Err(AttestationError::Unsupported(format!(
            "SNP signature algorithm {sig_algo} (only 1, ECDSA P-384)"
        )));
    }
    let policy = r.u64_le(0x08)?;
    let key_info = r.u32_le(0x48)?;
    let signing_key = (key_info >> 2) & 0b111;
    let mask_chip_id = key_info & 0b10 != 0;

    // Signature by the VCEK/VLEK.
    let now_asn1 = asn1_time(now)?;
    let vcek = parse_cert(vcek_der, "VCEK")?;
    let point = vcek.public_key().subject_public_key.data.as_ref();
    if point.len() != 97 || point[0] != 0x04 {
        return Err(AttestationError::MalformedCertificate {
            which: "VCEK".into(),
            reason: "not an uncompressed P-384 key".into(),
        });
    }
    let mut sig = [0u8; 96];
    sig[..48].copy_from_slice(&le_scalar(r.slice(SIGNED_LEN, 72)?)?);
    sig[48..].copy_from_slice(&le_scalar(r.slice(SIGNED_LEN + 72, 72)?)?);
    // AWS-LC's P-384 is 3.8x ring's and 5x the pure-Rust one here (BENCHMARKS.md); the
    // gateway verifies a report per device per attestation interval.
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED,
        point,
    )
    .verify(&report[..SIGNED_LEN], &sig)
    .map_err(|_| AttestationError::SignatureInvalid("SNP report signature by the VCEK".into()))?;

    // Chain to the pinned roots of the generation whose ASK (or ASVK) issued the key.
    let (via, gen_name) = {
        let mut found = None;
        for generation in roots {
            let issuer_der = match signing_key {
                0 => Some(&generation.ask),
                1 => generation.asvk.as_ref(),
                other => {
                    return Err(AttestationError::Unsupported(format!(
                        "SNP signing key selector {other}"
                    )));
                }
            };
            let Some(issuer_der) = issuer_der else {
                continue;
            };
            let issuer = parse_cert(issuer_der, "pinned ASK/ASVK")?;
            if vcek.issuer() == issuer.subject() {
                found = Some((generation, issuer_der.clone()));
                break;
            }
        }
        let (generation, issuer_der) = found.ok_or_else(|| {
            AttestationError::ChainInvalid(format!(
                "no pinned AMD root issued {} (issuer {})",
                vcek.subject(),
                vcek.issuer()
            ))
        })?;
        (issuer_der, generation)
    };
    let issuer = parse_cert(&via, "pinned ASK/ASVK")?;
    let ark = parse_cert(&gen_name.ark, "pinned ARK")?;
    let verified = &gen_name.verified;
    verified.issued_by(vcek_der, &vcek, &via, &issuer)?;
    verified.issued_by(&via, &issuer, &gen_name.ark, &ark)?;
    verified.issued_by(&gen_name.ark, &ark, &gen_name.ark, &ark)?;
    for cert in [&vcek, &issuer, &ark] {
        check_validity(cert, now_asn1)?;
    }

    // TCB: the key is derived for one TCB; the report must claim exactly that one.
    let reported = Tcb::from_u64(r.u64_le(0x180)?);
    check_tcb(&reported, &cert_tcb(&vcek)?)?;

    let chip_id = r.slice(0x1A0, 64)?;
    if signing_key == 0 && !mask_chip_id {
        let hwid = ext(&vcek, OID_HWID).map(der::octets_or_raw);
        if hwid != Some(chip_id) {
            return Err(AttestationError::ChainInvalid(
                "VCEK hwID does not match the report's chip id".into(),
            ));
        }
    }

    let debug = policy & POLICY_DEBUG != 0;
    if debug && !options.allow_debug {
        return Err(AttestationError::DebugEnabled);
    }
    let report_data = r.slice(0x50, 64)?;
    let key_binding = super::check_binding(options.expected_report_data.as_deref(), report_data)?;

    let mut measurements = BTreeMap::new();
    measurements.insert(
        "launch_measurement".to_owned(),
        hex::encode(r.slice(0x90, 48)?),
    );
    measurements.insert("host_data".to_owned(), hex::encode(r.slice(0xC0, 32)?));
    measurements.insert("id_key_digest".to_owned(), hex::encode(r.slice(0xE0, 48)?));
    measurements.insert(
        "author_key_digest".to_owned(),
        hex::encode(r.slice(0x110, 48)?),
    );
    let mut tcb = BTreeMap::new();
    for (name, v) in reported.components() {
        tcb.insert(name.to_owned(), json!(v));
    }
    tcb.insert("guest_svn".into(), json!(r.u32_le(0x04)?));
    let product = ext(&vcek, OID_PRODUCT)
        .map(|v| {
            String::from_utf8_lossy(v)
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .collect::<String>()
        })
        .unwrap_or_default();
    let mut platform = BTreeMap::new();
    platform.insert("report_version".into(), json!(version));
    platform.insert("generation".into(), json!(gen_name.generation));
    platform.insert("product".into(), json!(product));
    platform.insert("vmpl".into(), json!(r.u32_le(0x30)?));
    platform.insert("policy".into(), json!(format!("{policy:#x}")));
    platform.insert("migrate_ma".into(), json!(policy & POLICY_MIGRATE_MA != 0));
    platform.insert("smt".into(), json!(policy & POLICY_SMT != 0));
    platform.insert(
        "signing_key".into(),
        json!(if signing_key == 0 { "vcek" } else { "vlek" }),
    );
    platform.insert("family_id".into(), json!(hex::encode(r.slice(0x10, 16)?)));
    platform.insert("image_id".into(), json!(hex::encode(r.slice(0x20, 16)?)));

    Ok(Claims {
        tee: TeeKind::SevSnp,
        hardware_genuine: true,
        debug,
        measurements,
        tcb,
        report_data: hex::encode(report_data),
        key_binding,
        signer: hex::encode(chip_id),
        platform,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcb_must_match_exactly() {
        let cert = Tcb {
            bootloader: 3,
            tee: 0,
            snp: 8,
            microcode: 115,
        };
        assert!(check_tcb(&cert, &cert).is_ok());
        let rollback = Tcb {
            microcode: 114,
            ..cert
        };
        let err = check_tcb(&rollback, &cert).unwrap_err();
        assert!(matches!(
            err,
            AttestationError::TcbMismatch {
                component: "microcode",
                reported: 114,
                certified: 115
            }
        ));
        let other = Tcb { snp: 9, ..cert };
        assert!(matches!(
            check_tcb(&other, &cert),
            Err(AttestationError::TcbMismatch {
                component: "snp",
                ..
            })
        ));
    }

    #[test]
    fn tcb_layout_is_milan_genoa() {
        let t = Tcb::from_u64(u64::from_le_bytes([3, 0, 0, 0, 0, 0, 8, 0x73]));
        assert_eq!(
            t,
            Tcb {
                bootloader: 3,
                tee: 0,
                snp: 8,
                microcode: 0x73
            }
        );
    }
}
