//! The agent's configuration, in layers: built-in defaults, then
//! `<dir>/agent.toml`, then `<dir>/agent.d/*.toml` in name order, then environment
//! variables `EDGEFLEET__<SECTION>__<KEY>` (for example `EDGEFLEET__GATEWAY__URL`).
//! Later layers override earlier ones key by key. The result is checked against the
//! typed structure (unknown keys are errors, naming the file) and validated. Secrets
//! never appear in `Debug` output.
//!
//! Also here: the device owner's plugin allowlist (`[plugins]`, [`PluginsSection`]),
//! and (in `token`) the bootstrap token: read from a file only its owner can read
//! (`gateway.bootstrap_token_file`, or systemd's `$CREDENTIALS_DIRECTORY/bootstrap-token`;
//! [`read_token_file`]), needed only until the first enrolment and then deleted when
//! `gateway.delete_token_after_enrol` is set ([`delete_token_after_enrol`]).

use std::path::{Path, PathBuf};

use edgefleet_trust::attestation::TeeKind;
use serde::Deserialize;
use toml::Value;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// A layer is not valid TOML.
    #[error("{layer}: {message}")]
    Parse {
        /// File or environment variable.
        layer: String,
        /// Parser message.
        message: String,
    },
    /// The merged configuration does not fit the schema or fails validation.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The bootstrap token file can be read by group or others.
    #[error(
        "TokenFileTooOpen: {} has mode {mode:04o}; the bootstrap token file must be readable by its owner only (chmod 0600)",
        path.display()
    )]
    TokenFileTooOpen {
        /// File.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Both an inline token and a token file are configured.
    #[error(
        "TokenConflict: set gateway.bootstrap_token_file (or the systemd credential) or gateway.bootstrap_token, not both"
    )]
    TokenConflict,
}

mod token;

pub use token::{TOKEN_CREDENTIAL, delete_token_after_enrol, read_token_file};

/// A TEE kind that names no evidence source the agent has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown TEE kind {0:?}: expected tpm, sev-snp, tdx or dev")]
pub struct UnknownTeeKind(pub String);

/// Parses a TEE kind as `attestation.tee` and `attest --tee` spell it: `tpm`,
/// `sev-snp`, `tdx` or `dev`. Anything else is an error, never a fallback.
pub fn parse_tee_kind(s: &str) -> Result<TeeKind, UnknownTeeKind> {
    match s {
        "tpm" => Ok(TeeKind::Tpm),
        "sev-snp" => Ok(TeeKind::SevSnp),
        "tdx" => Ok(TeeKind::Tdx),
        "dev" => Ok(TeeKind::Dev),
        other => Err(UnknownTeeKind(other.to_owned())),
    }
}

/// A value that must not be logged.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret holding `value`.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<unset>"
        } else {
            "<redacted>"
        })
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the agent keeps its key, certificate and models.
    pub state_dir: PathBuf,
    /// This device.
    pub device: DeviceConfig,
    /// The fleet gateway.
    pub gateway: GatewayConfig,
    /// How the device attests.
    pub attestation: AttestationConfig,
    /// The local inference API.
    pub serve: ServeConfig,
    /// Talking to the fleet.
    pub fleet: FleetSection,
    /// What the device owner lets plugins have.
    pub plugins: PluginsSection,
    /// The device's own trust roots (`[trust]`, see `crate::activation::pins`).
    #[serde(default)]
    pub trust: crate::activation::pins::TrustSection,
    /// The directory the configuration was read from (not a key: set by [`load`]).
    #[serde(skip)]
    pub config_dir: PathBuf,
}

