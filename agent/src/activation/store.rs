//! The artifacts and records an activation keeps on disk, under the state directory:
//! `artifacts/<hex>` (one file per SHA-256, checked again whenever it is reused;
//! [`stored`], [`file_sha256`]) and `active.json`, the last-known-good model, written
//! atomically ([`record_last_known_good`], [`last_known_good`]).

use std::path::{Path, PathBuf};

use edgefleet_proto as proto;
use sha2::Digest as _;

use super::ActivateError;

/// The directory artifacts are kept in, under the state directory.
pub fn artifacts_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("artifacts")
}

/// The last-known-good record, under the state directory.
pub fn last_known_good_path(state_dir: &Path) -> PathBuf {
    state_dir.join("active.json")
}

/// The record of the last-known-good before it (a different revision), whose
/// artifacts are kept to roll back to without a download.
pub fn previous_path(state_dir: &Path) -> PathBuf {
    state_dir.join("previous.json")
}

/// The hex of a `sha256:<hex>` digest.
pub fn hex_of(digest: &str) -> Result<&str, ActivateError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| ActivateError::Digest(format!("{digest:?} is not sha256:<hex>")))
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// An artifact already in `dir` (no download), checked against its digest again.
pub async fn stored(artifact: &proto::ArtifactRef, dir: &Path) -> Result<PathBuf, ActivateError> {
    let p = dir.join(hex_of(&artifact.digest)?);
    let p2 = p.clone();
    let got = tokio::task::spawn_blocking(move || file_sha256(&p2))
        .await
        .map_err(|e| ActivateError::State(e.to_string()))?
        .map_err(|e| ActivateError::State(format!("{}: {e}", p.display())))?;
    if format!("sha256:{got}") != artifact.digest {
        return Err(ActivateError::Digest(format!(
            "{} changed on disk",
            p.display()
        )));
    }
    Ok(p)
}

/// Reads the last-known-good record: `None` when there is none, or (with a warning)
/// when it is unreadable.
pub async fn last_known_good(state_dir: &Path) -> Option<proto::DeviceModel> {
    read_record(&last_known_good_path(state_dir)).await
}

/// Reads the record of the last-known-good before the current one ([`previous_path`]).
pub async fn previous(state_dir: &Path) -> Option<proto::DeviceModel> {
    read_record(&previous_path(state_dir)).await
}

async fn read_record(path: &Path) -> Option<proto::DeviceModel> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    match serde_json::from_str(&text) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "unreadable last-known-good record; ignoring it");
            None
        }
    }
}

/// Records `m` as last-known-good, durably ([`crate::durable`]); the record it replaces,
/// when it is of another model or revision, becomes the previous one
/// ([`previous_path`]).
pub async fn record_last_known_good(
    state_dir: &Path,
    m: &proto::DeviceModel,
) -> Result<(), ActivateError> {
    if let Some(before) = last_known_good(state_dir).await
        && (before.model != m.model || before.revision != m.revision)
    {
        let record =
            serde_json::to_vec_pretty(&before).map_err(|e| ActivateError::State(e.to_string()))?;
        crate::durable::write_async(&previous_path(state_dir), record, 0o644)
            .await
            .map_err(|e| ActivateError::State(e.to_string()))?;
    }
    let record = serde_json::to_vec_pretty(m).map_err(|e| ActivateError::State(e.to_string()))?;
    crate::durable::write_async(&last_known_good_path(state_dir), record, 0o644)
        .await
        .map_err(|e| ActivateError::State(e.to_string()))
}

/// The artifact files (hex digests) `m` needs: its model and its plugins.
pub fn needed_by(m: &proto::DeviceModel) -> Vec<String> {
    std::iter::once(&m.artifact)
        .chain(m.plugins.iter().map(|p| &p.artifact))
        .filter_map(|a| hex_of(&a.digest).ok().map(str::to_owned))
        .collect()
}

pub use edgefleet_proto::store::{Collected, collect_garbage};

/// Forgets the last-known-good model (the device was unassigned).
pub async fn forget_last_known_good(state_dir: &Path) {
    let _ = tokio::fs::remove_file(last_known_good_path(state_dir)).await;
    let _ = tokio::fs::remove_file(previous_path(state_dir)).await;
}
