//! `EdgeBootstrapToken`: an enrolment token, as Kubernetes bootstrap tokens are.
//! Cluster-scoped (short name `ebt`); `metadata.name` is the token's id. A device
//! presents `<id>.<secret>` once, at its first enrolment; the object holds only the
//! SHA-256 of the secret, an expiry, how many devices it may enrol, which device names
//! and the labels every device enrolled with it gets. The gateway counts its usages in
//! status.
//!
//! Also here: the token's form ([`parse_token`], [`valid_token_id`]) and the device
//! name pattern ([`name_matches`]), shared by the gateway and the `edgefleet token`
//! command.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Characters of a token's id (`metadata.name`).
pub const TOKEN_ID_LEN: usize = 6;
/// Characters of a token's secret.
pub const TOKEN_SECRET_LEN: usize = 16;
/// The annotation on an EdgeDevice naming the token that enrolled it.
pub const TOKEN_ANNOTATION: &str = "edgefleet.io/bootstrap-token-id";

/// An enrolment token: its secret's hash, expiry, usage limit, the device names it may
/// enrol, and the labels it gives them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "edgefleet.io",
    version = "v1alpha1",
    kind = "EdgeBootstrapToken",
    plural = "edgebootstraptokens",
    shortname = "ebt",
    category = "edgefleet",
    status = "EdgeBootstrapTokenStatus",
    derive = "PartialEq",
    doc = "EdgeBootstrapToken lets devices enrol: the name is the token id, the spec holds the SHA-256 of its secret, an expiry, a usage limit, the device names allowed and the labels enrolled devices get.",
    printcolumn(name = "Expires", type_ = "date", json_path = ".spec.expirationTime"),
    printcolumn(name = "Usages", type_ = "integer", json_path = ".status.usages"),
    printcolumn(name = "Limit", type_ = "integer", json_path = ".spec.usageLimit"),
    printcolumn(
        name = "Names",
        type_ = "string",
        json_path = ".spec.deviceNamePattern"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeBootstrapTokenSpec {
    /// `sha256:<64 lowercase hex>` of the token's secret (the part after the dot).
    #[x_kube(validation = Rule::new("self.matches('^sha256:[0-9a-f]{64}$')")
        .message("secretHash must be sha256:<64 lowercase hex>"))]
    pub secret_hash: String,
    /// When the token stops enrolling devices.
    pub expiration_time: Time,
    /// How many devices the token may enrol.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub usage_limit: i64,
    /// The device names the token may enrol: a glob where `*` matches any run of
    /// characters (`till-*`); `*` allows every name.
    #[serde(default = "any_name")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9.*-]+$"))]
    pub device_name_pattern: String,
    /// Labels every device enrolled with this token gets, as an administrator's labels
    /// (EdgeModel selectors and device pools match them). Keys under the device-owned
    /// prefix `device.edgefleet.io/` are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('device.edgefleet.io/'))")
        .message("deviceLabels must not be under the device-owned prefix device.edgefleet.io/"))]
    #[schemars(extend("maxProperties" = 32))]
    pub device_labels: BTreeMap<String, String>,
    /// What the token is for, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub description: Option<String>,
}

fn one() -> i64 {
    1
}

fn any_name() -> String {
    "*".to_owned()
}

/// What the gateway recorded of a token's use.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeBootstrapTokenStatus {
    /// Devices enrolled with the token.
    #[serde(default)]
    pub usages: i64,
    /// When it last enrolled a device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_time: Option<Time>,
    /// The device it last enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_device: Option<String>,
}

impl EdgeBootstrapToken {
    /// Devices enrolled with the token so far.
    pub fn usages(&self) -> i64 {
        self.status.as_ref().map_or(0, |s| s.usages)
    }
}

fn token_chars(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Whether `id` is a token id: six characters of `[a-z0-9]`.
pub fn valid_token_id(id: &str) -> bool {
    token_chars(id, TOKEN_ID_LEN)
}

/// `<id>.<secret>` split into id and secret, when `token` has that form (six and
/// sixteen characters of `[a-z0-9]`); `None` for anything else.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    (valid_token_id(id) && token_chars(secret, TOKEN_SECRET_LEN)).then_some((id, secret))
}

/// Whether `pattern` is a device name pattern: 1 to 253 characters of `[a-z0-9.*-]`.
pub fn valid_name_pattern(pattern: &str) -> bool {
    (1..=253).contains(&pattern.len())
        && pattern.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'*' | b'-')
        })
}

/// Whether `name` matches the glob `pattern`, where `*` matches any run of characters
/// (also none) and every other character itself.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return false;
    };
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole name is the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_bootstrap_token_form() {
        assert_eq!(
            parse_token("abc123.0123456789abcdef"),
            Some(("abc123", "0123456789abcdef"))
        );
        for bad in [
            "",
            "abc123",
            "abc123.",
            "ABC123.0123456789abcdef",
            "abc12.0123456789abcdef",
            "abc1234.0123456789abcdef",
            "abc123.0123456789abcde",
            "abc123.0123456789abcdefa",
            "abc123.0123456789abcdeF",
            "abc-23.0123456789abcdef",
            "abc123.0123456789abcdef.x",
            "fleet-bootstrap-token-0123456789",
        ] {
            assert_eq!(parse_token(bad), None, "{bad}");
        }
        assert!(valid_token_id("z9z9z9"));
        assert!(!valid_token_id("z9z9z"));
        assert!(!valid_token_id("z9z9z."));
    }

    #[test]
    fn name_patterns_glob_with_star() {
        assert!(name_matches("*", "till-1"));
        assert!(name_matches("*", ""));
        assert!(name_matches("till-*", "till-1"));
        assert!(name_matches("till-*", "till-"));
        assert!(!name_matches("till-*", "kiosk-1"));
        assert!(!name_matches("till-*", "atill-1"));
        assert!(name_matches("store-*-till-*", "store-042-till-1"));
        assert!(!name_matches("store-*-till-*", "store-042-kiosk-1"));
        assert!(name_matches("*-1", "till-1"));
        assert!(!name_matches("*-1", "till-11x"));
        assert!(name_matches("a*a", "aa"));
        assert!(!name_matches("a*a", "a"));
        assert!(name_matches("till-1", "till-1"));
        assert!(!name_matches("till-1", "till-12"));
        assert!(name_matches("**", "x"));
        assert!(valid_name_pattern("till-*"));
        assert!(valid_name_pattern("*.store.example"));
        assert!(!valid_name_pattern(""));
        assert!(!valid_name_pattern("Till-*"));
        assert!(!valid_name_pattern("till_*"));
        assert!(!valid_name_pattern("till-?"));
    }

    #[test]
    fn a_token_defaults_to_one_usage_for_any_name() {
        let spec: EdgeBootstrapTokenSpec = serde_json::from_value(serde_json::json!({
            "secretHash": format!("sha256:{}", "0".repeat(64)),
            "expirationTime": "2030-01-01T00:00:00Z",
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.usage_limit, 1);
        assert_eq!(spec.device_name_pattern, "*");
        assert!(spec.device_labels.is_empty());
    }
}
