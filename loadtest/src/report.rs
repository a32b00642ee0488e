//! Turning [`Results`] into what people and programs read: a table per workload, a
//! Markdown summary for the README, JSON, and warnings about the measurement itself.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use crate::compare::Comparison;
use crate::engine::{Load, Results};
use crate::histogram::Histogram;

/// Above this share of one core the tool itself may be what limits the run.
const TOOL_CPU_WARN: f64 = 0.85;

/// One workload's run, as reported.
#[derive(Debug)]
pub struct Run {
    /// `A`..`D` or `custom`.
    pub name: String,
    /// What the workload shows, e.g. "latency under load".
    pub title: String,
    /// What exactly ran: sim settings, load shape, connections, times.
    pub description: String,
    /// What the engine measured.
    pub results: Results,
    /// Things the reader must know to trust the numbers (pinning, bottlenecks...).
    pub notes: Vec<String>,
    /// The server configuration's name (`--name`, `--vs-name`), when the run is one of
    /// several rounds or configurations; `None` for a lone run.
    pub config: Option<String>,
    /// Which of the configuration's rounds (from 1), likewise.
    pub round: Option<u32>,
}

impl Run {
    /// ` [base, round 2]` for one of several runs of a workload, else empty.
    pub fn tag(&self) -> String {
        match (&self.config, self.round) {
            (Some(c), Some(r)) => format!(" [{c}, round {r}]"),
            (Some(c), None) => format!(" [{c}]"),
            (None, Some(r)) => format!(" [round {r}]"),
            (None, None) => String::new(),
        }
    }
}

/// Figures derived from the raw results.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Derived {
    /// Completed answers per second.
    pub(crate) answers_per_sec: f64,
    /// Token events per second.
    pub(crate) tokens_per_sec: f64,
    /// Server CPU as a share of one core.
    pub(crate) server_cpu_share: Option<f64>,
    /// Server CPU time per token event, in microseconds.
    pub(crate) server_us_per_token: Option<f64>,
    /// Server CPU time per completed answer, in microseconds: with a new connection per
    /// answer it includes the connection's setup (a TLS handshake).
    pub(crate) server_us_per_answer: Option<f64>,
    /// Tool CPU as a share of one core.
    pub(crate) tool_cpu_share: Option<f64>,
    /// Server memory growth under load per open answer, in bytes.
    pub(crate) rss_per_answer: Option<f64>,
}

impl Derived {
    /// Computes the derived figures of `r`.
    pub(crate) fn of(r: &Results) -> Derived {
        let secs = r.window.as_secs_f64().max(1e-9);
        let share = |d: Duration| d.as_secs_f64() / secs;
        let peak = r.server.peak_rss.or(r.server.sampled_peak_rss);
        Derived {
            answers_per_sec: r.completed as f64 / secs,
            tokens_per_sec: r.token_events as f64 / secs,
            server_cpu_share: r.server.cpu.map(share),
            server_us_per_token: r
                .server
                .cpu
                .filter(|_| r.token_events > 0)
                .map(|c| c.as_secs_f64() * 1e6 / r.token_events as f64),
            server_us_per_answer: r
                .server
                .cpu
                .filter(|_| r.completed > 0)
                .map(|c| c.as_secs_f64() * 1e6 / r.completed as f64),
            tool_cpu_share: r.tool_cpu.map(share),
            rss_per_answer: peak
                .zip(r.server.idle_rss)
                .filter(|_| r.peak_in_flight > 0)
                .map(|(p, i)| p.saturating_sub(i) as f64 / r.peak_in_flight as f64),
        }
    }
}

/// Warnings about the trustworthiness of a run's numbers.
pub(crate) fn warnings(r: &Results) -> Vec<String> {
    let d = Derived::of(r);
    let mut w = Vec::new();
    if let Some(share) = d.tool_cpu_share
        && share > TOOL_CPU_WARN
    {
        w.push(format!(
            "load tool may be the bottleneck: it used {:.0}% of its core; latencies include its queueing",
            share * 100.0
        ));
    }
    if r.hit_stream_cap {
        w.push(format!(
            "stopped early: --max-streams-total ({}) asks were started",
            r.settings.max_streams_total
        ));
    }
    if r.completed == 0 {
        w.push("no answer completed in the measured window".into());
    }
    if let Some(lag) = r.send_lag.quantile(0.99)
        && lag > 1_000_000
    {
        w.push(format!(
            "the tool sent late: p99 send lag {} after the scheduled arrival (see 'from arrival')",
            fmt_ns(lag)
        ));
    }
    let warm: u64 = r.warmup_errors.values().sum();
    if warm > 0 {
        w.push(format!(
            "{warm} errors during the warm-up (not counted above)"
        ));
    }
    w
}

