//! OpenAI-style API errors ([`ApiError`]): the status, type, param and code of each
//! refusal, and the JSON error object (with `Retry-After` on 429) they answer with.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::plugins::{ChainError, Hook};

/// Seconds a client should wait after a 429.
const RETRY_AFTER_SECONDS: &str = "1";

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) kind: &'static str,
    pub(super) param: Option<String>,
    pub(super) code: Option<&'static str>,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            param: Some(param.to_owned()),
            code: None,
            message: message.into(),
        }
    }

    pub(super) fn server(
        status: StatusCode,
        kind: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            param: None,
            code: None,
            message: message.into(),
        }
    }

    /// The same, with a machine-readable `code`.
    pub(super) fn server_code(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            code: Some(code),
            ..Self::server(status, kind, message)
        }
    }

    /// A plugin refused or failed: 400 for a refused request, 502 for a refused answer
    /// (the model's output did not pass), 500 for a plugin that failed.
    pub(super) fn plugin(e: ChainError) -> Self {
        let (status, kind, code) = match &e {
            ChainError::Rejected {
                hook: Hook::Request,
                ..
            } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "plugin_rejected",
            ),
            ChainError::Rejected { .. } => (
                StatusCode::BAD_GATEWAY,
                "server_error",
                "plugin_rejected_response",
            ),
            ChainError::Failed { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "plugin_failed",
            ),
        };
        Self {
            status,
            kind,
            param: None,
            code: Some(code),
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(
            json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}),
        );
        let mut resp = (self.status, body).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        resp
    }
}

/// A generation that failed: 400 on `max_tokens` when the request does not fit the
/// context, 400 on `messages` when llama.cpp cannot take a message (an interior NUL),
/// 500 otherwise.
pub(super) fn failed(message: String) -> ApiError {
    if message.contains("exceeds the context") {
        return ApiError::bad("max_tokens", message);
    }
    if message.starts_with("messages: ") {
        return ApiError::bad("messages", message);
    }
    ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
}
