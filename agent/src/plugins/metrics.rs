//! Plugin call counters and timings, rendered for `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Calls and microseconds, by (plugin, hook).
type CallCounts = BTreeMap<(String, &'static str), (u64, u64)>;

/// Plugin call counters and timings, for `/metrics`.
#[derive(Debug, Default)]
pub struct PluginMetrics {
    calls: Mutex<CallCounts>,
    failures: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl PluginMetrics {
    pub(super) fn record_call(&self, plugin: &str, hook: &'static str, elapsed: Duration) {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let e = calls.entry((plugin.to_owned(), hook)).or_default();
        e.0 += 1;
        e.1 += elapsed.as_micros() as u64;
    }

    pub(super) fn record_failure(&self, plugin: &str, reason: &'static str) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        *f.entry((plugin.to_owned(), reason)).or_default() += 1;
    }

    /// Failures of `plugin` for `reason` so far.
    pub fn failures(&self, plugin: &str, reason: &str) -> u64 {
        let f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.iter()
            .filter(|((p, r), _)| p == plugin && *r == reason)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Prometheus text exposition of the counters, one family at a time.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = String::from(
            "# HELP edgefleet_plugin_calls_total Calls into plugin hooks.\n\
             # TYPE edgefleet_plugin_calls_total counter\n",
        );
        for ((plugin, hook), (n, _)) in &calls {
            let _ = writeln!(
                out,
                "edgefleet_plugin_calls_total{{plugin=\"{plugin}\",hook=\"{hook}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP edgefleet_plugin_call_seconds_total Time spent in plugin hooks, including instantiation.\n\
             # TYPE edgefleet_plugin_call_seconds_total counter\n",
        );
        for ((plugin, hook), (_, micros)) in &calls {
            let _ = writeln!(
                out,
                "edgefleet_plugin_call_seconds_total{{plugin=\"{plugin}\",hook=\"{hook}\"}} {:.6}",
                *micros as f64 / 1e6
            );
        }
        out.push_str(
            "# HELP edgefleet_plugin_failures_total Plugin refusals and failures, by reason.\n\
             # TYPE edgefleet_plugin_failures_total counter\n",
        );
        for ((plugin, reason), n) in &failures {
            let _ = writeln!(
                out,
                "edgefleet_plugin_failures_total{{plugin=\"{plugin}\",reason=\"{reason}\"}} {n}"
            );
        }
        out
    }
}
