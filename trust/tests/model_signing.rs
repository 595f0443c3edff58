//! Model-signing verification against the reference implementation's golden bundles,
//! and round trips of our own signer, each with the failures that must be caught.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use edgefleet_trust::model_signing::{
    Method, PinnedRoot, PrivateKey, PublicKey, SignOptions, SignatureError, SignerIdentity,
    TrustPolicy, VerifiedModel, bundle, certs, sign, verify,
};
use rstest::rstest;
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/model-signing")
}

/// 2026-01-01T00:00:00Z: inside the fixture certificates' validity (until 2035).
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_225_600)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn key_policy() -> TrustPolicy {
    let pem = std::fs::read_to_string(fixtures().join("keys/signing-key-pub.pem")).unwrap();
    TrustPolicy::keys([(
        "model-transparency".to_owned(),
        PublicKey::from_pem(&pem).unwrap(),
    )])
}

fn root_policy(identity: &str) -> TrustPolicy {
    let pem = std::fs::read_to_string(fixtures().join("keys/ca-cert.pem")).unwrap();
    let der = certs::pem_certificates(&pem).unwrap().remove(0);
    TrustPolicy::roots([PinnedRoot {
        name: "test-ca".into(),
        der,
        identities: vec![identity.to_owned()],
    }])
}

/// Copies a fixture model into a writable temporary directory.
fn copy_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join(name);
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

const IGNORE_ME: &[&str] = &["ignore-me"];

#[rstest]
#[case::v1_0_0_key("v1.0.0-ek.sig", "v1.0.0-elliptic-key/signme-1", &[], 1)]
#[case::v1_0_1_key("v1.0.1-ek.sig", "v1.0.1-elliptic-key", IGNORE_ME, 2)]
#[case::v1_1_0_key("v1.1.0-ek.sig", "v1.1.0-elliptic-key", &[], 2)]
fn golden_key_bundles_verify(
    #[case] sig: &str,
    #[case] model: &str,
    #[case] ignore: &[&str],
    #[case] files: usize,
) {
    let ignore: Vec<String> = ignore.iter().map(|s| (*s).to_owned()).collect();
    let v = verify(
        &read(&fixtures().join(sig)),
        &fixtures().join(model),
        &key_policy(),
        now(),
        &ignore,
    )
    .unwrap_or_else(|e| panic!("{sig}: {e}"));
    assert_eq!(v.resources.len(), files);
    assert_eq!(v.method, Method::Files);
    assert!(matches!(&v.signer, SignerIdentity::Key { name, .. } if name == "model-transparency"));
    assert!(v.subject_digest.starts_with("sha256:") && v.subject_digest.len() == 71);
}

#[rstest]
#[case::v1_0_0_cert("v1.0.0-cert.sig", "v1.0.0-certificate", &[])]
#[case::v1_0_1_cert("v1.0.1-cert.sig", "v1.0.1-certificate", IGNORE_ME)]
#[case::v1_1_0_cert("v1.1.0-cert.sig", "v1.1.0-certificate", &[])]
fn golden_certificate_bundles_verify(
    #[case] sig: &str,
    #[case] model: &str,
    #[case] ignore: &[&str],
) {
    let ignore: Vec<String> = ignore.iter().map(|s| (*s).to_owned()).collect();
    let v = verify(
        &read(&fixtures().join(sig)),
        &fixtures().join(model),
        &root_policy("intermediate-ca"),
        now(),
        &ignore,
    )
    .unwrap_or_else(|e| panic!("{sig}: {e}"));
    match &v.signer {
        SignerIdentity::Certificate { name, identity, .. } => {
            assert_eq!(name, "test-ca");
            assert_eq!(identity, "intermediate-ca");
        }
        other => panic!("expected a certificate signer, got {other:?}"),
    }
}

/// The golden bundle `sig` verified against `model` (a fixture model's name, or the
/// absolute path of a copied one) at `at`.
fn verify_golden(
    sig: &str,
    model: impl AsRef<Path>,
    policy: &TrustPolicy,
    at: SystemTime,
) -> Result<VerifiedModel, SignatureError> {
    verify(
        &read(&fixtures().join(sig)),
        &fixtures().join(model),
        policy,
        at,
        &[],
    )
}

