//! A client that leaves is refunded exactly once, whatever the moment it leaves (contract §1.3
//! disconnect detection, §2 exactly-once refund): before the first token while the
//! generator is idle, mid-stream, in JSON mode, by half-closing, and racing the `done`
//! frame — where the charge must match exactly what the clients received.
//!
//! Every test runs the real server on a real socket; the user is a per-test bearer token
//! (open mode) and the quota is read back through `GET /api/v1/quota`.

mod support;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use askstream::pipeline::{Chunk, Generator, PipelineError, Prompt, Token, TokenStream};
use askstream::{AskService, ServiceConfig};
use futures_core::Stream;
use serde_json::Value;
use support::{
    RawConn, TestServer, ask_body, bearer, config_with_limit, dechunk_prefix, find, parse_sse,
    remaining_with_limit, stream_ask_request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: u64 = 1000;
/// Overall bound for conditions the server must reach; exceeding it fails the test.
const WAIT: Duration = Duration::from_secs(10);
/// Long enough that nothing in a test run can be woken by it.
const HOUR_MS: u64 = 3_600_000;

/// A server whose generator, timeouts and heartbeats all sleep for an hour: an answer in
/// flight can only end because the server noticed the client leave.
fn idle_config() -> ServiceConfig {
    let mut c = config_with_limit(LIMIT as u32);
    support::sim(&mut c).ttft = Duration::from_millis(HOUR_MS);
    c.ttft_timeout = Duration::from_millis(HOUR_MS);
    c.idle_timeout = Duration::from_millis(HOUR_MS);
    c.heartbeat = Duration::from_secs(3600);
    c
}

/// Same as [`idle_config`] but the sim's first token comes at once, then one per hour.
fn first_token_then_idle_config() -> ServiceConfig {
    let mut c = idle_config();
    support::sim(&mut c).ttft = Duration::from_millis(0);
    support::sim(&mut c).token_interval = Duration::from_millis(HOUR_MS);
    support::sim(&mut c).tokens = 10;
    c
}

/// Opens a streaming ask and reads its response head.
async fn open_stream(server: &TestServer, user: &str) -> (RawConn, support::Head) {
    let mut conn = RawConn::connect(server.addr).await;
    conn.post(
        "/api/v1/ai/ask?stream=true",
        &ask_body("how are quotas refunded?"),
        &bearer(user),
    )
    .await;
    let head = tokio::time::timeout(WAIT, conn.read_head())
        .await
        .expect("the response head arrives");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    (conn, head)
}

/// Closes the client side: a FIN (plain drop) or an RST (linger 0, then drop).
fn close(conn: RawConn, abortive: bool) {
    if abortive {
        socket2::SockRef::from(&conn.stream)
            .set_linger(Some(Duration::ZERO))
            .expect("set SO_LINGER");
    }
    drop(conn);
}

/// Waits (bounded) until `cond` holds; fails the test otherwise.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let reached = tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "timed out waiting for {what}");
}

/// The events of every complete `data: …\n\n` frame in `body` (a cut frame at the end is
/// ignored).
fn complete_events(body: &[u8]) -> Vec<Value> {
    match body.windows(2).rposition(|w| w == b"\n\n") {
        Some(end) => parse_sse(&body[..end + 2]).0,
        None => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------
// A scripted generator: yields its tokens, then never yields again (and never ends).
// Counts the streams it started and the ones dropped, to prove the pipeline was stopped.

#[derive(Default)]
struct Counters {
    started: AtomicUsize,
    dropped: AtomicUsize,
}

struct ThenHang {
    tokens: &'static [&'static str],
    counters: Arc<Counters>,
}

impl Generator for ThenHang {
    fn generate(&self, _prompt: Prompt) -> TokenStream {
        self.counters.started.fetch_add(1, Ordering::SeqCst);
        Box::pin(HangingStream {
            tokens: self
                .tokens
                .iter()
                .map(|t| Token::new(t))
                .collect::<Vec<_>>()
                .into_iter(),
            counters: self.counters.clone(),
        })
    }
}

struct HangingStream {
    tokens: std::vec::IntoIter<Token>,
    counters: Arc<Counters>,
}

impl Stream for HangingStream {
    type Item = Result<Chunk, PipelineError>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.tokens.next() {
            Some(t) => Poll::Ready(Some(Ok(Chunk::Token(t)))),
            // Never woken: only the client leaving can end this answer.
            None => Poll::Pending,
        }
    }
}

