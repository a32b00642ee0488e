//! The binary's command line: one flag per setting, each also read from an `ASKSTREAM_*`
//! variable, turned into the library's plain [`ServiceConfig`].
//!
//! Flags carry their unit in their name (`--heartbeat-secs`), because a shell has no
//! types; the library's fields are `Duration`s. The conversion happens once, here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use askstream::pipeline::openai::{ApiKey, OpenAiConfig};
use askstream::pipeline::sim::SimConfig;
use askstream::{GeneratorConfig, QuotaStoreConfig, ServiceConfig};
use clap::Parser;

/// The flags.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "askstream",
    version,
    about = "Streams RAG answers as Server-Sent Events, with self-refunding per-user quotas."
)]
pub(crate) struct Flags {
    /// Address to listen on (HTTP/1.1 and h2c on one port).
    #[arg(long, env = "ASKSTREAM_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,

    /// Keys file: one `<api-key> <user-id> [limit]` per line, `#` comments. Without it the
    /// server runs in open mode (user = bearer text, else client IP).
    #[arg(long, env = "ASKSTREAM_KEYS")]
    keys: Option<PathBuf>,

    /// Folder of `.md`/`.txt` documents to index; the built-in corpus when absent.
    #[arg(long, env = "ASKSTREAM_DOCS")]
    docs: Option<PathBuf>,

    /// Which generator answers: `sim` (built-in, deterministic) or `openai` (an
    /// OpenAI-compatible server, see the `--upstream-*` flags).
    #[arg(long, env = "ASKSTREAM_GENERATOR", value_enum, default_value_t = GeneratorKind::Sim)]
    generator: GeneratorKind,

    /// `openai` generator: the API base, as OpenAI clients take it (e.g.
    /// `http://127.0.0.1:8000/v1`); requests go to `BASE/chat/completions`.
    #[arg(long, env = "ASKSTREAM_UPSTREAM_URL")]
    upstream_url: Option<String>,

    /// `openai` generator: the model name the upstream serves.
    #[arg(long, env = "ASKSTREAM_UPSTREAM_MODEL")]
    upstream_model: Option<String>,

    /// `openai` generator: the name of the environment variable holding the upstream API
    /// key (sent as `Authorization: Bearer`); no key is sent without it. The name, not the
    /// key, so the key never appears in a command line or `ps`.
    #[arg(long, env = "ASKSTREAM_UPSTREAM_API_KEY_ENV")]
    upstream_api_key_env: Option<String>,

    /// Sim generator: delay before the first token, in milliseconds.
    #[arg(long, env = "ASKSTREAM_SIM_TTFT_MS", default_value_t = 150)]
    sim_ttft_ms: u64,

    /// Sim generator: delay between tokens, in milliseconds (0 = as fast as the client reads).
    #[arg(long, env = "ASKSTREAM_SIM_TOKEN_MS", default_value_t = 20)]
    sim_token_ms: u64,

    /// Sim generator: exact number of token events per answer.
    #[arg(long, env = "ASKSTREAM_SIM_TOKENS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    sim_tokens: u32,

    /// Asks per user per window (a key in the keys file may set its own).
    #[arg(long, env = "ASKSTREAM_QUOTA_LIMIT", default_value_t = 20)]
    quota_limit: u32,

    /// Quota window length, aligned to the Unix epoch (e.g. `24h`, `1h`, `90s`).
    #[arg(long, env = "ASKSTREAM_QUOTA_WINDOW", default_value = "24h", value_parser = parse_window)]
    quota_window: Duration,

    /// Where quota lives: `memory` (this process) or a Redis shared by every instance,
    /// `redis://[user:password@]host:port[/db]`, `redis+unix:///path`, or a Redis Cluster as
    /// `redis+cluster://host:port,host:port`.
    #[arg(long, env = "ASKSTREAM_QUOTA_STORE", default_value = "memory")]
    quota_store: String,

    /// Redis store: seconds an answer's charge is held without renewal; an instance that
    /// dies gives its charges back this long after its last renewal.
    #[arg(long, env = "ASKSTREAM_QUOTA_LEASE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    quota_lease_secs: u64,

