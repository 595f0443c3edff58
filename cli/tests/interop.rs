//! `edgefleet model sign|verify` against the reference implementation, Python
//! `model-signing` 1.1.1, in both directions; and the CLI's exit codes and messages.
//!
//! The Python side comes from the venv that `scripts/test` installs
//! (`$EDGEFLEET_PYTHON`, else `~/.cache/edgefleet/venv/bin/python`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rstest::rstest;

mod common;
use common::{assert_exit, assert_says, edgefleet, text};

fn python() -> PathBuf {
    let p = std::env::var_os("EDGEFLEET_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("EDGEFLEET_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/edgefleet")
                });
            cache.join("venv/bin/python")
        });
    assert!(
        p.exists(),
        "{} missing: run scripts/test, which installs model-signing==1.1.1",
        p.display()
    );
    p
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/model-signing")
}

/// Runs the reference CLI: `python -m model_signing …`.
fn reference(args: &[&str]) -> Output {
    Command::new(python())
        .arg("-m")
        .arg("model_signing")
        .args(args)
        .output()
        .unwrap()
}

/// Runs a snippet with the reference Python API.
fn reference_api(code: &str, args: &[&str]) -> Output {
    Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .unwrap()
}

/// `edgefleet model verify --bundle <bundle> <options…> <model>`.
fn verify(bundle: &str, options: &[&str], model: &str) -> Output {
    edgefleet(&[&["model", "verify", "--bundle", bundle], options, &[model]].concat())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One day ago until 30 days from now.
fn validity() -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::days(1),
        now + time::Duration::days(30),
    )
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    /// A model directory, a P-256 key pair, and a CA → intermediate → leaf chain whose
    /// leaf (SAN email release@edgefleet.example) holds a P-384 key.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("model");
        std::fs::create_dir_all(m.join("tokenizer")).unwrap();
        let weights: Vec<u8> = (0..2_500_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(m.join("model.gguf"), weights).unwrap();
        std::fs::write(m.join("tokenizer/vocab.json"), br#"{"<s>": 1}"#).unwrap();
        std::fs::write(m.join("README.md"), b"# model\n").unwrap();

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("pub.pem"), key.public_key_pem()).unwrap();

        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        (ca.not_before, ca.not_after) = validity();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "edgefleet models root");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let ca_issuer = rcgen::Issuer::new(ca, ca_key);

        let int_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut int = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        (int.not_before, int.not_after) = validity();
        int.distinguished_name
            .push(rcgen::DnType::CommonName, "edgefleet models intermediate");
        int.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        int.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let int_cert = int.signed_by(&int_key, &ca_issuer).unwrap();
        let int_issuer = rcgen::Issuer::new(int, int_key);

        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        (leaf.not_before, leaf.not_after) = validity();
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "release signer");
        leaf.subject_alt_names = vec![rcgen::SanType::Rfc822Name(
            "release@edgefleet.example".try_into().unwrap(),
        )];
        leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
        let leaf_cert = leaf.signed_by(&leaf_key, &int_issuer).unwrap();

        std::fs::write(dir.path().join("root.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("chain.pem"), int_cert.pem()).unwrap();
        std::fs::write(dir.path().join("leaf.pem"), leaf_cert.pem()).unwrap();
        std::fs::write(dir.path().join("leaf-key.pem"), leaf_key.serialize_pem()).unwrap();
        Self { dir }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `edgefleet model sign --key <key> <options…> model -o <sig>`, `key` in the setup,
    /// which must succeed.
    #[track_caller]
    fn sign_ours(&self, sig: &Path, key: &str, options: &[&str]) -> Output {
        let (key, model) = (self.p(key), self.p("model"));
        let args = [
            &["model", "sign", "--key", s(&key)],
            options,
            &[s(&model), "-o", s(sig)],
        ];
        let out = edgefleet(&args.concat());
        assert!(out.status.success(), "{}", text(&out));
        out
    }

    /// `edgefleet model verify --bundle <sig> <options…> model`.
    fn verify_ours(&self, sig: &Path, options: &[&str]) -> Output {
        verify(s(sig), options, s(&self.p("model")))
    }

    /// `verify_ours`, trusting the setup's public key.
    fn verify_ours_with_key(&self, sig: &Path) -> Output {
        self.verify_ours(sig, &["--public-key", s(&self.p("pub.pem"))])
    }

    /// `verify_ours`, trusting the setup's root and pinning `identity`.
    fn verify_ours_as(&self, sig: &Path, identity: &str, options: &[&str]) -> Output {
        let root = self.p("root.pem");
        self.verify_ours(
            sig,
            &[&["--root", s(&root), "--identity", identity], options].concat(),
        )
    }

    /// `python -m model_signing <action> <mode> --signature <sig> <options…> model`.
    fn reference_cli(&self, [action, mode]: [&str; 2], sig: &Path, options: &[&str]) -> Output {
        let model = self.p("model");
        reference(
            &[
                &[action, mode, "--signature", s(sig)],
                options,
                &[s(&model)],
            ]
            .concat(),
        )
    }

    /// The reference's `verify key`, trusting the setup's public key.
    fn reference_verify_key(&self, sig: &Path) -> Output {
        self.reference_cli(
            ["verify", "key"],
            sig,
            &["--public_key", s(&self.p("pub.pem"))],
        )
    }

    /// The reference API's key verification of 1 MB shards, trusting the setup's public key.
    fn reference_verify_shards(&self, sig: &Path) -> Output {
        reference_api(
            PY_VERIFY_SHARDS,
            &[
                s(&self.p("pub.pem")),
                s(sig),
                s(&self.p("model")),
                "1000000",
            ],
        )
    }

    fn tamper(&self) {
        let path = self.p("model/model.gguf");
        let mut data = std::fs::read(&path).unwrap();
        data[1_234_567] ^= 0x01;
        std::fs::write(path, data).unwrap();
    }
}

const PY_SIGN_SHARDS: &str = r#"
import sys
from model_signing import hashing, signing
cfg = signing.Config().use_elliptic_key_signer(private_key=sys.argv[1])
cfg.set_hashing_config(hashing.Config().use_shard_serialization(shard_size=int(sys.argv[4])))
cfg.sign(sys.argv[2], sys.argv[3])
"#;

const PY_VERIFY_SHARDS: &str = r#"
import sys
from model_signing import hashing, verifying
cfg = verifying.Config().use_elliptic_key_verifier(public_key=sys.argv[1])
cfg.set_hashing_config(hashing.Config().use_shard_serialization(shard_size=int(sys.argv[4])))
cfg.verify(sys.argv[3], sys.argv[2])
print("reference: verified")
"#;

#[test]
fn reference_key_signature_verifies_here_and_tampering_is_caught() {
    let t = Setup::new();
    let sig = t.p("ref.sig");
    let out = t.reference_cli(
        ["sign", "key"],
        &sig,
        &["--private_key", s(&t.p("key.pem"))],
    );
    assert!(out.status.success(), "reference sign: {}", text(&out));

    let out = t.verify_ours_with_key(&sig);
    assert_exit(&out, 0, &["verified", "3 resources (files)"]);

    t.tamper();
    let out = t.verify_ours_with_key(&sig);
    assert_exit(&out, 1, &["DigestMismatch", "model.gguf"]);
}

#[test]
fn reference_shard_signature_verifies_here_and_the_wrong_key_is_refused() {
    let t = Setup::new();
    let sig = t.p("ref-shards.sig");
    let out = reference_api(
        PY_SIGN_SHARDS,
        &[s(&t.p("key.pem")), s(&t.p("model")), s(&sig), "1000000"],
    );
    assert!(out.status.success(), "reference sign: {}", text(&out));

    let out = t.verify_ours_with_key(&sig);
    // 2.5 MB in 1 MB shards, plus two small files.
    assert_exit(&out, 0, &["5 resources (shards of 1000000 bytes)"]);

    let other_key = fixtures().join("keys/signing-key-pub.pem");
    let out = t.verify_ours(&sig, &["--public-key", s(&other_key)]);
    assert_exit(&out, 1, &["UntrustedSigner"]);
}

#[test]
fn reference_certificate_signature_verifies_here_with_an_identity_pin() {
    let t = Setup::new();
    let sig = t.p("ref-cert.sig");
    let (key, cert, chain) = (t.p("leaf-key.pem"), t.p("leaf.pem"), t.p("chain.pem"));
    let out = t.reference_cli(
        ["sign", "certificate"],
        &sig,
        &[
            "--private_key",
            s(&key),
            "--signing_certificate",
            s(&cert),
            "--certificate_chain",
            s(&chain),
        ],
    );
    assert!(out.status.success(), "reference sign: {}", text(&out));

    let out = t.verify_ours_as(&sig, "release@edgefleet.example", &[]);
    assert_exit(&out, 0, &["(release@edgefleet.example)"]);

    let out = t.verify_ours_as(&sig, "someone-else@edgefleet.example", &[]);
    assert_exit(&out, 1, &["IdentityMismatch"]);

    // Certificates are checked at --now: the chain is valid from yesterday for 30 days.
    for when in ["2000-01-01T00:00:00Z", "2099-01-01T00:00:00Z"] {
        let out = t.verify_ours_as(&sig, "release@edgefleet.example", &["--now", when]);
        assert_eq!(out.status.code(), Some(1), "{when}: {}", text(&out));
        assert_says(&out, &["CertificateNotValidAt"]);
    }
}

#[test]
fn our_key_signature_verifies_in_the_reference_and_tampering_is_caught_there() {
    let t = Setup::new();
    let sig = t.p("ours.sig");
    t.sign_ours(&sig, "key.pem", &[]);

    let out = t.reference_verify_key(&sig);
    assert!(out.status.success(), "reference verify: {}", text(&out));

    t.tamper();
    let out = t.reference_verify_key(&sig);
    assert!(
        !out.status.success(),
        "the reference accepted a tampered model: {}",
        text(&out)
    );
    assert_says(&out, &["Hash mismatch for", "model.gguf"]);
}

#[test]
fn our_shard_signature_verifies_in_the_reference() {
    let t = Setup::new();
    let sig = t.p("ours-shards.sig");
    t.sign_ours(&sig, "key.pem", &["--shard-size", "1000000"]);
    let out = t.reference_verify_shards(&sig);
    assert!(out.status.success(), "reference verify: {}", text(&out));
    assert_says(&out, &["reference: verified"]);

    t.tamper();
    let out = t.reference_verify_shards(&sig);
    assert!(
        !out.status.success(),
        "the reference accepted a tampered model"
    );
    assert_says(&out, &["Hash mismatch for", "model.gguf:1000000:2000000"]);
}

#[test]
fn our_certificate_signature_verifies_in_the_reference_and_here() {
    let t = Setup::new();
    let sig = t.p("ours-cert.sig");
    let (cert, chain) = (t.p("leaf.pem"), t.p("chain.pem"));
    let out = t.sign_ours(
        &sig,
        "leaf-key.pem",
        &["--cert", s(&cert), "--chain", s(&chain)],
    );
    assert_says(&out, &["certificate mode, P-384 key"]);

    let root = t.p("root.pem");
    let out = t.reference_cli(
        ["verify", "certificate"],
        &sig,
        &["--certificate_chain", s(&root)],
    );
    assert!(out.status.success(), "reference verify: {}", text(&out));

    let out = t.verify_ours_as(&sig, "release@edgefleet.example", &[]);
    assert!(out.status.success(), "{}", text(&out));

    // Pinning the intermediate's key as if it were a plain key does not trust a chain.
    let out = t.verify_ours_with_key(&sig);
    assert_exit(&out, 1, &["UntrustedSigner"]);
}

#[test]
fn a_bundle_inside_the_model_directory_is_not_part_of_the_model() {
    let t = Setup::new();
    let sig = t.p("model/model.sig");
    t.sign_ours(&sig, "key.pem", &[]);
    let out = t.verify_ours_with_key(&sig);
    assert!(out.status.success(), "{}", text(&out));
    // The reference agrees, given the same ignore rule.
    let out = t.reference_verify_key(&sig);
    assert!(out.status.success(), "reference verify: {}", text(&out));
}

#[rstest]
#[case::no_trust_anchor(&["model", "verify", "--bundle", "b.sig", "m"], "--public-key <PUBLIC_KEY>|--root <ROOT>")]
#[case::root_without_identity(&["model", "verify", "--bundle", "b.sig", "--root", "r.pem", "m"], "--identity <IDENTITY>")]
#[case::both_anchors(&["model", "verify", "--bundle", "b", "--root", "r", "--identity", "i", "--public-key", "p", "m"], "cannot be used with")]
#[case::zero_shard(&["model", "sign", "--key", "k", "--shard-size", "0", "m", "-o", "o"], "--shard-size")]
fn usage_errors_exit_2_and_say_why(#[case] args: &[&str], #[case] expected: &str) {
    let out = edgefleet(args);
    assert_exit(&out, 2, &[expected]);
}

#[test]
fn missing_files_and_bad_times_are_named() {
    let key = fixtures().join("keys/signing-key-pub.pem");
    let model = fixtures().join("v1.1.0-elliptic-key");
    let out = verify("/nonexistent.sig", &["--public-key", s(&key)], s(&model));
    assert_exit(&out, 1, &["reading /nonexistent.sig"]);

    let bundle = fixtures().join("v1.1.0-ek.sig");
    let out = verify(
        s(&bundle),
        &["--public-key", s(&key), "--now", "yesterday"],
        s(&model),
    );
    assert_exit(&out, 1, &["not an RFC 3339 time"]);
}
