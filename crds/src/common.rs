//! Types shared by `EdgeModel` and `EdgeDevice`.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A downloadable, content-addressed file: a model (GGUF) or a plugin (Wasm component).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// Where devices fetch the file: `https://…`, `http://…` (only behind the gateway's
    /// mTLS proxy), `file:///…` (pre-provisioned on the device) or `oci://…`.
    #[x_kube(validation = Rule::new(
        "self.startsWith('https://') || self.startsWith('http://') || self.startsWith('file:///') || self.startsWith('oci://')"
    ).message("uri must start with https://, http://, file:/// or oci://"))]
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,
    /// SHA-256 of the whole file, as `sha256:<64 lowercase hex>`. Devices refuse a file
    /// whose digest differs.
    #[x_kube(validation = Rule::new("self.matches('^sha256:[0-9a-f]{64}$')")
        .message("digest must have the form sha256:<64 lowercase hex digits>"))]
    #[schemars(length(max = 71))]
    pub digest: String,
    /// Size of the file in bytes. Devices check free space before downloading and stop a
    /// download that grows beyond it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub size_bytes: Option<i64>,
}

/// Where the OpenSSF model-signing v1.0 bundle (a Sigstore bundle v0.3 JSON) for an
/// artifact comes from. Exactly one of `inline` and `uri` is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.inline) != has(self.uri)")
    .message("exactly one of signature.inline and signature.uri must be set"))]
pub struct SignatureSource {
    /// The bundle JSON itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 262144))]
    pub inline: Option<String>,
    /// Where to fetch the bundle (`https://`, `file:///` or `oci://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub uri: Option<String>,
}

/// One identity trusted to sign the artifact, picked from the cluster's
/// `EdgeTrustPolicy` signers granted to the EdgeModel's namespace: either by name alone
/// (`{name}`), or in full, a pinned public key or a pinned certificate root with the
/// identities a leaf certificate may carry, which must equal the policy's signer of that
/// name (a certificate root may narrow its identities to a subset). In a revision
/// template (`status.revisions`) it is always in full: the policy's signer it resolved to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.publicKey) && has(self.certificateRoot))")
    .message("a signer has at most one of publicKey and certificateRoot"))]
#[x_kube(validation = Rule::new("!has(self.certificateRoot) || (has(self.identities) && size(self.identities) > 0)")
    .message("a certificateRoot signer must pin at least one identity"))]
#[x_kube(validation = Rule::new("!has(self.identities) || has(self.certificateRoot)")
    .message("identities apply only to certificateRoot signers"))]
pub struct TrustedSigner {
    /// A short name for the signer, shown in `kubectl get em` and in events.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// PEM public key (P-256, P-384 or P-521) that signs bundles directly (key mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16384))]
    pub public_key: Option<String>,
    /// PEM root certificate; the bundle's leaf certificate must chain to it through the
    /// bundle's intermediates (certificate mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub certificate_root: Option<String>,
    /// Identities the leaf certificate must carry, as a SAN email, a SAN URI, or the
    /// subject common name. One match is enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 512)))]
    pub identities: Option<Vec<String>>,
}

/// Kind of trusted execution environment or root of trust a device attests with.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum TeeKind {
    /// TPM 2.0 quote with an attestation key bound to the endorsement key.
    #[serde(rename = "tpm")]
    Tpm,
    /// AMD SEV-SNP attestation report.
    #[serde(rename = "sev-snp")]
    SevSnp,
    /// Intel TDX quote.
    #[serde(rename = "tdx")]
    Tdx,
    /// A software key, for development only. The default policy rejects it.
    #[serde(rename = "dev")]
    Dev,
}

/// Schema of an object stored as written, without nested validation (for status copies
/// of already-validated spec objects).
pub fn opaque_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Schema of a list of such objects (at most 32).
pub fn opaque_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": 32,
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
    })
}
