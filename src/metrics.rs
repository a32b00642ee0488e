//! Counters and histograms for `GET /metrics`, rendered as Prometheus text.
//!
//! Everything is a relaxed atomic, updated once per ask (never per token: an answer adds
//! its token count when it finishes), so the hot path pays nothing measurable and no lock
//! is ever taken. Rendering reads the atomics without stopping writers; a scrape may see
//! one ask half-recorded, which Prometheus tolerates.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::answer::Outcome;
use crate::error::ErrorCode;

/// Every error code, in the order their counters are kept.
const CODES: [ErrorCode; ErrorCode::ALL.len()] = ErrorCode::ALL;

/// A code's counter: `ALL` is in declaration order (a test in `error.rs` holds it there).
fn code_index(code: ErrorCode) -> usize {
    code as usize
}

/// Upper bounds of the latency buckets, in seconds: 100 µs to 30 s.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 30.0,
];

/// A fixed-bucket latency histogram of atomics.
#[derive(Default)]
pub(crate) struct Histogram {
    /// Cumulative-at-render counts per bucket; the last slot is `+Inf`.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Observations so far.
    #[cfg(test)]
    fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub(crate) fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// The server's metrics. One per [`crate::AskService`], shared by all its clones.
#[derive(Default)]
pub(crate) struct Metrics {
    done: AtomicU64,
    disconnected: AtomicU64,
    /// Answers that started and then failed, by code.
    failed: [AtomicU64; CODES.len()],
    /// Asks refused before an answer started, by code (quota, validation, overload...).
    rejected: [AtomicU64; CODES.len()],
    tokens: AtomicU64,
    refunds: AtomicU64,
    /// Request received → first frame yielded to hyper.
    ttft: Histogram,
    /// Body dropped by hyper → the answer noticed and stopped.
    disconnect_lag: Histogram,
}

impl Metrics {
    /// An ask was refused before its answer started.
    pub(crate) fn rejected(&self, code: ErrorCode) {
        self.rejected[code_index(code)].fetch_add(1, Relaxed);
    }

    /// An answer ended. `tokens`: token events sent; `ttft`: request received → first
    /// event yielded, when one was; `disconnect_lag`: body dropped → answer stopped.
    pub(crate) fn finished(
        &self,
        outcome: &Outcome,
        tokens: u32,
        ttft: Option<Duration>,
        disconnect_lag: Option<Duration>,
    ) {
        self.tokens.fetch_add(u64::from(tokens), Relaxed);
        let counter = match outcome {
            Outcome::Delivered => &self.done,
            Outcome::Disconnected => &self.disconnected,
            Outcome::Failed(e) => &self.failed[code_index(e.code)],
        };
        counter.fetch_add(1, Relaxed);
        if outcome.refunds() {
            self.refunds.fetch_add(1, Relaxed);
        }
        if let Some(t) = ttft {
            self.ttft.observe(t);
        }
        if let Some(lag) = disconnect_lag {
            self.disconnect_lag.observe(lag);
        }
    }

    /// The Prometheus text exposition (format version 0.0.4). `active` is the number of
    /// answers in flight, which the `--max-streams` semaphore already counts.
    pub(crate) fn render(&self, active: u64) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP askstream_asks_total Asks by outcome: answers done, disconnected or failed (by code), and asks rejected before answering (by code).\n# TYPE askstream_asks_total counter\n");
        let _ = writeln!(
            out,
            "askstream_asks_total{{outcome=\"done\"}} {}",
            self.done.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "askstream_asks_total{{outcome=\"disconnected\"}} {}",
            self.disconnected.load(Relaxed)
        );
        for (i, code) in CODES.iter().enumerate() {
            let n = self.failed[i].load(Relaxed);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "askstream_asks_total{{outcome=\"error\",code=\"{code}\"}} {n}"
                );
            }
        }
        let quota = self.rejected[code_index(ErrorCode::QuotaExceeded)].load(Relaxed);
        let _ = writeln!(
            out,
            "askstream_asks_total{{outcome=\"quota_exceeded\"}} {quota}"
        );
        for (i, code) in CODES.iter().enumerate() {
            let n = self.rejected[i].load(Relaxed);
            if n > 0 && *code != ErrorCode::QuotaExceeded {
                let _ = writeln!(
                    out,
                    "askstream_asks_total{{outcome=\"rejected\",code=\"{code}\"}} {n}"
                );
            }
        }
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "askstream_active_streams",
            "gauge",
            "Answers in flight.",
            active,
        );
        gauge(
            &mut out,
            "askstream_tokens_streamed_total",
            "counter",
            "Token events of finished answers.",
            self.tokens.load(Relaxed),
        );
        gauge(
            &mut out,
            "askstream_refunds_total",
            "counter",
            "Asks refunded because the answer was not delivered.",
            self.refunds.load(Relaxed),
        );
        gauge(
            &mut out,
            "askstream_disconnects_total",
            "counter",
            "Answers ended by the client leaving.",
            self.disconnected.load(Relaxed),
        );
        gauge(
            &mut out,
            "askstream_quota_rejections_total",
            "counter",
            "Asks refused with QUOTA_EXCEEDED.",
            quota,
        );
        self.ttft.render(&mut out, "askstream_ttft_seconds", "Server-side time to first token: request received to the first token event handed to the connection.");
        self.disconnect_lag.render(
            &mut out,
            "askstream_disconnect_detection_seconds",
            "Time from the client being seen to leave (its connection hung up, or dropped the answer's body) to the answer stopping.",
        );
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(100));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.001\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"30\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn outcomes_land_in_their_series() {
        let m = Metrics::default();
        m.finished(
            &Outcome::Delivered,
            64,
            Some(Duration::from_micros(300)),
            None,
        );
        m.finished(
            &Outcome::Disconnected,
            5,
            None,
            Some(Duration::from_micros(20)),
        );
        let slow = crate::error::ApiError::new(ErrorCode::SlowClient, "slow");
        m.finished(&Outcome::Failed(slow), 0, None, None);
        m.rejected(ErrorCode::QuotaExceeded);
        m.rejected(ErrorCode::BadRequest);
        let text = m.render(0);
        for line in [
            "askstream_asks_total{outcome=\"done\"} 1",
            "askstream_asks_total{outcome=\"disconnected\"} 1",
            "askstream_asks_total{outcome=\"error\",code=\"SLOW_CLIENT\"} 1",
            "askstream_asks_total{outcome=\"quota_exceeded\"} 1",
            "askstream_asks_total{outcome=\"rejected\",code=\"BAD_REQUEST\"} 1",
            "askstream_active_streams 0",
            "askstream_tokens_streamed_total 69",
            "askstream_refunds_total 2",
            "askstream_disconnects_total 1",
            "askstream_quota_rejections_total 1",
            "askstream_ttft_seconds_count 1",
            "askstream_disconnect_detection_seconds_count 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line is `name{labels} value` with a numeric value.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let value = l.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }
}
