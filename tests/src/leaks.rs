//! Finding plaintext where it must not be: 4 KiB blocks sampled from a model
//! ([`samples`]) searched for, at any offset, in every file under a directory
//! ([`files_holding`]). The confidential tests use it to show that a decrypted model
//! never reaches a file.

use std::path::{Path, PathBuf};

/// `n` 4 KiB blocks of `plain` at evenly spread offsets, the first (the GGUF header)
/// among them.
pub fn samples(plain: &[u8], n: usize) -> Vec<&[u8]> {
    let blocks = plain.len() / 4096;
    assert!(
        blocks >= n.max(1),
        "a file of {} bytes has fewer than {n} blocks",
        plain.len()
    );
    (0..n)
        .map(|i| &plain[(i * blocks / n) * 4096..][..4096])
        .collect()
}

/// Files under `dir` (recursively) holding any of `blocks` (4 KiB each) at any
/// offset: one pass per file with a rolling hash, each hit compared byte for byte.
pub fn files_holding(dir: &Path, blocks: &[&[u8]]) -> Vec<PathBuf> {
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
