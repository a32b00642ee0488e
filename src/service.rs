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
use std::sync::{Arc, Once, RwLock};
use std::task::Context;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use hyper::service::Service;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::Activity;
use crate::answer::{self, Ask, Pipeline, QueryId};
use crate::auth::Auth;
use crate::body::AskBody;
use crate::builder::Builder;
use crate::clock::{rfc3339, unix_now};
use crate::config::ServiceConfig;
use crate::cors::Cors;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::peer::Hangup;
use crate::quota::{QuotaError, QuotaStore};
use crate::request;
use crate::shutdown::{Shutdown, Switch};
use crate::sse::body::channel;
use crate::{web, wire};

/// The ask endpoint.
pub(crate) const ASK_PATH: &str = "/api/v1/ai/ask";
/// The caller's quota.
pub(crate) const QUOTA_PATH: &str = "/api/v1/quota";
/// Prometheus metrics.
pub(crate) const METRICS_PATH: &str = "/metrics";
/// Liveness and draining state, for load balancers.
pub(crate) const HEALTH_PATH: &str = "/healthz";

/// The client's address, for open mode's per-IP quota, for an embedder to insert into a
/// request's extensions. (The server itself serves each connection with
/// [`AskService::with_peer`].)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// What [`AskService::reload`] could not load, with the file and the reason; the old
/// keys or certificate stay in force.
#[derive(Debug, Clone)]
pub struct ReloadError(String);

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReloadError {}

/// The askstream HTTP API as a hyper service. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct AskService {
    inner: Arc<Inner>,
    /// The connection's peer, when this clone serves one connection.
    peer: Option<SocketAddr>,
    /// The connection's requests, when the server keeps deadlines for it (HTTP/2).
    activity: Option<Arc<Activity>>,
    /// The connection's socket, when the server watches it for the client leaving
    /// (HTTP/1).
    hangup: Option<Hangup>,
}

struct Inner {
    config: ServiceConfig,
    cors: Cors,
    /// The TLS acceptor, when the port speaks TLS.
    #[cfg(feature = "tls")]
    tls: Option<Arc<crate::tls::Tls>>,
    pipeline: Arc<Pipeline>,
    /// Swapped whole by a reload; a request holds the read lock only while it looks its
    /// caller up.
    auth: RwLock<Auth>,
    /// The keys file a reload reads again: `config.keys`, unless the embedder handed the
    /// builder an [`Auth`] of its own.
    keys_file: Option<PathBuf>,
    quota: Arc<dyn QuotaStore>,
    /// Bounds answers in flight (`--max-streams`); a permit lives as long as its answer.
    streams: Arc<Semaphore>,
    /// Every spawned answer, so shutdown can wait for their refunds to land.
    answers: TaskTracker,
    /// The quota store's housekeeping starts with the first request (inside a runtime,
    /// whoever built the service) and stops when the service is dropped.
    housekeeping: Once,
    stop_housekeeping: CancellationToken,
    /// Set when [`serve`](crate::serve) stops accepting: from then on hyper closes each
    /// connection after its response, so a response head must not promise `keep-alive`.
    /// Held here, not by the server alone, because the head is rendered here; the
    /// service's drain is not it (a service drained while its server still accepts keeps
    /// its connections open).
    closing: Switch,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_housekeeping.cancel();
    }
}

