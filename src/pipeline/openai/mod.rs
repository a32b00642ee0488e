//! A real model behind the stream: the generator for any OpenAI-compatible streaming
//! chat-completions server (vLLM, llama.cpp's server, Ollama, OpenAI itself behind a TLS
//! proxy, …).
//!
//! # What it sends
//!
//! `POST {base}/chat/completions`, where `base` is the API base as OpenAI clients take it
//! (`http://127.0.0.1:8000/v1`), with `Authorization: Bearer <key>` when a key is
//! configured, `Accept: text/event-stream`, `Accept-Encoding: identity` and this body:
//!
//! ```json
//! {"model": "…", "stream": true, "stream_options": {"include_usage": true},
//!  "max_tokens": 2048,
//!  "messages": [{"role": "system", "content": "…sources…"}, {"role": "user", "content": "…question…"}]}
//! ```
//!
//! The messages come from a [`PromptBuilder`]; the default [`PromptTemplate`] puts the
//! numbered sources in the system message and the question in the user message.
//! `stream_options.include_usage` asks for the token counts that fill `done.usage`; the
//! servers above all understand it. `max_tokens` is [`OpenAiConfig::max_tokens`], left out
//! when that is `None`; a service built from a
//! [`ServiceConfig`](crate::ServiceConfig) sets it to `max_answer_tokens` (or to the
//! config's own value, if smaller), so the model stops where the server would cut the
//! answer anyway.
//!
//! # What it makes of the answer
//!
//! The response body is read frame by frame into the crate's own SSE
//! [`Decoder`](crate::sse::decode::Decoder), and each `data:` event is parsed as it
//! completes:
//!
//! - a non-empty `choices[0].delta.content` is one [`Chunk::Token`](crate::pipeline::Chunk),
//!   yielded at once;
//! - the role chunk, empty or `null` deltas and `finish_reason` chunks are not tokens;
//! - a `usage` object becomes a [`Chunk::Usage`](crate::pipeline::Chunk);
//! - `[DONE]` ends the answer. A body that ends cleanly right after a `finish_reason` but
//!   without `[DONE]` (some older servers) also ends it; any other early end is a failure.
//!
//! What one answer can cost is bounded whatever the upstream sends: one event, multi-line
//! `data` included, is at most 1 MiB (the decoder's line and event limits); the number of
//! tokens is bounded by the server, which ends the answer (and drops this stream, closing
//! the connection) after `max_answer_tokens` token events; and a response the decoder
//! could not read (not `text/event-stream`, or compressed) is refused from its head alone.
//!
//! # Failures
//!
//! Each is a [`PipelineError`] of kind `Upstream` (the client sees `UPSTREAM_ERROR`, and the
//! ask is refunded): a connection refused or cut, a non-2xx status (the message gives the
//! status and the upstream's `error.message` if its body was a JSON error, clipped to 200
//! characters, with the key scrubbed out; never the raw body), a 2xx answer that is JSON
//! or any other type instead of an event stream, a 2xx event stream with a
//! `content-encoding` other than `identity`, an event larger than 1 MiB, a malformed chunk,
//! an error object inside the stream, or the end of the body before `[DONE]`. Timeouts (`UPSTREAM_TIMEOUT`) are not this module's
//! business: the server applies `--ttft-timeout-ms` and `--idle-timeout-ms` to every
//! generator, and drops the stream when they pass.
//!
//! # Cancellation
//!
//! The [`TokenStream`] owns the pending response or the response body, nothing else. The
//! server drops the stream when the client leaves, is too slow, or the server stops;
//! hyper then closes the upstream connection at once (an HTTP/1.1 connection in the middle
//! of a response cannot be reused), so the model stops generating for nobody. This holds
//! in every phase: connecting, waiting for the response head, and streaming.
//!
//! # Connections
//!
//! One hyper-util client per generator, shared by all asks: HTTP/1.1 with keep-alive and a
//! connection pool, `TCP_NODELAY` on. A connection goes back to the pool when an answer is
//! read to its end, and is closed when an answer is abandoned. Cleartext HTTP only:
//! an `https://` base is refused at startup (put a TLS-terminating proxy in front of such
//! an upstream); h2 would need prior knowledge, which the servers above do not offer on
//! cleartext, so HTTP/1.1 it is.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use askstream::pipeline::openai::{ApiKey, OpenAiConfig, OpenAiGenerator, PromptTemplate};
//! use askstream::{AskService, ServiceConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = OpenAiConfig::new("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-7B-Instruct")
//!     .with_api_key(ApiKey::from_env("VLLM_API_KEY")?);
//! let generator = OpenAiGenerator::new(config)?.with_template(
//!     PromptTemplate::default().with_instructions("Answer in one short paragraph, citing [n]."),
//! );
//! let service = AskService::builder(ServiceConfig::default())
//!     .generator(Arc::new(generator))
//!     .build()?;
//! # drop(service);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_TYPE, HeaderValue, USER_AGENT};
use http::{Method, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::pipeline::{Generator, PipelineError, Prompt, TokenStream};

mod prompt;
mod stream;
mod wire;

pub use prompt::{ChatMessage, PromptBuilder, PromptTemplate, Role};

use stream::UpstreamStream;
use wire::{ChatRequest, StreamOptions};

/// How long a pooled connection may stay idle before it is dropped. Shorter than the
/// keep-alive timeout of the usual servers (5 s for uvicorn, which serves vLLM, and for
/// llama.cpp's server), so askstream never sends a request on a connection the server is
/// just closing, which would fail that ask.
const POOL_IDLE: Duration = Duration::from_secs(4);

/// An upstream API key. Its `Debug` never shows it, and nothing in askstream logs it.
#[derive(Clone)]
pub struct ApiKey {
    secret: Arc<str>,
    /// The environment variable it came from, for messages about it.
    var: Option<Arc<str>>,
}

impl ApiKey {
    /// A key given directly. Surrounding whitespace is dropped.
    pub fn new(key: impl AsRef<str>) -> Self {
        ApiKey {
            secret: key.as_ref().trim().into(),
            var: None,
        }
    }

    /// The key held by the environment variable `var` (surrounding whitespace dropped).
    ///
    /// # Errors
    /// [`ConfigError::MissingKey`] when the variable is unset, empty or not Unicode. The
    /// error names the variable, never a value.
    pub fn from_env(var: &str) -> Result<Self, ConfigError> {
        let value = std::env::var(var).unwrap_or_default();
        let key = ApiKey {
            secret: value.trim().into(),
            var: Some(var.into()),
        };
        if key.secret.is_empty() {
            return Err(ConfigError::MissingKey {
                var: var.to_owned(),
            });
        }
        Ok(key)
    }

    fn header(&self) -> Result<HeaderValue, ConfigError> {
        let bad = || ConfigError::BadKey {
            var: self.var.as_deref().map(str::to_owned),
        };
        if self.secret.is_empty() {
            return Err(bad());
        }
        let mut value =
            HeaderValue::try_from(format!("Bearer {}", self.secret)).map_err(|_| bad())?;
        // Keeps it out of hyper's own debug output and out of HPACK tables.
        value.set_sensitive(true);
        Ok(value)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("from_env", &self.var)
            .finish_non_exhaustive()
    }
}

/// Where the upstream is and how to talk to it.
#[derive(Clone, Debug)]
pub struct OpenAiConfig {
    /// The API base, as OpenAI clients take it: `http://127.0.0.1:8000/v1`. Requests go to
    /// `{base_url}/chat/completions` (a query string, if any, is kept).
    pub base_url: String,
    /// The model name the upstream serves (vLLM: the `--served-model-name`, Ollama: the
    /// model tag).
    pub model: String,
    /// Sent as `Authorization: Bearer`; no such header when `None`.
    pub api_key: Option<ApiKey>,
    /// Sent as `max_tokens`, the longest answer the model may give; not sent when `None`.
    /// A service built from a [`ServiceConfig`](crate::ServiceConfig) whose generator is
    /// this config sets it to `max_answer_tokens`, or keeps this value if it is smaller.
    /// At least 1.
    pub max_tokens: Option<u32>,
}

impl OpenAiConfig {
    /// A configuration without a key.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        OpenAiConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            max_tokens: None,
        }
    }

    /// The same with a key.
    pub fn with_api_key(mut self, key: ApiKey) -> Self {
        self.api_key = Some(key);
        self
    }

    /// The same with `max_tokens` sent upstream (see [`max_tokens`](Self::max_tokens)).
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }
}

