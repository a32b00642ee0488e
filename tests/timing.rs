//! Timing: heartbeats, first-token and idle timeouts, slow clients and backpressure
//! (contract §1.1, §1.3, §2), against the real server over real sockets.
//!
//! The `start_paused` tests run the server in the test's own current-thread runtime. Every
//! timer involved (the answer's deadlines, the sim's pacing, hyper's) is a Tokio timer, so
//! a minute of silence passes at once and deterministically: the clock only moves when
//! every task is idle, and then only to the next deadline. Only loopback I/O is real.
//!
//! What the server sends is fixed by its own deadlines (the clients here never make it
//! wait on them, except where that is the point), so the byte streams are asserted
//! exactly. Arrival times are not: under a paused clock a reader may be woken at a later
//! virtual instant than the write, which changes nothing the server does.

mod support;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use askstream::AskService;
use askstream::pipeline::{BoxFuture, Passage, PipelineError, Retriever};
use serde_json::Value;
use support::script::{ScriptGen, Step};
use support::*;
use tokio::io::AsyncReadExt;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Each frame as a word, for exact assertions: `hb`, `token`, `done`, `error:<CODE>`.
fn shape(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .map(|f| match f {
            Frame::KeepAlive => "hb".to_string(),
            Frame::Data(v) => match v["type"].as_str() {
                Some("token") => "token".to_string(),
                Some("done") => "done".to_string(),
                Some("error") => format!("error:{}", v["code"].as_str().unwrap_or("?")),
                other => panic!("unknown event type {other:?} in {v}"),
            },
        })
        .collect()
}

/// Builds an expected shape from runs: `[("hb", 3), ("token", 8), ("done", 1)]`.
fn runs(parts: &[(&str, usize)]) -> Vec<String> {
    parts
        .iter()
        .flat_map(|&(word, n)| std::iter::repeat_n(word.to_string(), n))
        .collect()
}

/// The concatenated text of the `token` events, in order.
fn token_text(frames: &[Frame]) -> String {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Data(v) if v["type"] == "token" => {
                Some(v["token"].as_str().expect("token text").to_string())
            }
            _ => None,
        })
        .collect()
}

fn last_data(frames: &[Frame]) -> &Value {
    match frames.last() {
        Some(Frame::Data(v)) => v,
        other => panic!("the stream must end with a data event, got {other:?}"),
    }
}

/// Posts a streaming ask on `c` and checks the SSE response head.
async fn start_stream(c: &mut RawConn, user: &str, query: &str) {
    let head = c.start_stream(query, user).await;
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
}

/// A streaming ask on a fresh connection, read to its end: the frames. The chunked body
/// must end with its terminating chunk.
async fn stream_frames(addr: std::net::SocketAddr, user: &str, query: &str) -> Vec<Frame> {
    let mut c = RawConn::connect(addr).await;
    start_stream(&mut c, user, query).await;
    let (body, complete) = c.read_chunked_body().await;
    assert!(complete, "the chunked body ends with its last chunk");
    frames(&body)
}

/// A JSON-mode ask on a fresh connection: status and parsed body.
async fn json_ask(addr: std::net::SocketAddr, user: &str, query: &str) -> (u16, Value) {
    let (head, body) = ask(addr, "/api/v1/ai/ask", &ask_body(query), &bearer(user)).await;
    assert_eq!(head.header("content-type"), Some("application/json"));
    (
        head.status,
        serde_json::from_slice(&body).expect("a JSON body"),
    )
}

/// Waits for every answer started so far to settle or refund. Unlike
/// `TestServer::settled`, the bound is far beyond any deadline these tests use, so under
/// a paused clock it cannot fire before the server's own 30 s timers do.
async fn answers_finished(server: &TestServer) {
    tokio::time::timeout(
        Duration::from_secs(24 * 3600),
        server.service.answers_finished(),
    )
    .await
    .expect("every answer finishes");
}

/// A client socket whose receive buffer is tiny, so the server meets backpressure early.
async fn small_window_conn(addr: std::net::SocketAddr) -> RawConn {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    RawConn::from_stream(socket.connect(addr).await.unwrap())
}

const QUERY: &str = "how are quotas refunded";

// ---------------------------------------------------------------------------------------
// Heartbeats
// ---------------------------------------------------------------------------------------

