//! `hostile`: a plugin that misbehaves on purpose, for the agent's sandbox tests. Its
//! config key `mode` picks the misbehaviour, run in the hook named by `hook`
//! (`request`, the default, or `response`):
//! - `loop`: spins forever (stopped by fuel or the deadline);
//! - `alloc`: allocates far past any memory cap;
//! - `trap`: aborts (a Wasm `unreachable` trap);
//! - `infer-loop`: calls the host's `infer` again and again, ignoring its errors;
//! - `bad-utf8`: returns a string that is not UTF-8;
//! - `amplify`: returns a thousand messages whose contents all alias one 1 MiB string,
//!   so that copying them out would cost the host a gigabyte;
//! - `bad-role`: rewrites the request with a role the API does not accept;
//! - `echo-request` (response hook): answers with the request it was given, so a test
//!   can see what an earlier plugin let through;
//! - `infer-answer`: answers with what one `infer` sub-prompt returns (the well-behaved
//!   use of `infer`, to test the host's side of it);
//! - anything else: behaves.
//!
//! With config `trigger`, it misbehaves only in requests whose messages contain that
//! text, so a test can show the next, ordinary request is served. Test fixture only;
//! never deploy it.

#![allow(unsafe_code)]

wit_bindgen::generate!({ path: "../wit", world: "plugin" });

use edgefleet::plugin::host;
use edgefleet::plugin::types::{InferParams, Message};

thread_local! {
    static TRIGGERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static SEEN: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Messages that all point at the same 1 MiB of guest memory.
fn aliased_messages() -> Vec<Message> {
    let mut big = std::mem::ManuallyDrop::new("x".repeat(1 << 20));
    let (ptr, len, cap) = (big.as_mut_ptr(), big.len(), big.capacity());
    (0..1000)
        .map(|_| Message {
            role: "user".into(),
            // SAFETY: deliberately aliased; the instance is thrown away after the call.
            content: unsafe { String::from_raw_parts(ptr, len, cap) },
        })
        .collect()
}

fn misbehave(hook: &str) -> Option<String> {
    if host::config("hook").as_deref().unwrap_or("request") != hook || !TRIGGERED.get() {
        return None;
    }
    match host::config("mode").as_deref() {
        Some("loop") => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Some("alloc") => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Some("trap") => std::process::abort(),
        Some("infer-loop") => {
            let msgs = vec![Message {
                role: "user".into(),
                content: "again".into(),
            }];
            loop {
                let r = host::infer(
                    &msgs,
                    InferParams {
                        max_tokens: 1,
                        temperature: 0.0,
                    },
                );
                std::hint::black_box(r.ok());
            }
        }
        Some("echo-request") => Some(SEEN.with_borrow(|s| s.clone())),
        Some("infer-answer") => {
            let msgs = vec![Message {
                role: "user".into(),
                content: "What is the capital of France? Answer in one word.".into(),
            }];
            Some(
                match host::infer(
                    &msgs,
                    InferParams {
                        max_tokens: 8,
                        temperature: 0.0,
                    },
                ) {
                    Ok(text) => text,
                    Err(e) => format!("infer error: {e}"),
                },
            )
        }
        // SAFETY: deliberately not UTF-8; the host must refuse the string when it lifts it.
        Some("bad-utf8") => {
            Some(unsafe { String::from_utf8_unchecked(vec![0x66, 0xff, 0xfe, 0x80]) })
        }
        _ => None,
    }
}

struct Hostile;

impl Guest for Hostile {
    fn on_request(req: Request) -> RequestAction {
        let triggered = match host::config("trigger") {
            Some(t) => req.messages.iter().any(|m| m.content.contains(&t)),
            None => true,
        };
        TRIGGERED.set(triggered);
        SEEN.set(
            req.messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        );
        if triggered && host::config("hook").as_deref().unwrap_or("request") == "request" {
            match host::config("mode").as_deref() {
                Some("amplify") => return RequestAction::Proceed(aliased_messages()),
                Some("bad-role") => {
                    return RequestAction::Proceed(vec![Message {
                        role: "tool".into(),
                        content: "x".into(),
                    }]);
                }
                _ => {}
            }
        }
        match misbehave("request") {
            Some(text) => RequestAction::Respond(text),
            None => RequestAction::Proceed(req.messages),
        }
    }
    fn on_response(_req: Request, text: String) -> ResponseAction {
        ResponseAction::Proceed(misbehave("response").unwrap_or(text))
    }
    fn on_chunk(chunk: String) -> ResponseAction {
        ResponseAction::Proceed(misbehave("response").unwrap_or(chunk))
    }
    fn on_stream_end() -> ResponseAction {
        ResponseAction::Proceed(String::new())
    }
}

export!(Hostile);
