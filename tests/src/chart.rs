//! The edgefleet Helm chart as the tests run it: `helm template` of `charts/edgefleet`
//! with given values, and the rendered operator container made into a local process.
//! The test API server runs no Pods, so [`Rendered::local_operator`] does what the kubelet
//! would: it writes the volumes the container mounts (the chart's rendered ConfigMaps
//! and Secrets, and the Secrets an installer creates beforehand, given by the test)
//! under a directory, rewrites the mount paths in the container's arguments to there,
//! and resolves its environment; the test then starts the real operator binary with
//! exactly those arguments, replacing only the listen addresses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use base64::Engine as _;
use serde_yaml::Value;

use crate::HarnessError;

fn err(what: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(what.to_string())
}

/// The release name the tests render the chart under.
pub const RELEASE: &str = "edgefleet";
/// The namespace the tests render the chart into.
pub const NAMESPACE: &str = "edgefleet-system";

/// The helm binary: `$HELM`, else `tools/helm` in the cache (scripts/lib.sh
/// `ensure_helm` puts it there).
pub fn helm() -> PathBuf {
    std::env::var_os("HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::cache_dir().join("tools").join("helm"))
}

/// The documents `helm template` rendered.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Every non-empty document, in order.
    pub docs: Vec<Value>,
}

