//! The device's own trust roots: which signers this device accepts, whatever the gateway
//! says. The gateway's signers for a model are intersected with these pins before any
//! signature is checked, so a compromised control plane (or an EdgeModel author who got
//! past it) cannot widen what the device runs.
//!
//! Where the pins come from, in order:
//! 1. **Provisioned**: the `*.json` files in `[trust] dir` (default `<config dir>/trust`,
//!    that is `/etc/edgefleet/trust` for the package, which ships it empty). Each file
//!    holds one signer or a list of them, in the shape EdgeModels and the gateway use:
//!    `{"name", "publicKey"}` or `{"name", "certificateRoot", "identities": [...]}`.
//!    Provisioning fills it; the agent never writes there.
//! 2. **First use**: when that directory holds no pins and `[trust] first_use` is true
//!    (the default), the agent pins the cluster's whole trusted set the first time the
//!    gateway sends one ([`LocalPins::pin_first_use`]), into
//!    `<state dir>/trust/first-use.json`, logged as a warning. From then on that set is
//!    fixed: a signer the cluster adds later is refused on this device until the owner
//!    provisions it (or deletes the first-use file to pin again).
//! 3. **Unpinned**: no provisioned pins and nothing pinned yet (or `first_use = false`):
//!    every model is refused `UntrustedSigner`.
//!
//! A pin file that does not parse stops the agent at start ([`PinError`]): a device that
//! cannot read its own roots must not guess them.
//!
//! Matching ([`LocalPins::intersect`]) is by key material, not by name: a gateway signer
//! matches a pinned key with the same public key, or a pinned root with the same
//! certificate, and then keeps only the identities both allow.

use std::path::{Path, PathBuf};

use edgefleet_proto as proto;
use edgefleet_trust::model_signing::{PublicKey, TrustedSigner};
use serde::Deserialize;

use crate::config::AgentConfig;

/// File the first-use pins are kept in, under `<state dir>/trust/`.
pub const FIRST_USE_FILE: &str = "first-use.json";

/// `[trust]` of `agent.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    /// Directory of provisioned pins (default: `trust` in the configuration directory).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Whether an empty pin directory pins the cluster's set at first contact.
    #[serde(default = "yes")]
    pub first_use: bool,
}

fn yes() -> bool {
    true
}

impl Default for TrustSection {
    fn default() -> Self {
        Self {
            dir: None,
            first_use: true,
        }
    }
}

impl TrustSection {
    /// The provisioned pin directory for a configuration read from `config_dir`.
    pub fn dir(&self, config_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| config_dir.join("trust"))
    }
}

/// A pin file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// A pin file does not parse, or names an unusable key or root.
    #[error("TrustPinInvalid: {path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The pin directory or the first-use file cannot be read or written.
    #[error("TrustPinStore: {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// None of a model's signers is pinned on this device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("UntrustedSigner: {0}")]
pub struct Untrusted(pub String);

/// Where the pins in force came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// Files in the provisioned directory.
    Provisioned(PathBuf),
    /// The first-use file.
    FirstUse(PathBuf),
    /// Nothing pinned.
    Unpinned,
}

#[derive(Debug, Clone)]
struct Pin {
    signer: proto::Signer,
    material: TrustedSigner,
}

/// The signers this device accepts ([module docs](self)).
#[derive(Debug, Clone)]
pub struct LocalPins {
    pins: Vec<Pin>,
    source: PinSource,
    first_use: Option<PathBuf>,
}

fn material(s: &proto::Signer) -> Result<TrustedSigner, String> {
    TrustedSigner::from_pem(
        &s.name,
        s.public_key.as_deref(),
        s.certificate_root.as_deref(),
        &s.identities,
    )
}

fn parse_file(path: &Path, text: &str) -> Result<Vec<Pin>, PinError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(proto::Signer),
        Many(Vec<proto::Signer>),
    }
    let invalid = |why: String| PinError::Invalid {
        path: path.to_owned(),
        why,
    };
    let signers = match serde_json::from_str::<OneOrMany>(text)
        .map_err(|e| invalid(format!("not a signer or a list of signers: {e}")))?
    {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    signers
        .into_iter()
        .map(|s| {
            let material = material(&s).map_err(invalid)?;
            Ok(Pin {
                signer: s,
                material,
            })
        })
        .collect()
}

