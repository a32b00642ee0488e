//! The ask service: one `match` over (method, path), and the one place where an
//! [`ApiError`] becomes a response.
//!
//! [`AskService`] is a cloneable hyper [`Service`]. The server clones it per connection;
//! an embedder can mount it inside its own hyper service and delegate a path prefix to it
//! (see `examples/embed.rs`). It never returns `Err`: hyper would abort the connection,
//! and every failure here has a proper HTTP answer.
//!
//! An ask passes its checks in this order, each refusing before any quota is touched:
//! `stream` flag → draining → content type → identity → body (size, time) → JSON rules →
//! `--max-streams` → quota. Only then is the answer started.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::service::Service;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::answer::{self, Ask, JsonBody, Pipeline, QueryId};
use crate::auth::{Auth, KeysError};
use crate::config::{Config, GeneratorKind};
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::pipeline::bm25::Bm25Index;
use crate::pipeline::openai::OpenAiGenerator;
use crate::pipeline::sim::{SimConfig, SimGenerator};
use crate::pipeline::{Generator, Retriever};
use crate::quota::{self, QuotaError, QuotaMap, QuotaStore};
use crate::request;
use crate::shutdown::Shutdown;
use crate::sse::body::{SseBody, channel};
use crate::web;

/// The ask endpoint.
pub const ASK_PATH: &str = "/api/v1/ai/ask";
/// The caller's quota.
pub const QUOTA_PATH: &str = "/api/v1/quota";
/// Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";
/// Liveness and draining state, for load balancers.
pub const HEALTH_PATH: &str = "/healthz";

/// The client's address, for open mode's per-IP quota, for an embedder to insert into a
/// request's extensions. (The server itself serves each connection with
/// [`AskService::with_peer`].)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The askstream HTTP API as a hyper service. Cheap to clone (one `Arc`).
pub struct AskService<Q: QuotaStore = QuotaMap> {
    inner: Arc<Inner<Q>>,
    /// The connection's peer, when this clone serves one connection.
    peer: Option<SocketAddr>,
}

impl<Q: QuotaStore> Clone for AskService<Q> {
    fn clone(&self) -> Self {
        AskService {
            inner: self.inner.clone(),
            peer: self.peer,
        }
    }
}

struct Inner<Q> {
    config: Config,
    pipeline: Arc<Pipeline>,
    auth: Auth,
    quota: Arc<Q>,
    /// Bounds answers in flight (`--max-streams`); a permit lives as long as its answer.
    streams: Arc<Semaphore>,
    /// Every spawned answer, so shutdown can wait for their refunds to land.
    answers: TaskTracker,
}

/// Why the service could not be built from its configuration.
#[derive(Debug)]
pub enum StartupError {
    /// The keys file could not be read or parsed.
    Keys(KeysError),
    /// The documents folder could not be indexed.
    Docs {
        /// The folder given with `--docs`.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// The `openai` generator's flags are missing or unusable (no URL or model, an
    /// unusable URL, an unset key variable).
    Upstream(crate::pipeline::openai::ConfigError),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // `Auth::from_file` names the file itself.
            StartupError::Keys(e) => write!(f, "{e}"),
            StartupError::Docs { path, error } => {
                write!(f, "documents folder {}: {error}", path.display())
            }
            StartupError::Upstream(e) => write!(f, "upstream: {e}"),
        }
    }
}

impl std::error::Error for StartupError {}

/// Builds an [`AskService`]: the embedded defaults for anything not given.
pub struct Builder<Q = QuotaMap> {
    config: Config,
    auth: Option<Auth>,
    quota: Arc<Q>,
    retriever: Option<Arc<dyn Retriever>>,
    generator: Option<Arc<dyn Generator>>,
    shutdown: Shutdown,
}

impl AskService<QuotaMap> {
    /// Starts building a service from `config`, with an in-memory quota map.
    pub fn builder(config: Config) -> Builder<QuotaMap> {
        let quota = Arc::new(QuotaMap::new(config.quota_window));
        Builder {
            config,
            auth: None,
            quota,
            retriever: None,
            generator: None,
            shutdown: Shutdown::new(),
        }
    }
}

impl<Q: QuotaStore> Builder<Q> {
    /// Uses this identification instead of `config.keys`.
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Uses another quota store (shared with other services, or not in memory).
    pub fn quota<Q2: QuotaStore>(self, quota: Arc<Q2>) -> Builder<Q2> {
        let Builder {
            config,
            auth,
            retriever,
            generator,
            shutdown,
            ..
        } = self;
        Builder {
            config,
            auth,
            quota,
            retriever,
            generator,
            shutdown,
        }
    }

