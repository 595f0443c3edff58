//! Hostile and malformed input, one per case, fed to the real parsers and verifiers:
//! recorded genuine evidence and model-signing bundles (the fixtures directory beside the checkout, see its
//! README) with one thing wrong, and hand-made bytes. Every case must be refused with its
//! own named reason (`reason()` of the error, or the variant's name where the error type
//! has no `reason()`), never accepted and never by a panic. Where a parser's only answer
//! is `None` or `false` (bootstrap tokens, name patterns), that is the refusal checked.
//! Each table first checks that the unedited input is accepted, so that every refusal is
//! the edit's. No cluster, no device and no network: these run anywhere; the one test
//! that needs the wasm plugins built by scripts/test says so.
//!
//! Cases (name — expected reason), by surface:
//!
//! Attestation evidence (118 cases):
//! - `snp_reports_are_refused_by_name`:
//!   - SNP report one byte short: Truncated
//!   - SNP report cut to 1000 bytes: Truncated
//!   - SNP report with a byte appended: Truncated
//!   - SNP report of version 1: Unsupported
//!   - SNP report of version 9: Unsupported
//!   - SNP report naming a signature algorithm other than ECDSA P-384: Unsupported
//!   - SNP report with a flipped guest policy byte: SignatureInvalid
//!   - SNP report with a flipped report data byte: SignatureInvalid
//!   - SNP report with a flipped measurement byte: SignatureInvalid
//!   - SNP report with a flipped reported TCB byte: SignatureInvalid
//!   - SNP report with a flipped signature byte: SignatureInvalid
//!   - SNP signature component wider than 384 bits: SignatureInvalid
//!   - SNP report bound to another nonce: ReportDataMismatch
//!   - SNP VCEK that is not a certificate: MalformedCertificate
//!   - SNP VCEK that is empty: MalformedCertificate
//!   - SNP VCEK of another chip: SignatureInvalid
//!   - SNP VCEK with a flipped signature byte: ChainInvalid
//!   - SNP pinned ASK with a flipped signature byte: ChainInvalid
//!   - SNP chain to a same-named impostor AMD root: ChainInvalid
//!   - SNP report with no AMD roots pinned: ChainInvalid
//!   - SNP chain checked after it expired: CertificateNotValidAt
//!   - SNP report from a debuggable guest: DebugEnabled
//! - `tdx_quotes_are_refused_by_name`:
//!   - TDX quote that is empty: Truncated
//!   - TDX quote cut off in the body: Truncated
//!   - TDX quote of version 3: Unsupported
//!   - TDX quote with an attestation key type other than P-256: Unsupported
//!   - TDX quote from an SGX enclave rather than a TD: Unsupported
//!   - TDX v5 quote with an unknown body type: Unsupported
//!   - TDX v5 body size not that of its type: Malformed
//!   - TDX signature data longer than the quote: Truncated
//!   - TDX quote with a flipped header byte: SignatureInvalid
//!   - TDX quote with a flipped MRTD byte: SignatureInvalid
//!   - TDX quote with a flipped report data byte: SignatureInvalid
//!   - TDX quote with a flipped signature byte: SignatureInvalid
//!   - TDX attestation key that is not a P-256 point: Malformed
//!   - TDX certification data of another type: Unsupported
//!   - TDX certification data longer than the quote: Truncated
//!   - TDX QE report with a flipped byte: SignatureInvalid
//!   - TDX QE report signature with a flipped byte: SignatureInvalid
//!   - TDX QE authentication data altered: QeBindingMismatch
//!   - TDX PCK chain with a flipped byte: ChainInvalid
//!   - TDX quote checked against another vendor's root: ChainInvalid
//!   - TDX quote checked against a same-named impostor Intel root: ChainInvalid
//!   - TDX pinned root that is not a certificate: MalformedCertificate
//!   - TDX PCK chain checked after it expired: CertificateNotValidAt
//!   - TDX quote bound to another nonce: ReportDataMismatch
//!   - TDX quote from a debuggable TD: DebugEnabled
//! - `tpm_quotes_and_enrolment_are_refused_by_name`:
//!   - TPM quote message with a flipped byte: SignatureInvalid
//!   - TPM quote signature with a flipped byte: SignatureInvalid
//!   - TPM AK public key with a flipped byte: SignatureInvalid
//!   - TPM AK public key that is not base64: Malformed
//!   - TPM quote message that is not base64: Malformed
//!   - TPM quote signature that is not base64: Malformed
//!   - TPM AK public key that is not a key: Malformed
//!   - TPM quote signature cut to 3 bytes: Truncated
//!   - TPM quote signature of an unknown scheme: Unsupported
//!   - TPM RSA quote signature over SHA-1: Unsupported
//!   - TPM quote over another nonce: ReportDataMismatch
//!   - TPM PCR value altered: PcrDigestMismatch
//!   - TPM PCR value of 31 bytes: Malformed
//!   - TPM PCR value of 48 bytes (SHA-384 length): Malformed
//!   - TPM PCR value that is not hex: Malformed
//!   - TPM quote selecting PCRs it does not report: Malformed
//!   - TPM reset count behind the previous quote's: ClockRollback
//!   - TPM clock behind the previous quote's: ClockRollback
//!   - TPM quote whose clock is not safe: ClockNotSafe
//!   - TPM quote over the SHA-1 PCR bank: Unsupported
//!   - TPM attestation of another type than a quote: Unsupported
//!   - TPM attestation without TPM_GENERATED_VALUE: Malformed
//!   - TPM attestation with 17 PCR selections: Malformed
//!   - TPM attestation with a 5-byte PCR select: Malformed
//!   - TPM attestation with trailing bytes: Malformed
//!   - TPM attestation cut short: Truncated
//!   - TPM AK public area cut to 2 bytes: Truncated
//!   - TPM AK public area of an ECC key: Unsupported
//!   - TPM AK public area named with SHA-1: Unsupported
//!   - TPM AK that may decrypt (a storage key): Malformed
//!   - TPM AK that is not fixed to its TPM: Malformed
//!   - TPM AK public area with trailing bytes: Malformed
//!   - TPM EK certificate that is not a certificate: MalformedCertificate
//!   - TPM EK certificate from another CA: ChainInvalid
//! - `dev_evidence_is_refused_by_name`:
//!   - Dev public key that is not base64: Malformed
//!   - Dev report data that is not hex: Malformed
//!   - Dev signature that is not base64: Malformed
//!   - Dev public key that is not a key: Malformed
//!   - Dev public key on P-384: Malformed
//!   - Dev signature that is not DER: SignatureInvalid
//!   - Dev evidence signed by another key: SignatureInvalid
//!   - Dev report data changed after signing: SignatureInvalid
//!   - Dev evidence bound to another nonce: ReportDataMismatch
//! - `attestation_service_inputs_are_refused_by_name`:
//!   - Challenge for an empty device name: BadRequest
//!   - Challenge for a device name of 254 characters: BadRequest
//!   - Challenge with an agent key that is not base64: BadRequest
//!   - Challenge with an agent key that is not a SubjectPublicKeyInfo: BadRequest
//!   - Challenge with an agent key of 4 KiB: BadRequest
//!   - TPM challenge without EK certificate and AK: BadRequest
//!   - TPM challenge with an EK certificate that is not base64: BadRequest
//!   - TPM challenge with an EK from no configured EK CA: ChainInvalid
//!   - Evidence answering a nonce that was never issued: UnknownNonce
//!   - Evidence answering an edited nonce: UnknownNonce
//!   - Evidence with a nonce that is not base64: BadRequest
//!   - Evidence after its challenge expired: UnknownNonce
//!   - Evidence for another device than its challenge: ChallengeMismatch
//!   - Evidence of another kind than its challenge: ChallengeMismatch
//!   - Evidence with a CSR that is not PEM: InvalidCsr
//!   - Evidence with a CSR for another key: InvalidCsr
//!   - SNP evidence whose report is not base64: BadRequest
//!   - Genuine SNP report not bound to the challenge: ReportDataMismatch
//!   - Genuine TDX quote not bound to the challenge: ReportDataMismatch
//!   - Dev evidence bound to another challenge: ReportDataMismatch
//!   - Claims JSON that is not JSON: Eval
//!   - Policy reference data that is not JSON: Data
//!   - Policy that does not compile: Compile
//!   - Attestation result that is not a compact JWS: Malformed
//!   - Attestation result with alg none: Unsupported
//!   - Attestation result with a forged payload: SignatureInvalid
//!   - Attestation result signed by another key: SignatureInvalid
//!   - Attestation result past its exp: Malformed
//!
//! Model-signing bundles (49 cases):
//! - `model_signing_bundles_are_refused_by_name`:
//!   - Bundle that is not JSON: MalformedBundle
//!   - Bundle that is empty: MalformedBundle
//!   - Bundle larger than 16 MiB: MalformedBundle
//!   - Bundle JSON of another shape: MalformedBundle
//!   - Bundle with an unknown media type: UnsupportedMediaType
//!   - Bundle without a DSSE envelope: NoEnvelope
//!   - DSSE envelope with two signatures: SignatureCount
//!   - DSSE envelope with no signature: SignatureCount
//!   - DSSE payload type other than in-toto: UnsupportedPayloadType
//!   - DSSE payload that is not base64: MalformedPayload
//!   - DSSE signature that is not base64: MalformedPayload
//!   - DSSE signature with a flipped byte: SignatureInvalid
//!   - DSSE payload edited after signing: SignatureInvalid
//!   - Bundle without verification material: NoVerificationMaterial
//!   - Key-mode bundle verified against another pinned key: UntrustedSigner
//!   - Key-mode bundle without a key hint, signed by no pinned key: SignatureInvalid
//!   - Key-mode bundle where only a root is pinned: UntrustedSigner
//!   - Model file changed after signing: DigestMismatch
//!   - Model file the signature does not cover: ExtraFiles
//!   - Signed model file missing: MissingFiles
//!   - Certificate-mode bundle where only keys are pinned: UntrustedSigner
//!   - Certificate-mode bundle after its certificates expired: CertificateNotValidAt
//!   - Certificate-mode leaf matching no pinned identity: IdentityMismatch
//!   - Certificate-mode chain with its intermediate removed: UntrustedChain
//!   - Certificate-mode leaf with a byte appended: MalformedCertificate
//!   - Certificate-mode leaf that is not a certificate: MalformedCertificate
//!   - Certificate-mode leaf that is not base64: MalformedPayload
//!   - Pinned public key that is a certificate PEM: MalformedKey
//!   - Pinned public key that is not PEM: MalformedKey
//!   - Pinned public key that is not an ECDSA key: UnsupportedKey
//! - `signed_but_hostile_statements_are_refused_by_name`:
//!   - Signed payload that is not JSON: MalformedPayload
//!   - Statement of another in-toto type: UnsupportedStatementType
//!   - Statement with the legacy v0.1 predicate: UnsupportedPredicateType
//!   - Predicate without its resources: MalformedPayload
//!   - Statement with two subjects: MalformedPayload
//!   - Statement whose subject digest is not its resources': SubjectDigestMismatch
//!   - Resource digest that is not 64 hex digits: MalformedResource
//!   - Serialization by an unknown method: UnsupportedSerialization
//!   - Serialization with a hash other than SHA-256: UnsupportedSerialization
//!   - Shard serialization without a shard size: UnsupportedSerialization
//!   - Resource name escaping the model (../etc/passwd): MalformedResource
//!   - Resource name that is absolute (/etc/passwd): MalformedResource
//!   - Resource name with an empty component (a//b): MalformedResource
//!   - Resource name with a dot component (./signme-1): MalformedResource
//!   - Resource with an unknown digest algorithm: MalformedResource
//!   - Resource listed twice: MalformedResource
//!   - Manifest naming a file the model lacks: MissingFiles
//!   - Manifest leaving out a file of the model: ExtraFiles
//!   - Manifest with a wrong file digest: DigestMismatch
//!
//! Bootstrap tokens and other CRD-side parsers (refused: `None`, `false`, or the named serde/parse
//! error) (28 cases):
//! - `bootstrap_tokens_and_crd_fields_are_refused`:
//!   - Bootstrap token without the dot
//!   - Bootstrap token with an empty secret
//!   - Bootstrap token with a secret one character short
//!   - Bootstrap token with a secret one character long
//!   - Bootstrap token in upper case
//!   - Bootstrap token with a second dot
//!   - Bootstrap token with a trailing newline
//!   - Bootstrap token with a non-ASCII id
//!   - Bootstrap token with a NUL byte
//!   - Bootstrap token id that is a path
//!   - Device name pattern that is empty
//!   - Device name pattern of 254 characters
//!   - Device name pattern with a path separator
//!   - Device name pattern with a question mark
//!   - Device name pattern in upper case
//!   - Device name with a prefix the pattern does not allow
//!   - Device name longer than an exact pattern
//!   - Device name overlapping the pattern's ends
//!   - Condition status in lower case
//!   - Condition status that is empty
//!   - TEE kind that is unknown (sgx)
//!   - TEE kind in upper case (TPM)
//!   - Bootstrap token spec without a secret hash
//!   - Bootstrap token spec without an expiration time
//!   - Bootstrap token usage limit given as text
//!   - Reported model state that is unknown
//!   - Reported model state that is unknown, on the wire
//!   - Reported model state in lower case
//!
//! Plugin loading (18 cases):
//! - `plugin_bytes_and_limits_are_refused_at_load`:
//!   - Plugin that is empty: NotAComponent
//!   - Plugin that is the Wasm magic number alone: NotAComponent
//!   - Plugin that is a core module, not a component: NotAComponent
//!   - Plugin that is a shell script: NotAComponent
//!   - Plugin that is 4 KiB of noise: NotAComponent
//!   - Component header followed by garbage: Compile
//!   - Plugin limits with neither fuel nor a deadline: InvalidLimits
//!   - Plugin deadline above MAX_DEADLINE: InvalidLimits
//!   - Plugin deadline of zero: InvalidLimits
//!   - Plugin fuel of zero: InvalidLimits
//!   - Plugin memory cap of zero: InvalidLimits
//!   - Plugin read-only directory with a relative host path: InvalidLimits
//!   - Plugin read-only directory at a guest path with ..: InvalidLimits
//!   - Plugin read-only directory at a relative guest path: InvalidLimits
//! - `built_plugins_beyond_their_grants_are_refused_at_load` (needs the plugins built by
//!   scripts/test):
//!   - Component importing sockets and files without grants: ImportNotGranted
//!   - Component importing sockets with only clocks granted: ImportNotGranted
//!   - Component cut in half: Compile
//!   - Good component with a deadline above MAX_DEADLINE: InvalidLimits
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use edgefleet_agent::attest::dev::DevAttester;
use edgefleet_agent::plugins::{
    Grants, Limits, MAX_DEADLINE, PluginError, PluginRuntime, PluginSpec,
};
use edgefleet_crds::conditions::Status;
use edgefleet_crds::token::{name_matches, parse_token, valid_name_pattern, valid_token_id};
use edgefleet_proto::{ModelState, UnknownModelState};
use edgefleet_trust::attestation::dev::{self, DevEvidence};
use edgefleet_trust::attestation::policy::{Policy, PolicyError};
use edgefleet_trust::attestation::service::{
    AttestationService, Challenge, ChallengeRequest, Evidence, EvidenceRequest, ServiceConfig,
    ServiceError, TpmEnrolment,
};
use edgefleet_trust::attestation::snp::{self, SnpOptions, SnpRoots};
use edgefleet_trust::attestation::tdx::{self, TdxOptions};
use edgefleet_trust::attestation::tpm::{self, ClockState, TpmEvidence, TpmOptions, TpmQuote};
use edgefleet_trust::attestation::{
    AttestationError, TeeKind, pem_certificates, result, tpm_enrol,
};
use edgefleet_trust::model_signing::{
    MAX_BUNDLE_BYTES, PinnedRoot, PrivateKey, PublicKey, SignOptions, SignatureError, TrustPolicy,
    bundle, certs, sign, verify,
};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