impl Drop for HangingStream {
    fn drop(&mut self) {
        self.counters.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

async fn start_hanging(tokens: &'static [&'static str]) -> (TestServer, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let service = AskService::builder(idle_config()).generator(Arc::new(ThenHang {
        tokens,
        counters: counters.clone(),
    }));
    (TestServer::start_with(service).await, counters)
}

// ---------------------------------------------------------------------------------------
// 1. Before the first token, while the generator is idle.

/// The generator would not yield for an hour and no timer fires for an hour, so a refund
/// can only come from the server noticing the closed connection while waiting — not at the
/// next write.
async fn idle_disconnect_refunds(user: &str, abortive: bool) {
    let server = TestServer::start(idle_config()).await;
    assert_eq!(remaining_with_limit(server.addr, user, LIMIT).await, LIMIT);

    let (conn, _head) = open_stream(&server, user).await;
    assert_eq!(server.service.in_flight(), 1);
    assert_eq!(
        remaining_with_limit(server.addr, user, LIMIT).await,
        LIMIT - 1,
        "a 200 head means the ask was charged"
    );

    close(conn, abortive);
    server.settled().await;
    assert_eq!(server.service.in_flight(), 0);
    assert_eq!(
        remaining_with_limit(server.addr, user, LIMIT).await,
        LIMIT,
        "refunded exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_before_first_token_is_noticed_while_waiting_and_refunded() {
    idle_disconnect_refunds("disc-idle-fin", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rst_before_first_token_is_noticed_while_waiting_and_refunded() {
    idle_disconnect_refunds("disc-idle-rst", true).await;
}

// ---------------------------------------------------------------------------------------
// 2. Mid-stream.

const THREE: &[&str] = &["one", " two", " three"];

/// Reads body chunks until `n` complete events have arrived.
async fn read_events(conn: &mut RawConn, n: usize) -> Vec<Value> {
    let mut body = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            let events = complete_events(&body);
            if events.len() >= n {
                return events;
            }
            let chunk = conn.read_chunk().await.expect("the stream goes on");
            assert!(!chunk.is_empty(), "the stream ended early");
            body.extend_from_slice(&chunk);
        }
    })
    .await
    .expect("the events arrive")
}

async fn mid_stream_disconnect_refunds(user: &str, abortive: bool) {
    let (server, counters) = start_hanging(THREE).await;
    let (mut conn, _head) = open_stream(&server, user).await;
    let events = read_events(&mut conn, 3).await;
    let expected: Vec<Value> = THREE
        .iter()
        .map(|t| serde_json::json!({ "type": "token", "token": t }))
        .collect();
    assert_eq!(events, expected);
    assert_eq!(server.service.in_flight(), 1);
    assert_eq!(
        remaining_with_limit(server.addr, user, LIMIT).await,
        LIMIT - 1
    );
    assert_eq!(counters.started.load(Ordering::SeqCst), 1);
    assert_eq!(counters.dropped.load(Ordering::SeqCst), 0);

    close(conn, abortive);
    server.settled().await;
    assert_eq!(server.service.in_flight(), 0);
    assert_eq!(remaining_with_limit(server.addr, user, LIMIT).await, LIMIT);
    assert_eq!(
        counters.dropped.load(Ordering::SeqCst),
        1,
        "the generator was stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_mid_stream_refunds_and_stops_the_generator() {
    mid_stream_disconnect_refunds("disc-mid-fin", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rst_mid_stream_refunds_and_stops_the_generator() {
    mid_stream_disconnect_refunds("disc-mid-rst", true).await;
}

// ---------------------------------------------------------------------------------------
// 3. JSON mode.

async fn json_disconnect_refunds(user: &str, abortive: bool) {
    let server = TestServer::start(idle_config()).await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.post(
        "/api/v1/ai/ask",
        &ask_body("what is askstream?"),
        &bearer(user),
    )
    .await;
    wait_for("the JSON ask to be admitted", || {
        server.service.in_flight() == 1
    })
    .await;
    assert_eq!(
        remaining_with_limit(server.addr, user, LIMIT).await,
        LIMIT - 1
    );

    close(conn, abortive);
    // A JSON answer is not a spawned task: it lives in hyper's service future, which hyper
    // drops when the connection goes. Its permit is released after the refund lands.
    wait_for("the JSON answer to be dropped", || {
        server.service.in_flight() == 0
    })
    .await;
    assert_eq!(remaining_with_limit(server.addr, user, LIMIT).await, LIMIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_during_a_json_answer_refunds() {
    json_disconnect_refunds("disc-json-fin", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rst_during_a_json_answer_refunds() {
    json_disconnect_refunds("disc-json-rst", true).await;
}

// ---------------------------------------------------------------------------------------
// 4. Half-close: read-EOF means the client left (the answer's hangup watch decides; hyper's
// own is off).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_after_the_head_ends_the_stream_and_refunds() {
    let user = "disc-half-head";
    let server = TestServer::start(idle_config()).await;
    let (mut conn, head) = open_stream(&server, user).await;
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    assert_eq!(server.service.in_flight(), 1);
    assert_eq!(
        remaining_with_limit(server.addr, user, LIMIT).await,
        LIMIT - 1
    );

    conn.stream
        .shutdown()
        .await
        .expect("half-close the write side");
    let rest = tokio::time::timeout(WAIT, conn.read_to_eof())
        .await
        .expect("the server closes the connection");
    // The generator is idle: no token, no done, not even the terminating chunk — the
    // connection is simply closed.
    assert_eq!(String::from_utf8_lossy(&rest), "");

    server.settled().await;
    assert_eq!(server.service.in_flight(), 0);
    assert_eq!(remaining_with_limit(server.addr, user, LIMIT).await, LIMIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_right_after_the_request_refunds() {
    let user = "disc-half-req";
    let server = TestServer::start(idle_config()).await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.post(
        "/api/v1/ai/ask?stream=true",
        &ask_body("proxies"),
        &bearer(user),
    )
    .await;
    conn.stream
        .shutdown()
        .await
        .expect("half-close the write side");
    let got = tokio::time::timeout(WAIT, conn.read_to_eof())
        .await
        .expect("the server closes the connection");
    // The server may or may not have answered with a head before it saw the EOF; either
    // way the stream carries nothing more and ends without its terminating chunk.
    if !got.is_empty() {
        let head_end = find(&got, b"\r\n\r\n").expect("a complete head") + 4;
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{got:?}");
        assert_eq!(
            String::from_utf8_lossy(&got[head_end..]),
            "",
            "nothing after the head"
        );
    }
    server.settled().await;
    assert_eq!(server.service.in_flight(), 0);
    assert_eq!(remaining_with_limit(server.addr, user, LIMIT).await, LIMIT);
}

// ---------------------------------------------------------------------------------------
// 5 and 6. Disconnects racing the `done` frame.

/// xorshift64*: deterministic per seed, good enough to spread cut points.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Close {
    /// `shutdown(Write)`, then read to EOF: everything the server wrote arrives.
    Half,
    /// SO_LINGER 0 and drop: an RST; bytes in flight may be lost.
    Reset,
}

#[derive(Debug)]
struct Race {
    /// Bytes the client read before it closed.
    before_close: usize,
    /// Every byte the client read.
    received: Vec<u8>,
    /// Whether a complete `done` frame was received.
    done: bool,
    /// Complete token events received.
    tokens: usize,
    /// The read after the half-close failed with a reset.
    reset_seen: bool,
}

const RACE_QUERY: &str = "exactly-once refunds when the client disconnects";
const LAST_CHUNK: &[u8] = b"\r\n0\r\n\r\n";

/// One streaming ask whose client reads `cut` bytes (or the whole response, if shorter),
/// then closes as `how` says.
async fn race_once(addr: std::net::SocketAddr, user: &str, cut: usize, how: Close) -> Race {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let req = stream_ask_request(RACE_QUERY, user);
    s.write_all(req.as_bytes()).await.unwrap();

    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let mut reset_seen = false;
    let mut eof = false;
    // The response is small; the connection is kept alive after it, so stop at its end.
    while received.len() < cut && !received.ends_with(LAST_CHUNK) {
        let want = (cut - received.len()).min(buf.len());
        match tokio::time::timeout(WAIT, s.read(&mut buf[..want]))
            .await
            .expect("the response arrives")
        {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(_) => {
                reset_seen = true;
                break;
            }
        }
    }
    let before_close = received.len();
    match how {
        Close::Half => {
            if !eof && !reset_seen {
                s.shutdown().await.expect("half-close the write side");
                let rest = tokio::time::timeout(WAIT, async {
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => return,
                            Ok(n) => received.extend_from_slice(&buf[..n]),
                            Err(_) => {
                                reset_seen = true;
                                return;
                            }
                        }
                    }
                })
                .await;
                assert!(rest.is_ok(), "the server closes after the client's FIN");
            }
        }
        Close::Reset => {
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s);
        }
    }
    let (tokens, dones) = count_events(&received);
    Race {
        before_close,
        received,
        done: dones == 1,
        tokens,
        reset_seen,
    }
}

/// Complete (token, done) events in a raw HTTP/1.1 response (head + chunked body,
/// possibly cut).
fn count_events(raw: &[u8]) -> (usize, usize) {
    let Some(head_end) = find(raw, b"\r\n\r\n") else {
        return (0, 0);
    };
    assert!(
        raw.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{}",
        String::from_utf8_lossy(&raw[..head_end])
    );
    let (body, _) = dechunk_prefix(&raw[head_end + 4..]);
    let events = complete_events(&body);
    let dones = events.iter().filter(|e| e["type"] == "done").count();
    assert!(dones <= 1, "one done at most: {events:?}");
    if dones == 1 {
        assert_eq!(events.last().unwrap()["type"], "done", "done is last");
    }
    let tokens = events.iter().filter(|e| e["type"] == "token").count();
    assert_eq!(
        tokens + dones,
        events.len(),
        "only tokens and done: {events:?}"
    );
    (tokens, dones)
}

#[derive(Debug, Default)]
struct Tally {
    asks: u64,
    done: u64,
    not_done: u64,
    /// Not done although the client had already read part of the response when it left:
    /// the close really raced the stream.
    not_done_mid_response: u64,
    /// Not done although a 200 head had arrived: the server had started the stream.
    not_done_with_head: u64,
    /// Not done although every token event had arrived: the close raced the done frame
    /// itself.
    not_done_after_last_token: u64,
    resets: u64,
}

const ITERATIONS: u64 = 300;
const RACE_TOKENS: u32 = 4;
const CONCURRENCY: u64 = 8;

/// Runs the race loop and returns (tally, quota charged by the loop).
async fn race_loop(user: &'static str, how: Close, token_ms: u64) -> (Tally, u64) {
    let mut c = config_with_limit(LIMIT as u32);
    support::sim(&mut c).tokens = RACE_TOKENS;
    support::sim(&mut c).token_interval = Duration::from_millis(token_ms);
    let server = TestServer::start(c).await;
    let addr = server.addr;

    // Calibrate: one complete response, to know how many bytes there are to cut.
    let full = race_once(addr, user, usize::MAX, Close::Half).await;
    assert!(full.done, "a client that reads everything gets done");
    assert!(full.received.ends_with(LAST_CHUNK));
    let full_len = full.received.len() as u64;
    server.settled().await;
    let before = remaining_with_limit(server.addr, user, LIMIT).await;
    assert_eq!(before, LIMIT - 1);

    let mut workers = tokio::task::JoinSet::new();
    for w in 0..CONCURRENCY {
        workers.spawn(async move {
            let mut out = Vec::new();
            let mut i = w;
            while i < ITERATIONS {
                let mut rng = Rng::new(i + 1);
                // A quarter leave right after sending the ask (the FIN races the whole
                // answer inside the server); the rest read up to a little past the full
                // length (some read it all). Uniform cuts alone rarely beat an unpaced
                // answer: it is usually written in one go.
                let r = rng.next();
                let cut = if r % 4 == 0 {
                    0
                } else {
                    ((r >> 2) % (full_len + 9)) as usize
                };
                out.push(race_once(addr, user, cut, how).await);
                i += CONCURRENCY;
            }
            out
        });
    }
    let mut tally = Tally::default();
    while let Some(res) = workers.join_next().await {
        for race in res.expect("worker") {
            tally.asks += 1;
            tally.resets += u64::from(race.reset_seen);
            if race.done {
                tally.done += 1;
            } else {
                tally.not_done += 1;
                if race.before_close > 0 {
                    tally.not_done_mid_response += 1;
                }
                if find(&race.received, b"\r\n\r\n").is_some() {
                    tally.not_done_with_head += 1;
                }
                if race.tokens == RACE_TOKENS as usize {
                    tally.not_done_after_last_token += 1;
                }
            }
        }
    }
    assert_eq!(tally.asks, ITERATIONS);

    // Every answer spawned so far ends by itself (an answer stuck here fails the test)...
    server.settled().await;
    // ...but a client that resets right after its ask is done before the server is: its
    // connection can still be inside admission, holding a permit and about to charge
    // (seen in CI: one ask in flight after `settled`). Stopping the server is the
    // barrier, since `serve` returns only once every connection has closed and every
    // answer has settled; the quota is then read from the store itself.
    let mut server = server;
    tokio::time::timeout(Duration::from_secs(60), server.signal_shutdown())
        .await
        .expect("the server stops")
        .expect("the serve task");
    assert_eq!(
        server.service.in_flight(),
        0,
        "every ask settled or refunded"
    );
    let after = u64::from(server.remaining_in_store(user, LIMIT as u32));
    (tally, before - after)
}

/// The key exactly-once check: a client that half-closes still receives everything hyper
/// wrote, so the quota charged must equal, exactly, the `done` events the clients got.
async fn half_close_race(user: &'static str, token_ms: u64) -> Tally {
    let (tally, charged) = race_loop(user, Close::Half, token_ms).await;
    eprintln!("half-close race, sim_token_ms={token_ms}: {tally:?}, charged {charged}");
    assert_eq!(tally.resets, 0, "a half-closing client is never reset");
    assert_eq!(
        charged, tally.done,
        "charged iff the done frame was delivered ({tally:?})"
    );
    assert!(tally.done > 0, "some clients got done: {tally:?}");
    assert!(
        tally.not_done > 0,
        "some clients left without done: {tally:?}"
    );
    tally
}

/// Unpaced sim: the whole answer is ready at once, the FIN races hyper's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_racing_done_charges_exactly_the_done_events_received() {
    half_close_race("disc-race-half", 0).await;
}

/// Paced sim (1 ms per token): the FIN lands at every point of the stream, including
/// between the last token and `done`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_racing_a_paced_stream_charges_exactly_the_done_events_received() {
    let tally = half_close_race("disc-race-half-paced", 1).await;
    assert!(
        tally.not_done_mid_response > 0,
        "some clients left mid-response without done: {tally:?}"
    );
}

/// RSTs at random points: the client may lose bytes already sent, so only the bounds hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_racing_done_never_overcharges() {
    let (tally, charged) = race_loop("disc-race-rst", Close::Reset, 0).await;
    eprintln!("reset race: {tally:?}, charged {charged}");
    assert!(charged <= tally.asks, "{charged} > {tally:?}");
    assert!(
        charged >= tally.done,
        "a client that received done was refunded: charged {charged}, {tally:?}"
    );
    assert!(tally.done > 0, "some clients got done: {tally:?}");
    assert!(tally.not_done > 0, "some clients left early: {tally:?}");
}

// ---------------------------------------------------------------------------------------
// 7. Many streams leaving at once.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_disconnecting_at_once_are_all_refunded() {
    const STREAMS: usize = 200;
    let user = "disc-many";
    let server = TestServer::start(first_token_then_idle_config()).await;
    let addr = server.addr;

    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        opening.spawn(async move {
            let mut conn = RawConn::connect(addr).await;
            conn.post(
                "/api/v1/ai/ask?stream=true",
                &ask_body("how are quotas refunded?"),
                &bearer(user),
            )
            .await;
            let head = conn.read_head().await;
            assert_eq!(head.status, 200);
            let events = read_events(&mut conn, 1).await;
            assert_eq!(events.len(), 1);
            assert_eq!(events[0]["type"], "token");
            conn
        });
    }
    let mut conns = Vec::new();
    while let Some(conn) = opening.join_next().await {
        conns.push(conn.expect("stream opens"));
    }
    assert_eq!(conns.len(), STREAMS);
    assert_eq!(server.service.in_flight(), STREAMS);
    assert_eq!(
        remaining_with_limit(server.addr, user, LIMIT).await,
        LIMIT - STREAMS as u64
    );