    /// Uses this retriever instead of BM25 over `config.docs` or the built-in corpus.
    pub fn retriever(mut self, retriever: Arc<dyn Retriever>) -> Self {
        self.retriever = Some(retriever);
        self
    }

    /// Uses this generator instead of the one `config.generator` names.
    pub fn generator(mut self, generator: Arc<dyn Generator>) -> Self {
        self.generator = Some(generator);
        self
    }

    /// Shares a shutdown handle (the server's, or an embedder's own).
    pub fn shutdown(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Loads what was not given (keys file, documents) and builds the service.
    pub fn build(self) -> Result<AskService<Q>, StartupError> {
        let Builder {
            config,
            auth,
            quota,
            retriever,
            generator,
            shutdown,
        } = self;
        let auth = match (auth, &config.keys) {
            (Some(a), _) => a,
            (None, Some(path)) => Auth::from_file(path).map_err(StartupError::Keys)?,
            (None, None) => Auth::Open,
        };
        let retriever = match (retriever, &config.docs) {
            (Some(r), _) => r,
            (None, Some(dir)) => {
                Arc::new(
                    Bm25Index::from_dir(dir).map_err(|error| StartupError::Docs {
                        path: dir.clone(),
                        error,
                    })?,
                )
            }
            (None, None) => Arc::new(Bm25Index::builtin()),
        };
        let generator: Arc<dyn Generator> = match (generator, config.generator) {
            (Some(g), _) => g,
            (None, GeneratorKind::Sim) => Arc::new(SimGenerator::new(SimConfig {
                ttft: std::time::Duration::from_millis(config.sim_ttft_ms),
                token_interval: std::time::Duration::from_millis(config.sim_token_ms),
                tokens: config.sim_tokens,
            })),
            (None, GeneratorKind::Openai) => {
                Arc::new(OpenAiGenerator::from_flags(&config).map_err(StartupError::Upstream)?)
            }
        };
        let pipeline = Arc::new(Pipeline {
            retriever,
            generator,
            shutdown,
            ttft_timeout: config.ttft_timeout(),
            idle_timeout: config.idle_timeout(),
            heartbeat: config.heartbeat(),
            slow_client: config.slow_client(),
            metrics: Arc::new(Metrics::default()),
        });
        let streams = Arc::new(Semaphore::new(config.max_streams as usize));
        let inner = Inner {
            config,
            pipeline,
            auth,
            quota,
            streams,
            answers: TaskTracker::new(),
        };
        Ok(AskService {
            inner: Arc::new(inner),
            peer: None,
        })
    }
}

impl<Q: QuotaStore> AskService<Q> {
    /// A clone that attributes requests without a [`PeerAddr`] extension to `peer`.
    pub fn with_peer(&self, peer: SocketAddr) -> Self {
        AskService {
            inner: self.inner.clone(),
            peer: Some(peer),
        }
    }

    /// The configuration the service was built with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The shutdown handle: [`Shutdown::drain`] refuses new asks, [`Shutdown::stop`] ends
    /// the ones in flight.
    pub fn shutdown(&self) -> &Shutdown {
        &self.inner.pipeline.shutdown
    }

    /// The quota store.
    pub fn quota(&self) -> &Arc<Q> {
        &self.inner.quota
    }

    /// The server's counters and histograms (what `GET /metrics` renders).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.pipeline.metrics
    }

    /// Answers in flight right now (both modes).
    pub fn in_flight(&self) -> usize {
        self.inner.config.max_streams as usize - self.inner.streams.available_permits()
    }

    /// Resolves when every streaming answer spawned so far has finished (settled or
    /// refunded). Used by shutdown; handy in tests.
    pub async fn answers_finished(&self) {
        self.inner.answers.close();
        self.inner.answers.wait().await;
        self.inner.answers.reopen();
    }

