//! `GET /v1/devices/{name}/artifacts/sha256:<hex>` (with `Range`): artifacts are
//! served from a content-addressed directory (`<dir>/<sha256 hex>`), only to a device
//! whose desired state names that digest. An assigned `https://` artifact missing from
//! the store is mirrored into it ([`crate::gateway::mirror`]), ahead of time when an
//! EdgeModel's templates name it (`Fleet::prefetch`).

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use edgefleet_crds::{EdgeDevice, EdgeModel};
use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::desired::template_of;
use super::{Fleet, PeerCertificate};
use crate::gateway::error::{ApiError, Reason};
use crate::gateway::mirror::MirrorState;

/// How often the store is checked against its budget.
pub const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(600);
/// A file placed in the store within this long is not collected: an administrator
/// copies an artifact in, then applies the EdgeModel that references it.
pub const YOUNG: std::time::Duration = std::time::Duration::from_secs(3600);

/// The artifact digests (hex) `model` references: its spec's artifact, variants and
/// plugins, and those of every revision template in its status (what devices may be
/// sent, a rollback included).
pub fn referenced(model: &EdgeModel) -> impl Iterator<Item = String> + '_ {
    let spec = std::iter::once(&model.spec.artifact)
        .chain(model.spec.variants.iter().flatten().map(|v| &v.artifact))
        .chain(model.spec.plugins.iter().flatten().map(|p| &p.artifact));
    let templates = model
        .status
        .iter()
        .flat_map(|s| s.revisions.iter())
        .flat_map(|t| {
            std::iter::once(&t.artifact)
                .chain(t.variants.iter().map(|v| &v.artifact))
                .chain(t.plugins.iter().map(|p| &p.artifact))
        });
    spec.chain(templates).filter_map(|a| {
        a.digest
            .strip_prefix("sha256:")
            .map(str::to_ascii_lowercase)
    })
}

impl Fleet {
    /// Removes from the store, oldest first, artifacts that no EdgeModel references,
    /// until it fits its budget ([`edgefleet_proto::store::collect_garbage`]).
    pub async fn collect_artifacts(&self) {
        let keep: std::collections::HashSet<String> = self
            .inner
            .models
            .state()
            .iter()
            .flat_map(|m| referenced(m).collect::<Vec<_>>())
            .collect();
        let dir = self.inner.config.artifact_dir.clone();
        let budget = self.inner.config.artifact_budget_bytes;
        match tokio::task::spawn_blocking(move || {
            edgefleet_proto::store::collect_garbage(&dir, &keep, budget, YOUNG)
        })
        .await
        {
            Ok(Ok(c)) if !c.removed.is_empty() => {
                tracing::info!(removed = ?c.removed, freed_bytes = c.freed, left_bytes = c.left, "removed artifacts no EdgeModel references");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "collecting unreferenced artifacts"),
            Err(e) => tracing::warn!(error = %e, "collecting unreferenced artifacts"),
        }
    }

    /// Starts mirroring every `https://` artifact of `model`'s revision templates that
    /// is not in the store, so that it is there before devices ask for it.
    pub(super) fn prefetch(&self, model: &EdgeModel) {
        let Some(mirror) = &self.inner.config.mirror else {
            return;
        };
        let templates = model.status.iter().flat_map(|s| s.revisions.iter());
        for t in templates {
            let artifacts = std::iter::once(&t.artifact)
                .chain(t.variants.iter().map(|v| &v.artifact))
                .chain(t.plugins.iter().map(|p| &p.artifact));
            for a in artifacts {
                // The CRD's CEL rule already requires this; it names a file here.
                let Some(hex) = super::sha256_hex(&a.digest) else {
                    continue;
                };
                if !a.uri.starts_with("https://")
                    || self.inner.config.artifact_dir.join(hex).exists()
                {
                    continue;
                }
                let size = a.size_bytes.and_then(|b| u64::try_from(b).ok());
                mirror.ensure(hex, &a.uri, size);
            }
        }
    }

    /// Where the artifact `digest` assigned to `device` comes from (its EdgeModel's
    /// `artifact`), for mirroring.
    fn assigned_source(
        &self,
        device: &EdgeDevice,
        digest: &str,
    ) -> Option<edgefleet_crds::Artifact> {
        for d in &self.assigned(device) {
            let Ok(model) = self.model_of(d) else {
                continue;
            };
            let Some(t) = template_of(&model, d) else {
                continue;
            };
            let variant = d
                .variant
                .as_ref()
                .and_then(|v| t.variants.iter().find(|x| &x.name == v))
                .map(|v| &v.artifact);
            let found = std::iter::once(variant.unwrap_or(&t.artifact))
                .chain(t.plugins.iter().map(|p| &p.artifact))
                .find(|a| a.digest == digest);
            if let Some(a) = found {
                return Some(a.clone());
            }
        }
        None
    }
}

