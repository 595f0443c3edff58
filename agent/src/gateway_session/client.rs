//! The mTLS client of the gateway's device API ([`DeviceClient`]): long-polling the
//! desired state, sending reports, and starting artifact downloads (asking again while
//! the gateway is still mirroring an artifact).

use std::sync::Arc;
use std::time::Duration;

use edgefleet_proto as proto;

use crate::gateway_client::GatewayError;

/// The mTLS client of the device API.
#[derive(Debug, Clone)]
pub struct DeviceClient {
    http: reqwest::Client,
    base: String,
    device: String,
    /// What it was built from, to reconnect with.
    identity: Arc<Identity>,
}

/// The gateway CA, the client certificate and key (PEM), and the read timeout.
#[derive(Debug)]
struct Identity {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    timeout: Duration,
}

fn rejected(status: reqwest::StatusCode, body: &[u8]) -> GatewayError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    GatewayError::Rejected {
        status: status.as_u16(),
        reason: v["reason"].as_str().unwrap_or("Unknown").to_owned(),
        message: v["message"].as_str().unwrap_or("").to_owned(),
    }
}

impl DeviceClient {
    /// A client for `base` trusting `ca_pem`, presenting `cert_pem` with `key_pem`.
    pub fn new(
        base: &str,
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
        device: &str,
        timeout: Duration,
    ) -> Result<Self, GatewayError> {
        use rustls::pki_types::pem::PemObject as _;
        let roots = crate::gateway_client::roots(ca_pem)?;
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| GatewayError::Ca(format!("client certificate: {e}")))?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| GatewayError::Ca(format!("client key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| GatewayError::Ca(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| GatewayError::Ca(format!("client certificate: {e}")))?;
        // HTTP/2 when the gateway offers it: the long-poll, reports and downloads share
        // one connection, so a device costs the gateway one socket, not two or three.
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(timeout)
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            device: device.to_owned(),
            identity: Arc::new(Identity {
                ca: ca_pem.to_vec(),
                cert: cert_pem.to_vec(),
                key: key_pem.to_vec(),
                timeout,
            }),
        })
    }

    /// The same identity at another gateway replica (`base`): every replica serves
    /// every device, and the certificate is the device CA's, good at each.
    pub fn at(&self, base: &str) -> Self {
        let i = &*self.identity;
        Self::new(base, &i.ca, &i.cert, &i.key, &self.device, i.timeout)
            .unwrap_or_else(|_| self.clone())
    }

    /// The gateway this client talks to.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The same identity over new connections (the old ones close once unused).
    pub fn reconnect(&self) -> Self {
        let i = &*self.identity;
        Self::new(&self.base, &i.ca, &i.cert, &i.key, &self.device, i.timeout)
            .unwrap_or_else(|_| self.clone())
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v1/devices/{}/{tail}", self.base, self.device)
    }

    /// Long-polls the desired state: `None` when it is still `version` after `wait`.
    pub async fn desired(
        &self,
        version: Option<&str>,
        wait: Duration,
    ) -> Result<Option<proto::DesiredState>, GatewayError> {
        let mut req = self
            .http
            .get(self.url("desired"))
            .query(&[("waitSeconds", wait.as_secs().to_string())]);
        if let Some(v) = version {
            req = req.query(&[("version", v)]);
        }
        let resp = req.send().await?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let body = resp.bytes().await?;
        if !status.is_success() {
            return Err(rejected(status, &body));
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| GatewayError::Rejected {
                status: status.as_u16(),
                reason: "BadResponse".into(),
                message: e.to_string(),
            })
    }

    /// Sends reports.
    pub async fn report(
        &self,
        batch: &proto::ReportBatch,
    ) -> Result<proto::ReportAck, GatewayError> {
        self.post_json(self.url("report"), batch).await
    }

    /// Asks for a model key at `path` (the desired model's `encryption.keyPath`).
    pub async fn key(
        &self,
        path: &str,
        req: &proto::KeyRequest,
    ) -> Result<proto::KeyRelease, GatewayError> {
        self.post_json(format!("{}{path}", self.base), req).await
    }

    /// POSTs `body` as JSON to `url`: the answer parsed, or the gateway's named refusal
    /// (an answer that does not parse is `BadResponse`).
    async fn post_json<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        url: String,
        body: &B,
    ) -> Result<R, GatewayError> {
        let resp = self.http.post(url).json(body).send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            return Err(rejected(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| GatewayError::Rejected {
            status: status.as_u16(),
            reason: "BadResponse".into(),
            message: e.to_string(),
        })
    }

    /// Starts a download of `path` from byte `from`.
    ///
    /// `503` means the gateway does not have the file yet (it is mirroring it into its
    /// store, or the revision's template is on its way): asked again every
    /// [`FETCHING_POLL`], for up to [`FETCHING_PATIENCE`], before it counts as a failure.
    pub async fn download(&self, path: &str, from: u64) -> Result<reqwest::Response, GatewayError> {
        let deadline = tokio::time::Instant::now() + FETCHING_PATIENCE;
        loop {
            let mut req = self.http.get(format!("{}{path}", self.base));
            if from > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
            }
            let resp = req.send().await?;
            let status = resp.status();
            if status.is_success() || status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
                return Ok(resp);
            }
            let body = resp.bytes().await?;
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                && tokio::time::Instant::now() + FETCHING_POLL < deadline
            {
                tracing::info!(%path, "the gateway does not have the artifact yet; asking again");
                tokio::time::sleep(FETCHING_POLL).await;
                continue;
            }
            return Err(rejected(status, &body));
        }
    }
}

/// How often a download the gateway answered `503` is asked again.
pub const FETCHING_POLL: Duration = Duration::from_secs(2);
/// How long a download waits for the gateway to have the artifact.
pub const FETCHING_PATIENCE: Duration = Duration::from_secs(300);
