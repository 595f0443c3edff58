//! Golden prompts: after a revision is loaded, and before it serves a request or is
//! reported Ready, each of its prompts (`spec.validation.goldenPrompts`) is answered
//! greedily and the answer checked against its expectation. A mismatch fails the
//! revision on this device (`GoldenPromptMismatch`); the answers' digests go to the
//! gateway, which shows how the fleet's hardware kinds agree.

use std::time::Duration;

use edgefleet_proto as proto;
use sha2::Digest as _;

use crate::engine::{ChatMessage, Engine, Event, Sampling};

/// Longest one golden prompt may take to answer.
pub const ANSWER_PATIENCE: Duration = Duration::from_secs(300);

/// Why the golden prompts failed.
#[derive(Debug, thiserror::Error)]
pub enum GoldenError {
    /// An answer did not meet its expectation.
    #[error("GoldenPromptMismatch: golden prompt {name}: the answer {answer:?} {wanted}")]
    Mismatch {
        /// The prompt's name.
        name: String,
        /// The answer (its first 200 characters).
        answer: String,
        /// What was expected, in words.
        wanted: String,
    },
    /// The prompt could not be answered (the engine refused or failed it, or took too
    /// long), or its expectation is unusable.
    #[error("GoldenPromptFailed: golden prompt {name}: {why}")]
    Failed {
        /// The prompt's name.
        name: String,
        /// Why.
        why: String,
    },
}

/// Whether `answer` meets `p`'s expectation: `Ok(())`, or what was wanted, in words.
pub fn check(p: &proto::GoldenPrompt, answer: &str) -> Result<(), Result<String, String>> {
    match (&p.exact, &p.contains, &p.regex) {
        (Some(exact), None, None) => {
            if answer.trim() == exact {
                Ok(())
            } else {
                Err(Ok(format!("is not exactly {exact:?}")))
            }
        }
        (None, Some(part), None) => {
            if answer.contains(part.as_str()) {
                Ok(())
            } else {
                Err(Ok(format!("does not contain {part:?}")))
            }
        }
        (None, None, Some(re)) => {
            let compiled = regex::RegexBuilder::new(re)
                .size_limit(proto::GOLDEN_REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| Err(format!("regex: {e}")))?;
            if compiled.is_match(answer) {
                Ok(())
            } else {
                Err(Ok(format!("does not match /{re}/")))
            }
        }
        _ => Err(Err(
            "expects not exactly one of exact, contains and regex".into()
        )),
    }
}

/// `sha256:<hex>` of `text`.
pub fn digest(text: &str) -> String {
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(text.as_bytes()))
    )
}

/// Answers each of `prompts` greedily on `engine` and checks it; returns the answers'
/// digests, in order.
pub async fn run(
    engine: &Engine,
    prompts: &[proto::GoldenPrompt],
) -> Result<Vec<proto::GoldenAnswer>, GoldenError> {
    let mut out = Vec::new();
    for p in prompts.iter().take(proto::MAX_GOLDEN_PROMPTS) {
        let failed = |why: String| GoldenError::Failed {
            name: p.name.clone(),
            why,
        };
        let sampling = Sampling {
            max_tokens: p.max_tokens.clamp(1, 256),
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            ignore_eos: false,
        };
        let mut events = engine
            .submit(
                vec![ChatMessage {
                    role: "user".into(),
                    content: p.prompt.clone(),
                }],
                sampling,
            )
            .map_err(|e| failed(e.to_string()))?;
        let answer = tokio::time::timeout(ANSWER_PATIENCE, async {
            let mut text = String::new();
            while let Some(e) = events.recv().await {
                match e {
                    Event::Delta(d) => text.push_str(&d),
                    Event::Done { .. } => return Ok(text),
                    Event::Failed(why) => return Err(why),
                }
            }
            Err("the engine stopped".to_owned())
        })
        .await
        .map_err(|_| failed(format!("no answer within {} s", ANSWER_PATIENCE.as_secs())))?
        .map_err(failed)?;
        match check(p, &answer) {
            Ok(()) => {}
            Err(Ok(wanted)) => {
                return Err(GoldenError::Mismatch {
                    name: p.name.clone(),
                    answer: answer.chars().take(200).collect(),
                    wanted,
                });
            }
            Err(Err(why)) => return Err(failed(why)),
        }
        out.push(proto::GoldenAnswer {
            name: p.name.clone(),
            digest: digest(&answer),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(
        exact: Option<&str>,
        contains: Option<&str>,
        regex: Option<&str>,
    ) -> proto::GoldenPrompt {
        proto::GoldenPrompt {
            name: "capital".into(),
            prompt: "What is the capital of France?".into(),
            exact: exact.map(Into::into),
            contains: contains.map(Into::into),
            regex: regex.map(Into::into),
            max_tokens: 16,
        }
    }

    #[test]
    fn each_expectation_is_met_or_named() {
        let answer = "  The capital of France is Paris.\n";
        assert_eq!(
            check(
                &prompt(Some("The capital of France is Paris."), None, None),
                answer
            ),
            Ok(())
        );
        assert_eq!(
            check(&prompt(Some("Paris"), None, None), answer),
            Err(Ok("is not exactly \"Paris\"".into()))
        );
        assert_eq!(check(&prompt(None, Some("Paris"), None), answer), Ok(()));
        assert_eq!(
            check(&prompt(None, Some("Lyon"), None), answer),
            Err(Ok("does not contain \"Lyon\"".into()))
        );
        assert_eq!(
            check(&prompt(None, None, Some(r"(?i)\bparis\b")), answer),
            Ok(())
        );
        assert_eq!(
            check(&prompt(None, None, Some(r"^Lyon")), answer),
            Err(Ok("does not match /^Lyon/".into()))
        );
    }

    #[test]
    fn an_unusable_expectation_is_a_failure_not_a_mismatch() {
        let bad = check(&prompt(None, None, Some("(unclosed")), "x");
        assert!(
            matches!(&bad, Err(Err(why)) if why.starts_with("regex: ")),
            "{bad:?}"
        );
        // A hostile expression cannot take the device's memory: the size limit refuses it.
        let huge = check(&prompt(None, None, Some(r"\w{1000}\w{1000}\w{1000}")), "x");
        assert!(
            matches!(&huge, Err(Err(why)) if why.contains("size limit")),
            "{huge:?}"
        );
        // None, or two: the device refuses rather than guesses.
        assert!(matches!(check(&prompt(None, None, None), "x"), Err(Err(_))));
        assert!(matches!(
            check(&prompt(Some("x"), Some("x"), None), "x"),
            Err(Err(_))
        ));
    }

    #[test]
    fn the_digest_is_of_the_whole_answer() {
        assert_eq!(
            digest(""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_ne!(digest("Paris"), digest("Paris "));
    }
}
