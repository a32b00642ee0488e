//! Bounds a hostile client cannot push past (contract §1.1's 431 row, §1.3's connection
//! limits), over real sockets.

mod support;

use std::time::Duration;

use support::*;

const QUERY: &str = "How do quota refunds work?";

#[tokio::test]
async fn a_head_over_max_header_bytes_gets_431_and_one_under_it_is_served() {
    let server = TestServer::start(fast_config()).await;
    // Default --max-header-bytes: 16384.
    let big = format!("x-pad: {}\r\n", "a".repeat(20_000));
    let (head, _) = ask(server.addr, "/api/v1/ai/ask", &ask_body(QUERY), &big).await;
    assert_eq!(head.status, 431);
    let fits = format!("x-pad: {}\r\n", "a".repeat(12_000));
    let (head, _) = ask(server.addr, "/api/v1/ai/ask", &ask_body(QUERY), &fits).await;
    assert_eq!(head.status, 200);
    assert_eq!(server.service.in_flight(), 0);
}

/// Connections waiting in the kernel's accept queue for the listener on `port`, read from
/// `/proc/net/tcp` (a listening socket's receive queue is its accept backlog).
#[cfg(target_os = "linux")]
fn accept_backlog(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port_hex = format!("{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let queues = fields.get(4)?;
            (local.ends_with(&format!(":{port_hex}")) && *state == "0A").then(|| {
                let rx = queues.split(':').nth(1).unwrap_or("0");
                usize::from_str_radix(rx, 16).unwrap_or(0)
            })
        })
        .sum()
}

/// At `--max-connections` the server stops accepting: the next connection waits in the
/// kernel's queue (not accepted, not served) until an open one closes, then is served.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_accepting_waits_until_one_closes() {
    let mut config = config_with_limit(100);
    config.max_connections = 1;
    support::sim(&mut config).token_interval = Duration::from_secs(3600);
    let server = TestServer::start(config).await;
    let port = server.addr.port();

    // The one connection the server allows: a stream that stays open.
    let mut first = RawConn::connect(server.addr).await;
    assert_eq!(first.start_stream(QUERY, "first").await.status, 200);

    // The next one completes its TCP handshake (the kernel does that) and waits there.
    let addr = server.addr;
    let waiting = tokio::spawn(async move {
        let mut c = RawConn::connect(addr).await;
        c.get("/healthz", "").await;
        c.read_head().await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while accept_backlog(port) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second connection never reached the accept queue"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !waiting.is_finished(),
        "not served while the cap is reached"
    );

    drop(first);
    let head = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(accept_backlog(port), 0);
}

/// `--max-answer-tokens` ends an answer that would go on: the tokens up to it, then
/// `done`, charged as a delivered answer.
#[tokio::test]
async fn an_answer_stops_at_max_answer_tokens_and_is_complete() {
    let mut config = config_with_limit(5);
    support::sim(&mut config).tokens = 50;
    config.max_answer_tokens = 7;
    let server = TestServer::start(config).await;
    let (head, events) = stream_ask(server.addr, QUERY, "capped").await;
    assert_eq!(head.status, 200);
    let kinds: Vec<_> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [vec!["token"; 7], vec!["done"]].concat(),
        "{events:?}"
    );
    let done = events.last().unwrap();
    assert_eq!(done["usage"]["completionTokens"], 7);
    assert_eq!(done["quotaRemaining"], 4, "a complete answer is charged");
    server.settled().await;
    assert_eq!(remaining(server.addr, "capped").await, 4);
}

// ---------------------------------------------------------------------------------------
// HTTP/2 connections that never get anywhere. A hand-written frame writer: hyper's and
// h2's clients cannot misbehave on purpose.
// ---------------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame: 24-bit length, type, flags, stream id.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const END_STREAM: u8 = 0x1;

/// HPACK "literal header field without indexing, new name", no Huffman coding.
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0x00, u8::try_from(name.len()).unwrap()];
    out.extend_from_slice(name.as_bytes());
    out.push(u8::try_from(value.len()).unwrap());
    out.extend_from_slice(value.as_bytes());
    out
}