// ---- the tables -------------------------------------------------------------------

/// A refusal: the error's stable reason name and its message.
#[derive(Debug)]
struct Refusal {
    reason: &'static str,
    message: String,
}

/// What an input came to: accepted, or refused by name.
type Outcome = Result<(), Refusal>;

/// Errors whose refusals have a stable name.
trait Named: std::fmt::Display {
    fn name(&self) -> &'static str;
}

impl Named for AttestationError {
    fn name(&self) -> &'static str {
        self.reason()
    }
}

impl Named for ServiceError {
    fn name(&self) -> &'static str {
        self.reason()
    }
}

impl Named for SignatureError {
    fn name(&self) -> &'static str {
        self.reason()
    }
}

impl Named for PluginError {
    fn name(&self) -> &'static str {
        self.reason()
    }
}

/// `PolicyError` has no `reason()`: its variant's name.
impl Named for PolicyError {
    fn name(&self) -> &'static str {
        match self {
            PolicyError::Compile { .. } => "Compile",
            PolicyError::Data(_) => "Data",
            PolicyError::Eval { .. } => "Eval",
        }
    }
}

fn outcome<T, E: Named>(r: Result<T, E>) -> Outcome {
    r.map(|_| ()).map_err(|e| Refusal {
        reason: e.name(),
        message: e.to_string(),
    })
}

/// One hostile input: a name for the docs, the reason it must be refused with, and the
/// call that feeds it to the code under test.
struct Case<'a> {
    name: &'static str,
    want: &'static str,
    run: Box<dyn Fn() -> Outcome + 'a>,
}

fn case<'a>(name: &'static str, want: &'static str, run: impl Fn() -> Outcome + 'a) -> Case<'a> {
    Case {
        name,
        want,
        run: Box::new(run),
    }
}

/// Runs every case (a panic counts as a failure of that case, not of the table) and
/// fails once, naming each case that was accepted or refused for another reason.
fn refused_by_name(surface: &str, cases: Vec<Case<'_>>) {
    let mut names = BTreeSet::new();
    let mut wrong = Vec::new();
    for c in &cases {
        assert!(
            names.insert(c.name),
            "{surface}: two cases are named {:?}",
            c.name
        );
        match std::panic::catch_unwind(AssertUnwindSafe(|| (c.run)())) {
            Ok(Err(r)) if r.reason == c.want => {}
            Ok(Err(r)) => wrong.push(format!(
                "{}: refused as {} ({}), expected {}",
                c.name, r.reason, r.message, c.want
            )),
            Ok(Ok(())) => wrong.push(format!("{}: accepted, expected {}", c.name, c.want)),
            Err(_) => wrong.push(format!("{}: panicked, expected {}", c.name, c.want)),
        }
    }
    assert!(
        wrong.is_empty(),
        "{surface}: {} of {} cases went wrong:\n  {}",
        wrong.len(),
        cases.len(),
        wrong.join("\n  ")
    );
}

/// The unedited input must be accepted, or the refusals prove nothing.
fn accepted(what: &str, o: Outcome) {
    if let Err(r) = o {
        panic!(
            "{what}: the unedited input is refused as {} ({})",
            r.reason, r.message
        );
    }
}

// ---- fixtures ---------------------------------------------------------------------

/// The recorded fixtures (the fixtures directory beside the checkout).
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A file of `attestation/`.
fn att(name: &str) -> Vec<u8> {
    read(&fixtures().join("attestation").join(name))
}

/// 2026-06-01: every attestation fixture's chain is valid then.
fn att_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_780_272_000)
}

/// 2050-01-01: every attestation fixture's chain has expired.
fn att_later() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(2_524_608_000)
}

/// The pinned AMD Milan roots (ARK, ASK, ASVK), with an empty signature memory.
fn milan() -> Vec<SnpRoots> {
    vec![SnpRoots::from_pem("Milan", &att("trustee-milan_ask_ark_asvk.pem")).unwrap()]
}

/// The pinned Intel SGX root, DER.
fn intel_root() -> Vec<u8> {
    pem_certificates(&att("intel-sgx-root.pem"))
        .unwrap()
        .remove(0)
}

fn flip(v: &mut [u8], at: usize) {
    v[at] ^= 0x01;
}

fn put_u16_le(v: &mut [u8], at: usize, x: u16) {
    v[at..at + 2].copy_from_slice(&x.to_le_bytes());
}

fn put_u32_le(v: &mut [u8], at: usize, x: u32) {
    v[at..at + 4].copy_from_slice(&x.to_le_bytes());
}

/// Decodes a base64 field, edits the bytes, encodes them back.
fn edit_b64(field: &mut String, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut v = B64.decode(field.trim()).unwrap();
    edit(&mut v);
    *field = B64.encode(v);
}

/// A self-signed CA certificate with the same subject as `der` but another key.
fn impostor_of(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = rcgen::DistinguishedName::new();
    for rdn in cert.subject().iter() {
        for attr in rdn.iter() {
            let value = attr.as_str().unwrap().to_owned();
            let oid: Vec<u64> = attr.attr_type().iter().unwrap().collect();
            dn.push(rcgen::DnType::from_oid(&oid), value);
        }
    }
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    params.self_signed(&key).unwrap().der().to_vec()
}

// ---- SEV-SNP ----------------------------------------------------------------------

/// What an SNP verification takes: trustee's report and VCEK, the Milan roots, at
/// `att_now()`, unless a case edits it.
struct Snp {
    report: Vec<u8>,
    vcek: Vec<u8>,
    roots: Vec<SnpRoots>,
    at: SystemTime,
    options: SnpOptions,
}

impl Snp {
    fn genuine() -> Self {
        Self {
            report: att("trustee-snp-report.bin"),
            vcek: att("trustee-snp-vcek.der"),
            roots: milan(),
            at: att_now(),
            options: SnpOptions::default(),
        }
    }

    fn verify(&self) -> Outcome {
        outcome(snp::verify(
            &self.report,
            &self.vcek,
            &self.roots,
            self.at,
            &self.options,
        ))
    }
}

fn snp_with(edit: impl FnOnce(&mut Snp)) -> Outcome {
    let mut i = Snp::genuine();
    edit(&mut i);
    i.verify()
}

