//! Mirroring artifacts into the gateway's content-addressed store.
//!
//! Devices behind the cluster download models and plugins from the gateway only. When an
//! assigned artifact is not in the store and its EdgeModel names an `https://` URI, the
//! gateway fetches it once (one fetch per digest at a time), hashing as it writes to a
//! temporary file of its own next to the store, and moves it into place only when its SHA-256 (and
//! size, when given) is the one the EdgeModel names. Until then a device asking for it
//! gets `503 ArtifactFetching` (agents retry with their backoff); a failed fetch is answered
//! `502 ArtifactMirrorFailed`, naming why, for a minute before it is tried again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;

/// How long a failed fetch is reported before the next request tries again.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);
/// The largest artifact fetched when the EdgeModel gives no size.
pub const MAX_BYTES: u64 = 64 << 30;

/// Where a mirror of one digest stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorState {
    /// Being fetched: ask again later.
    Fetching,
    /// The last fetch failed, for this reason.
    Failed(String),
}

/// The fetcher and what it is doing.
#[derive(Debug, Clone)]
pub struct Mirror {
    http: reqwest::Client,
    dir: PathBuf,
    states: Arc<Mutex<HashMap<String, (Instant, MirrorState)>>>,
}

impl Mirror {
    /// A mirror into `dir`, trusting the certificates in `roots_pem` for `https://`.
    pub fn new(dir: &Path, roots_pem: &[u8]) -> Result<Self, String> {
        let tls = crate::bundles::client_tls(roots_pem, "artifact CA roots")?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            http,
            dir: dir.to_owned(),
            states: Arc::default(),
        })
    }

    /// Fetches `uri` into the store now ([`fetch_into_store`]).
    pub async fn fetch(&self, hex: &str, uri: &str, size: Option<u64>) -> Result<u64, String> {
        fetch_into_store(&self.http, &self.dir, hex, uri, size).await
    }

    /// Starts fetching `uri` as the artifact `hex` (SHA-256, lowercase hex) unless that
    /// is under way or failed within [`RETRY_AFTER_FAILURE`]; returns where it stands.
    pub fn ensure(&self, hex: &str, uri: &str, size: Option<u64>) -> MirrorState {
        let Ok(mut states) = self.states.lock() else {
            return MirrorState::Failed("mirror state poisoned".into());
        };
        match states.get(hex) {
            Some((_, MirrorState::Fetching)) => return MirrorState::Fetching,
            Some((at, failed @ MirrorState::Failed(_))) if at.elapsed() < RETRY_AFTER_FAILURE => {
                return failed.clone();
            }
            _ => {}
        }
        states.insert(hex.to_owned(), (Instant::now(), MirrorState::Fetching));
        let this = self.clone();
        let (hex, uri) = (hex.to_owned(), uri.to_owned());
        tokio::spawn(async move {
            let result = this.fetch(&hex, &uri, size).await;
            if let Ok(mut states) = this.states.lock() {
                match result {
                    Ok(bytes) => {
                        tracing::info!(%uri, digest = %hex, bytes, "artifact mirrored into the store");
                        states.remove(&hex);
                    }
                    Err(why) => {
                        tracing::warn!(%uri, digest = %hex, %why, "mirroring an artifact");
                        states.insert(hex, (Instant::now(), MirrorState::Failed(why)));
                    }
                }
            }
        });
        MirrorState::Fetching
    }
}

/// Fetches `uri` into `dir/<hex>` if, and only if, its SHA-256 is `hex` (and its size is
/// `size`, when given); returns the bytes written. Nothing is left behind on failure.
pub async fn fetch_into_store(
    http: &reqwest::Client,
    dir: &Path,
    hex: &str,
    uri: &str,
    size: Option<u64>,
) -> Result<u64, String> {
    // A name of its own: replicas sharing a store may fetch the same digest at once.
    let mut nonce = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let tmp = dir.join(format!(".{hex}.{}.mirror", hex::encode(nonce)));
    let result = fetch_to(http, &tmp, hex, uri, size).await;
    match result {
        Ok(n) => {
            tokio::fs::rename(&tmp, dir.join(hex))
                .await
                .map_err(|e| format!("moving into the store: {e}"))?;
            Ok(n)
        }
        Err(why) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(why)
        }
    }
}

async fn fetch_to(
    http: &reqwest::Client,
    tmp: &Path,
    hex: &str,
    uri: &str,
    size: Option<u64>,
) -> Result<u64, String> {
    let mut resp =
        crate::bundles::https_get(http, uri, "only https:// artifacts are mirrored").await?;
    let limit = size.unwrap_or(MAX_BYTES);
    let mut file = tokio::fs::File::create(tmp)
        .await
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{uri}: {e}"))? {
        n = n.saturating_add(chunk.len() as u64);
        if n > limit {
            return Err(format!("{uri}: larger than the {limit} bytes expected"));
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
    }
    file.sync_all()
        .await
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    if let Some(size) = size
        && n != size
    {
        return Err(format!("{uri}: {n} bytes, the EdgeModel says {size}"));
    }
    let got = hex::encode(hasher.finalize());
    if got != hex {
        return Err(format!(
            "{uri}: digest mismatch: the file is sha256:{got}, the EdgeModel says sha256:{hex}"
        ));
    }
    Ok(n)
}
