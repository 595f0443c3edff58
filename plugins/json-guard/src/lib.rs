//! `json-guard`: when the client asked for JSON (`response_format: {"type":
//! "json_object"}`), refuses any answer that is not one valid JSON value. Other requests
//! pass untouched. Streamed JSON answers are held back until the end of the stream and
//! checked whole, so a client never receives half of an answer that is then refused.
//!
//! Config: `strip-fences` (`"true"`/`"false"`, default true) accepts an answer wrapped
//! in a Markdown code fence (```json … ```) and passes on the JSON inside it.

wit_bindgen::generate!({ path: "../wit", world: "plugin" });

use std::cell::{Cell, RefCell};

use edgefleet::plugin::host;

mod check;

thread_local! {
    static JSON_MODE: Cell<bool> = const { Cell::new(false) };
    static HELD: RefCell<String> = const { RefCell::new(String::new()) };
}

fn guard(text: &str) -> ResponseAction {
    let strip = host::config("strip-fences").is_none_or(|v| v != "false");
    match check::check(text, strip) {
        Ok(json) => ResponseAction::Proceed(json),
        Err(e) => ResponseAction::Reject(format!("the answer is not valid JSON: {e}")),
    }
}

struct JsonGuard;

impl Guest for JsonGuard {
    fn on_request(req: Request) -> RequestAction {
        JSON_MODE.set(req.json_mode);
        RequestAction::Proceed(req.messages)
    }

    fn on_response(req: Request, text: String) -> ResponseAction {
        if req.json_mode {
            guard(&text)
        } else {
            ResponseAction::Proceed(text)
        }
    }

    fn on_chunk(chunk: String) -> ResponseAction {
        if !JSON_MODE.get() {
            return ResponseAction::Proceed(chunk);
        }
        HELD.with_borrow_mut(|h| h.push_str(&chunk));
        ResponseAction::Proceed(String::new())
    }

    fn on_stream_end() -> ResponseAction {
        if !JSON_MODE.get() {
            return ResponseAction::Proceed(String::new());
        }
        let text = HELD.with_borrow_mut(std::mem::take);
        guard(&text)
    }
}

export!(JsonGuard);
