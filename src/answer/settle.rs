//! How an answer ended, and the one place that acts on it: the charge settled or
//! refunded, the `--max-streams` permit released, one log line, the metrics.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use super::Ask;
use super::drive::Stats;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::quota::Charge;
use crate::sse::body::Probe;

/// How an answer ended: the one vocabulary of the driver, the log line and the metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The client was handed the whole answer: the charge stands.
    Delivered,
    /// The client went away first: refunded.
    Disconnected,
    /// The answer failed with this error (which the client got, if it was still there):
    /// refunded.
    Failed(ApiError),
}

impl Outcome {
    /// The outcome as the log line and `/metrics` name it.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Outcome::Delivered => "done",
            Outcome::Disconnected => "disconnected",
            Outcome::Failed(e) => e.code.as_str(),
        }
    }

    /// Whether the charge is given back: every outcome but delivery.
    pub(crate) fn refunds(&self) -> bool {
        !matches!(self, Outcome::Delivered)
    }
}

/// How an answer is delivered, as its log line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Stream,
    Json,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Stream => "stream",
            Mode::Json => "json",
        }
    }
}

/// An admitted answer's obligations: its charge, its `--max-streams` permit, and its log
/// line. [`finish`](Settlement::finish) settles the charge for a delivered answer and
/// refunds it otherwise; dropping an unfinished settlement (a future dropped by hyper, a
/// panic outside the pipeline) refunds and logs a disconnect. Either way, exactly once.
pub(crate) struct Settlement {
    mode: Mode,
    pub(super) ask: Ask,
    pub(super) stats: Stats,
    charge: Option<Charge>,
    /// Held only so the answer counts against `--max-streams` until it is settled.
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
    /// The response body's timestamps (streaming answers): first frame, early drop.
    pub(super) probe: Option<Probe>,
}

impl Settlement {
    pub(super) fn new(
        metrics: &Arc<Metrics>,
        mode: Mode,
        ask: Ask,
        charge: Charge,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        Settlement {
            mode,
            ask,
            stats: Stats::default(),
            charge: Some(charge),
            _permit: permit,
            metrics: metrics.clone(),
            probe: None,
        }
    }

    /// The caller's remaining quota after this ask, for the `done` event.
    pub(super) fn remaining(&self) -> u32 {
        self.charge.as_ref().map_or(0, Charge::remaining)
    }

    /// Settles or refunds, logs and counts the answer.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.settle(outcome);
    }

    fn settle(&mut self, outcome: Outcome) {
        let Some(charge) = self.charge.take() else {
            return;
        };
        let refunded = outcome.refunds();
        if refunded {
            charge.refund();
        } else {
            charge.settle();
        }
        let ttft_ms = self.stats.first_token.map(|t| ms(t - self.ask.received));
        tracing::info!(
            query_id = %self.ask.id,
            user = %self.ask.user,
            mode = self.mode.as_str(),
            outcome = outcome.as_str(),
            ttft_ms,
            tokens = self.stats.tokens,
            refunded,
            "ask finished"
        );
        let probe = self.probe.as_ref();
        // An answer that failed before its first token has no time to first token, even
        // if its error event went out.
        let ttft = probe
            .filter(|_| self.stats.tokens > 0)
            .and_then(Probe::first_frame_at)
            .map(|t| t - self.ask.received);
        let disconnect_lag = match outcome {
            Outcome::Disconnected => probe.and_then(Probe::lost_at).map(|t| t.elapsed()),
            _ => None,
        };
        self.metrics
            .finished(&outcome, self.stats.tokens, ttft, disconnect_lag);
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.settle(Outcome::Disconnected);
    }
}

/// Milliseconds with 0.1 ms resolution, as the `timing` field and the log line show them.
pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn only_delivery_keeps_the_charge() {
        assert!(!Outcome::Delivered.refunds());
        assert!(Outcome::Disconnected.refunds());
        let failed = Outcome::Failed(ApiError::new(ErrorCode::SlowClient, "slow"));
        assert!(failed.refunds());
        assert_eq!(failed.as_str(), "SLOW_CLIENT");
        assert_eq!(Outcome::Delivered.as_str(), "done");
    }

    #[test]
    fn milliseconds_keep_one_decimal() {
        assert_eq!(ms(Duration::from_micros(1234)), 1.2);
        assert_eq!(ms(Duration::from_micros(1250)), 1.3);
    }
}