    async fn route<B>(self, req: Request<B>) -> Response<AskBody>
    where
        B: Body + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let allow = match (req.method(), req.uri().path()) {
            (&Method::POST, ASK_PATH) => return self.ask(req).await,
            (&Method::GET | &Method::HEAD, QUOTA_PATH) => return self.quota_status(req).await,
            (&Method::GET | &Method::HEAD, HEALTH_PATH) => return self.health(),
            (&Method::GET | &Method::HEAD, METRICS_PATH) => return self.metrics_text(),
            (_, ASK_PATH) => "POST",
            (_, QUOTA_PATH | HEALTH_PATH | METRICS_PATH) => "GET, HEAD",
            (method, path) => match web::asset(path) {
                Some(file) if matches!(*method, Method::GET | Method::HEAD) => {
                    return file.response().map(|b| AskBody::Full(Full::new(b)));
                }
                Some(_) => "GET, HEAD",
                None => {
                    return error_response(
                        &ApiError::new(ErrorCode::NotFound, "no such endpoint"),
                        Mode::Json,
                    );
                }
            },
        };
        let err = ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("this endpoint accepts {allow}"),
        );
        let mut res = error_response(&err, Mode::Json);
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
        res
    }

    fn peer_ip(&self, req_peer: Option<&PeerAddr>) -> Option<std::net::IpAddr> {
        req_peer.map(|p| p.0).or(self.peer).map(|a| a.ip())
    }

    async fn ask<B>(self, req: Request<B>) -> Response<AskBody>
    where
        B: Body + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let received = Instant::now();
        let stream = match request::stream_mode(req.uri()) {
            Ok(s) => s,
            Err(e) => {
                self.metrics().rejected(e.code);
                return error_response(&e, Mode::Json);
            }
        };
        let mode = if stream {
            Mode::Sse(req.version())
        } else {
            Mode::Json
        };
        match self.clone().admit(req, stream, received).await {
            Ok(res) => res,
            Err(e) => {
                self.metrics().rejected(e.code);
                error_response(&e, mode)
            }
        }
    }

    /// Runs every check, charges the quota and starts the answer.
    async fn admit<B>(
        self,
        req: Request<B>,
        stream: bool,
        received: Instant,
    ) -> Result<Response<AskBody>, ApiError>
    where
        B: Body + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let inner = &*self.inner;
        if self.shutdown().is_draining() {
            return Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "the server is shutting down",
            ));
        }
        request::check_content_type(req.headers())?;
        let identity = inner
            .auth
            .identify(req.headers(), self.peer_ip(req.extensions().get()))?;
        let version = req.version();
        let body = request::read_body(
            req.into_body(),
            inner.config.max_body_bytes,
            inner.config.header_timeout(),
        )
        .await?;
        let ask = request::parse_ask(&body)?;
        let permit = inner.streams.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                ErrorCode::Overloaded,
                "too many answers in flight; try again shortly",
            )
            .with_retry_after(1)
        })?;
        let limit = identity.limit.unwrap_or(inner.config.quota_limit);
        let charge = inner
            .quota
            .charge(&identity.user, limit)
            .await
            .map_err(quota_error)?;
        let ask = Ask {
            id: QueryId::next(),
            query: ask.query,
            top_k: ask.top_k,
            user: identity.user,
            received,
        };
        let query_id = query_id_header(&ask.id);
        if stream {
            let (tx, body) = channel(inner.config.stream_buffer as usize);
            let mut answer = Box::pin(answer::stream(
                inner.pipeline.clone(),
                ask,
                charge,
                permit,
                tx,
            ));
            // Run the answer up to its first wait before hyper gets the response: with a
            // generator that has a token ready, the first frame is queued by then, and
            // hyper writes it in the same write as the headers (one syscall, no wake-up
            // round trip). The spawned task's first poll re-registers real wakers, so
            // the no-op waker used here loses nothing.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if answer.as_mut().poll(&mut cx).is_pending() {
                inner.answers.spawn(answer);
            }
            return Ok(sse_response(
                StatusCode::OK,
                AskBody::Sse(body),
                version,
                Some(query_id),
            ));
        }
        // A failure from here on is an answer that started (and was refunded and counted
        // as such), not a rejection, so it is rendered here rather than returned.
        let body = match answer::json(inner.pipeline.clone(), ask, charge, permit).await {
            Ok(body) => body,
            Err(e) => return Ok(error_response(&e, Mode::Json)),
        };
        let mut res = Response::new(AskBody::Json(body));
        res.headers_mut().insert(header::CONTENT_TYPE, JSON);
        res.headers_mut().insert(X_QUERY_ID, query_id);
        Ok(res)
    }

    async fn quota_status<B>(self, req: Request<B>) -> Response<AskBody> {
        let inner = &*self.inner;
        let identity = match inner
            .auth
            .identify(req.headers(), self.peer_ip(req.extensions().get()))
        {
            Ok(i) => i,
            Err(e) => return error_response(&e, Mode::Json),
        };
        let limit = identity.limit.unwrap_or(inner.config.quota_limit);
        match inner.quota.status(&identity.user, limit).await {
            Ok(s) => {
                #[derive(Serialize)]
                #[serde(rename_all = "camelCase")]
                struct Status {
                    limit: u32,
                    remaining: u32,
                    resets_at: String,
                }
                let body = Status {
                    limit: s.limit,
                    remaining: s.remaining,
                    resets_at: quota::rfc3339(s.resets_at),
                };
                json_response(
                    StatusCode::OK,
                    Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
                )
            }
            Err(e) => error_response(&quota_error(e), Mode::Json),
        }
    }

    fn metrics_text(&self) -> Response<AskBody> {
        let mut res = Response::new(AskBody::Full(Full::new(Bytes::from(
            self.metrics().render(self.in_flight() as u64),
        ))));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        res.headers_mut().insert(header::CACHE_CONTROL, NO_CACHE);
        res
    }

    fn health(&self) -> Response<AskBody> {
        let (status, text) = if self.shutdown().is_draining() {
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        } else {
            (StatusCode::OK, "ok\n")
        };
        let mut res = Response::new(AskBody::Full(Full::new(Bytes::from_static(
            text.as_bytes(),
        ))));
        *res.status_mut() = status;
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res.headers_mut().insert(header::CACHE_CONTROL, NO_CACHE);
        res
    }
}