/// The human table of one run.
pub fn table(run: &Run) -> String {
    let r = &run.results;
    let d = Derived::of(r);
    let mut out = String::new();
    let _ = writeln!(out, "\n== {}: {}{}", run.name, run.title, run.tag());
    let _ = writeln!(out, "   {}", run.description);
    let _ = writeln!(
        out,
        "{:<22}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}",
        "", "p50", "p90", "p99", "p99.9", "max", "count"
    );
    let mut row = |name: &str, h: &Histogram| {
        if h.count() == 0 {
            return;
        }
        let q = |p: f64| fmt_ns_opt(h.quantile(p));
        let _ = writeln!(
            out,
            "{name:<22}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}",
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            fmt_ns_opt(h.max()),
            h.count()
        );
    };
    row("TTFT", &r.ttft);
    if matches!(r.settings.load, Load::Open { .. }) {
        row("TTFT from arrival", &r.ttft_from_arrival);
        row("send lag (tool)", &r.send_lag);
    }
    row("inter-token gap", &r.gap);
    row("total", &r.total);
    row("connect", &r.connect);
    let tokens = match r.tokens_per_answer {
        Some((lo, hi)) if lo == hi => format!("{lo} per answer"),
        Some((lo, hi)) => format!("{lo}..{hi} per answer"),
        None => "-".into(),
    };
    let _ = writeln!(
        out,
        "answers     {} ({:.1}/s)   token events {} ({:.0}/s, {tokens})   peak open {}   cut at end {}",
        r.completed,
        d.answers_per_sec,
        r.token_events,
        d.tokens_per_sec,
        r.peak_in_flight,
        r.cut_at_end
    );
    let mut server = String::new();
    if let (Some(cpu), Some(share)) = (r.server.cpu, d.server_cpu_share) {
        let _ = write!(
            server,
            "CPU {:.2} s ({:.1}% of a core)",
            cpu.as_secs_f64(),
            share * 100.0
        );
        if let Some(us) = d.server_us_per_token {
            let _ = write!(server, " = {us:.2} µs per token event");
        }
        if let Some(us) = d.server_us_per_answer {
            let _ = write!(server, ", {us:.1} µs per answer");
        }
    }
    if let Some(peak) = r.server.peak_rss {
        let _ = write!(
            server,
            "   RSS idle {} peak {}",
            fmt_bytes_opt(r.server.idle_rss),
            fmt_bytes(peak as f64)
        );
        if let Some(per) = d.rss_per_answer {
            let _ = write!(server, " = {} per open answer", fmt_bytes(per));
        }
    }
    if server.is_empty() {
        server = "not measured (no --server-pid or --spawn)".into();
    }
    let _ = writeln!(out, "server      {server}");
    if let (Some(cpu), Some(share)) = (r.tool_cpu, d.tool_cpu_share) {
        let _ = writeln!(
            out,
            "load tool   CPU {:.2} s ({:.1}% of a core)",
            cpu.as_secs_f64(),
            share * 100.0
        );
    }
    if r.errors.is_empty() {
        let _ = writeln!(out, "errors      none");
    } else {
        let _ = writeln!(out, "errors      {}", r.error_count());
        for (kind, n) in &r.errors {
            let _ = writeln!(out, "  {n:>8}  {kind}");
        }
    }
    for note in &run.notes {
        let _ = writeln!(out, "note: {note}");
    }
    for warning in warnings(r) {
        let _ = writeln!(out, "WARNING: {warning}");
    }
    out
}

/// The Markdown table of several runs, one row each, as the README shows it.
pub fn summary(runs: &[Run]) -> String {
    let mut out = String::from(
        "| workload | TTFT p50 | p90 | p99 | p99.9 | max | gap p50 | gap p99 | answers/s | token events/s | server CPU | µs CPU/token | peak RSS | RSS/answer | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for run in runs {
        let r = &run.results;
        let d = Derived::of(r);
        let q = |h: &Histogram, p: f64| fmt_ns_opt(h.quantile(p));
        let _ = writeln!(
            out,
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
            run.name,
            run.tag(),
            q(&r.ttft, 0.5),
            q(&r.ttft, 0.9),
            q(&r.ttft, 0.99),
            q(&r.ttft, 0.999),
            fmt_ns_opt(r.ttft.max()),
            q(&r.gap, 0.5),
            q(&r.gap, 0.99),
            d.answers_per_sec,
            d.tokens_per_sec,
            d.server_cpu_share
                .map_or("-".into(), |s| format!("{:.0}%", s * 100.0)),
            d.server_us_per_token
                .map_or("-".into(), |u| format!("{u:.1}")),
            fmt_bytes_opt(r.server.peak_rss),
            d.rss_per_answer.map_or("-".into(), fmt_bytes),
            r.error_count(),
        );
    }
    out
}

