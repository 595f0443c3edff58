//! Cutting a model into resources (whole files or fixed-size shards) and hashing them
//! with streaming reads, in parallel across files and shards.

use std::cmp::Ordering;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use sha2::{Digest as _, Sha256};

use super::SignatureError;

/// Read size for streaming hashes.
const CHUNK: usize = 1 << 20;

/// How a model is cut into resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// One resource per file.
    Files,
    /// One resource per `shard_size` bytes of each file.
    Shards(u64),
}

impl Method {
    /// The resource `algorithm` string for this method.
    pub fn algorithm(self) -> String {
        match self {
            Method::Files => "sha256".to_owned(),
            Method::Shards(size) => format!("sha256-sharded-{size}"),
        }
    }
}

/// A hashed file or shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    /// Relative POSIX path, `.` for a single-file model.
    pub path: String,
    /// Shard byte range, `None` in files mode.
    pub range: Option<(u64, u64)>,
    /// SHA-256.
    pub digest: [u8; 32],
}

impl Hashed {
    /// The resource name as model-signing writes it.
    pub fn name(&self) -> String {
        match self.range {
            None => self.path.clone(),
            Some((start, end)) => format!("{}:{start}:{end}", self.path),
        }
    }
}

/// The reference orders resources by path components, then by shard start and end.
pub fn resource_order(
    a: &(String, Option<(u64, u64)>),
    b: &(String, Option<(u64, u64)>),
) -> Ordering {
    a.0.split('/').cmp(b.0.split('/')).then(a.1.cmp(&b.1))
}

/// Splits a shard resource name `path:start:end`.
pub fn parse_shard_name(name: &str) -> Option<(String, u64, u64)> {
    let mut parts = name.rsplitn(3, ':');
    let end = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    let path = parts.next()?;
    if path.contains(':') || start > end {
        return None;
    }
    Some((path.to_owned(), start, end))
}

/// A file of the model: its resource path and where it is on disk.
#[derive(Debug)]
struct ModelFile {
    rel: String,
    abs: PathBuf,
    len: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SignatureError + '_ {
    move |source| SignatureError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_ignored(rel: &str, ignore: &[String]) -> bool {
    ignore.iter().any(|ig| {
        let ig = ig.trim_end_matches('/');
        rel == ig
            || rel
                .strip_prefix(ig)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// Lists the model's files: the file itself (as `.`), or every regular file under the
/// directory except ignored paths. A symbolic link is an error unless `allow_symlinks`;
/// even then a link must resolve inside the model directory, and no directory is
/// entered twice (link loops). Sockets, FIFOs and devices are errors.
fn list_files(
    root: &Path,
    ignore: &[String],
    allow_symlinks: bool,
) -> Result<Vec<ModelFile>, SignatureError> {
    let meta = std::fs::symlink_metadata(root).map_err(io_err(root))?;
    if meta.file_type().is_symlink() && !allow_symlinks {
        return Err(SignatureError::Symlink(root.to_path_buf()));
    }
    let meta = std::fs::metadata(root).map_err(io_err(root))?;
    if meta.is_file() {
        return Ok(vec![ModelFile {
            rel: ".".into(),
            abs: root.to_path_buf(),
            len: meta.len(),
        }]);
    }
    let canonical_root = root.canonicalize().map_err(io_err(root))?;
    let mut visited = std::collections::HashSet::new();
    visited.insert(canonical_root.clone());
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name();
            let name = name
                .to_str()
                .ok_or_else(|| SignatureError::NonUtf8Path(entry.path()))?;
            let rel = if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}/{name}")
            };
            if is_ignored(&rel, ignore) {
                continue;
            }
            let path = entry.path();
            let mut ft = entry.file_type().map_err(io_err(&path))?;
            if ft.is_symlink() {
                if !allow_symlinks {
                    return Err(SignatureError::Symlink(path));
                }
                let target = path.canonicalize().map_err(io_err(&path))?;
                if !target.starts_with(&canonical_root) {
                    return Err(SignatureError::Symlink(path));
                }
                ft = std::fs::metadata(&target)
                    .map_err(io_err(&path))?
                    .file_type();
            }
            if ft.is_dir() {
                let real = path.canonicalize().map_err(io_err(&path))?;
                if !visited.insert(real) {
                    return Err(SignatureError::Symlink(path));
                }
                stack.push((path, rel));
            } else if ft.is_file() {
                let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
                out.push(ModelFile {
                    rel,
                    abs: path,
                    len,
                });
            } else {
                return Err(SignatureError::UnsupportedFileType(path));
            }
        }
    }
    Ok(out)
}

/// The outcome of one hashing job.
type JobResult = Result<[u8; 32], SignatureError>;

