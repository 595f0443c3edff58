//! Rego appraisal of claims (regorus). A policy is compiled once when loaded; each
//! evaluation runs on a clone of the compiled engine, so it is cheap and thread-safe.
//! Evaluation is synchronous CPU work: async callers run it on a blocking thread.
//!
//! The policy's package is `edgefleet.attestation`; it must define `allow` (boolean)
//! and may define `deny` (a set of strings, the reasons). Reference values come from
//! `data`, supplied by configuration.

use sha2::{Digest as _, Sha256};

use super::Claims;

/// Errors loading or evaluating a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy does not parse or compile.
    #[error("policy {name} does not compile: {reason}")]
    Compile {
        /// Policy name.
        name: String,
        /// Compiler message.
        reason: String,
    },
    /// The reference data is not valid JSON.
    #[error("policy data: {0}")]
    Data(String),
    /// Evaluation failed.
    #[error("evaluating policy {name}: {reason}")]
    Eval {
        /// Policy name.
        name: String,
        /// Evaluator message.
        reason: String,
    },
}

/// A compiled policy with its reference data.
#[derive(Clone)]
pub struct Policy {
    name: String,
    hash: String,
    engine: regorus::Engine,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.name)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

/// The outcome of one appraisal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    /// Whether the policy allowed the claims.
    pub allow: bool,
    /// Why not, when it did not (sorted).
    pub deny: Vec<String>,
    /// Policy name.
    pub policy: String,
    /// `sha256:<hex>` of the policy text.
    pub policy_hash: String,
}

impl Policy {
    /// Compiles `rego` with reference `data` (JSON). The hash covers the policy text.
    pub fn load(name: &str, rego: &str, data_json: &str) -> Result<Self, PolicyError> {
        let mut engine = regorus::Engine::new();
        engine
            .add_policy(format!("{name}.rego"), rego.to_owned())
            .map_err(|e| PolicyError::Compile {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        engine
            .add_data_json(data_json)
            .map_err(|e| PolicyError::Data(e.to_string()))?;
        let mut policy = Self {
            name: name.to_owned(),
            hash: format!("sha256:{}", hex::encode(Sha256::digest(rego.as_bytes()))),
            engine,
        };
        // Compile-time check: the rule exists and evaluates on an empty input.
        policy.engine.set_input(regorus::Value::new_object());
        policy
            .engine
            .eval_rule("data.edgefleet.attestation.allow".to_owned())
            .map_err(|e| PolicyError::Compile {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(policy)
    }

    /// `sha256:<hex>` of the policy text.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Appraises claims.
    pub fn evaluate(&self, claims: &Claims) -> Result<Decision, PolicyError> {
        let input = serde_json::to_string(claims).map_err(|e| PolicyError::Eval {
            name: self.name.clone(),
            reason: e.to_string(),
        })?;
        self.evaluate_json(&input)
    }

    /// Appraises claims given as JSON (for the CLI and for tests of hand-written claims).
    pub fn evaluate_json(&self, input_json: &str) -> Result<Decision, PolicyError> {
        let eval_err = |reason: String| PolicyError::Eval {
            name: self.name.clone(),
            reason,
        };
        let mut engine = self.engine.clone();
        engine
            .set_input_json(input_json)
            .map_err(|e| eval_err(e.to_string()))?;
        let allow = engine
            .eval_rule("data.edgefleet.attestation.allow".to_owned())
            .map_err(|e| eval_err(e.to_string()))?;
        let allow = allow.as_bool().copied().unwrap_or(false);
        let deny = engine
            .eval_rule("data.edgefleet.attestation.deny".to_owned())
            .ok()
            .and_then(|v| {
                v.as_set().ok().map(|s| {
                    s.iter()
                        .filter_map(|v| v.as_string().ok().map(|s| s.to_string()))
                        .collect::<Vec<_>>()
                })
            })
            .unwrap_or_default();
        let mut deny = deny;
        deny.sort();
        Ok(Decision {
            allow: allow && deny.is_empty(),
            deny,
            policy: self.name.clone(),
            policy_hash: self.hash.clone(),
        })
    }
}
