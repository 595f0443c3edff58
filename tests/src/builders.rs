//! Builders of what the end-to-end tests sign and apply, so that each test states only
//! what is particular to it:
//!
//! - [`Signer`], a model publisher's key, and [`SignedArtifact`], what an EdgeModel
//!   names of a signed file (digest, size, bundle);
//! - [`EdgeModelBuilder`], an EdgeModel manifest, and [`apply_edge_model`], its
//!   server-side apply;
//! - what a cluster administrator trusts: [`trust_signer`] (or [`trust_signers_of`] a
//!   manifest), [`allow_all_pools`], [`bind_pool`], [`apply_trust_policy`];
//! - [`assigned_revision`], what a device derives of a model;
//! - [`EdgeDeviceBuilder`], an EdgeDevice as enrolment creates it, and
//!   [`DeviceStatusBuilder`], the readiness and attestation the gateway writes into its
//!   status.

use std::path::Path;

use edgefleet_crds::{EdgeDevice, EdgeModel, EdgeTrustPolicy};
use edgefleet_trust::model_signing::{self, PrivateKey};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use crate::HarnessError;

fn err(what: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(what.to_string())
}

/// The API version of the edgefleet resources.
pub const API_VERSION: &str = "edgefleet.io/v1alpha1";

/// The label that selects a device for a model (`spec.selector.matchLabels`).
pub const POOL_LABEL: &str = "edgefleet.io/pool";

/// A model publisher's signing key (ECDSA P-256).
#[derive(Debug, Clone)]
pub struct Signer {
    /// The private key, PEM.
    pub key: String,
    /// The public key, PEM, as `spec.signers[].publicKey` carries it.
    pub public_key: String,
}

impl Signer {
    /// A fresh key.
    pub fn generate() -> Result<Self, HarnessError> {
        let key = rcgen::KeyPair::generate().map_err(err)?;
        Self::from_pem(&key.serialize_pem())
    }

    /// The signer holding `key` (PKCS#8 or SEC1 PEM).
    pub fn from_pem(key: &str) -> Result<Self, HarnessError> {
        let public_key = PrivateKey::from_pem(key)
            .map_err(err)?
            .public_key()
            .to_pem()
            .map_err(err)?;
        Ok(Self {
            key: key.to_owned(),
            public_key,
        })
    }

    /// The signature bundle of `file` (JSON), as `spec.signature.inline` carries it.
    pub fn sign(&self, file: &Path) -> Result<String, HarnessError> {
        let key = PrivateKey::from_pem(&self.key).map_err(err)?;
        let bundle = model_signing::sign(file, &key, None, &Default::default()).map_err(err)?;
        String::from_utf8(bundle).map_err(err)
    }

    /// `file`'s digest and size, and its bundle.
    pub fn artifact(&self, file: &Path) -> Result<SignedArtifact, HarnessError> {
        Ok(SignedArtifact {
            digest: crate::local_fleet::digest_of(file)?,
            size: std::fs::metadata(file).map_err(err)?.len(),
            bundle: self.sign(file)?,
        })
    }

    /// `bytes` as a model file (in a temporary directory, gone on return), signed.
    pub fn artifact_of(&self, bytes: &[u8]) -> Result<SignedArtifact, HarnessError> {
        let dir = tempfile::tempdir().map_err(err)?;
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, bytes).map_err(err)?;
        self.artifact(&path)
    }
}

/// What an EdgeModel names of a signed file.
#[derive(Debug, Clone)]
pub struct SignedArtifact {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// The signature bundle (JSON).
    pub bundle: String,
}

/// An EdgeModel manifest, as JSON for server-side apply. What it is not told stays
/// unset, for the API server's defaults.
#[derive(Debug, Clone)]
pub struct EdgeModelBuilder {
    manifest: Value,
}