#[test]
fn v1_0_1_without_its_ignore_path_has_an_extra_file() {
    let err =
        verify_golden("v1.0.1-ek.sig", "v1.0.1-elliptic-key", &key_policy(), now()).unwrap_err();
    assert!(
        matches!(&err, SignatureError::ExtraFiles(f) if f == &["ignore-me".to_owned()]),
        "{err}"
    );
}

#[rstest]
#[case::tampered_file(|m: &Path| std::fs::write(m.join("signme-2"), b"tampered").unwrap(), "DigestMismatch", "signme-2")]
#[case::added_file(|m: &Path| std::fs::write(m.join("payload.bin"), b"smuggled").unwrap(), "ExtraFiles", "payload.bin")]
#[case::removed_file(|m: &Path| std::fs::remove_file(m.join("signme-1")).unwrap(), "MissingFiles", "signme-1")]
#[case::renamed_file(|m: &Path| std::fs::rename(m.join("signme-1"), m.join("signme-3")).unwrap(), "MissingFiles", "signme-1")]
fn a_changed_model_is_rejected_naming_the_file(
    #[case] change: fn(&Path),
    #[case] reason: &str,
    #[case] file: &str,
) {
    let model = copy_model("v1.1.0-elliptic-key");
    change(model.path());
    let err = verify_golden("v1.1.0-ek.sig", model.path(), &key_policy(), now()).unwrap_err();
    assert_eq!(err.reason(), reason, "{err}");
    let named = match &err {
        SignatureError::DigestMismatch(f)
        | SignatureError::ExtraFiles(f)
        | SignatureError::MissingFiles(f) => f,
        other => panic!("expected the files named, got {other}"),
    };
    assert_eq!(named, &[file.to_owned()], "{err}");
}

#[test]
fn symlink_escaping_the_model_is_rejected() {
    let model = copy_model("v1.1.0-elliptic-key");
    std::fs::remove_file(model.path().join("signme-1")).unwrap();
    std::os::unix::fs::symlink(
        fixtures().join("v1.1.0-elliptic-key/signme-1"),
        model.path().join("signme-1"),
    )
    .unwrap();
    let err = verify_golden("v1.1.0-ek.sig", model.path(), &key_policy(), now()).unwrap_err();
    assert!(matches!(err, SignatureError::Symlink(_)), "{err}");
}

#[test]
fn another_key_is_not_trusted() {
    let other = PrivateKey::from_pem(&p384_pem()).unwrap().public_key();
    let policy = TrustPolicy::keys([("someone-else".to_owned(), other)]);
    let err = verify_golden("v1.1.0-ek.sig", "v1.1.0-elliptic-key", &policy, now()).unwrap_err();
    assert!(matches!(err, SignatureError::UntrustedSigner(_)), "{err}");
}

#[test]
fn key_signed_bundle_needs_a_pinned_key_not_a_root() {
    let policy = root_policy("intermediate-ca");
    let err = verify_golden("v1.1.0-ek.sig", "v1.1.0-elliptic-key", &policy, now()).unwrap_err();
    assert!(matches!(err, SignatureError::UntrustedSigner(_)), "{err}");
}

fn edit_bundle(sig: &str, f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut b: Value = serde_json::from_slice(&read(&fixtures().join(sig))).unwrap();
    f(&mut b);
    serde_json::to_vec(&b).unwrap()
}