/// The answer for an assigned artifact that is not in the store: mirrored from its
/// `https://` URI when the gateway can ([`crate::gateway::mirror`]), else not found.
fn missing_artifact(
    fleet: &Fleet,
    device: &EdgeDevice,
    digest: &str,
    hex_digest: &str,
    e: std::io::Error,
) -> ApiError {
    let source = fleet.assigned_source(device, digest);
    match (&fleet.inner.config.mirror, source) {
        (Some(mirror), Some(a)) if a.uri.starts_with("https://") => {
            let size = a.size_bytes.and_then(|b| u64::try_from(b).ok());
            match mirror.ensure(hex_digest, &a.uri, size) {
                MirrorState::Fetching => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Reason::ArtifactFetching,
                    format!("{digest} is being fetched from {} into the store", a.uri),
                ),
                MirrorState::Failed(why) => {
                    fleet.count_refusal(Reason::ArtifactMirrorFailed);
                    ApiError::new(StatusCode::BAD_GATEWAY, Reason::ArtifactMirrorFailed, why)
                }
            }
        }
        (_, source) => ApiError::new(
            StatusCode::NOT_FOUND,
            Reason::ArtifactNotInStore,
            format!(
                "{digest}: {e}{}",
                source.map_or(String::new(), |a| format!(
                    " (its URI {} is not mirrored: only https:// is, with --artifact-ca)",
                    a.uri
                ))
            ),
        ),
    }
}

/// A `Range` header that no part of the file satisfies (answered with 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// Parses `bytes=a-b` / `bytes=a-` against a file of `len` bytes: the inclusive range,
/// `Ok(None)` for no (or an ignorable) header, `Err` when unsatisfiable.
pub fn parse_range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    // Several ranges: serve the whole file (allowed by RFC 9110).
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", "") => return Err(Unsatisfiable),
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| Unsatisfiable)?;
            if n == 0 {
                return Err(Unsatisfiable);
            }
            (len.saturating_sub(n), len.saturating_sub(1))
        }
        (a, "") => (a.parse().map_err(|_| Unsatisfiable)?, len.saturating_sub(1)),
        (a, b) => {
            let (a, b): (u64, u64) = (
                a.parse().map_err(|_| Unsatisfiable)?,
                b.parse().map_err(|_| Unsatisfiable)?,
            );
            (a, b.min(len.saturating_sub(1)))
        }
    };
    if start >= len || start > end {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

pub(super) async fn artifact(
    State(fleet): State<Fleet>,
    Extension(peer): Extension<PeerCertificate>,
    Path((name, digest)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let device = fleet.identify(&peer, &name).await?;
    let hex_digest = super::sha256_hex(&digest).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Reason::BadDigest,
            "expected sha256:<64 lowercase hex>",
        )
    })?;
    let state = fleet.desired_state(&device).map_err(|why| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::RevisionPending,
            why,
        )
    })?;
    let assigned = state.models.iter().any(|m| {
        m.artifact.digest == digest || m.plugins.iter().any(|p| p.artifact.digest == digest)
    });
    if !assigned {
        fleet.count_refusal(Reason::NotAssigned);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            Reason::NotAssigned,
            format!(
                "{digest} is not part of what {name} is assigned (or the device is not approved and attested)"
            ),
        ));
    }
    let path = fleet.inner.config.artifact_dir.join(hex_digest);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return Err(missing_artifact(&fleet, &device, &digest, hex_digest, e)),
    };
    let len = file.metadata().await.map_err(ApiError::internal)?.len();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match parse_range(range, len) {
        Ok(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Ok(None) => (StatusCode::OK, 0, len.saturating_sub(1)),
        Err(Unsatisfiable) => {
            let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(ApiError::internal)?;
    let counters = fleet.inner.counters.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(count), 256 << 10).map(
        move |chunk| {
            if let Ok(c) = &chunk {
                counters.artifact_bytes.inc_by(c.len() as u64);
            }
            chunk
        },
    );
    let mut resp = Response::new(axum::body::Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&count.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}"))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_unsatisfiable_ones_are_refused() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-"), 10), Ok(Some((0, 9))));
        assert_eq!(parse_range(Some("bytes=4-6"), 10), Ok(Some((4, 6))));
        assert_eq!(parse_range(Some("bytes=4-100"), 10), Ok(Some((4, 9))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=6-4"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=x-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=-0"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=-"), 10), Err(Unsatisfiable));
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn an_edge_model_references_its_spec_and_every_revision_it_keeps() {
        let spec: edgefleet_crds::EdgeModelSpec = serde_json::from_value(serde_json::json!({
            "servedName": "m",
            "artifact": {"uri": "https://x/m.gguf", "digest": format!("sha256:{}", "a".repeat(64))},
            "signature": {"inline": "{}"},
            "signers": [{"name": "s", "publicKey": "k"}],
            "selector": {"matchLabels": {"site": "a"}},
            "plugins": [{
                "name": "p",
                "artifact": {"uri": "https://x/p.wasm", "digest": format!("sha256:{}", "b".repeat(64))},
                "signature": {"inline": "{}"},
                "limits": {"deadlineMillis": 100, "memoryBytes": 16777216},
            }],
        }))
        .unwrap();
        // A rollback target, kept in the status only.
        let mut old =
            crate::rollout::revision::template(&spec, &spec.signers, "old", |_| None).unwrap();
        old.artifact.digest = format!("sha256:{}", "C".repeat(64));
        old.plugins.clear();
        let mut m = EdgeModel::new("m", spec);
        m.status = Some(edgefleet_crds::model::EdgeModelStatus {
            revisions: vec![old],
            ..Default::default()
        });
        let mut refs: Vec<String> = referenced(&m).collect();
        refs.sort();
        refs.dedup();
        assert_eq!(refs, ["a".repeat(64), "b".repeat(64), "c".repeat(64)]);
    }
}
