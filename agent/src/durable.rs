//! Files that survive a power cut: written aside, flushed to disk, renamed into place,
//! and the directory flushed, so that after a crash at any point the path holds either
//! the old content or the new, never a torn file. The agent's key, its certificate,
//! the last-known-good record, the attestation lease and the first-use trust pins are
//! written this way: a torn key would leave a device that can never attest again.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Replaces `path` with `bytes` durably ([module docs](self)); the file gets `mode`
/// (for example 0o600 for a key) from its creation, never a wider one in between.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{}: not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".partial");
    let tmp = dir.join(tmp_name);
    // A partial file a crash left behind is replaced.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
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
        std::fs::write(d.path().join(".agent-key.pem.partial"), b"torn").unwrap();
        std::fs::write(&key, b"old").unwrap();
        write(&key, b"new key", 0o600).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"new key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("agent-key.pem")]);
    }

    #[test]
    fn a_write_that_cannot_happen_leaves_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("active.json");
        std::fs::write(&file, b"old").unwrap();
        // The temporary name is taken by a directory that cannot be removed as a file.
        std::fs::create_dir(d.path().join(".active.json.partial")).unwrap();
        assert!(write(&file, b"new", 0o644).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"old");
        assert!(
            write(Path::new("/"), b"x", 0o644).is_err(),
            "not a file path"
        );
    }

    #[tokio::test]
    async fn the_async_form_writes_the_same() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("lease.json");
        write_async(&file, b"{}".to_vec(), 0o644).await.unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"{}");
    }
}