fn read_pins(dir: &Path) -> Result<Vec<Pin>, PinError> {
    let io = |source| PinError::Io {
        path: dir.to_owned(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut pins = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|source| PinError::Io {
            path: f.clone(),
            source,
        })?;
        pins.extend(parse_file(&f, &text)?);
    }
    Ok(pins)
}

impl LocalPins {
    /// The pins of a device configured by `config` ([module docs](self)).
    pub fn load(config: &AgentConfig) -> Result<Self, PinError> {
        let dir = config.trust.dir(&config.config_dir);
        let first_use_file = config.state_dir.join("trust").join(FIRST_USE_FILE);
        let provisioned = read_pins(&dir)?;
        let first_use = config.trust.first_use.then(|| first_use_file.clone());
        if !provisioned.is_empty() {
            return Ok(Self {
                pins: provisioned,
                source: PinSource::Provisioned(dir),
                first_use: None,
            });
        }
        match std::fs::read_to_string(&first_use_file) {
            Ok(text) if config.trust.first_use => Ok(Self {
                pins: parse_file(&first_use_file, &text)?,
                source: PinSource::FirstUse(first_use_file),
                first_use,
            }),
            Ok(_) => Ok(Self {
                pins: Vec::new(),
                source: PinSource::Unpinned,
                first_use,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self {
                pins: Vec::new(),
                source: PinSource::Unpinned,
                first_use,
            }),
            Err(source) => Err(PinError::Io {
                path: first_use_file,
                source,
            }),
        }
    }

    /// Where the pins in force came from.
    pub fn source(&self) -> &PinSource {
        &self.source
    }

    /// How many signers are pinned.
    pub fn len(&self) -> usize {
        self.pins.len()
    }

    /// Whether nothing is pinned.
    pub fn is_empty(&self) -> bool {
        self.pins.is_empty()
    }

    /// Pins `cluster` (the gateway's whole trusted set) when nothing is pinned yet and
    /// first use is allowed: written to the first-use file, logged as a warning. True
    /// when it pinned; an already pinned device, an empty `cluster` (or one none of whose
    /// signers parses), or `first_use = false` pin nothing. A signer that does not parse
    /// is left out of the pins, with a warning.
    pub async fn pin_first_use(&mut self, cluster: &[proto::Signer]) -> Result<bool, PinError> {
        let Some(file) = self.first_use.clone() else {
            return Ok(false);
        };
        if self.source != PinSource::Unpinned || cluster.is_empty() {
            return Ok(false);
        }
        // A signer that does not parse is left out (and named), so that one bad entry in
        // the cluster's policies does not leave every new device unpinned.
        let mut pins = Vec::new();
        for s in cluster {
            match material(s) {
                Ok(material) => pins.push(Pin {
                    signer: s.clone(),
                    material,
                }),
                Err(why) => tracing::warn!(
                    signer = %s.name,
                    why = %why,
                    "trust on first use: leaving out a signer of the cluster that does not parse"
                ),
            }
        }
        if pins.is_empty() {
            return Ok(false);
        }
        let cluster: Vec<proto::Signer> = pins.iter().map(|p| p.signer.clone()).collect();
        let cluster = cluster.as_slice();
        let io = |source| PinError::Io {
            path: file.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(cluster).map_err(|e| PinError::Invalid {
            path: file.clone(),
            why: e.to_string(),
        })?;
        if let Some(parent) = file.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io)?;
        }
        crate::durable::write_async(&file, body, 0o644)
            .await
            .map_err(io)?;
        let names: Vec<&str> = cluster.iter().map(|s| s.name.as_str()).collect();
        tracing::warn!(
            file = %file.display(),
            signers = ?names,
            "trust on first use: pinned the cluster's {} signer(s); a signer the cluster adds \
             later is refused on this device until its owner provisions it",
            pins.len()
        );
        self.pins = pins;
        self.source = PinSource::FirstUse(file);
        Ok(true)
    }

