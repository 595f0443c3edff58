//! The content-addressed artifact store that agents and gateways keep: one file per
//! artifact, named by the lowercase hex of its SHA-256, and `<hex>.partial` for a
//! download under way. Other files in the directory are not the store's and are left
//! alone (a gateway's in-flight mirror fetch is `.<hex>.mirror`).

use std::path::Path;

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

/// Removes what the store in `dir` does not need: partial downloads and artifacts not
/// in `keep` (hex digests), oldest first (by modification time), until the files left
/// hold at most `budget` bytes. What `keep` names is never removed, whatever the budget.
/// Anything in the directory that is not an artifact or a partial download of one is
/// left alone.
pub fn collect_garbage(
    dir: &Path,
    keep: &std::collections::HashSet<String>,
    budget: u64,
) -> std::io::Result<Collected> {
    let is_hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut files = Vec::new();
    let mut out = Collected::default();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let (hex, partial) = match name.strip_suffix(".partial") {
            Some(h) => (h, true),
            None => (name.as_str(), false),
        };
        if !is_hex(hex) {
            continue;
        }
        out.left += meta.len();
        if keep.contains(hex) && !partial {
            continue;
        }
        let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        // Partial downloads go first: nothing activates them.
        files.push((!partial, modified, name.clone(), meta.len()));
    }
    files.sort();
    for (complete, _, name, len) in files {
        if complete && out.left <= budget {
            break;
        }
        std::fs::remove_file(dir.join(&name))?;
        out.left -= len;
        out.freed += len;
        out.removed.push(name);
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
        let c = collect_garbage(dir, &keep, 2300).unwrap();
        assert_eq!(
            c.removed,
            [format!("{}.partial", hex('f')), hex('c'), hex('d')]
        );
        assert_eq!(c.freed, 650);
        assert_eq!(c.left, 2300);
        assert!(dir.join(hex('e')).exists() && dir.join("notes.txt").exists());
        // A budget below what is needed: everything unneeded goes, the needed stay.
        let c = collect_garbage(dir, &keep, 0).unwrap();
        assert_eq!(c.removed, [hex('e')]);
        assert_eq!(c.left, 2000);
        for k in &keep {
            assert!(dir.join(k).exists(), "{k} was needed");
        }
        // Within the budget: nothing goes.
        file(dir, &hex('c'), 300, 100);
        let c = collect_garbage(dir, &keep, 1 << 30).unwrap();
        assert!(c.removed.is_empty());
    }
}