    /// Redis store: milliseconds to wait for it before an ask gets `QUOTA_UNAVAILABLE`.
    #[arg(long, env = "ASKSTREAM_QUOTA_TIMEOUT_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..))]
    quota_timeout_ms: u64,

    /// Seconds without an event after which a `: keep-alive` comment is sent.
    #[arg(long, env = "ASKSTREAM_HEARTBEAT_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_secs: u64,

    /// Frames buffered per stream before the generator waits for the client.
    #[arg(long, env = "ASKSTREAM_STREAM_BUFFER", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    stream_buffer: u32,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "ASKSTREAM_MAX_BODY_BYTES", default_value_t = 65536)]
    max_body_bytes: u64,

    /// Largest request head in bytes (request line and headers); larger gets 431. At least
    /// 8192.
    #[arg(long, env = "ASKSTREAM_MAX_HEADER_BYTES", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(8192..))]
    max_header_bytes: u32,

    /// Connections open at once; at the cap, accepting waits until one closes.
    #[arg(long, env = "ASKSTREAM_MAX_CONNECTIONS", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,

    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, env = "ASKSTREAM_MAX_STREAMS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    max_streams_per_connection: u32,

    /// Seconds an HTTP/2 connection may stay open with no stream before it is closed.
    #[arg(long, env = "ASKSTREAM_IDLE_CONNECTION_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    idle_connection_secs: u64,

    /// TLS on the port: the certificate chain, PEM (the server's certificate first). With
    /// `--tls-key`; the port then speaks TLS only, with ALPN h2 and http/1.1.
    #[arg(
        long,
        env = "ASKSTREAM_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,

    /// The TLS certificate's private key, PEM. With `--tls-cert`.
    #[arg(
        long,
        env = "ASKSTREAM_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,

    /// An origin a browser may call the API from (CORS), exactly as the browser sends it,
    /// e.g. `https://app.example.com`; repeat the flag for more (in the environment
    /// variable, a comma-separated list). Without it, no CORS headers.
    #[arg(
        long = "cors-origin",
        env = "ASKSTREAM_CORS_ORIGIN",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    cors_origin: Vec<String>,

    /// Longest answer in token events: sent upstream as `max_tokens` and enforced.
    #[arg(long, env = "ASKSTREAM_MAX_ANSWER_TOKENS", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    max_answer_tokens: u32,

    /// Answers in flight at once; more are refused with `OVERLOADED`.
    #[arg(long, env = "ASKSTREAM_MAX_STREAMS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_streams: u32,

    /// Seconds allowed for request headers (and, separately, the body) to arrive.
    #[arg(long, env = "ASKSTREAM_HEADER_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout_secs: u64,

    /// Seconds after which a silent peer (no ACKs, no keepalive replies) is dropped.
    #[arg(long, env = "ASKSTREAM_DEAD_PEER_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    dead_peer_secs: u64,

    /// Seconds a client may leave its stream undrained before `SLOW_CLIENT`.
    #[arg(long, env = "ASKSTREAM_SLOW_CLIENT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    slow_client_secs: u64,

    /// Milliseconds to wait for the generator's first token before `UPSTREAM_TIMEOUT`.
    #[arg(long, env = "ASKSTREAM_TTFT_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    ttft_timeout_ms: u64,

    /// Milliseconds allowed between two generator chunks before `UPSTREAM_TIMEOUT`.
    #[arg(long, env = "ASKSTREAM_IDLE_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_ms: u64,

    /// Seconds answers in flight get to finish after SIGINT/SIGTERM.
    #[arg(long, env = "ASKSTREAM_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    shutdown_grace_secs: u64,

    /// Runtime worker threads; default: the CPUs this process may run on. With 1, the
    /// server runs on a single-threaded runtime (no work stealing, no cross-thread wake-ups).
    #[arg(long, env = "ASKSTREAM_WORKERS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) workers: Option<u32>,
}

