//! HTTP/2 cleartext with prior knowledge (contract §1.3): many streaming asks multiplexed on
//! one connection, JSON mode, a reset stream refunded while its connection lives on, and
//! HTTP/1.1 and h2c on one port. The client is hyper's own HTTP/2 client on a real socket.

// `support::fast_config` trips this lint; the support module is shared and not ours to edit.
mod support;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use askstream::pipeline::bm25::Bm25Index;
use askstream::pipeline::sim::{SimConfig, SimGenerator};
use askstream::pipeline::{Chunk, Generator, PipelineError, Prompt, Retriever, TokenStream};
use askstream::{AskService, ServiceConfig};
use bytes::Bytes;
use futures_core::Stream;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use support::{TestServer, fast_config, parse_sse, remaining_with_limit, stream_ask};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const LIMIT: u64 = 1000;
const TOKENS: u32 = 16;
const WAIT: Duration = Duration::from_secs(10);
const HOUR_MS: u64 = 3_600_000;

fn config() -> ServiceConfig {
    let mut c = fast_config();
    c.quota_limit = LIMIT as u32;
    support::sim(&mut c).tokens = TOKENS;
    c
}

/// An h2c connection (prior knowledge) and the task driving it.
async fn h2_connect(addr: SocketAddr) -> (SendRequest<Full<Bytes>>, JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

fn ask_request(addr: SocketAddr, query: &str, user: &str, stream: bool) -> Request<Full<Bytes>> {
    let query_string = if stream { "?stream=true" } else { "" };
    Request::post(format!("http://{addr}/api/v1/ai/ask{query_string}"))
        .header("authorization", format!("Bearer {user}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::json!({ "query": query }).to_string(),
        )))
        .unwrap()
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Response<Incoming> {
    tokio::time::timeout(WAIT, async {
        sender.ready().await.expect("the connection takes requests");
        sender.send_request(req).await.expect("a response")
    })
    .await
    .expect("the response head arrives")
}

async fn read_all(res: Response<Incoming>) -> (http::response::Parts, Bytes) {
    let (parts, body) = res.into_parts();
    let bytes = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("the body ends")
        .expect("the body is read without error")
        .to_bytes();
    (parts, bytes)
}

/// The tokens the sim streams for `query` over the built-in corpus: the oracle for order
/// and content.
async fn expected_tokens(query: &str) -> Vec<String> {
    let passages = Bm25Index::builtin()
        .retrieve(query, 4)
        .await
        .expect("retrieval works");
    let prompt = Prompt {
        query: query.into(),
        passages: passages.into(),
    };
    let mut tokens = SimGenerator::new(SimConfig {
        ttft: Duration::ZERO,
        token_interval: Duration::ZERO,
        tokens: TOKENS,
    })
    .generate(prompt);
    let mut texts = Vec::new();
    while let Some(chunk) = std::future::poll_fn(|cx| tokens.as_mut().poll_next(cx)).await {
        if let Chunk::Token(t) = chunk.expect("the sim does not fail") {
            texts.push(t.text().to_string());
        }
    }
    texts
}

fn token_texts(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["token"].as_str().expect("token is text").to_string())
        .collect()
}

/// Checks one complete streamed answer over HTTP/2; returns (queryId, quotaRemaining).
fn check_h2_stream(
    parts: &http::response::Parts,
    body: &[u8],
    expected: &[String],
) -> (String, u64) {
    assert_eq!(parts.status, 200);
    assert_eq!(parts.version, Version::HTTP_2);
    let h = &parts.headers;
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    assert!(
        h.get("connection").is_none(),
        "connection is illegal in HTTP/2"
    );
    let id = h["x-query-id"].to_str().unwrap().to_string();

    let (events, comments) = parse_sse(body);
    assert!(comments.is_empty(), "{comments:?}");
    assert_eq!(events.len(), expected.len() + 1, "{events:?}");
    assert_eq!(token_texts(&events), expected, "every token, in order");
    let done = events.last().unwrap();
    assert_eq!(done["type"], "done");
    assert_eq!(done["queryId"], id.as_str());
    (id, done["quotaRemaining"].as_u64().expect("quotaRemaining"))
}