impl EdgeModelBuilder {
    /// The EdgeModel `namespace/name`, served under its own name.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            manifest: json!({
                "apiVersion": API_VERSION,
                "kind": "EdgeModel",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"servedName": name},
            }),
        }
    }

    fn set(mut self, field: &str, value: Value) -> Self {
        self.manifest["spec"][field] = value;
        self
    }

    fn push(mut self, field: &str, value: Value) -> Self {
        match self.manifest["spec"][field].as_array_mut() {
            Some(list) => list.push(value),
            None => self.manifest["spec"][field] = json!([value]),
        }
        self
    }

    /// `spec.servedName`.
    pub fn served_name(self, name: &str) -> Self {
        self.set("servedName", json!(name))
    }

    /// `spec.artifact`: `uri` and `digest`, and `sizeBytes` when given.
    pub fn artifact(self, uri: &str, digest: &str, size: Option<u64>) -> Self {
        let mut artifact = json!({"uri": uri, "digest": digest});
        if let Some(size) = size {
            artifact["sizeBytes"] = json!(size);
        }
        self.set("artifact", artifact)
    }

    /// `spec.signature`: the bundle inline.
    pub fn inline_signature(self, bundle: &str) -> Self {
        self.set("signature", json!({"inline": bundle}))
    }

    /// `spec.signature`: the bundle to fetch from `uri`.
    pub fn signature_uri(self, uri: &str) -> Self {
        self.set("signature", json!({"uri": uri}))
    }

    /// One more entry of `spec.signers`: `name`, trusted by its public key (PEM).
    pub fn signer(self, name: &str, public_key: &str) -> Self {
        self.push("signers", json!({"name": name, "publicKey": public_key}))
    }

    /// One more entry of `spec.signers`: the trust policy's signer `name`, by name alone.
    pub fn signer_named(self, name: &str) -> Self {
        self.push("signers", json!({"name": name}))
    }

    /// The artifact at `uri` as `artifact` names it (with its size), its bundle inline,
    /// and `signer` trusted as `signer_name`.
    pub fn signed(
        self,
        uri: &str,
        artifact: &SignedArtifact,
        signer_name: &str,
        signer: &Signer,
    ) -> Self {
        self.artifact(uri, &artifact.digest, Some(artifact.size))
            .inline_signature(&artifact.bundle)
            .signer(signer_name, &signer.public_key)
    }

    /// `spec.selector`: the devices labelled [`POOL_LABEL`]`=pool`.
    pub fn pool(self, pool: &str) -> Self {
        self.set("selector", json!({"matchLabels": {POOL_LABEL: pool}}))
    }

    /// `spec.attestation`: the TEE kinds accepted, and the policy when given.
    pub fn attestation(self, tee_kinds: &[&str], policy: Option<&str>) -> Self {
        let mut attestation = json!({"teeKinds": tee_kinds});
        if let Some(policy) = policy {
            attestation["policy"] = json!(policy);
        }
        self.set("attestation", attestation)
    }

    /// `spec.rollout`, as given.
    pub fn rollout(self, rollout: Value) -> Self {
        self.set("rollout", rollout)
    }

    /// `spec.runtime`, as given.
    pub fn runtime(self, runtime: Value) -> Self {
        self.set("runtime", runtime)
    }

    /// One more plugin in the chain: `name`, the artifact at `uri` as `artifact` names
    /// it, its bundle inline, and `limits`.
    pub fn plugin(self, name: &str, uri: &str, artifact: &SignedArtifact, limits: Value) -> Self {
        self.push(
            "plugins",
            json!({
                "name": name,
                "artifact": {"uri": uri, "digest": artifact.digest, "sizeBytes": artifact.size},
                "signature": {"inline": artifact.bundle},
                "limits": limits,
            }),
        )
    }

    /// The manifest.
    pub fn build(self) -> Value {
        self.manifest
    }
}

