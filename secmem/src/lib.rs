//! Memory for what must never reach the disk, swap or a core dump: model keys
//! ([`LockedSecret`]) and decrypted models ([`SealedModel`]).
//!
//! - Every mapping here is locked in RAM (`mlock`: never swapped) and marked
//!   `MADV_DONTDUMP` (left out of core dumps). Locking needs `RLIMIT_MEMLOCK` room (the
//!   agent's systemd unit sets `LimitMEMLOCK=infinity`); when it fails, creation fails,
//!   and nothing secret was written yet.
//! - A decrypted model lives in a `memfd` (anonymous memory with a file descriptor,
//!   never a file on a disk), written through a locked mapping, then sealed against any
//!   further write or change of size (the mapping turns read-only), so that what
//!   llama.cpp opens through `/proc/self/fd/N` is the bytes that were checked, for as
//!   long as it is served. The mapping kept here holds its pages locked.
//!
//! This is the workspace's only crate with unsafe code: mapping a file is `unsafe` in
//! memmap2 because another process could change the file under the mapping. The memfd
//! is this process's own and is not shared until sealed, which is why it is sound here.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;

use memmap2::{Advice, Mmap, MmapMut, MmapOptions};
use zeroize::Zeroize as _;

/// Locks `map`'s pages and leaves them out of core dumps.
fn guard(
    map: &impl std::ops::Deref<Target = [u8]>,
    lock: impl Fn() -> io::Result<()>,
    advise: impl Fn(Advice) -> io::Result<()>,
) -> io::Result<()> {
    if map.is_empty() {
        return Ok(());
    }
    lock().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "locking {} bytes in memory (RLIMIT_MEMLOCK): {e}",
                map.len()
            ),
        )
    })?;
    advise(Advice::DontDump)
}

/// A secret of `N` bytes in its own locked, undumped page, zeroed when dropped.
pub struct LockedSecret<const N: usize> {
    map: MmapMut,
}

impl<const N: usize> std::fmt::Debug for LockedSecret<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockedSecret<{N}>(..)")
    }
}

impl<const N: usize> LockedSecret<N> {
    /// A locked page holding a copy of `secret`.
    pub fn new(secret: &[u8; N]) -> io::Result<Self> {
        let mut map = MmapOptions::new().len(N.max(1)).map_anon()?;
        guard(&map, || map.lock(), |a| map.advise(a))?;
        map[..N].copy_from_slice(secret);
        Ok(Self { map })
    }

    /// The secret.
    pub fn bytes(&self) -> &[u8] {
        &self.map[..N]
    }
}

impl<const N: usize> Drop for LockedSecret<N> {
    fn drop(&mut self) {
        self.map.zeroize();
    }
}

/// A memfd being filled with a decrypted model through a locked, undumped mapping
/// ([`SealedModel::create`]); [`Filling::seal`] makes it a [`SealedModel`].
pub struct Filling {
    /// Taken by [`Filling::seal`]; still here when dropped unsealed.
    inner: Option<(File, MmapMut)>,
    len: usize,
}

impl std::fmt::Debug for Filling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filling")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Filling {
    /// The bytes to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.inner {
            Some((_, map)) => &mut map[..self.len],
            None => &mut [],
        }
    }

    /// Seals the memfd against growing, shrinking and any further write (through any
    /// descriptor or any new mapping: `F_SEAL_FUTURE_WRITE`), and against removing the
    /// seals; the mapping it was filled through turns read-only and stays locked, so
    /// no page is unlocked at any moment. (`F_SEAL_WRITE` would need that mapping gone
    /// first and a second one locked page by page, about half the decryption's time
    /// again.)
    pub fn seal(mut self) -> io::Result<SealedModel> {
        let len = self.len;
        let (file, map) = self
            .inner
            .take()
            .ok_or_else(|| io::Error::other("already sealed"))?;
        let map = map.make_read_only()?;
        use rustix::fs::SealFlags;
        rustix::fs::fcntl_add_seals(
            &file,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::FUTURE_WRITE | SealFlags::SEAL,
        )?;
        // What the path names: a read-only descriptor.
        let reader = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        Ok(SealedModel {
            file: reader,
            _sealed: file,
            _map: map,
            len,
        })
    }
}