/// A model that thinks for 60 s: a keep-alive comment at 15, 30 and 45 s of silence, and
/// none at 60 s, when the first token arrives (it resets the timer). Tokens 20 ms apart
/// then flow with no heartbeat between them, and the answer completes.
#[tokio::test(start_paused = true)]
async fn heartbeats_fill_a_slow_first_token_then_stop() {
    let server = TestServer::start(fast_config_with(|c| {
        support::sim(c).ttft = Duration::from_millis(60_000);
        support::sim(c).token_interval = Duration::from_millis(20);
        support::sim(c).tokens = 8;
        c.heartbeat = Duration::from_secs(15);
        c.ttft_timeout = Duration::from_millis(120_000);
    }))
    .await;

    let mut c = RawConn::connect(server.addr).await;
    start_stream(&mut c, "hb-slow-first", QUERY).await;
    let (body, complete) = c.read_chunked_body().await;
    assert!(complete, "the chunked body ends with its last chunk");

    // The raw bytes: three comments, byte for byte, then the first event.
    let hb = b": keep-alive\n\n";
    let prefix: Vec<u8> = [hb.as_slice(), hb, hb, b"data: {"].concat();
    assert!(
        body.starts_with(&prefix),
        "three keep-alives then data: {:?}",
        String::from_utf8_lossy(&body[..body.len().min(120)])
    );

    let frames = frames(&body);
    assert_eq!(
        shape(&frames),
        runs(&[("hb", 3), ("token", 8), ("done", 1)])
    );
    let done = last_data(&frames);
    assert_eq!(done["usage"]["completionTokens"], 8);
}

/// Tokens 10 s apart with a 15 s heartbeat: every token resets the timer, so no
/// heartbeat is ever due.
#[tokio::test(start_paused = true)]
async fn no_heartbeat_when_tokens_come_every_10s() {
    let server = TestServer::start(fast_config_with(|c| {
        support::sim(c).ttft = Duration::from_millis(0);
        support::sim(c).token_interval = Duration::from_millis(10_000);
        support::sim(c).tokens = 6;
        c.heartbeat = Duration::from_secs(15);
        c.idle_timeout = Duration::from_millis(600_000);
    }))
    .await;
    let frames = stream_frames(server.addr, "hb-10s", QUERY).await;
    assert_eq!(shape(&frames), runs(&[("token", 6), ("done", 1)]));
}

/// Tokens 20 s apart with a 15 s heartbeat: exactly one heartbeat in each gap (at 15 s;
/// the token at 20 s resets the timer before the next one is due).
#[tokio::test(start_paused = true)]
async fn one_heartbeat_in_each_20s_gap_between_tokens() {
    let server = TestServer::start(fast_config_with(|c| {
        support::sim(c).ttft = Duration::from_millis(0);
        support::sim(c).token_interval = Duration::from_millis(20_000);
        support::sim(c).tokens = 4;
        c.heartbeat = Duration::from_secs(15);
        c.idle_timeout = Duration::from_millis(600_000);
    }))
    .await;
    let frames = stream_frames(server.addr, "hb-20s", QUERY).await;
    assert_eq!(
        shape(&frames),
        ["token", "hb", "token", "hb", "token", "hb", "token", "done"]
    );
}

// ---------------------------------------------------------------------------------------
// Generator timeouts
// ---------------------------------------------------------------------------------------

/// No first token within `--ttft-timeout-ms`: the stream (already 200) ends with an
/// `UPSTREAM_TIMEOUT` event and no token; JSON mode gets a 504 with the error object.
/// Both asks are refunded.
#[tokio::test(start_paused = true)]
async fn first_token_timeout_ends_the_answer_and_refunds() {
    let server = TestServer::start(fast_config_with(|c| {
        support::sim(c).ttft = Duration::from_millis(60_000);
        c.ttft_timeout = Duration::from_millis(30_000);
        c.heartbeat = Duration::from_secs(15);
    }))
    .await;
    let user = "ttft-timeout";
    let before = remaining(server.addr, user).await;

    // Streaming: a heartbeat at 15 s of silence, then the timeout at 30 s.
    let frames = stream_frames(server.addr, user, QUERY).await;
    assert_eq!(shape(&frames), ["hb", "error:UPSTREAM_TIMEOUT"]);
    assert_error_object(last_data(&frames), "UPSTREAM_TIMEOUT", "the last event");
    server.settled().await;
    assert_eq!(
        remaining(server.addr, user).await,
        before,
        "stream refunded"
    );

    // JSON mode.
    let (status, body) = json_ask(server.addr, user, QUERY).await;
    assert_eq!(status, 504);
    assert_error_object(&body, "UPSTREAM_TIMEOUT", "the JSON body");
    server.settled().await;
    assert_eq!(
        remaining(server.addr, user).await,
        before,
        "JSON ask refunded"
    );
}

