//! The enrolment token of `POST /v1/enrol`: who may enrol a new device. A token is
//! `Authorization: Bearer <id>.<secret>`, checked against the `EdgeBootstrapToken`
//! named `<id>` (read from the API: enrolments are rare), or the optional shared lab
//! token the gateway was started with (`--bootstrap-token-file`, any device name,
//! never expires). Each refusal is named: `TokenRequired`, `UnknownToken` (no such id
//! and a wrong secret get the same answer; the secret's hash is compared in constant
//! time), `TokenExpired`, `TokenUsedUp`, `DeviceNameNotAllowed`.
//!
//! A usage is consumed only for a new EdgeDevice: [`consume`] re-reads the token,
//! checks it again and counts the usage in its status, conditional on the
//! `resourceVersion` it read (a conflict is read and checked again), so that a token
//! never enrols more devices than its limit, across racing requests and gateway
//! replicas. Within one gateway, usages of one token are counted one at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use edgefleet_crds::EdgeBootstrapToken;
use edgefleet_crds::token::{name_matches, parse_token};
use edgefleet_trust::attestation::identity::sha256_digest;
use edgefleet_trust::attestation::service::constant_time_eq;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

use crate::gateway::error::{ApiError, Reason};

/// The shortest shared lab token admitted.
pub const MIN_SHARED_TOKEN_LEN: usize = 16;

/// How often a usage write that lost a race is tried again.
const CONFLICT_RETRIES: usize = 5;

type Counting = Arc<tokio::sync::Mutex<Option<EdgeBootstrapToken>>>;

/// What admits a new device.
#[derive(Debug, Clone)]
pub(super) enum Admission {
    /// The shared lab token.
    Shared,
    /// An `EdgeBootstrapToken`, as read when it was checked.
    Token(Box<EdgeBootstrapToken>),
}

impl Admission {
    /// The labels the token gives the devices it enrols.
    pub(super) fn labels(&self) -> std::collections::BTreeMap<String, String> {
        match self {
            Self::Shared => Default::default(),
            Self::Token(t) => t.spec.device_labels.clone(),
        }
    }

    /// The token's id, for the EdgeDevice's annotation.
    pub(super) fn id(&self) -> Option<String> {
        match self {
            Self::Shared => None,
            Self::Token(t) => t.metadata.name.clone(),
        }
    }
}

/// The enrolment tokens a gateway admits: the shared lab token, if any, and the
/// `EdgeBootstrapToken`s in the cluster.
#[derive(Default)]
pub(super) struct Tokens {
    shared: Option<String>,
    /// One lock per token id, so that one gateway counts a token's usages in turn,
    /// holding the token as this gateway last wrote it (a usage is written on that,
    /// not on a read from before the previous usage, which would only conflict).
    counting: Mutex<HashMap<String, Counting>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("shared", &self.shared.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

fn refused(status: StatusCode, reason: Reason, message: impl Into<String>) -> ApiError {
    ApiError::new(status, reason, message)
}

fn unknown() -> ApiError {
    refused(
        StatusCode::UNAUTHORIZED,
        Reason::UnknownToken,
        "the bootstrap token is not known",
    )
}

fn kube_err(e: kube::Error) -> ApiError {
    refused(
        StatusCode::SERVICE_UNAVAILABLE,
        Reason::KubeApi,
        e.to_string(),
    )
}

/// The bearer token of `headers`, if one is given.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Checks a token read from the API for enrolling `device` at `now`: its secret, its
/// expiry, its usages and its name pattern.
fn check(
    token: &EdgeBootstrapToken,
    secret: &str,
    device: &str,
    now: Timestamp,
) -> Result<(), ApiError> {
    let hash = sha256_digest(secret.as_bytes());
    if !constant_time_eq(hash.as_bytes(), token.spec.secret_hash.as_bytes()) {
        return Err(unknown());
    }
    let id = token.metadata.name.as_deref().unwrap_or_default();
    if token.spec.expiration_time.0 <= now {
        return Err(refused(
            StatusCode::UNAUTHORIZED,
            Reason::TokenExpired,
            format!(
                "bootstrap token {id} expired at {}",
                token.spec.expiration_time.0
            ),
        ));
    }
    if token.usages() >= token.spec.usage_limit {
        return Err(refused(
            StatusCode::UNAUTHORIZED,
            Reason::TokenUsedUp,
            format!(
                "bootstrap token {id} has enrolled its {} device(s)",
                token.spec.usage_limit
            ),
        ));
    }
    if !name_matches(&token.spec.device_name_pattern, device) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            Reason::DeviceNameNotAllowed,
            format!(
                "bootstrap token {id} enrols only devices named {:?}, not {device:?}",
                token.spec.device_name_pattern
            ),
        ));
    }
    Ok(())
}

