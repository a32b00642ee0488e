//! Two server configurations side by side (`--vs-arg`, `--vs-bin`), or one repeated
//! (`--rounds`): the order of the rounds, and each workload's figures over them, as a table
//! and as JSON.
//!
//! A workload's rounds are interleaved (A, B, A, B, ...), each against a freshly started
//! server, so that whatever drifts on the machine during a session (a neighbour's build,
//! thermal throttling, the page cache) hits both configurations alike. Each figure is then
//! shown as every configuration's median over its rounds, B's median over A's, and every
//! round's value, so the spread is in view next to the ratio.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::{Map, Value, json};

use crate::report::{Derived, Run};

/// A server configuration: how its servers are started, and its name in reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Its label (`--name`, `--vs-name`, `floor`).
    pub name: String,
    /// The server binary the tool spawns; `None` for a `--target` it did not start.
    pub binary: Option<PathBuf>,
    /// What the binary is, which decides how it is started.
    pub kind: ServerKind,
    /// Flags after the standard ones (`--server-arg`, `--vs-arg`).
    pub server_args: Vec<String>,
    /// Spoken to over TLS (`--tls`, `--vs-tls`).
    pub tls: bool,
}

/// The servers the tool knows how to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// askstream: flags, `/healthz`, SIGTERM drains.
    Askstream,
    /// The floor (`../shared/floor`, a server with no HTTP library): settings in the
    /// environment, no health route, SIGTERM kills.
    Floor,
}

impl Config {
    /// Gives its servers `cert` and `key`, unless its flags name a certificate already.
    pub fn give_certificate(&mut self, cert: &std::path::Path, key: &std::path::Path) {
        let named = self.server_args.iter().any(|a| a.starts_with("--tls-cert"));
        if !named {
            self.server_args.extend([
                "--tls-cert".into(),
                cert.display().to_string(),
                "--tls-key".into(),
                key.display().to_string(),
            ]);
        }
    }

    /// The command line as reports show it, e.g. `askstream --sim-tokens 32` (the standard
    /// flags left out), or `the --target server`.
    pub fn describe(&self) -> String {
        let Some(binary) = &self.binary else {
            return "the --target server".into();
        };
        if self.kind == ServerKind::Floor {
            return format!("{} (the floor: no HTTP library)", binary.display());
        }
        let mut line = binary.display().to_string();
        for arg in &self.server_args {
            line.push(' ');
            line.push_str(arg);
        }
        line
    }
}

/// The order in which `rounds` rounds of `configs` configurations run, as (configuration
/// index, round from 1): interleaved, `(0, 1), (1, 1), (0, 2), (1, 2), ...`.
pub fn schedule(configs: usize, rounds: u32) -> Vec<(usize, u32)> {
    (1..=rounds)
        .flat_map(|round| (0..configs).map(move |c| (c, round)))
        .collect()
}

/// The median of the values present (the mean of the middle two for an even count), or
/// `None` when there are none.
pub fn median(values: &[Option<f64>]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().flatten().copied().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// `b / a`, or `None` when either is missing or `a` is zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if a != 0.0 => Some(b / a),
        _ => None,
    }
}

/// A ratio as the table shows it: two decimals.
fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}"))
}

/// What a figure counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    /// A latency in nanoseconds (shown in µs, ms or s; JSON in ms).
    Nanos,
    /// Microseconds.
    Micros,
    /// Per second.
    PerSec,
    /// Bytes (shown in B, KiB or MiB).
    Bytes,
    /// A plain count.
    Count,
}

/// The figures a comparison has a row for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Figure {
    TtftP50,
    TtftP99,
    CpuPerToken,
    CpuPerAnswer,
    TokensPerSec,
    RssPerAnswer,
    Errors,
}

const FIGURES: [Figure; 7] = [
    Figure::TtftP50,
    Figure::TtftP99,
    Figure::CpuPerToken,
    Figure::CpuPerAnswer,
    Figure::TokensPerSec,
    Figure::RssPerAnswer,
    Figure::Errors,
];