#[test]
fn snp_reports_are_refused_by_name() {
    accepted("trustee SNP report", Snp::genuine().verify());
    refused_by_name(
        "SEV-SNP",
        vec![
            case("SNP report one byte short", "Truncated", || {
                snp_with(|i| {
                    i.report.pop();
                })
            }),
            case("SNP report cut to 1000 bytes", "Truncated", || {
                snp_with(|i| i.report.truncate(1000))
            }),
            case("SNP report with a byte appended", "Truncated", || {
                snp_with(|i| i.report.push(0))
            }),
            case("SNP report of version 1", "Unsupported", || {
                snp_with(|i| put_u32_le(&mut i.report, 0x00, 1))
            }),
            case("SNP report of version 9", "Unsupported", || {
                snp_with(|i| put_u32_le(&mut i.report, 0x00, 9))
            }),
            case(
                "SNP report naming a signature algorithm other than ECDSA P-384",
                "Unsupported",
                || snp_with(|i| put_u32_le(&mut i.report, 0x34, 2)),
            ),
            case(
                "SNP report with a flipped guest policy byte",
                "SignatureInvalid",
                || snp_with(|i| flip(&mut i.report, 0x08)),
            ),
            case(
                "SNP report with a flipped report data byte",
                "SignatureInvalid",
                || snp_with(|i| flip(&mut i.report, 0x50)),
            ),
            case(
                "SNP report with a flipped measurement byte",
                "SignatureInvalid",
                || snp_with(|i| flip(&mut i.report, 0x90)),
            ),
            case(
                "SNP report with a flipped reported TCB byte",
                "SignatureInvalid",
                || snp_with(|i| flip(&mut i.report, 0x180)),
            ),
            case(
                "SNP report with a flipped signature byte",
                "SignatureInvalid",
                || snp_with(|i| flip(&mut i.report, 0x2A0)),
            ),
            case(
                "SNP signature component wider than 384 bits",
                "SignatureInvalid",
                || snp_with(|i| i.report[0x2A0 + 60] = 1),
            ),
            case(
                "SNP report bound to another nonce",
                "ReportDataMismatch",
                || snp_with(|i| i.options.expected_report_data = Some(vec![0; 64])),
            ),
            case(
                "SNP VCEK that is not a certificate",
                "MalformedCertificate",
                || snp_with(|i| i.vcek = b"not a certificate".to_vec()),
            ),
            case("SNP VCEK that is empty", "MalformedCertificate", || {
                snp_with(|i| i.vcek.clear())
            }),
            case("SNP VCEK of another chip", "SignatureInvalid", || {
                snp_with(|i| i.vcek = att("gosev-vcek.der"))
            }),
            case(
                "SNP VCEK with a flipped signature byte",
                "ChainInvalid",
                || {
                    snp_with(|i| {
                        let n = i.vcek.len();
                        flip(&mut i.vcek, n - 20);
                    })
                },
            ),
            case(
                "SNP pinned ASK with a flipped signature byte",
                "ChainInvalid",
                || {
                    snp_with(|i| {
                        let n = i.roots[0].ask.len();
                        flip(&mut i.roots[0].ask, n - 20);
                    })
                },
            ),
            case(
                "SNP chain to a same-named impostor AMD root",
                "ChainInvalid",
                || snp_with(|i| i.roots[0].ark = impostor_of(&i.roots[0].ark)),
            ),
            case(
                "SNP report with no AMD roots pinned",
                "ChainInvalid",
                || snp_with(|i| i.roots.clear()),
            ),
            case(
                "SNP chain checked after it expired",
                "CertificateNotValidAt",
                || snp_with(|i| i.at = att_later()),
            ),
            case("SNP report from a debuggable guest", "DebugEnabled", || {
                Snp {
                    report: att("gosev-attestation.bin"),
                    vcek: att("gosev-vcek.der"),
                    roots: vec![SnpRoots::from_pem("Milan", &att("gosev-milan.testcer")).unwrap()],
                    at: att_now(),
                    options: SnpOptions::default(),
                }
                .verify()
            }),
        ],
    );
}

// ---- TDX --------------------------------------------------------------------------

/// Offsets in trustee's v5 quote: header 48, body descriptor 6, body 648, then the
/// signature data (4-byte length, quote signature 64, attestation key 64,
/// certification data type 2 and size 4, then the QE report certification data).
const V5_BODY: usize = 54;
const V5_SIG_LEN: usize = 54 + 648;
const V5_SIG: usize = V5_SIG_LEN + 4;
const V5_CERT: usize = V5_SIG + 134;

/// What a TDX verification takes: trustee's v5 quote and the Intel root, at
/// `att_now()`, unless a case edits it.
struct Tdx {
    quote: Vec<u8>,
    root: Vec<u8>,
    at: SystemTime,
    options: TdxOptions,
}

impl Tdx {
    fn genuine() -> Self {
        Self {
            quote: att("trustee-tdx_quote_5.dat"),
            root: intel_root(),
            at: att_now(),
            options: TdxOptions::default(),
        }
    }

    fn verify(&self) -> Outcome {
        outcome(tdx::verify(&self.quote, &self.root, self.at, &self.options))
    }
}

fn tdx_with(edit: impl FnOnce(&mut Tdx)) -> Outcome {
    let mut i = Tdx::genuine();
    edit(&mut i);
    i.verify()
}

#[test]
fn tdx_quotes_are_refused_by_name() {
    accepted("trustee TDX v5 quote", Tdx::genuine().verify());
    refused_by_name(
        "TDX",
        vec![
            case("TDX quote that is empty", "Truncated", || {
                tdx_with(|i| i.quote.clear())
            }),
            case("TDX quote cut off in the body", "Truncated", || {
                tdx_with(|i| i.quote.truncate(700))
            }),
            case("TDX quote of version 3", "Unsupported", || {
                tdx_with(|i| put_u16_le(&mut i.quote, 0, 3))
            }),
            case(
                "TDX quote with an attestation key type other than P-256",
                "Unsupported",
                || tdx_with(|i| put_u16_le(&mut i.quote, 2, 3)),
            ),
            case(
                "TDX quote from an SGX enclave rather than a TD",
                "Unsupported",
                || tdx_with(|i| put_u32_le(&mut i.quote, 4, 0)),
            ),
            case(
                "TDX v5 quote with an unknown body type",
                "Unsupported",
                || tdx_with(|i| put_u16_le(&mut i.quote, 48, 9)),
            ),
            case("TDX v5 body size not that of its type", "Malformed", || {
                tdx_with(|i| put_u32_le(&mut i.quote, 50, 584))
            }),
            case(
                "TDX signature data longer than the quote",
                "Truncated",
                || tdx_with(|i| put_u32_le(&mut i.quote, V5_SIG_LEN, u32::MAX)),
            ),
            case(
                "TDX quote with a flipped header byte",
                "SignatureInvalid",
                || tdx_with(|i| flip(&mut i.quote, 8)),
            ),
            case(
                "TDX quote with a flipped MRTD byte",
                "SignatureInvalid",
                || tdx_with(|i| flip(&mut i.quote, V5_BODY + 136)),
            ),
            case(
                "TDX quote with a flipped report data byte",
                "SignatureInvalid",
                || tdx_with(|i| flip(&mut i.quote, V5_BODY + 520)),
            ),
            case(
                "TDX quote with a flipped signature byte",
                "SignatureInvalid",
                || tdx_with(|i| flip(&mut i.quote, V5_SIG + 5)),
            ),
            case(
                "TDX attestation key that is not a P-256 point",
                "Malformed",
                || tdx_with(|i| flip(&mut i.quote, V5_SIG + 64 + 5)),
            ),
            case(
                "TDX certification data of another type",
                "Unsupported",
                || tdx_with(|i| put_u16_le(&mut i.quote, V5_SIG + 128, 5)),
            ),
            case(
                "TDX certification data longer than the quote",
                "Truncated",
                || tdx_with(|i| put_u32_le(&mut i.quote, V5_SIG + 130, u32::MAX)),
            ),
            case(
                "TDX QE report with a flipped byte",
                "SignatureInvalid",
                || tdx_with(|i| flip(&mut i.quote, V5_CERT + 10)),
            ),
            case(
                "TDX QE report signature with a flipped byte",
                "SignatureInvalid",
                || tdx_with(|i| flip(&mut i.quote, V5_CERT + 384 + 3)),
            ),
            case(
                "TDX QE authentication data altered",
                "QeBindingMismatch",
                || tdx_with(|i| flip(&mut i.quote, V5_CERT + 384 + 64 + 2 + 1)),
            ),
            case("TDX PCK chain with a flipped byte", "ChainInvalid", || {
                tdx_with(|i| flip(&mut i.quote, V5_CERT + 384 + 64 + 2 + 32 + 6 + 200))
            }),
            case(
                "TDX quote checked against another vendor's root",
                "ChainInvalid",
                || tdx_with(|i| i.root = milan().remove(0).ark),
            ),
            case(
                "TDX quote checked against a same-named impostor Intel root",
                "ChainInvalid",
                || tdx_with(|i| i.root = impostor_of(&i.root)),
            ),
            case(
                "TDX pinned root that is not a certificate",
                "MalformedCertificate",
                || tdx_with(|i| i.root = b"not a certificate".to_vec()),
            ),
            case(
                "TDX PCK chain checked after it expired",
                "CertificateNotValidAt",
                || tdx_with(|i| i.at = att_later()),
            ),
            case(
                "TDX quote bound to another nonce",
                "ReportDataMismatch",
                || tdx_with(|i| i.options.expected_report_data = Some(vec![0; 64])),
            ),
            case("TDX quote from a debuggable TD", "DebugEnabled", || {
                tdx_with(|i| i.quote = att("trustee-tdx_quote_4.dat"))
            }),
        ],
    );
}

// ---- TPM --------------------------------------------------------------------------

/// What a TPM verification takes: trustee's recorded quote (RSASSA, SHA-256 bank, all
/// 24 PCRs, a safe clock), with no nonce or previous clock expected, unless a case
/// edits it.
struct Tpm {
    evidence: TpmEvidence,
    options: TpmOptions,
}

impl Tpm {
    fn genuine() -> Self {
        Self {
            evidence: serde_json::from_slice(&att("trustee-tpm_evidence.json")).unwrap(),
            options: TpmOptions::default(),
        }
    }

    fn verify(&self) -> Outcome {
        outcome(tpm::verify(&self.evidence, &self.options))
    }
}

fn tpm_with(edit: impl FnOnce(&mut Tpm)) -> Outcome {
    let mut i = Tpm::genuine();
    edit(&mut i);
    i.verify()
}

/// The PCR values an own quote reports (PCR i is 32 bytes of i).
fn own_pcrs() -> Vec<String> {
    (0..24).map(|i| format!("{i:02x}").repeat(32)).collect()
}

/// A TPMS_ATTEST of type quote over PCR 7, built field by field so that a case can make
/// any one of them wrong, and signed (ECDSA P-256) by a test AK: the signature holds,
/// so the checks behind it are reached.
struct OwnQuote {
    magic: u32,
    kind: u16,
    safe: bool,
    selections: u32,
    bank: u16,
    select: Vec<u8>,
    trailing: Vec<u8>,
    cut_to: Option<usize>,
}

impl Default for OwnQuote {
    fn default() -> Self {
        Self {
            magic: 0xff54_4347, // TPM_GENERATED_VALUE
            kind: 0x8018,       // TPM_ST_ATTEST_QUOTE
            safe: true,
            selections: 1,
            bank: 0x000b, // SHA-256
            select: vec![0b1000_0000, 0, 0],
            trailing: Vec::new(),
            cut_to: None,
        }
    }
}

