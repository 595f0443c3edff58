//! `POST /v1/devices/{name}/report`: heartbeats. Each is noted in memory
//! ([`Heartbeats::seen`](crate::heartbeat::Heartbeats::seen)), which is what liveness
//! is decided on, and so are the model states they carry ([`crate::reported`]), which
//! is what the reconciler plans on. A device becoming Ready is written at once
//! (`Ready`, under the heartbeat manager). A change in model states or dropped reports
//! is written (`status.models`, `inference` and `reports` under [`REPORT_MANAGER`])
//! within a fleet-wide change budget (`--status-change-per-second`); past it, the change
//! waits for a later report. Writes that only keep timestamps and statistics fresh are
//! made at most every third of the lease per device, and only within a fleet-wide
//! refresh budget (`--status-refresh-per-second`). So the API server's write rate from
//! reports is bounded however many devices report, however often, and however many
//! change at once in a rollout. Writes run in the background, at most one per device
//! and [`MAX_CONCURRENT_WRITES`] in all, each carrying the device's latest state.

use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use edgefleet_crds::EdgeDevice;
use edgefleet_crds::device::ModelState;
use edgefleet_proto as proto;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::{Fleet, PeerCertificate};
use crate::gateway::error::{ApiError, Reason, json_body};

/// Field manager of the status fields reports write.
pub const REPORT_MANAGER: &str = "edgefleet-gateway-reports";

/// Status writes in flight at once, fleet-wide: a rollout's change writes queue here
/// instead of flooding the API server.
pub const MAX_CONCURRENT_WRITES: usize = 32;

/// What the gateway knows of one device's report stream.
#[derive(Debug, Default)]
pub(super) struct Delivery {
    boot: String,
    last_seq: u64,
    missing: u64,
    dropped: u64,
    last_write: Option<Instant>,
    /// The latest model states and counters: every write under [`REPORT_MANAGER`] must
    /// carry all of them, since server-side apply removes owned fields a patch omits.
    models: Option<Vec<edgefleet_crds::device::LoadedModel>>,
    inference: Option<edgefleet_crds::device::InferenceStats>,
    /// A status write for this device is in flight.
    writing: bool,
    /// A change arrived while a write was in flight: the next report writes it.
    pending_change: bool,
}

/// The EdgeDevice status value of a reported model state (a state the device sends
/// that none of these has is refused when the batch is parsed: [`proto::ModelState`]).
fn model_state(s: proto::ModelState) -> ModelState {
    match s {
        proto::ModelState::Pending => ModelState::Pending,
        proto::ModelState::Downloading => ModelState::Downloading,
        proto::ModelState::Verifying => ModelState::Verifying,
        proto::ModelState::Loading => ModelState::Loading,
        proto::ModelState::Ready => ModelState::Ready,
        proto::ModelState::Draining => ModelState::Draining,
        proto::ModelState::Failed => ModelState::Failed,
    }
}

