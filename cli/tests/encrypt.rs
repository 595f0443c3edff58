#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

//! `edgefleet model encrypt`: the encrypted file decrypts to the model with the key it
//! wrote (and only with it), the key is kept 0600 and never overwritten, and bad
//! arguments are refused by name.

mod common;

use common::{assert_says, edgefleet};
use edgefleet_trust::sealed::{ModelKey, Sealed};
use std::os::unix::fs::PermissionsExt as _;

fn model(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let p = dir.join("model.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend((0..n).map(|i| (i * 7 % 253) as u8));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn an_encrypted_model_opens_with_the_key_written_and_no_other() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path(), 3 * 4096 + 17);
    let (enc, key) = (d.path().join("model.enc"), d.path().join("model.key"));
    let out = edgefleet(&[
        "model",
        "encrypt",
        "--key-out",
        key.to_str().unwrap(),
        "--chunk-size",
        "4096",
        "-o",
        enc.to_str().unwrap(),
        m.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::text(&out));
    assert_says(&out, &["4 chunks of 4096 bytes", "--from-file=key="]);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let k = ModelKey::from_bytes(&std::fs::read(&key).unwrap()).unwrap();
    let s = Sealed::open(std::fs::File::open(&enc).unwrap()).unwrap();
    assert_eq!(
        s.header().plaintext_digest,
        edgefleet_trust::sealed::file_digest(&m).unwrap()
    );
    let mut plain = vec![0u8; s.header().plaintext_size as usize];
    s.decrypt_into(&k, &mut plain).unwrap();
    assert_eq!(plain, std::fs::read(&m).unwrap());
    // The same key again (--key): a new file, a new salt, the same key id.
    let enc2 = d.path().join("model2.enc");
    let out = edgefleet(&[
        "model",
        "encrypt",
        "--key",
        key.to_str().unwrap(),
        "-o",
        enc2.to_str().unwrap(),
        m.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::text(&out));
    assert_ne!(std::fs::read(&enc).unwrap(), std::fs::read(&enc2).unwrap());
    // Another key does not open it, by name.
    let other = ModelKey::generate().unwrap();
    let s = Sealed::open(std::fs::File::open(&enc).unwrap()).unwrap();
    let e = s.decrypt_into(&other, &mut plain).unwrap_err();
    assert_eq!(e.reason(), "WrongModelKey");
}

#[test]
fn bad_arguments_are_refused_and_a_key_is_never_overwritten() {
    let d = tempfile::tempdir().unwrap();
    let m = model(d.path(), 100);
    let (enc, key) = (d.path().join("model.enc"), d.path().join("model.key"));
    std::fs::write(&key, b"an existing key file").unwrap();
    let out = edgefleet(&[
        "model",
        "encrypt",
        "--key-out",
        key.to_str().unwrap(),
        "-o",
        enc.to_str().unwrap(),
        m.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert_says(&out, &["an existing key is never overwritten"]);
    assert_eq!(std::fs::read(&key).unwrap(), b"an existing key file");
    assert!(!enc.exists());
    // A key file of the wrong length.
    let out = edgefleet(&[
        "model",
        "encrypt",
        "--key",
        key.to_str().unwrap(),
        "-o",
        enc.to_str().unwrap(),
        m.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert_says(&out, &["a model key is 32 bytes, not 20"]);
    // Neither key option, a chunk size out of bounds, a directory.
    let out = edgefleet(&[
        "model",
        "encrypt",
        "-o",
        enc.to_str().unwrap(),
        m.to_str().unwrap(),
    ]);
    assert_says(&out, &["give exactly one of --key-out"]);
    let fresh = d.path().join("fresh.key");
    let out = edgefleet(&[
        "model",
        "encrypt",
        "--key-out",
        fresh.to_str().unwrap(),
        "--chunk-size",
        "100",
        "-o",
        enc.to_str().unwrap(),
        m.to_str().unwrap(),
    ]);
    assert_says(&out, &["--chunk-size must be between 4096 and 67108864"]);
    let out = edgefleet(&[
        "model",
        "encrypt",
        "--key-out",
        fresh.to_str().unwrap(),
        "-o",
        enc.to_str().unwrap(),
        d.path().to_str().unwrap(),
    ]);
    assert_says(&out, &["is not a file"]);
    assert!(!enc.exists());
}