/// Server-side applies `manifest`, an EdgeModel (namespace and name from its metadata),
/// as the field manager `e2e`, taking over the fields another manager holds.
pub async fn apply_edge_model(
    client: &kube::Client,
    manifest: &Value,
) -> Result<EdgeModel, HarnessError> {
    let meta = &manifest["metadata"];
    let (namespace, name) = (
        meta["namespace"].as_str().unwrap_or("default"),
        meta["name"].as_str().unwrap_or_default(),
    );
    Api::<EdgeModel>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(manifest),
        )
        .await
        .map_err(|source| HarnessError::Kube {
            context: format!("applying EdgeModel {namespace}/{name}"),
            source,
        })
}

/// Server-side applies the EdgeTrustPolicy `name` with `spec`, as the field manager
/// `e2e` (what a cluster administrator does).
pub async fn apply_trust_policy(
    client: &kube::Client,
    name: &str,
    spec: Value,
) -> Result<EdgeTrustPolicy, HarnessError> {
    let manifest = json!({
        "apiVersion": API_VERSION, "kind": "EdgeTrustPolicy",
        "metadata": {"name": name}, "spec": spec,
    });
    Api::<EdgeTrustPolicy>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&manifest),
        )
        .await
        .map_err(|source| HarnessError::Kube {
            context: format!("applying EdgeTrustPolicy {name}"),
            source,
        })
}

/// The name of the policy [`trust_signer`] writes for signer `name` with `public_key`:
/// one per key, so that trusting a new key never withdraws what an earlier one signed.
pub fn signer_policy_name(name: &str, public_key: &str) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let key: String = public_key.chars().filter(|c| !c.is_whitespace()).collect();
    // A fixed-key hash: the same key gives the same name in every run.
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    let digest = format!("{:012x}", h.finish() & 0xffff_ffff_ffff);
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    format!("signer-{name}-{digest}")
}

/// Trusts the signer `name` holding `public_key` (PEM) for EdgeModels in `namespaces`
/// (names or globs): an EdgeTrustPolicy of its own ([`signer_policy_name`]).
pub async fn trust_signer(
    client: &kube::Client,
    name: &str,
    public_key: &str,
    namespaces: &[&str],
) -> Result<EdgeTrustPolicy, HarnessError> {
    apply_trust_policy(
        client,
        &signer_policy_name(name, public_key),
        json!({"signers": [{"name": name, "publicKey": public_key, "namespaces": namespaces}]}),
    )
    .await
}

/// Trusts every signer `manifest` (an EdgeModel) names by its public key, for the
/// manifest's namespace: what a cluster administrator does for a publisher they trust.
pub async fn trust_signers_of(client: &kube::Client, manifest: &Value) -> Result<(), HarnessError> {
    let namespace = manifest["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    for s in manifest["spec"]["signers"].as_array().into_iter().flatten() {
        if let (Some(name), Some(key)) = (s["name"].as_str(), s["publicKey"].as_str()) {
            trust_signer(client, name, key, &[namespace]).await?;
        }
    }
    Ok(())
}

/// The EdgeTrustPolicy name of [`allow_all_pools`].
pub const ALL_POOLS_POLICY: &str = "all-devices-all-namespaces";

/// Binds one device pool holding every device to every namespace: what a cluster with
/// one team does.
pub async fn allow_all_pools(client: &kube::Client) -> Result<EdgeTrustPolicy, HarnessError> {
    apply_trust_policy(
        client,
        ALL_POOLS_POLICY,
        json!({"devicePools": [{"name": "all", "selector": {}, "namespaces": ["*"]}]}),
    )
    .await
}