#[rstest]
#[case::flipped_signature(|b: &mut Value| {
    let mut sig = B64.decode(b["dsseEnvelope"]["signatures"][0]["sig"].as_str().unwrap()).unwrap();
    let n = sig.len() - 3; sig[n] ^= 1;
    b["dsseEnvelope"]["signatures"][0]["sig"] = json!(B64.encode(sig));
}, "SignatureInvalid")]
#[case::edited_payload(|b: &mut Value| {
    let mut p = B64.decode(b["dsseEnvelope"]["payload"].as_str().unwrap()).unwrap();
    let s = String::from_utf8(p.clone()).unwrap().replacen("signme-2", "signme-3", 1);
    p = s.into_bytes();
    b["dsseEnvelope"]["payload"] = json!(B64.encode(p));
}, "SignatureInvalid")]
#[case::media_type(|b: &mut Value| b["mediaType"] = json!("application/vnd.dev.sigstore.bundle+json;version=0.1"), "UnsupportedMediaType")]
#[case::two_signatures(|b: &mut Value| {
    let s = b["dsseEnvelope"]["signatures"][0].clone();
    b["dsseEnvelope"]["signatures"] = json!([s.clone(), s]);
}, "SignatureCount")]
#[case::no_signature(|b: &mut Value| b["dsseEnvelope"]["signatures"] = json!([]), "SignatureCount")]
#[case::payload_type(|b: &mut Value| b["dsseEnvelope"]["payloadType"] = json!("application/json"), "UnsupportedPayloadType")]
#[case::no_envelope(|b: &mut Value| { b.as_object_mut().unwrap().remove("dsseEnvelope"); }, "NoEnvelope")]
#[case::no_material(|b: &mut Value| b["verificationMaterial"] = json!({}), "NoVerificationMaterial")]
#[case::bad_base64(|b: &mut Value| b["dsseEnvelope"]["payload"] = json!("%%%"), "MalformedPayload")]
fn broken_bundles_are_rejected_by_name(#[case] edit: fn(&mut Value), #[case] reason: &str) {
    let bundle = edit_bundle("v1.1.0-ek.sig", edit);
    let err = verify(
        &bundle,
        &fixtures().join("v1.1.0-elliptic-key"),
        &key_policy(),
        now(),
        &[],
    )
    .unwrap_err();
    assert_eq!(err.reason(), reason, "{err}");
}

#[test]
fn not_json_is_a_malformed_bundle() {
    let err = verify(
        b"\x00garbage",
        &fixtures().join("v1.1.0-elliptic-key"),
        &key_policy(),
        now(),
        &[],
    )
    .unwrap_err();
    assert_eq!(err.reason(), "MalformedBundle", "{err}");
}

#[test]
fn certificate_identity_must_match_a_pin() {
    let policy = root_policy("release@example.com");
    let err = verify_golden("v1.1.0-cert.sig", "v1.1.0-certificate", &policy, now()).unwrap_err();
    match err {
        SignatureError::IdentityMismatch { found, pinned } => {
            assert_eq!(found, ["intermediate-ca"]);
            assert_eq!(pinned, ["release@example.com"]);
        }
        other => panic!("expected IdentityMismatch, got {other}"),
    }
}

#[test]
fn certificates_are_checked_at_the_given_time() {
    let after_expiry = UNIX_EPOCH + Duration::from_secs(2_100_000_000); // 2036-07
    let policy = root_policy("intermediate-ca");
    let err = verify_golden(
        "v1.1.0-cert.sig",
        "v1.1.0-certificate",
        &policy,
        after_expiry,
    )
    .unwrap_err();
    assert_eq!(err.reason(), "CertificateNotValidAt", "{err}");
}

#[test]
fn a_chain_to_another_root_is_untrusted() {
    let other_root = root_ca("unrelated-root");
    let policy = TrustPolicy::roots([pin("other", &other_root, "intermediate-ca")]);
    let err = verify_golden("v1.1.0-cert.sig", "v1.1.0-certificate", &policy, now()).unwrap_err();
    assert_eq!(err.reason(), "UntrustedChain", "{err}");
}

#[test]
fn a_chain_with_its_intermediate_removed_is_untrusted() {
    let bundle = edit_bundle("v1.1.0-cert.sig", |b| {
        let leaf = b["verificationMaterial"]["x509CertificateChain"]["certificates"][0].clone();
        b["verificationMaterial"]["x509CertificateChain"]["certificates"] = json!([leaf]);
    });
    let err = verify(
        &bundle,
        &fixtures().join("v1.1.0-certificate"),
        &root_policy("intermediate-ca"),
        now(),
        &[],
    )
    .unwrap_err();
    assert_eq!(err.reason(), "UntrustedChain", "{err}");
}

// ---- our signer -------------------------------------------------------------------

fn p384_pem() -> String {
    let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    k.serialize_pem()
}

fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("weights")).unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("weights/model.gguf"), &big).unwrap();
    std::fs::write(dir.path().join("config.json"), b"{\"ctx\": 2048}").unwrap();
    std::fs::write(dir.path().join("empty"), b"").unwrap();
    std::fs::create_dir_all(dir.path().join(".git")).unwrap();
    std::fs::write(dir.path().join(".git/HEAD"), b"ref: main").unwrap();
    dir
}

fn pem_key(alg: &'static rcgen::SignatureAlgorithm) -> PrivateKey {
    PrivateKey::from_pem(&rcgen::KeyPair::generate_for(alg).unwrap().serialize_pem()).unwrap()
}

/// A key-mode bundle of `model` signed by `key` with `method`, and a policy that trusts
/// exactly that key.
fn key_signed(model: &Path, key: &PrivateKey, method: Method) -> (Vec<u8>, TrustPolicy) {
    let options = SignOptions {
        method,
        ignore_paths: vec![],
    };
    let bundle = sign(model, key, None, &options).unwrap();
    (
        bundle,
        TrustPolicy::keys([("me".to_owned(), key.public_key())]),
    )
}

#[rstest]
#[case::p256_files(&rcgen::PKCS_ECDSA_P256_SHA256, Method::Files, 3)]
#[case::p384_files(&rcgen::PKCS_ECDSA_P384_SHA384, Method::Files, 3)]
#[case::p256_shards(&rcgen::PKCS_ECDSA_P256_SHA256, Method::Shards(65_536), 6)]
#[case::p384_shards_odd(&rcgen::PKCS_ECDSA_P384_SHA384, Method::Shards(100_000), 4)]
fn our_key_bundles_round_trip(
    #[case] alg: &'static rcgen::SignatureAlgorithm,
    #[case] method: Method,
    #[case] resources: usize,
) {
    let model = model_dir();
    let (bundle, policy) = key_signed(model.path(), &pem_key(alg), method);
    let v = verify(&bundle, model.path(), &policy, now(), &[]).unwrap();
    assert_eq!(v.method, method);
    // `.git` is ignored; an empty file is a resource in files mode only (as in the reference).
    assert_eq!(v.resources.len(), resources, "{:?}", v.resources);
    assert!(v.resources.iter().all(|(n, _)| !n.starts_with(".git")));

    // The same bundle no longer verifies once a byte of the model changes.
    let path = model.path().join("weights/model.gguf");
    let mut data = std::fs::read(&path).unwrap();
    data[250_000] ^= 0xff;
    std::fs::write(&path, data).unwrap();
    let err = verify(&bundle, model.path(), &policy, now(), &[]).unwrap_err();
    assert_eq!(err.reason(), "DigestMismatch", "{err}");
}

#[test]
fn p521_keys_sign_and_verify_with_sha512() {
    // rcgen cannot make P-521 keys; this is one made by `openssl genpkey -algorithm EC
    // -pkeyopt ec_paramgen_curve:P-521`.
    let pem = "-----BEGIN PRIVATE KEY-----
MIHuAgEAMBAGByqGSM49AgEGBSuBBAAjBIHWMIHTAgEBBEIArnZQD0GalfWAv41C
5HO1cnyZfTC2FiXP4gqPu9TZIl7uQulPYS+2fBF4bPqADhzt3pxU7+VdoOd9ARDr
hfq7DbGhgYkDgYYABAEFvf9t4KxURdWxBCWxtRgMHOoMSL368BmMOBnL7ZfY52Xs
O1Pbk/c+JPSoAUkhV1U3mN0LrS0ayGOTcbz+qEKs+gH1Bo5hwexSXf4Y8FIORX39
wPf51PfesH14pT3Xyktmy/Z/fQf1YHct5Qhr4V6/dNI1/a6gQZ/mFAvoP+8WLgtS
rw==
-----END PRIVATE KEY-----
";
    let key = PrivateKey::from_pem(pem).unwrap();
    assert_eq!(key.public_key().curve(), "P-521");
    let model = model_dir();
    let (bundle, policy) = key_signed(model.path(), &key, Method::Files);
    verify(&bundle, model.path(), &policy, now(), &[]).unwrap();
    let other = TrustPolicy::keys([(
        "other".to_owned(),
        pem_key(&rcgen::PKCS_ECDSA_P256_SHA256).public_key(),
    )]);
    assert_eq!(
        verify(&bundle, model.path(), &other, now(), &[])
            .unwrap_err()
            .reason(),
        "UntrustedSigner"
    );
}