impl Figure {
    fn label(self) -> &'static str {
        match self {
            Figure::TtftP50 => "TTFT p50",
            Figure::TtftP99 => "TTFT p99",
            Figure::CpuPerToken => "server µs CPU/token",
            Figure::CpuPerAnswer => "server µs CPU/answer",
            Figure::TokensPerSec => "token events/s",
            Figure::RssPerAnswer => "RSS per open answer",
            Figure::Errors => "errors",
        }
    }

    /// Its key in the JSON, with the JSON's unit.
    fn key(self) -> &'static str {
        match self {
            Figure::TtftP50 => "ttft_p50_ms",
            Figure::TtftP99 => "ttft_p99_ms",
            Figure::CpuPerToken => "server_cpu_us_per_token_event",
            Figure::CpuPerAnswer => "server_cpu_us_per_answer",
            Figure::TokensPerSec => "token_events_per_s",
            Figure::RssPerAnswer => "rss_per_open_answer_bytes",
            Figure::Errors => "errors",
        }
    }

    fn unit(self) -> Unit {
        match self {
            Figure::TtftP50 | Figure::TtftP99 => Unit::Nanos,
            Figure::CpuPerToken | Figure::CpuPerAnswer => Unit::Micros,
            Figure::TokensPerSec => Unit::PerSec,
            Figure::RssPerAnswer => Unit::Bytes,
            Figure::Errors => Unit::Count,
        }
    }

    /// Its value in `run`, in [`Figure::unit`].
    fn of(self, run: &Run) -> Option<f64> {
        let r = &run.results;
        let d = Derived::of(r);
        match self {
            Figure::TtftP50 => r.ttft.quantile(0.5).map(|ns| ns as f64),
            Figure::TtftP99 => r.ttft.quantile(0.99).map(|ns| ns as f64),
            Figure::CpuPerToken => d.server_us_per_token,
            Figure::CpuPerAnswer => d.server_us_per_answer,
            Figure::TokensPerSec => Some(d.tokens_per_sec),
            Figure::RssPerAnswer => d.rss_per_answer,
            Figure::Errors => Some(r.error_count() as f64),
        }
    }

    /// Its value as the JSON gives it (latencies in ms).
    fn json_value(self, v: Option<f64>) -> Value {
        match self.unit() {
            Unit::Nanos => json!(v.map(|ns| ns / 1e6)),
            _ => json!(v),
        }
    }
}

/// How a row shows its values: one scale for the whole row, picked from its largest value,
/// so its cells compare at a glance. (Divisor, decimals, unit.)
fn scale(unit: Unit, values: &[f64]) -> (f64, usize, &'static str) {
    let max = values.iter().copied().fold(0.0, f64::max);
    match unit {
        Unit::Nanos if max < 1e4 => (1e3, 2, "µs"),
        Unit::Nanos if max < 1e10 => (1e6, 3, "ms"),
        Unit::Nanos => (1e9, 2, "s"),
        Unit::Micros => (1.0, 2, "µs"),
        Unit::PerSec => (1.0, 0, "/s"),
        Unit::Bytes if max < 1024.0 => (1.0, 0, "B"),
        Unit::Bytes if max < 1024.0 * 1024.0 => (1024.0, 1, "KiB"),
        Unit::Bytes => (1024.0 * 1024.0, 1, "MiB"),
        // A median of counts may fall between two.
        Unit::Count if values.iter().all(|v| v.fract() == 0.0) => (1.0, 0, ""),
        Unit::Count => (1.0, 1, ""),
    }
}

