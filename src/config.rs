//! Every knob of the server, one field per flag, with the SPEC's defaults.
//!
//! The binary parses these from flags or `ASKSTREAM_*` environment variables; embedders
//! build a [`Config`] with [`Config::default`] and change what they need.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// The server's configuration.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "askstream",
    version,
    about = "Streams RAG answers as Server-Sent Events, with self-refunding per-user quotas."
)]
pub struct Config {
    /// Address to listen on (HTTP/1.1 and h2c on one port).
    #[arg(long, env = "ASKSTREAM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Keys file: one `<api-key> <user-id> [limit]` per line, `#` comments. Without it the
    /// server runs in open mode (user = bearer text, else client IP).
    #[arg(long, env = "ASKSTREAM_KEYS")]
    pub keys: Option<PathBuf>,

    /// Folder of `.md`/`.txt` documents to index; the built-in corpus when absent.
    #[arg(long, env = "ASKSTREAM_DOCS")]
    pub docs: Option<PathBuf>,

    /// Which generator answers: `sim` (built-in, deterministic) or `openai` (an
    /// OpenAI-compatible server, see the `--upstream-*` flags).
    #[arg(long, env = "ASKSTREAM_GENERATOR", value_enum, default_value_t = GeneratorKind::Sim)]
    pub generator: GeneratorKind,

    /// `openai` generator: the API base, as OpenAI clients take it (e.g.
    /// `http://127.0.0.1:8000/v1`); requests go to `BASE/chat/completions`.
    #[arg(long, env = "ASKSTREAM_UPSTREAM_URL")]
    pub upstream_url: Option<String>,

    /// `openai` generator: the model name the upstream serves.
    #[arg(long, env = "ASKSTREAM_UPSTREAM_MODEL")]
    pub upstream_model: Option<String>,

    /// `openai` generator: the name of the environment variable holding the upstream API
    /// key (sent as `Authorization: Bearer`); no key is sent without it. The name, not the
    /// key, so the key never appears in a command line or `ps`.
    #[arg(long, env = "ASKSTREAM_UPSTREAM_API_KEY_ENV")]
    pub upstream_api_key_env: Option<String>,

    /// Sim generator: delay before the first token, in milliseconds.
    #[arg(long, env = "ASKSTREAM_SIM_TTFT_MS", default_value_t = 150)]
    pub sim_ttft_ms: u64,

    /// Sim generator: delay between tokens, in milliseconds (0 = as fast as the client reads).
    #[arg(long, env = "ASKSTREAM_SIM_TOKEN_MS", default_value_t = 20)]
    pub sim_token_ms: u64,

    /// Sim generator: exact number of token events per answer.
    #[arg(long, env = "ASKSTREAM_SIM_TOKENS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub sim_tokens: u32,

    /// Asks per user per window (a key in the keys file may set its own).
    #[arg(long, env = "ASKSTREAM_QUOTA_LIMIT", default_value_t = 20)]
    pub quota_limit: u32,

    /// Quota window length, aligned to the Unix epoch (e.g. `24h`, `1h`, `90s`).
    #[arg(long, env = "ASKSTREAM_QUOTA_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub quota_window: Duration,

    /// Seconds without an event after which a `: keep-alive` comment is sent.
    #[arg(long, env = "ASKSTREAM_HEARTBEAT_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_secs: u64,

    /// Frames buffered per stream before the generator waits for the client.
    #[arg(long, env = "ASKSTREAM_STREAM_BUFFER", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub stream_buffer: u32,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "ASKSTREAM_MAX_BODY_BYTES", default_value_t = 65536)]
    pub max_body_bytes: u64,

    /// Answers in flight at once; more are refused with `OVERLOADED`.
    #[arg(long, env = "ASKSTREAM_MAX_STREAMS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams: u32,

    /// Seconds allowed for request headers (and, separately, the body) to arrive.
    #[arg(long, env = "ASKSTREAM_HEADER_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_secs: u64,

    /// Seconds after which a silent peer (no ACKs, no keepalive replies) is dropped.
    #[arg(long, env = "ASKSTREAM_DEAD_PEER_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub dead_peer_secs: u64,

    /// Seconds a client may leave its stream undrained before `SLOW_CLIENT`.
    #[arg(long, env = "ASKSTREAM_SLOW_CLIENT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub slow_client_secs: u64,

    /// Milliseconds to wait for the generator's first token before `UPSTREAM_TIMEOUT`.
    #[arg(long, env = "ASKSTREAM_TTFT_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub ttft_timeout_ms: u64,

    /// Milliseconds allowed between two generator chunks before `UPSTREAM_TIMEOUT`.
    #[arg(long, env = "ASKSTREAM_IDLE_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_ms: u64,