/// `[plugins]`: the device owner's allowlist. A plugin whose EdgeModel grants ask for
/// more is refused at activation (`PluginGrantDenied`), never run with less. The
/// default is nothing at all.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct PluginsSection {
    /// Host directories plugins may be granted read-only (the directory or one inside
    /// it). The agent's hard deny list applies on top (see `crate::activation::consent`).
    #[serde(default)]
    pub allow_read_dirs: Vec<PathBuf>,
    /// Whether plugins may be granted the network.
    #[serde(default)]
    pub allow_network: bool,
    /// Names of environment variables plugins may be granted.
    #[serde(default)]
    pub allow_env: Vec<String>,
    /// Whether plugins may be granted the real clocks.
    #[serde(default)]
    pub allow_clocks: bool,
}

/// `[fleet]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// Seconds between heartbeats.
    pub heartbeat_seconds: u64,
    /// Reports kept while the gateway is unreachable; the oldest are dropped (and
    /// counted) beyond it.
    pub spool_max: usize,
    /// Seconds a desired-state poll waits at the gateway for a change.
    pub poll_wait_seconds: u64,
    /// Longest wait between reconnection attempts (the backoff is capped and jittered).
    pub backoff_max_seconds: u64,
    /// Directory for compiled plugin code.
    pub plugin_cache: Option<PathBuf>,
    /// Disk budget of the artifact store, in bytes: after each activation, artifacts no
    /// revision needs any more are removed, oldest first, until the store fits. The
    /// served revision's files and the previous last-known-good's are always kept.
    pub artifacts_budget_bytes: u64,
}

/// `[device]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// EdgeDevice name.
    pub name: String,
    /// Labels asked for at the first enrolment: bare names (`zone = "front"`), stored
    /// by the gateway under the device-owned prefix `device.edgefleet.io/`. Other
    /// prefixes are refused (`LabelNotDeviceOwned`): administrators set those, on the
    /// bootstrap token.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// `https://…` URL of the gateway.
    #[serde(default)]
    pub url: String,
    /// More gateway URLs: every operator replica serves devices, so a fleet lists them
    /// all (or one Service URL). The agent starts at a place in the list of its own (a
    /// hash of its name, so devices spread over the replicas) and moves to the next
    /// one, after a jittered backoff, whenever a session fails.
    #[serde(default)]
    pub urls: Vec<String>,
    /// PEM CA of the gateway's certificate.
    pub ca: PathBuf,
    /// Bootstrap token for enrolment. Set by [`load`] from `bootstrap_token_file` or
    /// the systemd credential; an inline value still works (tests, demos) but puts the
    /// secret in a config file or the environment.
    #[serde(default)]
    pub bootstrap_token: Secret,
    /// File holding the bootstrap token, mode 0600 or stricter; missing, the agent has
    /// no token (an enrolled device needs none). Unset, the agent reads
    /// `$CREDENTIALS_DIRECTORY/bootstrap-token` (systemd `LoadCredential=`) when it
    /// exists; after [`load`] this names the file the token was read from.
    #[serde(default)]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Delete `bootstrap_token_file` once the device is enrolled (the token serves only
    /// the first enrolment). Never the systemd credential's copy.
    #[serde(default)]
    pub delete_token_after_enrol: bool,
    /// Whether the token was read from the systemd credential (not a key: set by
    /// [`load`]).
    #[serde(skip)]
    pub token_is_credential: bool,
}

impl GatewayConfig {
    /// Every gateway URL, `url` first, each once.
    pub fn endpoints(&self) -> Vec<&str> {
        let mut all: Vec<&str> = Vec::new();
        for u in std::iter::once(&self.url).chain(&self.urls) {
            if !u.is_empty() && !all.contains(&u.as_str()) {
                all.push(u);
            }
        }
        all
    }
}

/// `[attestation]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttestationConfig {
    /// `tpm`, `sev-snp`, `tdx` or `dev`.
    pub tee: String,
    /// TPM TCTI.
    pub tcti: String,
    /// configfs-tsm report directory.
    pub tsm_root: PathBuf,
    /// Most seconds between attestations.
    pub interval_seconds: u64,
}

impl AttestationConfig {
    /// `tee` parsed ([`parse_tee_kind`]).
    pub fn tee_kind(&self) -> Result<TeeKind, UnknownTeeKind> {
        parse_tee_kind(&self.tee)
    }
}