/// Everything, machine-readable. Times are in milliseconds, memory in bytes. A run that is
/// one of several has `config` and `round`; `comparisons` (one per workload, see
/// [`Comparison::json`]) appear when there are any.
pub fn json(
    runs: &[Run],
    comparisons: &[Comparison],
    command: &[String],
    cpus: Option<usize>,
) -> Value {
    let runs: Vec<Value> = runs
        .iter()
        .map(|run| {
            let r = &run.results;
            let d = Derived::of(r);
            let s = &r.settings;
            let load = match s.load {
                Load::Closed { concurrency } => json!({ "kind": "closed", "concurrency": concurrency }),
                Load::Open { rate, max_in_flight } => {
                    json!({ "kind": "open", "rate": rate, "max_in_flight": max_in_flight })
                }
            };
            let mut value = json!({
                "workload": run.name,
                "title": run.title,
                "description": run.description,
                "settings": {
                    "target": s.addr.to_string(),
                    "path": s.path,
                    "load": load,
                    "duration_s": s.duration.as_secs_f64(),
                    "warmup_s": s.warmup.as_secs_f64(),
                    "ramp_s": s.ramp.as_secs_f64(),
                    "users": s.users,
                    "keep_alive": s.keep_alive,
                    "stream_timeout_s": s.stream_timeout.as_secs_f64(),
                    "expect_tokens": s.expect_tokens,
                },
                "window_s": r.window.as_secs_f64(),
                "ttft_ms": percentiles(&r.ttft),
                "ttft_from_arrival_ms": percentiles(&r.ttft_from_arrival),
                "send_lag_ms": percentiles(&r.send_lag),
                "gap_ms": percentiles(&r.gap),
                "total_ms": percentiles(&r.total),
                "connect_ms": percentiles(&r.connect),
                "answers": r.completed,
                "answers_per_s": d.answers_per_sec,
                "started": r.started,
                "token_events": r.token_events,
                "token_events_per_s": d.tokens_per_sec,
                "tokens_per_answer": r.tokens_per_answer.map(|(lo, hi)| json!({ "min": lo, "max": hi })),
                "peak_in_flight": r.peak_in_flight,
                "cut_at_end": r.cut_at_end,
                "errors": r.errors,
                "error_count": r.error_count(),
                "warmup_errors": r.warmup_errors,
                "server": {
                    "cpu_s": r.server.cpu.map(|c| c.as_secs_f64()),
                    "cpu_share_of_core": d.server_cpu_share,
                    "cpu_us_per_token_event": d.server_us_per_token,
                    "cpu_us_per_answer": d.server_us_per_answer,
                    "idle_rss_bytes": r.server.idle_rss,
                    "peak_rss_bytes": r.server.peak_rss,
                    "sampled_peak_rss_bytes": r.server.sampled_peak_rss,
                    "rss_per_open_answer_bytes": d.rss_per_answer,
                },
                "tool": {
                    "cpu_s": r.tool_cpu.map(|c| c.as_secs_f64()),
                    "cpu_share_of_core": d.tool_cpu_share,
                },
                "notes": run.notes,
                "warnings": warnings(r),
            });
            if let Some(config) = &run.config {
                value["config"] = json!(config);
            }
            if let Some(round) = run.round {
                value["round"] = json!(round);
            }
            value
        })
        .collect();
    let mut all = json!({
        "tool": "askstream loadtest",
        "version": env!("CARGO_PKG_VERSION"),
        "command": command,
        "cpus": cpus,
        "runs": runs,
    });
    if !comparisons.is_empty() {
        all["comparisons"] = comparisons.iter().map(Comparison::json).collect();
    }
    all
}

/// A histogram's summary in milliseconds, or null when it is empty.
fn percentiles(h: &Histogram) -> Value {
    if h.count() == 0 {
        return Value::Null;
    }
    let ms = |ns: Option<u64>| ns.map(|v| v as f64 / 1e6);
    json!({
        "count": h.count(),
        "min": ms(h.min()),
        "mean": h.mean().map(|m| m / 1e6),
        "p50": ms(h.quantile(0.5)),
        "p90": ms(h.quantile(0.9)),
        "p99": ms(h.quantile(0.99)),
        "p99_9": ms(h.quantile(0.999)),
        "max": ms(h.max()),
    })
}

/// A duration in nanoseconds: milliseconds with three decimals (the contract's unit), with
/// microseconds below 10 µs and seconds from 10 s, where three decimals of ms mislead.
pub(crate) fn fmt_ns(ns: u64) -> String {
    let v = ns as f64;
    if v < 1e4 {
        format!("{:.2}µs", v / 1e3)
    } else if v < 1e10 {
        format!("{:.3}ms", v / 1e6)
    } else {
        format!("{:.2}s", v / 1e9)
    }
}

fn fmt_ns_opt(ns: Option<u64>) -> String {
    ns.map_or("-".into(), fmt_ns)
}

/// Bytes as KiB/MiB (powers of 1024, like `ps`), labelled as such.
pub(crate) fn fmt_bytes(b: f64) -> String {
    if b < 1024.0 {
        format!("{b:.0} B")
    } else if b < 1024.0 * 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    }
}

fn fmt_bytes_opt(b: Option<u64>) -> String {
    b.map_or("-".into(), |b| fmt_bytes(b as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(fmt_ns(850), "0.85µs");
        assert_eq!(fmt_ns(412_000), "0.412ms");
        assert_eq!(fmt_ns(2_103_000), "2.103ms");
        assert_eq!(fmt_ns(3_000_000_000), "3000.000ms");
        assert_eq!(fmt_ns(12_500_000_000), "12.50s");
        assert_eq!(fmt_bytes(10.0 * 1024.0), "10.0 KiB");
        assert_eq!(fmt_bytes(3.5 * 1024.0 * 1024.0), "3.5 MiB");
    }
}