/// A generator that goes silent after its first token for longer than
/// `--idle-timeout-ms`: one token, a heartbeat at 15 s, then `UPSTREAM_TIMEOUT` at 30 s.
/// Refunded, in both modes.
#[tokio::test(start_paused = true)]
async fn idle_timeout_after_the_first_token_ends_the_answer_and_refunds() {
    let server = TestServer::start(fast_config_with(|c| {
        support::sim(c).ttft = Duration::from_millis(0);
        support::sim(c).token_interval = Duration::from_millis(60_000);
        support::sim(c).tokens = 4;
        c.idle_timeout = Duration::from_millis(30_000);
        c.heartbeat = Duration::from_secs(15);
    }))
    .await;
    let user = "idle-timeout";
    let before = remaining(server.addr, user).await;

    let frames = stream_frames(server.addr, user, QUERY).await;
    assert_eq!(shape(&frames), ["token", "hb", "error:UPSTREAM_TIMEOUT"]);
    assert_error_object(last_data(&frames), "UPSTREAM_TIMEOUT", "the last event");
    server.settled().await;
    assert_eq!(
        remaining(server.addr, user).await,
        before,
        "stream refunded"
    );

    let (status, body) = json_ask(server.addr, user, QUERY).await;
    assert_eq!(status, 504);
    assert_error_object(&body, "UPSTREAM_TIMEOUT", "the JSON body");
    server.settled().await;
    assert_eq!(
        remaining(server.addr, user).await,
        before,
        "JSON ask refunded"
    );
}

// ---------------------------------------------------------------------------------------
// Slow clients and backpressure
// ---------------------------------------------------------------------------------------

/// A client that stops reading: the server fills the socket and the channel, waits
/// `--slow-client-secs`, then ends the answer with `SLOW_CLIENT` and refunds — without the
/// client reading a byte meanwhile. When the client reads again it gets a prefix of the
/// answer, then the `SLOW_CLIENT` event in place of the rest, then a proper end of body.
#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_gets_slow_client_and_a_refund() {
    const TOKENS: u32 = 200_000;
    let server = TestServer::start(fast_config_with(|c| {
        support::sim(c).ttft = Duration::from_millis(0);
        support::sim(c).token_interval = Duration::from_millis(0);
        // About 8 MB of events: more than the client's 4 KB window, the server's send
        // buffer (at most 4 MB here), hyper's write queue and the channel together, so
        // the producer must end up waiting on a full channel.
        support::sim(c).tokens = TOKENS;
        c.max_answer_tokens = TOKENS;
        c.slow_client = Duration::from_secs(30);
        c.stream_buffer = 64;
    }))
    .await;
    let user = "slow-client";
    let before = remaining(server.addr, user).await;

    let mut c = small_window_conn(server.addr).await;
    start_stream(&mut c, user, QUERY).await;

    // Stop reading. Only the server's 30 s slow-client wait can end the answer now; the
    // paused clock jumps there as soon as everything is blocked.
    answers_finished(&server).await;
    assert_eq!(
        remaining(server.addr, user).await,
        before,
        "refunded while the client was still not reading"
    );

    // Resume reading to the end.
    let (body, complete) = c.read_chunked_body().await;
    assert!(complete, "the chunked body ends with its last chunk");
    let frames = frames(&body);
    let last = last_data(&frames);
    assert_error_object(last, "SLOW_CLIENT", "the last event");
    let before_last = &frames[..frames.len() - 1];
    assert!(
        before_last
            .iter()
            .all(|f| matches!(f, Frame::Data(v) if v["type"] == "token")),
        "only tokens before the error (no done, no heartbeat)"
    );
    let streamed = before_last.len();
    assert!(streamed > 0, "the buffers held some tokens");
    assert!(
        streamed < TOKENS as usize,
        "the answer was cut: {streamed} tokens"
    );

    // What arrived is the start of the answer, in order, nothing dropped or merged.
    let (status, full) = json_ask(server.addr, user, QUERY).await;
    assert_eq!(status, 200);
    let answer = full["answer"].as_str().expect("answer text");
    let text = token_text(before_last);
    assert!(
        answer.starts_with(&text),
        "the streamed tokens are a prefix of the answer"
    );
}