/// One configuration's values of one figure, a round each, in a row's scale:
/// `0.412 / 0.398 ms`; `-` for a value not measured.
fn cell(values: &[Option<f64>], (div, decimals, unit): (f64, usize, &str)) -> String {
    if values.iter().all(Option::is_none) {
        return "-".into();
    }
    let mut s = values
        .iter()
        .map(|v| v.map_or("-".into(), |v| format!("{:.*}", decimals, v / div)))
        .collect::<Vec<_>>()
        .join(" / ");
    if !unit.is_empty() {
        s.push(' ');
        s.push_str(unit);
    }
    s
}

/// One row: a figure's values, per configuration, per round.
#[derive(Clone, Debug)]
struct Row {
    figure: Figure,
    values: Vec<Vec<Option<f64>>>,
}

impl Row {
    fn medians(&self) -> Vec<Option<f64>> {
        self.values.iter().map(|v| median(v)).collect()
    }

    /// Every configuration's median after the first, over the first's.
    fn ratios(&self) -> Vec<Option<f64>> {
        let medians = self.medians();
        medians[1..].iter().map(|&m| ratio(medians[0], m)).collect()
    }
}

/// One workload's figures over the rounds of each configuration.
#[derive(Clone, Debug)]
pub struct Comparison {
    /// The workload, `A`..`D` or `custom`.
    pub workload: String,
    /// What it shows.
    pub title: String,
    /// The configurations, A first.
    pub configs: Vec<Config>,
    /// Rounds per configuration.
    pub rounds: u32,
    rows: Vec<Row>,
}

impl Comparison {
    /// The comparison of one workload's `runs` (each labelled with its configuration's name,
    /// in round order) between `configs`.
    pub fn of(
        workload: &str,
        title: &str,
        configs: &[Config],
        rounds: u32,
        runs: &[Run],
    ) -> Comparison {
        let of_config = |c: &Config| -> Vec<&Run> {
            runs.iter()
                .filter(|r| r.name == workload && r.config.as_deref() == Some(c.name.as_str()))
                .collect()
        };
        let per_config: Vec<Vec<&Run>> = configs.iter().map(of_config).collect();
        let rows = FIGURES
            .iter()
            .map(|&figure| Row {
                figure,
                values: per_config
                    .iter()
                    .map(|runs| runs.iter().map(|r| figure.of(r)).collect())
                    .collect(),
            })
            .collect();
        Comparison {
            workload: workload.into(),
            title: title.into(),
            configs: configs.to_vec(),
            rounds,
            rows,
        }
    }