/// `[serve]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Listen address of the OpenAI-compatible API.
    pub listen: std::net::SocketAddr,
    /// Context window per slot.
    pub context_size: u32,
    /// Threads per slot (0: available cores).
    pub threads: u32,
    /// GPU layers.
    pub gpu_layers: u32,
    /// Concurrent requests.
    pub parallel_slots: u32,
    /// Waiting requests before 429.
    pub queue_depth: u32,
}

const DEFAULTS: &str = r#"
state_dir = "/var/lib/edgefleet"
[device]
name = ""
[gateway]
url = ""
ca = "/etc/edgefleet/gateway-ca.pem"
[attestation]
tee = "tpm"
tcti = "device:/dev/tpmrm0"
tsm_root = "/sys/kernel/config/tsm/report"
interval_seconds = 1800
[serve]
listen = "127.0.0.1:8080"
context_size = 2048
threads = 0
gpu_layers = 0
parallel_slots = 1
queue_depth = 16
[fleet]
heartbeat_seconds = 10
spool_max = 256
artifacts_budget_bytes = 8589934592
poll_wait_seconds = 30
backoff_max_seconds = 30
[plugins]
allow_read_dirs = []
allow_network = false
allow_env = []
allow_clocks = false
"#;

fn parse(layer: &str, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        layer: layer.to_owned(),
        message: e.to_string(),
    })
}

/// Merges `over` into `base`, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Loads the layers from `dir` and `env` (pass `std::env::vars()`).
pub fn load(
    dir: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<AgentConfig, ConfigError> {
    let mut merged = parse("built-in defaults", DEFAULTS)?;
    let env: Vec<(String, String)> = env.into_iter().collect();
    let credentials = env
        .iter()
        .find(|(k, _)| k == "CREDENTIALS_DIRECTORY")
        .map(|(_, v)| PathBuf::from(v));
    let mut files = vec![dir.join("agent.toml")];
    let dropins = dir.join("agent.d");
    if let Ok(entries) = std::fs::read_dir(&dropins) {
        let mut more: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        more.sort();
        files.extend(more);
    }
    for path in files {
        match std::fs::read_to_string(&path) {
            Ok(text) => merge(&mut merged, parse(&path.display().to_string(), &text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ConfigError::Read { path, source }),
        }
    }
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("EDGEFLEET__"))
        .collect();
    env.sort();
    for (key, value) in env {
        let parts: Vec<String> = key["EDGEFLEET__".len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        // Let TOML type the value (numbers, booleans); anything else is a string.
        let typed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(Value::String(value));
        let mut layer = toml::Table::new();
        let mut cursor = &mut layer;
        for (i, part) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                cursor.insert(part.clone(), typed.clone());
            } else {
                cursor = match cursor
                    .entry(part.clone())
                    .or_insert_with(|| Value::Table(toml::Table::new()))
                {
                    Value::Table(t) => t,
                    _ => {
                        return Err(ConfigError::Parse {
                            layer: key.clone(),
                            message: "not a table".into(),
                        });
                    }
                };
            }
        }
        merge(&mut merged, layer);
    }
    let mut config: AgentConfig = Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
    config.config_dir = dir.to_owned();
    validate(&config)?;
    token::resolve_token(&mut config.gateway, credentials.as_deref())?;
    Ok(config)
}

