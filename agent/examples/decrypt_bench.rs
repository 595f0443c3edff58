//! The cost of an encrypted model at load: the plain load (llama.cpp maps the GGUF
//! file) against the encrypted load (the key held in a locked page, every chunk
//! decrypted and the plaintext digest checked into a sealed, locked memfd, then the
//! same llama.cpp load from `/proc/self/fd/N`), in alternating rounds, both files
//! in the page cache. Run by bench/decrypt.sh in release mode.
//!
//! Usage: decrypt_bench MODEL.gguf WORKDIR [ROUNDS]
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is the report

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgefleet_agent::activation::decrypt;
use edgefleet_agent::engine::{Engine, EngineConfig};
use edgefleet_trust::sealed::{self, ModelKey};

fn config(
    path: PathBuf,
    plaintext: Option<std::sync::Arc<edgefleet_secmem::SealedModel>>,
) -> EngineConfig {
    EngineConfig {
        model_path: path,
        served_name: "bench".into(),
        context_size: 512,
        threads: 1,
        gpu_layers: 0,
        parallel_slots: 1,
        queue_depth: 1,
        plaintext,
        provenance: None,
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn warm(p: &Path) {
    let _ = std::fs::read(p).unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = PathBuf::from(&args[1]);
    let dir = PathBuf::from(&args[2]);
    let rounds: usize = args.get(3).map_or(7, |r| r.parse().unwrap());
    std::fs::create_dir_all(&dir).unwrap();
    let size = std::fs::metadata(&model).unwrap().len();
    let key = ModelKey::generate().unwrap();
    let enc = dir.join("model.enc");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&enc).unwrap());
    sealed::encrypt(
        std::io::BufReader::new(std::fs::File::open(&model).unwrap()),
        size,
        &sealed::file_digest(&model).unwrap(),
        &key,
        sealed::DEFAULT_CHUNK_SIZE,
        &mut w,
    )
    .unwrap();
    std::io::Write::flush(&mut w).unwrap();
    drop(w);
    let held = decrypt::hold(&key).unwrap();
    let (mut plain, mut encrypted, mut decrypt_only) = (Vec::new(), Vec::new(), Vec::new());
    // One unmeasured load of each first (llama.cpp's backend, the page cache).
    warm(&model);
    warm(&enc);
    drop(Engine::load(config(model.clone(), None)).unwrap());
    for _ in 0..rounds {
        let t = Instant::now();
        let e = Engine::load(config(model.clone(), None)).unwrap();
        plain.push(t.elapsed());
        drop(e);

        let t = Instant::now();
        let m = decrypt::decrypt(&enc, &held).unwrap();
        decrypt_only.push(t.elapsed());
        let e = Engine::load(config(m.path(), Some(m))).unwrap();
        encrypted.push(t.elapsed());
        drop(e);
    }
    // Where the decryption's time goes, once: the locked memfd, the chunks, the seal.
    let t = Instant::now();
    let mut filling = edgefleet_secmem::SealedModel::create("bench", size).unwrap();
    let create = t.elapsed();
    let t = Instant::now();
    sealed::Sealed::open(std::fs::File::open(&enc).unwrap())
        .unwrap()
        .decrypt_into(&key, filling.bytes_mut())
        .unwrap();
    let chunks = t.elapsed();
    let t = Instant::now();
    drop(filling.seal().unwrap());
    let seal = t.elapsed();
    println!(
        "decryption, once: locked memfd {:.1} ms, chunks and digest {:.1} ms, seal {:.1} ms",
        create.as_secs_f64() * 1e3,
        chunks.as_secs_f64() * 1e3,
        seal.as_secs_f64() * 1e3
    );
    let (p, e, d) = (
        median(&mut plain),
        median(&mut encrypted),
        median(&mut decrypt_only),
    );
    let mib = size as f64 / (1 << 20) as f64;
    println!(
        "model {mib:.1} MiB, {rounds} rounds, medians: plain load {:.1} ms ({:.0} MiB/s), encrypted load {:.1} ms ({:.0} MiB/s; decryption {:.1} ms, {:.0} MiB/s), throughput ratio encrypted/plain {:.2}",
        p.as_secs_f64() * 1e3,
        mib / p.as_secs_f64(),
        e.as_secs_f64() * 1e3,
        mib / e.as_secs_f64(),
        d.as_secs_f64() * 1e3,
        mib / d.as_secs_f64(),
        p.as_secs_f64() / e.as_secs_f64()
    );
}
