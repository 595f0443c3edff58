//! `pii-redact`: replaces e-mail addresses with `[EMAIL]` and phone numbers with
//! `[PHONE]`, in the request's messages before the model sees them and in the answer
//! before the client does. Streamed answers are redacted too: the plugin holds back
//! the tail of the text that could still grow into an address or a number, and emits it
//! once it cannot (or at the end of the stream).
//!
//! Config (`"true"`/`"false"`, each default true): `email` and `phone` switch each
//! kind; `requests` and `responses` switch each direction.

wit_bindgen::generate!({ path: "../wit", world: "plugin" });

use std::cell::RefCell;

use edgefleet::plugin::host;

mod redact;

/// Longest tail held back while streaming; past it the tail is redacted as it stands.
const MAX_HELD: usize = 256;

thread_local! {
    static HELD: RefCell<String> = const { RefCell::new(String::new()) };
}

fn on(key: &str) -> bool {
    host::config(key).is_none_or(|v| v != "false")
}

fn kinds() -> redact::Kinds {
    redact::Kinds {
        email: on("email"),
        phone: on("phone"),
    }
}

struct PiiRedact;

impl Guest for PiiRedact {
    fn on_request(req: Request) -> RequestAction {
        if !on("requests") {
            return RequestAction::Proceed(req.messages);
        }
        let kinds = kinds();
        let messages = req
            .messages
            .into_iter()
            .map(|m| edgefleet::plugin::types::Message {
                content: redact::redact(&m.content, kinds),
                role: m.role,
            })
            .collect();
        RequestAction::Proceed(messages)
    }

    fn on_response(_req: Request, text: String) -> ResponseAction {
        if !on("responses") {
            return ResponseAction::Proceed(text);
        }
        ResponseAction::Proceed(redact::redact(&text, kinds()))
    }

    fn on_chunk(chunk: String) -> ResponseAction {
        if !on("responses") {
            return ResponseAction::Proceed(chunk);
        }
        let kinds = kinds();
        HELD.with_borrow_mut(|held| {
            held.push_str(&chunk);
            let cut = redact::safe_prefix_len(held);
            let cut = if held.len() - cut > MAX_HELD {
                held.len()
            } else {
                cut
            };
            let ready: String = held.drain(..cut).collect();
            ResponseAction::Proceed(redact::redact(&ready, kinds))
        })
    }

    fn on_stream_end() -> ResponseAction {
        let kinds = kinds();
        HELD.with_borrow_mut(|held| {
            let rest = std::mem::take(held);
            ResponseAction::Proceed(redact::redact(&rest, kinds))
        })
    }
}

export!(PiiRedact);
