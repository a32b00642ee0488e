//! askstream's load tool as a library: everything but the command line, which is the
//! `loadtest` binary (`src/main.rs`, flags → runs → reports). It measures time to first
//! token (TTFT) and throughput of any server speaking askstream's event format, at the
//! client, over HTTP/1.1 or h2c, on one thread.
//!
//! ```text
//! cargo run --release -p loadtest -- --spawn --workload all     # the README's table
//! cargo run --release -p loadtest -- --help
//! ```
//!
//! # Modules
//!
//! - [`engine`]: drives a run (closed or open loop, warm-up, measured window) and returns
//!   its [`engine::Results`]; callable without the binary, as the smoke test does;
//! - `client` (internal): one streaming ask at a time over one connection, measured as
//!   events are parsed by askstream's own SSE decoder;
//! - `http1` (internal): just enough HTTP/1.1: request writing, response heads, chunked
//!   coding;
//! - `h2` (internal): asks as HTTP/2 streams (h2c) over a few shared connections, with
//!   hyper's client;
//! - [`tls`]: HTTP/1.1 over TLS (`--tls`): the client's connector and the spawned
//!   servers' certificate;
//! - [`histogram`]: bounded-memory, log-linear latency histograms (what
//!   [`engine::Results`] holds its latencies in);
//! - `procfs` (internal): CPU time, resident memory and the open-file limit, from `/proc`;
//! - [`workload`]: contract §6.1's workloads A–D and the sim settings of a spawned server;
//! - [`spawn`]: `--spawn` (the askstream binary as a pinned child process), CPU pinning,
//!   the open-file limit;
//! - [`report`]: a table per run, the README's Markdown summary, JSON;
//! - [`compare`]: two server configurations (or one) over interleaved rounds
//!   (`--vs-arg`, `--rounds`): the order of the rounds, medians, ratios;
//! - [`svg`]: the TTFT chart.

mod client;
pub mod compare;
pub mod engine;
mod h2;
pub mod histogram;
mod http1;
mod procfs;
pub mod report;
pub mod spawn;
pub mod svg;
pub mod tls;
pub mod workload;
