//! The agent's client for the gateway's enrolment and attestation API (HTTPS, gateway
//! CA pinned). The bootstrap token is sent only with an enrolment, and only when one is
//! configured: attestation is authenticated by the device's key and evidence.

use std::sync::Arc;
use std::time::Duration;

use edgefleet_trust::attestation::service::{
    Appraisal, Challenge, ChallengeRequest, EvidenceRequest,
};

/// Errors talking to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The gateway CA could not be loaded.
    #[error("gateway CA: {0}")]
    Ca(String),
    /// Transport failure.
    #[error("gateway unreachable: {0}")]
    Transport(#[from] reqwest::Error),
    /// The gateway refused, naming why.
    #[error("gateway refused ({status}): {reason}: {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Named reason.
        reason: String,
        /// Detail.
        message: String,
    },
}

impl GatewayError {
    /// Whether this is a passing trouble of the network or of one gateway replica (no
    /// answer, a timeout, `429`, `5xx`, an answer that does not parse), after which a
    /// device keeps its session and asks again, here or at another replica. Anything
    /// else (`401`/`403`: the certificate or the device is refused; `404`: the device
    /// is gone) ends the session, and the device enrols and attests anew.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport(_) => true,
            Self::Ca(_) => false,
            Self::Rejected { status, reason, .. } => {
                *status == 429 || (500..600).contains(status) || reason == "BadResponse"
            }
        }
    }
}

/// The gateway CA (PEM) as the only trust roots of a client.
pub fn roots(ca_pem: &[u8]) -> Result<rustls::RootCertStore, GatewayError> {
    let mut roots = rustls::RootCertStore::empty();
    for der in edgefleet_trust::attestation::pem_certificates(ca_pem)
        .map_err(|e| GatewayError::Ca(e.to_string()))?
    {
        roots
            .add(der.into())
            .map_err(|e| GatewayError::Ca(e.to_string()))?;
    }
    Ok(roots)
}

/// A gateway client. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct GatewayClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl std::fmt::Debug for GatewayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayClient")
            .field("base", &self.base)
            .field("has_token", &!self.token.is_empty())
            .finish_non_exhaustive()
    }
}

/// Longest an enrolment or attestation request may take, from connecting to the last
/// byte of the answer: a gateway (or a network) that accepts and never answers must not
/// hold the agent's session for good.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest a TCP connect to the gateway may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl GatewayClient {
    /// A client for `base` (`https://host:port`) trusting only `ca_pem`, presenting the
    /// bootstrap `token` when it enrols (an empty token: none); each request ends
    /// within [`REQUEST_TIMEOUT`].
    pub fn new(base: &str, ca_pem: &[u8], token: &str) -> Result<Self, GatewayError> {
        Self::with_timeout(base, ca_pem, token, REQUEST_TIMEOUT)
    }

    /// [`GatewayClient::new`] with requests ending within `timeout`.
    pub fn with_timeout(
        base: &str,
        ca_pem: &[u8],
        token: &str,
        timeout: Duration,
    ) -> Result<Self, GatewayError> {
        let roots = roots(ca_pem)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| GatewayError::Ca(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Enrolment and attestation are a few requests every attestation interval: no
        // idle connection is kept, so a device holds one socket at the gateway (its
        // HTTP/2 device connection), not another idling for a minute and a half.
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .pool_max_idle_per_host(0)
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .timeout(timeout)
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    async fn post<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
        with_token: bool,
    ) -> Result<R, GatewayError> {
        let mut request = self.http.post(format!("{}{path}", self.base));
        if with_token && !self.token.is_empty() {
            request = request.bearer_auth(&self.token);
        }
        let resp = request.json(body).send().await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await?);
        }
        let err: serde_json::Value = resp.json().await.unwrap_or_default();
        Err(GatewayError::Rejected {
            status: status.as_u16(),
            reason: err["reason"].as_str().unwrap_or("Unknown").to_owned(),
            message: err["message"].as_str().unwrap_or("").to_owned(),
        })
    }

    /// Enrols the device (idempotent for the same key; only a new device needs the
    /// token).
    pub async fn enrol(
        &self,
        req: &edgefleet_proto::EnrolRequest,
    ) -> Result<edgefleet_proto::EnrolResponse, GatewayError> {
        self.post("/v1/enrol", req, true).await
    }

    /// Whether the client holds a bootstrap token.
    pub fn has_token(&self) -> bool {
        !self.token.is_empty()
    }

    /// Asks for a challenge.
    pub async fn challenge(&self, req: &ChallengeRequest) -> Result<Challenge, GatewayError> {
        self.post("/v1/attestation/challenge", req, false).await
    }

    /// Posts any JSON as a challenge request (for tools and tests of the gateway's
    /// input validation).
    pub async fn challenge_raw(&self, body: &serde_json::Value) -> Result<Challenge, GatewayError> {
        self.post("/v1/attestation/challenge", body, false).await
    }

    /// Sends evidence.
    pub async fn evidence(&self, req: &EvidenceRequest) -> Result<Appraisal, GatewayError> {
        self.post("/v1/attestation/evidence", req, false).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A gateway that accepts the connection and never answers (not even the TLS
    /// handshake): the request fails as unreachable within its timeout.
    #[tokio::test]
    async fn a_gateway_that_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                sockets.push(s);
            }
        });
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let client = GatewayClient::with_timeout(
            &format!("https://{addr}"),
            ca.pem().as_bytes(),
            "",
            Duration::from_secs(1),
        )
        .unwrap();
        let enrol = edgefleet_proto::EnrolRequest {
            device: "till-1".into(),
            agent_public_key: String::new(),
            facts: crate::gateway_session::facts("dev"),
            labels: Default::default(),
        };
        let request = client.enrol(&enrol);
        // Without a timeout of its own the request would wait here for good.
        let err = tokio::time::timeout(Duration::from_secs(20), request)
            .await
            .unwrap_or_else(|_| panic!("the request did not end by its own timeout"))
            .unwrap_err();
        assert!(matches!(err, GatewayError::Transport(_)), "{err}");
        // A gateway that does not answer is a passing trouble: the session is kept.
        assert!(err.is_transient());
        held.abort();
        assert!(REQUEST_TIMEOUT >= Duration::from_secs(30));
    }

    #[test]
    fn only_a_refusal_ends_a_session() {
        let refused = |status: u16, reason: &str| GatewayError::Rejected {
            status,
            reason: reason.into(),
            message: String::new(),
        };
        // A replica in trouble, an overloaded one, one behind a proxy that fails, or an
        // answer cut short: ask again (elsewhere), keep the certificate.
        for (status, reason) in [
            (429, "Busy"),
            (500, "Internal"),
            (502, "Unknown"),
            (503, "Busy"),
            (504, "Unknown"),
            (200, "BadResponse"),
        ] {
            assert!(refused(status, reason).is_transient(), "{status} {reason}");
        }
        // The certificate or the device refused, the device gone, or a bad request:
        // enrol and attest anew.
        for (status, reason) in [
            (401, "CertificateRequired"),
            (403, "NotApproved"),
            (403, "CertificateRevoked"),
            (404, "UnknownDevice"),
            (400, "BadRequest"),
            (409, "NonceUsed"),
        ] {
            assert!(!refused(status, reason).is_transient(), "{status} {reason}");
        }
        assert!(!GatewayError::Ca("bad".into()).is_transient());
    }
}