impl std::fmt::Debug for AskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AskService")
            .field("config", &self.inner.config)
            .field("auth", &self.inner.auth)
            .field("peer", &self.peer)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl AskService {
    /// Starts building a service from `config`; anything not given to the builder comes
    /// from the config's defaults (see [`Builder`]).
    pub fn builder(config: ServiceConfig) -> Builder {
        Builder::new(config)
    }

    /// The builder's last step: the service around its parts.
    pub(crate) fn assemble(
        config: ServiceConfig,
        auth: Auth,
        keys_file: Option<PathBuf>,
        quota: Arc<dyn QuotaStore>,
        pipeline: Pipeline,
        #[cfg(feature = "tls")] tls: Option<Arc<crate::tls::Tls>>,
        #[cfg(not(feature = "tls"))] _tls: Option<Infallible>,
    ) -> Self {
        let streams = Arc::new(Semaphore::new(config.max_streams));
        AskService {
            inner: Arc::new(Inner {
                cors: Cors::new(&config.cors_origins),
                #[cfg(feature = "tls")]
                tls,
                config,
                pipeline: Arc::new(pipeline),
                auth: RwLock::new(auth),
                keys_file,
                quota,
                streams,
                answers: TaskTracker::new(),
                housekeeping: Once::new(),
                stop_housekeeping: CancellationToken::new(),
                closing: Switch::default(),
            }),
            peer: None,
            activity: None,
            hangup: None,
        }
    }

    /// A clone that attributes requests without a [`PeerAddr`] extension to `peer`.
    pub fn with_peer(&self, peer: SocketAddr) -> Self {
        AskService {
            inner: self.inner.clone(),
            peer: Some(peer),
            activity: None,
            hangup: None,
        }
    }

    /// A clone that counts its connection's requests into `activity`.
    pub(crate) fn counting(&self, activity: Arc<Activity>) -> Self {
        AskService {
            activity: Some(activity),
            ..self.clone()
        }
    }

    /// This service, its answers also ending when `hangup` sees the client leave.
    pub(crate) fn watching(self, hangup: Hangup) -> Self {
        AskService {
            hangup: Some(hangup),
            ..self
        }
    }

    /// The TLS acceptor for new connections, when the port speaks TLS.
    #[cfg(feature = "tls")]
    pub(crate) fn tls(&self) -> Option<&Arc<crate::tls::Tls>> {
        self.inner.tls.as_ref()
    }

    /// Reads the keys file and the TLS certificate and key again (contract §1.3, what the
    /// binary does on SIGHUP), so that keys can be revoked and certificates renewed
    /// without a restart, which would cut every answer streaming.
    ///
    /// Asks identified and connections accepted from now on use what was read; answers
    /// already running are untouched, and a live TLS connection keeps its certificate. A
    /// file that fails to load leaves the old one in force. Each outcome is logged. Reads
    /// files: call it from a blocking-friendly context (`spawn_blocking`) in a server.
    ///
    /// # Errors
    /// What could not be loaded, naming the file; everything else was reloaded.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let inner = &*self.inner;
        let mut failed = Vec::new();
        if let Some(path) = &inner.keys_file {
            match Auth::from_file(path) {
                Ok(auth) => {
                    tracing::info!(?auth, "keys file reloaded");
                    *inner.auth.write().unwrap_or_else(|e| e.into_inner()) = auth;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "keys file not reloaded: the old keys stay in force");
                    failed.push(e.to_string());
                }
            }
        }
        #[cfg(feature = "tls")]
        if let (Some(tls), Some(files)) = (&inner.tls, &inner.config.tls) {
            match tls.reload(files) {
                Ok(()) => tracing::info!(
                    cert = %files.cert.display(),
                    "TLS certificate reloaded: new connections use it"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate not reloaded: the old one stays in force");
                    failed.push(e);
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(ReloadError(failed.join("; ")))
        }
    }

    /// The configuration the service was built with.
    pub fn config(&self) -> &ServiceConfig {
        &self.inner.config
    }

    /// The shutdown handle: [`Shutdown::drain`] refuses new asks, [`Shutdown::stop`] ends
    /// the ones in flight.
    pub fn shutdown(&self) -> &Shutdown {
        self.inner.pipeline.shutdown()
    }

    /// The switch [`serve`](crate::serve) sets when it stops accepting, and its
    /// connections close on.
    pub(crate) fn closing(&self) -> &Switch {
        &self.inner.closing
    }

    fn metrics(&self) -> &Metrics {
        self.inner.pipeline.metrics()
    }

    /// Answers in flight right now (both modes).
    pub fn in_flight(&self) -> usize {
        self.inner.config.max_streams - self.inner.streams.available_permits()
    }

    /// Resolves when every streaming answer spawned so far has finished (settled or
    /// refunded). Used by shutdown; handy in tests.
    pub async fn answers_finished(&self) {
        self.inner.answers.close();
        self.inner.answers.wait().await;
        self.inner.answers.reopen();
    }

    /// Resolves once the quota store has recorded the settles and refunds of the answers
    /// that ended so far (a shared store sends them in the background). [`serve`] awaits
    /// it before returning; an embedder that serves the service itself should too.
    ///
    /// [`serve`]: crate::serve
    pub async fn flush_quota(&self) {
        self.inner.quota.flush().await;
    }

    /// Starts the quota store's background work the first time it is called.
    fn start_housekeeping(&self) {
        let inner = &*self.inner;
        inner.housekeeping.call_once(|| {
            inner
                .quota
                .clone()
                .spawn_housekeeping(inner.stop_housekeeping.clone());
        });
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
                    return file.response().map(AskBody::full);
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

    /// Who is asking: the request's [`PeerAddr`], else this connection's peer, stands in
    /// for a missing bearer token in open mode.
    fn identify<B>(&self, req: &Request<B>) -> Result<crate::auth::Identity, ApiError> {
        let peer = req
            .extensions()
            .get::<PeerAddr>()
            .map(|p| p.0)
            .or(self.peer)
            .map(|a| a.ip());
        self.inner
            .auth
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .identify(req.headers(), peer)
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
            Mode::Sse {
                keep_alive: request::keeps_alive(req.version(), req.headers()),
            }
        } else {
            Mode::Json
        };
        let mut res = match self.clone().admit(req, mode, received).await {
            Ok(res) => res,
            Err(e) => {
                self.metrics().rejected(e.code);
                error_response(&e, mode)
            }
        };
        // Checked last, with no wait between here and hyper writing the head. Once the
        // server closes connections, hyper will close this one after the response and say
        // `close` itself: a `keep-alive` beside it would contradict it.
        if self.inner.closing.is_set() {
            res.headers_mut().remove(header::CONNECTION);
        }
        res
    }

    /// Runs every check, charges the quota and starts the answer, streaming it for
    /// [`Mode::Sse`].
    async fn admit<B>(
        self,
        req: Request<B>,
        mode: Mode,
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
        let identity = self.identify(&req)?;
        let body = request::read_body(
            req.into_body(),
            inner.config.max_body_bytes,
            inner.config.header_timeout,
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
        if let Mode::Sse { keep_alive } = mode {
            let (tx, body) = channel(inner.config.stream_buffer);
            if let Some(activity) = &self.activity {
                activity.track(tx.probe());
            }
            let mut answer = Box::pin(answer::stream(
                inner.pipeline.clone(),
                ask,
                charge,
                permit,
                tx,
                self.hangup.clone(),
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
                AskBody::sse(body),
                keep_alive,
                Some(query_id),
            ));
        }
        // A failure from here on is an answer that started (and was refunded and counted
        // as such), not a rejection, so it is rendered here rather than returned.
        let body = match answer::json(
            inner.pipeline.clone(),
            ask,
            charge,
            permit,
            self.hangup.clone(),
        )
        .await
        {
            Ok(body) => body,
            Err(e) => return Ok(error_response(&e, Mode::Json)),
        };
        let mut res = Response::new(AskBody::json(body));
        res.headers_mut().insert(header::CONTENT_TYPE, JSON);
        res.headers_mut().insert(X_QUERY_ID, query_id);
        Ok(res)
    }

    async fn quota_status<B>(self, req: Request<B>) -> Response<AskBody> {
        let inner = &*self.inner;
        let identity = match self.identify(&req) {
            Ok(i) => i,
            Err(e) => return error_response(&e, Mode::Json),
        };
        let limit = identity.limit.unwrap_or(inner.config.quota_limit);
        match inner.quota.status(&identity.user, limit).await {
            Ok(s) => json_response(
                StatusCode::OK,
                wire::quota_status(s.limit, s.remaining, &rfc3339(s.resets_at)),
            ),
            Err(e) => error_response(&quota_error(e), Mode::Json),
        }
    }

    fn metrics_text(&self) -> Response<AskBody> {
        let mut text = self.metrics().render(self.in_flight() as u64);
        self.inner.quota.render_metrics(&mut text);
        let mut res = Response::new(AskBody::full(Bytes::from(text)));
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
        let mut res = Response::new(AskBody::full(Bytes::from_static(text.as_bytes())));
        *res.status_mut() = status;
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res.headers_mut().insert(header::CACHE_CONTROL, NO_CACHE);
        res
    }
}

impl<B> Service<Request<B>> for AskService
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
        self.start_housekeeping();
        let open = self.activity.as_ref().map(Activity::open);
        let this = self.clone();
        Box::pin(async move {
            let origin = this.inner.cors.allowed(req.headers());
            let mut res = match origin {
                Some(origin) if req.method() == Method::OPTIONS => Cors::preflight(origin),
                Some(origin) => {
                    let mut res = this.route(req).await;
                    Cors::mark(&mut res, origin);
                    res
                }
                None => this.route(req).await,
            };
            if let Some(open) = open {
                res = res.map(|body| body.holding(open));
            }
            Ok(res)
        })
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
    HeaderValue::from_str(id.text().as_str()).unwrap_or(HeaderValue::from_static("invalid"))
}