impl OwnQuote {
    fn evidence(&self) -> TpmEvidence {
        use p256::ecdsa::signature::Signer as _;
        use p256::pkcs8::EncodePublicKey as _;
        let pcrs = own_pcrs();
        let key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let mut m = Vec::new();
        m.extend(self.magic.to_be_bytes());
        m.extend(self.kind.to_be_bytes());
        m.extend(2u16.to_be_bytes()); // qualifiedSigner
        m.extend([0, 0x0b]);
        m.extend(8u16.to_be_bytes()); // extraData
        m.extend(b"noncenon");
        m.extend(1000u64.to_be_bytes()); // clock
        m.extend(1u32.to_be_bytes()); // resetCount
        m.extend(0u32.to_be_bytes()); // restartCount
        m.push(u8::from(self.safe));
        m.extend(0u64.to_be_bytes()); // firmwareVersion
        m.extend(self.selections.to_be_bytes());
        m.extend(self.bank.to_be_bytes());
        m.push(u8::try_from(self.select.len()).unwrap());
        m.extend(&self.select);
        m.extend(32u16.to_be_bytes());
        m.extend(Sha256::digest(hex::decode(&pcrs[7]).unwrap()));
        m.extend(&self.trailing);
        if let Some(n) = self.cut_to {
            m.truncate(n);
        }
        let sig: p256::ecdsa::Signature = key.sign(&m);
        let (r, s) = sig.split_bytes();
        let mut t = Vec::new();
        t.extend(0x0018u16.to_be_bytes()); // TPM_ALG_ECDSA
        t.extend(0x000bu16.to_be_bytes()); // SHA-256
        t.extend(32u16.to_be_bytes());
        t.extend(r);
        t.extend(32u16.to_be_bytes());
        t.extend(s);
        let spki = key.verifying_key().to_public_key_der().unwrap();
        TpmEvidence {
            ak_public: B64.encode(spki.as_bytes()),
            tpm_quote: TpmQuote {
                message: B64.encode(m),
                signature: B64.encode(t),
                pcrs,
            },
        }
    }
}

fn own_quote(edit: impl FnOnce(&mut OwnQuote)) -> Outcome {
    let mut q = OwnQuote::default();
    edit(&mut q);
    outcome(tpm::verify(&q.evidence(), &TpmOptions::default()))
}

/// An RSA-2048 AK's TPMT_PUBLIC as a TPM writes it: restricted, signing only, fixedTPM,
/// fixedParent, sensitiveDataOrigin; `attrs` and `tail` let a case spoil it.
fn ak_public_area(ty: u16, name_alg: u16, attrs: u32, tail: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend(ty.to_be_bytes());
    a.extend(name_alg.to_be_bytes());
    a.extend(attrs.to_be_bytes());
    a.extend(0u16.to_be_bytes()); // authPolicy
    a.extend(0x0010u16.to_be_bytes()); // symmetric: NULL
    a.extend(0x0010u16.to_be_bytes()); // scheme: NULL
    a.extend(2048u16.to_be_bytes()); // keyBits
    a.extend(0u32.to_be_bytes()); // exponent: default
    a.extend(256u16.to_be_bytes());
    a.extend([0xc5; 256]); // modulus
    a.extend(tail);
    a
}

/// fixedTPM | fixedParent | sensitiveDataOrigin | restricted | sign.
const AK_ATTRS: u32 = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 18);
const TPM_ALG_RSA: u16 = 0x0001;
const TPM_ALG_ECC: u16 = 0x0023;
const TPM_ALG_SHA1: u16 = 0x0004;
const TPM_ALG_SHA256: u16 = 0x000b;

#[test]
fn tpm_quotes_and_enrolment_are_refused_by_name() {
    accepted("trustee TPM quote", Tpm::genuine().verify());
    accepted("own ECDSA TPM quote", own_quote(|_| {}));
    accepted(
        "RSA AK public area",
        outcome(tpm_enrol::parse_ak_public(&ak_public_area(
            TPM_ALG_RSA,
            TPM_ALG_SHA256,
            AK_ATTRS,
            &[],
        ))),
    );
    refused_by_name(
        "TPM",
        vec![
            // The recorded quote.
            case(
                "TPM quote message with a flipped byte",
                "SignatureInvalid",
                || tpm_with(|i| edit_b64(&mut i.evidence.tpm_quote.message, |m| flip(m, 40))),
            ),
            case(
                "TPM quote signature with a flipped byte",
                "SignatureInvalid",
                || {
                    tpm_with(|i| {
                        edit_b64(&mut i.evidence.tpm_quote.signature, |s| {
                            let n = s.len() - 1;
                            flip(s, n);
                        })
                    })
                },
            ),
            case(
                "TPM AK public key with a flipped byte",
                "SignatureInvalid",
                || {
                    tpm_with(|i| {
                        edit_b64(&mut i.evidence.ak_public, |k| {
                            let n = k.len();
                            flip(k, n - 10);
                        })
                    })
                },
            ),
            case("TPM AK public key that is not base64", "Malformed", || {
                tpm_with(|i| i.evidence.ak_public = "%%%".into())
            }),
            case("TPM quote message that is not base64", "Malformed", || {
                tpm_with(|i| i.evidence.tpm_quote.message = "not base64!".into())
            }),
            case(
                "TPM quote signature that is not base64",
                "Malformed",
                || tpm_with(|i| i.evidence.tpm_quote.signature = "@@@@".into()),
            ),
            case("TPM AK public key that is not a key", "Malformed", || {
                tpm_with(|i| i.evidence.ak_public = B64.encode(b"not a key"))
            }),
            case("TPM quote signature cut to 3 bytes", "Truncated", || {
                tpm_with(|i| edit_b64(&mut i.evidence.tpm_quote.signature, |s| s.truncate(3)))
            }),
            case(
                "TPM quote signature of an unknown scheme",
                "Unsupported",
                || {
                    tpm_with(|i| {
                        edit_b64(&mut i.evidence.tpm_quote.signature, |s| {
                            s[..2].copy_from_slice(&0x0001u16.to_be_bytes());
                        })
                    })
                },
            ),
            case("TPM RSA quote signature over SHA-1", "Unsupported", || {
                tpm_with(|i| {
                    edit_b64(&mut i.evidence.tpm_quote.signature, |s| {
                        s[2..4].copy_from_slice(&TPM_ALG_SHA1.to_be_bytes());
                    })
                })
            }),
            case("TPM quote over another nonce", "ReportDataMismatch", || {
                tpm_with(|i| i.options.expected_nonce = Some(vec![0; 64]))
            }),
            case("TPM PCR value altered", "PcrDigestMismatch", || {
                tpm_with(|i| i.evidence.tpm_quote.pcrs[7] = "11".repeat(32))
            }),
            case("TPM PCR value of 31 bytes", "Malformed", || {
                tpm_with(|i| i.evidence.tpm_quote.pcrs[7] = "11".repeat(31))
            }),
            case(
                "TPM PCR value of 48 bytes (SHA-384 length)",
                "Malformed",
                || tpm_with(|i| i.evidence.tpm_quote.pcrs[7] = "11".repeat(48)),
            ),
            case("TPM PCR value that is not hex", "Malformed", || {
                tpm_with(|i| i.evidence.tpm_quote.pcrs[7] = "zz".repeat(32))
            }),
            case(
                "TPM quote selecting PCRs it does not report",
                "Malformed",
                || tpm_with(|i| i.evidence.tpm_quote.pcrs.truncate(5)),
            ),
            case(
                "TPM reset count behind the previous quote's",
                "ClockRollback",
                || {
                    tpm_with(|i| {
                        i.options.previous = Some(ClockState {
                            clock: 0,
                            reset_count: 3,
                            restart_count: 0,
                        })
                    })
                },
            ),
            case(
                "TPM clock behind the previous quote's",
                "ClockRollback",
                || {
                    tpm_with(|i| {
                        i.options.previous = Some(ClockState {
                            clock: u64::MAX,
                            reset_count: 2,
                            restart_count: 0,
                        })
                    })
                },
            ),
            // Own quotes: signed, so that the parse and the checks behind it are reached.
            case("TPM quote whose clock is not safe", "ClockNotSafe", || {
                own_quote(|q| q.safe = false)
            }),
            case("TPM quote over the SHA-1 PCR bank", "Unsupported", || {
                own_quote(|q| q.bank = TPM_ALG_SHA1)
            }),
            case(
                "TPM attestation of another type than a quote",
                "Unsupported",
                || own_quote(|q| q.kind = 0x8017),
            ),
            case(
                "TPM attestation without TPM_GENERATED_VALUE",
                "Malformed",
                || own_quote(|q| q.magic = 0),
            ),
            case(
                "TPM attestation with 17 PCR selections",
                "Malformed",
                || own_quote(|q| q.selections = 17),
            ),
            case(
                "TPM attestation with a 5-byte PCR select",
                "Malformed",
                || own_quote(|q| q.select = vec![0x80, 0, 0, 0, 0]),
            ),
            case("TPM attestation with trailing bytes", "Malformed", || {
                own_quote(|q| q.trailing = vec![0])
            }),
            case("TPM attestation cut short", "Truncated", || {
                own_quote(|q| q.cut_to = Some(20))
            }),
            // Enrolment: the AK public area and the EK certificate a device sends.
            case("TPM AK public area cut to 2 bytes", "Truncated", || {
                outcome(tpm_enrol::parse_ak_public(&[0x00, 0x01]))
            }),
            case("TPM AK public area of an ECC key", "Unsupported", || {
                outcome(tpm_enrol::parse_ak_public(&ak_public_area(
                    TPM_ALG_ECC,
                    TPM_ALG_SHA256,
                    AK_ATTRS,
                    &[],
                )))
            }),
            case("TPM AK public area named with SHA-1", "Unsupported", || {
                outcome(tpm_enrol::parse_ak_public(&ak_public_area(
                    TPM_ALG_RSA,
                    TPM_ALG_SHA1,
                    AK_ATTRS,
                    &[],
                )))
            }),
            case(
                "TPM AK that may decrypt (a storage key)",
                "Malformed",
                || {
                    outcome(tpm_enrol::parse_ak_public(&ak_public_area(
                        TPM_ALG_RSA,
                        TPM_ALG_SHA256,
                        AK_ATTRS | (1 << 17),
                        &[],
                    )))
                },
            ),
            case("TPM AK that is not fixed to its TPM", "Malformed", || {
                outcome(tpm_enrol::parse_ak_public(&ak_public_area(
                    TPM_ALG_RSA,
                    TPM_ALG_SHA256,
                    AK_ATTRS & !(1 << 1),
                    &[],
                )))
            }),
            case(
                "TPM AK public area with trailing bytes",
                "Malformed",
                || {
                    outcome(tpm_enrol::parse_ak_public(&ak_public_area(
                        TPM_ALG_RSA,
                        TPM_ALG_SHA256,
                        AK_ATTRS,
                        &[0],
                    )))
                },
            ),
            case(
                "TPM EK certificate that is not a certificate",
                "MalformedCertificate",
                || {
                    outcome(tpm_enrol::verify_ek_certificate(
                        b"not a certificate",
                        &[],
                        &intel_root(),
                        att_now(),
                    ))
                },
            ),
            case("TPM EK certificate from another CA", "ChainInvalid", || {
                outcome(tpm_enrol::verify_ek_certificate(
                    &milan().remove(0).ask,
                    &[],
                    &intel_root(),
                    att_now(),
                ))
            }),
        ],
    );
}