const TOPICS: &[&str] = &[
    "writing a browser client",
    "error codes and retries",
    "answers in any language",
    "load testing and time to first token",
    "what is askstream",
    "streaming through proxies and load balancers",
    "quick start and command-line flags",
    "quotas and exactly-once refunds",
];

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streaming_asks_multiplexed_on_one_connection() {
    const ASKS: usize = 32;
    let user = "h2-multiplex";
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    assert_eq!(remaining_with_limit(addr, user, LIMIT).await, LIMIT);

    let (sender, conn_task) = h2_connect(addr).await;
    let mut asks = tokio::task::JoinSet::new();
    for i in 0..ASKS {
        let mut sender = sender.clone();
        let query = format!("{} ({i})", TOPICS[i % TOPICS.len()]);
        asks.spawn(async move {
            let expected = expected_tokens(&query).await;
            let res = send(&mut sender, ask_request(addr, &query, user, true)).await;
            let (parts, body) = read_all(res).await;
            check_h2_stream(&parts, &body, &expected)
        });
    }
    let mut ids = std::collections::HashSet::new();
    let mut remainders = Vec::new();
    while let Some(r) = asks.join_next().await {
        let (id, rem) = r.expect("ask task");
        assert!(ids.insert(id), "query ids are distinct");
        remainders.push(rem);
    }
    assert_eq!(ids.len(), ASKS);
    // Each ask was charged once, so the done events report every remainder exactly once.
    remainders.sort_unstable();
    let expected: Vec<u64> = (LIMIT - ASKS as u64..LIMIT).collect();
    assert_eq!(remainders, expected);

    server.settled().await;
    assert_eq!(server.service.in_flight(), 0);
    assert_eq!(
        remaining_with_limit(addr, user, LIMIT).await,
        LIMIT - ASKS as u64
    );
    assert!(!conn_task.is_finished(), "one connection carried them all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_over_h2c_matches_the_streamed_answer() {
    let user = "h2-json";
    let query = "how do proxies buffer server-sent events?";
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    let (mut sender, _conn) = h2_connect(addr).await;

    let res = send(&mut sender, ask_request(addr, query, user, true)).await;
    let (parts, body) = read_all(res).await;
    let expected = expected_tokens(query).await;
    check_h2_stream(&parts, &body, &expected);
    let streamed: String = token_texts(&parse_sse(&body).0).concat();

    let res = send(&mut sender, ask_request(addr, query, user, false)).await;
    let (parts, body) = read_all(res).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.version, Version::HTTP_2);
    assert_eq!(parts.headers["content-type"], "application/json");
    assert!(parts.headers.get("connection").is_none());
    let doc: Value = serde_json::from_slice(&body).expect("a JSON document");
    assert_eq!(
        doc["queryId"],
        parts.headers["x-query-id"].to_str().unwrap()
    );
    assert_eq!(doc["answer"].as_str(), Some(streamed.as_str()));
    assert_eq!(doc["quotaRemaining"].as_u64(), Some(LIMIT - 2));
    assert_eq!(
        doc["usage"]["completionTokens"].as_u64(),
        Some(u64::from(TOKENS))
    );

    server.settled().await;
    assert_eq!(server.service.in_flight(), 0);
    assert_eq!(remaining_with_limit(addr, user, LIMIT).await, LIMIT - 2);
}

// ---------------------------------------------------------------------------------------

/// The sim, except that a query starting with "hang" never gets a token (the stream is
/// only counted, started and dropped).
struct HangOrSim {
    sim: SimGenerator,
    started: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

impl Generator for HangOrSim {
    fn generate(&self, prompt: Prompt) -> TokenStream {
        if prompt.query.starts_with("hang") {
            self.started.fetch_add(1, Ordering::SeqCst);
            Box::pin(Hang(self.dropped.clone()))
        } else {
            self.sim.generate(prompt)
        }
    }
}

struct Hang(Arc<AtomicUsize>);

impl Stream for Hang {
    type Item = Result<Chunk, PipelineError>;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Pending
    }
}