/// Why an [`OpenAiGenerator`] could not be configured. Messages name flags and variables,
/// never a key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The URL cannot be used.
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An `https://` URL: this build speaks cleartext HTTP only.
    Https {
        /// The URL as given.
        url: String,
    },
    /// The URL carries `user:password@`; keys belong in the key variable.
    CredentialsInUrl,
    /// The key variable is unset or empty.
    MissingKey {
        /// The variable's name.
        var: String,
    },
    /// The key cannot be sent in a header (control characters, or empty).
    BadKey {
        /// The variable it came from, if any.
        var: Option<String>,
    },
    /// The model name is empty.
    EmptyModel,
    /// `max_tokens` is 0: no answer could be given.
    ZeroMaxTokens,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::EmptyModel => f.write_str("the upstream model name is empty"),
            ConfigError::ZeroMaxTokens => f.write_str("the upstream max_tokens must be at least 1"),
            ConfigError::BadUrl { url, reason } => {
                write!(f, "--upstream-url `{url}` {reason}")
            }
            ConfigError::Https { url } => write!(
                f,
                "--upstream-url `{url}` uses https, and askstream speaks plain HTTP to its \
                 upstream; put a TLS-terminating proxy in front of the upstream and give its \
                 http:// address"
            ),
            ConfigError::CredentialsInUrl => f.write_str(
                "--upstream-url must not carry credentials (user:password@); put the key in \
                 an environment variable and name it with --upstream-api-key-env",
            ),
            ConfigError::MissingKey { var } => write!(
                f,
                "the environment variable {var}, named by --upstream-api-key-env, is not set \
                 or is empty"
            ),
            ConfigError::BadKey { var: Some(var) } => write!(
                f,
                "the API key in {var} cannot be sent in an HTTP header (it is empty or \
                 contains control characters)"
            ),
            ConfigError::BadKey { var: None } => f.write_str(
                "the API key cannot be sent in an HTTP header (it is empty or contains \
                 control characters)",
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The `openai` [`Generator`]: streams answers from an OpenAI-compatible server (see the
/// [module docs](self)). Cheap to share; all asks use one connection pool.
pub struct OpenAiGenerator {
    client: Client<HttpConnector, Full<Bytes>>,
    /// `{base}/chat/completions`.
    endpoint: Uri,
    model: String,
    /// Sent as `max_tokens` when set.
    max_tokens: Option<u32>,
    /// `Bearer <key>`, marked sensitive.
    authorization: Option<HeaderValue>,
    /// The key itself, only to scrub it from upstream error text.
    secret: Option<Arc<str>>,
    template: Arc<dyn PromptBuilder>,
}

impl OpenAiGenerator {
    /// A generator for `config`, with the default [`PromptTemplate`].
    ///
    /// Nothing is connected yet: the first ask opens the first connection.
    ///
    /// # Errors
    /// An unusable URL (not `http://`, no host, credentials in it), an empty model name, or
    /// a key that cannot be sent in a header, or a `max_tokens` of 0.
    pub fn new(config: OpenAiConfig) -> Result<Self, ConfigError> {
        let endpoint = endpoint(&config.base_url)?;
        if config.model.trim().is_empty() {
            return Err(ConfigError::EmptyModel);
        }
        if config.max_tokens == Some(0) {
            return Err(ConfigError::ZeroMaxTokens);
        }
        let authorization = config.api_key.as_ref().map(ApiKey::header).transpose()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Ok(OpenAiGenerator {
            client,
            endpoint,
            model: config.model.trim().to_owned(),
            max_tokens: config.max_tokens,
            authorization,
            secret: config.api_key.map(|k| k.secret),
            template: Arc::new(PromptTemplate::default()),
        })
    }

    /// Uses `template` to build the messages instead of the default [`PromptTemplate`].
    pub fn with_template(mut self, template: impl PromptBuilder) -> Self {
        self.template = Arc::new(template);
        self
    }

    /// Where requests go: `{base}/chat/completions`.
    pub fn endpoint(&self) -> &Uri {
        &self.endpoint
    }

    /// The model asked for.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The `max_tokens` sent upstream, if any.
    pub fn max_tokens(&self) -> Option<u32> {
        self.max_tokens
    }

    fn request(&self, prompt: &Prompt) -> Result<Request<Full<Bytes>>, PipelineError> {
        let messages = self.template.messages(prompt);
        let body = serde_json::to_vec(&ChatRequest {
            model: &self.model,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            max_tokens: self.max_tokens,
            messages: &messages,
        })
        .map_err(|e| PipelineError::internal(format!("cannot encode the upstream request: {e}")))?;
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.endpoint.clone();
        let headers = req.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        // The decoder reads the body as it comes; a compressed stream is refused.
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("askstream/", env!("CARGO_PKG_VERSION"))),
        );
        if let Some(auth) = &self.authorization {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        Ok(req)
    }
}

impl Generator for OpenAiGenerator {
    fn generate(&self, prompt: Prompt) -> TokenStream {
        match self.request(&prompt) {
            // `request` is lazy: nothing is sent until the stream is first polled.
            Ok(req) => Box::pin(UpstreamStream::new(
                self.client.request(req),
                self.secret.clone(),
            )),
            Err(e) => Box::pin(UpstreamStream::failed(e)),
        }
    }
}

impl fmt::Debug for OpenAiGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiGenerator")
            .field("endpoint", &self.endpoint)
            .field("model", &self.model)
            .field("max_tokens", &self.max_tokens)
            .field(
                "api_key",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

/// `{base}/chat/completions`, keeping the base's query string.
fn endpoint(base: &str) -> Result<Uri, ConfigError> {
    let base = base.trim();
    let bad = |reason| ConfigError::BadUrl {
        url: base.to_owned(),
        reason,
    };
    let uri: Uri = base
        .parse()
        .map_err(|_| bad("is not a URL like http://127.0.0.1:8000/v1"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| bad("has no host (expected http://host:port/v1)"))?;
    // Checked before anything that echoes the URL, which must not print a password.
    if authority.as_str().contains('@') {
        return Err(ConfigError::CredentialsInUrl);
    }
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(ConfigError::Https {
                url: base.to_owned(),
            });
        }
        _ => return Err(bad("must start with http://")),
    }
    if authority.host().is_empty() {
        return Err(bad("has no host (expected http://host:port/v1)"));
    }
    let path = uri.path().trim_end_matches('/');
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}/chat/completions?{q}"),
        None => format!("{path}/chat/completions"),
    };
    Uri::builder()
        .scheme("http")
        .authority(authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| bad("cannot be extended with /chat/completions"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_the_base_plus_chat_completions() {
        let e = |b: &str| endpoint(b).map(|u| u.to_string());
        assert_eq!(
            e("http://127.0.0.1:8000/v1").unwrap(),
            "http://127.0.0.1:8000/v1/chat/completions"
        );
        assert_eq!(
            e(" http://localhost:11434/v1/ ").unwrap(),
            "http://localhost:11434/v1/chat/completions"
        );
        assert_eq!(
            e("http://gw.internal/openai/v1?api-version=2").unwrap(),
            "http://gw.internal/openai/v1/chat/completions?api-version=2"
        );
        assert_eq!(e("http://h:1").unwrap(), "http://h:1/chat/completions");
    }

    #[test]
    fn unusable_urls_are_refused_without_echoing_credentials() {
        assert!(matches!(
            endpoint("https://api.openai.com/v1"),
            Err(ConfigError::Https { .. })
        ));
        assert!(matches!(
            endpoint("127.0.0.1:8000/v1"),
            Err(ConfigError::BadUrl { .. })
        ));
        assert!(matches!(
            endpoint("ftp://h/v1"),
            Err(ConfigError::BadUrl { .. })
        ));
        assert!(matches!(
            endpoint("not a url"),
            Err(ConfigError::BadUrl { .. })
        ));
        let err = endpoint("http://me:hunter2@h/v1").unwrap_err();
        assert_eq!(err, ConfigError::CredentialsInUrl);
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        let generator = OpenAiGenerator::new(
            OpenAiConfig::new("http://127.0.0.1:9/v1", "m")
                .with_api_key(ApiKey::new("sk-very-secret")),
        )
        .unwrap();
        let config = OpenAiConfig::new("http://127.0.0.1:9/v1", "m")
            .with_api_key(ApiKey::new("sk-very-secret"));
        for text in [
            format!("{generator:?}"),
            format!("{config:?}"),
            format!("{:?}", generator.authorization),
        ] {
            assert!(!text.contains("sk-very-secret"), "{text}");
        }
    }

    #[test]
    fn keys_that_cannot_be_headers_are_refused() {
        let config =
            OpenAiConfig::new("http://127.0.0.1:9/v1", "m").with_api_key(ApiKey::new("a\nb"));
        assert_eq!(
            OpenAiGenerator::new(config).unwrap_err(),
            ConfigError::BadKey { var: None }
        );
    }

    #[test]
    fn a_zero_max_tokens_is_refused() {
        let config = OpenAiConfig::new("http://127.0.0.1:9/v1", "m").with_max_tokens(0);
        let err = OpenAiGenerator::new(config).unwrap_err();
        assert_eq!(err, ConfigError::ZeroMaxTokens);
        assert_eq!(
            err.to_string(),
            "the upstream max_tokens must be at least 1"
        );
        let config = OpenAiConfig::new("http://127.0.0.1:9/v1", "m").with_max_tokens(1);
        assert_eq!(OpenAiGenerator::new(config).unwrap().max_tokens(), Some(1));
    }

    #[test]
    fn a_missing_variable_is_named_in_the_error() {
        let err = ApiKey::from_env("ASKSTREAM_TEST_CERTAINLY_UNSET_KEY_VAR").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the environment variable ASKSTREAM_TEST_CERTAINLY_UNSET_KEY_VAR, named by \
             --upstream-api-key-env, is not set or is empty"
        );
    }
}
