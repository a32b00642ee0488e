//! What a service is told: every setting, in plain Rust, with the contract's default.
//!
//! An embedder fills a [`ServiceConfig`] in code (`..ServiceConfig::default()` for the
//! rest); the `askstream` binary fills the same struct from its flags, so the library
//! never sees a command line. Durations are [`Duration`]s and counts are `usize`, so no
//! unit lives in a field's name and nothing is converted twice.

use std::path::PathBuf;
use std::time::Duration;

use crate::pipeline::openai::OpenAiConfig;
use crate::pipeline::sim::SimConfig;

/// The settings of one [`AskService`](crate::AskService) and of the server loop that
/// [`serve`](crate::serve)s it.
///
/// `Default` is the contract's defaults (contract §1, §2): the built-in corpus, the
/// simulated generator, open mode, 20 asks a day.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Keys file (`<api-key> <user-id> [limit]` per line). `None`: open mode, where the
    /// user is the bearer text or else the client's address. Ignored when the builder is
    /// given an [`Auth`](crate::auth::Auth).
    pub keys: Option<PathBuf>,
    /// Folder of `.md`/`.txt` documents to index with BM25; `None`: the built-in corpus.
    /// Ignored when the builder is given a retriever.
    pub docs: Option<PathBuf>,
    /// Which generator answers. Ignored when the builder is given a generator.
    pub generator: GeneratorConfig,
    /// Asks per user per window, unless the user's key sets its own.
    pub quota_limit: u32,
    /// Quota window length, aligned to the Unix epoch; whole seconds, at least one.
    pub quota_window: Duration,
    /// Where the quota lives: this process's memory, or a Redis shared by every instance.
    /// Ignored when the builder is given a store.
    pub quota_store: QuotaStoreConfig,
    /// Idle time on a stream after which a `: keep-alive` comment is sent, so proxies do
    /// not time out a connection while a slow model thinks.
    pub heartbeat: Duration,
    /// Frames buffered per stream before the generator waits for the client: the bound
    /// on a stream's memory whatever the client does.
    pub stream_buffer: usize,
    /// Largest request body accepted, in bytes, checked while reading.
    pub max_body_bytes: u64,
    /// Largest request head (request line and headers, or an HTTP/2 header list), in
    /// bytes; a larger one gets 431. At least 8192 (hyper's smallest read buffer).
    pub max_header_bytes: usize,
    /// Connections open at once; at the cap the server stops accepting until one closes,
    /// so a flood of idle sockets cannot exhaust file descriptors.
    pub max_connections: usize,
    /// Streams one HTTP/2 connection may have open at once.
    pub max_streams_per_connection: u32,
    /// An HTTP/2 connection with no open stream for this long is closed, so idle
    /// multiplexed connections do not pile up.
    pub idle_connection: Duration,
    /// TLS on the port: the certificate chain and key. `None`: cleartext HTTP/1.1 and h2c,
    /// for use behind a TLS-terminating proxy.
    pub tls: Option<TlsFiles>,
    /// Origins a browser may call the API from (CORS), exactly as a browser sends them in
    /// `Origin`, e.g. `https://app.example.com`. Empty: no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// Longest answer, in token events: sent upstream as `max_tokens`, and enforced here
    /// (reaching it completes the answer), so a broken upstream cannot stream forever.
    pub max_answer_tokens: u32,
    /// Answers in flight at once; more are refused with `OVERLOADED` rather than queued,
    /// so load beyond capacity fails fast instead of growing latency for everyone.
    pub max_streams: usize,
    /// Time allowed for a request's head, and separately for its body (slowloris).
    pub header_timeout: Duration,
    /// A peer silent this long (no ACKs, no keepalive replies) is dropped, so a client
    /// that vanished without FIN or RST is still refunded in bounded time.
    pub dead_peer: Duration,
    /// Time a client may leave its stream full before `SLOW_CLIENT`.
    pub slow_client: Duration,
    /// Time allowed for the generator's first token before `UPSTREAM_TIMEOUT`.
    pub ttft_timeout: Duration,
    /// Largest gap allowed between two generator chunks before `UPSTREAM_TIMEOUT`.
    pub idle_timeout: Duration,
    /// Time answers in flight get to finish once shutdown begins.
    pub shutdown_grace: Duration,
}

/// The generators the service can build by itself.
#[derive(Clone, Debug)]
pub enum GeneratorConfig {
    /// The built-in simulated model: deterministic answers from the retrieved passages.
    Sim(SimConfig),
    /// An OpenAI-compatible streaming chat-completions server (vLLM, llama.cpp, Ollama…).
    OpenAi(OpenAiConfig),
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig::Sim(SimConfig::default())
    }
}