/// Recomputes the subject digest so that only the resource edit is wrong.
fn fix_subject(s: &mut Value) {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for r in s["predicate"]["resources"].as_array().unwrap() {
        h.update(hex::decode(r["digest"].as_str().unwrap()).unwrap());
    }
    s["subject"][0]["digest"]["sha256"] = json!(hex::encode(h.finalize()));
}

/// Re-signs a bundle after editing its statement, so that only the edit is wrong.
fn resign(bundle: &[u8], key: &PrivateKey, f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut b: Value = serde_json::from_slice(bundle).unwrap();
    let mut st: Value = serde_json::from_slice(
        &B64.decode(b["dsseEnvelope"]["payload"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    f(&mut st);
    let payload = serde_json::to_vec(&st).unwrap();
    let sig = key.sign(&bundle::pae(bundle::IN_TOTO_PAYLOAD_TYPE, &payload));
    b["dsseEnvelope"]["payload"] = json!(B64.encode(&payload));
    b["dsseEnvelope"]["signatures"][0]["sig"] = json!(B64.encode(sig));
    serde_json::to_vec(&b).unwrap()
}

#[rstest]
#[case::subject_digest(|s: &mut Value| s["subject"][0]["digest"]["sha256"] = json!("00".repeat(32)), "SubjectDigestMismatch")]
#[case::legacy_predicate(|s: &mut Value| s["predicateType"] = json!("https://model_signing/Digests/v0.1"), "UnsupportedPredicateType")]
#[case::statement_type(|s: &mut Value| s["_type"] = json!("https://in-toto.io/Statement/v0.1"), "UnsupportedStatementType")]
#[case::hash_type(|s: &mut Value| s["predicate"]["serialization"]["hash_type"] = json!("blake2"), "UnsupportedSerialization")]
#[case::method(|s: &mut Value| s["predicate"]["serialization"]["method"] = json!("tarball"), "UnsupportedSerialization")]
#[case::path_escape(|s: &mut Value| s["predicate"]["resources"][0]["name"] = json!("../etc/passwd"), "MalformedResource")]
#[case::absolute(|s: &mut Value| s["predicate"]["resources"][0]["name"] = json!("/etc/passwd"), "MalformedResource")]
#[case::algorithm(|s: &mut Value| s["predicate"]["resources"][0]["algorithm"] = json!("md5"), "MalformedResource")]
#[case::duplicate(|s: &mut Value| {
    let r = s["predicate"]["resources"][0].clone();
    s["predicate"]["resources"].as_array_mut().unwrap().push(r);
    fix_subject(s);
}, "MalformedResource")]
fn signed_but_wrong_statements_are_rejected(#[case] edit: fn(&mut Value), #[case] reason: &str) {
    let model = model_dir();
    let key = pem_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (bundle, policy) = key_signed(model.path(), &key, Method::Files);
    let check = |b: Vec<u8>| verify(&b, model.path(), &policy, now(), &[]);
    // Re-signing without an edit still verifies, so each failure below is the edit's.
    check(resign(&bundle, &key, |_| {})).unwrap();
    let err = check(resign(&bundle, &key, edit)).unwrap_err();
    assert_eq!(err.reason(), reason, "{err}");
}

#[rstest]
#[case::float_shard_size(json!(65536.0), None)]
#[case::fractional(json!(65536.5), Some("UnsupportedSerialization"))]
#[case::zero(json!(0), Some("UnsupportedSerialization"))]
#[case::negative(json!(-1), Some("UnsupportedSerialization"))]
fn shard_size_may_be_a_whole_float(#[case] size: Value, #[case] reason: Option<&str>) {
    let model = model_dir();
    let key = pem_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (bundle, policy) = key_signed(model.path(), &key, Method::Shards(65_536));
    let edited = resign(&bundle, &key, |s| {
        s["predicate"]["serialization"]["shard_size"] = size
    });
    match (verify(&edited, model.path(), &policy, now(), &[]), reason) {
        (Ok(v), None) => assert_eq!(v.method, Method::Shards(65_536)),
        (Err(e), Some(r)) => assert_eq!(e.reason(), r, "{e}"),
        (other, want) => panic!("expected {want:?}, got {other:?}"),
    }
}

