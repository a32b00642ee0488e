//! The load engine: keeps asks in flight for a bounded time and measures them.
//!
//! [`run`] takes [`Settings`] and returns [`Results`]; it prints nothing but the progress
//! line. It is usable without the binary's flag parsing (the smoke test calls it directly).
//! It is built on the crate's `client` (one ask over one connection, measured as events are
//! parsed), which speaks `http1`; latencies go into [`Histogram`]s, and the server's and
//! the tool's costs are read through `procfs`.
//!
//! # How a run goes
//!
//! Everything runs on the calling thread (a [`LocalSet`]), so the tool's whole cost is one
//! core, and shared state is a `RefCell` without atomics. The run is split into a warm-up
//! and a measured window:
//!
//! ```text
//! start ──ramp──▶ ... warm-up ... ─▶ window start ── measured ──▶ end (in-flight asks cut)
//! ```
//!
//! - **Closed loop** (`Load::Closed`): each of `concurrency` slots sends its next ask as soon
//!   as the previous one ends. Slots start spread over the ramp, so their asks do not all
//!   begin (and end) at the same instant for the whole run.
//! - **Open loop** (`Load::Open`): asks arrive as a Poisson process at `rate` per second,
//!   whatever the server's speed. Each ask's latency is also measured from its scheduled
//!   arrival, and the delay between that arrival and the request's write (the tool's own
//!   lag) is reported beside it, so a slow client cannot pass as a slow server.
//!
//! Latencies count asks that *started* in the window; throughput counts what *arrived* in
//! it. Asks still running at the end are cut (closed), not counted as errors.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::LocalSet;

use crate::client::{Client, Finished, Observer, Target};
use crate::h2;
use crate::histogram::Histogram;
use crate::procfs::{self, Pid};

/// The size of the one read buffer all connections share.
const READ_BUF: usize = 256 * 1024;

/// How asks are started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// A fixed number of asks always in flight.
    Closed {
        /// Asks in flight.
        concurrency: u32,
    },
    /// Asks arriving at random (Poisson) at a mean rate.
    Open {
        /// Mean arrivals per second.
        rate: f64,
        /// The most asks in flight; an arrival beyond it is dropped and counted as an error,
        /// so a stalled server cannot make the tool open connections without bound.
        max_in_flight: u32,
    },
}

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A name for the progress line.
    pub label: String,
    /// The server's address; must be loopback.
    pub addr: SocketAddr,
    /// The path and query of the streaming ask.
    pub path: String,
    /// The question asked.
    pub query: String,
    /// Closed or open loop.
    pub load: Load,
    /// Length of the measured window.
    pub duration: Duration,
    /// Time before the window, whose asks are not measured (caches, pools, TCP warm up).
    pub warmup: Duration,
    /// Closed loop: slots start evenly over this time.
    pub ramp: Duration,
    /// Asks are spread round-robin over this many bearer users, `user-0`...
    pub users: u64,
    /// Reuse connections; otherwise one new connection per ask.
    pub keep_alive: bool,
    /// Speak HTTP/2 with prior knowledge, every ask a stream on one of this many shared
    /// connections; `None` for HTTP/1.1.
    pub h2c: Option<u32>,
    /// HTTP/1.1 over TLS; each new connection is a handshake, counted in its TTFT.
    pub tls: bool,
    /// With `tls`, resume sessions (abbreviated handshakes) instead of full ones.
    pub tls_resume: bool,
    /// An ask running longer is cut and counted as a `timeout` error.
    pub stream_timeout: Duration,
    /// Hard cap on asks started in the whole run.
    pub max_streams_total: u64,
    /// When set, a completed answer with another number of token events is an error.
    pub expect_tokens: Option<u64>,
    /// The server's process, for its CPU time and memory.
    pub server_pid: Option<u32>,
    /// Print a progress line on stderr once a second.
    pub progress: bool,
    /// Seed of the open loop's arrival times, so runs are repeatable.
    pub seed: u64,
}

