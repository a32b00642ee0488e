//! `loadtest`: askstream's load tool. It measures time to first token (TTFT) and throughput
//! of any server speaking askstream's event format, at the client, over HTTP/1.1.
//!
//! ```text
//! cargo run --release -p loadtest -- --spawn --workload all     # the README's table
//! cargo run --release -p loadtest -- --target 127.0.0.1:8080 --concurrency 100 --duration 30s
//! ```
//!
//! This file only turns flags into runs and runs into reports; the rest is the `loadtest`
//! library (`src/lib.rs`):
//!
//! - `engine` (with `client`, `http1`, `histogram`, `procfs`): drives the load and
//!   measures; callable on its own, as the smoke test does;
//! - `workload`: contract §6.1's workloads A–D;
//! - `spawn`: `--spawn` (the server as a pinned child process), pinning, open-file limit;
//! - `report` and `svg`: tables, JSON, the chart.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use askstream::config::parse_span;
use clap::Parser;
use loadtest::engine::{self, Load, Settings};
use loadtest::report::{self, Run};
use loadtest::workload::{self, Sim, Workload};
use loadtest::{spawn, svg};

/// Flags.
#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Measures TTFT and throughput of an askstream-compatible SSE server (HTTP/1.1, loopback only).",
    after_help = "Examples:\n  \
        loadtest --spawn --workload all            reproduce the README's table (contract §6.1)\n  \
        loadtest --spawn --workload D --duration 5s\n  \
        loadtest --target 127.0.0.1:8080 --concurrency 200 --duration 30s --server-pid $(pidof askstream)\n  \
        loadtest --target localhost:8080 --rate 500 --duration 20s   open loop, Poisson arrivals\n  \
        loadtest --spawn --quick                     a few seconds' smoke run (exit 1 on any error)"
)]
struct Args {
    /// Server to load: HOST:PORT or http://HOST:PORT; loopback only (127.0.0.0/8, ::1,
    /// localhost). Not with --spawn.
    #[arg(long, conflicts_with = "spawn")]
    target: Option<String>,

    /// Path and query of the streaming ask.
    #[arg(long, default_value = "/api/v1/ai/ask?stream=true")]
    path: String,

    /// The question every ask sends.
    #[arg(long, default_value = "How do quota refunds work?")]
    query: String,

    /// Standard workload(s) of contract §6.1: A, B, C, D, a comma list, or `all`. Without it,
    /// a custom run from --concurrency/--rate and the --sim-* flags.
    #[arg(long, short)]
    workload: Option<String>,

    /// Start the askstream binary for each workload, with the workload's sim flags, pinned
    /// to --server-cpu (the tool to --tool-cpu), and stop it after.
    #[arg(long)]
    spawn: bool,

    /// The askstream binary for --spawn [default: next to this executable].
    #[arg(long, requires = "spawn")]
    server_bin: Option<PathBuf>,

    /// Pid of an already running server, to report its CPU and memory.
    #[arg(long, conflicts_with = "spawn")]
    server_pid: Option<u32>,

    /// Smoke preset: 2 s after 0.5 s warm-up, at most 8 concurrent, at most 16 tokens.
    #[arg(long)]
    quick: bool,

    /// Closed loop: asks kept in flight [default: the workload's, else 10].
    #[arg(long, short, conflicts_with = "rate")]
    concurrency: Option<u32>,

    /// Open loop: mean asks per second, Poisson arrivals; latency is also measured from the
    /// scheduled arrival.
    #[arg(long)]
    rate: Option<f64>,

    /// Open loop: most asks in flight; arrivals beyond are dropped and counted as errors.
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: u32,

    /// Measured time, e.g. 20s, 1500ms, 2m [default: the workload's, else 10s].
    #[arg(long, short, value_parser = parse_span)]
    duration: Option<Duration>,

    /// Unmeasured time before it [default: the workload's, else 1s].
    #[arg(long, value_parser = parse_span)]
    warmup: Option<Duration>,

    /// Closed loop: start the slots spread over this time (at most the warm-up)
    /// [default: the workload's, else one answer's length].
    #[arg(long, value_parser = parse_span)]
    ramp: Option<Duration>,