/// The first part of a GET's header block (the rest would come in CONTINUATION frames).
fn partial_header_block() -> Vec<u8> {
    [
        literal(":method", "GET"),
        literal(":scheme", "http"),
        literal(":path", "/healthz"),
    ]
    .concat()
}

/// Sends `bytes` and waits for the server to close the connection (what it writes before
/// is read and dropped); how long that took. Paused time: the deadlines are tokio timers,
/// so the wait is exact and instant; the bound is there only to fail instead of hanging.
async fn closed_after_sending(server: &TestServer, bytes: &[u8]) -> Duration {
    let mut c = RawConn::connect(server.addr).await;
    c.send(bytes).await;
    let start = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(24 * 3600), c.read_to_eof())
        .await
        .expect("the server closes the connection");
    start.elapsed()
}

/// Only the head deadline can close these: pings come an hour apart.
fn no_pings() -> askstream::ServiceConfig {
    let mut c = fast_config();
    c.dead_peer = Duration::from_secs(7200);
    c
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_stops_inside_the_h2_preface_is_closed() {
    let server = TestServer::start(no_pings()).await;
    let took = closed_after_sending(&server, &PREFACE[..16]).await;
    assert!(took <= Duration::from_secs(20), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn an_h2_connection_with_settings_and_no_request_is_closed_at_the_head_deadline() {
    let server = TestServer::start(no_pings()).await;
    let hello = [PREFACE, &frame(SETTINGS, 0, 0, &[])].concat();
    let took = closed_after_sending(&server, &hello).await;
    assert_eq!(took, Duration::from_secs(10), "--header-timeout-secs");
}

/// A peer that stops answering pings (it still ACKs at the TCP level: only h2 can tell)
/// is dropped: a connection whose head deadline is an hour away is closed by the ping.
#[tokio::test(start_paused = true)]
async fn an_h2_peer_that_never_answers_a_ping_is_dropped() {
    let mut config = fast_config();
    config.header_timeout = Duration::from_secs(3600);
    config.dead_peer = Duration::from_secs(4);
    let server = TestServer::start(config).await;
    let hello = [PREFACE, &frame(SETTINGS, 0, 0, &[])].concat();
    let took = closed_after_sending(&server, &hello).await;
    assert!(took < Duration::from_secs(3600), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn an_h2_header_block_never_finished_is_closed() {
    let server = TestServer::start(no_pings()).await;
    // HEADERS without END_HEADERS, and no CONTINUATION ever.
    let stalled = [
        PREFACE,
        &frame(SETTINGS, 0, 0, &[]),
        &frame(HEADERS, END_STREAM, 1, &partial_header_block()),
    ]
    .concat();
    let took = closed_after_sending(&server, &stalled).await;
    assert_eq!(took, Duration::from_secs(10), "--header-timeout-secs");
    assert_eq!(server.service.in_flight(), 0);
}

/// A connection that did its work and then sits idle is closed after
/// `--idle-connection-secs`, and not while a stream is open.
///
/// Real time (paused time would let a request body in flight on the socket look late):
/// an answer busy for about 4.5 s on a 2 s idle deadline, then the close.
#[tokio::test]
async fn an_idle_h2_connection_is_closed_and_a_busy_one_is_not() {
    let mut config = fast_config();
    config.idle_connection = Duration::from_secs(2);
    support::sim(&mut config).token_interval = Duration::from_millis(1500);
    support::sim(&mut config).tokens = 3;
    let server = TestServer::start(config).await;
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(conn);
    let started = tokio::time::Instant::now();
    // A streaming answer of 3 tokens 1.5 s apart: busy past the idle deadline.
    let req = http::Request::post(format!("http://{}/api/v1/ai/ask?stream=true", server.addr))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(ask_body(
            QUERY,
        ))))
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .expect("the answer streams to its end on a busy connection")
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("\"type\":\"done\""));
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "the connection outlived its idle deadline while busy"
    );
    assert!(!connection.is_finished());
    // Now idle: the server closes it.
    tokio::time::timeout(Duration::from_secs(60), connection)
        .await
        .expect("the server closes the idle connection")
        .unwrap()
        .ok();
}

const DATA: u8 = 0x0;
const END_HEADERS: u8 = 0x4;

/// A client that opens a stream with a flow-control window of zero and never opens it:
/// its answer gets `SLOW_CLIENT` and is refunded, and since hyper can then never finish
/// the stream, the connection is closed rather than keep it (the stream must not outlive
/// its answer).
#[tokio::test(start_paused = true)]
async fn an_h2_stream_that_can_never_be_written_does_not_outlive_its_answer() {
    let mut config = config_with_limit(5);
    config.dead_peer = Duration::from_secs(7200); // pings cannot close it first
    let server = TestServer::start(config).await;
    let body = ask_body(QUERY);
    let headers = [
        literal(":method", "POST"),
        literal(":scheme", "http"),
        literal(":path", "/api/v1/ai/ask?stream=true"),
        literal(":authority", "test"),
        literal("content-type", "application/json"),
        literal("authorization", "Bearer zero-window"),
    ]
    .concat();
    // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 0: the server may send no DATA on any stream.
    let zero_window = [0x00, 0x04, 0, 0, 0, 0];
    let request = [
        PREFACE,
        &frame(SETTINGS, 0, 0, &zero_window),
        &frame(HEADERS, END_HEADERS, 1, &headers),
        &frame(DATA, END_STREAM, 1, body.as_bytes()),
    ]
    .concat();
    let mut c = RawConn::connect(server.addr).await;
    c.send(&request).await;
    let start = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(24 * 3600), c.read_to_eof())
        .await
        .expect("the server closes the connection");
    let took = start.elapsed();
    // SLOW_CLIENT after 30 s ends the answer; the body then outlives it by another 30 s.
    assert!(took >= Duration::from_secs(30), "{took:?}");
    assert!(took <= Duration::from_secs(90), "{took:?}");
    server.settled().await;
    assert_eq!(server.service.in_flight(), 0);
    assert_eq!(server.remaining_in_store("zero-window", 5), 5, "refunded");
}

