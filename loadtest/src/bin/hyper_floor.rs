//! `hyper_floor`: the floor's job done through hyper, and nothing else. It answers what any
//! hyper 1.x server pays on the standard workloads, so askstream's distance from the floor
//! (`../shared/floor`, no HTTP library) splits into hyper's share and askstream's own.
//!
//! It does what the floor does, the way the floor does it: a current-thread runtime, one
//! task per connection, the body read whole and parsed as JSON, a bearer token required, a
//! quota map behind a mutex, pre-serialized events, and the next token `--sim-token-ms` after
//! the last one was handed over. hyper is set up as askstream sets it up (`writev(false)`,
//! `TCP_NODELAY`). There is no retrieval, no channel between an answer and its connection,
//! no disconnect watch, no limits and no graceful shutdown: SIGTERM ends it. Only streaming
//! asks are answered (the standard workloads' kind); any other gets 501.
//!
//! It takes askstream's flags, prints askstream's `listening` line and answers `/healthz`,
//! so the load tool starts it as it starts askstream:
//!
//! ```text
//! cargo build --release -p loadtest
//! target/release/loadtest --spawn --workload A,D --floor-bin target/floor/release/floor \
//!     --server-bin target/release/hyper_floor --name hyper \
//!     --vs-bin target/release/askstream --vs-name askstream
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};

/// The flags askstream's load tool passes. Those it passes that mean nothing here are
/// accepted and ignored.
#[derive(Parser, Debug)]
struct Args {
    /// Where to listen; port 0 picks a free one (the `listening` line says which).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Delay before the first token.
    #[arg(long, default_value_t = 0)]
    sim_ttft_ms: u64,
    /// Delay between tokens.
    #[arg(long, default_value_t = 20)]
    sim_token_ms: u64,
    /// Tokens per answer.
    #[arg(long, default_value_t = 64)]
    sim_tokens: u32,
    /// Every user's starting quota.
    #[arg(long, default_value_t = 1_000_000_000)]
    quota_limit: u64,
    /// Ignored: no limit is kept.
    #[arg(long)]
    max_streams: Option<u64>,
    /// Ignored: SIGTERM ends the process at once.
    #[arg(long)]
    shutdown_grace_secs: Option<u64>,
}

/// The floor's sixteen words, each a whole token event.
const WORDS: [&str; 16] = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "it",
    "runs", "far", "away", "home",
];

/// What every connection shares.
struct Shared {
    ttft: Duration,
    gap: Duration,
    tokens: u32,
    limit: u64,
    /// One pre-serialized `data: …\n\n` event per word.
    events: Vec<Bytes>,
    quotas: Mutex<HashMap<String, u64>>,
    next_id: AtomicU64,
}

impl Shared {
    /// Takes one unit of `user`'s quota; `None` when it is spent.
    fn charge(&self, user: &str) -> Option<u64> {
        let mut quotas = self.quotas.lock().unwrap_or_else(|e| e.into_inner());
        let left = quotas.entry(user.to_owned()).or_insert(self.limit);
        *left = left.checked_sub(1)?;
        Some(*left)
    }
}

/// A response body: a fixed one, or a paced answer.
type SimBody = Either<Full<Bytes>, Box<Answer>>;

/// A paced answer: tokens on a timer, then `done`. Boxed, as askstream boxes its answers.
struct Answer {
    shared: Arc<Shared>,
    /// Token events sent so far.
    sent: u32,
    /// The wait for the next event; `None` when it is due now.
    wait: Option<Pin<Box<Sleep>>>,
    /// What `done` reports.
    remaining: u64,
    finished: bool,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let answer = &mut *self;
        if answer.finished {
            return Poll::Ready(None);
        }
        if let Some(wait) = &mut answer.wait {
            ready!(wait.as_mut().poll(cx));
        }
        let shared = &answer.shared;
        let frame = if answer.sent < shared.tokens {
            let event = shared.events[answer.sent as usize % WORDS.len()].clone();
            answer.sent += 1;
            event
        } else {
            answer.finished = true;
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            Bytes::from(format!(
                "data: {{\"type\":\"done\",\"queryId\":\"q-{id:x}\",\"sources\":[{{\"id\":\"doc-1\",\"title\":\"Example\"}}],\"quotaRemaining\":{}}}\n\n",
                answer.remaining
            ))
        };
        // As the floor does: the next event a whole gap after this one is handed over.
        let next = Instant::now() + shared.gap;
        match &mut answer.wait {
            _ if shared.gap.is_zero() => answer.wait = None,
            Some(wait) => wait.as_mut().reset(next),
            None => answer.wait = Some(Box::pin(tokio::time::sleep_until(next))),
        }
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }
}

/// A small JSON error response.
fn error(status: StatusCode, message: &str) -> Response<SimBody> {
    let body = format!("{{\"error\":\"{message}\"}}");
    let mut res = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// The bearer token of `req`, if it has one.
fn bearer(req: &Request<Incoming>) -> Option<String> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// The one body field read, as the floor reads it.
#[derive(serde::Deserialize)]
struct AskBody {
    #[allow(dead_code, reason = "parsed to check the body, as the floor does")]
    query: String,
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<SimBody>, Infallible> {
    let path = req.uri().path();
    if path == "/healthz" {
        return Ok(Response::new(Either::Left(Full::new(Bytes::from_static(
            b"ok\n",
        )))));
    }
    if path != "/api/v1/ai/ask" {
        return Ok(error(StatusCode::NOT_FOUND, "not found"));
    }
    if req.method() != Method::POST {
        return Ok(error(StatusCode::METHOD_NOT_ALLOWED, "method"));
    }
    let stream = req.uri().query().is_some_and(|q| q.contains("stream=true"));
    let user = bearer(&req);
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Ok(error(StatusCode::BAD_REQUEST, "bad body")),
    };
    let Some(user) = user else {
        return Ok(error(StatusCode::UNAUTHORIZED, "missing bearer token"));
    };
    if serde_json::from_slice::<AskBody>(&body).is_err() {
        return Ok(error(StatusCode::BAD_REQUEST, "invalid JSON body"));
    }
    if !stream {
        return Ok(error(StatusCode::NOT_IMPLEMENTED, "only streaming answers"));
    }
    let Some(remaining) = shared.charge(&user) else {
        return Ok(error(StatusCode::TOO_MANY_REQUESTS, "quota exhausted"));
    };
    let wait = (!shared.ttft.is_zero())
        .then(|| Box::pin(tokio::time::sleep_until(Instant::now() + shared.ttft)));
    let mut res = Response::new(Either::Right(Box::new(Answer {
        shared,
        sent: 0,
        wait,
        remaining,
        finished: false,
    })));
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(res)
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let shared = Arc::new(Shared {
        ttft: Duration::from_millis(args.sim_ttft_ms),
        gap: Duration::from_millis(args.sim_token_ms),
        tokens: args.sim_tokens,
        limit: args.quota_limit,
        events: WORDS
            .iter()
            .map(|w| {
                Bytes::from(format!(
                    "data: {{\"type\":\"token\",\"token\":\"{w} \"}}\n\n"
                ))
            })
            .collect(),
        quotas: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
    });
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(&args.listen).await?;
            eprintln!("hyper_floor listening addr={}", listener.local_addr()?);
            let mut http1 = hyper::server::conn::http1::Builder::new();
            http1.writev(false);
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, say: back off rather than spin.
                        eprintln!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let conn = http1.serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |req| handle(req, shared.clone())),
                );
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        })
}