impl Tokens {
    /// The tokens of a gateway with the shared lab token `shared`, or none. A shared
    /// token shorter than [`MIN_SHARED_TOKEN_LEN`] would be guessed: it is not admitted
    /// (logged as an error; the operator refuses to start with one).
    pub(super) fn new(shared: Option<String>) -> Self {
        let shared = shared.filter(|s| {
            let long_enough = s.len() >= MIN_SHARED_TOKEN_LEN;
            if !long_enough {
                tracing::error!("the shared bootstrap token is too short; it admits no device");
            }
            long_enough
        });
        Self {
            shared,
            counting: Mutex::default(),
        }
    }

    /// Checks the request's token for enrolling `device`, without using it up.
    pub(super) async fn check(
        &self,
        client: &kube::Client,
        headers: &HeaderMap,
        device: &str,
    ) -> Result<Admission, ApiError> {
        let given = bearer(headers).ok_or_else(|| {
            refused(
                StatusCode::UNAUTHORIZED,
                Reason::TokenRequired,
                "a new device needs a bootstrap token (Authorization: Bearer <id>.<secret>)",
            )
        })?;
        if let Some(shared) = &self.shared
            && constant_time_eq(given.as_bytes(), shared.as_bytes())
        {
            return Ok(Admission::Shared);
        }
        let (id, secret) = parse_token(given).ok_or_else(unknown)?;
        let token = Api::<EdgeBootstrapToken>::all(client.clone())
            .get_opt(id)
            .await
            .map_err(kube_err)?
            .ok_or_else(unknown)?;
        check(&token, secret, device, Timestamp::now())?;
        Ok(Admission::Token(Box::new(token)))
    }

