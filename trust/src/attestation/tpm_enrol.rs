//! TPM attestation-key enrolment, verifier side: the EK certificate chain to a
//! configured EK CA, the AK's public area (it must be a restricted signing key that
//! never leaves its TPM), and TPM2_MakeCredential done in software, so that a gateway
//! without a TPM can challenge the device to prove the AK lives beside that EK
//! (TPM2_ActivateCredential on the device returns the secret only if so).
//!
//! References: TPM 2.0 Library Part 1, §24 (credential protection) and §11.4.9 (KDFa);
//! Part 2, §12.2 (TPMT_PUBLIC).

use std::time::SystemTime;

use hmac::{Hmac, Mac as _};
use rsa::pkcs8::DecodePublicKey as _;
use sha2::{Digest as _, Sha256};

use super::{AttestationError, asn1_time, check_issued_by, check_validity, parse_cert};

const TPM_ALG_RSA: u16 = 0x0001;
const TPM_ALG_SHA256: u16 = 0x000B;
const TPM_ALG_NULL: u16 = 0x0010;

const ATTR_FIXED_TPM: u32 = 1 << 1;
const ATTR_FIXED_PARENT: u32 = 1 << 4;
const ATTR_SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
const ATTR_RESTRICTED: u32 = 1 << 16;
const ATTR_DECRYPT: u32 = 1 << 17;
const ATTR_SIGN: u32 = 1 << 18;

/// What the verifier learns from an AK's TPMT_PUBLIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AkPublic {
    /// The TPM name: nameAlg ‖ SHA-256(TPMT_PUBLIC).
    pub name: Vec<u8>,
    /// RSA modulus (big-endian).
    pub modulus: Vec<u8>,
    /// RSA public exponent.
    pub exponent: u32,
}

/// The next `n` bytes of a TPMT_PUBLIC at `at`, which moves past them.
fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> Result<&'a [u8], AttestationError> {
    let s = b.get(*at..*at + n).ok_or(AttestationError::Truncated {
        what: "TPMT_PUBLIC",
        need: *at + n,
        have: b.len(),
    })?;
    *at += n;
    Ok(s)
}

fn be16(b: &[u8], at: &mut usize) -> Result<u16, AttestationError> {
    let s = take(b, at, 2)?;
    Ok(u16::from_be_bytes([s[0], s[1]]))
}

fn be32(b: &[u8], at: &mut usize) -> Result<u32, AttestationError> {
    let s = take(b, at, 4)?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn tpm2b<'a>(b: &'a [u8], at: &mut usize) -> Result<&'a [u8], AttestationError> {
    let n = usize::from(be16(b, at)?);
    take(b, at, n)
}

/// Parses an RSA AK's TPMT_PUBLIC and checks it is an attestation key: restricted,
/// signing only, fixedTPM, fixedParent, generated inside the TPM.
pub fn parse_ak_public(tpmt_public: &[u8]) -> Result<AkPublic, AttestationError> {
    let mut at = 0;
    let ty = be16(tpmt_public, &mut at)?;
    let name_alg = be16(tpmt_public, &mut at)?;
    let attrs = be32(tpmt_public, &mut at)?;
    let _auth_policy = tpm2b(tpmt_public, &mut at)?;
    if ty != TPM_ALG_RSA {
        return Err(AttestationError::Unsupported(format!(
            "AK type {ty:#x} (only RSA)"
        )));
    }
    if name_alg != TPM_ALG_SHA256 {
        return Err(AttestationError::Unsupported(format!(
            "AK name algorithm {name_alg:#x} (only SHA-256)"
        )));
    }
    let required = ATTR_FIXED_TPM
        | ATTR_FIXED_PARENT
        | ATTR_SENSITIVE_DATA_ORIGIN
        | ATTR_RESTRICTED
        | ATTR_SIGN;
    if attrs & required != required || attrs & ATTR_DECRYPT != 0 {
        return Err(AttestationError::Malformed(format!(
            "AK attributes {attrs:#010x} are not those of a restricted, TPM-bound signing key"
        )));
    }
    // TPMS_RSA_PARMS: symmetric (NULL for a signing key), scheme, keyBits, exponent.
    let sym = be16(tpmt_public, &mut at)?;
    if sym != TPM_ALG_NULL {
        return Err(AttestationError::Malformed(
            "AK has a symmetric algorithm (a storage key?)".into(),
        ));
    }
    let scheme = be16(tpmt_public, &mut at)?;
    if scheme != TPM_ALG_NULL {
        let _scheme_hash = be16(tpmt_public, &mut at)?;
    }
    let _key_bits = be16(tpmt_public, &mut at)?;
    let exponent = match be32(tpmt_public, &mut at)? {
        0 => 65_537,
        e => e,
    };
    let modulus = tpm2b(tpmt_public, &mut at)?.to_vec();
    if at != tpmt_public.len() {
        return Err(AttestationError::Malformed(
            "trailing bytes after TPMT_PUBLIC".into(),
        ));
    }
    let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
    name.extend(Sha256::digest(tpmt_public));
    Ok(AkPublic {
        name,
        modulus,
        exponent,
    })
}