    /// Seconds answers in flight get to finish after SIGINT/SIGTERM.
    #[arg(long, env = "ASKSTREAM_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Runtime worker threads; default: the CPUs this process may run on. With 1, the
    /// server runs on a single-threaded runtime (no work stealing, no cross-thread wake-ups).
    #[arg(long, env = "ASKSTREAM_WORKERS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: Option<u32>,
}

/// The generators the binary can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GeneratorKind {
    /// Built-in simulated model: answers from the retrieved passages, paced by the sim flags.
    Sim,
    /// An OpenAI-compatible streaming chat-completions server (vLLM, llama.cpp, Ollama, …):
    /// needs `--upstream-url` and `--upstream-model`.
    Openai,
}

impl Default for Config {
    /// The SPEC defaults, ignoring flags and environment.
    fn default() -> Self {
        // Parsing an empty command line yields exactly the declared defaults; `env` lookups
        // are skipped because `Config::command()` is rebuilt without them.
        let cmd = <Config as clap::CommandFactory>::command();
        let cmd = strip_env(cmd);
        let matches = cmd.get_matches_from(["askstream"]);
        <Config as clap::FromArgMatches>::from_arg_matches(&matches)
            .expect("defaults satisfy their own parsers")
    }
}

fn strip_env(cmd: clap::Command) -> clap::Command {
    let ids: Vec<_> = cmd.get_arguments().map(|a| a.get_id().clone()).collect();
    ids.into_iter()
        .fold(cmd, |cmd, id| cmd.mut_arg(id, |a| a.env(None::<&str>)))
}

impl Config {
    /// Time allowed before the first token.
    pub fn ttft_timeout(&self) -> Duration {
        Duration::from_millis(self.ttft_timeout_ms)
    }

    /// Time allowed between two generator chunks.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// Idle time after which a heartbeat is sent.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }

    /// Time a client may leave its stream full.
    pub fn slow_client(&self) -> Duration {
        Duration::from_secs(self.slow_client_secs)
    }

    /// Time allowed for headers, and separately for the body.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }

    /// Time after which a silent peer is dropped.
    pub fn dead_peer(&self) -> Duration {
        Duration::from_secs(self.dead_peer_secs)
    }

    /// Time answers in flight get after a shutdown signal.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// Parses `90`, `90s`, `15m`, `24h`, `7d` or `250ms` into a duration (at least 1 s).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_span(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("`{}` is shorter than one second", s.trim()));
    }
    Ok(d)
}

/// Parses a span of time: a number (decimals allowed) and a unit, `ms`, `s` (or none),
/// `m`, `h` or `d`; zero is allowed. Shared with the load tool's flags.
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
    fn defaults_are_the_spec_defaults() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.quota_limit, 20);
        assert_eq!(c.quota_window, Duration::from_secs(86_400));
        assert_eq!((c.sim_ttft_ms, c.sim_token_ms, c.sim_tokens), (150, 20, 64));
        assert_eq!(c.heartbeat_secs, 15);
        assert_eq!(c.stream_buffer, 64);
        assert_eq!(c.max_body_bytes, 65536);
        assert_eq!(c.max_streams, 10_000);
        assert_eq!(c.shutdown_grace_secs, 30);
        assert_eq!(
            (c.header_timeout_secs, c.dead_peer_secs, c.slow_client_secs),
            (10, 30, 30)
        );
        assert_eq!((c.ttft_timeout_ms, c.idle_timeout_ms), (30_000, 30_000));
        assert_eq!(c.generator, GeneratorKind::Sim);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10ms").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("0").is_err());
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

    /// The README's promise: every flag has an `ASKSTREAM_*` variable named after it, and
    /// the flags table lists both.
    #[test]
    fn every_flag_has_its_env_variable_and_a_readme_row() {
        use clap::CommandFactory;
        let readme = include_str!("../README.md");
        let command = Config::command();
        let flags: Vec<_> = command
            .get_arguments()
            .filter_map(|a| a.get_long().map(|long| (long, a.get_env())))
            .filter(|(long, _)| !matches!(*long, "help" | "version"))
            .collect();
        assert!(flags.len() > 20, "{} flags", flags.len());
        for (long, env) in flags {
            let expected = format!("ASKSTREAM_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(
                env.and_then(|e| e.to_str()),
                Some(expected.as_str()),
                "--{long}"
            );
            let row = format!("| `--{long}` | `{expected}` |");
            assert!(readme.contains(&row), "README has no row {row}");
        }
    }

    #[test]
    fn flags_override_defaults() {
        let c = Config::try_parse_from(["askstream", "--quota-limit", "3", "--sim-tokens", "10"])
            .unwrap();
        assert_eq!((c.quota_limit, c.sim_tokens), (3, 10));
        assert!(Config::try_parse_from(["askstream", "--sim-tokens", "0"]).is_err());
    }
}
