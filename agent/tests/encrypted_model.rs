//! Encrypted models on the device: the real SmolLM2, encrypted, decrypts into a sealed
//! memfd that llama.cpp loads through `/proc/self/fd/N` and answers from; no 4 KiB
//! block of the plaintext lands in any file; a tampered file or a wrong key is refused
//! by name, before llama.cpp sees a byte.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};

use edgefleet_agent::activation::decrypt;
use edgefleet_agent::engine::{ChatMessage, Engine, EngineConfig, Event, Sampling};
use edgefleet_trust::sealed::{self, ModelKey};

mod common;

fn encrypt(model: &Path, out: &Path, key: &ModelKey) {
    let digest = sealed::file_digest(model).unwrap();
    let size = std::fs::metadata(model).unwrap().len();
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    sealed::encrypt(
        std::io::BufReader::new(std::fs::File::open(model).unwrap()),
        size,
        &digest,
        key,
        sealed::DEFAULT_CHUNK_SIZE,
        &mut w,
    )
    .unwrap();
    std::io::Write::flush(&mut w).unwrap();
}

/// `n` 4 KiB blocks of `plain` at evenly spread offsets, the first (the GGUF header)
/// among them.
fn samples(plain: &[u8], n: usize) -> Vec<&[u8]> {
    let blocks = plain.len() / 4096;
    (0..n)
        .map(|i| &plain[(i * blocks / n) * 4096..][..4096])
        .collect()
}

/// Files under `dir` (recursively) holding any of `blocks` (4 KiB each) at any
/// offset: one pass per file with a rolling hash, each hit compared byte for byte.
fn files_holding(dir: &Path, blocks: &[&[u8]]) -> Vec<PathBuf> {
    const N: usize = 4096;
    const B: u64 = 1_000_003;
    let pow = (1..N).fold(1u64, |p, _| p.wrapping_mul(B));
    let hash = |w: &[u8]| {
        w.iter()
            .fold(0u64, |h, b| h.wrapping_mul(B).wrapping_add(u64::from(*b)))
    };
    let wanted: std::collections::HashMap<u64, Vec<&[u8]>> =
        blocks.iter().fold(Default::default(), |mut m, b| {
            m.entry(hash(b)).or_default().push(*b);
            m
        });
    let mut filter = vec![false; 1 << 16];
    for h in wanted.keys() {
        filter[(h & 0xffff) as usize] = true;
    }
    let holds = |bytes: &[u8]| {
        if bytes.len() < N {
            return false;
        }
        let mut h = hash(&bytes[..N]);
        for i in 0..=bytes.len() - N {
            if i > 0 {
                h = h
                    .wrapping_sub(u64::from(bytes[i - 1]).wrapping_mul(pow))
                    .wrapping_mul(B)
                    .wrapping_add(u64::from(bytes[i + N - 1]));
            }
            // A bit per low 16 bits of the wanted hashes first: most windows stop here.
            if filter[(h & 0xffff) as usize]
                && wanted
                    .get(&h)
                    .is_some_and(|c| c.iter().any(|b| *b == &bytes[i..i + N]))
            {
                return true;
            }
        }
        false
    };
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() && holds(&std::fs::read(&p).unwrap_or_default()) {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn an_encrypted_model_is_served_from_a_sealed_memfd_and_never_lands_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::model();
    let key = ModelKey::generate().unwrap();
    let enc = dir.path().join("model.enc");
    encrypt(&model, &enc, &key);
    assert!(decrypt::is_encrypted(&enc));
    assert!(!decrypt::is_encrypted(&model));

    let held = decrypt::hold(&key).unwrap();
    let plain = decrypt::decrypt(&enc, &held).unwrap();
    let path = plain.path();
    assert!(path.starts_with("/proc/self/fd"), "{path:?}");
    assert_eq!(plain.len(), std::fs::metadata(&model).unwrap().len());
    let engine = Engine::load(EngineConfig {
        model_path: path,
        served_name: "smollm2".into(),
        context_size: 512,
        threads: 1,
        gpu_layers: 0,
        parallel_slots: 1,
        queue_depth: 1,
        plaintext: Some(plain),
        provenance: None,
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let text = rt.block_on(async {
        let mut rx = engine
            .submit(
                vec![ChatMessage {
                    role: "user".into(),
                    content: "What is the capital of France?".into(),
                }],
                Sampling {
                    max_tokens: 12,
                    temperature: 0.0,
                    top_p: 1.0,
                    seed: 0,
                    stop: vec![],
                    ignore_eos: false,
                },
            )
            .unwrap();
        let mut text = String::new();
        while let Some(e) = rx.recv().await {
            match e {
                Event::Delta(d) => text.push_str(&d),
                Event::Done { .. } => break,
                other => panic!("{other:?}"),
            }
        }
        text
    });
    assert!(text.contains("Paris"), "{text:?}");
    // Every page the process touched since the key was held is locked: the plaintext
    // and llama.cpp's own copies of it among them.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let locked_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let model_len = std::fs::metadata(&model).unwrap().len();
    assert!(locked_kib * 1024 >= model_len, "VmLck {locked_kib} kB");
    // The process may not be dumped while it holds the key and the model.
    assert_eq!(
        rustix::process::dumpable_behavior().unwrap(),
        rustix::process::DumpableBehavior::NotDumpable
    );
    // No block of the plaintext in any file of the test's directory, which holds the
    // encrypted model beside it, while the model is served.
    let bytes = std::fs::read(&model).unwrap();
    let blocks = samples(&bytes, 64);
    assert_eq!(blocks[0], &bytes[..4096]);
    assert!(files_holding(dir.path(), &blocks).is_empty());
    // The check finds a plaintext block when one is there.
    let mut leak = b"a few bytes before it".to_vec();
    leak.extend_from_slice(blocks[7]);
    std::fs::write(dir.path().join("leak"), leak).unwrap();
    assert_eq!(
        files_holding(dir.path(), &blocks),
        vec![dir.path().join("leak")]
    );
}

#[test]
fn a_tampered_file_or_a_wrong_key_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let key = ModelKey::generate().unwrap();
    let enc = dir.path().join("model.enc");
    encrypt(&common::model(), &enc, &key);
    let held = decrypt::hold(&key).unwrap();
    let mut bytes = std::fs::read(&enc).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    let tampered = dir.path().join("tampered.enc");
    std::fs::write(&tampered, &bytes).unwrap();
    let e = decrypt::decrypt(&tampered, &held).unwrap_err().to_string();
    assert!(e.starts_with("CiphertextTampered: chunk "), "{e}");
    // Cut short: the header's size is checked against the file before any memory is
    // taken by it.
    let cut = dir.path().join("cut.enc");
    std::fs::write(&cut, &std::fs::read(&enc).unwrap()[..bytes.len() - 100]).unwrap();
    let e = decrypt::decrypt(&cut, &held).unwrap_err().to_string();
    assert!(
        e.starts_with("CiphertextTampered: the header describes a file of "),
        "{e}"
    );
    let other = decrypt::hold(&ModelKey::generate().unwrap()).unwrap();
    let e = decrypt::decrypt(&enc, &other).unwrap_err().to_string();
    assert!(e.starts_with("WrongModelKey: "), "{e}");
    let e = decrypt::decrypt(&common::model(), &held)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("NotEncrypted: "), "{e}");
}