// ---- certificate mode with our own PKI -------------------------------------------

struct Ca {
    der: Vec<u8>,
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

fn ca_params(cn: &str, constraint: rcgen::BasicConstraints) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::Ca(constraint);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p
}

fn root_ca(cn: &str) -> Ca {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = ca_params(cn, rcgen::BasicConstraints::Unconstrained);
    let der = params.self_signed(&key).unwrap().der().to_vec();
    Ca { der, params, key }
}

/// Issues `params` under `parent` for a fresh key on `alg`: the certificate (DER) and key.
fn issue(
    parent: &Ca,
    params: &rcgen::CertificateParams,
    alg: &'static rcgen::SignatureAlgorithm,
) -> (Vec<u8>, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let issuer = rcgen::Issuer::from_params(&parent.params, &parent.key);
    let der = params.signed_by(&key, &issuer).unwrap().der().to_vec();
    (der, key)
}

fn sub_ca(parent: &Ca, params: rcgen::CertificateParams) -> Ca {
    let (der, key) = issue(parent, &params, &rcgen::PKCS_ECDSA_P256_SHA256);
    Ca { der, params, key }
}

/// A leaf's parameters: the e-mail identity and the key usages.
fn leaf_params(
    email: &str,
    ku: Vec<rcgen::KeyUsagePurpose>,
    eku: Vec<rcgen::ExtendedKeyUsagePurpose>,
) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::Rfc822Name(email.try_into().unwrap())];
    p.key_usages = ku;
    p.extended_key_usages = eku;
    p
}

/// Issues a leaf under `parent` for a fresh key on `alg`: its DER and its signing key.
fn issue_leaf(
    parent: &Ca,
    params: &rcgen::CertificateParams,
    alg: &'static rcgen::SignatureAlgorithm,
) -> (Vec<u8>, PrivateKey) {
    let (der, key) = issue(parent, params, alg);
    (der, PrivateKey::from_pem(&key.serialize_pem()).unwrap())
}

/// A P-384 "model publisher" leaf with the given key usages.
fn leaf(
    ca: &Ca,
    san_email: &str,
    ku: Vec<rcgen::KeyUsagePurpose>,
    eku: Vec<rcgen::ExtendedKeyUsagePurpose>,
) -> (Vec<u8>, PrivateKey) {
    let mut p = leaf_params(san_email, ku, eku);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "model publisher");
    issue_leaf(ca, &p, &rcgen::PKCS_ECDSA_P384_SHA384)
}

/// A P-256 code-signing leaf, valid now or expired yesterday.
fn signing_leaf(parent: &Ca, email: &str, expired: bool) -> (Vec<u8>, PrivateKey) {
    let mut p = leaf_params(
        email,
        vec![rcgen::KeyUsagePurpose::DigitalSignature],
        vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning],
    );
    if expired {
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
        p.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    }
    issue_leaf(parent, &p, &rcgen::PKCS_ECDSA_P256_SHA256)
}

/// Signs a fresh model in certificate mode with `chain` and verifies it against `roots`
/// now: who signed, or why not.
fn verify_chain(
    chain: Vec<Vec<u8>>,
    key: &PrivateKey,
    roots: Vec<PinnedRoot>,
) -> Result<SignerIdentity, SignatureError> {
    let model = model_dir();
    let bundle = sign(model.path(), key, Some(&chain), &SignOptions::default()).unwrap();
    verify(
        &bundle,
        model.path(),
        &TrustPolicy::roots(roots),
        SystemTime::now(),
        &[],
    )
    .map(|v| v.signer)
}

fn pin(name: &str, ca: &Ca, id: &str) -> PinnedRoot {
    PinnedRoot {
        name: name.into(),
        der: ca.der.clone(),
        identities: vec![id.into()],
    }
}