    /// The human table: a row per figure; columns each configuration's median, B/A, and
    /// each configuration's rounds.
    pub fn table(&self) -> String {
        let names: Vec<&str> = self.configs.iter().map(|c| c.name.as_str()).collect();
        let two = names.len() == 2;
        let mut out = String::new();
        let order = if two {
            format!(
                "{} vs {}: {} rounds each, interleaved",
                names[0], names[1], self.rounds
            )
        } else {
            format!("{}: {} rounds", names.join(", "), self.rounds)
        };
        let _ = writeln!(out, "\n== {}: {}, {order}", self.workload, self.title);
        let wide = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
        for c in &self.configs {
            let _ = writeln!(
                out,
                "   {:<wide$}  {}",
                format!("{}:", c.name),
                c.describe(),
                wide = wide + 1
            );
        }

        let mut header = vec![String::new()];
        header.extend(names.iter().map(|n| format!("{n} median")));
        header.extend(names[1..].iter().map(|n| format!("{n}/{}", names[0])));
        header.extend(names.iter().map(|n| format!("{n} rounds")));
        let mut lines = vec![header];
        for row in &self.rows {
            let all: Vec<f64> = row.values.iter().flatten().flatten().copied().collect();
            let sc = scale(row.figure.unit(), &all);
            let mut line = vec![row.figure.label().to_string()];
            line.extend(row.medians().iter().map(|m| cell(&[*m], sc)));
            line.extend(row.ratios().into_iter().map(fmt_ratio));
            line.extend(row.values.iter().map(|v| cell(v, sc)));
            lines.push(line);
        }
        let columns = lines[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                lines
                    .iter()
                    .map(|l| l[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        // Label left, medians and ratio right, the rounds' lists left.
        let first_list = columns - names.len();
        for line in &lines {
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate() {
                let w = widths[i];
                if i == 0 {
                    let _ = write!(text, "{cell:<w$}");
                } else if i < first_list {
                    let _ = write!(text, "  {cell:>w$}");
                } else {
                    let _ = write!(text, "   {cell:<w$}");
                }
            }
            let _ = writeln!(out, "{}", text.trim_end());
        }
        out
    }

    /// The comparison as JSON: per figure (keyed with its unit: `ttft_p50_ms`, ...), each
    /// configuration's median and rounds, keyed by configuration name; `ratios`, every
    /// later configuration's median over the first's; and with two configurations `ratio`
    /// (B's median over A's).
    pub fn json(&self) -> Value {
        let mut figures = Map::new();
        for row in &self.rows {
            let f = row.figure;
            let by_name = |values: Vec<Value>| -> Map<String, Value> {
                self.configs
                    .iter()
                    .map(|c| c.name.clone())
                    .zip(values)
                    .collect()
            };
            let medians = by_name(row.medians().into_iter().map(|m| f.json_value(m)).collect());
            let rounds = by_name(
                row.values
                    .iter()
                    .map(|v| Value::Array(v.iter().map(|x| f.json_value(*x)).collect()))
                    .collect(),
            );
            let mut figure = json!({ "label": f.label(), "median": medians, "rounds": rounds });
            let ratios: Map<String, Value> = self.configs[1..]
                .iter()
                .map(|c| c.name.clone())
                .zip(row.ratios().into_iter().map(|r| json!(r)))
                .collect();
            if self.configs.len() == 2 {
                figure["ratio"] = json!(row.ratios()[0]);
            }
            if !ratios.is_empty() {
                figure["ratios"] = Value::Object(ratios);
            }
            figures.insert(f.key().into(), figure);
        }
        json!({
            "workload": self.workload,
            "title": self.title,
            "rounds": self.rounds,
            "order": "interleaved",
            "configs": self.configs.iter().map(|c| json!({
                "name": c.name,
                "binary": c.binary.as_ref().map(|b| b.display().to_string()),
                "kind": match c.kind {
                    ServerKind::Askstream => "askstream",
                    ServerKind::Floor => "floor",
                },
                "server_args": c.server_args,
            })).collect::<Vec<_>>(),
            "figures": figures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_interleave() {
        assert_eq!(
            schedule(2, 3),
            [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]
        );
        assert_eq!(schedule(1, 2), [(0, 1), (0, 2)]);
        assert_eq!(schedule(1, 1), [(0, 1)]);
        assert!(schedule(2, 0).is_empty());
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[Some(3.0), Some(1.0), Some(2.0)]), Some(2.0));
        assert_eq!(median(&[Some(4.0), Some(1.0)]), Some(2.5));
        assert_eq!(median(&[Some(5.0), None, Some(1.0), Some(3.0)]), Some(3.0));
        assert_eq!(median(&[Some(7.0)]), Some(7.0));
        assert_eq!(median(&[None, None]), None);
        assert_eq!(median(&[]), None);

        assert_eq!(ratio(Some(2.0), Some(3.0)), Some(1.5));
        assert_eq!(ratio(Some(0.0), Some(3.0)), None);
        assert_eq!(ratio(Some(0.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(3.0)), None);
        assert_eq!(fmt_ratio(ratio(Some(3.0), Some(1.0))), "0.33");
        assert_eq!(fmt_ratio(None), "-");
    }

    #[test]
    fn cells_share_a_row_scale() {
        let values = [Some(410_000.0), Some(390_000.0), Some(440_000.0)];
        let sc = scale(Unit::Nanos, &[410_000.0, 390_000.0, 440_000.0, 2_000_000.0]);
        assert_eq!(cell(&values, sc), "0.410 / 0.390 / 0.440 ms");
        assert_eq!(
            cell(&[Some(8_000.0), None], scale(Unit::Nanos, &[8_000.0])),
            "8.00 / - µs"
        );
        assert_eq!(cell(&[None, None], sc), "-");
        let sc = scale(Unit::Bytes, &[10.0 * 1024.0, 12.5 * 1024.0]);
        assert_eq!(cell(&[Some(10.0 * 1024.0)], sc), "10.0 KiB");
        assert_eq!(
            cell(&[Some(0.0), Some(3.0)], scale(Unit::Count, &[0.0, 3.0])),
            "0 / 3"
        );
        assert_eq!(cell(&[Some(1.5)], scale(Unit::Count, &[1.5])), "1.5");
    }

    /// A run of configuration `config` whose TTFTs are all `ttft_ns`, with `tokens` token
    /// events, `cpu_ms` of server CPU and `errors` errors in a 1 s window.
    fn run(config: &str, round: u32, ttft_ns: u64, tokens: u64, cpu_ms: u64, errors: u64) -> Run {
        use crate::engine::{Load, Results, ServerUsage, Settings};
        use crate::histogram::Histogram;
        use std::time::Duration;
        let mut ttft = Histogram::new();
        for _ in 0..100 {
            ttft.record(ttft_ns);
        }
        let settings = Settings {
            label: "D".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            path: "/".into(),
            query: "q".into(),
            load: Load::Closed { concurrency: 10 },
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            ramp: Duration::ZERO,
            users: 1,
            keep_alive: false,
            h2c: None,
            tls: false,
            tls_resume: false,
            stream_timeout: Duration::from_secs(1),
            max_streams_total: 1,
            expect_tokens: None,
            server_pid: None,
            progress: false,
            seed: 1,
        };
        let mut errs = std::collections::BTreeMap::new();
        if errors > 0 {
            errs.insert("status 500".to_string(), errors);
        }
        Run {
            name: "D".into(),
            title: "low load".into(),
            description: String::new(),
            results: Results {
                settings,
                window: Duration::from_secs(1),
                ttft,
                gap: Histogram::new(),
                total: Histogram::new(),
                connect: Histogram::new(),
                ttft_from_arrival: Histogram::new(),
                send_lag: Histogram::new(),
                completed: 10,
                token_events: tokens,
                started: 10,
                errors: errs,
                warmup_errors: Default::default(),
                tokens_per_answer: None,
                cut_at_end: 0,
                peak_in_flight: 10,
                hit_stream_cap: false,
                server: ServerUsage {
                    cpu: Some(Duration::from_millis(cpu_ms)),
                    ..ServerUsage::default()
                },
                tool_cpu: None,
            },
            notes: vec![],
            config: Some(config.into()),
            round: Some(round),
        }
    }

    fn configs() -> Vec<Config> {
        ["base", "vs"]
            .map(|n| Config {
                name: n.into(),
                binary: Some("askstream".into()),
                kind: ServerKind::Askstream,
                server_args: vec![],
                tls: false,
            })
            .to_vec()
    }

    #[test]
    fn a_comparison_of_interleaved_runs() {
        // In the order they ran: base, vs, base, vs, base, vs.
        let runs = [
            run("base", 1, 400_000, 1000, 10, 0),
            run("vs", 1, 800_000, 1000, 30, 2),
            run("base", 2, 420_000, 1000, 20, 0),
            run("vs", 2, 820_000, 1000, 30, 0),
            run("base", 3, 410_000, 1000, 30, 1),
            run("vs", 3, 790_000, 1000, 30, 0),
        ];
        let c = Comparison::of("D", "low load", &configs(), 3, &runs);
        let json = c.json();
        let fig = |key: &str| &json["figures"][key];
        // Histogram buckets are approximate: compare TTFTs loosely.
        let p50 = fig("ttft_p50_ms");
        let (a, b) = (
            p50["median"]["base"].as_f64().unwrap(),
            p50["median"]["vs"].as_f64().unwrap(),
        );
        assert!(
            (a - 0.41).abs() < 0.01 && (b - 0.80).abs() < 0.01,
            "{a} {b}"
        );
        assert!((p50["ratio"].as_f64().unwrap() - b / a).abs() < 1e-9);
        assert_eq!(p50["rounds"]["base"].as_array().unwrap().len(), 3);
        // µs per token: CPU ms * 1000 / 1000 tokens.
        let cpu = fig("server_cpu_us_per_token_event");
        assert_eq!(cpu["rounds"]["base"], json!([10.0, 20.0, 30.0]));
        assert_eq!(cpu["median"]["base"], json!(20.0));
        assert_eq!(cpu["median"]["vs"], json!(30.0));
        assert_eq!(cpu["ratio"], json!(1.5));
        assert_eq!(fig("errors")["median"]["base"], json!(0.0));
        assert_eq!(fig("errors")["rounds"]["vs"], json!([2.0, 0.0, 0.0]));
        assert_eq!(fig("errors")["ratio"], Value::Null);
        assert_eq!(
            fig("rss_per_open_answer_bytes")["median"]["vs"],
            Value::Null
        );

        let table = c.table();
        assert!(
            table.contains("base vs vs: 3 rounds each, interleaved"),
            "{table}"
        );
        let cpu_line = table
            .lines()
            .find(|l| l.starts_with("server µs CPU/token"))
            .unwrap();
        assert!(cpu_line.contains("20.00 µs"), "{cpu_line}");
        assert!(cpu_line.contains("1.50"), "{cpu_line}");
        assert!(cpu_line.contains("10.00 / 20.00 / 30.00 µs"), "{cpu_line}");
        let errors = table.lines().find(|l| l.starts_with("errors")).unwrap();
        assert!(errors.contains("2 / 0 / 0"), "{errors}");
    }

    #[test]
    fn describes_configs() {
        let c = Config {
            name: "vs".into(),
            binary: Some("target/release/askstream".into()),
            kind: ServerKind::Askstream,
            server_args: vec!["--sim-tokens".into(), "32".into()],
            tls: false,
        };
        assert_eq!(c.describe(), "target/release/askstream --sim-tokens 32");
        let f = Config {
            kind: ServerKind::Floor,
            binary: Some("target/floor/release/floor".into()),
            ..c.clone()
        };
        assert_eq!(
            f.describe(),
            "target/floor/release/floor (the floor: no HTTP library)"
        );
        let t = Config { binary: None, ..c };
        assert_eq!(t.describe(), "the --target server");
    }

    #[test]
    fn three_configurations_are_each_compared_with_the_first() {
        let mut configs = configs();
        configs.insert(
            0,
            Config {
                name: "floor".into(),
                binary: Some("floor".into()),
                kind: ServerKind::Floor,
                server_args: vec![],
                tls: false,
            },
        );
        let runs = [
            run("floor", 1, 400_000, 1000, 10, 0),
            run("base", 1, 400_000, 1000, 12, 0),
            run("vs", 1, 400_000, 1000, 15, 0),
        ];
        let c = Comparison::of("D", "low load", &configs, 1, &runs);
        let cpu = &c.json()["figures"]["server_cpu_us_per_token_event"];
        assert_eq!(cpu["ratios"]["base"], json!(1.2));
        assert_eq!(cpu["ratios"]["vs"], json!(1.5));
        assert_eq!(cpu["ratio"], Value::Null, "only with two configurations");
        let table = c.table();
        let header = table.lines().find(|l| l.contains("floor median")).unwrap();
        assert!(
            header.contains("base/floor") && header.contains("vs/floor"),
            "{header}"
        );
        let cpu_line = table
            .lines()
            .find(|l| l.starts_with("server µs CPU/token"))
            .unwrap();
        assert!(
            cpu_line.contains("1.20") && cpu_line.contains("1.50"),
            "{cpu_line}"
        );
    }
}