/// Why a run could not start.
#[derive(Debug)]
pub enum EngineError {
    /// The target is not a loopback address.
    NotLoopback(SocketAddr),
    /// A setting is out of range.
    Invalid(String),
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::NotLoopback(addr) => write!(
                f,
                "{addr} is not a loopback address: the load tool only targets 127.0.0.0/8 or ::1"
            ),
            EngineError::Invalid(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for EngineError {}

/// The server's resource use, where its pid was given and `/proc` could be read.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerUsage {
    /// CPU time (user + system) used in the measured window.
    pub cpu: Option<Duration>,
    /// Resident memory before the load started.
    pub idle_rss: Option<u64>,
    /// The highest resident memory seen in once-a-second samples.
    pub sampled_peak_rss: Option<u64>,
    /// The kernel's high-water mark of resident memory at the end (`VmHWM`).
    pub peak_rss: Option<u64>,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Results {
    /// The settings of the run.
    pub settings: Settings,
    /// Wall time of the measured window (shorter than asked if the stream cap was hit).
    pub window: Duration,
    /// Request written → first token event parsed.
    pub ttft: Histogram,
    /// Between consecutive token events of one answer.
    pub gap: Histogram,
    /// Request written → `done` event.
    pub total: Histogram,
    /// TCP connect time of new connections.
    pub connect: Histogram,
    /// Open loop: scheduled arrival → first token event (what a user would see).
    pub ttft_from_arrival: Histogram,
    /// Open loop: scheduled arrival → request written (the tool's own lag).
    pub send_lag: Histogram,
    /// Answers that ended with `done` in the window.
    pub completed: u64,
    /// Token events received in the window.
    pub token_events: u64,
    /// Asks started in the window.
    pub started: u64,
    /// Errors in the window, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Errors during the warm-up, by kind (not in `errors`, still worth knowing).
    pub warmup_errors: BTreeMap<String, u64>,
    /// Fewest and most token events in one completed answer.
    pub tokens_per_answer: Option<(u64, u64)>,
    /// Asks cut because the run ended while they were running.
    pub cut_at_end: u64,
    /// Most asks in flight at once.
    pub peak_in_flight: u64,
    /// The run stopped early because `max_streams_total` asks were started.
    pub hit_stream_cap: bool,
    /// The server's CPU and memory.
    pub server: ServerUsage,
    /// The tool's own CPU time in the window.
    pub tool_cpu: Option<Duration>,
}

impl Results {
    /// Errors in the window, all kinds.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Counters of one phase (warm-up or window); replaced whole when the phase changes.
#[derive(Default)]
struct Stats {
    ttft: Histogram,
    /// TTFTs since the last progress line, which shows them ("current" TTFT) before they
    /// are merged into `ttft`.
    ttft_recent: Histogram,
    gap: Histogram,
    total: Histogram,
    connect: Histogram,
    ttft_from_arrival: Histogram,
    send_lag: Histogram,
    completed: u64,
    token_events: u64,
    started: u64,
    errors: BTreeMap<String, u64>,
    tokens_per_answer: Option<(u64, u64)>,
}

impl Stats {
    /// Moves the recent TTFTs into the window's.
    fn fold_recent(&mut self) {
        self.ttft.merge(&self.ttft_recent);
        self.ttft_recent.clear();
    }

    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// State every task of the run shares (one thread, so `Cell`/`RefCell`).
struct Shared {
    target: Target,
    settings: Settings,
    /// The one read buffer; see [`crate::client`].
    read_buf: RefCell<Vec<u8>>,
    /// The current phase's counters: the warm-up's, then (after [`Shared::open_window`])
    /// the window's.
    stats: RefCell<Stats>,
    /// The warm-up's counters, once the window is open.
    warmup_stats: RefCell<Stats>,
    /// CPU counters when the window opened; `None` before.
    baseline: Cell<Option<Baseline>>,
    /// The server's process, if known.
    server: Option<Pid>,
    window_start: Instant,
    end: Instant,
    /// Asks started in the whole run, against `max_streams_total`.
    tickets: Cell<u64>,
    next_user: Cell<u64>,
    in_flight: Cell<u64>,
    peak_in_flight: Cell<u64>,
    /// Token events since the start, for the progress line's rate.
    tokens_seen: Cell<u64>,
    cut_at_end: Cell<u64>,
    /// Tasks (slots, arrival loop, open-loop asks) still running.
    live: Cell<usize>,
    all_done: Notify,
}

impl Shared {
    /// Counts an ask as in flight (and in the peak) before it starts; `one_ask` takes it
    /// out when it ends.
    fn enter_flight(&self) {
        let in_flight = self.in_flight.get() + 1;
        self.in_flight.set(in_flight);
        self.peak_in_flight
            .set(self.peak_in_flight.get().max(in_flight));
    }

    /// Takes one ask from the run's budget; false once it is spent.
    fn take_ticket(&self) -> bool {
        let n = self.tickets.get();
        if n >= self.settings.max_streams_total {
            return false;
        }
        self.tickets.set(n + 1);
        true
    }

    /// Opens the measured window, once: by the clock at `window_start`, or earlier by the
    /// first ask that starts after it (the clock's timer may be late by a millisecond, and
    /// that ask's figures belong to the window).
    fn open_window(&self) {
        if self.baseline.get().is_none() {
            self.warmup_stats
                .replace(self.stats.replace(Stats::default()));
            self.baseline.set(Some(Baseline::take(self.server)));
        }
    }

    fn task_started(&self) {
        self.live.set(self.live.get() + 1);
    }

    fn task_ended(&self) {
        self.live.set(self.live.get() - 1);
        if self.live.get() == 0 {
            self.all_done.notify_one();
        }
    }
}

/// Measures one ask as the client reports it.
struct AskObserver<'a> {
    shared: &'a Shared,
    /// Latencies are recorded only for asks that started in the window.
    measured: bool,
    /// Open loop: the scheduled arrival.
    scheduled: Option<Instant>,
    sent: Cell<Option<Instant>>,
}

impl Observer for AskObserver<'_> {
    fn connected(&self, took: Duration) {
        if self.measured {
            self.shared.stats.borrow_mut().connect.record_duration(took);
        }
    }

    fn request_sent(&self, at: Instant) {
        // A retry (on a keep-alive connection the server had closed) is not a new arrival.
        if self.sent.get().is_none() {
            self.sent.set(Some(at));
        }
    }

    fn first_token(&self, at: Instant) {
        self.shared
            .tokens_seen
            .set(self.shared.tokens_seen.get() + 1);
        let mut stats = self.shared.stats.borrow_mut();
        stats.token_events += 1;
        if !self.measured {
            return;
        }
        if let Some(sent) = self.sent.get() {
            stats
                .ttft_recent
                .record_duration(at.saturating_duration_since(sent));
        }
        if let Some(scheduled) = self.scheduled {
            let latency = at.saturating_duration_since(scheduled);
            stats.ttft_from_arrival.record_duration(latency);
        }
    }

    fn token(&self, gap: Duration) {
        self.shared
            .tokens_seen
            .set(self.shared.tokens_seen.get() + 1);
        let mut stats = self.shared.stats.borrow_mut();
        stats.token_events += 1;
        if self.measured {
            stats.gap.record_duration(gap);
        }
    }
}

/// Runs the load described by `settings` and returns what it measured.
///
/// # Errors
/// When the settings are unusable (a non-loopback target, zero concurrency or rate).
pub async fn run(settings: Settings) -> Result<Results, EngineError> {
    validate(&settings)?;
    LocalSet::new().run_until(run_local(settings)).await
}

fn validate(settings: &Settings) -> Result<(), EngineError> {
    if !settings.addr.ip().is_loopback() {
        return Err(EngineError::NotLoopback(settings.addr));
    }
    match settings.load {
        Load::Closed { concurrency: 0 } => {
            return Err(EngineError::Invalid(
                "concurrency must be at least 1".into(),
            ));
        }
        Load::Open { rate, .. } if !(rate > 0.0 && rate.is_finite()) => {
            return Err(EngineError::Invalid(
                "rate must be a positive number".into(),
            ));
        }
        Load::Open {
            max_in_flight: 0, ..
        } => {
            return Err(EngineError::Invalid(
                "max in flight must be at least 1".into(),
            ));
        }
        _ => {}
    }
    if settings.users == 0 {
        return Err(EngineError::Invalid("users must be at least 1".into()));
    }
    if settings.duration.is_zero() {
        return Err(EngineError::Invalid(
            "duration must be more than zero".into(),
        ));
    }
    Ok(())
}

async fn run_local(settings: Settings) -> Result<Results, EngineError> {
    let body = serde_json::json!({ "query": settings.query })
        .to_string()
        .into_bytes();
    let target = Target {
        addr: settings.addr,
        host: settings.addr.to_string(),
        path: settings.path.clone(),
        body,
        keep_alive: settings.keep_alive,
        h2: settings.h2c.map(|n| std::rc::Rc::new(h2::Pool::new(n))),
        tls: settings
            .tls
            .then(|| crate::tls::client_config(settings.tls_resume)),
    };
    let server = settings.server_pid.map(Pid::Other);
    let idle_rss = server.and_then(procfs::memory).map(|m| m.rss);

    let start = Instant::now();
    let window_start = start + settings.warmup;
    let shared = Rc::new(Shared {
        target,
        read_buf: RefCell::new(vec![0; READ_BUF]),
        stats: RefCell::new(Stats::default()),
        warmup_stats: RefCell::new(Stats::default()),
        baseline: Cell::new(None),
        server,
        window_start,
        end: window_start + settings.duration,
        tickets: Cell::new(0),
        next_user: Cell::new(0),
        in_flight: Cell::new(0),
        peak_in_flight: Cell::new(0),
        tokens_seen: Cell::new(0),
        cut_at_end: Cell::new(0),
        live: Cell::new(0),
        all_done: Notify::new(),
        settings,
    });

    // Without a warm-up, the baseline is taken before any load.
    if shared.settings.warmup.is_zero() {
        shared.open_window();
    }

    match shared.settings.load {
        Load::Closed { concurrency } => {
            let ramp = shared.settings.ramp;
            for i in 0..concurrency {
                let offset = ramp.mul_f64(f64::from(i) / f64::from(concurrency));
                shared.task_started();
                tokio::task::spawn_local(slot(shared.clone(), start + offset));
            }
        }
        Load::Open {
            rate,
            max_in_flight,
        } => {
            shared.task_started();
            tokio::task::spawn_local(arrivals(shared.clone(), start, rate, max_in_flight));
        }
    }

    let mut progress = Progress::new(shared.settings.progress, &shared.settings.label, start);
    let mut sampled_peak = idle_rss;
    let mut next_tick = start + Duration::from_secs(1);
    let mut early = false;
    loop {
        let mut wake = next_tick.min(shared.end);
        if shared.baseline.get().is_none() {
            wake = wake.min(window_start);
        }
        tokio::select! {
            () = tokio::time::sleep_until(wake.into()) => {}
            () = shared.all_done.notified() => early = true,
        }
        let now = Instant::now();
        if now >= window_start || early {
            shared.open_window();
        }
        if now >= shared.end || early {
            break;
        }
        if now >= next_tick {
            next_tick += Duration::from_secs(1);
            if let Some(m) = server.and_then(procfs::memory) {
                sampled_peak = Some(sampled_peak.unwrap_or(0).max(m.rss));
            }
            progress.print(&shared, now);
        }
    }
    // The window closes here: whatever arrives later lands in a discarded `Stats`.
    let mut stats = shared.stats.replace(Stats::default());
    stats.fold_recent();
    let window = shared.baseline.get().expect("window opened before the end");
    let warmup = shared.warmup_stats.take();
    let end_time = Instant::now();
    let server_cpu = server.and_then(procfs::cpu_time);
    let tool_cpu = procfs::cpu_time(Pid::Own);
    let memory = server.and_then(procfs::memory);
    progress.finish(end_time, &stats);

    // Asks still running are cut by their deadline (the end); wait for them to close.
    if shared.live.get() > 0 {
        let _ = tokio::time::timeout(Duration::from_secs(5), shared.all_done.notified()).await;
    }

    let settings = shared.settings.clone();
    let hit_stream_cap = shared.tickets.get() >= settings.max_streams_total;
    Ok(Results {
        window: end_time.saturating_duration_since(window.at),
        ttft: stats.ttft,
        gap: stats.gap,
        total: stats.total,
        connect: stats.connect,
        ttft_from_arrival: stats.ttft_from_arrival,
        send_lag: stats.send_lag,
        completed: stats.completed,
        token_events: stats.token_events,
        started: stats.started,
        errors: stats.errors,
        warmup_errors: warmup.errors,
        tokens_per_answer: stats.tokens_per_answer,
        cut_at_end: shared.cut_at_end.get(),
        peak_in_flight: shared.peak_in_flight.get(),
        hit_stream_cap,
        server: ServerUsage {
            cpu: server_cpu
                .zip(window.server_cpu)
                .map(|(b, a)| b.saturating_sub(a)),
            idle_rss,
            sampled_peak_rss: sampled_peak.max(memory.map(|m| m.rss)),
            peak_rss: memory.map(|m| m.peak),
        },
        tool_cpu: tool_cpu
            .zip(window.tool_cpu)
            .map(|(b, a)| b.saturating_sub(a)),
        settings,
    })
}

/// CPU counters at the start of the window.
#[derive(Clone, Copy)]
struct Baseline {
    at: Instant,
    server_cpu: Option<Duration>,
    tool_cpu: Option<Duration>,
}

impl Baseline {
    fn take(server: Option<Pid>) -> Self {
        Baseline {
            at: Instant::now(),
            server_cpu: server.and_then(procfs::cpu_time),
            tool_cpu: procfs::cpu_time(Pid::Own),
        }
    }
}

/// A closed-loop slot: one ask after another until the run ends.
async fn slot(shared: Rc<Shared>, first_at: Instant) {
    let mut client = Client::new();
    tokio::time::sleep_until(first_at.into()).await;
    while Instant::now() < shared.end && shared.take_ticket() {
        shared.enter_flight();
        one_ask(&shared, &mut client, None).await;
    }
    shared.task_ended();
}

/// The open loop: Poisson arrivals, each ask its own task, connections pooled for
/// keep-alive.
///
/// Arrival times come from a pacer thread that sleeps until each one: tokio's timer ticks
/// in whole milliseconds, which alone would add up to a millisecond of send lag to every
/// ask. The thread only sleeps and sends an `Instant`; the asks run here, on the tool's
/// one thread. If this thread falls behind, arrivals queue in the channel (up to 1024,
/// then the pacer waits) and their wait shows as send lag.
async fn arrivals(shared: Rc<Shared>, start: Instant, rate: f64, max_in_flight: u32) {
    // Bounded: a pacer far ahead of this thread (a rate it cannot keep up with) waits
    // instead of queueing without limit; the arrivals keep their scheduled times, so the
    // wait still shows as send lag.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Instant>(1024);
    let (end, seed) = (shared.end, shared.settings.seed);
    let pacer = std::thread::Builder::new()
        .name("loadtest-pacer".into())
        .spawn(move || {
            let mut rng = SplitMix64(seed);
            let mut next = start;
            loop {
                next += Duration::from_secs_f64(rng.exponential(rate));
                if next >= end {
                    break;
                }
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
                if tx.blocking_send(next).is_err() {
                    break;
                }
            }
        });
    if let Err(e) = pacer {
        shared
            .stats
            .borrow_mut()
            .error(format!("client: cannot start the pacer thread: {e}"));
        shared.task_ended();
        return;
    }
    let pool: Rc<RefCell<Vec<Client>>> = Rc::default();
    while let Some(scheduled) = rx.recv().await {
        if !shared.take_ticket() {
            break;
        }
        if shared.in_flight.get() >= u64::from(max_in_flight) {
            let mut stats = shared.stats.borrow_mut();
            if scheduled >= shared.window_start {
                stats.started += 1;
            }
            stats.error("client limit: arrival dropped (max in flight)".into());
            continue;
        }
        // Counted now, not when the task first runs: arrivals that queued up would all
        // pass the check above before any of their tasks started.
        shared.enter_flight();
        let mut client = pool.borrow_mut().pop().unwrap_or_default();
        let (shared2, pool2) = (shared.clone(), pool.clone());
        shared.task_started();
        tokio::task::spawn_local(async move {
            one_ask(&shared2, &mut client, Some(scheduled)).await;
            pool2.borrow_mut().push(client);
            shared2.task_ended();
        });
    }
    shared.task_ended();
}

/// Sends one ask and records how it ended.
///
/// The caller has already counted it in `in_flight` ([`Shared::enter_flight`]); it
/// leaves when the ask ends.
async fn one_ask(shared: &Shared, client: &mut Client, scheduled: Option<Instant>) {
    let start = Instant::now();
    let measured = scheduled.unwrap_or(start) >= shared.window_start;
    if measured {
        shared.open_window();
        // The tool's own lag: from the scheduled arrival to the moment the ask begins.
        // Connecting comes after, and is the server's (it has its own histogram).
        if let Some(scheduled) = scheduled {
            let lag = start.saturating_duration_since(scheduled);
            shared.stats.borrow_mut().send_lag.record_duration(lag);
        }
    }
    let timeout_at = start + shared.settings.stream_timeout;
    let deadline = timeout_at.min(shared.end);
    let user = shared.next_user.get();
    shared.next_user.set((user + 1) % shared.settings.users);
    if measured {
        shared.stats.borrow_mut().started += 1;
    }

    let observer = AskObserver {
        shared,
        measured,
        scheduled,
        sent: Cell::new(None),
    };
    let ask = client.ask(&shared.target, user, &shared.read_buf, &observer);
    let result = tokio::time::timeout_at(deadline.into(), ask).await;
    shared.in_flight.set(shared.in_flight.get() - 1);

    let mut stats = shared.stats.borrow_mut();
    match result {
        Err(_) if timeout_at >= shared.end => {
            client.disconnect();
            shared.cut_at_end.set(shared.cut_at_end.get() + 1);
        }
        Err(_) => {
            client.disconnect();
            stats.error("timeout".into());
        }
        Ok(Ok(Finished { tokens, total })) => {
            stats.completed += 1;
            if measured {
                stats.total.record_duration(total);
            }
            let (lo, hi) = stats.tokens_per_answer.unwrap_or((tokens, tokens));
            stats.tokens_per_answer = Some((lo.min(tokens), hi.max(tokens)));
            if let Some(expected) = shared.settings.expect_tokens
                && tokens != expected
            {
                stats.error(format!("token count: {tokens} instead of {expected}"));
            }
        }
        Ok(Err(failure)) => stats.error(failure.to_string()),
    }
}

/// The progress line: elapsed, phase, answers, token rate, TTFT so far, errors.
struct Progress {
    enabled: bool,
    tty: bool,
    label: String,
    start: Instant,
    last: Instant,
    last_tokens: u64,
}

impl Progress {
    fn new(enabled: bool, label: &str, start: Instant) -> Self {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            label: label.to_string(),
            start,
            last: start,
            last_tokens: 0,
        }
    }

    fn print(&mut self, shared: &Shared, now: Instant) {
        if !self.enabled {
            shared.stats.borrow_mut().fold_recent();
            return;
        }
        let tokens = shared.tokens_seen.get();
        let rate = (tokens - self.last_tokens) as f64
            / now
                .saturating_duration_since(self.last)
                .as_secs_f64()
                .max(1e-9);
        self.last = now;
        self.last_tokens = tokens;
        let phase = if now < shared.window_start {
            "warm-up"
        } else {
            "measuring"
        };
        let mut stats = shared.stats.borrow_mut();
        let line = format!(
            "[{}] {:>5.1}s {phase:<9} answers {:>8}  tokens/s {:>9.0}  ttft p50 {} p99 {} (last 1s)  open {:>5}  errors {}",
            self.label,
            now.saturating_duration_since(self.start).as_secs_f64(),
            stats.completed,
            rate,
            fmt_ms(stats.ttft_recent.quantile(0.5)),
            fmt_ms(stats.ttft_recent.quantile(0.99)),
            shared.in_flight.get(),
            stats.errors.values().sum::<u64>(),
        );
        stats.fold_recent();
        drop(stats);
        self.emit(&line, false);
    }

    fn finish(&mut self, now: Instant, stats: &Stats) {
        if !self.enabled {
            return;
        }
        let line = format!(
            "[{}] {:>5.1}s done      answers {:>8}  token events {}  errors {}",
            self.label,
            now.saturating_duration_since(self.start).as_secs_f64(),
            stats.completed,
            stats.token_events,
            stats.errors.values().sum::<u64>(),
        );
        self.emit(&line, true);
    }

    fn emit(&self, line: &str, last: bool) {
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            // Rewrite one line in place; end it with a newline when the run is over.
            write!(err, "\r\x1b[K{line}{}", if last { "\n" } else { "" })
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

/// Milliseconds with three decimals, or `-`.
fn fmt_ms(ns: Option<u64>) -> String {
    ns.map_or_else(|| "-".into(), |v| format!("{:.3}ms", v as f64 / 1e6))
}

/// splitmix64: a small, fast, well-mixed generator for arrival times (no `rand` crate for
/// one exponential draw per ask).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// An exponential draw with mean `1 / rate` seconds: the gap between Poisson arrivals.
    fn exponential(&mut self, rate: f64) -> f64 {
        -self.unit().ln() / rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_gaps_have_the_right_mean() {
        let mut rng = SplitMix64(1);
        let n = 200_000;
        let mean = (0..n).map(|_| rng.exponential(1000.0)).sum::<f64>() / f64::from(n);
        assert!((mean - 0.001).abs() < 0.00002, "mean {mean}");
        let mut rng = SplitMix64(2);
        assert!((0..10_000).all(|_| {
            let u = rng.unit();
            u > 0.0 && u <= 1.0
        }));
    }

    fn settings(addr: &str) -> Settings {
        Settings {
            label: "t".into(),
            addr: addr.parse().unwrap(),
            path: "/".into(),
            query: "q".into(),
            load: Load::Closed { concurrency: 1 },
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
        }
    }

    #[test]
    fn only_loopback_targets() {
        assert!(validate(&settings("127.0.0.1:1")).is_ok());
        assert!(validate(&settings("127.9.9.9:1")).is_ok());
        assert!(validate(&settings("[::1]:1")).is_ok());
        let err = validate(&settings("10.0.0.1:80")).unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(validate(&settings("[2001:db8::1]:80")).is_err());
    }

    #[test]
    fn settings_are_checked() {
        let mut s = settings("127.0.0.1:1");
        s.load = Load::Closed { concurrency: 0 };
        assert!(validate(&s).is_err());
        s.load = Load::Open {
            rate: 0.0,
            max_in_flight: 1,
        };
        assert!(validate(&s).is_err());
        s.load = Load::Open {
            rate: f64::NAN,
            max_in_flight: 1,
        };
        assert!(validate(&s).is_err());
    }
}