    // Half leave with a FIN, half with an RST, all at once.
    for (i, conn) in conns.into_iter().enumerate() {
        close(conn, i % 2 == 1);
    }
    server.settled().await;
    assert_eq!(server.service.in_flight(), 0);
    assert_eq!(remaining_with_limit(server.addr, user, LIMIT).await, LIMIT);
}

// ---------------------------------------------------------------------------------------
// 5. Bytes behind the request: a stray CRLF or a pipelined request sits in hyper's read
// buffer, so hyper itself does not read the socket while the answer runs. The client
// leaving must still be noticed while the answer waits (contract §1.3).

/// What a client may send after its ask, before it leaves.
const TRAILING: [(&str, &[u8]); 2] = [
    ("a stray CRLF", b"\r\n"),
    (
        "a pipelined request",
        b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n",
    ),
];

/// Posts an ask (streaming or not) with `trailing` in the same write as the request.
async fn post_with_trailing(conn: &mut RawConn, path: &str, user: &str, trailing: &[u8]) {
    let body = ask_body("how are quotas refunded?");
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
        body.len(),
        bearer(user)
    )
    .into_bytes();
    req.extend_from_slice(trailing);
    conn.send(&req).await;
}

async fn trailing_bytes_idle_stream_refunds(abortive: bool) {
    for (i, (what, trailing)) in TRAILING.into_iter().enumerate() {
        let user = &format!("disc-trail-idle-{abortive}-{i}");
        let server = TestServer::start(idle_config()).await;
        let mut conn = RawConn::connect(server.addr).await;
        post_with_trailing(&mut conn, "/api/v1/ai/ask?stream=true", user, trailing).await;
        let head = tokio::time::timeout(WAIT, conn.read_head())
            .await
            .expect("the response head arrives");
        assert_eq!(head.status, 200, "{what}");
        assert_eq!(server.service.in_flight(), 1, "{what}");

        close(conn, abortive);
        server.settled().await;
        assert_eq!(server.service.in_flight(), 0, "{what}");
        assert_eq!(
            remaining_with_limit(server.addr, user, LIMIT).await,
            LIMIT,
            "{what}: refunded"
        );
        assert_eq!(
            support::metric(
                server.addr,
                "askstream_asks_total{outcome=\"disconnected\"}"
            )
            .await,
            1,
            "{what}: counted as a disconnect"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_with_bytes_behind_the_ask_is_noticed_while_waiting_and_refunded() {
    trailing_bytes_idle_stream_refunds(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rst_with_bytes_behind_the_ask_is_noticed_while_waiting_and_refunded() {
    trailing_bytes_idle_stream_refunds(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_mid_stream_with_bytes_behind_the_ask_stops_the_generator() {
    for (i, (what, trailing)) in TRAILING.into_iter().enumerate() {
        let user = &format!("disc-trail-mid-{i}");
        let (server, counters) = start_hanging(THREE).await;
        let mut conn = RawConn::connect(server.addr).await;
        post_with_trailing(&mut conn, "/api/v1/ai/ask?stream=true", user, trailing).await;
        let head = tokio::time::timeout(WAIT, conn.read_head())
            .await
            .expect("the response head arrives");
        assert_eq!(head.status, 200, "{what}");
        assert_eq!(read_events(&mut conn, 3).await.len(), 3, "{what}");
        assert_eq!(counters.dropped.load(Ordering::SeqCst), 0, "{what}");

        close(conn, false);
        server.settled().await;
        assert_eq!(
            counters.dropped.load(Ordering::SeqCst),
            1,
            "{what}: the generator was stopped"
        );
        assert_eq!(
            remaining_with_limit(server.addr, user, LIMIT).await,
            LIMIT,
            "{what}: refunded"
        );
    }
}

/// The send and receive queues of the IPv4 loopback socket from port `local` to port
/// `peer`, as the kernel counts them (`/proc/net/tcp`): bytes sent but not yet
/// acknowledged, and bytes received but not yet read by the process.
fn tcp_queues(local: u16, peer: u16) -> Option<(u32, u32)> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let (local, peer) = (
        format!("0100007F:{local:04X}"),
        format!("0100007F:{peer:04X}"),
    );
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&local.as_str()) || fields.get(2) != Some(&peer.as_str()) {
            return None;
        }
        let (tx, rx) = fields.get(4)?.split_once(':')?;
        Some((
            u32::from_str_radix(tx, 16).ok()?,
            u32::from_str_radix(rx, 16).ok()?,
        ))
    })
}

/// Bytes the client sends while its answer waits are read by the server (the hangup
/// watch reads them ahead for hyper), and the client's leaving afterwards is still
/// noticed at once. Were hyper to read the socket mid-answer as well, the two readers
/// would share one wake-up slot: hyper would take the bytes and the wake-up with them,
/// stop reading with a request in its buffer, and neither would see the FIN that follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_after_bytes_sent_mid_answer_is_noticed_and_refunded() {
    for (i, (what, trailing)) in TRAILING.into_iter().enumerate() {
        let user = &format!("disc-mid-bytes-{i}");
        let (server, counters) = start_hanging(THREE).await;
        let (mut conn, _) = open_stream(&server, user).await;
        assert_eq!(read_events(&mut conn, 3).await.len(), 3, "{what}");

        conn.send(trailing).await;
        // The bytes are acknowledged by the server's kernel, then read by the server:
        // only then does the FIN follow, so it cannot arrive with them.
        let client = conn.stream.local_addr().unwrap().port();
        let port = server.addr.port();
        wait_for("the server to read the bytes sent mid-answer", || {
            tcp_queues(client, port).is_some_and(|(unacked, _)| unacked == 0)
                && tcp_queues(port, client).is_some_and(|(_, unread)| unread == 0)
        })
        .await;
        assert_eq!(counters.dropped.load(Ordering::SeqCst), 0, "{what}");

        close(conn, false);
        server.settled().await;
        assert_eq!(
            counters.dropped.load(Ordering::SeqCst),
            1,
            "{what}: the generator was stopped"
        );
        assert_eq!(
            remaining_with_limit(server.addr, user, LIMIT).await,
            LIMIT,
            "{what}: refunded"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_ask_with_bytes_behind_it_is_refunded_when_the_client_leaves() {
    for (i, (what, trailing)) in TRAILING.into_iter().enumerate() {
        let user = &format!("disc-trail-json-{i}");
        let server = TestServer::start(idle_config()).await;
        let mut conn = RawConn::connect(server.addr).await;
        post_with_trailing(&mut conn, "/api/v1/ai/ask", user, trailing).await;
        wait_for("the JSON ask to be admitted", || {
            server.service.in_flight() == 1
        })
        .await;

        close(conn, false);
        wait_for("the JSON answer to be dropped", || {
            server.service.in_flight() == 0
        })
        .await;
        assert_eq!(
            remaining_with_limit(server.addr, user, LIMIT).await,
            LIMIT,
            "{what}: refunded"
        );
    }
}

/// The pipelined request behind a completed answer is still served, in order, on the
/// same connection: watching the socket while an answer runs loses no byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_request_is_served_after_the_answer() {
    let user = "disc-trail-served";
    let mut c = config_with_limit(LIMIT as u32);
    support::sim(&mut c).ttft = Duration::from_millis(0);
    support::sim(&mut c).token_interval = Duration::from_millis(20);
    support::sim(&mut c).tokens = 5;
    let server = TestServer::start(c).await;
    let mut conn = RawConn::connect(server.addr).await;
    // The second request arrives in pieces while the answer streams, so the server reads
    // some of it ahead of hyper.
    post_with_trailing(&mut conn, "/api/v1/ai/ask?stream=true", user, b"GET /heal").await;
    let head = tokio::time::timeout(WAIT, conn.read_head())
        .await
        .expect("the response head arrives");
    assert_eq!(head.status, 200);
    let mut body = conn.read_chunk().await.expect("the first token");
    conn.send(b"thz HTTP/1.1\r\nhost: te").await;
    body.extend(conn.read_chunk().await.expect("the second token"));
    conn.send(b"st\r\n\r\n").await;
    let (rest, ended) = tokio::time::timeout(WAIT, conn.read_chunked_body())
        .await
        .expect("the answer ends");
    assert!(ended, "the answer's body ends cleanly");
    let (events, _) = parse_sse(&[body, rest].concat());
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some("done".into())
    );
    let health = tokio::time::timeout(WAIT, conn.read_head())
        .await
        .expect("the pipelined request is answered");
    assert_eq!(health.status, 200);
    assert_eq!(conn.read_body(&health).await, b"ok\n");
    assert_eq!(
        remaining_with_limit(server.addr, user, LIMIT).await,
        LIMIT - 1
    );
}