/// The revision of EdgeModel `namespace/model` that device `device` runs by
/// derivation now (what the gateway tells it): read fresh from the API server, under
/// the cluster's EdgeTrustPolicies. `None` when either is missing or the device gets
/// nothing of the model.
pub async fn assigned_revision(
    client: &kube::Client,
    namespace: &str,
    model: &str,
    device: &str,
) -> Option<String> {
    let model = Api::<EdgeModel>::namespaced(client.clone(), namespace)
        .get_opt(model)
        .await
        .ok()??;
    let device = Api::<EdgeDevice>::all(client.clone())
        .get_opt(device)
        .await
        .ok()??;
    let policies = Api::<EdgeTrustPolicy>::all(client.clone())
        .list(&Default::default())
        .await
        .ok()?
        .items;
    let pools: Vec<_> = edgefleet_operator::trust_policy::Grants::new(&policies, namespace)
        .pools()
        .iter()
        .map(|(_, p)| p.clone())
        .collect();
    edgefleet_operator::rollout::desired(&model, &device, &pools, Timestamp::now())
        .map(|d| d.revision)
}

/// Binds the device pool `pool` (the devices an administrator labelled
/// [`POOL_LABEL`]`=pool`) to `namespaces`, in the EdgeTrustPolicy `pool-<pool>`.
pub async fn bind_pool(
    client: &kube::Client,
    pool: &str,
    namespaces: &[&str],
) -> Result<EdgeTrustPolicy, HarnessError> {
    apply_trust_policy(
        client,
        &format!("pool-{pool}"),
        json!({"devicePools": [{
            "name": pool,
            "selector": {"matchLabels": {POOL_LABEL: pool}},
            "namespaces": namespaces,
        }]}),
    )
    .await
}

/// An EdgeDevice as enrolment creates it: an approved x86_64 machine with 4 cores and
/// 8 GiB, offering TPM evidence, in no pool until told.
#[derive(Debug, Clone)]
pub struct EdgeDeviceBuilder {
    name: String,
    fingerprint: String,
    pool: Option<String>,
    approved: bool,
    tee: String,
}

impl EdgeDeviceBuilder {
    /// The device `name`, enrolled with the agent key whose fingerprint (`sha256:<hex>`)
    /// is `fingerprint`.
    pub fn new(name: &str, fingerprint: &str) -> Self {
        Self {
            name: name.to_owned(),
            fingerprint: fingerprint.to_owned(),
            pool: None,
            approved: true,
            tee: "tpm".into(),
        }
    }

    /// Labelled [`POOL_LABEL`]`=pool`.
    pub fn pool(mut self, pool: &str) -> Self {
        self.pool = Some(pool.to_owned());
        self
    }

    /// `spec.approved`.
    pub fn approved(mut self, approved: bool) -> Self {
        self.approved = approved;
        self
    }

    /// The one TEE kind in its facts.
    pub fn tee(mut self, tee: &str) -> Self {
        self.tee = tee.to_owned();
        self
    }

    /// The EdgeDevice.
    pub fn build(self) -> Result<EdgeDevice, HarnessError> {
        let labels = match &self.pool {
            Some(pool) => json!({POOL_LABEL: pool}),
            None => json!({}),
        };
        serde_json::from_value(json!({
            "apiVersion": API_VERSION,
            "kind": "EdgeDevice",
            "metadata": {"name": self.name, "labels": labels},
            "spec": {
                "approved": self.approved,
                "facts": {
                    "arch": "x86_64", "cpuCores": 4, "memory": "8Gi", "teeKinds": [self.tee],
                    "agentKeyFingerprint": self.fingerprint,
                },
            }
        }))
        .map_err(err)
    }
}

/// The status the gateway writes for a device once it has appraised its evidence: the
/// `Attested` condition (and `Ready`, when told) and the attestation summary, for
/// server-side apply of the status subresource.
#[derive(Debug, Clone)]
pub struct DeviceStatusBuilder {
    ready: Option<bool>,
    attested: bool,
    tee: String,
    policy_hash: String,
    verified: Timestamp,
}