/// Reads HTTP/2 frames until one matches `want`, returning it as (type, flags, stream,
/// payload); fails if the connection ends first.
async fn read_frame_until(
    c: &mut RawConn,
    want: impl Fn(u8, u32) -> bool,
) -> (u8, u8, u32, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    loop {
        let mut head = [0u8; 9];
        c.stream
            .read_exact(&mut head)
            .await
            .expect("a frame header");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        c.stream
            .read_exact(&mut payload)
            .await
            .expect("a frame payload");
        if want(head[3], stream) {
            return (head[3], head[4], stream, payload);
        }
    }
}

/// A client that ignores `--max-streams-per-connection` and opens one stream more: that
/// stream is refused (RST_STREAM, REFUSED_STREAM), the others run.
#[tokio::test]
async fn a_stream_over_max_streams_per_connection_is_refused() {
    let mut config = config_with_limit(10);
    config.max_streams_per_connection = 2;
    support::sim(&mut config).token_interval = Duration::from_secs(3600);
    let server = TestServer::start(config).await;
    let body = ask_body(QUERY);
    let request = |stream: u32| {
        let headers = [
            literal(":method", "POST"),
            literal(":scheme", "http"),
            literal(":path", "/api/v1/ai/ask?stream=true"),
            literal(":authority", "test"),
            literal("content-type", "application/json"),
        ]
        .concat();
        [
            frame(HEADERS, END_HEADERS, stream, &headers),
            frame(DATA, END_STREAM, stream, body.as_bytes()),
        ]
        .concat()
    };
    let mut c = RawConn::connect(server.addr).await;
    // The client does not wait for the server's SETTINGS: three streams at once.
    let bytes = [
        PREFACE.to_vec(),
        frame(SETTINGS, 0, 0, &[]),
        request(1),
        request(3),
        request(5),
    ]
    .concat();
    c.send(&bytes).await;
    const RST_STREAM: u8 = 0x3;
    const REFUSED_STREAM: u32 = 0x7;
    let (_, _, stream, payload) = tokio::time::timeout(
        Duration::from_secs(60),
        read_frame_until(&mut c, |kind, _| kind == RST_STREAM),
    )
    .await
    .expect("a stream is reset");
    assert_eq!(stream, 5, "the third stream");
    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
    assert_eq!(code, REFUSED_STREAM);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while server.service.in_flight() != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the two allowed streams run: {}",
            server.service.in_flight()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
