//! `edgefleet token create|list|delete`: enrolment tokens (`EdgeBootstrapToken`), on the
//! cluster of the current kubeconfig. `create` makes a token `<id>.<secret>` (six and
//! sixteen characters of `[a-z0-9]`, from the operating system's CSPRNG), stores only
//! the SHA-256 of the secret with its expiry, usage limit, device name pattern and
//! labels, and prints the token once: it cannot be shown again.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use edgefleet_crds::token::{TOKEN_ID_LEN, TOKEN_SECRET_LEN, valid_name_pattern, valid_token_id};
use edgefleet_crds::trust_policy::DEVICE_LABEL_PREFIX;
use edgefleet_crds::{EdgeBootstrapToken, EdgeBootstrapTokenSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

/// The longest a token may live.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);

/// `edgefleet token …`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print it (once: only its hash is stored).
    Create {
        /// How long it enrols devices: 30m, 24h, 7d (at most 365d).
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        ttl: Duration,
        /// How many devices it may enrol.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
        usages: i64,
        /// The device names it may enrol: a glob where `*` matches any run of
        /// characters, e.g. 'till-*'.
        #[arg(long, default_value = "*", value_parser = parse_names)]
        names: String,
        /// A label every device enrolled with it gets, as KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// What the token is for.
        #[arg(long)]
        description: Option<String>,
    },
    /// List the tokens.
    List,
    /// Delete a token (devices it enrolled stay enrolled).
    Delete {
        /// The token's id (the part before the dot).
        id: String,
    },
}

/// Parses `30m`, `24h`, `7d` (or `90s`); refuses 0 and more than [`MAX_TTL`].
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let unit = s.chars().last().ok_or("an empty duration")?;
    let n: u64 = s[..s.len() - unit.len_utf8()]
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and s, m, h or d (30m, 24h, 7d)"))?;
    let secs = match unit {
        's' => Some(n),
        'm' => n.checked_mul(60),
        'h' => n.checked_mul(3600),
        'd' => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(|| format!("{s:?}: expected a number and s, m, h or d (30m, 24h, 7d)"))?;
    let ttl = Duration::from_secs(secs);
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(format!("{s:?}: a token lives more than 0 and at most 365d"));
    }
    Ok(ttl)
}

fn parse_names(s: &str) -> Result<String, String> {
    if valid_name_pattern(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?}: a device name pattern is [a-z0-9.-] with * for any run of characters"
        ))
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?}: the key is empty"));
    }
    if k.starts_with(DEVICE_LABEL_PREFIX) {
        return Err(format!(
            "{k}: {DEVICE_LABEL_PREFIX} is the devices' own prefix; a token sets administrators' labels"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// `len` characters of `[a-z0-9]` from the operating system's CSPRNG (rejection
/// sampling, so every character is equally likely).
pub fn random_chars(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let mut b = [0u8; 1];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
        // 252 = 7 * 36: bytes above it would favour the first characters.
        if b[0] < 252 {
            out.push(char::from(ALPHABET[usize::from(b[0] % 36)]));
        }
    }
    out
}

/// A new token: (id, secret).
pub fn generate() -> (String, String) {
    (random_chars(TOKEN_ID_LEN), random_chars(TOKEN_SECRET_LEN))
}

/// A client for the cluster of the current kubeconfig.
pub(crate) async fn client() -> anyhow::Result<kube::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    kube::Client::try_default()
        .await
        .context("connecting to the cluster of the current kubeconfig")
}

/// Runs a `token` command; returns what it prints on stdout.
pub fn run(cmd: TokenCommand) -> anyhow::Result<String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run_async(cmd))
}

