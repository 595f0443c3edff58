//! Fetching signature bundles given by URI (`EdgeModel.spec.signature.uri`), so that the
//! operator can verify them before assigning, like inline bundles.
//!
//! Only `https://` is fetched, against the configured roots, with a timeout and a size
//! bound (the CRD's inline limit). Results, failures included, are kept for
//! [`CACHE_TTL`], so that reconciles every few seconds do not refetch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest bundle fetched (the CRD's limit on `signature.inline`).
pub const MAX_BUNDLE_BYTES: usize = 256 << 10;
/// Per-request timeout.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a fetched bundle (or a failure) is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(120);

type Cached = (Instant, Result<String, String>);

/// Fetches and caches bundles.
#[derive(Debug, Clone)]
pub struct BundleFetcher {
    http: reqwest::Client,
    cache: Arc<Mutex<HashMap<String, Cached>>>,
}

/// A TLS client configuration trusting only the certificates in `roots_pem` (`what`
/// names them in errors), for fetching bundles and artifacts over `https://`.
pub fn client_tls(roots_pem: &[u8], what: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let ders = edgefleet_trust::attestation::pem_certificates(roots_pem)
        .map_err(|e| format!("reading the {what}: {e}"))?;
    let (added, _ignored) = roots.add_parsable_certificates(ders.into_iter().map(Into::into));
    if added == 0 {
        return Err(format!("no usable certificate in the {what}"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// `GET uri` over `https://` only (`refusal` says why another scheme is refused), with
/// a non-success status as an error naming the URI.
pub async fn https_get(
    http: &reqwest::Client,
    uri: &str,
    refusal: &str,
) -> Result<reqwest::Response, String> {
    if !uri.starts_with("https://") {
        return Err(format!("{uri}: {refusal}"));
    }
    let resp = http
        .get(uri)
        .send()
        .await
        .map_err(|e| format!("{uri}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{uri}: HTTP {}", resp.status()));
    }
    Ok(resp)
}

impl BundleFetcher {
    /// A fetcher trusting the certificates in `roots_pem` (for example the system's
    /// `/etc/ssl/certs/ca-certificates.crt`).
    pub fn new(roots_pem: &[u8]) -> Result<Self, String> {
        let tls = client_tls(roots_pem, "bundle CA roots")?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            http,
            cache: Arc::default(),
        })
    }

    /// The bundle at `uri`, or why it could not be had.
    pub async fn fetch(&self, uri: &str) -> Result<String, String> {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, result)) = cache.get(uri)
            && at.elapsed() < CACHE_TTL
        {
            return result.clone();
        }
        let result = self.fetch_uncached(uri).await;
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            cache.insert(uri.to_owned(), (Instant::now(), result.clone()));
        }
        result
    }

    async fn fetch_uncached(&self, uri: &str) -> Result<String, String> {
        let mut resp = https_get(
            &self.http,
            uri,
            "the operator fetches bundles over https:// only",
        )
        .await?;
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_BUNDLE_BYTES as u64)
        {
            return Err(format!("{uri}: larger than {MAX_BUNDLE_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{uri}: {e}"))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_BUNDLE_BYTES {
                return Err(format!("{uri}: larger than {MAX_BUNDLE_BYTES} bytes"));
            }
        }
        String::from_utf8(body).map_err(|_| format!("{uri}: the bundle is not UTF-8 JSON"))
    }
}
