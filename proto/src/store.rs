//! The content-addressed artifact store that agents and gateways keep: one file per
//! artifact, named by the lowercase hex of its SHA-256, and `<hex>.partial` for a
//! download under way. A gateway's mirror fetch writes `.<hex>.<nonce>.mirror` and
//! renames it into place. Other files in the directory are not the store's and are
//! left alone.

use std::path::Path;
use std::time::{Duration, SystemTime};

/// A mirror fetch's temporary file untouched this long was left by a process that
/// died: it is removed.
pub const STALE_TEMP: Duration = Duration::from_secs(24 * 3600);

/// What a collection removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Files removed, by name.
    pub removed: Vec<String>,
    /// Bytes they held.
    pub freed: u64,
    /// Bytes left in the store.
    pub left: u64,
}

/// Removes what the store in `dir` does not need, while its files hold more than
/// `budget` bytes: partial downloads first, then artifacts not in `keep` (hex
/// digests), oldest first by modification time. What `keep` names is never removed,
/// whatever the budget, nor is a file placed in the store (by its inode change time)
/// within `young` (an administrator's `kubectl cp` keeps the source's modification time,
/// and its EdgeModel may come a little later). Mirror temporaries untouched for
/// [`STALE_TEMP`] go whatever the budget. A file another collector removed first is
/// skipped.
pub fn collect_garbage(
    dir: &Path,
    keep: &std::collections::HashSet<String>,
    budget: u64,
    young: Duration,
) -> std::io::Result<Collected> {
    use std::os::unix::fs::MetadataExt as _;
    let is_hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let now = SystemTime::now();
    let placed = |meta: &std::fs::Metadata| {
        u64::try_from(meta.ctime())
            .ok()
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
    };
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let mut candidates = Vec::new();
    let mut stale = Vec::new();
    let mut out = Collected::default();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if name.starts_with('.') && name.ends_with(".mirror") {
            if now.duration_since(modified).unwrap_or_default() >= STALE_TEMP {
                stale.push((name, meta.len()));
            }
            continue;
        }
        let (hex, partial) = match name.strip_suffix(".partial") {
            Some(h) => (h, true),
            None => (name.as_str(), false),
        };
        if !is_hex(hex) {
            continue;
        }
        out.left += meta.len();
        let recent =
            placed(&meta).is_some_and(|t| now.duration_since(t).unwrap_or_default() < young);
        if (keep.contains(hex) && !partial) || recent {
            continue;
        }
        // Partial downloads go first: nothing activates them.
        candidates.push((!partial, modified, name.clone(), meta.len()));
    }
    let remove = |name: &str, len: u64, counted: bool, out: &mut Collected| {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if gone(&e) => {}
            Err(e) => return Err(e),
        }
        if counted {
            out.left = out.left.saturating_sub(len);
        }
        out.freed += len;
        out.removed.push(name.to_owned());
        Ok(())
    };
    for (name, len) in stale {
        remove(&name, len, false, &mut out)?;
    }
    candidates.sort();
    for (_, _, name, len) in candidates {
        if out.left <= budget {
            break;
        }
        remove(&name, len, true, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    fn file(dir: &Path, name: &str, len: usize, age_secs: u64) {
        let p = dir.join(name);
        std::fs::write(&p, vec![0u8; len]).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_secs))
            .unwrap();
    }

    #[test]
    fn unneeded_artifacts_go_oldest_first_until_the_store_fits_and_needed_ones_never() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let hex = |c: char| c.to_string().repeat(64);
        file(dir, &hex('a'), 1000, 10); // served
        file(dir, &hex('b'), 1000, 5000); // the previous last-known-good (old)
        file(dir, &hex('c'), 300, 3000); // unneeded, oldest
        file(dir, &hex('d'), 300, 2000); // unneeded
        file(dir, &hex('e'), 300, 1000); // unneeded, newest
        file(dir, &format!("{}.partial", hex('f')), 50, 1); // an abandoned download
        file(dir, "notes.txt", 10, 9000); // not the store's
        let keep: std::collections::HashSet<String> = [hex('a'), hex('b')].into();
        // A budget that fits the needed files and one more: the oldest unneeded go.
        let c = collect_garbage(dir, &keep, 2300, Duration::ZERO).unwrap();
        assert_eq!(
            c.removed,
            [format!("{}.partial", hex('f')), hex('c'), hex('d')]
        );
        assert_eq!(c.freed, 650);
        assert_eq!(c.left, 2300);
        assert!(dir.join(hex('e')).exists() && dir.join("notes.txt").exists());
        // A budget below what is needed: everything unneeded goes, the needed stay.
        let c = collect_garbage(dir, &keep, 0, Duration::ZERO).unwrap();
        assert_eq!(c.removed, [hex('e')]);
        assert_eq!(c.left, 2000);
        for k in &keep {
            assert!(dir.join(k).exists(), "{k} was needed");
        }
        // Within the budget: nothing goes, not even a partial download (it resumes).
        file(dir, &hex('c'), 300, 100);
        file(dir, &format!("{}.partial", hex('f')), 50, 1);
        let c = collect_garbage(dir, &keep, 1 << 30, Duration::ZERO).unwrap();
        assert!(c.removed.is_empty());
        // Just placed in the store (an administrator's copy, its EdgeModel on the way):
        // kept over budget until it is no longer young.
        let c = collect_garbage(dir, &keep, 0, Duration::from_secs(3600)).unwrap();
        assert!(c.removed.is_empty(), "{:?}", c.removed);
        // A mirror fetch's temporary: kept while it is written to, removed once a dead
        // fetch left it; whatever the budget.
        let fresh = format!(".{}.0123.mirror", hex('9'));
        let dead = format!(".{}.4567.mirror", hex('8'));
        file(dir, &fresh, 10, 5);
        file(dir, &dead, 10, STALE_TEMP.as_secs() + 60);
        let c = collect_garbage(dir, &keep, 1 << 30, Duration::ZERO).unwrap();
        assert_eq!(c.removed, [dead]);
        assert!(dir.join(&fresh).exists());
    }
}