/// The AK as SubjectPublicKeyInfo DER, for [`super::tpm::TpmEvidence::ak_public`].
pub fn ak_spki_der(ak: &AkPublic) -> Result<Vec<u8>, AttestationError> {
    use rsa::pkcs8::EncodePublicKey as _;
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(&ak.modulus),
        rsa::BigUint::from(ak.exponent),
    )
    .map_err(|e| AttestationError::Malformed(format!("AK RSA key: {e}")))?;
    Ok(key
        .to_public_key_der()
        .map_err(|e| AttestationError::Malformed(e.to_string()))?
        .into_vec())
}

/// Verifies an EK certificate against the EK CA (root, DER) with optional
/// intermediates, at `now`, and returns the EK's SubjectPublicKeyInfo DER.
///
/// EK certificates carry a critical SAN made of a directory name (TPM manufacturer,
/// model, version) and the EK EKU 2.23.133.8.1; both are accepted.
pub fn verify_ek_certificate(
    ek_cert: &[u8],
    intermediates: &[Vec<u8>],
    ek_ca: &[u8],
    now: SystemTime,
) -> Result<Vec<u8>, AttestationError> {
    let now = asn1_time(now)?;
    let leaf = parse_cert(ek_cert, "EK certificate")?;
    let root = parse_cert(ek_ca, "EK CA")?;
    let inters = intermediates
        .iter()
        .map(|d| parse_cert(d, "EK intermediate"))
        .collect::<Result<Vec<_>, _>>()?;
    check_validity(&leaf, now)?;
    let mut current = &leaf;
    for _ in 0..=inters.len() {
        if check_issued_by(current, &root).is_ok() {
            check_validity(&root, now)?;
            return Ok(leaf.public_key().raw.to_vec());
        }
        let next = inters
            .iter()
            .find(|i| check_issued_by(current, i).is_ok())
            .ok_or_else(|| {
                AttestationError::ChainInvalid(format!(
                    "no EK CA or intermediate issued {}",
                    current.subject()
                ))
            })?;
        check_validity(next, now)?;
        current = next;
    }
    Err(AttestationError::ChainInvalid(
        "EK chain does not reach the EK CA".into(),
    ))
}

/// KDFa with SHA-256 (Part 1, §11.4.9.2).
fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut counter: u32 = 1;
    while out.len() * 8 < bits as usize {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
            break;
        };
        mac.update(&counter.to_be_bytes());
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend(mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(bits as usize / 8);
    out
}