    fn lock(&self, id: &str) -> Counting {
        match self.counting.lock() {
            Ok(mut m) => m.entry(id.to_owned()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Counts one usage of the checked `admission` for the new device `device`: the
    /// token is read again and checked again, and the count is written conditional on
    /// what was read. Returns the token as written.
    pub(super) async fn consume(
        &self,
        client: &kube::Client,
        headers: &HeaderMap,
        admission: Admission,
        device: &str,
    ) -> Result<Admission, ApiError> {
        let Admission::Token(token) = admission else {
            return Ok(Admission::Shared);
        };
        let secret = bearer(headers)
            .and_then(parse_token)
            .map(|(_, s)| s.to_owned())
            .ok_or_else(unknown)?;
        let id = token.metadata.name.clone().unwrap_or_default();
        let lock = self.lock(&id);
        let mut last = lock.lock().await;
        let api = Api::<EdgeBootstrapToken>::all(client.clone());
        let mut current = match last.take() {
            Some(written) if written.metadata.uid == token.metadata.uid => written,
            _ => *token,
        };
        for _ in 0..CONFLICT_RETRIES {
            let now = Timestamp::now();
            check(&current, &secret, device, now)?;
            let mut next = current.clone();
            let status = next.status.get_or_insert_default();
            status.usages += 1;
            status.last_used_time = Some(Time(now));
            status.last_device = Some(device.to_owned());
            match api.replace_status(&id, &PostParams::default(), &next).await {
                Ok(written) => {
                    *last = Some(written.clone());
                    return Ok(Admission::Token(Box::new(written)));
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    current = api
                        .get_opt(&id)
                        .await
                        .map_err(kube_err)?
                        .ok_or_else(unknown)?;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => return Err(unknown()),
                Err(e) => return Err(kube_err(e)),
            }
        }
        Err(refused(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::KubeApi,
            format!("bootstrap token {id}: its usage count kept changing; try again"),
        ))
    }

    /// Gives back the usage `admission` counted for `device`, whose EdgeDevice was not
    /// created after all (best effort: a failure is logged).
    pub(super) async fn give_back(
        &self,
        client: &kube::Client,
        admission: &Admission,
        device: &str,
    ) {
        let Some(id) = admission.id() else {
            return;
        };
        let lock = self.lock(&id);
        let mut last = lock.lock().await;
        *last = None;
        let api = Api::<EdgeBootstrapToken>::all(client.clone());
        for _ in 0..CONFLICT_RETRIES {
            let Ok(Some(mut t)) = api.get_opt(&id).await else {
                break;
            };
            let status = t.status.get_or_insert_default();
            if status.usages == 0 {
                return;
            }
            status.usages -= 1;
            match api.replace_status(&id, &PostParams::default(), &t).await {
                Ok(_) => return,
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(_) => break,
            }
        }
        tracing::warn!(token = %id, %device, "could not give back a usage of a bootstrap token");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(limit: i64, usages: i64, pattern: &str, expires: Timestamp) -> EdgeBootstrapToken {
        let mut t = EdgeBootstrapToken::new(
            "abc123",
            edgefleet_crds::EdgeBootstrapTokenSpec {
                secret_hash: sha256_digest(b"0123456789abcdef"),
                expiration_time: Time(expires),
                usage_limit: limit,
                device_name_pattern: pattern.into(),
                device_labels: Default::default(),
                description: None,
            },
        );
        t.status = Some(edgefleet_crds::EdgeBootstrapTokenStatus {
            usages,
            ..Default::default()
        });
        t
    }

    fn reason(r: Result<(), ApiError>) -> Option<(StatusCode, Reason)> {
        r.err().map(|e| (e.status(), e.reason()))
    }

    #[test]
    fn each_refusal_is_named() {
        let now = Timestamp::now();
        let later = now + std::time::Duration::from_secs(3600);
        let ok = token(2, 1, "till-*", later);
        assert_eq!(reason(check(&ok, "0123456789abcdef", "till-1", now)), None);
        assert_eq!(
            reason(check(&ok, "0123456789abcdeX", "till-1", now)),
            Some((StatusCode::UNAUTHORIZED, Reason::UnknownToken))
        );
        assert_eq!(
            reason(check(&ok, "0123456789abcdef", "kiosk-1", now)),
            Some((StatusCode::FORBIDDEN, Reason::DeviceNameNotAllowed))
        );
        assert_eq!(
            reason(check(
                &token(2, 2, "*", later),
                "0123456789abcdef",
                "x",
                now
            )),
            Some((StatusCode::UNAUTHORIZED, Reason::TokenUsedUp))
        );
        assert_eq!(
            reason(check(&token(2, 0, "*", now), "0123456789abcdef", "x", now)),
            Some((StatusCode::UNAUTHORIZED, Reason::TokenExpired))
        );
    }

    #[test]
    fn a_short_shared_token_admits_nothing() {
        assert_eq!(Tokens::new(Some("short".into())).shared, None);
        assert!(
            Tokens::new(Some("0123456789abcdef".into()))
                .shared
                .is_some()
        );
        assert_eq!(Tokens::new(None).shared, None);
    }

    #[test]
    fn the_bearer_is_read_and_an_empty_one_is_none() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            axum::http::header::AUTHORIZATION,
            axum::http::HeaderValue::from_static("Bearer "),
        );
        assert_eq!(bearer(&h), None);
        h.insert(
            axum::http::header::AUTHORIZATION,
            axum::http::HeaderValue::from_static("Bearer abc123.0123456789abcdef"),
        );
        assert_eq!(bearer(&h), Some("abc123.0123456789abcdef"));
    }
}