    /// The gateway's `signers` for a model, narrowed to what this device pins: a signer
    /// stays when a pin has the same key, or the same root (keeping only the identities
    /// both allow). `Err` when none stays.
    pub fn intersect(&self, signers: &[proto::Signer]) -> Result<Vec<proto::Signer>, Untrusted> {
        let mut kept = Vec::new();
        for s in signers {
            let Ok(theirs) = material(s) else {
                continue;
            };
            for pin in &self.pins {
                match (&theirs, &pin.material) {
                    (TrustedSigner::Key { key: a, .. }, TrustedSigner::Key { key: b, .. })
                        if same_key(a, b) =>
                    {
                        kept.push(s.clone());
                        break;
                    }
                    (TrustedSigner::Root(a), TrustedSigner::Root(b)) if a.der == b.der => {
                        let identities: Vec<String> = s
                            .identities
                            .iter()
                            .filter(|i| b.identities.contains(i))
                            .cloned()
                            .collect();
                        if !identities.is_empty() {
                            kept.push(proto::Signer {
                                identities,
                                ..s.clone()
                            });
                            break;
                        }
                    }
                    _ => {}
                }
            }
        }
        if kept.is_empty() {
            let names: Vec<&str> = signers.iter().map(|s| s.name.as_str()).collect();
            let held = match &self.source {
                PinSource::Unpinned => "no pinned signers".to_owned(),
                PinSource::Provisioned(d) => {
                    format!("{} pinned signer(s) in {}", self.pins.len(), d.display())
                }
                PinSource::FirstUse(f) => {
                    format!(
                        "{} signer(s) pinned at first use in {}",
                        self.pins.len(),
                        f.display()
                    )
                }
            };
            return Err(Untrusted(format!(
                "none of the model's signers {names:?} is among this device's trust roots ({held})"
            )));
        }
        Ok(kept)
    }

    /// The pinned signers, as the gateway would send them.
    pub fn signers(&self) -> Vec<proto::Signer> {
        self.pins.iter().map(|p| p.signer.clone()).collect()
    }
}

/// Whether any of `served` (the signers of a revision this device serves) is among
/// `cluster` (the cluster's whole trusted set, as the gateway sent it), matched as
/// [`LocalPins::intersect`] matches. Signers of `cluster` that do not parse match
/// nothing.
pub fn still_trusted(served: &[proto::Signer], cluster: &[proto::Signer]) -> bool {
    let set = LocalPins {
        pins: cluster
            .iter()
            .filter_map(|s| {
                material(s).ok().map(|material| Pin {
                    signer: s.clone(),
                    material,
                })
            })
            .collect(),
        source: PinSource::Unpinned,
        first_use: None,
    };
    set.intersect(served).is_ok()
}

fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    match (a.to_spki_der(), b.to_spki_der()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const A: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEapxR2CK3oM+d9JePZz6HpWSsy77H\np0UQGha2jnt32/VjZs3dx3aUJOVxUVZKiAgs71XBzOUCkRsKcVMqkUlT/w==\n-----END PUBLIC KEY-----\n";
    const B: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEWqep+ntKqtGvIlvRREqF3VzddSes\nwKrO9gjU/JC4q1NFJgMrxSyyOOcuNvqo8R93bXPuV7uKd0mR/f0ZWzLTOw==\n-----END PUBLIC KEY-----\n";

    fn signer(name: &str, pem: &str) -> proto::Signer {
        proto::Signer {
            name: name.into(),
            public_key: Some(pem.into()),
            certificate_root: None,
            identities: vec![],
        }
    }

    fn config(dir: &Path, first_use: bool) -> AgentConfig {
        std::fs::write(
            dir.join("agent.toml"),
            format!(
                "state_dir = \"{}\"\n[device]\nname = \"d\"\n[gateway]\nurl = \"https://gw\"\nbootstrap_token = \"0123456789abcdef\"\n[trust]\nfirst_use = {first_use}\n",
                dir.join("state").display()
            ),
        )
        .unwrap();
        crate::config::load(dir, Vec::<(String, String)>::new()).unwrap()
    }

    #[tokio::test]
    async fn an_empty_directory_pins_the_first_set_and_never_widens() {
        let tmp = tempfile::tempdir().unwrap();
        let c = config(tmp.path(), true);
        let (a, b) = (A, B);
        let mut pins = LocalPins::load(&c).unwrap();
        assert_eq!(pins.source(), &PinSource::Unpinned);
        let refused = pins.intersect(&[signer("a", a)]).unwrap_err();
        assert!(
            refused.to_string().starts_with("UntrustedSigner: "),
            "{refused}"
        );
        assert!(pins.pin_first_use(&[signer("a", a)]).await.unwrap());
        assert_eq!(pins.intersect(&[signer("renamed", a)]).unwrap().len(), 1);
        // The cluster later trusts b too: this device does not widen.
        assert!(
            !pins
                .pin_first_use(&[signer("a", a), signer("b", b)])
                .await
                .unwrap()
        );
        assert!(pins.intersect(&[signer("b", b)]).is_err());
        // A restart reads the first-use pins back.
        let again = LocalPins::load(&c).unwrap();
        assert!(matches!(again.source(), PinSource::FirstUse(_)));
        assert_eq!(
            again.intersect(&[signer("b", b), signer("a", a)]).unwrap(),
            vec![signer("a", a)]
        );
        assert!(again.intersect(&[signer("b", b)]).is_err());
    }

    #[tokio::test]
    async fn a_cluster_signer_that_does_not_parse_is_left_out_of_the_first_use_pins() {
        let tmp = tempfile::tempdir().unwrap();
        let c = config(tmp.path(), true);
        let mut pins = LocalPins::load(&c).unwrap();
        let bad = signer(
            "typo",
            "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
        );
        // Only a bad signer: nothing is pinned, the device stays unpinned.
        assert!(
            !pins
                .pin_first_use(std::slice::from_ref(&bad))
                .await
                .unwrap()
        );
        assert_eq!(pins.source(), &PinSource::Unpinned);
        // A bad signer beside a good one: the good one is pinned, the bad one is not.
        assert!(pins.pin_first_use(&[bad, signer("a", A)]).await.unwrap());
        assert_eq!(pins.len(), 1);
        assert!(pins.intersect(&[signer("a", A)]).is_ok());
        let kept: Vec<proto::Signer> = serde_json::from_slice(
            &std::fs::read(tmp.path().join("state/trust/first-use.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(kept, vec![signer("a", A)]);
    }

    #[test]
    fn a_served_revision_is_still_trusted_only_while_the_cluster_holds_one_of_its_keys() {
        let served = [signer("models-team", A)];
        assert!(still_trusted(
            &served,
            &[signer("b", B), signer("renamed", A)]
        ));
        assert!(
            !still_trusted(&served, &[signer("models-team", B)]),
            "same name, other key"
        );
        assert!(!still_trusted(&served, &[]));
        assert!(!still_trusted(&served, &[signer("x", "not a pem")]));
    }

    #[tokio::test]
    async fn provisioned_pins_win_and_first_use_can_be_off() {
        let tmp = tempfile::tempdir().unwrap();
        let c = config(tmp.path(), false);
        let (a, b) = (A, B);
        let mut pins = LocalPins::load(&c).unwrap();
        assert!(
            !pins.pin_first_use(&[signer("a", a)]).await.unwrap(),
            "first use is off"
        );
        assert!(pins.intersect(&[signer("a", a)]).is_err());
        std::fs::create_dir_all(tmp.path().join("trust")).unwrap();
        std::fs::write(
            tmp.path().join("trust/acme.json"),
            serde_json::to_string(&signer("acme", b)).unwrap(),
        )
        .unwrap();
        let pins = LocalPins::load(&c).unwrap();
        assert!(matches!(pins.source(), PinSource::Provisioned(_)));
        assert!(pins.intersect(&[signer("a", a)]).is_err());
        assert_eq!(
            pins.intersect(&[signer("a", a), signer("acme", b)])
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_bad_pin_file_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let c = config(tmp.path(), true);
        std::fs::create_dir_all(tmp.path().join("trust")).unwrap();
        std::fs::write(
            tmp.path().join("trust/x.json"),
            r#"{"name":"x","publicKey":"nope"}"#,
        )
        .unwrap();
        let e = LocalPins::load(&c).unwrap_err();
        assert!(e.to_string().starts_with("TrustPinInvalid: "), "{e}");
    }
}