/// TPM2_MakeCredential in software for an RSA-2048 EK (AES-128-CFB, SHA-256).
/// Returns (TPM2B_ID_OBJECT contents, TPM2B_ENCRYPTED_SECRET contents).
pub fn make_credential(
    ek_spki: &[u8],
    ak_name: &[u8],
    credential: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), AttestationError> {
    use cfb_mode::cipher::{AsyncStreamCipher as _, KeyIvInit as _};
    use rand_core::RngCore as _;
    if credential.is_empty() || credential.len() > 32 {
        return Err(AttestationError::Malformed(
            "credential must be 1 to 32 bytes".into(),
        ));
    }
    let ek = rsa::RsaPublicKey::from_public_key_der(ek_spki)
        .map_err(|e| AttestationError::Unsupported(format!("EK is not an RSA key: {e}")))?;
    let mut seed = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut seed);
    let secret = ek
        .encrypt(
            &mut rand_core::OsRng,
            rsa::Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
            &seed,
        )
        .map_err(|e| AttestationError::Malformed(format!("encrypting the seed to the EK: {e}")))?;

    let sym_key = kdfa(&seed, "STORAGE", ak_name, &[], 128);
    let mut enc_identity = (credential.len() as u16).to_be_bytes().to_vec();
    enc_identity.extend_from_slice(credential);
    let key: [u8; 16] = sym_key
        .as_slice()
        .try_into()
        .map_err(|_| AttestationError::Malformed("KDFa".into()))?;
    cfb_mode::Encryptor::<aes::Aes128>::new(&key.into(), &[0u8; 16].into())
        .encrypt(&mut enc_identity);

    let hmac_key = kdfa(&seed, "INTEGRITY", &[], &[], 256);
    let mut mac = Hmac::<Sha256>::new_from_slice(&hmac_key)
        .map_err(|_| AttestationError::Malformed("HMAC key".into()))?;
    mac.update(&enc_identity);
    mac.update(ak_name);
    let integrity = mac.finalize().into_bytes();

    let mut id_object = (integrity.len() as u16).to_be_bytes().to_vec();
    id_object.extend_from_slice(&integrity);
    id_object.extend_from_slice(&enc_identity);
    Ok((id_object, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_lengths_and_inputs() {
        assert_eq!(kdfa(b"k", "STORAGE", b"n", &[], 128).len(), 16);
        assert_eq!(kdfa(b"k", "INTEGRITY", &[], &[], 256).len(), 32);
        assert_eq!(kdfa(b"k", "X", &[], &[], 512).len(), 64);
        assert_ne!(
            kdfa(b"k", "STORAGE", b"n1", &[], 128),
            kdfa(b"k", "STORAGE", b"n2", &[], 128)
        );
    }

    fn ak_public(attrs: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(TPM_ALG_RSA.to_be_bytes());
        v.extend(TPM_ALG_SHA256.to_be_bytes());
        v.extend(attrs.to_be_bytes());
        v.extend(0u16.to_be_bytes());
        v.extend(TPM_ALG_NULL.to_be_bytes());
        v.extend(0x0014u16.to_be_bytes());
        v.extend(TPM_ALG_SHA256.to_be_bytes());
        v.extend(2048u16.to_be_bytes());
        v.extend(0u32.to_be_bytes());
        v.extend(256u16.to_be_bytes());
        v.extend([0xc5; 256]);
        v
    }

    #[test]
    fn only_restricted_tpm_bound_signing_keys_are_aks() {
        let good = ATTR_FIXED_TPM
            | ATTR_FIXED_PARENT
            | ATTR_SENSITIVE_DATA_ORIGIN
            | ATTR_RESTRICTED
            | ATTR_SIGN;
        let ak = parse_ak_public(&ak_public(good)).unwrap();
        assert_eq!(ak.exponent, 65_537);
        assert_eq!(ak.name.len(), 34);
        for bad in [
            good & !ATTR_RESTRICTED,
            good & !ATTR_FIXED_TPM,
            good | ATTR_DECRYPT,
            good & !ATTR_SENSITIVE_DATA_ORIGIN,
        ] {
            assert_eq!(
                parse_ak_public(&ak_public(bad)).unwrap_err().reason(),
                "Malformed",
                "{bad:#x}"
            );
        }
        let mut truncated = ak_public(good);
        truncated.truncate(100);
        assert_eq!(
            parse_ak_public(&truncated).unwrap_err().reason(),
            "Truncated"
        );
    }
}
