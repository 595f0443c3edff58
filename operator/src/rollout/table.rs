//! The whole planner, table-driven: each case is an EdgeModel (spec and status), a
//! fleet (which devices are online, and what they report), and what the plan must say
//! (phase, rollout position, step, events). Covers steps, pauses, `paused`,
//! `maxUnavailable`, the ready timeout, each gate, rollback, devices joining or leaving
//! mid-step, offline devices, and completion followed by device loss or failure.

#![allow(clippy::unwrap_used)]

use edgefleet_crds::conditions::reasons;
use edgefleet_crds::device::ModelState;
use edgefleet_crds::model::{RANK_ALL, device_rank};
use edgefleet_crds::{EdgeDevice, EdgeModel, EdgeModelStatus, ModelPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::fixtures::{
    ago, attested, device, first_token_p95, now, online, plan_all_pools, reporting, serving, spec,
};
use super::{Plan, revision, revision_after};

/// The model's UID in every case.
const UID: &str = "uid-table";

/// Eight device names, by their rank for [`UID`].
fn by_rank() -> Vec<String> {
    let mut names: Vec<String> = (1..=8).map(|i| format!("d{i}")).collect();
    names.sort_by_key(|n| device_rank(UID, n));
    names
}

fn rank_of(name: &str) -> i64 {
    device_rank(UID, name)
}

/// The rank just past the `k` lowest-ranked devices.
fn past(k: usize) -> i64 {
    if k == 0 {
        0
    } else {
        rank_of(&by_rank()[k - 1]) + 1
    }
}

/// A model with `rollout` merged into the fixture spec, its status set by `status`.
fn model(rollout: serde_json::Value, status: impl Fn(&mut EdgeModelStatus, &str)) -> EdgeModel {
    let mut s = serde_json::to_value(spec(serde_json::json!({"site": "a"}))).unwrap();
    s["rollout"] = rollout;
    let spec: edgefleet_crds::EdgeModelSpec = serde_json::from_value(s).unwrap();
    let rev = revision(&spec);
    let mut m = EdgeModel::new("m", spec);
    m.metadata.namespace = Some("ns".into());
    m.metadata.uid = Some(UID.into());
    let mut st = EdgeModelStatus {
        current_revision: Some(rev.clone()),
        current_step: Some(0),
        rollout_rank: Some(0),
        ..EdgeModelStatus::default()
    };
    status(&mut st, &rev);
    m.status = Some(st);
    m
}

/// An attested candidate, online or not, reporting `state` of revision `rev` if given.
fn dev(name: &str, up: bool, report: Option<(&str, ModelState)>) -> EdgeDevice {
    let mut d = attested(device(name));
    if up {
        d = online(d);
    }
    if let Some((rev, state)) = report {
        d = reporting(d, rev, state);
    }
    d
}

fn run(m: &EdgeModel, devices: &[EdgeDevice]) -> Plan {
    plan_all_pools(m, devices, Ok(()))
}

fn rev_of(m: &EdgeModel) -> String {
    m.status.as_ref().unwrap().current_revision.clone().unwrap()
}

/// How many of `names` run the current revision after the plan.
fn on_current(p: &Plan, names: &[String]) -> usize {
    let rev = p.status.current_revision.clone().unwrap();
    names
        .iter()
        .filter(|n| revision_after(&p.status, UID, n).as_deref() == Some(rev.as_str()))
        .count()
}

fn has_event(p: &Plan, reason: &str) -> bool {
    p.events.iter().any(|e| e.1 == reason)
}

/// A model with one golden prompt (`capital`), the golden gate on or off, two steps
/// (so that a failure is judged before completion), the two lowest-ranked devices on
/// the revision.
fn golden_model(gate: bool) -> EdgeModel {
    let mut s = serde_json::to_value(spec(serde_json::json!({"site": "a"}))).unwrap();
    s["validation"] = serde_json::json!({"goldenPrompts": [
        {"name": "capital", "prompt": "What is the capital of France?", "contains": "Paris"}
    ]});
    s["rollout"] = serde_json::json!({
        "steps": [{"count": 2}, {"percent": 100}],
        "maxUnavailable": 8,
        "healthGates": {"goldenPrompts": gate},
    });
    let spec: edgefleet_crds::EdgeModelSpec = serde_json::from_value(s).unwrap();
    let rev = revision(&spec);
    let mut m = EdgeModel::new("m", spec);
    m.metadata.namespace = Some("ns".into());
    m.metadata.uid = Some(UID.into());
    m.status = Some(EdgeModelStatus {
        current_revision: Some(rev.clone()),
        stable_revision: Some("old".into()),
        current_step: Some(0),
        rollout_rank: Some(past(2)),
        step_started_time: Some(ago(5)),
        ..EdgeModelStatus::default()
    });
    m
}

/// The fleet of a [`golden_model`]: the two lowest-ranked devices Ready on `rev` with
/// their (arch, answer digest), the others on the old revision.
fn golden_fleet(rev: &str, first: (&str, &str), second: (&str, &str)) -> Vec<EdgeDevice> {
    by_rank()
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if i >= 2 {
                return dev(n, true, Some(("old", ModelState::Ready)));
            }
            let (arch, answer) = if i == 0 { first } else { second };
            let mut d = dev(n, true, Some((rev, ModelState::Ready)));
            d.spec.facts.arch = arch.into();
            let m = d.status.as_mut().unwrap().models.last_mut().unwrap();
            m.golden = vec![edgefleet_crds::device::GoldenAnswer {
                name: "capital".into(),
                digest: format!("sha256:{:0>64}", answer),
            }];
            d
        })
        .collect()
}