/// Renders `charts/edgefleet` with `values` (merged over the chart's values.yaml and
/// checked against its values.schema.json by helm).
pub fn template(values: &serde_json::Value) -> Result<Rendered, HarnessError> {
    let dir = tempfile::tempdir().map_err(err)?;
    // JSON is YAML.
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values.to_string()).map_err(err)?;
    let helm = helm();
    let out = Command::new(&helm)
        .args(["template", RELEASE])
        .arg(crate::workspace_root().join("charts/edgefleet"))
        .args(["--namespace", NAMESPACE, "--values"])
        .arg(&file)
        .output()
        .map_err(|e| {
            err(format!(
                "{}: {e} (scripts/lib.sh ensure_helm)",
                helm.display()
            ))
        })?;
    if !out.status.success() {
        return Err(err(format!(
            "helm template: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8(out.stdout).map_err(err)?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = <Value as serde::Deserialize>::deserialize(doc).map_err(err)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(Rendered { docs })
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// The operator container as a local process: its arguments and environment, with
/// its volumes written under a directory.
#[derive(Debug, Clone)]
pub struct LocalOperator {
    /// The container's `args`, mount paths rewritten to the written volumes.
    pub args: Vec<String>,
    /// The container's `env`, field references resolved.
    pub env: Vec<(String, String)>,
}

impl Rendered {
    /// The rendered object of `kind` named `name`.
    pub fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs.iter().find(|d| {
            str_at(d, &["kind"]) == Some(kind) && str_at(d, &["metadata", "name"]) == Some(name)
        })
    }

    /// Names of the rendered objects of `kind`.
    pub fn names(&self, kind: &str) -> Vec<String> {
        self.docs
            .iter()
            .filter(|d| str_at(d, &["kind"]) == Some(kind))
            .filter_map(|d| str_at(d, &["metadata", "name"]).map(str::to_owned))
            .collect()
    }

    /// The pod spec of the operator StatefulSet and its `operator` container.
    fn operator(&self) -> Result<(&Value, &Value), HarnessError> {
        let pod = self
            .find("StatefulSet", "edgefleet-operator")
            .and_then(|d| d.get("spec")?.get("template")?.get("spec"))
            .ok_or_else(|| err("no StatefulSet edgefleet-operator rendered"))?;
        let container = pod
            .get("containers")
            .and_then(Value::as_sequence)
            .and_then(|cs| cs.iter().find(|c| str_at(c, &["name"]) == Some("operator")))
            .ok_or_else(|| err("the StatefulSet has no operator container"))?;
        Ok((pod, container))
    }

    /// The StatefulSet's claim template `name`, as a volume of a fresh claim.
    fn claim_template(&self, name: &str) -> Option<Value> {
        let templates = self
            .find("StatefulSet", "edgefleet-operator")?
            .get("spec")?
            .get("volumeClaimTemplates")?
            .as_sequence()?;
        templates
            .iter()
            .any(|t| str_at(t, &["metadata", "name"]) == Some(name))
            .then(|| {
                let mut v = serde_yaml::Mapping::new();
                v.insert("name".into(), name.into());
                v.insert(
                    "persistentVolumeClaim".into(),
                    Value::Mapping(serde_yaml::Mapping::new()),
                );
                Value::Mapping(v)
            })
    }

    /// The operator container's `args`, as rendered.
    pub fn operator_args(&self) -> Result<Vec<String>, HarnessError> {
        let (_, container) = self.operator()?;
        container
            .get("args")
            .and_then(Value::as_sequence)
            .ok_or_else(|| err("the operator container has no args"))?
            .iter()
            .map(|a| {
                a.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| err(format!("argument {a:?} is not a string")))
            })
            .collect()
    }

    /// Data of a rendered ConfigMap or Secret named `name`, by key.
    fn rendered_data(
        &self,
        kind: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, HarnessError> {
        let Some(obj) = self.find(kind, name) else {
            return Ok(None);
        };
        let mut files = BTreeMap::new();
        let entries = |field: &str| {
            obj.get(field)
                .and_then(Value::as_mapping)
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
                .collect::<Vec<_>>()
        };
        for (k, v) in entries("data") {
            let bytes = if kind == "Secret" {
                base64::engine::general_purpose::STANDARD
                    .decode(v.trim())
                    .map_err(|e| err(format!("{kind} {name} {k}: {e}")))?
            } else {
                v.into_bytes()
            };
            files.insert(k, bytes);
        }
        for (k, v) in entries("stringData") {
            files.insert(k, v.into_bytes());
        }
        Ok(Some(files))
    }

    /// Writes each volume the operator container mounts under `root` (at its mount
    /// path), as the kubelet would: a ConfigMap or Secret volume from the rendered object
    /// of that name, else from `existing` (objects the installer creates before `helm
    /// install`, by name, then key); an `emptyDir` or a PersistentVolumeClaim empty. Returns the container's args
    /// with each mount path rewritten under `root`, and its environment with
    /// `metadata.name` as `pod` and `metadata.namespace` as [`NAMESPACE`].
    pub fn local_operator(
        &self,
        root: &Path,
        pod: &str,
        existing: &BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    ) -> Result<LocalOperator, HarnessError> {
        let (spec, container) = self.operator()?;
        let volumes = spec
            .get("volumes")
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for mount in container
            .get("volumeMounts")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let (Some(name), Some(path)) =
                (str_at(mount, &["name"]), str_at(mount, &["mountPath"]))
            else {
                return Err(err(format!(
                    "volumeMount {mount:?} without name or mountPath"
                )));
            };
            // A volume of the pod, or a claim from the StatefulSet's claim templates
            // (a fresh claim: an empty directory).
            let claimed = self.claim_template(name);
            let volume = volumes
                .iter()
                .find(|v| str_at(v, &["name"]) == Some(name))
                .or(claimed.as_ref())
                .ok_or_else(|| err(format!("volumeMount {name}: no such volume")))?;
            let dir = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(&dir).map_err(err)?;
            let files = if let Some(cm) = str_at(volume, &["configMap", "name"]) {
                self.rendered_data("ConfigMap", cm)?
                    .or_else(|| existing.get(cm).cloned())
                    .ok_or_else(|| {
                        err(format!(
                            "volume {name}: ConfigMap {cm} is neither rendered nor given"
                        ))
                    })?
            } else if let Some(secret) = str_at(volume, &["secret", "secretName"]) {
                self.rendered_data("Secret", secret)?
                    .or_else(|| existing.get(secret).cloned())
                    .ok_or_else(|| {
                        err(format!(
                            "volume {name}: Secret {secret} is neither rendered nor given"
                        ))
                    })?
            } else if volume.get("emptyDir").is_some()
                || volume.get("persistentVolumeClaim").is_some()
            {
                // A fresh claim is an empty directory too.
                BTreeMap::new()
            } else {
                return Err(err(format!(
                    "volume {name}: kind not supported by the test harness"
                )));
            };
            for (key, bytes) in files {
                std::fs::write(dir.join(&key), bytes).map_err(err)?;
            }
            mounts.push((path.trim_end_matches('/').to_owned(), dir));
        }
        // Longest mount paths first, so that one inside another is rewritten as itself.
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        let args = self
            .operator_args()?
            .into_iter()
            .map(|arg| {
                for (path, dir) in &mounts {
                    let inside = format!("{path}/");
                    if let Some(at) = arg.find(&inside) {
                        return format!(
                            "{}{}/{}",
                            &arg[..at],
                            dir.display(),
                            &arg[at + inside.len()..]
                        );
                    }
                    if let Some(prefix) = arg.strip_suffix(path.as_str())
                        && (prefix.is_empty() || prefix.ends_with('='))
                    {
                        return format!("{prefix}{}", dir.display());
                    }
                }
                arg
            })
            .collect();
        let mut env = Vec::new();
        for e in container
            .get("env")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let name =
                str_at(e, &["name"]).ok_or_else(|| err(format!("env {e:?} without name")))?;
            let value = match (
                str_at(e, &["value"]),
                str_at(e, &["valueFrom", "fieldRef", "fieldPath"]),
            ) {
                (Some(v), _) => v.to_owned(),
                (None, Some("metadata.name")) => pod.to_owned(),
                (None, Some("metadata.namespace")) => NAMESPACE.to_owned(),
                _ => {
                    return Err(err(format!(
                        "env {name}: not supported by the test harness"
                    )));
                }
            };
            env.push((name.to_owned(), value));
        }
        Ok(LocalOperator { args, env })
    }
}

impl LocalOperator {
    /// Replaces the value of `--flag=...` (a listen address the test must choose), or
    /// appends it when the chart does not pass the flag.
    pub fn set_flag(&mut self, flag: &str, value: &str) {
        let prefix = format!("{flag}=");
        let arg = format!("{flag}={value}");
        match self.args.iter_mut().find(|a| a.starts_with(&prefix)) {
            Some(a) => *a = arg,
            None => self.args.push(arg),
        }
    }

    /// Whether an argument `--flag=VALUE` has a value ending in `suffix`.
    pub fn has_flag(&self, flag: &str, suffix: &str) -> bool {
        let prefix = format!("{flag}=");
        self.args
            .iter()
            .any(|a| a.strip_prefix(&prefix).is_some_and(|v| v.ends_with(suffix)))
    }

    /// Starts the real `edgefleet-operator` with these arguments and environment
    /// against `kubeconfig`, its output into `log`.
    pub fn spawn(&self, kubeconfig: &Path, log: &Path) -> Result<Child, HarnessError> {
        let log = std::fs::File::create(log).map_err(err)?;
        Command::new(crate::local_fleet::binary("edgefleet-operator")?)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(err)?)
            .stderr(log)
            .spawn()
            .map_err(err)
    }
}