// ---- dev attester -----------------------------------------------------------------

/// Dev evidence over 64 bytes of 0x5a by a fresh key, with no binding expected, unless
/// a case edits it.
struct Dev {
    evidence: DevEvidence,
    expected: Option<Vec<u8>>,
}

impl Dev {
    fn genuine() -> Self {
        Self {
            evidence: DevAttester::generate().evidence(&[0x5a; 64]).unwrap(),
            expected: None,
        }
    }

    fn verify(&self) -> Outcome {
        outcome(dev::verify(&self.evidence, self.expected.as_deref()))
    }
}

fn dev_with(edit: impl FnOnce(&mut Dev)) -> Outcome {
    let mut i = Dev::genuine();
    edit(&mut i);
    i.verify()
}

#[test]
fn dev_evidence_is_refused_by_name() {
    accepted("dev evidence", Dev::genuine().verify());
    refused_by_name(
        "dev attester",
        vec![
            case("Dev public key that is not base64", "Malformed", || {
                dev_with(|i| i.evidence.public_key = "%%%".into())
            }),
            case("Dev report data that is not hex", "Malformed", || {
                dev_with(|i| i.evidence.report_data = "zz".repeat(64))
            }),
            case("Dev signature that is not base64", "Malformed", || {
                dev_with(|i| i.evidence.signature = "not base64!".into())
            }),
            case("Dev public key that is not a key", "Malformed", || {
                dev_with(|i| i.evidence.public_key = B64.encode(b"not a key"))
            }),
            case("Dev public key on P-384", "Malformed", || {
                dev_with(|i| {
                    let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
                    i.evidence.public_key =
                        B64.encode(rcgen::PublicKeyData::subject_public_key_info(&k));
                })
            }),
            case("Dev signature that is not DER", "SignatureInvalid", || {
                dev_with(|i| i.evidence.signature = B64.encode([1, 2, 3]))
            }),
            case(
                "Dev evidence signed by another key",
                "SignatureInvalid",
                || {
                    dev_with(|i| {
                        i.evidence.public_key = DevAttester::generate()
                            .evidence(&[0x5a; 64])
                            .unwrap()
                            .public_key
                    })
                },
            ),
            case(
                "Dev report data changed after signing",
                "SignatureInvalid",
                || dev_with(|i| i.evidence.report_data = hex::encode([0xa5; 64])),
            ),
            case(
                "Dev evidence bound to another nonce",
                "ReportDataMismatch",
                || dev_with(|i| i.expected = Some(vec![0; 64])),
            ),
        ],
    );
}

// ---- the gateway's attestation service, its policy and its results --------------

/// The service as a gateway runs it: the reference policy, the Milan roots and the
/// Intel root, no EK CA, a fresh device CA.
fn attestation_service() -> AttestationService {
    let root = edgefleet_e2e::workspace_root();
    let rego = std::fs::read_to_string(root.join("policies/attestation.rego")).unwrap();
    let data = std::fs::read_to_string(root.join("policies/reference.json")).unwrap();
    let policy = Policy::load("attestation", &rego, &data).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "edgefleet device CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    AttestationService::new(
        ServiceConfig {
            nonce_ttl: Duration::from_secs(30),
            result_ttl: Duration::from_secs(3600),
            snp_roots: milan(),
            intel_root: Some(intel_root()),
            tdx_collateral: None,
            ek_cas: vec![],
            ek_intermediates: vec![],
        },
        policy,
        p256::ecdsa::SigningKey::random(&mut rand_core::OsRng),
        &ca_pem,
        &ca_key.serialize_pem(),
    )
    .unwrap()
}

/// An agent key (SPKI DER, base64) and a CSR (PEM) for it.
fn agent_key() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    (
        B64.encode(rcgen::PublicKeyData::subject_public_key_info(&key)),
        csr.pem().unwrap(),
    )
}

/// The reference policy.
fn reference_policy() -> Policy {
    let root = edgefleet_e2e::workspace_root();
    let rego = std::fs::read_to_string(root.join("policies/attestation.rego")).unwrap();
    let data = std::fs::read_to_string(root.join("policies/reference.json")).unwrap();
    Policy::load("attestation", &rego, &data).unwrap()
}

/// A compact JWS with `header`, `payload` and `sig` as given (base64url).
fn jws(header: &Value, payload: &Value, sig: &str) -> String {
    format!(
        "{}.{}.{sig}",
        B64URL.encode(header.to_string()),
        B64URL.encode(payload.to_string())
    )
}

#[test]
fn attestation_service_inputs_are_refused_by_name() {
    let svc = attestation_service();
    let (key, csr) = agent_key();
    // Challenges are issued and answered at the fixtures' time, when their chains hold.
    let challenge = |device: &str, tee: TeeKind, tpm: Option<TpmEnrolment>| {
        svc.challenge(
            &ChallengeRequest {
                device: device.into(),
                agent_public_key: key.clone(),
                tee,
                tpm,
            },
            att_now(),
        )
    };
    let ask = |tee: TeeKind| challenge("till-1", tee, None).unwrap();
    let answer = |c: &Challenge, device: &str, csr: &str, evidence: Evidence| {
        outcome(svc.evidence(
            &EvidenceRequest {
                device: device.into(),
                nonce: c.nonce.clone(),
                csr: csr.into(),
                evidence,
            },
            att_now(),
        ))
    };
    let dev_over = |report_data: &[u8; 64]| Evidence::Dev {
        evidence: DevAttester::generate().evidence(report_data).unwrap(),
    };
    let bound =
        |c: &Challenge| -> [u8; 64] { hex::decode(&c.report_data).unwrap().try_into().unwrap() };
    // Dev evidence bound to its challenge verifies (the policy then denies it, which is
    // an appraisal, not a refusal).
    {
        let c = ask(TeeKind::Dev);
        accepted(
            "dev evidence bound to its challenge",
            answer(&c, "till-1", &csr, dev_over(&bound(&c))),
        );
    }
    let result_key = p256::ecdsa::SigningKey::from_slice(&[3u8; 32]).unwrap();
    let token = result::sign(&result_key, &json!({"sub": "till-1", "exp": 2_000}));
    accepted(
        "attestation result",
        outcome(result::verify(result_key.verifying_key(), &token, 1_000)),
    );
    let es256 = json!({"alg": "ES256", "typ": "JWT"});
    let sig_of = |t: &str| t.rsplit('.').next().unwrap().to_owned();

    refused_by_name(
        "attestation service",
        vec![
            // Challenge requests.
            case("Challenge for an empty device name", "BadRequest", || {
                outcome(challenge("", TeeKind::Dev, None))
            }),
            case(
                "Challenge for a device name of 254 characters",
                "BadRequest",
                || outcome(challenge(&"a".repeat(254), TeeKind::Dev, None)),
            ),
            case(
                "Challenge with an agent key that is not base64",
                "BadRequest",
                || {
                    outcome(svc.challenge(
                        &ChallengeRequest {
                            device: "till-1".into(),
                            agent_public_key: "%%%".into(),
                            tee: TeeKind::Dev,
                            tpm: None,
                        },
                        att_now(),
                    ))
                },
            ),
            case(
                "Challenge with an agent key that is not a SubjectPublicKeyInfo",
                "BadRequest",
                || {
                    outcome(svc.challenge(
                        &ChallengeRequest {
                            device: "till-1".into(),
                            agent_public_key: B64.encode(b"not a key"),
                            tee: TeeKind::Dev,
                            tpm: None,
                        },
                        att_now(),
                    ))
                },
            ),
            case("Challenge with an agent key of 4 KiB", "BadRequest", || {
                outcome(svc.challenge(
                    &ChallengeRequest {
                        device: "till-1".into(),
                        agent_public_key: B64.encode([0x30; 4096]),
                        tee: TeeKind::Dev,
                        tpm: None,
                    },
                    att_now(),
                ))
            }),
            case(
                "TPM challenge without EK certificate and AK",
                "BadRequest",
                || outcome(challenge("till-1", TeeKind::Tpm, None)),
            ),
            case(
                "TPM challenge with an EK certificate that is not base64",
                "BadRequest",
                || {
                    outcome(challenge(
                        "till-1",
                        TeeKind::Tpm,
                        Some(TpmEnrolment {
                            ek_certificate: "%%%".into(),
                            ak_public_area: B64.encode([0u8; 4]),
                        }),
                    ))
                },
            ),
            case(
                "TPM challenge with an EK from no configured EK CA",
                "ChainInvalid",
                || {
                    outcome(challenge(
                        "till-1",
                        TeeKind::Tpm,
                        Some(TpmEnrolment {
                            ek_certificate: B64.encode(b"not a certificate"),
                            ak_public_area: B64.encode([0u8; 4]),
                        }),
                    ))
                },
            ),
            // Evidence requests.
            case(
                "Evidence answering a nonce that was never issued",
                "UnknownNonce",
                || {
                    let mut c = ask(TeeKind::Dev);
                    c.nonce = B64.encode([0u8; 64]);
                    answer(&c, "till-1", &csr, dev_over(&[0; 64]))
                },
            ),
            case("Evidence answering an edited nonce", "UnknownNonce", || {
                let mut c = ask(TeeKind::Dev);
                edit_b64(&mut c.nonce, |n| {
                    let last = n.len() - 1;
                    flip(n, last);
                });
                answer(&c, "till-1", &csr, dev_over(&bound(&c)))
            }),
            case(
                "Evidence with a nonce that is not base64",
                "BadRequest",
                || {
                    let mut c = ask(TeeKind::Dev);
                    c.nonce = "%%%".into();
                    answer(&c, "till-1", &csr, dev_over(&[0; 64]))
                },
            ),
            case(
                "Evidence after its challenge expired",
                "UnknownNonce",
                || {
                    let c = ask(TeeKind::Dev);
                    outcome(svc.evidence(
                        &EvidenceRequest {
                            device: "till-1".into(),
                            nonce: c.nonce.clone(),
                            csr: csr.clone(),
                            evidence: dev_over(&bound(&c)),
                        },
                        att_now() + Duration::from_secs(31),
                    ))
                },
            ),
            case(
                "Evidence for another device than its challenge",
                "ChallengeMismatch",
                || {
                    let c = ask(TeeKind::Dev);
                    answer(&c, "till-2", &csr, dev_over(&bound(&c)))
                },
            ),
            case(
                "Evidence of another kind than its challenge",
                "ChallengeMismatch",
                || {
                    let c = ask(TeeKind::Dev);
                    let quote = B64.encode(att("trustee-tdx_quote_5.dat"));
                    answer(&c, "till-1", &csr, Evidence::Tdx { quote })
                },
            ),
            case("Evidence with a CSR that is not PEM", "InvalidCsr", || {
                let c = ask(TeeKind::Dev);
                answer(&c, "till-1", "not a CSR", dev_over(&bound(&c)))
            }),
            case("Evidence with a CSR for another key", "InvalidCsr", || {
                let c = ask(TeeKind::Dev);
                let (_, other) = agent_key();
                answer(&c, "till-1", &other, dev_over(&bound(&c)))
            }),
            case(
                "SNP evidence whose report is not base64",
                "BadRequest",
                || {
                    let c = ask(TeeKind::SevSnp);
                    let vcek = B64.encode(att("trustee-snp-vcek.der"));
                    answer(
                        &c,
                        "till-1",
                        &csr,
                        Evidence::SevSnp {
                            report: "%%%".into(),
                            vcek,
                        },
                    )
                },
            ),
            case(
                "Genuine SNP report not bound to the challenge",
                "ReportDataMismatch",
                || {
                    let c = ask(TeeKind::SevSnp);
                    let report = B64.encode(att("trustee-snp-report.bin"));
                    let vcek = B64.encode(att("trustee-snp-vcek.der"));
                    answer(&c, "till-1", &csr, Evidence::SevSnp { report, vcek })
                },
            ),
            case(
                "Genuine TDX quote not bound to the challenge",
                "ReportDataMismatch",
                || {
                    let c = ask(TeeKind::Tdx);
                    let quote = B64.encode(att("trustee-tdx_quote_5.dat"));
                    answer(&c, "till-1", &csr, Evidence::Tdx { quote })
                },
            ),
            case(
                "Dev evidence bound to another challenge",
                "ReportDataMismatch",
                || {
                    let c = ask(TeeKind::Dev);
                    let other = ask(TeeKind::Dev);
                    answer(&c, "till-1", &csr, dev_over(&bound(&other)))
                },
            ),
            // The policy's inputs.
            case("Claims JSON that is not JSON", "Eval", || {
                outcome(reference_policy().evaluate_json("{\"tee\": "))
            }),
            case("Policy reference data that is not JSON", "Data", || {
                let root = edgefleet_e2e::workspace_root();
                let rego = std::fs::read_to_string(root.join("policies/attestation.rego")).unwrap();
                outcome(Policy::load("attestation", &rego, "{\"reference\": "))
            }),
            case("Policy that does not compile", "Compile", || {
                outcome(Policy::load(
                    "broken",
                    "package edgefleet.attestation\nallow if {",
                    "{}",
                ))
            }),
            // Signed attestation results, as relying parties read them.
            case(
                "Attestation result that is not a compact JWS",
                "Malformed",
                || outcome(result::verify(result_key.verifying_key(), "a.b", 1_000)),
            ),
            case("Attestation result with alg none", "Unsupported", || {
                let t = jws(&json!({"alg": "none"}), &json!({"exp": 2_000}), "");
                outcome(result::verify(result_key.verifying_key(), &t, 1_000))
            }),
            case(
                "Attestation result with a forged payload",
                "SignatureInvalid",
                || {
                    let t = jws(
                        &es256,
                        &json!({"sub": "till-2", "exp": 2_000}),
                        &sig_of(&token),
                    );
                    outcome(result::verify(result_key.verifying_key(), &t, 1_000))
                },
            ),
            case(
                "Attestation result signed by another key",
                "SignatureInvalid",
                || {
                    let other = p256::ecdsa::SigningKey::from_slice(&[4u8; 32]).unwrap();
                    let t = result::sign(&other, &json!({"sub": "till-1", "exp": 2_000}));
                    outcome(result::verify(result_key.verifying_key(), &t, 1_000))
                },
            ),
            case("Attestation result past its exp", "Malformed", || {
                outcome(result::verify(result_key.verifying_key(), &token, 2_000))
            }),
        ],
    );
}

