//! Operator metrics (prometheus-client, one registry with an `edgefleet_operator`
//! prefix), and the `/metrics`, `/healthz` and `/readyz` endpoints.
//!
//! - `reconciles_total{result}` and `reconcile_duration_seconds` (histogram);
//! - `reconcile_failures_total{reason}`;
//! - `devices{state}`: ready and not-ready EdgeDevices, as last counted;
//! - `rollout_devices{model,count}`: each EdgeModel's targeted, updated and ready
//!   devices, and `rollout_step{model}`;
//! - `gateway_connected_devices`, `gateway_refusals_total{reason}`,
//!   `gateway_key_releases_total`,
//!   `gateway_report_writes_total`, `gateway_artifact_bytes_total` and
//!   `gateway_connections_superseded_total` ([`FleetCounters`], which the gateway
//!   counts into).
//!
//! This module depends on no other module of the crate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: String,
}

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The error's metric label.
    pub reason: String,
}

/// `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `ready` or `not_ready`.
    pub state: String,
}

/// `model` and `count` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabel {
    /// `namespace/name`.
    pub model: String,
    /// `targeted`, `updated`, `ready` or `failed`.
    pub count: String,
}

/// `model` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// `namespace/name`.
    pub model: String,
}

/// Metrics of the gateway's device API (registered in [`Metrics`]).
#[derive(Debug, Default, Clone)]
pub struct FleetCounters {
    /// Refused requests by reason.
    pub refusals: Family<ReasonLabel, Counter>,
    /// Devices holding a desired-state long-poll open now (connected devices).
    pub waiting: Gauge,
    /// Status writes made for reports.
    pub report_writes: Counter,
    /// Refresh writes left for later because the budget was spent.
    pub refresh_deferred: Counter,
    /// Report writes carrying a change left for a later report because the change
    /// budget was spent.
    pub change_deferred: Counter,
    /// Artifact bytes sent.
    pub artifact_bytes: Counter,
    /// Device connections closed because the device opened a newer one.
    pub superseded: Counter,
    /// Unidentified connections closed because newer ones went over the cap.
    pub unidentified_evicted: Counter,
    /// Model keys released to devices (refusals are in `refusals` by reason).
    pub key_releases: Counter,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by result.
    pub reconciles: Family<ResultLabel, Counter>,
    /// Failed reconciles by reason.
    pub failures: Family<ReasonLabel, Counter>,
    /// Reconcile durations.
    pub duration: Histogram,
    /// Devices by readiness.
    pub devices: Family<StateLabel, Gauge>,
    /// Rollout device counts by model.
    pub rollout: Family<RolloutLabel, Gauge>,
    /// Rollout step by model.
    pub step: Family<ModelLabel, Gauge>,
    /// The device gateway's metrics.
    pub gateway: Arc<FleetCounters>,
    leading: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edgefleet_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        let failures = Family::<ReasonLabel, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let devices = Family::<StateLabel, Gauge>::default();
        let rollout = Family::<RolloutLabel, Gauge>::default();
        let step = Family::<ModelLabel, Gauge>::default();
        registry.register("reconciles", "EdgeModel reconciles", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Failed EdgeModel reconciles by reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "EdgeModel reconcile duration",
            duration.clone(),
        );
        registry.register("devices", "EdgeDevices by readiness", devices.clone());
        registry.register(
            "rollout_devices",
            "Devices per EdgeModel: targeted, updated, ready, failed",
            rollout.clone(),
        );
        registry.register(
            "rollout_step",
            "Rollout step reached per EdgeModel",
            step.clone(),
        );
        let gateway = Arc::new(FleetCounters::default());
        registry.register(
            "gateway_connected_devices",
            "Devices holding a desired-state stream open",
            gateway.waiting.clone(),
        );
        registry.register(
            "gateway_refusals",
            "Device gateway requests refused, by reason",
            gateway.refusals.clone(),
        );
        registry.register(
            "gateway_report_writes",
            "EdgeDevice status writes made for device reports",
            gateway.report_writes.clone(),
        );
        registry.register(
            "gateway_status_refresh_deferred",
            "Status refresh writes left for a later report because the fleet-wide budget was spent",
            gateway.refresh_deferred.clone(),
        );
        registry.register(
            "gateway_status_change_deferred",
            "Report writes carrying a change left for a later report because the fleet-wide change budget was spent",
            gateway.change_deferred.clone(),
        );
        registry.register(
            "gateway_artifact_bytes",
            "Artifact bytes served to devices",
            gateway.artifact_bytes.clone(),
        );
        registry.register(
            "gateway_connections_superseded",
            "Device connections the gateway closed because the device opened a newer one",
            gateway.superseded.clone(),
        );
        registry.register(
            "gateway_unidentified_evicted",
            "Connections no device had claimed, closed because newer ones went over the cap (a flood, or many devices enrolling at once)",
            gateway.unidentified_evicted.clone(),
        );
        registry.register(
            "gateway_key_releases",
            "Model keys released to attested devices (refusals count in gateway_refusals by reason)",
            gateway.key_releases.clone(),
        );
        Self {
            registry,
            gateway,
            reconciles,
            failures,
            duration,
            devices,
            rollout,
            step,
            leading: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Says whether this replica leads (for `/readyz`).
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Records one model's rollout counts.
    pub fn record_rollout(&self, model: &str, status: &edgefleet_crds::EdgeModelStatus) {
        for (count, v) in [
            ("targeted", status.devices.targeted),
            ("updated", status.devices.updated),
            ("ready", status.devices.ready),
            ("failed", status.devices.failed),
        ] {
            self.rollout
                .get_or_create(&RolloutLabel {
                    model: model.to_owned(),
                    count: count.into(),
                })
                .set(i64::from(v));
        }
        self.step
            .get_or_create(&ModelLabel {
                model: model.to_owned(),
            })
            .set(i64::from(status.current_step.unwrap_or(0)));
    }

    /// Records device readiness counts.
    pub fn record_devices(&self, ready: usize, not_ready: usize) {
        for (state, n) in [("ready", ready), ("not_ready", not_ready)] {
            self.devices
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// `/metrics`, `/healthz` (the process is up) and `/readyz` (ready to lead or leading:
/// 200 either way, with the role in the body, because a standby replica that were never
/// ready would stall every Deployment rollout).
pub fn router(metrics: Arc<Metrics>) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let m = metrics.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let leading = metrics.leading.load(Ordering::Relaxed);
                async move { (StatusCode::OK, if leading { "leading" } else { "standby" }) }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = m.render();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response()
                }
            }),
        )
}