impl DeviceStatusBuilder {
    /// Evidence of kind `tee`, `attested` (allowed) or not under the `default` policy
    /// whose hash is `policy_hash`, verified at `verified` for an hour.
    pub fn attestation(attested: bool, tee: &str, policy_hash: &str, verified: Timestamp) -> Self {
        Self {
            ready: None,
            attested,
            tee: tee.to_owned(),
            policy_hash: policy_hash.to_owned(),
            verified,
        }
    }

    /// The `Ready` condition too.
    pub fn ready(mut self, ready: bool) -> Self {
        self.ready = Some(ready);
        self
    }

    /// The patch.
    pub fn build(self) -> Value {
        let at = self.verified.to_string();
        let condition = |kind: &str, ok: bool| {
            json!({"type": kind, "status": if ok { "True" } else { "False" }, "reason": "Test",
                   "message": "", "lastTransitionTime": at})
        };
        let mut conditions: Vec<Value> = self
            .ready
            .map(|ready| condition("Ready", ready))
            .into_iter()
            .collect();
        conditions.push(condition("Attested", self.attested));
        let expiry = self.verified + SignedDuration::from_hours(1);
        json!({
            "apiVersion": API_VERSION,
            "kind": "EdgeDevice",
            "status": {
                "conditions": conditions,
                "attestation": {
                    "teeKind": self.tee, "allowed": self.attested, "policy": "default",
                    "policyHash": self.policy_hash,
                    "verifiedTime": at, "expiryTime": expiry.to_string(),
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use kube::ResourceExt as _;

    #[test]
    fn a_generated_signer_signs_what_its_public_key_verifies() {
        let signer = Signer::generate().unwrap();
        let artifact = signer.artifact_of(b"GGUF model bytes").unwrap();
        assert_eq!(artifact.size, 16);
        assert!(
            artifact.digest.starts_with("sha256:"),
            "{}",
            artifact.digest
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, b"GGUF model bytes").unwrap();
        let public = model_signing::PublicKey::from_pem(&signer.public_key).unwrap();
        let policy = model_signing::TrustPolicy::keys([("models-team".to_owned(), public)]);
        model_signing::verify(
            artifact.bundle.as_bytes(),
            &path,
            &policy,
            std::time::SystemTime::now(),
            &[],
        )
        .unwrap();
    }

    #[test]
    fn the_manifests_parse_as_the_resources_they_name() {
        let signer = Signer::generate().unwrap();
        let artifact = signer.artifact_of(b"GGUF model bytes").unwrap();
        let model = EdgeModelBuilder::new("retail", "smollm2")
            .signed(
                "https://artifacts.example/smollm2.gguf",
                &artifact,
                "models-team",
                &signer,
            )
            .pool("retail")
            .attestation(&["tpm"], Some("default"))
            .plugin(
                "pii-redact",
                "https://artifacts.example/pii.wasm",
                &artifact,
                json!({"deadlineMillis": 200, "memoryBytes": 33554432}),
            )
            .build();
        let parsed: edgefleet_crds::EdgeModel = serde_json::from_value(model.clone()).unwrap();
        assert_eq!(parsed.spec.served_name, "smollm2");
        assert_eq!(
            model["spec"]["selector"]["matchLabels"][POOL_LABEL],
            "retail"
        );
        assert_eq!(model["spec"]["plugins"][0]["artifact"]["sizeBytes"], 16);

        let device = EdgeDeviceBuilder::new("till-a", &artifact.digest)
            .pool("retail")
            .approved(false)
            .build()
            .unwrap();
        assert!(!device.spec.approved);
        assert_eq!(device.labels()[POOL_LABEL], "retail");

        let status = DeviceStatusBuilder::attestation(true, "tpm", "sha256:00", Timestamp::now())
            .ready(false)
            .build();
        let conditions = status["status"]["conditions"].as_array().unwrap();
        assert_eq!(
            conditions
                .iter()
                .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap()))
                .collect::<Vec<_>>(),
            [("Ready", "False"), ("Attested", "True")]
        );
    }
}