async fn run_async(cmd: TokenCommand) -> anyhow::Result<String> {
    let api: Api<EdgeBootstrapToken> = Api::all(client().await?);
    match cmd {
        TokenCommand::Create {
            ttl,
            usages,
            names,
            labels,
            description,
        } => {
            let expires = Timestamp::now()
                .checked_add(ttl)
                .context("the expiry is out of range")?;
            let labels: BTreeMap<String, String> = labels.into_iter().collect();
            // A fresh id is tried a few times: a collision is an existing token's.
            for _ in 0..5 {
                let (id, secret) = generate();
                let token = EdgeBootstrapToken::new(
                    &id,
                    EdgeBootstrapTokenSpec {
                        secret_hash: edgefleet_trust::attestation::identity::sha256_digest(
                            secret.as_bytes(),
                        ),
                        expiration_time: Time(expires),
                        usage_limit: usages,
                        device_name_pattern: names.clone(),
                        device_labels: labels.clone(),
                        description: description.clone(),
                    },
                );
                match api.create(&PostParams::default(), &token).await {
                    Ok(_) => return Ok(format!("{id}.{secret}")),
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => return Err(e).context("creating the EdgeBootstrapToken"),
                }
            }
            bail!("five fresh token ids were all taken; try again")
        }
        TokenCommand::List => {
            let tokens = api
                .list(&ListParams::default())
                .await
                .context("listing EdgeBootstrapTokens")?;
            Ok(table(&tokens.items, Timestamp::now()))
        }
        TokenCommand::Delete { id } => {
            if !valid_token_id(&id) {
                bail!("{id:?} is not a token id (six characters of [a-z0-9])");
            }
            match api.delete(&id, &DeleteParams::default()).await {
                Ok(_) => Ok(format!("deleted bootstrap token {id}")),
                Err(kube::Error::Api(s)) if s.code == 404 => bail!("no bootstrap token {id}"),
                Err(e) => Err(e).context("deleting the EdgeBootstrapToken"),
            }
        }
    }
}

/// The tokens as a table: id, expiry (or `expired`), usages of the limit, names,
/// labels, description.
pub fn table(tokens: &[EdgeBootstrapToken], now: Timestamp) -> String {
    let mut rows = vec![[
        "ID".to_owned(),
        "EXPIRES".to_owned(),
        "USAGES".to_owned(),
        "NAMES".to_owned(),
        "LABELS".to_owned(),
        "DESCRIPTION".to_owned(),
    ]];
    for t in tokens {
        let expires = t.spec.expiration_time.0;
        rows.push([
            t.metadata.name.clone().unwrap_or_default(),
            if expires <= now {
                "expired".to_owned()
            } else {
                expires.to_string()
            },
            format!("{}/{}", t.usages(), t.spec.usage_limit),
            t.spec.device_name_pattern.clone(),
            t.spec
                .device_labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            t.spec.description.clone().unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_and_zero_or_over_a_year_is_refused() {
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_ttl("365d"), Ok(MAX_TTL));
        for bad in [
            "0h",
            "366d",
            "",
            "h",
            "24",
            "1w",
            "-1h",
            "1.5h",
            "99999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_tokens_have_the_token_form_and_differ() {
        let (id, secret) = generate();
        let token = format!("{id}.{secret}");
        assert_eq!(
            edgefleet_crds::token::parse_token(&token),
            Some((id.as_str(), secret.as_str()))
        );
        assert_ne!(generate(), generate());
        // Every character of the alphabet turns up (no bias to a few).
        let many = random_chars(4000);
        assert!(
            many.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        assert_eq!(
            many.bytes()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            36
        );
    }

    #[test]
    fn names_and_labels_are_checked() {
        assert!(parse_names("till-*").is_ok());
        assert!(parse_names("Till-*").is_err());
        assert_eq!(
            parse_label("edgefleet.io/pool=retail"),
            Ok(("edgefleet.io/pool".to_owned(), "retail".to_owned()))
        );
        assert!(parse_label("device.edgefleet.io/pool=retail").is_err());
        assert!(parse_label("pool").is_err());
        assert!(parse_label("=x").is_err());
    }

    #[test]
    fn the_table_shows_usages_of_the_limit_and_expired_tokens() {
        let now = Timestamp::now();
        let mut t = EdgeBootstrapToken::new(
            "abc123",
            EdgeBootstrapTokenSpec {
                secret_hash: format!("sha256:{}", "0".repeat(64)),
                expiration_time: Time(now),
                usage_limit: 3,
                device_name_pattern: "till-*".into(),
                device_labels: [("edgefleet.io/pool".to_owned(), "retail".to_owned())].into(),
                description: Some("store 42".into()),
            },
        );
        t.status = Some(edgefleet_crds::EdgeBootstrapTokenStatus {
            usages: 1,
            ..Default::default()
        });
        let text = table(&[t], now);
        let row = text.lines().nth(1).unwrap();
        for part in [
            "abc123",
            "expired",
            "1/3",
            "till-*",
            "edgefleet.io/pool=retail",
            "store 42",
        ] {
            assert!(row.contains(part), "{text}");
        }
        assert!(!text.contains("sha256"), "the hash is not shown");
    }
}