    /// Asks go round-robin to this many bearer users (`Bearer user-<n>`).
    #[arg(long, default_value_t = 1000)]
    users: u64,

    /// Reuse connections between asks (default: one new connection per ask).
    #[arg(long)]
    keep_alive: bool,

    /// An ask running longer is cut and counted as a `timeout` error.
    #[arg(long, value_parser = parse_span, default_value = "60s")]
    stream_timeout: Duration,

    /// Hard cap on asks started per run.
    #[arg(long, default_value_t = 10_000_000)]
    max_streams_total: u64,

    /// Count an answer with another number of token events as an error [default with
    /// --spawn: the sim's --sim-tokens].
    #[arg(long)]
    expect_tokens: Option<u64>,

    /// Custom run with --spawn: the server's --sim-ttft-ms.
    #[arg(long, default_value_t = 0, conflicts_with = "workload")]
    sim_ttft_ms: u64,

    /// Custom run with --spawn: the server's --sim-token-ms.
    #[arg(long, default_value_t = 20, conflicts_with = "workload")]
    sim_token_ms: u64,

    /// Custom run with --spawn: the server's --sim-tokens.
    #[arg(long, default_value_t = 64, conflicts_with = "workload")]
    sim_tokens: u32,

    /// With --spawn, do not pin the server and the tool to CPUs.
    #[arg(long)]
    no_pin: bool,

    /// With --spawn: the CPU the server is pinned to.
    #[arg(long, default_value_t = 0)]
    server_cpu: usize,

    /// With --spawn: the CPU the tool is pinned to.
    #[arg(long, default_value_t = 1)]
    tool_cpu: usize,

    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,

    /// Write the TTFT chart (SVG) here [default: <out-dir>/ttft.svg].
    #[arg(long)]
    svg: Option<PathBuf>,

    /// Do not write the SVG chart.
    #[arg(long, conflicts_with = "svg")]
    no_svg: bool,

    /// Folder for the chart and spawned servers' logs.
    #[arg(long, default_value = "loadtest-out")]
    out_dir: PathBuf,

    /// No progress line on stderr.
    #[arg(long)]
    no_progress: bool,