/// A client that reads slowly but steadily (1 KB at a time, yielding in between) through
/// a 4 KB receive window: the server is held back by backpressure over and over, but the
/// client never stops draining, so it gets every token, in order, each its own event, and
/// then `done`; the text equals the JSON answer for the same query.
///
/// Real time, not paused: under a paused clock the runtime would jump to the 30 s
/// slow-client deadline whenever both sides are momentarily waiting on the socket, which
/// is exactly the situation this test creates thousands of times. The outcome does not
/// depend on how fast anything runs: a client that never pauses for 30 s never triggers
/// `SLOW_CLIENT`, and the heartbeat is pushed out of reach so the frames are exact.
#[tokio::test]
async fn a_steady_slow_reader_gets_every_token_in_order() {
    const TOKENS: usize = 100_000;
    let server = TestServer::start(fast_config_with(|c| {
        support::sim(c).ttft = Duration::from_millis(0);
        support::sim(c).token_interval = Duration::from_millis(0);
        // About 4.5 MB on the wire: more than the kernel can buffer for one connection
        // here, so the producer must wait on a full channel again and again.
        support::sim(c).tokens = TOKENS as u32;
        c.max_answer_tokens = TOKENS as u32;
        c.slow_client = Duration::from_secs(30);
        c.heartbeat = Duration::from_secs(3600);
    }))
    .await;
    let user = "steady-reader";

    let (status, full) = json_ask(server.addr, user, QUERY).await;
    assert_eq!(status, 200);
    let answer = full["answer"].as_str().expect("answer text").to_string();

    let mut c = small_window_conn(server.addr).await;
    c.post(
        "/api/v1/ai/ask?stream=true",
        &ask_body(QUERY),
        &bearer(user),
    )
    .await;

    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    // JSON never holds a raw CR, so this can only be the terminating chunk.
    while !raw.ends_with(b"\r\n0\r\n\r\n") {
        let n = c.stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "the connection closed before the end of the body");
        raw.extend_from_slice(&buf[..n]);
        tokio::task::yield_now().await;
    }

    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    let head = std::str::from_utf8(&raw[..head_end]).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\ntransfer-encoding: chunked\r\n"),
        "{head}"
    );

    let frames = frames(&dechunk(&raw[head_end..]).expect("the body ends with its last chunk"));
    assert_eq!(shape(&frames), runs(&[("token", TOKENS), ("done", 1)]));
    assert_eq!(last_data(&frames)["usage"]["completionTokens"], TOKENS);
    assert_eq!(token_text(&frames), answer, "the same text as JSON mode");
}

// ---------------------------------------------------------------------------------------
// Waits that are not the model's
// ---------------------------------------------------------------------------------------

/// A retriever that takes 40 s (a slow vector store), then finds nothing.
struct SlowRetriever;

impl Retriever for SlowRetriever {
    fn retrieve<'a>(
        &'a self,
        _: &'a str,
        _: usize,
    ) -> BoxFuture<'a, Result<Vec<Passage>, PipelineError>> {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(40)).await;
            Ok(Vec::new())
        })
    }
}

/// The response head goes out before retrieval, so a slow retriever's silence is filled
/// with heartbeats just like a slow model's: at 15 and 30 s, then the answer.
#[tokio::test(start_paused = true)]
async fn heartbeats_fill_a_slow_retrieval() {
    let service = AskService::builder(fast_config_with(|c| {
        c.heartbeat = Duration::from_secs(15);
        c.ttft_timeout = Duration::from_millis(120_000);
    }))
    .retriever(Arc::new(SlowRetriever));
    let server = TestServer::start_with(service).await;
    let frames = stream_frames(server.addr, "slow-retrieval", QUERY).await;
    assert_eq!(
        shape(&frames),
        runs(&[("hb", 2), ("token", 8), ("done", 1)])
    );
}