impl Drop for Filling {
    /// Unsealed means unfinished (a failed decryption): its bytes are zeroed.
    fn drop(&mut self) {
        if let Some((_, map)) = &mut self.inner {
            map.zeroize();
        }
    }
}

#[allow(unsafe_code)]
fn map_writable(file: &File, len: usize) -> io::Result<MmapMut> {
    // SAFETY: the memfd was just created by this process (close-on-exec, not passed
    // on); only this mapping writes it until it is sealed.
    let map = unsafe { MmapOptions::new().len(len.max(1)).map_mut(file)? };
    // Fewer, larger pages to fault in and lock where the kernel allows them for shmem
    // (`shmem_enabled` = advise); a hint, ignored elsewhere.
    let _ = map.advise(Advice::HugePage);
    guard(&map, || map.lock(), |a| map.advise(a))?;
    Ok(map)
}

/// A decrypted model in a sealed memfd, its pages locked in RAM and left out of core
/// dumps, for as long as this lives.
pub struct SealedModel {
    /// Read-only; what [`SealedModel::path`] names.
    file: File,
    /// The descriptor it was filled through (sealed: writes fail).
    _sealed: File,
    /// The mapping it was filled through, read-only now, locked.
    _map: Mmap,
    len: usize,
}

impl std::fmt::Debug for SealedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedModel")
            .field("fd", &self.file.as_raw_fd())
            .field("len", &self.len)
            .finish()
    }
}

impl SealedModel {
    /// A new memfd named `name` (in `/proc/self/fd` listings) of `len` bytes, mapped
    /// writable, locked and undumped, to be filled and sealed.
    pub fn create(name: &str, len: u64) -> io::Result<Filling> {
        use rustix::fs::MemfdFlags;
        let len_usize = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "model larger than memory"))?;
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        rustix::fs::ftruncate(&fd, len)?;
        let file = File::from(fd);
        let map = map_writable(&file, len_usize)?;
        Ok(Filling {
            inner: Some((file, map)),
            len: len_usize,
        })
    }

    /// The path llama.cpp (or anything in this process) opens it by.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Its size.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

    use super::*;
    use std::io::Write as _;

    #[test]
    fn a_sealed_model_reads_back_and_refuses_every_change() {
        let mut f = SealedModel::create("test-model", 10_000).unwrap();
        for (i, b) in f.bytes_mut().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let sealed = f.seal().unwrap();
        let path = sealed.path();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 10_000);
        assert!(back.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        // Writing, growing or shrinking through a reopened descriptor: refused.
        let mut w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let e = w.write_all(b"x").unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(rustix::io::Errno::PERM.raw_os_error()),
            "{e}"
        );
        assert!(w.set_len(5).is_err());
        assert!(w.set_len(20_000).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), back);
        // It is anonymous memory: the link names no file on any disk.
        let target = std::fs::read_link(&path).unwrap();
        assert!(
            target.to_string_lossy().starts_with("/memfd:test-model"),
            "{target:?}"
        );
        // Its mapping is locked and left out of core dumps.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let block: Vec<&str> = smaps
            .split("\n")
            .skip_while(|l| !l.contains("/memfd:test-model"))
            .take(30)
            .collect();
        assert!(
            block
                .iter()
                .any(|l| l.starts_with("VmFlags:") && l.contains(" lo") && l.contains(" dd")),
            "{block:?}"
        );
    }

    #[test]
    fn a_locked_secret_holds_its_bytes_in_a_locked_undumped_page() {
        let s = LockedSecret::<32>::new(&[7u8; 32]).unwrap();
        assert_eq!(s.bytes(), &[7u8; 32]);
        // Its mapping, found by address in smaps: locked (lo), not dumped (dd).
        let at = s.bytes().as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        let mut flags = None;
        while let Some(l) = lines.next() {
            let range = l.split_whitespace().next().and_then(|r| r.split_once('-'));
            if let Some((a, b)) = range
                && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                && (a..b).contains(&at)
            {
                flags = lines.by_ref().find(|l| l.starts_with("VmFlags:"));
                break;
            }
        }
        let flags = flags.unwrap();
        assert!(flags.contains(" lo") && flags.contains(" dd"), "{flags}");
        assert_eq!(format!("{s:?}"), "LockedSecret<32>(..)");
    }
}
