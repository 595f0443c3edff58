//! Downloading an artifact from the gateway into the artifact store ([`fetch`]):
//! resumable, bounded by the declared size, and checked against its digest before it
//! is renamed into place.

use std::path::{Path, PathBuf};

use edgefleet_proto as proto;
use tokio::io::AsyncWriteExt as _;

use super::DeviceClient;
use crate::activation::ActivateError;
use crate::activation::store::{file_sha256, hex_of};

/// Fetches an artifact into `dir/<hex>`: resumes `dir/<hex>.partial` with a Range
/// request, stops at the declared size, checks the digest of the whole file, and only
/// then renames it into place. A file already in place is checked again and reused.
pub async fn fetch(
    client: &DeviceClient,
    artifact: &proto::ArtifactRef,
    dir: &Path,
) -> Result<PathBuf, ActivateError> {
    let hex = hex_of(&artifact.digest)?.to_owned();
    let done = dir.join(&hex);
    let partial = dir.join(format!("{hex}.partial"));
    let state = |e: std::io::Error| ActivateError::State(e.to_string());
    tokio::fs::create_dir_all(dir).await.map_err(state)?;
    if tokio::fs::try_exists(&done).await.unwrap_or(false) {
        let p = done.clone();
        let got = tokio::task::spawn_blocking(move || file_sha256(&p))
            .await
            .map_err(|e| ActivateError::State(e.to_string()))?
            .map_err(state)?;
        if got == hex {
            return Ok(done);
        }
        tracing::warn!(file = %done.display(), "a stored artifact no longer matches its digest; fetching it again");
        tokio::fs::remove_file(&done).await.map_err(state)?;
    }
    let mut have = tokio::fs::metadata(&partial)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    if artifact.size_bytes.is_some_and(|s| have > s) {
        have = 0;
    }
    if have > 0 {
        tracing::info!(digest = %artifact.digest, from = have, "resuming download");
    }
    let resp = client
        .download(&artifact.path, have)
        .await
        .map_err(|e| ActivateError::Download(e.to_string()))?;
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&partial)
        .await
        .map_err(state)?;
    let mut written = match resp.status() {
        reqwest::StatusCode::PARTIAL_CONTENT => have,
        reqwest::StatusCode::RANGE_NOT_SATISFIABLE => have,
        _ => 0,
    };
    file.set_len(written).await.map_err(state)?;
    file.seek_to(written).await.map_err(state)?;
    if resp.status() != reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        let mut resp = resp;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| ActivateError::Download(e.to_string()))?
        {
            written += chunk.len() as u64;
            if let Some(max) = artifact.size_bytes
                && written > max
            {
                drop(file);
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(ActivateError::TooLarge(format!(
                    "{} grew beyond its declared {max} bytes",
                    artifact.digest
                )));
            }
            file.write_all(&chunk).await.map_err(state)?;
        }
    }
    file.sync_all().await.map_err(state)?;
    drop(file);
    let p = partial.clone();
    let got = tokio::task::spawn_blocking(move || file_sha256(&p))
        .await
        .map_err(|e| ActivateError::State(e.to_string()))?
        .map_err(state)?;
    if got != hex {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(ActivateError::Digest(format!(
            "downloaded sha256:{got}, expected {}",
            artifact.digest
        )));
    }
    tokio::fs::rename(&partial, &done).await.map_err(state)?;
    Ok(done)
}

trait SeekTo {
    async fn seek_to(&mut self, at: u64) -> std::io::Result<u64>;
}

impl SeekTo for tokio::fs::File {
    async fn seek_to(&mut self, at: u64) -> std::io::Result<u64> {
        use tokio::io::AsyncSeekExt as _;
        self.seek(std::io::SeekFrom::Start(at)).await
    }
}