/// A case: its name, and a check that panics naming what went wrong.
type Case = (&'static str, fn());

fn cases() -> Vec<Case> {
    vec![
        ("a new revision starts at step 0 over no device", || {
            let m = model(serde_json::json!({}), |st, _| {
                st.current_revision = Some("old".into());
                st.stable_revision = Some("old".into());
                st.rollout_rank = Some(RANK_ALL);
            });
            let names = by_rank();
            let devices: Vec<_> = names
                .iter()
                .map(|n| dev(n, true, Some(("old", ModelState::Ready))))
                .collect();
            let p = run(&m, &devices);
            assert_eq!(p.status.current_step, Some(0));
            assert!(
                p.events
                    .iter()
                    .any(|e| e.2.starts_with("rolling out revision"))
            );
            // One online device moves (maxUnavailable 1): the lowest-ranked.
            assert_eq!(p.status.rollout_rank, Some(past(1)));
        }),
        (
            "a count-1 canary moves exactly the lowest-ranked online device",
            || {
                let m = model(
                    serde_json::json!({"steps": [{"count": 1}, {"percent": 100}], "maxUnavailable": 8}),
                    |_, _| {},
                );
                let names = by_rank();
                let devices: Vec<_> = names.iter().map(|n| dev(n, true, None)).collect();
                let p = run(&m, &devices);
                assert_eq!(on_current(&p, &names), 1);
                assert_eq!(p.status.phase, Some(ModelPhase::Progressing));
            },
        ),
        (
            "the canary passes an offline lowest-ranked device and takes the next online one",
            || {
                let m = model(
                    serde_json::json!({"steps": [{"count": 1}, {"percent": 100}], "maxUnavailable": 8}),
                    |_, _| {},
                );
                let names = by_rank();
                let devices: Vec<_> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| dev(n, i != 0, None))
                    .collect();
                let p = run(&m, &devices);
                assert_eq!(p.status.rollout_rank, Some(past(2)));
                assert_eq!(
                    on_current(&p, &names),
                    2,
                    "the offline one gets it when it returns"
                );
            },
        ),
        (
            "an updating device uses maxUnavailable 1: nothing more moves",
            || {
                let m = model(serde_json::json!({"maxUnavailable": 1}), |st, _| {
                    st.rollout_rank = Some(past(1))
                });
                let rev = rev_of(&m);
                let names = by_rank();
                let devices: Vec<_> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        dev(
                            n,
                            true,
                            (i == 0).then_some((rev.as_str(), ModelState::Loading)),
                        )
                    })
                    .collect();
                let p = run(&m, &devices);
                assert_eq!(p.status.rollout_rank, Some(past(1)));
            },
        ),
        ("maxUnavailable 3 moves three at once", || {
            let m = model(serde_json::json!({"maxUnavailable": 3}), |_, _| {});
            let names = by_rank();
            let devices: Vec<_> = names.iter().map(|n| dev(n, true, None)).collect();
            let p = run(&m, &devices);
            assert_eq!(on_current(&p, &names), 3);
        }),
        ("a percent maxUnavailable counts online candidates", || {
            let m = model(serde_json::json!({"maxUnavailable": "50%"}), |_, _| {});
            let names = by_rank();
            let devices: Vec<_> = names.iter().map(|n| dev(n, true, None)).collect();
            let p = run(&m, &devices);
            assert_eq!(on_current(&p, &names), 4);
        }),
        ("a ready step waits out its pause", || {
            let m = model(
                serde_json::json!({"steps": [{"count": 1, "pauseSeconds": 60}, {"percent": 100}], "maxUnavailable": 8}),
                |st, _| {
                    st.rollout_rank = Some(past(1));
                    st.step_started_time = Some(ago(30));
                },
            );
            let rev = rev_of(&m);
            let names = by_rank();
            let devices: Vec<_> = names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    dev(
                        n,
                        true,
                        (i == 0).then_some((rev.as_str(), ModelState::Ready)),
                    )
                })
                .collect();
            let p = run(&m, &devices);
            assert_eq!(p.status.current_step, Some(0));
            assert_eq!(on_current(&p, &names), 1);
        }),
        (
            "after its pause the next step starts and moves devices",
            || {
                let m = model(
                    serde_json::json!({"steps": [{"count": 1, "pauseSeconds": 60}, {"percent": 100}], "maxUnavailable": 8}),
                    |st, _| {
                        st.rollout_rank = Some(past(1));
                        st.step_started_time = Some(ago(61));
                    },
                );
                let rev = rev_of(&m);
                let names = by_rank();
                let devices: Vec<_> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        dev(
                            n,
                            true,
                            (i == 0).then_some((rev.as_str(), ModelState::Ready)),
                        )
                    })
                    .collect();
                let p = run(&m, &devices);
                assert_eq!(p.status.current_step, Some(1));
                assert!(p.events.iter().any(|e| e.2.starts_with("step 1 reached")));
                assert_eq!(on_current(&p, &names), 8);
            },
        ),
        ("spec.rollout.paused holds the position", || {
            let m = model(
                serde_json::json!({"paused": true, "maxUnavailable": 8}),
                |st, _| st.rollout_rank = Some(past(2)),
            );
            let names = by_rank();
            let devices: Vec<_> = names.iter().map(|n| dev(n, true, None)).collect();
            let p = run(&m, &devices);
            assert_eq!(p.status.phase, Some(ModelPhase::Paused));
            assert_eq!(p.status.rollout_rank, Some(past(2)));
        }),
        (
            "an online device not ready within the timeout fails the gate and rolls back",
            || {
                let m = model(
                    serde_json::json!({"healthGates": {"readyTimeoutSeconds": 60}}),
                    |st, _| {
                        st.stable_revision = Some("old".into());
                        st.rollout_rank = Some(past(1));
                        st.step_started_time = Some(ago(120));
                    },
                );
                let rev = rev_of(&m);
                let names = by_rank();
                let devices: Vec<_> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        dev(
                            n,
                            true,
                            Some(if i == 0 {
                                (rev.as_str(), ModelState::Loading)
                            } else {
                                ("old", ModelState::Ready)
                            }),
                        )
                    })
                    .collect();
                let p = run(&m, &devices);
                assert_eq!(p.status.phase, Some(ModelPhase::Degraded));
                assert!(
                    has_event(&p, reasons::HEALTH_GATE_FAILED)
                        && has_event(&p, reasons::ROLLED_BACK)
                );
                assert_eq!(p.status.rollout_rank, Some(0));
                assert_eq!(p.status.failed_revision.as_deref(), Some(rev.as_str()));
            },
        ),
        ("within the timeout a loading device fails nothing", || {
            let m = model(
                serde_json::json!({"healthGates": {"readyTimeoutSeconds": 600}}),
                |st, _| {
                    st.rollout_rank = Some(past(1));
                    st.step_started_time = Some(ago(120));
                },
            );
            let rev = rev_of(&m);
            let names = by_rank();
            let devices = vec![dev(
                &names[0],
                true,
                Some((rev.as_str(), ModelState::Loading)),
            )];
            let p = run(&m, &devices);
            assert_eq!(p.status.phase, Some(ModelPhase::Progressing));
        }),
        (
            "an offline updated device past the timeout fails nothing",
            || {
                let m = model(
                    serde_json::json!({"healthGates": {"readyTimeoutSeconds": 60}}),
                    |st, _| {
                        st.rollout_rank = Some(past(1));
                        st.step_started_time = Some(ago(600));
                    },
                );
                let rev = rev_of(&m);
                let names = by_rank();
                let devices = vec![
                    dev(&names[0], false, Some((rev.as_str(), ModelState::Loading))),
                    dev(&names[1], true, None),
                ];
                let p = run(&m, &devices);
                assert_ne!(p.status.phase, Some(ModelPhase::Degraded));
                assert!(!has_event(&p, reasons::HEALTH_GATE_FAILED));
            },
        ),
        (
            "a device back online gets the timeout from its return",
            || {
                let m = model(
                    serde_json::json!({"healthGates": {"readyTimeoutSeconds": 60}}),
                    |st, _| {
                        st.rollout_rank = Some(past(1));
                        st.step_started_time = Some(ago(600));
                    },
                );
                let rev = rev_of(&m);
                let names = by_rank();
                let mut back = dev(&names[0], true, Some((rev.as_str(), ModelState::Loading)));
                back.status
                    .as_mut()
                    .unwrap()
                    .conditions
                    .iter_mut()
                    .for_each(|c| {
                        if c.type_ == "Ready" {
                            c.last_transition_time = ago(10);
                        }
                    });
                let p = run(&m, &[back]);
                assert!(
                    !has_event(&p, reasons::HEALTH_GATE_FAILED),
                    "{:?}",
                    p.events
                );
            },
        ),
        ("a Failed report fails the gate", || {
            let m = model(serde_json::json!({}), |st, _| {
                st.rollout_rank = Some(past(1))
            });
            let rev = rev_of(&m);
            let names = by_rank();
            let p = run(
                &m,
                &[dev(
                    &names[0],
                    true,
                    Some((rev.as_str(), ModelState::Failed)),
                )],
            );
            assert_eq!(p.status.phase, Some(ModelPhase::Degraded));
            assert_eq!(p.status.devices.failed, 1);
        }),
        ("an error rate above the gate fails it", || {
            let m = model(
                serde_json::json!({"healthGates": {"maxErrorRatePercent": 5}}),
                |st, _| st.rollout_rank = Some(past(1)),
            );
            let rev = rev_of(&m);
            let names = by_rank();
            let d = serving(
                dev(&names[0], true, Some((rev.as_str(), ModelState::Ready))),
                20.0,
                100,
                10,
            );
            let p = run(&m, &[d]);
            assert!(
                p.events
                    .iter()
                    .any(|e| e.2.contains("error rate 10.0% is above 5%")),
                "{:?}",
                p.events
            );
        }),
        ("a speed below the gate fails it", || {
            let m = model(
                serde_json::json!({"healthGates": {"minTokensPerSecond": 10}}),
                |st, _| st.rollout_rank = Some(past(1)),
            );
            let rev = rev_of(&m);
            let names = by_rank();
            let d = serving(
                dev(&names[0], true, Some((rev.as_str(), ModelState::Ready))),
                4.0,
                100,
                0,
            );
            let p = run(&m, &[d]);
            assert!(
                p.events.iter().any(|e| e.2.contains("below 10")),
                "{:?}",
                p.events
            );
        }),
        (
            "a slow first token fails the TTFT gate, a fast one passes",
            || {
                let m = model(
                    serde_json::json!({"healthGates": {"maxTimeToFirstTokenMillisP95": 400}}),
                    |st, _| st.rollout_rank = Some(past(1)),
                );
                let rev = rev_of(&m);
                let names = by_rank();
                let served = |p95| {
                    first_token_p95(
                        serving(
                            dev(&names[0], true, Some((rev.as_str(), ModelState::Ready))),
                            20.0,
                            100,
                            0,
                        ),
                        Some(p95),
                    )
                };
                let p = run(&m, &[served(900.0)]);
                assert!(
                    p.events.iter().any(|e| e
                        .2
                        .contains("time to first token p95 900 ms is above 400 ms")),
                    "{:?}",
                    p.events
                );
                let p = run(&m, &[served(120.0)]);
                assert!(
                    !p.events.iter().any(|e| e.2.contains("time to first token")),
                    "{:?}",
                    p.events
                );
                assert_ne!(p.status.phase, Some(ModelPhase::Degraded));
            },
        ),
        (
            "without rollbackOnFailure a failed revision stays where it is",
            || {
                let m = model(
                    serde_json::json!({"healthGates": {"rollbackOnFailure": false}}),
                    |st, _| {
                        st.stable_revision = Some("old".into());
                        st.rollout_rank = Some(past(1));
                    },
                );
                let rev = rev_of(&m);
                let names = by_rank();
                let p = run(
                    &m,
                    &[dev(
                        &names[0],
                        true,
                        Some((rev.as_str(), ModelState::Failed)),
                    )],
                );
                assert_eq!(p.status.phase, Some(ModelPhase::Degraded));
                assert_eq!(p.status.rollout_rank, Some(past(1)));
                assert!(!has_event(&p, reasons::ROLLED_BACK));
            },
        ),
        (
            "a revision that failed before stays halted and rolled back",
            || {
                let m = model(serde_json::json!({}), |st, rev| {
                    st.stable_revision = Some("old".into());
                    st.failed_revision = Some(rev.to_owned());
                    st.rollout_rank = Some(past(1));
                });
                let names = by_rank();
                let devices: Vec<_> = names
                    .iter()
                    .map(|n| dev(n, true, Some(("old", ModelState::Ready))))
                    .collect();
                let p = run(&m, &devices);
                assert_eq!(p.status.phase, Some(ModelPhase::Degraded));
                assert_eq!(p.status.rollout_rank, Some(0));
                assert!(
                    !has_event(&p, reasons::HEALTH_GATE_FAILED),
                    "announced once"
                );
            },
        ),
        (
            "the last step ready makes the revision stable, over every device",
            || {
                let m = model(serde_json::json!({"maxUnavailable": 8}), |st, _| {
                    st.rollout_rank = Some(past(8))
                });
                let rev = rev_of(&m);
                let names = by_rank();
                let devices: Vec<_> = names
                    .iter()
                    .map(|n| dev(n, true, Some((rev.as_str(), ModelState::Ready))))
                    .collect();
                let p = run(&m, &devices);
                assert_eq!(p.status.phase, Some(ModelPhase::Available));
                assert_eq!(p.status.stable_revision.as_deref(), Some(rev.as_str()));
                assert_eq!(p.status.rollout_rank, Some(RANK_ALL));
                assert!(has_event(&p, reasons::ROLLOUT_COMPLETE));
            },
        ),
        (
            "after completion a device lost stays counted and fails nothing",
            || {
                let m = model(
                    serde_json::json!({"healthGates": {"readyTimeoutSeconds": 15}}),
                    |st, rev| {
                        st.stable_revision = Some(rev.to_owned());
                        st.rollout_rank = Some(RANK_ALL);
                        st.step_started_time = Some(ago(3600));
                    },
                );
                let rev = rev_of(&m);
                let names = by_rank();
                let devices: Vec<_> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        dev(
                            n,
                            i != 2,
                            Some((
                                rev.as_str(),
                                if i == 2 {
                                    ModelState::Loading
                                } else {
                                    ModelState::Ready
                                },
                            )),
                        )
                    })
                    .collect();
                let p = run(&m, &devices);
                assert_eq!(p.status.phase, Some(ModelPhase::Available));
                assert_eq!(p.status.ready_devices.as_deref(), Some("7/8"));
                assert!(!has_event(&p, reasons::HEALTH_GATE_FAILED));
            },
        ),
        (
            "after completion a device rebooting slowly (online, loading) fails nothing",
            || {
                let m = model(
                    serde_json::json!({"healthGates": {"readyTimeoutSeconds": 15}}),
                    |st, rev| {
                        st.stable_revision = Some(rev.to_owned());
                        st.rollout_rank = Some(RANK_ALL);
                        st.step_started_time = Some(ago(3600));
                    },
                );
                let rev = rev_of(&m);
                let names = by_rank();
                let devices: Vec<_> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        dev(
                            n,
                            true,
                            Some((
                                rev.as_str(),
                                if i == 0 {
                                    ModelState::Failed
                                } else {
                                    ModelState::Ready
                                },
                            )),
                        )
                    })
                    .collect();
                let p = run(&m, &devices);
                assert_eq!(p.status.phase, Some(ModelPhase::Available));
                assert_eq!(p.status.failed_revision, None);
                assert_eq!(p.status.devices.failed, 1, "counted, not a rollback");
            },
        ),
        (
            "a device joining mid-step changes no other device's revision",
            || {
                let m = model(serde_json::json!({"maxUnavailable": 1}), |st, _| {
                    st.stable_revision = Some("old".into());
                    st.rollout_rank = Some(past(3));
                });
                let rev = rev_of(&m);
                let names = by_rank();
                let devices: Vec<_> = names[..3]
                    .iter()
                    .map(|n| dev(n, true, Some((rev.as_str(), ModelState::Loading))))
                    .collect();
                let before = run(&m, &devices);
                let mut more = devices.clone();
                more.push(dev("newcomer", true, None));
                let after = run(&m, &more);
                for n in &names[..3] {
                    assert_eq!(
                        revision_after(&before.status, UID, n),
                        revision_after(&after.status, UID, n),
                        "{n}"
                    );
                }
            },
        ),
        (
            "a device leaving mid-step changes no other device's revision",
            || {
                let m = model(serde_json::json!({"maxUnavailable": 1}), |st, _| {
                    st.stable_revision = Some("old".into());
                    st.rollout_rank = Some(past(3));
                });
                let rev = rev_of(&m);
                let names = by_rank();
                let devices: Vec<_> = names
                    .iter()
                    .map(|n| dev(n, true, Some((rev.as_str(), ModelState::Loading))))
                    .collect();
                let before = run(&m, &devices);
                let after = run(&m, &devices[1..]);
                for n in &names[1..] {
                    assert_eq!(
                        revision_after(&before.status, UID, n),
                        revision_after(&after.status, UID, n),
                        "{n}"
                    );
                }
            },
        ),
        ("no candidate leaves the model Pending", || {
            let m = model(serde_json::json!({}), |_, _| {});
            let p = run(&m, &[]);
            assert_eq!(p.status.phase, Some(ModelPhase::Pending));
        }),
        ("with every candidate offline nothing moves", || {
            let m = model(serde_json::json!({"maxUnavailable": 8}), |_, _| {});
            let names = by_rank();
            let devices: Vec<_> = names.iter().map(|n| dev(n, false, None)).collect();
            let p = run(&m, &devices);
            assert_eq!(p.status.phase, Some(ModelPhase::Progressing));
            assert_eq!(p.status.rollout_rank, Some(0));
        }),
        (
            "an unverified signature runs nothing of the revision and restarts the steps",
            || {
                let m = model(serde_json::json!({}), |st, _| {
                    st.stable_revision = Some("old".into());
                    st.rollout_rank = Some(past(4));
                    st.current_step = Some(1);
                    st.step_started_time = Some(Time(now()));
                });
                let p = plan_all_pools(
                    &m,
                    &[dev("d1", true, None)],
                    Err(("SignatureInvalid", "bad".into())),
                );
                assert_eq!(p.status.phase, Some(ModelPhase::Failed));
                assert_eq!(
                    (p.status.rollout_rank, p.status.current_step),
                    (Some(0), Some(0))
                );
            },
        ),
        ("percent steps count online candidates", || {
            let m = model(
                serde_json::json!({"steps": [{"percent": 50}, {"percent": 100}], "maxUnavailable": 8}),
                |_, _| {},
            );
            let names = by_rank();
            // Four of eight online: 50% is two of them.
            let devices: Vec<_> = names
                .iter()
                .enumerate()
                .map(|(i, n)| dev(n, i % 2 == 0, None))
                .collect();
            let p = run(&m, &devices);
            let online: Vec<String> = names
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == 0)
                .map(|(_, n)| n.clone())
                .collect();
            assert_eq!(on_current(&p, &online), 2);
        }),
        (
            "a gate failure with rollback says the revision waits for a spec change or a retry",
            || {
                let m = model(serde_json::json!({}), |st, _| {
                    st.stable_revision = Some("old".into());
                    st.rollout_rank = Some(past(1));
                });
                let rev = rev_of(&m);
                let names = by_rank();
                let p = run(
                    &m,
                    &[dev(
                        &names[0],
                        true,
                        Some((rev.as_str(), ModelState::Failed)),
                    )],
                );
                assert_eq!(p.status.failed_revision.as_deref(), Some(rev.as_str()));
                let degraded = p
                    .status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == edgefleet_crds::conditions::DEGRADED)
                    .unwrap();
                assert!(
                    degraded.message.contains("reported the revision Failed")
                        && degraded.message.contains("rolled back to revision old")
                        && degraded.message.contains("edgefleet.io/retry"),
                    "{}",
                    degraded.message
                );
            },
        ),
        (
            "a retry annotation rolls a failed revision out again from the first step, once",
            || {
                let mut m = model(serde_json::json!({}), |st, rev| {
                    st.stable_revision = Some("old".into());
                    st.failed_revision = Some(rev.to_owned());
                    st.current_step = Some(1);
                });
                m.metadata.annotations = Some(
                    [(
                        edgefleet_crds::model::RETRY_ANNOTATION.to_owned(),
                        "1".to_owned(),
                    )]
                    .into(),
                );
                let names = by_rank();
                let devices: Vec<_> = names
                    .iter()
                    .map(|n| dev(n, true, Some(("old", ModelState::Ready))))
                    .collect();
                let p = run(&m, &devices);
                assert_eq!(p.status.failed_revision, None);
                assert_eq!(p.status.last_retry.as_deref(), Some("1"));
                assert_eq!(p.status.current_step, Some(0));
                assert_eq!(p.status.phase, Some(ModelPhase::Progressing));
                assert!(has_event(&p, reasons::RETRYING));
                assert_eq!(on_current(&p, &names), 1, "the first step's canary again");
                // Failing again with the same annotation value: no second retry.
                let rev = rev_of(&m);
                let mut again = m.clone();
                let st = again.status.as_mut().unwrap();
                st.last_retry = Some("1".into());
                st.failed_revision = Some(rev.clone());
                let p = run(&again, &devices);
                assert_eq!(p.status.failed_revision.as_deref(), Some(rev.as_str()));
                assert_eq!(p.status.phase, Some(ModelPhase::Degraded));
                assert!(!has_event(&p, reasons::RETRYING));
            },
        ),
        (
            "a retry annotation set while nothing failed is recorded and retries nothing later",
            || {
                let mut m = model(serde_json::json!({}), |_, _| {});
                m.metadata.annotations = Some(
                    [(
                        edgefleet_crds::model::RETRY_ANNOTATION.to_owned(),
                        "x".to_owned(),
                    )]
                    .into(),
                );
                let names = by_rank();
                let devices: Vec<_> = names.iter().map(|n| dev(n, true, None)).collect();
                let p = run(&m, &devices);
                assert_eq!(p.status.last_retry.as_deref(), Some("x"));
                assert!(!has_event(&p, reasons::RETRYING));
            },
        ),
        (
            "without rollback a failed revision resumes once its devices are healthy again",
            || {
                let m = model(
                    serde_json::json!({"healthGates": {"rollbackOnFailure": false}, "maxUnavailable": 8,
                                       "steps": [{"count": 2}, {"percent": 100}]}),
                    |st, rev| {
                        st.stable_revision = Some("old".into());
                        st.failed_revision = Some(rev.to_owned());
                        st.rollout_rank = Some(past(2));
                        st.step_started_time = Some(ago(10_000));
                    },
                );
                let rev = rev_of(&m);
                let names = by_rank();
                let state = |first: ModelState| {
                    names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| match i {
                            0 => dev(n, true, Some((rev.as_str(), first))),
                            1 => dev(n, true, Some((rev.as_str(), ModelState::Ready))),
                            _ => dev(n, true, Some(("old", ModelState::Ready))),
                        })
                        .collect::<Vec<_>>()
                };
                // Still failed on one device: stays Degraded, where it is.
                let p = run(&m, &state(ModelState::Failed));
                assert_eq!(p.status.phase, Some(ModelPhase::Degraded));
                assert_eq!(p.status.failed_revision.as_deref(), Some(rev.as_str()));
                assert_eq!(p.status.rollout_rank, Some(past(2)));
                // Both ready again: resumes, and the step's clock starts again.
                let p = run(&m, &state(ModelState::Ready));
                assert_eq!(p.status.failed_revision, None);
                assert!(has_event(&p, reasons::RETRYING));
                assert_ne!(p.status.phase, Some(ModelPhase::Degraded));
            },
        ),
        (
            "with rate gates a failed revision resumes only on fresh statistics that pass",
            || {
                let m = model(
                    serde_json::json!({"healthGates": {"rollbackOnFailure": false, "maxErrorRatePercent": 5},
                                       "maxUnavailable": 8, "steps": [{"count": 2}, {"percent": 100}]}),
                    |st, rev| {
                        st.stable_revision = Some("old".into());
                        st.failed_revision = Some(rev.to_owned());
                        st.rollout_rank = Some(past(2));
                    },
                );
                let rev = rev_of(&m);
                let names = by_rank();
                let fleet = |requests: i64, errors: i64| {
                    names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| {
                            if i < 2 {
                                let d = dev(n, true, Some((rev.as_str(), ModelState::Ready)));
                                if requests > 0 {
                                    serving(d, 20.0, requests, errors)
                                } else {
                                    d
                                }
                            } else {
                                dev(n, true, Some(("old", ModelState::Ready)))
                            }
                        })
                        .collect::<Vec<_>>()
                };
                // Ready, but nothing to judge the rate on (a restarted agent): stays failed.
                let p = run(&m, &fleet(0, 0));
                assert_eq!(p.status.failed_revision.as_deref(), Some(rev.as_str()));
                // Under minRequests: still no evidence.
                let p = run(&m, &fleet(5, 0));
                assert_eq!(p.status.failed_revision.as_deref(), Some(rev.as_str()));
                // Enough requests, still erring: stays failed.
                let p = run(&m, &fleet(100, 50));
                assert_eq!(p.status.failed_revision.as_deref(), Some(rev.as_str()));
                assert!(!has_event(&p, reasons::RETRYING));
                // Enough requests within the gate: resumes.
                let p = run(&m, &fleet(100, 0));
                assert_eq!(p.status.failed_revision, None);
                assert!(has_event(&p, reasons::RETRYING));
            },
        ),
        (
            "devices of one kind answering a golden prompt differently fail the golden gate",
            || {
                let m = golden_model(true);
                let rev = rev_of(&m);
                let p = run(&m, &golden_fleet(&rev, ("x86_64", "a"), ("x86_64", "b")));
                let g = &p.status.golden_prompts;
                assert_eq!(g.len(), 1, "{g:?}");
                assert_eq!((g[0].distinct_answers, g[0].kinds.len()), (2, 1), "{g:?}");
                assert_eq!(g[0].kinds[0].devices, 2);
                assert!(has_event(&p, reasons::HEALTH_GATE_FAILED), "{:?}", p.events);
                assert!(
                    p.events.iter().any(|e| e.2.contains(
                        "golden prompt capital: 2 devices of one kind (x86_64 tpm) gave 2 different answers"
                    )),
                    "{:?}",
                    p.events
                );
                assert_eq!(p.status.failed_revision.as_deref(), Some(rev.as_str()));
            },
        ),
        (
            "without the golden gate a disagreement is shown, not judged; agreeing devices pass it",
            || {
                let m = golden_model(false);
                let rev = rev_of(&m);
                let p = run(&m, &golden_fleet(&rev, ("x86_64", "a"), ("x86_64", "b")));
                assert_eq!(p.status.golden_prompts[0].kinds[0].distinct_answers, 2);
                assert!(
                    !has_event(&p, reasons::HEALTH_GATE_FAILED),
                    "{:?}",
                    p.events
                );
                assert_eq!(p.status.failed_revision, None);
                // The gate on, and the two agree: it passes.
                let m = golden_model(true);
                let p = run(
                    &m,
                    &golden_fleet(&rev_of(&m), ("x86_64", "a"), ("x86_64", "a")),
                );
                assert_eq!(p.status.golden_prompts[0].distinct_answers, 1);
                assert!(
                    !has_event(&p, reasons::HEALTH_GATE_FAILED),
                    "{:?}",
                    p.events
                );
            },
        ),
        (
            "different kinds of hardware may answer differently under the golden gate",
            || {
                let m = golden_model(true);
                let rev = rev_of(&m);
                let p = run(&m, &golden_fleet(&rev, ("x86_64", "a"), ("aarch64", "b")));
                let g = &p.status.golden_prompts[0];
                assert_eq!(g.distinct_answers, 2, "{g:?}");
                assert_eq!(g.kinds.len(), 2, "{g:?}");
                assert!(g.kinds.iter().all(|k| k.distinct_answers == 1), "{g:?}");
                assert!(
                    !has_event(&p, reasons::HEALTH_GATE_FAILED),
                    "{:?}",
                    p.events
                );
                assert_eq!(p.status.failed_revision, None);
            },
        ),
    ]
}

#[test]
fn the_planner_decides_each_case_as_specified() {
    let cases = cases();
    assert!(cases.len() >= 25, "{} cases", cases.len());
    let mut failed = Vec::new();
    for (name, check) in cases {
        if std::panic::catch_unwind(check).is_err() {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}