fn validate(c: &AgentConfig) -> Result<(), ConfigError> {
    let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
    if c.device.name.is_empty() || c.device.name.len() > 253 {
        return bad("device.name must be set (the EdgeDevice name)");
    }
    let endpoints = c.gateway.endpoints();
    if endpoints.is_empty() || endpoints.len() > 64 {
        return bad("gateway.url or gateway.urls must name between 1 and 64 https:// URLs");
    }
    if endpoints.iter().any(|u| !u.starts_with("https://")) {
        return bad("gateway.url must be an https:// URL (and so must every gateway.urls entry)");
    }
    if c.attestation.tee_kind().is_err() {
        return bad("attestation.tee must be tpm, sev-snp, tdx or dev");
    }
    if c.attestation.interval_seconds < 60 {
        return bad("attestation.interval_seconds must be at least 60");
    }
    if c.fleet.heartbeat_seconds == 0 || c.fleet.spool_max == 0 || c.fleet.backoff_max_seconds == 0
    {
        return bad(
            "fleet needs heartbeat_seconds >= 1, spool_max >= 1 and backoff_max_seconds >= 1",
        );
    }
    if c.serve.parallel_slots == 0 || c.serve.queue_depth == 0 || c.serve.context_size < 128 {
        return bad("serve needs parallel_slots >= 1, queue_depth >= 1 and context_size >= 128");
    }
    for dir in &c.plugins.allow_read_dirs {
        let plain = dir.components().all(|part| {
            matches!(
                part,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
        if !dir.is_absolute() || !plain {
            return Err(ConfigError::Invalid(format!(
                "plugins.allow_read_dirs: {} must be an absolute path without `.` or `..`",
                dir.display()
            )));
        }
    }
    if let Some(bad_name) = c
        .plugins
        .allow_env
        .iter()
        .find(|n| n.is_empty() || n.contains(['=', '\0']))
    {
        return Err(ConfigError::Invalid(format!(
            "plugins.allow_env: {bad_name:?} is not an environment variable name"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        d
    }

    pub(super) const BASE: &str = "[device]\nname = \"till-1\"\n[gateway]\nurl = \"https://gw:8443\"\nbootstrap_token = \"s3cret-token-value\"\n";

    #[test]
    fn layers_override_in_order_and_secrets_are_redacted() {
        let d = dir(&[
            ("agent.toml", BASE),
            (
                "agent.d/10-serve.toml",
                "[serve]\nparallel_slots = 2\nqueue_depth = 4\n",
            ),
            ("agent.d/20-serve.toml", "[serve]\nparallel_slots = 3\n"),
        ]);
        let env = [
            (
                "EDGEFLEET__SERVE__CONTEXT_SIZE".to_owned(),
                "4096".to_owned(),
            ),
            ("HOME".into(), "/root".into()),
        ];
        let c = load(d.path(), env).unwrap();
        assert_eq!(c.serve.parallel_slots, 3, "the later drop-in wins");
        assert_eq!(c.serve.queue_depth, 4, "untouched keys keep earlier layers");
        assert_eq!(c.serve.context_size, 4096, "the environment wins");
        assert_eq!(
            c.attestation.tcti, "device:/dev/tpmrm0",
            "defaults fill the rest"
        );
        assert_eq!(c.gateway.bootstrap_token.expose(), "s3cret-token-value");
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug must not show secrets"
        );
    }

    #[test]
    fn gateway_urls_list_every_replica_once_and_each_must_be_https() {
        let with = |extra: &str| {
            let d = dir(&[(
                "agent.toml",
                &BASE.replace("[gateway]\n", &format!("[gateway]\n{extra}")),
            )]);
            load(d.path(), [])
        };
        let c =
            with("urls = [\"https://gw-2:8443\", \"https://gw:8443\", \"https://gw-3:8443\"]\n")
                .unwrap();
        assert_eq!(
            c.gateway.endpoints(),
            ["https://gw:8443", "https://gw-2:8443", "https://gw-3:8443"]
        );
        let err = with("urls = [\"http://gw-2:8443\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("every gateway.urls entry"), "{err}");
        // A list alone is enough.
        let d = dir(&[(
            "agent.toml",
            "[device]\nname = \"till-1\"\n[gateway]\nurls = [\"https://a:1\", \"https://b:1\"]\n",
        )]);
        assert_eq!(
            load(d.path(), []).unwrap().gateway.endpoints(),
            ["https://a:1", "https://b:1"]
        );
        // None at all is named.
        let d = dir(&[("agent.toml", "[device]\nname = \"till-1\"\n[gateway]\n")]);
        let err = load(d.path(), []).unwrap_err().to_string();
        assert!(err.contains("between 1 and 64 https:// URLs"), "{err}");
    }

    #[test]
    fn unknown_keys_bad_values_and_bad_toml_are_named() {
        let d = dir(&[("agent.toml", &format!("{BASE}[serve]\nslots = 2\n"))]);
        let err = load(d.path(), []).unwrap_err().to_string();
        assert!(err.contains("unknown field `slots`"), "{err}");

        let d = dir(&[("agent.toml", BASE), ("agent.d/x.toml", "[serve\n")]);
        let err = load(d.path(), []).unwrap_err().to_string();
        assert!(err.contains("x.toml"), "{err}");

        let d = dir(&[("agent.toml", &BASE.replace("https://", "http://"))]);
        assert!(
            load(d.path(), [])
                .unwrap_err()
                .to_string()
                .contains("gateway.url must be an https:// URL")
        );

        let d = dir(&[("agent.toml", BASE)]);
        let err = load(
            d.path(),
            [(
                "EDGEFLEET__SERVE__PARALLEL_SLOTS".to_owned(),
                "0".to_owned(),
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("parallel_slots >= 1"), "{err}");
        let err = load(
            d.path(),
            [("EDGEFLEET__ATTESTATION__TEE".to_owned(), "sgx".to_owned())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("attestation.tee"), "{err}");
    }

    #[test]
    fn tee_kinds_parse_and_an_unknown_one_is_an_error() {
        for (text, kind) in [
            ("tpm", TeeKind::Tpm),
            ("sev-snp", TeeKind::SevSnp),
            ("tdx", TeeKind::Tdx),
            ("dev", TeeKind::Dev),
        ] {
            assert_eq!(parse_tee_kind(text), Ok(kind), "{text}");
        }
        for text in ["sgx", "", "TPM", "sev_snp"] {
            let err = parse_tee_kind(text).unwrap_err();
            assert_eq!(err, UnknownTeeKind(text.to_owned()));
            assert!(err.to_string().contains("unknown TEE kind"), "{err}");
        }
    }

    #[test]
    fn the_plugin_allowlist_defaults_to_nothing_and_is_validated() {
        let d = dir(&[("agent.toml", BASE)]);
        assert_eq!(
            load(d.path(), []).unwrap().plugins,
            PluginsSection::default()
        );
        let d = dir(&[(
            "agent.toml",
            &format!(
                "{BASE}[plugins]\nallow_read_dirs = [\"/srv/shop-data\"]\nallow_network = true\nallow_env = [\"SHOP_ID\"]\n"
            ),
        )]);
        let p = load(d.path(), []).unwrap().plugins;
        assert_eq!(p.allow_read_dirs, vec![PathBuf::from("/srv/shop-data")]);
        assert!(p.allow_network && !p.allow_clocks);
        assert_eq!(p.allow_env, vec!["SHOP_ID".to_owned()]);
        for bad in ["srv/data", "/srv/../etc"] {
            let d = dir(&[(
                "agent.toml",
                &format!("{BASE}[plugins]\nallow_read_dirs = [\"{bad}\"]\n"),
            )]);
            let err = load(d.path(), []).unwrap_err().to_string();
            assert!(err.contains("plugins.allow_read_dirs"), "{bad}: {err}");
        }
        let d = dir(&[("agent.toml", &format!("{BASE}[plugins]\nallow_fs = true\n"))]);
        let err = load(d.path(), []).unwrap_err().to_string();
        assert!(err.contains("unknown field `allow_fs`"), "{err}");
    }

    #[test]
    fn a_missing_device_name_is_refused() {
        let d = dir(&[]);
        assert!(
            load(d.path(), [])
                .unwrap_err()
                .to_string()
                .contains("device.name must be set")
        );
    }
}