/// How an error must be rendered: a JSON body, or one SSE event for a streaming ask
/// (whose head says `connection: keep-alive` when the connection stays open).
#[derive(Clone, Copy)]
enum Mode {
    Json,
    Sse { keep_alive: bool },
}

/// The one place an error becomes a response.
fn error_response(err: &ApiError, mode: Mode) -> Response<AskBody> {
    if err.code == ErrorCode::Internal {
        tracing::error!(code = %err.code, message = %err.message, "internal error");
    }
    let mut res = match mode {
        Mode::Json => json_response(err.code.status(), err.to_json()),
        Mode::Sse { keep_alive } => sse_response(
            err.code.status(),
            AskBody::full(err.to_event()),
            keep_alive,
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
    let mut res = Response::new(AskBody::full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, JSON);
    res
}

fn sse_response(
    status: StatusCode,
    body: AskBody,
    keep_alive: bool,
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
    // Never on HTTP/2, where `connection` is illegal (`keep_alive` is false there).
    if keep_alive {
        h.insert(header::CONNECTION, KEEP_ALIVE);
    }
    res
}

fn quota_error(e: QuotaError) -> ApiError {
    let code = match e {
        QuotaError::Exceeded { .. } => ErrorCode::QuotaExceeded,
        QuotaError::Unavailable(_) => ErrorCode::QuotaUnavailable,
    };
    ApiError::new(code, e.to_string()).with_retry_after(e.retry_after_secs(unix_now()))
}