/// The generators the binary can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum GeneratorKind {
    /// Built-in simulated model: answers from the retrieved passages, paced by the sim flags.
    Sim,
    /// An OpenAI-compatible streaming chat-completions server (vLLM, llama.cpp, Ollama, …):
    /// needs `--upstream-url` and `--upstream-model`.
    Openai,
}

impl Flags {
    /// The service's settings. Fails, naming the flag, when the `openai` generator lacks
    /// its URL or model, or its key variable is unset.
    pub(crate) fn service_config(&self) -> Result<ServiceConfig, String> {
        let generator = match self.generator {
            GeneratorKind::Sim => GeneratorConfig::Sim(SimConfig {
                ttft: Duration::from_millis(self.sim_ttft_ms),
                token_interval: Duration::from_millis(self.sim_token_ms),
                tokens: self.sim_tokens,
            }),
            GeneratorKind::Openai => GeneratorConfig::OpenAi(self.upstream()?),
        };
        Ok(ServiceConfig {
            keys: self.keys.clone(),
            docs: self.docs.clone(),
            generator,
            quota_limit: self.quota_limit,
            quota_window: self.quota_window,
            quota_store: self.quota_store()?,
            heartbeat: Duration::from_secs(self.heartbeat_secs),
            stream_buffer: self.stream_buffer as usize,
            max_body_bytes: self.max_body_bytes,
            max_header_bytes: self.max_header_bytes as usize,
            max_connections: self.max_connections as usize,
            max_streams_per_connection: self.max_streams_per_connection,
            idle_connection: Duration::from_secs(self.idle_connection_secs),
            tls: self
                .tls_cert
                .clone()
                .zip(self.tls_key.clone())
                .map(|(cert, key)| askstream::TlsFiles { cert, key }),
            cors_origins: self.cors_origin.clone(),
            max_answer_tokens: self.max_answer_tokens,
            max_streams: self.max_streams as usize,
            header_timeout: Duration::from_secs(self.header_timeout_secs),
            dead_peer: Duration::from_secs(self.dead_peer_secs),
            slow_client: Duration::from_secs(self.slow_client_secs),
            ttft_timeout: Duration::from_millis(self.ttft_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
        })
    }

    /// `--quota-store` and its lease and timeout.
    fn quota_store(&self) -> Result<QuotaStoreConfig, String> {
        let url = self.quota_store.trim();
        if url == "memory" {
            return Ok(QuotaStoreConfig::Memory);
        }
        if !(url.starts_with("redis://")
            || url.starts_with("redis+unix://")
            || url.starts_with("redis+cluster://")
            || url.starts_with("valkey://")
            || url.starts_with("unix://"))
        {
            return Err(format!(
                "--quota-store must be `memory`, `redis://host:port[/db]`, \
                 `redis+unix:///path` or `redis+cluster://host:port,host:port` (got `{}`)",
                scheme_only(url)
            ));
        }
        Ok(QuotaStoreConfig::Redis {
            url: url.to_owned(),
            lease: Duration::from_secs(self.quota_lease_secs),
            timeout: Duration::from_millis(self.quota_timeout_ms),
        })
    }

    /// `--upstream-url`, `--upstream-model` and, when named, the key variable.
    fn upstream(&self) -> Result<OpenAiConfig, String> {
        fn given(v: &Option<String>) -> Option<&str> {
            v.as_deref().map(str::trim).filter(|s| !s.is_empty())
        }
        let url = given(&self.upstream_url).ok_or(
            "--generator openai needs --upstream-url (or ASKSTREAM_UPSTREAM_URL), \
             the API base such as http://127.0.0.1:8000/v1",
        )?;
        let model = given(&self.upstream_model).ok_or(
            "--generator openai needs --upstream-model (or ASKSTREAM_UPSTREAM_MODEL), \
             the name of the model the upstream serves",
        )?;
        let mut config = OpenAiConfig::new(url, model);
        if let Some(var) = given(&self.upstream_api_key_env) {
            let key = ApiKey::from_env(var).map_err(|e| format!("upstream: {e}"))?;
            config = config.with_api_key(key);
        }
        Ok(config)
    }
}

/// What a bad `--quota-store` value is shown as: its scheme, never a password after it.
fn scheme_only(url: &str) -> &str {
    url.split_once("://").map_or(url, |(scheme, _)| scheme)
}

/// `--quota-window`: a span of at least one second, since windows are whole seconds.
fn parse_window(s: &str) -> Result<Duration, String> {
    let d = askstream::config::parse_span(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("`{}` is shorter than one second", s.trim()));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Flags, clap::Error> {
        // Built without `env` lookups, so the machine's environment cannot leak in.
        let mut cmd = Flags::command();
        let ids: Vec<_> = cmd.get_arguments().map(|a| a.get_id().clone()).collect();
        for id in ids {
            cmd = cmd.mut_arg(id, |a| a.env(None::<&str>));
        }
        let matches =
            cmd.try_get_matches_from(std::iter::once("askstream").chain(args.iter().copied()))?;
        <Flags as clap::FromArgMatches>::from_arg_matches(&matches)
    }

    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let flags = parse(&[]).unwrap();
        assert_eq!(flags.listen, "127.0.0.1:8080".parse().unwrap());
        let from_flags = format!("{:?}", flags.service_config().unwrap());
        assert_eq!(from_flags, format!("{:?}", ServiceConfig::default()));
    }