impl Drop for Hang {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_is_refunded_and_the_connection_lives_on() {
    let user = "h2-reset";
    let mut c = config();
    // Nothing but the reset can end the hanging answer during the test.
    c.ttft_timeout = Duration::from_millis(HOUR_MS);
    c.idle_timeout = Duration::from_millis(HOUR_MS);
    c.heartbeat = Duration::from_secs(3600);
    let started = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let service = AskService::builder(c).generator(Arc::new(HangOrSim {
        sim: SimGenerator::new(SimConfig {
            ttft: Duration::ZERO,
            token_interval: Duration::ZERO,
            tokens: TOKENS,
        }),
        started: started.clone(),
        dropped: dropped.clone(),
    }));
    let server = TestServer::start_with(service).await;
    let addr = server.addr;

    let (mut sender, conn_task) = h2_connect(addr).await;
    let res = send(&mut sender, ask_request(addr, "hang on", user, true)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), Version::HTTP_2);
    assert_eq!(server.service.in_flight(), 1);
    assert_eq!(remaining_with_limit(addr, user, LIMIT).await, LIMIT - 1);

    // Dropping the response body makes hyper's h2 client reset the stream (RST_STREAM
    // CANCEL); the connection stays open.
    drop(res);
    server.settled().await;
    assert_eq!(server.service.in_flight(), 0);
    assert_eq!(
        remaining_with_limit(addr, user, LIMIT).await,
        LIMIT,
        "the reset stream was refunded"
    );
    assert_eq!(started.load(Ordering::SeqCst), 1);
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the generator was stopped"
    );

    // The same connection still answers.
    assert!(
        !conn_task.is_finished(),
        "the connection survived the reset"
    );
    let query = "quotas and exactly-once refunds";
    let res = send(&mut sender, ask_request(addr, query, user, true)).await;
    let (parts, body) = read_all(res).await;
    let (_, rem) = check_h2_stream(&parts, &body, &expected_tokens(query).await);
    assert_eq!(rem, LIMIT - 1);
    server.settled().await;
    assert_eq!(remaining_with_limit(addr, user, LIMIT).await, LIMIT - 1);
    assert!(!conn_task.is_finished());
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2c_share_one_port() {
    let user = "h2-and-h1";
    let query = "what is askstream";
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    let expected = expected_tokens(query).await;

    let (head, events) = stream_ask(addr, query, user).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("connection"), Some("keep-alive"));
    assert_eq!(token_texts(&events), expected);
    assert_eq!(events.last().unwrap()["type"], "done");

    let (mut sender, _conn) = h2_connect(addr).await;
    let res = send(&mut sender, ask_request(addr, query, user, true)).await;
    let (parts, body) = read_all(res).await;
    let (_, rem) = check_h2_stream(&parts, &body, &expected);
    assert_eq!(rem, LIMIT - 2);

    server.settled().await;
    assert_eq!(remaining_with_limit(addr, user, LIMIT).await, LIMIT - 2);
}

/// A client socket whose first write stops partway through the h2 preface, so the server
/// may see `PRI * HTTP/2.0\r\n` alone when it peeks to choose the protocol. Whether it
/// does depends on scheduling; either way the connection must be served as h2c.
struct SplitFirstWrite {
    inner: TcpStream,
    first_done: bool,
}

impl tokio::io::AsyncRead for SplitFirstWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SplitFirstWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = if self.first_done {
            buf.len()
        } else {
            buf.len().min(16)
        };
        let res = Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
        if matches!(res, Poll::Ready(Ok(_))) {
            self.first_done = true;
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_preface_split_across_writes_is_still_h2c() {
    let user = "split-preface";
    let query = "what is askstream";
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    let expected = expected_tokens(query).await;

    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let io = SplitFirstWrite {
        inner: tcp,
        first_done: false,
    };
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("h2c handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let res = send(&mut sender, ask_request(addr, query, user, true)).await;
    assert_eq!(res.version(), Version::HTTP_2);
    let (parts, body) = read_all(res).await;
    let (_, rem) = check_h2_stream(&parts, &body, &expected);
    assert_eq!(rem, LIMIT - 1);
}