/// [`verify_chain`] with `root` pinned as "r" for the identity a@x.example.
fn verify_under(
    root: &Ca,
    chain: Vec<Vec<u8>>,
    key: &PrivateKey,
) -> Result<SignerIdentity, SignatureError> {
    verify_chain(chain, key, vec![pin("r", root, "a@x.example")])
}

#[rstest]
#[case::good(vec![rcgen::KeyUsagePurpose::DigitalSignature], vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning], None)]
#[case::no_eku_is_fine(vec![rcgen::KeyUsagePurpose::DigitalSignature], vec![], None)]
#[case::server_auth_eku(vec![rcgen::KeyUsagePurpose::DigitalSignature], vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth], Some("ExtendedKeyUsage"))]
#[case::no_digital_signature(vec![rcgen::KeyUsagePurpose::KeyEncipherment], vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning], Some("KeyUsage"))]
fn certificate_mode_checks_key_usage(
    #[case] ku: Vec<rcgen::KeyUsagePurpose>,
    #[case] eku: Vec<rcgen::ExtendedKeyUsagePurpose>,
    #[case] reason: Option<&str>,
) {
    let root = root_ca("edgefleet test root");
    let (leaf_der, key) = leaf(&root, "release@edgefleet.example", ku, eku);
    let roots = vec![pin("release", &root, "release@edgefleet.example")];
    match (verify_chain(vec![leaf_der], &key, roots), reason) {
        (Ok(signer), None) => assert!(
            matches!(signer, SignerIdentity::Certificate { ref identity, .. } if identity == "release@edgefleet.example")
        ),
        (Err(e), Some(r)) => assert_eq!(e.reason(), r, "{e}"),
        (other, want) => panic!("expected {want:?}, got {other:?}"),
    }
}

#[test]
fn signing_refuses_a_key_that_is_not_the_leafs() {
    let root = root_ca("root");
    let (leaf_der, _) = leaf(
        &root,
        "a@b.example",
        vec![rcgen::KeyUsagePurpose::DigitalSignature],
        vec![],
    );
    let other = pem_key(&rcgen::PKCS_ECDSA_P384_SHA384);
    let err = sign(
        model_dir().path(),
        &other,
        Some(&[leaf_der]),
        &SignOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.reason(), "MalformedKey", "{err}");
}

#[test]
fn key_hint_matches_the_reference_pem_hash() {
    // The reference writes hex(sha256(PEM)) of the public key; the golden bundle's hint
    // must equal ours for the same key.
    let b: Value = serde_json::from_slice(&read(&fixtures().join("v1.1.0-ek.sig"))).unwrap();
    let pem = std::fs::read_to_string(fixtures().join("keys/signing-key-pub.pem")).unwrap();
    let ours = PublicKey::from_pem(&pem).unwrap().hint().unwrap();
    assert_eq!(
        b["verificationMaterial"]["publicKey"]["hint"]
            .as_str()
            .unwrap(),
        ours
    );
}

// ---- path building ----------------------------------------------------------------

#[test]
fn a_root_with_the_right_name_but_another_key_is_untrusted() {
    let real = root_ca("models root");
    let impostor = root_ca("models root");
    let (leaf, key) = signing_leaf(&real, "a@x.example", false);
    verify_chain(
        vec![leaf.clone()],
        &key,
        vec![pin("real", &real, "a@x.example")],
    )
    .unwrap();
    let err = verify_chain(
        vec![leaf],
        &key,
        vec![pin("impostor", &impostor, "a@x.example")],
    )
    .unwrap_err();
    assert_eq!(err.reason(), "UntrustedChain", "{err}");
}

#[test]
fn path_length_constraints_are_enforced() {
    let root = root_ca("root");
    let int1 = sub_ca(
        &root,
        ca_params("int1", rcgen::BasicConstraints::Constrained(0)),
    );
    let int2 = sub_ca(
        &int1,
        ca_params("int2", rcgen::BasicConstraints::Unconstrained),
    );
    let (leaf, key) = signing_leaf(&int1, "a@x.example", false);
    // int1 may issue leaves directly ...
    verify_under(&root, vec![leaf, int1.der.clone()], &key).unwrap();
    // ... but not through another intermediate.
    let (leaf, key) = signing_leaf(&int2, "a@x.example", false);
    let err = verify_under(&root, vec![leaf, int2.der, int1.der], &key).unwrap_err();
    assert_eq!(err.reason(), "UntrustedChain", "{err}");
    assert!(err.to_string().contains("allows 0 intermediates"), "{err}");
}

