//! The `infer` import of plugins, served by the loaded model ([`EngineSubPrompt`]).

use std::sync::Arc;

use crate::engine::{ChatMessage, Engine, Event, Sampling, is_chat_role};
use crate::plugins::SubPrompt;

/// The `infer` import of plugins: a sub-prompt on the served model, through the same
/// bounded queue as API requests. Holds the engine weakly, so that a chain kept alive by
/// a request in flight does not keep an unloaded model in memory.
#[derive(Debug)]
pub struct EngineSubPrompt {
    engine: std::sync::Weak<Engine>,
    runtime: tokio::runtime::Handle,
}

impl EngineSubPrompt {
    /// Sub-prompts on `engine`, waited for on `runtime`.
    pub fn new(engine: &Arc<Engine>, runtime: tokio::runtime::Handle) -> Arc<Self> {
        Arc::new(Self {
            engine: Arc::downgrade(engine),
            runtime,
        })
    }
}

impl SubPrompt for EngineSubPrompt {
    fn infer(
        &self,
        messages: Vec<ChatMessage>,
        max_tokens: u32,
        temperature: f32,
        deadline: Option<std::time::Instant>,
    ) -> Result<String, String> {
        let engine = self.engine.upgrade().ok_or("the model was unloaded")?;
        if let Some((_, t)) = engine.control_token_in(&messages) {
            return Err(format!("content contains the control token {t:?}"));
        }
        if messages.is_empty() || messages.iter().any(|m| !is_chat_role(&m.role)) {
            return Err("messages must be non-empty, with roles system, user or assistant".into());
        }
        let sampling = Sampling {
            max_tokens,
            temperature,
            top_p: 1.0,
            seed: 0xED6E_F1EE,
            stop: vec![],
            ignore_eos: false,
        };
        let mut rx = engine
            .submit(messages, sampling)
            .map_err(|e| e.to_string())?;
        let collect = async move {
            let mut text = String::new();
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Delta(d) => text.push_str(&d),
                    Event::Done { .. } => return Ok(text),
                    Event::Failed(m) => return Err(m),
                }
            }
            Err("the generation ended without a result".to_owned())
        };
        // Runs on a blocking thread (plugins never run on the async workers); dropping
        // the receiver at the deadline stops the generation.
        self.runtime.block_on(async move {
            match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), collect)
                    .await
                    .unwrap_or_else(|_| Err("the call's deadline passed during infer".into())),
                None => collect.await,
            }
        })
    }
}