pub(super) async fn report(
    State(fleet): State<Fleet>,
    Extension(peer): Extension<PeerCertificate>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<proto::ReportAck>, ApiError> {
    let device = fleet.identify(&peer, &name).await?;
    fleet
        .inner
        .heartbeats
        .seen(&name, k8s_openapi::jiff::Timestamp::now());
    // A model state no version of the protocol has is a named 400 here.
    let batch: proto::ReportBatch = json_body(&body)?;
    if batch.reports.len() > proto::MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Reason::BatchTooLarge,
            format!("at most {} reports per batch", proto::MAX_BATCH),
        ));
    }
    if batch
        .reports
        .windows(2)
        .any(|w| w[0].seq >= w[1].seq || w[0].boot != w[1].boot)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            Reason::BadRequest,
            "reports must be of one boot, by increasing seq",
        ));
    }
    let mut models = None;
    for r in &batch.reports {
        if let Some(m) = &r.models {
            let mut out = Vec::new();
            for m in m.iter().take(16) {
                out.push(edgefleet_crds::device::LoadedModel {
                    model: m.model.chars().take(317).collect(),
                    revision: m.revision.chars().take(64).collect(),
                    state: model_state(m.state),
                    message: m.message.as_ref().map(|s| s.chars().take(1024).collect()),
                    // A reason is a name: anything else (it reaches conditions and
                    // Events) is dropped.
                    reason: m
                        .reason
                        .as_ref()
                        .filter(|r| {
                            !r.is_empty()
                                && r.len() <= 63
                                && r.bytes().all(|b| b.is_ascii_alphanumeric())
                        })
                        .cloned(),
                    load_millis: m.load_millis.and_then(|v| i64::try_from(v).ok()),
                    // The device's own words: bounded, and only digest-shaped digests.
                    golden: golden_answers(&m.golden),
                });
            }
            models = Some(out);
        }
    }
    // Sequence accounting.
    let (acked, missing, write, start_write) = {
        let mut map = fleet.inner.deliveries.lock().map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                Reason::Internal,
                "delivery state poisoned",
            )
        })?;
        let d = map.entry(name.clone()).or_default();
        if let Some(first) = batch.reports.first()
            && first.boot != d.boot
        {
            // A new agent process, or this gateway's first batch from it: continue from
            // what the status recorded for that boot.
            let recorded = device
                .status
                .as_ref()
                .and_then(|s| s.reports.as_ref())
                .filter(|r| r.boot == first.boot);
            *d = Delivery {
                boot: first.boot.clone(),
                last_seq: recorded.map_or(0, |r| u64::try_from(r.last_sequence).unwrap_or(0)),
                missing: recorded.map_or(0, |r| u64::try_from(r.missing).unwrap_or(0)),
                dropped: 0,
                last_write: None,
                models: device.status.as_ref().map(|s| s.models.clone()),
                inference: None,
                // A write of the previous boot may still be in flight.
                writing: d.writing,
                // The new boot is recorded with the first refresh (`last_write` is None,
                // so one is due at once, within the refresh budget): a fleet connecting
                // at once does not cost a change write per device. Model states that
                // differ from the recorded ones are a change.
                pending_change: false,
            };
        }
        for r in &batch.reports {
            if r.seq > d.last_seq {
                d.missing += r.seq - d.last_seq - 1;
                d.last_seq = r.seq;
            }
        }
        let dropped_changed = batch.dropped != d.dropped;
        d.dropped = batch.dropped;
        let changed = models
            .as_ref()
            .is_some_and(|m| d.models.as_ref() != Some(m))
            || dropped_changed
            || d.pending_change;
        if let Some(m) = models {
            // The reconciler reads this at once; the status write may wait for budget.
            fleet.inner.heartbeats.reported().note(&name, &m);
            d.models = Some(m);
        }
        if let Some((i, taken)) = batch
            .reports
            .iter()
            .rev()
            .find_map(|r| r.inference.as_ref().map(|i| (i, r.time)))
        {
            // Observed when the device took the report (a spooled report may be old),
            // never later than now by the gateway's clock.
            let now = k8s_openapi::jiff::Timestamp::now();
            let observed = k8s_openapi::jiff::Timestamp::from_second(taken)
                .ok()
                .filter(|t| taken > 0 && *t < now)
                .unwrap_or(now);
            let stats = edgefleet_crds::device::InferenceStats {
                // The device's word about its own counters, bounded like the names
                // it stands for (a longer one is no model's).
                model: i.model.clone().filter(|m| m.len() <= 317),
                revision: i.revision.clone().filter(|r| r.len() <= 64),
                observed_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    observed,
                )),
                tokens_per_second: if i.tokens_per_second.is_finite() {
                    i.tokens_per_second.max(0.0)
                } else {
                    0.0
                },
                latency_p50_millis: reported_millis(i.latency_p50_millis),
                latency_p99_millis: reported_millis(i.latency_p99_millis),
                time_to_first_token_p95_millis: reported_millis(i.time_to_first_token_p95_millis),
                requests_total: i64::try_from(i.requests_total).unwrap_or(i64::MAX),
                errors_total: i64::try_from(i.errors_total).unwrap_or(i64::MAX),
            };
            fleet
                .inner
                .heartbeats
                .reported()
                .note_stats(&name, stats.clone());
            d.inference = Some(stats);
        }
        let third = fleet.inner.config.heartbeat_lease / 3;
        let stale = d.last_write.is_none_or(|t| t.elapsed() >= third);
        // Changes and refreshes each take a token from their own budget, and neither is
        // written while a write is in flight (the change flag carries a change over to a
        // later report instead, as it does when the change budget is spent).
        let due = if d.writing {
            d.pending_change |= changed;
            false
        } else if changed {
            let token = fleet.inner.heartbeats.try_change();
            if !token {
                fleet.inner.counters.change_deferred.inc();
                d.pending_change = true;
            }
            token
        } else if stale {
            let token = fleet.inner.heartbeats.try_refresh();
            if !token {
                fleet.inner.counters.refresh_deferred.inc();
            }
            token
        } else {
            false
        };
        if due {
            d.last_write = Some(Instant::now());
            d.pending_change = false;
        }
        let write = due.then(|| {
            (
                d.boot.clone(),
                d.models.clone().unwrap_or_default(),
                d.inference.clone(),
                d.dropped,
            )
        });
        // One write in flight per device; a change that arrives meanwhile is made with a
        // later report instead (`pending_change`).
        let start_write = if d.writing {
            false
        } else {
            d.writing = true;
            true
        };
        (d.last_seq, d.missing, write, start_write)
    };
    // The writes go on in the background, one at a time per device: the device gets its
    // acknowledgement without waiting on the API server (reports are state snapshots, so
    // a write that fails is simply made again with the next report).
    let patch = write.map(|(boot, models, inference, dropped)| {
        let mut st = json!({
            "reports": {
                "boot": boot, "lastSequence": acked, "missing": missing, "dropped": dropped,
            },
            "models": models,
            "loadedModelCount": models
                .iter()
                .filter(|m| m.state == ModelState::Ready)
                .count(),
        });
        if let Some(i) = inference {
            st["inference"] = json!(i);
        }
        json!({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeDevice", "status": st})
    });
    if start_write {
        let fleet = fleet.clone();
        let (name, device) = (name.clone(), device.clone());
        tokio::spawn(async move {
            let _permit = fleet.inner.writes.clone().acquire_owned().await;
            let mut failed = false;
            if let Some(patch) = patch {
                match Api::<EdgeDevice>::all(fleet.inner.client.clone())
                    .patch_status(
                        &name,
                        &PatchParams::apply(REPORT_MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await
                {
                    Ok(_) => {
                        fleet.inner.counters.report_writes.inc();
                    }
                    Err(e) => {
                        tracing::warn!(device = %name, error = %e, "writing a device report");
                        failed = true;
                    }
                }
            }
            if let Err(e) = fleet
                .inner
                .heartbeats
                .record(&device, k8s_openapi::jiff::Timestamp::now())
                .await
            {
                tracing::warn!(device = %name, error = %e, "writing a heartbeat");
            }
            if let Ok(mut map) = fleet.inner.deliveries.lock()
                && let Some(d) = map.get_mut(&name)
            {
                d.writing = false;
                if failed {
                    // Made again with the next report, budget or not.
                    d.pending_change = true;
                }
            }
        });
    }
    let desired_version = fleet
        .desired_state(&device)
        .map(|s| s.version)
        .unwrap_or_default();
    Ok(Json(proto::ReportAck {
        acked,
        gaps: missing,
        desired_version,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(state: &str) -> String {
        json!({"reports": [{"seq": 1, "boot": "b", "time": 0, "models": [
            {"model": "ns/m", "revision": "r1", "state": state},
        ]}]})
        .to_string()
    }

    /// Each state a device reports is recorded as the status value of the same name.
    #[test]
    fn reported_states_are_recorded_by_name() {
        for s in proto::ModelState::ALL {
            assert_eq!(
                serde_json::to_value(model_state(s)).ok(),
                Some(json!(s.as_str()))
            );
        }
        let parsed = json_body::<proto::ReportBatch>(batch("Ready").as_bytes()).map(|b| {
            b.reports[0]
                .models
                .as_ref()
                .map(|m| model_state(m[0].state))
        });
        assert_eq!(parsed.ok().flatten(), Some(ModelState::Ready));
    }

    /// A state no version of the protocol has is a 400 naming it.
    #[test]
    fn an_unknown_model_state_is_a_named_bad_request() {
        let Err(e) = json_body::<proto::ReportBatch>(batch("Exploded").as_bytes()) else {
            panic!("an unknown model state was accepted");
        };
        assert_eq!(
            (e.status(), e.reason().as_str()),
            (StatusCode::BAD_REQUEST, "BadRequest")
        );
        assert!(
            e.message().contains(r#"unknown model state "Exploded""#),
            "{}",
            e.message()
        );
    }
}

/// What a device reports of its golden answers, bounded: at most
/// [`proto::MAX_GOLDEN_PROMPTS`], only digest-shaped digests, one per prompt name (the
/// first), names cut to 63 characters.
fn golden_answers(reported: &[proto::GoldenAnswer]) -> Vec<edgefleet_crds::device::GoldenAnswer> {
    let mut out: Vec<edgefleet_crds::device::GoldenAnswer> = Vec::new();
    for g in reported.iter().filter(|g| is_digest(&g.digest)) {
        let name: String = g.name.chars().take(63).collect();
        if out.len() < proto::MAX_GOLDEN_PROMPTS && !out.iter().any(|o| o.name == name) {
            out.push(edgefleet_crds::device::GoldenAnswer {
                name,
                digest: g.digest.clone(),
            });
        }
    }
    out
}

/// Whether `d` is `sha256:` and 64 lowercase hex digits (what a device reports of a
/// golden answer; anything else is dropped, not stored).
fn is_digest(d: &str) -> bool {
    super::sha256_hex(d).is_some()
}

#[cfg(test)]
mod golden_tests {
    use super::{golden_answers, is_digest, reported_millis};
    use edgefleet_proto as proto;

    #[test]
    fn a_devices_latencies_are_kept_only_when_they_are_durations() {
        assert_eq!(reported_millis(Some(12.5)), Some(12.5));
        assert_eq!(reported_millis(Some(0.0)), Some(0.0));
        for nonsense in [f64::NAN, f64::INFINITY, -1.0, 86_400_001.0] {
            assert_eq!(reported_millis(Some(nonsense)), None, "{nonsense}");
        }
        assert_eq!(reported_millis(None), None);
    }

    #[test]
    fn a_devices_golden_answers_are_bounded_and_one_per_prompt() {
        let d = |c: &str| format!("sha256:{}", c.repeat(64));
        let answer = |name: &str, digest: String| proto::GoldenAnswer {
            name: name.into(),
            digest,
        };
        let kept = golden_answers(&[
            answer("capital", "bogus".into()),
            answer("capital", d("a")),
            answer("capital", d("b")),
            answer("sum", d("c")),
        ]);
        let got: Vec<(&str, &str)> = kept
            .iter()
            .map(|g| (g.name.as_str(), g.digest.as_str()))
            .collect();
        assert_eq!(
            got,
            [("capital", d("a").as_str()), ("sum", d("c").as_str())]
        );
        let many: Vec<proto::GoldenAnswer> =
            (0..50).map(|i| answer(&format!("p{i}"), d("a"))).collect();
        assert_eq!(golden_answers(&many).len(), proto::MAX_GOLDEN_PROMPTS);
    }

    #[test]
    fn only_digest_shaped_golden_answers_are_kept() {
        assert!(is_digest(&format!("sha256:{}", "0a".repeat(32))));
        for bad in [
            String::new(),
            "sha256:".into(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "0".repeat(63)),
            format!("sha256:{}", "0".repeat(65)),
            format!("sha512:{}", "0".repeat(64)),
            format!("sha256:{}\n", "0".repeat(63)),
            format!("sha256:{}é", "0".repeat(62)),
        ] {
            assert!(!is_digest(&bad), "{bad:?}");
        }
    }
}

/// A duration in milliseconds as the device reported it, when it is one: finite, not
/// negative, and at most a day (JSON has no NaN, so a device's NaN would otherwise fail
/// its status write; one that reports nonsense reports nothing, and a gate on it fails).
fn reported_millis(v: Option<f64>) -> Option<f64> {
    v.filter(|v| v.is_finite() && *v >= 0.0 && *v <= 86_400_000.0)
}
