//! The device's OpenAI-compatible API: `POST /v1/chat/completions` (streamed as SSE or
//! not), `GET /v1/models`, and `/healthz`, `/readyz`, `/metrics`.
//!
//! Bad requests get 400 with an OpenAI error object naming the field; a full queue gets
//! 429 with `Retry-After`; a client that disconnects stops its generation (dropping the
//! response drops the event receiver, which the engine notices at the next token).
//!
//! Here: what is served ([`Serving`], swapped atomically on activation), the [`router`]
//! and starting the server ([`spawn`]). The rest, by what it does: `routes` (the
//! handlers), `request` (validating a chat body), `streaming` (SSE, plugins on streams),
//! `errors` ([`ApiError`]), `sub_prompt` (the plugins' `infer` on the served model) and
//! `receipts` (answers signed by the device's attested key, on request).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};

use crate::engine::Engine;
use crate::plugins::Chain;

mod errors;
mod receipts;
mod request;
mod routes;
mod streaming;
mod sub_prompt;

pub use errors::ApiError;
use errors::failed;
pub use receipts::ReceiptSigner;
pub use request::{ChatRequest, parse_chat_request};
pub use sub_prompt::EngineSubPrompt;

/// Largest request body.
const MAX_BODY_BYTES: usize = 1 << 20;

/// The model being served, with its plugin chain. Empty while the first model loads
/// (`/readyz` answers 503 "loading"). [`Serving::install`] swaps in a new engine for new
/// requests; requests in flight keep the engine (and plugins) they started on, whose
/// slots finish them, then exit and unload that model when the last one ends.
#[derive(Debug, Default)]
pub struct Serving {
    current: std::sync::RwLock<Option<Served>>,
    no_model: std::sync::atomic::AtomicBool,
    receipts: std::sync::RwLock<Option<Arc<ReceiptSigner>>>,
}

/// One model and the plugins its requests pass through.
#[derive(Debug, Clone)]
struct Served {
    engine: Arc<Engine>,
    plugins: Option<Chain>,
}

impl Serving {
    /// Nothing served yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Says that no model is coming (rather than loading): `/readyz` answers "no model".
    pub fn set_no_model(&self) {
        self.no_model.store(true, Ordering::Relaxed);
    }

    /// Stops serving: new requests get 503 "no model"; requests in flight finish on the
    /// engine they started on. Returns the engine that was served.
    pub fn uninstall(&self) -> Option<Arc<Engine>> {
        self.set_no_model();
        let previous = match self.current.write() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        previous.map(|p| p.engine)
    }

    /// The engine served now.
    pub fn current_engine(&self) -> Option<Arc<Engine>> {
        self.engine().ok()
    }

    /// Serves `engine`, with no plugins, from now on; returns the previous engine (which
    /// drains once dropped).
    pub fn install(&self, engine: Engine) -> Option<Arc<Engine>> {
        self.install_with_plugins(Arc::new(engine), None)
    }

    /// Serves `engine` behind `plugins` from now on; returns the previous engine.
    pub fn install_with_plugins(
        &self,
        engine: Arc<Engine>,
        plugins: Option<Chain>,
    ) -> Option<Arc<Engine>> {
        let next = Served {
            engine,
            plugins: plugins.filter(|c| !c.is_empty()),
        };
        let previous = match self.current.write() {
            Ok(mut g) => g.replace(next),
            Err(poisoned) => poisoned.into_inner().replace(next),
        };
        previous.map(|p| p.engine)
    }

    /// Signs receipts with `signer` from now on (the device attested again), or with
    /// nothing (it holds no allowed attestation result).
    pub fn set_receipt_signer(&self, signer: Option<ReceiptSigner>) {
        let signer = signer.map(Arc::new);
        match self.receipts.write() {
            Ok(mut g) => *g = signer,
            Err(poisoned) => *poisoned.into_inner() = signer,
        }
    }

    fn receipt_signer(&self) -> Option<Arc<ReceiptSigner>> {
        match self.receipts.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn served(&self) -> Result<Served, ApiError> {
        let current = match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        current.ok_or_else(|| {
            ApiError::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the model is loading",
            )
        })
    }

    fn engine(&self) -> Result<Arc<Engine>, ApiError> {
        self.served().map(|s| s.engine)
    }
}

/// The API routes over whatever `serving` holds.
pub fn router(serving: Arc<Serving>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route("/v1/models", get(routes::models))
        .route(
            "/v1/chat/completions",
            post(routes::chat).layer(axum::middleware::from_fn_with_state(
                serving.clone(),
                receipts::layer,
            )),
        )
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(serving)
}

/// Serves the API over whatever `serving` holds on `listener` until `shutdown`
/// completes, then tells systemd the service is stopping and lets requests in flight
/// finish.
pub fn spawn(
    listener: tokio::net::TcpListener,
    serving: Arc<Serving>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let router = router(serving);
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                shutdown.await;
                crate::systemd::stopping();
            })
            .await
    })
}