/// One unit of hashing work.
#[derive(Debug)]
struct Job {
    file: usize,
    range: Option<(u64, u64)>,
}

/// Hashes the model at `root` and returns its resources in the reference order.
pub fn hash_model(
    root: &Path,
    method: Method,
    ignore: &[String],
    allow_symlinks: bool,
) -> Result<Vec<Hashed>, SignatureError> {
    let files = list_files(root, ignore, allow_symlinks)?;
    let mut jobs = Vec::new();
    for (i, f) in files.iter().enumerate() {
        match method {
            Method::Files => jobs.push(Job {
                file: i,
                range: None,
            }),
            Method::Shards(size) => {
                // The reference emits no shard for an empty file.
                let mut start = 0;
                while start < f.len {
                    let end = (start + size).min(f.len);
                    jobs.push(Job {
                        file: i,
                        range: Some((start, end)),
                    });
                    start = end;
                }
            }
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<JobResult>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let idx = next.fetch_add(1, AtomicOrdering::Relaxed);
                    let Some(job) = jobs.get(idx) else { break };
                    let file = &files[job.file];
                    let result = hash_job(file, job.range, &mut buf);
                    if let Ok(mut r) = results.lock() {
                        r[idx] = Some(result);
                    }
                }
            });
        }
    });
    let results = results
        .into_inner()
        .map_err(|_| SignatureError::Internal("hash worker panicked".into()))?;
    let mut out = Vec::with_capacity(jobs.len());
    for (job, result) in jobs.iter().zip(results) {
        let digest =
            result.ok_or_else(|| SignatureError::Internal("hash job not run".into()))??;
        out.push(Hashed {
            path: files[job.file].rel.clone(),
            range: job.range,
            digest,
        });
    }
    out.sort_by(|a, b| resource_order(&(a.path.clone(), a.range), &(b.path.clone(), b.range)));
    Ok(out)
}

fn hash_job(
    file: &ModelFile,
    range: Option<(u64, u64)>,
    buf: &mut [u8],
) -> Result<[u8; 32], SignatureError> {
    let mut f = File::open(&file.abs).map_err(io_err(&file.abs))?;
    // The path was a regular file when listed; make sure it still is.
    if !f.metadata().map_err(io_err(&file.abs))?.is_file() {
        return Err(SignatureError::UnsupportedFileType(file.abs.clone()));
    }
    let mut hasher = Sha256::new();
    match range {
        None => {
            // The file may change while we read; hash what we read and let the digest
            // comparison decide.
            loop {
                let n = f.read(buf).map_err(io_err(&file.abs))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
        Some((start, end)) => {
            let mut pos = start;
            while pos < end {
                let want = usize::try_from((end - pos).min(CHUNK as u64)).unwrap_or(CHUNK);
                let n = f
                    .read_at(&mut buf[..want], pos)
                    .map_err(io_err(&file.abs))?;
                if n == 0 {
                    return Err(SignatureError::Io {
                        path: file.abs.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "file shrank while hashing",
                        ),
                    });
                }
                hasher.update(&buf[..n]);
                pos += n as u64;
            }
        }
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_parse_and_reject_garbage() {
        assert_eq!(
            parse_shard_name("a/b.bin:0:1024"),
            Some(("a/b.bin".into(), 0, 1024))
        );
        assert_eq!(
            parse_shard_name(".:1024:2048"),
            Some((".".into(), 1024, 2048))
        );
        assert_eq!(parse_shard_name("a.bin:2048:1024"), None);
        assert_eq!(parse_shard_name("a.bin:x:1"), None);
        assert_eq!(parse_shard_name("a.bin"), None);
        assert_eq!(parse_shard_name("a:b:0:1"), None);
    }

    #[test]
    fn ordering_is_by_path_components_then_offsets() {
        let mut v = [
            ("a.b".to_owned(), None),
            ("a/b".to_owned(), None),
            ("x".to_owned(), Some((10240, 20480))),
            ("x".to_owned(), Some((2048, 10240))),
        ];
        v.sort_by(resource_order);
        let names: Vec<_> = v.iter().map(|(p, r)| format!("{p}{r:?}")).collect();
        assert_eq!(
            names,
            [
                "a/bNone",
                "a.bNone",
                "xSome((2048, 10240))",
                "xSome((10240, 20480))"
            ]
        );
    }

    #[test]
    fn ignore_matches_whole_components_only() {
        let ig = vec!["ignore-me".to_owned(), ".git".to_owned()];
        assert!(is_ignored("ignore-me", &ig));
        assert!(is_ignored(".git/config", &ig));
        assert!(!is_ignored("ignore-me-not", &ig));
        assert!(!is_ignored(".gitignore", &ig));
    }
}
