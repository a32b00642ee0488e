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
//! - `compare`: two server configurations over interleaved rounds (`--vs-arg`, `--rounds`);
//! - `report` and `svg`: tables, JSON, the chart.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use askstream::config::parse_span;
use clap::Parser;
use loadtest::compare::{self, Comparison, Config, ServerKind};
use loadtest::engine::{self, Load, Settings};
use loadtest::report::{self, Run};
use loadtest::workload::{self, Sim, Workload};
use loadtest::{spawn, svg};

/// Flags.
#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Measures TTFT and throughput of an askstream-compatible SSE server (HTTP/1.1, h2c or TLS; loopback only).",
    after_help = "Examples:\n  \
        loadtest --spawn --workload all            reproduce the README's table (contract §6.1)\n  \
        loadtest --spawn --workload D --duration 5s\n  \
        loadtest --target 127.0.0.1:8080 --concurrency 200 --duration 30s --server-pid $(pidof askstream)\n  \
        loadtest --target localhost:8080 --rate 500 --duration 20s   open loop, Poisson arrivals\n  \
        loadtest --spawn --quick                     a few seconds' smoke run (exit 1 on any error)\n  \
        loadtest --spawn --workload D --duration 5s --name memory --vs-name redis \\\n      \
            --vs-arg=--quota-store --vs-arg=redis://127.0.0.1:6379\n      \
            B (the Redis quota store) against A (in-memory), 3 interleaved rounds each"
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

    /// With --spawn: one more flag for every spawned server (configuration A), after the
    /// standard ones (a standard flag it names is dropped, so it overrides). Repeat for
    /// each word; values may start with `-`: --server-arg=--quota-store
    /// --server-arg=redis://127.0.0.1:6379.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    server_arg: Vec<String>,

    /// Configuration A's name in reports [default: base].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// With --spawn: run a second configuration, B, whose servers get this flag (repeatable,
    /// like --server-arg) instead of --server-arg's; each workload then runs --rounds times
    /// per configuration, interleaved A, B, A, B, ..., and is reported A against B.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    vs_arg: Vec<String>,

    /// With --spawn: run configuration B (as --vs-arg does) with this server binary
    /// [default: A's].
    #[arg(long, value_name = "PATH")]
    vs_bin: Option<PathBuf>,

    /// Configuration B's name in reports [default: vs].
    #[arg(long, value_name = "NAME")]
    vs_name: Option<String>,

    /// With --spawn: also run the floor (`../shared/floor`, a server with no HTTP library,
    /// built at PATH) on every workload, first in each round; every other configuration is
    /// then reported as a ratio to it, as contract §6.2's targets are.
    #[arg(long, value_name = "PATH")]
    floor_bin: Option<PathBuf>,

    /// Runs of each workload per configuration, each against a fresh server [default: 3
    /// with configuration B, else 1].
    #[arg(long, value_name = "N")]
    rounds: Option<u32>,

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
    #[arg(long, conflicts_with = "h2c")]
    keep_alive: bool,

    /// Speak HTTP/2 with prior knowledge (h2c): every ask is a stream on one of N
    /// connections that all asks share, in turn (contract §1.1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    h2c: Option<u32>,

    /// Speak HTTP/1.1 over TLS to configuration A (or the --target): with --spawn, its
    /// servers get a certificate the tool makes (--tls-cert/--tls-key). A new connection's
    /// handshake counts in its ask's TTFT.
    #[arg(long, conflicts_with = "h2c")]
    tls: bool,

    /// With --spawn: run configuration B over TLS (as --tls does for A); alone, B is A's
    /// binary and flags, so A against B is what TLS costs.
    #[arg(long, conflicts_with = "h2c")]
    vs_tls: bool,

    /// Over TLS, resume sessions (abbreviated handshakes, as a returning browser does)
    /// instead of a full handshake on every new connection.
    #[arg(long)]
    tls_resume: bool,

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
    let rounds = check_configs(args)?;
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
    let mut configs = configs(args, server_bin.as_deref());
    if https_target(args) {
        configs[0].tls = true;
    }
    // Several runs per workload: each labelled, and each workload compared over them.
    let several = configs.len() > 1 || rounds > 1;

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
    for bin in configs.iter().filter_map(|c| c.binary.as_ref()) {
        if bin.components().any(|c| c.as_os_str() == "debug") {
            notes.push(format!("{} looks like a debug build", bin.display()));
        }
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
    if args.spawn && configs.iter().any(|c| c.tls) {
        let (cert, key) = loadtest::tls::self_signed(&args.out_dir)?;
        for c in configs.iter_mut().filter(|c| c.tls) {
            c.give_certificate(&cert, &key);
        }
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;

    let mut runs = Vec::new();
    let mut comparisons = Vec::new();
    for w in &workloads {
        let first = runs.len();
        for (c, round) in compare::schedule(configs.len(), rounds) {
            let config = &configs[c];
            let sim = w.sim.with_server_args(&config.server_args);
            let log = if several {
                format!("server-{}-{}-{round}.log", w.name, file_safe(&config.name))
            } else {
                format!("server-{}.log", w.name)
            };
            let server = match &config.binary {
                Some(binary) => Some(spawn::Server::start(&spawn::Launch {
                    binary: binary.clone(),
                    kind: config.kind,
                    sim,
                    max_streams: most_open.saturating_add(64),
                    cpu: server_cpu,
                    log: args.out_dir.join(log),
                    server_args: config.server_args.clone(),
                    tls: config.tls,
                })?),
                None => None,
            };
            let addr = server
                .as_ref()
                .map_or_else(|| target.expect("target or spawn"), |s| s.addr);
            let settings = settings(
                args,
                w,
                sim,
                addr,
                server.as_ref().map(|s| s.pid),
                config.tls,
            );
            let mut description = describe(args, sim, &settings);
            if several || !config.server_args.is_empty() {
                description.push_str(&format!("; server: {}", config.describe()));
            }
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
                config: several.then(|| config.name.clone()),
                round: several.then_some(round),
            };
            print!("{}", report::table(&run));
            runs.push(run);
        }
        if several {
            comparisons.push(Comparison::of(
                &w.name,
                &w.title,
                &configs,
                rounds,
                &runs[first..],
            ));
        }
    }

    println!("\n{}", report::summary(&runs));
    for comparison in &comparisons {
        print!("{}", comparison.table());
    }
    if !comparisons.is_empty() {
        println!();
    }
    if let Some(path) = &args.json {
        let command: Vec<String> = std::env::args().collect();
        let text = serde_json::to_string_pretty(&report::json(&runs, &comparisons, &command, cpus))
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
                title: format!("{}: {}{}", r.name, r.title, r.tag()),
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

/// Checks the configuration flags (`--server-arg`, `--vs-*`, `--name`s, `--rounds`) and
/// returns the rounds per configuration.
fn check_configs(args: &Args) -> Result<u32, String> {
    let vs = !args.vs_arg.is_empty() || args.vs_bin.is_some() || args.vs_tls;
    if args.tls_resume && !(args.tls || args.vs_tls || https_target(args)) {
        return Err("--tls-resume is for TLS runs: add --tls or --vs-tls".into());
    }
    if args.floor_bin.is_some() && args.h2c.is_some() {
        return Err("the floor speaks HTTP/1.1 only: drop --floor-bin or --h2c".into());
    }
    if args.floor_bin.is_some() && !args.spawn {
        return Err("--floor-bin runs the floor beside the spawned servers: add --spawn".into());
    }
    if vs && !args.spawn {
        return Err(
            "--vs-arg and --vs-bin run a second server configuration (B), which the \
             tool spawns: add --spawn (and drop --target; B cannot be a running server)"
                .into(),
        );
    }
    if !args.server_arg.is_empty() && !args.spawn {
        return Err(
            "--server-arg is passed to the servers the tool spawns: add --spawn (a --target \
             server keeps the flags it was started with)"
                .into(),
        );
    }
    if args.vs_name.is_some() && !vs {
        return Err("--vs-name names configuration B, which --vs-arg or --vs-bin enables".into());
    }
    let (a, b) = names(args);
    if a.trim().is_empty() || b.trim().is_empty() {
        return Err("--name and --vs-name must not be empty".into());
    }
    if vs && a == b {
        return Err(format!(
            "both configurations are named `{a}`: give --name and --vs-name different values"
        ));
    }
    if args.floor_bin.is_some() && (a == FLOOR || vs && b == FLOOR) {
        return Err(format!(
            "`{FLOOR}` names the floor's configuration: pick another name"
        ));
    }
    match args.rounds {
        Some(0) => Err("--rounds must be at least 1".into()),
        Some(n) => Ok(n),
        None if vs || args.floor_bin.is_some() => Ok(3),
        None => Ok(1),
    }
}

/// The --target is named `https://…`: it is spoken to over TLS.
fn https_target(args: &Args) -> bool {
    args.target
        .as_deref()
        .is_some_and(|t| t.starts_with("https://"))
}

/// The names of configurations A and B.
fn names(args: &Args) -> (&str, &str) {
    (
        args.name.as_deref().unwrap_or("base"),
        args.vs_name.as_deref().unwrap_or("vs"),
    )
}

/// The server configurations: the floor first (with --floor-bin, so every ratio is over
/// it), then A, then (when enabled) B; `server_bin` is A's binary with --spawn, `None` for
/// a --target.
fn configs(args: &Args, server_bin: Option<&Path>) -> Vec<Config> {
    let (a, b) = names(args);
    let mut configs = Vec::new();
    if let Some(floor) = &args.floor_bin {
        configs.push(Config {
            name: FLOOR.into(),
            binary: Some(floor.clone()),
            kind: ServerKind::Floor,
            server_args: Vec::new(),
            tls: false,
        });
    }
    configs.push(Config {
        name: a.into(),
        binary: server_bin.map(Path::to_path_buf),
        kind: ServerKind::Askstream,
        server_args: args.server_arg.clone(),
        tls: args.tls,
    });
    if !args.vs_arg.is_empty() || args.vs_bin.is_some() || args.vs_tls {
        configs.push(Config {
            name: b.into(),
            binary: args
                .vs_bin
                .clone()
                .or_else(|| server_bin.map(Path::to_path_buf)),
            kind: ServerKind::Askstream,
            server_args: args.vs_arg.clone(),
            tls: args.vs_tls,
        });
    }
    configs
}

/// The floor configuration's name in reports.
const FLOOR: &str = "floor";

/// `name` with anything but letters, digits, `-` and `_` replaced, for a file name.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
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

/// The engine's settings for workload `w` against `addr`, whose server (when spawned) runs
/// `sim`.
fn settings(
    args: &Args,
    w: &Workload,
    sim: Sim,
    addr: SocketAddr,
    server_pid: Option<u32>,
    tls: bool,
) -> Settings {
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
        h2c: args.h2c,
        tls,
        tls_resume: args.tls_resume,
        stream_timeout: args.stream_timeout,
        max_streams_total: args.max_streams_total,
        expect_tokens: args
            .expect_tokens
            .or(args.spawn.then_some(u64::from(sim.tokens))),
        server_pid: server_pid.or(args.server_pid),
        progress: !args.no_progress,
        seed: args.seed,
    }
}

/// One line saying what was run, against a server running `sim` when spawned.
fn describe(args: &Args, sim: Sim, s: &Settings) -> String {
    let sim = if args.spawn {
        sim.describe()
    } else {
        "the server's own sim settings".into()
    };
    let load = match s.load {
        Load::Closed { concurrency } => format!("closed loop, {concurrency} concurrent"),
        Load::Open { rate, .. } => format!("open loop, {rate} asks/s (Poisson)"),
    };
    let conn = match (s.h2c, s.keep_alive) {
        (Some(1), _) => "h2c, one connection".to_string(),
        (Some(n), _) => format!("h2c over {n} connections"),
        (None, true) => "keep-alive".to_string(),
        (None, false) => "new connection per answer".to_string(),
    };
    let conn = match (s.tls, s.tls_resume) {
        (false, _) => conn,
        (true, false) => format!("{conn}, TLS (full handshakes)"),
        (true, true) => format!("{conn}, TLS (sessions resumed)"),
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
        .or_else(|| target.strip_prefix("https://"))
        .unwrap_or(target)
        .split('/')
        .next()
        .unwrap_or_default();
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
        let err = resolve_loopback("https://10.1.2.3:443").unwrap_err();
        assert!(err.contains("not loopback"), "{err}");
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

    #[test]
    fn server_args_may_start_with_a_dash() {
        let args = Args::try_parse_from([
            "loadtest",
            "--spawn",
            "--server-arg=--quota-store",
            "--server-arg=redis://127.0.0.1:6399",
            "--server-arg",
            "--x",
            "--vs-arg=--sim-tokens",
            "--vs-arg",
            "32",
        ])
        .unwrap();
        assert_eq!(
            args.server_arg,
            ["--quota-store", "redis://127.0.0.1:6399", "--x"]
        );
        assert_eq!(args.vs_arg, ["--sim-tokens", "32"]);
        assert_eq!(check_configs(&args), Ok(3));
        let configs = configs(&args, Some(Path::new("bin/askstream")));
        assert_eq!(configs.len(), 2);
        assert_eq!(
            (configs[0].name.as_str(), configs[1].name.as_str()),
            ("base", "vs")
        );
        assert_eq!(configs[0].server_args, args.server_arg);
        // B gets its own flags, not A's, and A's binary by default.
        assert_eq!(configs[1].server_args, args.vs_arg);
        assert_eq!(configs[1].binary, configs[0].binary);
    }

    #[test]
    fn configurations_and_rounds() {
        let parse = |flags: &[&str]| {
            let mut all = vec!["loadtest"];
            all.extend(flags);
            Args::try_parse_from(all).unwrap()
        };
        // Without B: one configuration, one round, as before.
        let args = parse(&["--spawn"]);
        assert_eq!(check_configs(&args), Ok(1));
        assert_eq!(configs(&args, Some(Path::new("a"))).len(), 1);
        // --rounds alone repeats A, with or without --spawn.
        assert_eq!(check_configs(&parse(&["--rounds", "4"])), Ok(4));
        assert_eq!(configs(&parse(&["--rounds", "4"]), None)[0].binary, None);
        // --vs-bin alone enables B, with its own binary and names.
        let args = parse(&[
            "--spawn",
            "--vs-bin",
            "b",
            "--name",
            "x",
            "--vs-name",
            "y",
            "--rounds",
            "2",
        ]);
        assert_eq!(check_configs(&args), Ok(2));
        let c = configs(&args, Some(Path::new("a")));
        assert_eq!(c[1].binary.as_deref(), Some(Path::new("b")));
        assert_eq!((c[0].name.as_str(), c[1].name.as_str()), ("x", "y"));
        assert!(c[1].server_args.is_empty());

        let refused = |flags: &[&str], why: &str| {
            let err = check_configs(&parse(flags)).unwrap_err();
            assert!(err.contains(why), "{flags:?}: {err}");
        };
        refused(&["--vs-arg=--x"], "add --spawn");
        refused(&["--vs-bin", "b", "--target", "127.0.0.1:1"], "add --spawn");
        refused(&["--server-arg=--x"], "add --spawn");
        refused(&["--spawn", "--vs-name", "y"], "--vs-arg or --vs-bin");
        refused(&["--spawn", "--vs-arg=--x", "--name", "vs"], "different");
        refused(&["--spawn", "--rounds", "0"], "at least 1");
    }

    #[test]
    fn log_names_are_file_safe() {
        assert_eq!(file_safe("redis://x y"), "redis___x_y");
        assert_eq!(file_safe("base-1_a"), "base-1_a");
    }
}
