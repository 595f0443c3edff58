//! Receipts: a chat request with the header `edgefleet-receipt: 1` gets its answer
//! signed by the device's attested key ([`edgefleet_trust::receipt`]).
//!
//! - Not streamed: the receipt is the response header `edgefleet-receipt`, over the
//!   response body's bytes.
//! - Streamed: after `data: [DONE]` comes one more event, `event: edgefleet-receipt`,
//!   whose data is the receipt, over every byte of the stream before that event.
//!
//! A device that holds no current attestation result (not attested yet, or its result
//! lapsed, or its clock lies outside it) refuses such a request with 503
//! `receipt_unavailable` before any work is done. Should the result lapse while the
//! answer is generated, a whole answer is replaced by that 503 and a stream ends
//! without its receipt event: a client that asks for proof never gets an answer it
//! could take for proven. An error response gets no receipt. The signer is the one
//! current when the request arrived.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use edgefleet_trust::receipt::{self, Claims, Provenance};
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};

use super::{ApiError, MAX_BODY_BYTES, Serving};

/// What the device signs receipts with: its attested key, its certificate from the
/// device CA, and the attestation result the gateway gave it for that key.
pub struct ReceiptSigner {
    device: String,
    key: p256::ecdsa::SigningKey,
    certificate: Vec<u8>,
    result: String,
    result_id: String,
    issued: i64,
    expires: i64,
}

impl std::fmt::Debug for ReceiptSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiptSigner")
            .field("device", &self.device)
            .field("result_id", &self.result_id)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// Which model and plugins answered: the chat handler puts it on its response.
#[derive(Debug, Clone)]
pub(super) struct AnsweredBy(pub(super) Provenance);

impl ReceiptSigner {
    /// The signer of `device` from its agent key (PKCS#8 PEM), its certificate (PEM)
    /// and its attestation result (the gateway's EAR token, whose times it reads: the
    /// token came from the gateway over TLS, and a verifier checks its signature).
    pub fn new(
        device: &str,
        key_pem: &str,
        certificate_pem: &[u8],
        result: &str,
    ) -> Result<Self, String> {
        use p256::pkcs8::DecodePrivateKey as _;
        let key = p256::ecdsa::SigningKey::from_pkcs8_pem(key_pem)
            .map_err(|e| format!("the agent key: {e}"))?;
        let certificate = edgefleet_trust::attestation::pem_certificates(certificate_pem)
            .map_err(|e| format!("the device certificate: {e}"))?
            .into_iter()
            .next()
            .ok_or("the device certificate file holds no certificate")?;
        let jws = edgefleet_trust::jws::Jws::parse(result)
            .map_err(|e| format!("the attestation result: {e}"))?;
        let (claims, issued, expires) = receipt::result_claims(&jws.payload)
            .map_err(|e| format!("the attestation result: {e}"))?;
        // A contraindicated result, or one for another device or key, would sign
        // receipts that never verify.
        let spki = p256::pkcs8::EncodePublicKey::to_public_key_der(key.verifying_key())
            .map_err(|e| format!("the agent key: {e}"))?;
        receipt::affirms(&claims, device, spki.as_bytes())
            .map_err(|e| format!("the attestation result: {e}"))?;
        Ok(Self {
            device: device.to_owned(),
            key,
            certificate,
            result: result.to_owned(),
            result_id: receipt::sha256_hex(result.as_bytes()),
            issued,
            expires,
        })
    }

    /// Whether a receipt signed at `now` lies within the attestation result.
    pub fn current_at(&self, now: i64) -> bool {
        now >= self.issued - receipt::MAX_CLOCK_SKEW_SECONDS && now <= self.expires
    }

    /// The receipt over `request` and `response` digests (hex), answered by `by`, at
    /// `now` (which the caller checked with [`Self::current_at`]: a receipt dated
    /// outside its attestation result would not verify).
    pub fn sign(&self, by: &Provenance, request: String, response: String, now: i64) -> String {
        receipt::sign(
            &self.key,
            std::slice::from_ref(&self.certificate),
            &Claims {
                version: 1,
                device: self.device.clone(),
                time: now,
                provenance: by.clone(),
                request_sha256: request,
                response_sha256: response,
                attestation_result_id: self.result_id.clone(),
                attestation_result: self.result.clone(),
            },
        )
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn unavailable(message: &str) -> Response {
    ApiError::server_code(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "receipt_unavailable",
        message,
    )
    .into_response()
}

/// The middleware in front of the chat route.
pub(super) async fn layer(
    State(serving): State<Arc<Serving>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(asked) = request.headers().get(receipt::HEADER) else {
        return next.run(request).await;
    };
    if asked.as_bytes() != b"1" {
        return ApiError::bad(receipt::HEADER, "the only value of the receipt header is 1")
            .into_response();
    }
    let Some(signer) = serving.receipt_signer() else {
        return unavailable("this device holds no attestation result to sign receipts with");
    };
    if !signer.current_at(unix_now()) {
        return unavailable(
            "this device's attestation result has lapsed, or its clock lies outside it",
        );
    }
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_large {
                ApiError::server(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!("the body is larger than {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::bad("body", format!("the body could not be read: {e}"))
            }
            .into_response();
        }
    };
    let request_sha256 = receipt::sha256_hex(&body);
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    if !response.status().is_success() {
        return response;
    }
    let Some(AnsweredBy(by)) = response.extensions().get::<AnsweredBy>().cloned() else {
        return unavailable("the served model carries no provenance to sign");
    };
    let streamed = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let (mut parts, body) = response.into_parts();
    if !streamed {
        // The answer is whole before it is sent: sign it and send it with its receipt.
        let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
            return unavailable("the answer failed while it was read for its receipt");
        };
        let now = unix_now();
        if !signer.current_at(now) {
            return unavailable("this device's attestation result lapsed while it answered");
        }
        let signed = signer.sign(&by, request_sha256, receipt::sha256_hex(&bytes), now);
        match HeaderValue::from_str(&signed) {
            Ok(v) => {
                parts.headers.insert(receipt::HEADER, v);
                Response::from_parts(parts, Body::from(bytes))
            }
            Err(_) => unavailable("the receipt is not a header value"),
        }
    } else {
        // Each chunk is hashed as it passes; the receipt follows the last.
        let stream = body.into_data_stream();
        let hasher = Sha256::new();
        let frames = futures::stream::unfold(
            Some((stream, hasher, signer, by, request_sha256)),
            |state| async move {
                let (mut stream, mut hasher, signer, by, request_sha256) = state?;
                match stream.next().await {
                    Some(Ok(chunk)) => {
                        hasher.update(&chunk);
                        Some((
                            Ok::<Bytes, axum::Error>(chunk),
                            Some((stream, hasher, signer, by, request_sha256)),
                        ))
                    }
                    Some(Err(e)) => Some((Err(e), None)),
                    None => {
                        // A result that lapsed while the answer streamed signs nothing:
                        // the stream ends without its receipt (the client sees none).
                        let now = unix_now();
                        if !signer.current_at(now) {
                            return None;
                        }
                        let signed =
                            signer.sign(&by, request_sha256, hex::encode(hasher.finalize()), now);
                        let event = format!("event: {}\ndata: {signed}\n\n", receipt::SSE_EVENT);
                        Some((Ok(Bytes::from(event)), None))
                    }
                }
            },
        );
        Response::from_parts(parts, Body::from_stream(frames))
    }
}