    #[test]
    fn windows_parse() {
        assert_eq!(parse_window("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_window("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_window("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_window("10ms").is_err());
        assert!(parse_window("h").is_err());
        assert!(parse_window("0").is_err());
    }

    #[test]
    fn flags_override_defaults() {
        let c = parse(&[
            "--quota-limit",
            "3",
            "--sim-tokens",
            "10",
            "--heartbeat-secs",
            "2",
        ])
        .unwrap()
        .service_config()
        .unwrap();
        assert_eq!(c.quota_limit, 3);
        assert_eq!(c.heartbeat, Duration::from_secs(2));
        let GeneratorConfig::Sim(sim) = c.generator else {
            panic!("sim")
        };
        assert_eq!(sim.tokens, 10);
        assert!(parse(&["--sim-tokens", "0"]).is_err());
    }

    #[test]
    fn quota_store_urls() {
        let store = |args: &[&str]| parse(args).unwrap().service_config().map(|c| c.quota_store);
        assert_eq!(store(&[]), Ok(QuotaStoreConfig::Memory));
        assert_eq!(
            store(&[
                "--quota-store",
                "redis://127.0.0.1:6379/2",
                "--quota-lease-secs",
                "5"
            ]),
            Ok(QuotaStoreConfig::Redis {
                url: "redis://127.0.0.1:6379/2".into(),
                lease: Duration::from_secs(5),
                timeout: Duration::from_millis(250),
            })
        );
        let bad = store(&["--quota-store", "http://user:secret@host"]).unwrap_err();
        assert!(
            bad.contains("--quota-store") && !bad.contains("secret"),
            "{bad}"
        );
        assert!(parse(&["--quota-lease-secs", "0"]).is_err());
    }

    #[test]
    fn openai_needs_its_url_model_and_key_variable() {
        let err = |args: &[&str]| parse(args).unwrap().service_config().unwrap_err();
        assert!(err(&["--generator", "openai"]).contains("--upstream-url"));
        assert!(
            err(&[
                "--generator",
                "openai",
                "--upstream-url",
                "http://127.0.0.1:8000/v1"
            ])
            .contains("--upstream-model")
        );
        let missing = err(&[
            "--generator",
            "openai",
            "--upstream-url",
            "http://127.0.0.1:8000/v1",
            "--upstream-model",
            "m",
            "--upstream-api-key-env",
            "ASKSTREAM_TEST_SURELY_UNSET_KEY",
        ]);
        assert!(
            missing.contains("ASKSTREAM_TEST_SURELY_UNSET_KEY"),
            "{missing}"
        );
    }

    /// The README's promise: every flag has an `ASKSTREAM_*` variable named after it, and
    /// the flags table lists both.
    #[test]
    fn every_flag_has_its_env_variable_and_a_readme_row() {
        let readme = include_str!("../README.md");
        let command = Flags::command();
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
}