/// The quota stores the service can build by itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum QuotaStoreConfig {
    /// The in-memory sharded map: one process's count, gone on restart.
    #[default]
    Memory,
    /// A Redis (or Valkey) server shared by every instance (contract §2.1). Needs the
    /// `redis` feature.
    Redis {
        /// `redis://[user:password@]host:port[/db]` or `redis+unix:///path`.
        url: String,
        /// How long a charge is held without renewal: an instance that dies gives its
        /// answers' charges back this long after its last renewal.
        lease: Duration,
        /// A store slower than this is unavailable: the ask is refused, not left waiting.
        timeout: Duration,
    },
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            keys: None,
            docs: None,
            generator: GeneratorConfig::default(),
            quota_limit: 20,
            quota_window: Duration::from_secs(24 * 3600),
            quota_store: QuotaStoreConfig::Memory,
            heartbeat: Duration::from_secs(15),
            stream_buffer: 64,
            max_body_bytes: 65536,
            max_header_bytes: 16384,
            max_connections: 20_000,
            max_streams_per_connection: 100,
            idle_connection: Duration::from_secs(60),
            tls: None,
            cors_origins: Vec::new(),
            max_answer_tokens: 2048,
            max_streams: 10_000,
            header_timeout: Duration::from_secs(10),
            dead_peer: Duration::from_secs(30),
            slow_client: Duration::from_secs(30),
            ttft_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Where the TLS certificate chain and its key are (`--tls-cert`, `--tls-key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server's certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A setting that cannot work, found when the service is built rather than at the
/// first ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidConfig {
    /// The field at fault.
    pub field: &'static str,
    /// Why it cannot work.
    pub reason: &'static str,
}

impl std::fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for InvalidConfig {}

impl ServiceConfig {
    /// Refuses the values that would panic or make the service useless later.
    pub(crate) fn validate(&self) -> Result<(), InvalidConfig> {
        let bad = |field, reason| Err(InvalidConfig { field, reason });
        if self.quota_window < Duration::from_secs(1) {
            return bad("quota_window", "must be at least one second");
        }
        if self.stream_buffer == 0 {
            return bad("stream_buffer", "must hold at least one frame");
        }
        if self.max_streams == 0 {
            return bad("max_streams", "must allow at least one answer");
        }
        if self.max_header_bytes < 8192 {
            return bad("max_header_bytes", "must be at least 8192");
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must allow at least one connection");
        }
        if self.max_streams_per_connection == 0 {
            return bad(
                "max_streams_per_connection",
                "must allow at least one stream",
            );
        }
        if self.idle_connection.is_zero() {
            return bad("idle_connection", "must be positive");
        }
        if self.max_answer_tokens == 0 {
            return bad("max_answer_tokens", "must allow at least one token");
        }
        if self.heartbeat.is_zero() {
            return bad("heartbeat", "must be positive");
        }
        for origin in &self.cors_origins {
            crate::cors::check_origin(origin).or_else(|reason| bad("cors_origins", reason))?;
        }
        if let QuotaStoreConfig::Redis { lease, timeout, .. } = &self.quota_store {
            if *lease < Duration::from_secs(1) {
                return bad("quota_store.lease", "must be at least one second");
            }
            if timeout.is_zero() {
                return bad("quota_store.timeout", "must be positive");
            }
        }
        Ok(())
    }
}

/// Parses a span of time: a number (decimals allowed) and a unit, `ms`, `s` (or none),
/// `m`, `h` or `d`; zero is allowed. The syntax of every duration the binary and the
/// load tool take on their command lines.
pub fn parse_span(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 90s, 1500ms, 15m, 24h"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (use ms, s, m, h or d)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_contract_defaults() {
        let c = ServiceConfig::default();
        assert_eq!(c.quota_limit, 20);
        assert_eq!(c.quota_window, Duration::from_secs(86_400));
        let GeneratorConfig::Sim(sim) = c.generator else {
            panic!("sim by default")
        };
        assert_eq!(sim, SimConfig::default());
        assert_eq!(c.heartbeat, Duration::from_secs(15));
        assert_eq!(c.stream_buffer, 64);
        assert_eq!(c.max_body_bytes, 65536);
        assert_eq!(c.max_streams, 10_000);
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.header_timeout, Duration::from_secs(10));
        assert_eq!(c.dead_peer, Duration::from_secs(30));
        assert_eq!(c.slow_client, Duration::from_secs(30));
        assert_eq!(c.ttft_timeout, Duration::from_millis(30_000));
        assert_eq!(c.idle_timeout, Duration::from_millis(30_000));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn unusable_values_are_refused() {
        let with = |f: fn(&mut ServiceConfig)| {
            let mut c = ServiceConfig::default();
            f(&mut c);
            c.validate().map_err(|e| e.field)
        };
        assert_eq!(
            with(|c| c.quota_window = Duration::from_millis(999)),
            Err("quota_window")
        );
        assert_eq!(with(|c| c.stream_buffer = 0), Err("stream_buffer"));
        assert_eq!(with(|c| c.max_streams = 0), Err("max_streams"));
        assert_eq!(with(|c| c.heartbeat = Duration::ZERO), Err("heartbeat"));
    }

    #[test]
    fn spans_parse() {
        assert_eq!(parse_span("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_span("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_span("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_span("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_span("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_span("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_span("0"), Ok(Duration::ZERO));
        assert!(parse_span("3w").is_err());
        assert!(parse_span("s").is_err());
        assert!(parse_span("1e400").is_err());
    }
}
