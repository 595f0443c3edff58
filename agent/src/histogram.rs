//! A fixed-bucket histogram of seconds (or any unit) for the agent's Prometheus
//! metrics: lock-free counters per bucket, with the sum and count, rendered in the text
//! exposition format, and quantiles estimated as Prometheus's `histogram_quantile`
//! does (linear within the bucket).

use std::sync::atomic::{AtomicU64, Ordering};

/// Bucket upper bounds for request latencies and times to first token, in seconds.
/// From 50 ms to 10 s each bound is at most 1.5 times the one below it, so a quantile
/// estimated within its bucket is within a factor of 1.5 of the true value there (the
/// health gates judge these estimates).
pub const LATENCY_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0,
    5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// Bucket upper bounds for generation speeds, in tokens per second.
pub const TOKENS_PER_SECOND: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// Observations in buckets (`le` bounds, cumulative when rendered), their sum and count.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bound, then one for `+Inf`: observations in that bucket alone.
    buckets: Vec<AtomicU64>,
    /// The sum, in millionths of the unit.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (increasing).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records `value` (negative or not a number counts as 0).
    pub fn observe(&self, value: f64) {
        let v = if value.is_finite() && value > 0.0 {
            value
        } else {
            0.0
        };
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add((v * 1e6).min(u64::MAX as f64) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Forgets every observation.
    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
        self.sum_micros.store(0, Ordering::Relaxed);
        self.count.store(0, Ordering::Relaxed);
    }

    /// The `q` quantile (0–1), linear within its bucket; `None` without observations.
    /// Above the last bound it is the last bound (as Prometheus answers).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, n) in counts.iter().enumerate() {
            if (below + n) as f64 >= rank && *n > 0 {
                let Some(upper) = self.bounds.get(i) else {
                    return self.bounds.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
                let within = (rank - below as f64) / *n as f64;
                return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
            }
            below += n;
        }
        self.bounds.last().copied()
    }

    /// The Prometheus text of this histogram as `name`, with `labels` (`key="value"`
    /// pairs, already escaped) on every sample.
    pub fn render(&self, name: &str, help: &str, labels: &str) -> String {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut out = format!("# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut cumulative = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |v| v.to_string());
            out.push_str(&format!(
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}\n"
            ));
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        out.push_str(&format!(
            "{name}_sum{braces} {:.6}\n{name}_count{braces} {}\n",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            self.count.load(Ordering::Relaxed)
        ));
        out
    }
}

/// `value` as a Prometheus label value: `\`, `"` and newlines escaped.
pub fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets_and_render_cumulatively() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0, f64::NAN, -1.0] {
            h.observe(v);
        }
        let text = h.render("x_seconds", "X.", "model=\"m\"");
        assert!(text.contains("# TYPE x_seconds histogram\n"), "{text}");
        // NaN and -1 count as 0: in the first bucket.
        assert!(
            text.contains("x_seconds_bucket{model=\"m\",le=\"0.1\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{model=\"m\",le=\"1\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{model=\"m\",le=\"+Inf\"} 6\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_sum{model=\"m\"} 3.650000\n"),
            "{text}"
        );
        assert!(text.contains("x_seconds_count{model=\"m\"} 6\n"), "{text}");
        h.reset();
        assert_eq!(h.count(), 0);
        assert_eq!(h.quantile(0.5), None);
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let h = Histogram::new(&[1.0, 2.0, 4.0]);
        for _ in 0..50 {
            h.observe(0.5);
        }
        for _ in 0..50 {
            h.observe(3.0);
        }
        // Half the observations at or under 1: the median is the first bucket's top.
        assert_eq!(h.quantile(0.5), Some(1.0));
        // The 95th: 45 of the 50 in (2, 4].
        let p95 = h.quantile(0.95).unwrap();
        assert!((p95 - 3.8).abs() < 1e-9, "{p95}");
        // Beyond the last bound: the last bound.
        h.observe(100.0);
        assert_eq!(h.quantile(1.0), Some(4.0));
    }

    #[test]
    fn latency_buckets_are_fine_enough_for_the_gates() {
        assert!(LATENCY_SECONDS.windows(2).all(|w| w[0] < w[1]));
        for w in LATENCY_SECONDS.windows(2) {
            if w[0] >= 0.05 && w[1] <= 10.0 {
                assert!(w[1] / w[0] <= 1.5 + 1e-9, "{} -> {}", w[0], w[1]);
            }
        }
        // A TTFT p95 of 300 ms is estimated within (0.2, 0.3], not as 0.49 s.
        let h = Histogram::new(LATENCY_SECONDS);
        for _ in 0..100 {
            h.observe(0.3);
        }
        let p95 = h.quantile(0.95).unwrap();
        assert!(p95 > 0.2 && p95 <= 0.3, "{p95}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