// ---- model-signing bundles --------------------------------------------------------

fn ms() -> PathBuf {
    fixtures().join("model-signing")
}

/// 2026-01-01: inside the fixture certificates' validity (until 2035).
fn ms_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_225_600)
}

/// 2036-07: after the fixture certificates expired.
fn ms_later() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(2_100_000_000)
}

/// The golden key-mode bundles' public key, pinned.
fn key_policy() -> TrustPolicy {
    let pem = std::fs::read_to_string(ms().join("keys/signing-key-pub.pem")).unwrap();
    TrustPolicy::keys([(
        "model-transparency".to_owned(),
        PublicKey::from_pem(&pem).unwrap(),
    )])
}

/// The golden certificate-mode bundles' root, pinned for `identity`.
fn root_policy(identity: &str) -> TrustPolicy {
    let pem = std::fs::read_to_string(ms().join("keys/ca-cert.pem")).unwrap();
    TrustPolicy::roots([PinnedRoot {
        name: "test-ca".into(),
        der: certs::pem_certificates(&pem).unwrap().remove(0),
        identities: vec![identity.to_owned()],
    }])
}

/// A writable copy of a fixture model (the fixtures are read-only).
fn copy_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(ms().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::write(dir.path().join(entry.file_name()), read(&entry.path())).unwrap();
    }
    dir
}

/// The golden bundle `sig` with its JSON edited.
fn edited(sig: &str, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut b: Value = serde_json::from_slice(&read(&ms().join(sig))).unwrap();
    edit(&mut b);
    serde_json::to_vec(&b).unwrap()
}

/// The golden key-mode bundle (v1.1.0), edited, against its model and key.
fn golden_key(edit: impl FnOnce(&mut Value)) -> Outcome {
    golden_key_bytes(edited("v1.1.0-ek.sig", edit))
}

fn golden_key_bytes(bundle: Vec<u8>) -> Outcome {
    outcome(verify(
        &bundle,
        &ms().join("v1.1.0-elliptic-key"),
        &key_policy(),
        ms_now(),
        &[],
    ))
}

/// The golden certificate-mode bundle (v1.1.0), edited, against its model.
fn golden_cert(edit: impl FnOnce(&mut Value), policy: &TrustPolicy, at: SystemTime) -> Outcome {
    outcome(verify(
        &edited("v1.1.0-cert.sig", edit),
        &ms().join("v1.1.0-certificate"),
        policy,
        at,
        &[],
    ))
}

/// The golden key-mode bundle against a copy of its model changed by `change`.
fn golden_on_changed_model(change: impl FnOnce(&Path)) -> Outcome {
    let model = copy_model("v1.1.0-elliptic-key");
    change(model.path());
    outcome(verify(
        &read(&ms().join("v1.1.0-ek.sig")),
        model.path(),
        &key_policy(),
        ms_now(),
        &[],
    ))
}

