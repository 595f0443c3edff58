//! `system-prompt`: puts the configured system message in front of every request. When
//! the request starts with a system message of its own, the two are joined (configured
//! text first), because many chat templates accept only one system message.
//!
//! Config: `prompt` (required): the system message.

wit_bindgen::generate!({ path: "../wit", world: "plugin" });

use edgefleet::plugin::host;
use edgefleet::plugin::types::{LogLevel, Message};

/// `messages` with `prompt` as (the start of) the system message.
pub fn with_system(prompt: &str, mut messages: Vec<Message>) -> Vec<Message> {
    match messages.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{prompt}\n\n{}", first.content);
        }
        _ => messages.insert(
            0,
            Message {
                role: "system".into(),
                content: prompt.to_owned(),
            },
        ),
    }
    messages
}

struct SystemPrompt;

impl Guest for SystemPrompt {
    fn on_request(req: Request) -> RequestAction {
        match host::config("prompt") {
            Some(prompt) if !prompt.trim().is_empty() => {
                RequestAction::Proceed(with_system(&prompt, req.messages))
            }
            _ => {
                host::log(LogLevel::Error, "config key `prompt` is missing or empty");
                RequestAction::Reject("system-prompt plugin is not configured".into())
            }
        }
    }
    fn on_response(_req: Request, text: String) -> ResponseAction {
        ResponseAction::Proceed(text)
    }
    fn on_chunk(chunk: String) -> ResponseAction {
        ResponseAction::Proceed(chunk)
    }
    fn on_stream_end() -> ResponseAction {
        ResponseAction::Proceed(String::new())
    }
}

export!(SystemPrompt);

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn prepends_or_joins() {
        let out = with_system("Be brief.", vec![msg("user", "hi")]);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].role.as_str(), out[0].content.as_str()),
            ("system", "Be brief.")
        );
        let out = with_system(
            "Be brief.",
            vec![msg("system", "You sell shoes."), msg("user", "hi")],
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].content, "Be brief.\n\nYou sell shoes.");
    }
}
