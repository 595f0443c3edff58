//! The core-API shim: a loopback HTTP front for the test API server that serves the
//! core/v1 Secret API (`/api/v1/namespaces/{ns}/secrets[/{name}]`) from the
//! `core.shim.edgefleet.io/v1` Secret CRD (`tests/apiserver/shims/secret.yaml`), and
//! passes every other request through unchanged (watches stream).
//!
//! A CRD cannot be served under `/api/v1`, and the test API server has no built-in
//! types; with this front, a process given [`CoreShim::kubeconfig_path`] (the operator)
//! calls the real core/v1 Secret API, as it does in a cluster. Requests reach the API
//! server as `system:masters` (the harness's client).

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse as _, Response};
use serde_json::Value;

use crate::{ControlPlane, HarnessError};

/// The group the Secret shim CRD is served in.
pub const SHIM_API_VERSION: &str = "core.shim.edgefleet.io/v1";

/// A running shim; stops when dropped.
#[derive(Debug)]
pub struct CoreShim {
    kubeconfig: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CoreShim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CoreShim {
    /// Serves the shim on a loopback port in front of `cp`, writing a kubeconfig for it
    /// into `dir`.
    pub async fn start(cp: &ControlPlane, dir: &Path) -> Result<Self, HarnessError> {
        let client = cp.client().await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(crate::io("binding the core-API shim"))?;
        let addr = listener
            .local_addr()
            .map_err(crate::io("the core-API shim's address"))?;
        let app = axum::Router::new().fallback(move |req: Request| {
            let client = client.clone();
            async move { forward(client, req).await }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let kubeconfig = dir.join("kubeconfig-core-shim");
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: shim\n  cluster:\n    server: http://{addr}\nusers:\n- name: shim\n  user: {{}}\ncontexts:\n- name: shim\n  context:\n    cluster: shim\n    user: shim\ncurrent-context: shim\n"
        );
        std::fs::write(&kubeconfig, yaml)
            .map_err(crate::io(format!("writing {}", kubeconfig.display())))?;
        Ok(Self { kubeconfig, task })
    }

    /// A kubeconfig aimed at the shim (no credentials: the shim has the harness's).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A client through the shim (core/v1 Secrets included).
    pub async fn client(&self) -> Result<kube::Client, HarnessError> {
        let text = std::fs::read_to_string(&self.kubeconfig)
            .map_err(crate::io(format!("reading {}", self.kubeconfig.display())))?;
        let kc: kube::config::Kubeconfig =
            serde_yaml::from_str(&text).map_err(|source| HarnessError::Manifest {
                path: self.kubeconfig.clone(),
                source,
            })?;
        crate::client_for(&kc).await
    }
}

/// `path` mapped onto the Secret shim when it is a core/v1 Secret path.
pub fn shim_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, tail) = rest.split_once('/')?;
    (tail == "secrets" || tail.starts_with("secrets/"))
        .then(|| format!("/apis/{SHIM_API_VERSION}/namespaces/{ns}/{tail}"))
}

/// `body` (JSON) with its top-level `apiVersion` changed from `from` to `to`.
fn swap_api_version(body: &[u8], from: &str, to: &str) -> Vec<u8> {
    match serde_json::from_slice::<Value>(body) {
        Ok(mut v) if v["apiVersion"] == from => {
            v["apiVersion"] = Value::String(to.to_owned());
            serde_json::to_vec(&v).unwrap_or_else(|_| body.to_vec())
        }
        _ => body.to_vec(),
    }
}

async fn forward(client: kube::Client, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 16 << 20).await else {
        return (http::StatusCode::BAD_REQUEST, "request body").into_response();
    };
    let shimmed = shim_path(parts.uri.path());
    let uri = match (&shimmed, parts.uri.query()) {
        (Some(p), Some(q)) => format!("{p}?{q}"),
        (Some(p), None) => p.clone(),
        (None, _) => parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
    };
    let body = if shimmed.is_some() {
        swap_api_version(&body, "v1", SHIM_API_VERSION)
    } else {
        body.to_vec()
    };
    let mut out = http::Request::builder().method(parts.method).uri(uri);
    for (k, v) in &parts.headers {
        if k != http::header::HOST && k != http::header::CONTENT_LENGTH {
            out = out.header(k, v);
        }
    }
    let Ok(out) = out.body(kube::client::Body::from(body)) else {
        return (http::StatusCode::BAD_REQUEST, "request").into_response();
    };
    let resp = match client.send(out).await {
        Ok(r) => r,
        Err(e) => return (http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let (parts, body) = resp.into_parts();
    if shimmed.is_none() {
        return Response::from_parts(parts, Body::new(body));
    }
    let Ok(bytes) = http_body_util::BodyExt::collect(body)
        .await
        .map(|c| c.to_bytes())
    else {
        return (http::StatusCode::BAD_GATEWAY, "response body").into_response();
    };
    let mut parts = parts;
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(
        parts,
        Body::from(swap_api_version(&bytes, SHIM_API_VERSION, "v1")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_core_secret_paths_are_mapped() {
        assert_eq!(
            shim_path("/api/v1/namespaces/ml/secrets/k").as_deref(),
            Some("/apis/core.shim.edgefleet.io/v1/namespaces/ml/secrets/k")
        );
        assert_eq!(
            shim_path("/api/v1/namespaces/ml/secrets").as_deref(),
            Some("/apis/core.shim.edgefleet.io/v1/namespaces/ml/secrets")
        );
        for other in [
            "/api/v1/namespaces/ml/secretsx",
            "/api/v1/namespaces/ml/configmaps/k",
            "/apis/edgefleet.io/v1alpha1/namespaces/ml/edgemodels/secrets",
            "/api/v1",
        ] {
            assert_eq!(shim_path(other), None, "{other}");
        }
    }
}