    /// Seed of the open loop's arrival times.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs every workload; `Ok(false)` when any had errors.
fn run(args: &Args) -> Result<bool, String> {
    let workloads = plan(args)?;
    let target = match (&args.target, args.spawn) {
        (_, true) => None,
        (Some(t), false) => Some(resolve_loopback(t)?),
        (None, false) => Some(resolve_loopback("127.0.0.1:8080")?),
    };
    let server_bin = match (args.spawn, &args.server_bin) {
        (false, _) => None,
        (true, Some(path)) => Some(path.clone()),
        (true, None) => Some(spawn::locate_server()?),
    };

    let most_open = workloads
        .iter()
        .map(|w| match args.rate {
            Some(_) => args.max_in_flight,
            None => w.concurrency,
        })
        .max()
        .unwrap_or(1);
    spawn::ensure_fd_limit(u64::from(most_open) + 256)?;

    // Before pinning, which narrows what this process sees.
    let cpus = std::thread::available_parallelism().ok().map(|n| n.get());
    let mut notes = Vec::new();
    if cfg!(debug_assertions) {
        notes.push(
            "loadtest is a debug build: its own costs inflate the figures; use --release".into(),
        );
    }
    if let Some(bin) = &server_bin
        && bin.components().any(|c| c.as_os_str() == "debug")
    {
        notes.push(format!("{} looks like a debug build", bin.display()));
    }
    let server_cpu = if args.spawn {
        pin(args, cpus.unwrap_or(1), &mut notes)
    } else {
        None
    };
    if args.spawn || args.svg.is_none() && !args.no_svg {
        std::fs::create_dir_all(&args.out_dir)
            .map_err(|e| format!("cannot create {}: {e}", args.out_dir.display()))?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;

    let mut runs = Vec::new();
    for w in &workloads {
        let server = match &server_bin {
            Some(binary) => Some(spawn::Server::start(&spawn::Launch {
                binary: binary.clone(),
                sim: w.sim,
                max_streams: most_open.saturating_add(64),
                cpu: server_cpu,
                log: args.out_dir.join(format!("server-{}.log", w.name)),
            })?),
            None => None,
        };
        let addr = server
            .as_ref()
            .map_or_else(|| target.expect("target or spawn"), |s| s.addr);
        let settings = settings(args, w, addr, server.as_ref().map(|s| s.pid));
        let description = describe(args, w, &settings);
        let result = runtime.block_on(engine::run(settings));
        let mut run_notes = notes.clone();
        if let Some(server) = server {
            let log = server.log.clone();
            if let Err(e) = server.stop() {
                run_notes.push(format!("server: {e} (log: {})", log.display()));
            }
        }
        let results = result.map_err(|e| e.to_string())?;
        let run = Run {
            name: w.name.clone(),
            title: w.title.clone(),
            description,
            results,
            notes: run_notes,
        };
        print!("{}", report::table(&run));
        runs.push(run);
    }

    println!("\n{}", report::summary(&runs));
    if let Some(path) = &args.json {
        let command: Vec<String> = std::env::args().collect();
        let text = serde_json::to_string_pretty(&report::json(&runs, &command, cpus))
            .map_err(|e| format!("cannot encode JSON: {e}"))?;
        write_file(path, &text)?;
        println!("JSON: {}", path.display());
    }
    if !args.no_svg {
        let path = args
            .svg
            .clone()
            .unwrap_or_else(|| args.out_dir.join("ttft.svg"));
        let series: Vec<svg::Series<'_>> = runs
            .iter()
            .map(|r| svg::Series {
                title: format!("{}: {}", r.name, r.title),
                subtitle: r.description.clone(),
                ttft: &r.results.ttft,
            })
            .collect();
        write_file(&path, &svg::chart(&series))?;
        println!("chart: {}", path.display());
    }
    Ok(runs
        .iter()
        .all(|r| r.results.error_count() == 0 && r.results.completed > 0))
}

/// The workloads to run, with the flags' overrides applied.
fn plan(args: &Args) -> Result<Vec<Workload>, String> {
    let mut workloads = match &args.workload {
        Some(list) => workload::parse_list(list)?,
        None => {
            let sim = Sim {
                ttft_ms: args.sim_ttft_ms,
                token_ms: args.sim_token_ms,
                tokens: args.sim_tokens,
            };
            vec![Workload {
                name: "custom".into(),
                title: "custom".into(),
                sim,
                concurrency: 10,
                duration: Duration::from_secs(10),
                warmup: Duration::from_secs(1),
                ramp: sim.answer_time().min(Duration::from_secs(1)),
            }]
        }
    };
    for w in &mut workloads {
        if args.quick {
            *w = w.clone().quick();
        }
        if let Some(c) = args.concurrency {
            w.concurrency = c;
        }
        if let Some(d) = args.duration {
            w.duration = d;
        }
        if let Some(d) = args.warmup {
            w.warmup = d;
            w.ramp = w.ramp.min(d);
        }
        if let Some(r) = args.ramp {
            // At most the warm-up, as the flag says: a ramp into the measured window
            // would measure below the set concurrency.
            w.ramp = r.min(w.warmup);
        }
        if w.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        if w.duration.is_zero() {
            return Err("--duration must be more than zero".into());
        }
    }
    Ok(workloads)
}

/// The engine's settings for workload `w` against `addr`.
fn settings(args: &Args, w: &Workload, addr: SocketAddr, server_pid: Option<u32>) -> Settings {
    let load = match args.rate {
        Some(rate) => Load::Open {
            rate,
            max_in_flight: args.max_in_flight,
        },
        None => Load::Closed {
            concurrency: w.concurrency,
        },
    };
    Settings {
        label: w.name.clone(),
        addr,
        path: args.path.clone(),
        query: args.query.clone(),
        load,
        duration: w.duration,
        warmup: w.warmup,
        ramp: w.ramp,
        users: args.users,
        keep_alive: args.keep_alive,
        stream_timeout: args.stream_timeout,
        max_streams_total: args.max_streams_total,
        expect_tokens: args
            .expect_tokens
            .or(args.spawn.then_some(u64::from(w.sim.tokens))),
        server_pid: server_pid.or(args.server_pid),
        progress: !args.no_progress,
        seed: args.seed,
    }
}

/// One line saying what was run.
fn describe(args: &Args, w: &Workload, s: &Settings) -> String {
    let sim = if args.spawn {
        w.sim.describe()
    } else {
        "the server's own sim settings".into()
    };
    let load = match s.load {
        Load::Closed { concurrency } => format!("closed loop, {concurrency} concurrent"),
        Load::Open { rate, .. } => format!("open loop, {rate} asks/s (Poisson)"),
    };
    let conn = if s.keep_alive {
        "keep-alive"
    } else {
        "new connection per answer"
    };
    format!(
        "{sim}; {load}, {conn}, {} users; {} after {} warm-up",
        s.users,
        fmt_secs(s.duration),
        fmt_secs(s.warmup)
    )
}

fn fmt_secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// Pins the tool and picks the server's CPU, noting why when it cannot.
fn pin(args: &Args, cpus: usize, notes: &mut Vec<String>) -> Option<usize> {
    if args.no_pin {
        notes.push("not pinned (--no-pin)".into());
        return None;
    }
    if cpus < 2 {
        notes.push("only one CPU: server and tool share it, not pinned".into());
        return None;
    }
    if !spawn::taskset_available() {
        notes.push("`taskset` not found: server and tool not pinned".into());
        eprintln!("loadtest: warning: `taskset` not found; running unpinned");
        return None;
    }
    if let Err(e) = spawn::pin_self(args.tool_cpu) {
        notes.push(format!(
            "could not pin the tool to CPU {}: {e}",
            args.tool_cpu
        ));
        return None;
    }
    notes.push(format!(
        "server pinned to CPU {}, load tool to CPU {}",
        args.server_cpu, args.tool_cpu
    ));
    Some(args.server_cpu)
}

/// Resolves a target to a loopback address, refusing anything else.
fn resolve_loopback(target: &str) -> Result<SocketAddr, String> {
    let hostport = target
        .strip_prefix("http://")
        .unwrap_or(target)
        .split('/')
        .next()
        .unwrap_or_default();
    if target.starts_with("https://") {
        return Err("https is not supported: the load tool speaks cleartext HTTP/1.1".into());
    }
    let addrs: Vec<SocketAddr> = hostport
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{target}` (want HOST:PORT): {e}"))?
        .collect();
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "`{target}` resolves to {bad}, which is not loopback: the load tool only targets \
             127.0.0.0/8, ::1 or localhost, so it cannot be pointed at someone else's server"
        ));
    }
    // `localhost` may resolve to ::1 first while the server listens on 127.0.0.1: take
    // the first address something listens on.
    let first = *addrs
        .first()
        .ok_or_else(|| format!("`{target}` resolves to no address"))?;
    addrs
        .iter()
        .copied()
        .find(|a| std::net::TcpStream::connect_timeout(a, Duration::from_secs(2)).is_ok())
        .ok_or_else(|| {
            format!("nothing is listening on {first}; start askstream there, or pass --spawn")
        })
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_targets_are_refused() {
        let err = resolve_loopback("10.1.2.3:80").unwrap_err();
        assert!(err.contains("not loopback"), "{err}");
        let err = resolve_loopback("https://127.0.0.1:1").unwrap_err();
        assert!(err.contains("https"), "{err}");
    }

    #[test]
    fn flags_make_a_plan() {
        let args = Args::parse_from([
            "loadtest",
            "--workload",
            "A,D",
            "--duration",
            "5s",
            "--quick",
        ]);
        let planned = plan(&args).unwrap();
        assert_eq!(planned.len(), 2);
        assert!(
            planned
                .iter()
                .all(|w| w.duration == Duration::from_secs(5) && w.concurrency <= 8)
        );
        let args = Args::parse_from(["loadtest", "--concurrency", "3"]);
        assert_eq!(plan(&args).unwrap()[0].concurrency, 3);
        assert!(Args::try_parse_from(["loadtest", "--spawn", "--target", "127.0.0.1:1"]).is_err());
        assert!(Args::try_parse_from(["loadtest", "--rate", "5", "--concurrency", "3"]).is_err());
    }
}