impl<Q: QuotaStore, B> Service<Request<B>> for AskService<Q>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<AskBody>;
    type Error = Infallible;
    /// Boxed because the routing future is an unnameable `async` type.
    type Future = Pin<Box<dyn Future<Output = Result<Response<AskBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.route(req).await) })
    }
}

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");
const NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");
const NO: HeaderValue = HeaderValue::from_static("no");
const KEEP_ALIVE: HeaderValue = HeaderValue::from_static("keep-alive");
const X_ACCEL_BUFFERING: header::HeaderName = header::HeaderName::from_static("x-accel-buffering");
const X_QUERY_ID: header::HeaderName = header::HeaderName::from_static("x-query-id");

fn query_id_header(id: &QueryId) -> HeaderValue {
    // Hex digits are always a valid header value.
    HeaderValue::from_str(id.as_str()).unwrap_or(HeaderValue::from_static("invalid"))
}

/// How an error must be rendered: a JSON body, or one SSE event for a streaming ask.
#[derive(Clone, Copy)]
enum Mode {
    Json,
    Sse(Version),
}

/// The one place an error becomes a response.
fn error_response(err: &ApiError, mode: Mode) -> Response<AskBody> {
    if err.code == ErrorCode::Internal {
        tracing::error!(code = %err.code, message = %err.message, "internal error");
    }
    let mut res = match mode {
        Mode::Json => json_response(err.code.status(), err.to_json()),
        Mode::Sse(version) => sse_response(
            err.code.status(),
            AskBody::Full(Full::new(err.to_event())),
            version,
            None,
        ),
    };
    if let Some(secs) = err.retry_after {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    res
}

fn json_response(status: StatusCode, body: Bytes) -> Response<AskBody> {
    let mut res = Response::new(AskBody::Full(Full::new(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, JSON);
    res
}

fn sse_response(
    status: StatusCode,
    body: AskBody,
    version: Version,
    query_id: Option<HeaderValue>,
) -> Response<AskBody> {
    let mut res = Response::new(body);
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, EVENT_STREAM);
    h.insert(header::CACHE_CONTROL, NO_CACHE);
    h.insert(X_ACCEL_BUFFERING, NO);
    if let Some(id) = query_id {
        h.insert(X_QUERY_ID, id);
    }
    // `connection` is illegal in HTTP/2 and meaningless in HTTP/3.
    if version <= Version::HTTP_11 {
        h.insert(header::CONNECTION, KEEP_ALIVE);
    }
    res
}

fn quota_error(e: QuotaError) -> ApiError {
    let code = match e {
        QuotaError::Exceeded { .. } => ErrorCode::QuotaExceeded,
        QuotaError::Unavailable(_) => ErrorCode::Internal,
    };
    let err = ApiError::new(code, e.to_string());
    match e.retry_after_secs(quota::unix_now()) {
        Some(secs) => err.with_retry_after(secs),
        None => err,
    }
}

/// Every response body the service produces. Concrete, so hyper's write path is
/// monomorphic; the variants are the three shapes of an answer.
#[derive(Debug)]
pub enum AskBody {
    /// A complete small body (errors, quota, health).
    Full(Full<Bytes>),
    /// A streaming answer.
    Sse(SseBody),
    /// A JSON answer, which settles its charge when yielded.
    Json(JsonBody),
}

impl Body for AskBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            AskBody::Full(b) => Pin::new(b).poll_frame(cx),
            AskBody::Sse(b) => Pin::new(b).poll_frame(cx),
            AskBody::Json(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AskBody::Full(b) => b.is_end_stream(),
            AskBody::Sse(b) => b.is_end_stream(),
            AskBody::Json(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AskBody::Full(b) => b.size_hint(),
            AskBody::Sse(b) => b.size_hint(),
            AskBody::Json(b) => b.size_hint(),
        }
    }
}
