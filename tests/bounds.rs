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
    assert_eq!(kinds, [vec!["token"; 7], vec!["done"]].concat(), "{events:?}");
    let done = events.last().unwrap();
    assert_eq!(done["usage"]["completionTokens"], 7);
    assert_eq!(done["quotaRemaining"], 4, "a complete answer is charged");
    server.settled().await;
    assert_eq!(remaining(server.addr, "capped").await, 4);
}
