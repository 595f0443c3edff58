//! Validating a chat completion body ([`parse_chat_request`]) into a [`ChatRequest`],
//! naming the offending field of a bad one.

use axum::http::StatusCode;
use serde_json::Value;

use super::ApiError;
use crate::engine::{ChatMessage, Sampling, is_chat_role};

/// A validated chat completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// Messages.
    pub messages: Vec<ChatMessage>,
    /// Sampling.
    pub sampling: Sampling,
    /// Stream as SSE.
    pub stream: bool,
    /// Include usage in the last streamed chunk.
    pub stream_usage: bool,
    /// `response_format: {"type": "json_object"}`: the client wants one JSON value.
    pub json_mode: bool,
}

/// Validates an OpenAI chat completion body, naming the offending field.
pub fn parse_chat_request(body: &Value, served: &str, n_ctx: u32) -> Result<ChatRequest, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad("body", "the body must be a JSON object"))?;
    if let Some(model) = obj.get("model") {
        let m = model
            .as_str()
            .ok_or_else(|| ApiError::bad("model", "model must be a string"))?;
        if m != served {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                param: Some("model".into()),
                code: Some("model_not_found"),
                message: format!("model {m:?} is not served here; this device serves {served:?}"),
            });
        }
    }
    let raw = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad("messages", "messages must be a non-empty array"))?;
    if raw.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "messages must be a non-empty array",
        ));
    }
    let mut messages = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::bad(&format!("messages[{i}].role"), "role must be a string")
        })?;
        if !is_chat_role(role) {
            return Err(ApiError::bad(
                &format!("messages[{i}].role"),
                format!("unsupported role {role:?}"),
            ));
        }
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => Ok(t.to_owned()),
                        _ => Err(ApiError::bad(
                            &format!("messages[{i}].content"),
                            "only text content parts are supported",
                        )),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(""),
            _ => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].content"),
                    "content must be a string",
                ));
            }
        };
        if content.contains('\0') {
            return Err(ApiError::bad(
                &format!("messages[{i}].content"),
                "content must not contain NUL",
            ));
        }
        messages.push(ChatMessage {
            role: role.to_owned(),
            content,
        });
    }
    let num = |name: &str| obj.get(name).filter(|v| !v.is_null());
    let max_tokens = match num("max_completion_tokens").or_else(|| num("max_tokens")) {
        None => 256.min(n_ctx / 2),
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 1 && n < u64::from(n_ctx))
            .ok_or_else(|| {
                ApiError::bad(
                    "max_tokens",
                    format!(
                        "max_tokens must be an integer from 1 to {}",
                        n_ctx.saturating_sub(1)
                    ),
                )
            })? as u32,
    };
    let temperature = match num("temperature") {
        None => 1.0,
        Some(v) => v
            .as_f64()
            .filter(|t| (0.0..=2.0).contains(t))
            .ok_or_else(|| ApiError::bad("temperature", "temperature must be between 0 and 2"))?
            as f32,
    };
    let top_p = match num("top_p") {
        None => 1.0,
        Some(v) => v
            .as_f64()
            .filter(|p| *p > 0.0 && *p <= 1.0)
            .ok_or_else(|| ApiError::bad("top_p", "top_p must be in (0, 1]"))?
            as f32,
    };
    let seed = match num("seed") {
        None => 0xED6E_F1EE,
        // u32::MAX is llama.cpp's "pick a random seed": a fixed seed must be below it.
        Some(v) => v
            .as_u64()
            .and_then(|s| u32::try_from(s).ok())
            .filter(|&s| s != u32::MAX)
            .ok_or_else(|| ApiError::bad("seed", "seed must be an integer from 0 to 4294967294"))?,
    };
    let stop = match num("stop") {
        None => vec![],
        Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().filter(|s| !s.is_empty()).map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::bad("stop", "stop must be a string or up to 4 non-empty strings")
            })?,
        Some(_) => {
            return Err(ApiError::bad(
                "stop",
                "stop must be a string or up to 4 non-empty strings",
            ));
        }
    };
    if let Some(n) = num("n")
        && n.as_u64() != Some(1)
    {
        return Err(ApiError::bad("n", "only n = 1 is supported"));
    }
    let stream = match num("stream") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::bad("stream", "stream must be a boolean"))?,
    };
    // An extension (as in vLLM): generate exactly max_tokens, for benchmarks.
    let ignore_eos = match num("ignore_eos") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::bad("ignore_eos", "ignore_eos must be a boolean"))?,
    };
    let stream_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let json_mode = match obj.get("response_format").filter(|v| !v.is_null()) {
        None => false,
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => false,
            Some("json_object") => true,
            _ => {
                return Err(ApiError::bad(
                    "response_format.type",
                    "response_format.type must be \"text\" or \"json_object\"",
                ));
            }
        },
    };
    Ok(ChatRequest {
        json_mode,
        messages,
        sampling: Sampling {
            max_tokens,
            temperature,
            top_p,
            seed,
            stop,
            ignore_eos,
        },
        stream,
        stream_usage,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn parse(body: Value) -> Result<ChatRequest, ApiError> {
        parse_chat_request(&body, "m", 1024)
    }

    fn hi() -> Value {
        json!([{"role": "user", "content": "hi"}])
    }

    #[test]
    fn response_format_sets_json_mode() {
        assert!(!parse(json!({"messages": hi()})).unwrap().json_mode);
        let text = json!({"messages": hi(), "response_format": {"type": "text"}});
        assert!(!parse(text).unwrap().json_mode);
        let json_object = json!({"messages": hi(), "response_format": {"type": "json_object"}});
        assert!(parse(json_object).unwrap().json_mode);
        for bad in [json!({"type": "json_schema"}), json!("json"), json!({})] {
            let e = parse(json!({"messages": hi(), "response_format": bad})).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("response_format.type"), "{bad}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn ignore_eos_is_a_boolean_extension() {
        assert!(
            !parse(json!({"messages": hi()}))
                .unwrap()
                .sampling
                .ignore_eos
        );
        let on = json!({"messages": hi(), "ignore_eos": true});
        assert!(parse(on).unwrap().sampling.ignore_eos);
        let e = parse(json!({"messages": hi(), "ignore_eos": "yes"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("ignore_eos"));
    }
}