#[test]
fn an_intermediate_that_is_not_a_ca_cannot_issue() {
    let root = root_ca("root");
    let mut p = ca_params("not a ca", rcgen::BasicConstraints::Unconstrained);
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    let fake = sub_ca(&root, p);
    let (leaf, key) = signing_leaf(&fake, "a@x.example", false);
    let err = verify_under(&root, vec![leaf, fake.der], &key).unwrap_err();
    assert_eq!(err.reason(), "UntrustedChain", "{err}");
    assert!(err.to_string().contains("is not a CA certificate"), "{err}");
}

#[test]
fn an_expired_leaf_under_a_valid_root_is_rejected() {
    let root = root_ca("root");
    let (leaf, key) = signing_leaf(&root, "a@x.example", true);
    let err = verify_under(&root, vec![leaf], &key).unwrap_err();
    assert_eq!(err.reason(), "CertificateNotValidAt", "{err}");
}

#[test]
fn signers_sharing_a_root_each_match_their_own_identity() {
    let root = root_ca("shared root");
    let (leaf, key) = signing_leaf(&root, "second@x.example", false);
    let signer = verify_chain(
        vec![leaf],
        &key,
        vec![
            pin("first", &root, "first@x.example"),
            pin("second", &root, "second@x.example"),
        ],
    )
    .unwrap();
    assert!(
        matches!(signer, SignerIdentity::Certificate { ref name, .. } if name == "second"),
        "{signer:?}"
    );
}

#[test]
fn any_extended_key_usage_is_not_code_signing() {
    let root = root_ca("root");
    let p = leaf_params(
        "a@x.example",
        vec![rcgen::KeyUsagePurpose::DigitalSignature],
        vec![rcgen::ExtendedKeyUsagePurpose::Any],
    );
    let (leaf, key) = issue_leaf(&root, &p, &rcgen::PKCS_ECDSA_P256_SHA256);
    let err = verify_under(&root, vec![leaf], &key).unwrap_err();
    assert_eq!(err.reason(), "ExtendedKeyUsage", "{err}");
}

#[test]
fn allowed_symlinks_must_stay_inside_the_model() {
    let model = model_dir();
    let key = pem_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (bundle, policy) = key_signed(model.path(), &key, Method::Files);
    // The signer allowed symlinks and covered `alias`, a link to a file of the model.
    let config_digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(
            std::fs::read(model.path().join("config.json")).unwrap(),
        ))
    };
    let with_links = resign(&bundle, &key, |s| {
        s["predicate"]["serialization"]["allow_symlinks"] = json!(true);
        s["predicate"]["resources"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "alias", "algorithm": "sha256", "digest": config_digest}));
        fix_subject(s);
    });
    std::os::unix::fs::symlink(model.path().join("config.json"), model.path().join("alias"))
        .unwrap();
    verify(&with_links, model.path(), &policy, now(), &[]).unwrap();
    // The same link name pointing outside the model is refused, whatever it holds.
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(model.path().join("config.json"), outside.path()).unwrap();
    std::fs::remove_file(model.path().join("alias")).unwrap();
    std::os::unix::fs::symlink(outside.path(), model.path().join("alias")).unwrap();
    let err = verify(&with_links, model.path(), &policy, now(), &[]).unwrap_err();
    assert_eq!(err.reason(), "SymlinkNotAllowed", "{err}");
    // A directory link loop is refused too.
    std::fs::remove_file(model.path().join("alias")).unwrap();
    std::os::unix::fs::symlink(model.path(), model.path().join("alias")).unwrap();
    let err = verify(&with_links, model.path(), &policy, now(), &[]).unwrap_err();
    assert_eq!(err.reason(), "SymlinkNotAllowed", "{err}");
}
