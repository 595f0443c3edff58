//! Files that survive a power cut: written aside, flushed to disk, renamed into place,
//! and the directory flushed, so that after a crash at any point the path holds either
//! the old content or the new, never a torn file. The agent's key, its certificate,
//! the last-known-good record, the attestation lease and the first-use trust pins are
//! written this way: a torn key would leave a device that can never attest again.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// A temporary name beside `path` no other writer uses (this process's id and a
/// counter), so that two writers of the same file never touch each other's.
fn aside(path: &Path) -> std::io::Result<(std::path::PathBuf, &Path)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{}: not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".{}.{}.partial",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    Ok((dir.join(tmp_name), dir))
}

/// Writes `bytes` to a new file at `tmp` with `mode`, flushed to disk.
fn write_flushed(tmp: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

/// Replaces `path` with `bytes` durably ([module docs](self)); the file gets `mode`
/// (for example 0o600 for a key) from its creation, never a wider one in between.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let (tmp, dir) = aside(path)?;
    write_flushed(&tmp, bytes, mode)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `path` with `bytes` durably unless it exists: `Ok(false)`, and nothing is
/// written, when another writer created it first (the file appears whole or not at
/// all, and is never replaced).
pub fn create(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<bool> {
    let (tmp, dir) = aside(path)?;
    write_flushed(&tmp, bytes, mode)?;
    // A hard link fails if the name exists: the no-clobber form of a rename.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => std::fs::File::open(dir)?.sync_all().map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// [`write`] off the async runtime's threads.
pub async fn write_async(path: &Path, bytes: Vec<u8>, mode: u32) -> std::io::Result<()> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || write(&path, &bytes, mode))
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_file_is_replaced_whole_with_its_mode_and_no_partial_left() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("agent-key.pem");
        // A partial file from a crash during an earlier write, and an old version.
        let torn = d.path().join(".agent-key.pem.1.0.partial");
        std::fs::write(&torn, b"torn").unwrap();
        std::fs::write(&key, b"old").unwrap();
        write(&key, b"new key", 0o600).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"new key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let mut left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        // Only the crash's leftover stays beside it (never read as the file).
        assert_eq!(
            left,
            [
                std::ffi::OsString::from(".agent-key.pem.1.0.partial"),
                std::ffi::OsString::from("agent-key.pem"),
            ]
        );
    }

    #[test]
    fn concurrent_writers_each_leave_a_whole_file() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("active.json");
        let a = vec![b'a'; 256 * 1024];
        let b = vec![b'b'; 256 * 1024];
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10 {
                        write(&file, &a, 0o644).unwrap();
                    }
                });
                s.spawn(|| {
                    for _ in 0..10 {
                        write(&file, &b, 0o644).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&file).unwrap();
        assert!(got == a || got == b, "a torn file of {} bytes", got.len());
    }

    #[test]
    fn create_never_replaces_and_the_first_writer_wins() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("agent-key.pem");
        assert!(create(&key, b"first", 0o600).unwrap());
        assert!(!create(&key, b"second", 0o600).unwrap());
        assert_eq!(std::fs::read(&key).unwrap(), b"first");
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no partial left"
        );
    }

    #[test]
    fn a_write_that_cannot_happen_leaves_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("active.json");
        std::fs::write(&file, b"old").unwrap();
        // The directory cannot be written.
        let ro = d.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::write(ro.join("active.json"), b"old").unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
        let refused = write(&ro.join("active.json"), b"new", 0o644);
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o700)).unwrap();
        // (root may write anyway; then the new content is whole)
        let now = std::fs::read(ro.join("active.json")).unwrap();
        assert!(
            (refused.is_err() && now == b"old") || (refused.is_ok() && now == b"new"),
            "{refused:?} {now:?}"
        );
        assert!(
            write(Path::new("/"), b"x", 0o644).is_err(),
            "not a file path"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"old");
    }

    #[tokio::test]
    async fn the_async_form_writes_the_same() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("lease.json");
        write_async(&file, b"{}".to_vec(), 0o644).await.unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"{}");
    }
}