/// One token frame too big for any buffer on the way (socket, hyper, a 1-slot channel),
/// so the third one waits for room as long as the client does not read.
static BIG: LazyLock<&'static str> =
    LazyLock::new(|| Box::leak(" big".repeat(2_500_000).into_boxed_str()));

fn stall_then_pause(_: &str) -> Vec<Step> {
    vec![
        Step::Tok(&BIG),
        Step::Tok(&BIG),
        Step::Tok(&BIG),
        Step::Pause(Duration::from_secs(1)),
        Step::Tok(" end"),
    ]
}

/// A client that stops reading for 3 s, longer than the 2 s idle timeout (but well within
/// the slow-client allowance), holds the third token in the server. The model then
/// pauses 1 s. That pause is all the model's silence: the answer completes, and the
/// client's stall is not counted as the model's (`UPSTREAM_TIMEOUT`).
///
/// In real time, unlike its neighbours: while this client reads 30 MB through a small
/// window, the server waits on the slow-client timer, and a paused clock would jump to
/// it whenever the loopback left every task idle for an instant.
#[tokio::test]
async fn a_client_stall_is_not_counted_as_the_model_being_silent() {
    let service = AskService::builder(fast_config_with(|c| {
        c.idle_timeout = Duration::from_millis(2000);
        c.slow_client = Duration::from_secs(30);
        c.heartbeat = Duration::from_secs(3600);
        c.stream_buffer = 1;
    }))
    .generator(Arc::new(ScriptGen(stall_then_pause)));
    let server = TestServer::start_with(service).await;
    let mut c = small_window_conn(server.addr).await;
    start_stream(&mut c, "stalling-reader", QUERY).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (body, complete) = c.read_chunked_body().await;
    assert!(complete, "the chunked body ends with its last chunk");
    let frames = frames(&body);
    assert_eq!(shape(&frames), runs(&[("token", 4), ("done", 1)]));
}

/// The grace period ends while a token waits for room (the client stopped reading): the
/// answer ends at once with `SHUTTING_DOWN`, refunded, rather than waiting out the
/// slow-client allowance past the server's exit.
#[tokio::test(start_paused = true)]
async fn shutdown_ends_an_answer_waiting_for_room() {
    let service = AskService::builder(fast_config_with(|c| {
        c.shutdown_grace = Duration::from_secs(1);
        c.slow_client = Duration::from_secs(3600);
        c.heartbeat = Duration::from_secs(3600);
        c.stream_buffer = 1;
    }))
    .generator(Arc::new(ScriptGen(stall_then_pause)));
    let mut server = TestServer::start_with(service).await;
    let user = "waiting-at-shutdown";
    let before = remaining(server.addr, user).await;
    let mut c = small_window_conn(server.addr).await;
    start_stream(&mut c, user, QUERY).await;
    tokio::time::timeout(Duration::from_secs(60), server.signal_shutdown())
        .await
        .expect("serve returns within the grace period and the final flush")
        .expect("serve does not panic");
    answers_finished(&server).await;
    let (body, complete) = c.read_chunked_body().await;
    assert!(complete, "the chunked body ends with its last chunk");
    assert_error_object(last_data(&frames(&body)), "SHUTTING_DOWN", "the last event");
    let limit = server.service.config().quota_limit;
    let after = server.remaining_in_store(user, limit);
    assert_eq!(u64::from(after), before, "refunded");
}

/// Deadlines set absurdly far (the flags accept any u64) mean "never", not a panic that
/// would turn every answer into `INTERNAL`.
#[tokio::test(start_paused = true)]
async fn absurdly_long_deadlines_mean_never() {
    let server = TestServer::start(fast_config_with(|c| {
        c.heartbeat = Duration::from_secs(u64::MAX);
        c.ttft_timeout = Duration::from_millis(u64::MAX);
        c.idle_timeout = Duration::from_millis(u64::MAX);
    }))
    .await;
    let frames = stream_frames(server.addr, "far-deadlines", QUERY).await;
    assert_eq!(shape(&frames), runs(&[("token", 8), ("done", 1)]));
}