#[test]
fn model_signing_bundles_are_refused_by_name() {
    accepted("golden key-mode bundle", golden_key(|_| {}));
    accepted(
        "golden certificate-mode bundle",
        golden_cert(|_| {}, &root_policy("intermediate-ca"), ms_now()),
    );
    let certificates = "/verificationMaterial/x509CertificateChain/certificates";
    refused_by_name(
        "model-signing bundles",
        vec![
            case("Bundle that is not JSON", "MalformedBundle", || {
                golden_key_bytes(b"\x00garbage".to_vec())
            }),
            case("Bundle that is empty", "MalformedBundle", || {
                golden_key_bytes(Vec::new())
            }),
            case("Bundle larger than 16 MiB", "MalformedBundle", || {
                golden_key_bytes(vec![b' '; MAX_BUNDLE_BYTES + 1])
            }),
            case("Bundle JSON of another shape", "MalformedBundle", || {
                golden_key_bytes(br#"{"mediaType": 5}"#.to_vec())
            }),
            case(
                "Bundle with an unknown media type",
                "UnsupportedMediaType",
                || {
                    golden_key(|b| {
                        b["mediaType"] =
                            json!("application/vnd.dev.sigstore.bundle+json;version=0.1")
                    })
                },
            ),
            case("Bundle without a DSSE envelope", "NoEnvelope", || {
                golden_key(|b| {
                    b.as_object_mut().unwrap().remove("dsseEnvelope");
                })
            }),
            case(
                "DSSE envelope with two signatures",
                "SignatureCount",
                || {
                    golden_key(|b| {
                        let s = b["dsseEnvelope"]["signatures"][0].clone();
                        b["dsseEnvelope"]["signatures"] = json!([s.clone(), s]);
                    })
                },
            ),
            case("DSSE envelope with no signature", "SignatureCount", || {
                golden_key(|b| b["dsseEnvelope"]["signatures"] = json!([]))
            }),
            case(
                "DSSE payload type other than in-toto",
                "UnsupportedPayloadType",
                || golden_key(|b| b["dsseEnvelope"]["payloadType"] = json!("application/json")),
            ),
            case(
                "DSSE payload that is not base64",
                "MalformedPayload",
                || golden_key(|b| b["dsseEnvelope"]["payload"] = json!("%%%")),
            ),
            case(
                "DSSE signature that is not base64",
                "MalformedPayload",
                || golden_key(|b| b["dsseEnvelope"]["signatures"][0]["sig"] = json!("%%%")),
            ),
            case(
                "DSSE signature with a flipped byte",
                "SignatureInvalid",
                || {
                    golden_key(|b| {
                        let mut sig = B64
                            .decode(b["dsseEnvelope"]["signatures"][0]["sig"].as_str().unwrap())
                            .unwrap();
                        let n = sig.len() - 3;
                        flip(&mut sig, n);
                        b["dsseEnvelope"]["signatures"][0]["sig"] = json!(B64.encode(sig));
                    })
                },
            ),
            case(
                "DSSE payload edited after signing",
                "SignatureInvalid",
                || {
                    golden_key(|b| {
                        let p = B64
                            .decode(b["dsseEnvelope"]["payload"].as_str().unwrap())
                            .unwrap();
                        let p = String::from_utf8(p)
                            .unwrap()
                            .replacen("signme-2", "signme-3", 1);
                        b["dsseEnvelope"]["payload"] = json!(B64.encode(p));
                    })
                },
            ),
            case(
                "Bundle without verification material",
                "NoVerificationMaterial",
                || golden_key(|b| b["verificationMaterial"] = json!({})),
            ),
            case(
                "Key-mode bundle verified against another pinned key",
                "UntrustedSigner",
                || {
                    let other = PrivateKey::from_pem(
                        &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                            .unwrap()
                            .serialize_pem(),
                    )
                    .unwrap()
                    .public_key();
                    outcome(verify(
                        &read(&ms().join("v1.1.0-ek.sig")),
                        &ms().join("v1.1.0-elliptic-key"),
                        &TrustPolicy::keys([("someone-else".to_owned(), other)]),
                        ms_now(),
                        &[],
                    ))
                },
            ),
            case(
                "Key-mode bundle without a key hint, signed by no pinned key",
                "SignatureInvalid",
                || {
                    let other = PrivateKey::from_pem(
                        &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
                            .unwrap()
                            .serialize_pem(),
                    )
                    .unwrap()
                    .public_key();
                    outcome(verify(
                        &edited("v1.1.0-ek.sig", |b| {
                            b["verificationMaterial"]["publicKey"]["hint"] = json!("")
                        }),
                        &ms().join("v1.1.0-elliptic-key"),
                        &TrustPolicy::keys([("someone-else".to_owned(), other)]),
                        ms_now(),
                        &[],
                    ))
                },
            ),
            case(
                "Key-mode bundle where only a root is pinned",
                "UntrustedSigner",
                || {
                    outcome(verify(
                        &read(&ms().join("v1.1.0-ek.sig")),
                        &ms().join("v1.1.0-elliptic-key"),
                        &root_policy("intermediate-ca"),
                        ms_now(),
                        &[],
                    ))
                },
            ),
            // The golden bundle against a changed model.
            case("Model file changed after signing", "DigestMismatch", || {
                golden_on_changed_model(|m| {
                    std::fs::write(m.join("signme-2"), b"tampered").unwrap()
                })
            }),
            case(
                "Model file the signature does not cover",
                "ExtraFiles",
                || {
                    golden_on_changed_model(|m| {
                        std::fs::write(m.join("payload.bin"), b"smuggled").unwrap()
                    })
                },
            ),
            case("Signed model file missing", "MissingFiles", || {
                golden_on_changed_model(|m| std::fs::remove_file(m.join("signme-1")).unwrap())
            }),
            // Certificate mode.
            case(
                "Certificate-mode bundle where only keys are pinned",
                "UntrustedSigner",
                || golden_cert(|_| {}, &key_policy(), ms_now()),
            ),
            case(
                "Certificate-mode bundle after its certificates expired",
                "CertificateNotValidAt",
                || golden_cert(|_| {}, &root_policy("intermediate-ca"), ms_later()),
            ),
            case(
                "Certificate-mode leaf matching no pinned identity",
                "IdentityMismatch",
                || golden_cert(|_| {}, &root_policy("release@example.com"), ms_now()),
            ),
            case(
                "Certificate-mode chain with its intermediate removed",
                "UntrustedChain",
                || {
                    golden_cert(
                        |b| {
                            let chain = b.pointer_mut(certificates).unwrap();
                            let leaf = chain[0].clone();
                            *chain = json!([leaf]);
                        },
                        &root_policy("intermediate-ca"),
                        ms_now(),
                    )
                },
            ),
            case(
                "Certificate-mode leaf with a byte appended",
                "MalformedCertificate",
                || {
                    golden_cert(
                        |b| {
                            let raw = &mut b.pointer_mut(certificates).unwrap()[0]["rawBytes"];
                            let mut der = B64.decode(raw.as_str().unwrap()).unwrap();
                            der.push(0);
                            *raw = json!(B64.encode(der));
                        },
                        &root_policy("intermediate-ca"),
                        ms_now(),
                    )
                },
            ),
            case(
                "Certificate-mode leaf that is not a certificate",
                "MalformedCertificate",
                || {
                    golden_cert(
                        |b| {
                            b.pointer_mut(certificates).unwrap()[0]["rawBytes"] =
                                json!(B64.encode(b"not a certificate"))
                        },
                        &root_policy("intermediate-ca"),
                        ms_now(),
                    )
                },
            ),
            case(
                "Certificate-mode leaf that is not base64",
                "MalformedPayload",
                || {
                    golden_cert(
                        |b| b.pointer_mut(certificates).unwrap()[0]["rawBytes"] = json!("%%%"),
                        &root_policy("intermediate-ca"),
                        ms_now(),
                    )
                },
            ),
            // Pinned signer keys, as EdgeModels and trust policies carry them.
            case(
                "Pinned public key that is a certificate PEM",
                "MalformedKey",
                || {
                    outcome(PublicKey::from_pem(
                        &std::fs::read_to_string(ms().join("keys/ca-cert.pem")).unwrap(),
                    ))
                },
            ),
            case("Pinned public key that is not PEM", "MalformedKey", || {
                outcome(PublicKey::from_pem("ssh-ed25519 AAAA not a pem key"))
            }),
            case(
                "Pinned public key that is not an ECDSA key",
                "UnsupportedKey",
                || outcome(PublicKey::from_spki_der(b"not a SubjectPublicKeyInfo")),
            ),
        ],
    );
}

/// A copy of the fixture model signed in key mode by a fresh P-256 key, and a policy
/// pinning that key: statements that are wrong but signed are refused after the
/// signature, by what is wrong in them.
struct Ours {
    model: tempfile::TempDir,
    key: PrivateKey,
    bundle: Vec<u8>,
    policy: TrustPolicy,
}

impl Ours {
    fn new() -> Self {
        let model = copy_model("v1.1.0-elliptic-key");
        let key = PrivateKey::from_pem(
            &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .unwrap()
                .serialize_pem(),
        )
        .unwrap();
        let bundle = sign(model.path(), &key, None, &SignOptions::default()).unwrap();
        let policy = TrustPolicy::keys([("ours".to_owned(), key.public_key())]);
        Self {
            model,
            key,
            bundle,
            policy,
        }
    }

    /// Our bundle with `payload` in place of the statement, signed again.
    fn with_payload(&self, payload: &[u8]) -> Vec<u8> {
        let mut b: Value = serde_json::from_slice(&self.bundle).unwrap();
        let sig = self
            .key
            .sign(&bundle::pae(bundle::IN_TOTO_PAYLOAD_TYPE, payload));
        b["dsseEnvelope"]["payload"] = json!(B64.encode(payload));
        b["dsseEnvelope"]["signatures"][0]["sig"] = json!(B64.encode(sig));
        serde_json::to_vec(&b).unwrap()
    }

    /// Our bundle with its statement edited, signed again.
    fn resigned(&self, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
        let b: Value = serde_json::from_slice(&self.bundle).unwrap();
        let mut st: Value = serde_json::from_slice(
            &B64.decode(b["dsseEnvelope"]["payload"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        edit(&mut st);
        self.with_payload(&serde_json::to_vec(&st).unwrap())
    }

    fn verify(&self, bundle: &[u8]) -> Outcome {
        outcome(verify(
            bundle,
            self.model.path(),
            &self.policy,
            ms_now(),
            &[],
        ))
    }

    fn edit(&self, edit: impl FnOnce(&mut Value)) -> Outcome {
        self.verify(&self.resigned(edit))
    }
}

/// Recomputes the subject digest, so that only the resource edit is wrong.
fn fix_subject(s: &mut Value) {
    let mut h = Sha256::new();
    for r in s["predicate"]["resources"].as_array().unwrap() {
        h.update(hex::decode(r["digest"].as_str().unwrap()).unwrap());
    }
    s["subject"][0]["digest"]["sha256"] = json!(hex::encode(h.finalize()));
}

fn resources(s: &mut Value) -> &mut Vec<Value> {
    s["predicate"]["resources"].as_array_mut().unwrap()
}

#[test]
fn signed_but_hostile_statements_are_refused_by_name() {
    let ours = Ours::new();
    accepted("our bundle", ours.verify(&ours.bundle));
    accepted("our bundle signed again unedited", ours.edit(|_| {}));
    refused_by_name(
        "signed model-signing statements",
        vec![
            case(
                "Signed payload that is not JSON",
                "MalformedPayload",
                || ours.verify(&ours.with_payload(b"not json")),
            ),
            case(
                "Statement of another in-toto type",
                "UnsupportedStatementType",
                || ours.edit(|s| s["_type"] = json!("https://in-toto.io/Statement/v0.1")),
            ),
            case(
                "Statement with the legacy v0.1 predicate",
                "UnsupportedPredicateType",
                || ours.edit(|s| s["predicateType"] = json!("https://model_signing/Digests/v0.1")),
            ),
            case(
                "Predicate without its resources",
                "MalformedPayload",
                || {
                    ours.edit(|s| {
                        s["predicate"].as_object_mut().unwrap().remove("resources");
                    })
                },
            ),
            case("Statement with two subjects", "MalformedPayload", || {
                ours.edit(|s| {
                    let subject = s["subject"][0].clone();
                    s["subject"].as_array_mut().unwrap().push(subject);
                })
            }),
            case(
                "Statement whose subject digest is not its resources'",
                "SubjectDigestMismatch",
                || ours.edit(|s| s["subject"][0]["digest"]["sha256"] = json!("00".repeat(32))),
            ),
            case(
                "Resource digest that is not 64 hex digits",
                "MalformedResource",
                || ours.edit(|s| resources(s)[0]["digest"] = json!("zz")),
            ),
            case(
                "Serialization by an unknown method",
                "UnsupportedSerialization",
                || ours.edit(|s| s["predicate"]["serialization"]["method"] = json!("tarball")),
            ),
            case(
                "Serialization with a hash other than SHA-256",
                "UnsupportedSerialization",
                || ours.edit(|s| s["predicate"]["serialization"]["hash_type"] = json!("blake2")),
            ),
            case(
                "Shard serialization without a shard size",
                "UnsupportedSerialization",
                || ours.edit(|s| s["predicate"]["serialization"]["method"] = json!("shards")),
            ),
            case(
                "Resource name escaping the model (../etc/passwd)",
                "MalformedResource",
                || ours.edit(|s| resources(s)[0]["name"] = json!("../etc/passwd")),
            ),
            case(
                "Resource name that is absolute (/etc/passwd)",
                "MalformedResource",
                || ours.edit(|s| resources(s)[0]["name"] = json!("/etc/passwd")),
            ),
            case(
                "Resource name with an empty component (a//b)",
                "MalformedResource",
                || ours.edit(|s| resources(s)[0]["name"] = json!("a//b")),
            ),
            case(
                "Resource name with a dot component (./signme-1)",
                "MalformedResource",
                || ours.edit(|s| resources(s)[0]["name"] = json!("./signme-1")),
            ),
            case(
                "Resource with an unknown digest algorithm",
                "MalformedResource",
                || ours.edit(|s| resources(s)[0]["algorithm"] = json!("md5")),
            ),
            case("Resource listed twice", "MalformedResource", || {
                ours.edit(|s| {
                    let r = resources(s)[0].clone();
                    resources(s).push(r);
                    fix_subject(s);
                })
            }),
            case(
                "Manifest naming a file the model lacks",
                "MissingFiles",
                || {
                    ours.edit(|s| {
                        resources(s).push(json!({
                            "name": "ghost.bin", "algorithm": "sha256", "digest": "00".repeat(32),
                        }));
                        fix_subject(s);
                    })
                },
            ),
            case(
                "Manifest leaving out a file of the model",
                "ExtraFiles",
                || {
                    ours.edit(|s| {
                        resources(s).remove(0);
                        fix_subject(s);
                    })
                },
            ),
            case(
                "Manifest with a wrong file digest",
                "DigestMismatch",
                || {
                    ours.edit(|s| {
                        resources(s)[0]["digest"] = json!("11".repeat(32));
                        fix_subject(s);
                    })
                },
            ),
        ],
    );
}

// ---- bootstrap tokens and other CRD-side parsers ----------------------------------

/// A predicate-style check: true when the input is refused the way the API refuses it
/// (`None`, `false`, or the named error).
struct Check<'a> {
    name: &'static str,
    refused: Box<dyn Fn() -> bool + 'a>,
}

fn check<'a>(name: &'static str, refused: impl Fn() -> bool + 'a) -> Check<'a> {
    Check {
        name,
        refused: Box::new(refused),
    }
}

fn all_refused(surface: &str, checks: Vec<Check<'_>>) {
    let mut names = BTreeSet::new();
    let mut wrong = Vec::new();
    for c in &checks {
        assert!(
            names.insert(c.name),
            "{surface}: two checks are named {:?}",
            c.name
        );
        match std::panic::catch_unwind(AssertUnwindSafe(|| (c.refused)())) {
            Ok(true) => {}
            Ok(false) => wrong.push(format!("{}: not refused", c.name)),
            Err(_) => wrong.push(format!("{}: panicked", c.name)),
        }
    }
    assert!(
        wrong.is_empty(),
        "{surface}: {} of {} checks went wrong:\n  {}",
        wrong.len(),
        checks.len(),
        wrong.join("\n  ")
    );
}

/// A serde error whose message contains `needle`.
fn serde_refuses<T: serde::de::DeserializeOwned>(v: Value, needle: &str) -> bool {
    serde_json::from_value::<T>(v).is_err_and(|e| e.to_string().contains(needle))
}

#[test]
fn bootstrap_tokens_and_crd_fields_are_refused() {
    // The well-formed neighbours are accepted, so each refusal is the edit's.
    assert_eq!(
        parse_token("abc123.0123456789abcdef"),
        Some(("abc123", "0123456789abcdef"))
    );
    assert!(valid_token_id("abc123"));
    assert!(valid_name_pattern("till-*") && name_matches("till-*", "till-1"));
    assert_eq!(Status::parse("True"), Some(Status::True));
    assert_eq!("Ready".parse::<ModelState>(), Ok(ModelState::Ready));
    let token_spec = json!({
        "secretHash": format!("sha256:{}", "0".repeat(64)),
        "expirationTime": "2030-01-01T00:00:00Z",
    });
    assert!(
        serde_json::from_value::<edgefleet_crds::EdgeBootstrapTokenSpec>(token_spec.clone())
            .is_ok()
    );
    let with = |key: &str, value: Value| {
        let mut v = token_spec.clone();
        v[key] = value;
        v
    };
    let without = |key: &str| {
        let mut v = token_spec.clone();
        v.as_object_mut().unwrap().remove(key);
        v
    };
    all_refused(
        "bootstrap tokens and CRD fields",
        vec![
            check("Bootstrap token without the dot", || {
                parse_token("abc1230123456789abcdef").is_none()
            }),
            check("Bootstrap token with an empty secret", || {
                parse_token("abc123.").is_none()
            }),
            check("Bootstrap token with a secret one character short", || {
                parse_token("abc123.0123456789abcde").is_none()
            }),
            check("Bootstrap token with a secret one character long", || {
                parse_token("abc123.0123456789abcdefa").is_none()
            }),
            check("Bootstrap token in upper case", || {
                parse_token("ABC123.0123456789ABCDEF").is_none()
            }),
            check("Bootstrap token with a second dot", || {
                parse_token("abc123.0123456789abcdef.x").is_none()
            }),
            check("Bootstrap token with a trailing newline", || {
                parse_token("abc123.0123456789abcdef\n").is_none()
            }),
            check("Bootstrap token with a non-ASCII id", || {
                parse_token("abç12.0123456789abcdef").is_none()
            }),
            check("Bootstrap token with a NUL byte", || {
                parse_token("abc12\0.0123456789abcdef").is_none()
            }),
            check("Bootstrap token id that is a path", || {
                !valid_token_id("../../")
            }),
            check("Device name pattern that is empty", || {
                !valid_name_pattern("")
            }),
            check("Device name pattern of 254 characters", || {
                !valid_name_pattern(&"a".repeat(254))
            }),
            check("Device name pattern with a path separator", || {
                !valid_name_pattern("till/../*")
            }),
            check("Device name pattern with a question mark", || {
                !valid_name_pattern("till-?")
            }),
            check("Device name pattern in upper case", || {
                !valid_name_pattern("Till-*")
            }),
            check(
                "Device name with a prefix the pattern does not allow",
                || !name_matches("till-*", "xtill-1"),
            ),
            check("Device name longer than an exact pattern", || {
                !name_matches("till-1", "till-12")
            }),
            check("Device name overlapping the pattern's ends", || {
                !name_matches("ab*ba", "aba")
            }),
            check("Condition status in lower case", || {
                Status::parse("true").is_none()
            }),
            check("Condition status that is empty", || {
                Status::parse("").is_none()
            }),
            check("TEE kind that is unknown (sgx)", || {
                serde_refuses::<edgefleet_crds::TeeKind>(json!("sgx"), "unknown variant `sgx`")
            }),
            check("TEE kind in upper case (TPM)", || {
                serde_refuses::<edgefleet_crds::TeeKind>(json!("TPM"), "unknown variant `TPM`")
            }),
            check("Bootstrap token spec without a secret hash", || {
                serde_refuses::<edgefleet_crds::EdgeBootstrapTokenSpec>(
                    without("secretHash"),
                    "missing field `secretHash`",
                )
            }),
            check("Bootstrap token spec without an expiration time", || {
                serde_refuses::<edgefleet_crds::EdgeBootstrapTokenSpec>(
                    without("expirationTime"),
                    "missing field `expirationTime`",
                )
            }),
            check("Bootstrap token usage limit given as text", || {
                serde_refuses::<edgefleet_crds::EdgeBootstrapTokenSpec>(
                    with("usageLimit", json!("10")),
                    "invalid type: string",
                )
            }),
            check("Reported model state that is unknown", || {
                matches!(
                    "Running".parse::<ModelState>(),
                    Err(UnknownModelState(s)) if s == "Running"
                )
            }),
            check("Reported model state that is unknown, on the wire", || {
                serde_refuses::<ModelState>(json!("Running"), "unknown model state")
            }),
            check("Reported model state in lower case", || {
                matches!(
                    ModelState::try_from("ready".to_owned()),
                    Err(UnknownModelState(s)) if s == "ready"
                )
            }),
        ],
    );
}

// ---- plugins ----------------------------------------------------------------------

/// A component's preamble (`\0asm`, version 0x0d, layer 1) and nothing else: enough to
/// pass the header check, so that the limit checks behind it are reached.
const COMPONENT_HEADER: &[u8] = b"\0asm\x0d\0\x01\0";

fn deadline_ms(ms: u64) -> Limits {
    Limits {
        fuel: None,
        deadline: Some(Duration::from_millis(ms)),
        memory_bytes: 32 << 20,
    }
}

fn plugin_spec(wasm: &[u8], limits: Limits, grants: Grants) -> PluginSpec {
    PluginSpec {
        name: "bad-input".into(),
        wasm: wasm.to_vec(),
        limits,
        config: BTreeMap::new(),
        grants,
    }
}

/// Deterministic bytes that are not WebAssembly.
fn noise(n: u64) -> Vec<u8> {
    (0..n)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

#[test]
fn plugin_bytes_and_limits_are_refused_at_load() {
    let rt = PluginRuntime::new(None).unwrap();
    let load = |wasm: &[u8], limits: Limits| {
        outcome(rt.load(plugin_spec(wasm, limits, Grants::default())))
    };
    let load_granted =
        |grants: Grants| outcome(rt.load(plugin_spec(COMPONENT_HEADER, deadline_ms(100), grants)));
    refused_by_name(
        "plugin loading",
        vec![
            case("Plugin that is empty", "NotAComponent", || {
                load(b"", deadline_ms(100))
            }),
            case(
                "Plugin that is the Wasm magic number alone",
                "NotAComponent",
                || load(b"\0asm", deadline_ms(100)),
            ),
            case(
                "Plugin that is a core module, not a component",
                "NotAComponent",
                || load(b"\0asm\x01\0\0\0", deadline_ms(100)),
            ),
            case("Plugin that is a shell script", "NotAComponent", || {
                load(b"#!/bin/sh\nrm -rf /\n", deadline_ms(100))
            }),
            case("Plugin that is 4 KiB of noise", "NotAComponent", || {
                load(&noise(4096), deadline_ms(100))
            }),
            case("Component header followed by garbage", "Compile", || {
                let mut wasm = COMPONENT_HEADER.to_vec();
                wasm.extend(noise(256).iter().map(|b| b | 0x80));
                load(&wasm, deadline_ms(100))
            }),
            case(
                "Plugin limits with neither fuel nor a deadline",
                "InvalidLimits",
                || {
                    load(
                        COMPONENT_HEADER,
                        Limits {
                            fuel: None,
                            deadline: None,
                            memory_bytes: 1 << 20,
                        },
                    )
                },
            ),
            case(
                "Plugin deadline above MAX_DEADLINE",
                "InvalidLimits",
                || {
                    let over = u64::try_from(MAX_DEADLINE.as_millis()).unwrap() + 1;
                    load(COMPONENT_HEADER, deadline_ms(over))
                },
            ),
            case("Plugin deadline of zero", "InvalidLimits", || {
                load(COMPONENT_HEADER, deadline_ms(0))
            }),
            case("Plugin fuel of zero", "InvalidLimits", || {
                load(
                    COMPONENT_HEADER,
                    Limits {
                        fuel: Some(0),
                        deadline: None,
                        memory_bytes: 1 << 20,
                    },
                )
            }),
            case("Plugin memory cap of zero", "InvalidLimits", || {
                load(
                    COMPONENT_HEADER,
                    Limits {
                        memory_bytes: 0,
                        ..deadline_ms(100)
                    },
                )
            }),
            case(
                "Plugin read-only directory with a relative host path",
                "InvalidLimits",
                || {
                    load_granted(Grants {
                        read_only_dirs: vec![(PathBuf::from("data"), "/data".into())],
                        ..Grants::default()
                    })
                },
            ),
            case(
                "Plugin read-only directory at a guest path with ..",
                "InvalidLimits",
                || {
                    load_granted(Grants {
                        read_only_dirs: vec![(std::env::temp_dir(), "/data/../etc".into())],
                        ..Grants::default()
                    })
                },
            ),
            case(
                "Plugin read-only directory at a relative guest path",
                "InvalidLimits",
                || {
                    load_granted(Grants {
                        read_only_dirs: vec![(std::env::temp_dir(), "data".into())],
                        ..Grants::default()
                    })
                },
            ),
        ],
    );
}

/// `plugins/<name>` built for wasm32-wasip2 by scripts/test (`$EDGEFLEET_PLUGINS`, else
/// under the cache).
fn built_plugin(name: &str) -> Vec<u8> {
    let dir = std::env::var_os("EDGEFLEET_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| edgefleet_e2e::cache_dir().join("target-wasm/wasm32-wasip2/release"));
    let path = dir.join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; scripts/test builds the plugins \
             (cargo build --target wasm32-wasip2 in plugins/)",
            path.display()
        )
    })
}

#[test]
fn built_plugins_beyond_their_grants_are_refused_at_load() {
    let rt = PluginRuntime::new(None).unwrap();
    let passthrough = built_plugin("passthrough");
    let hostile_net = built_plugin("hostile_net");
    accepted(
        "passthrough",
        outcome(rt.load(plugin_spec(
            &passthrough,
            deadline_ms(100),
            Grants::default(),
        ))),
    );
    refused_by_name(
        "built plugins",
        vec![
            case(
                "Component importing sockets and files without grants",
                "ImportNotGranted",
                || {
                    outcome(rt.load(plugin_spec(
                        &hostile_net,
                        deadline_ms(100),
                        Grants::default(),
                    )))
                },
            ),
            case(
                "Component importing sockets with only clocks granted",
                "ImportNotGranted",
                || {
                    let clocks = Grants {
                        clocks: true,
                        ..Grants::default()
                    };
                    outcome(rt.load(plugin_spec(&hostile_net, deadline_ms(100), clocks)))
                },
            ),
            case("Component cut in half", "Compile", || {
                let half = &passthrough[..passthrough.len() / 2];
                outcome(rt.load(plugin_spec(half, deadline_ms(100), Grants::default())))
            }),
            case(
                "Good component with a deadline above MAX_DEADLINE",
                "InvalidLimits",
                || {
                    outcome(rt.load(plugin_spec(
                        &passthrough,
                        deadline_ms(60_001),
                        Grants::default(),
                    )))
                },
            ),
        ],
    );
}
