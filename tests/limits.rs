//! Slow senders (slowloris): headers and bodies must arrive within `--header-timeout-secs`.
//! Paused tokio time: the server's timers are tokio timers, so the bound is exact and the
//! test takes no wall time.

mod support;

use serde_json::Value;
use std::time::Duration;

use support::{RawConn, TestServer, fast_config};

#[tokio::test(start_paused = true)]
async fn headers_that_never_finish_are_cut_off() {
    let server = TestServer::start(fast_config()).await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.send(b"POST /api/v1/ai/ask?stream=true HTTP/1.1\r\nhost: test\r\ncontent-type: appl")
        .await;
    // The server gives up after the header timeout: whatever it answers (hyper may send a
    // 408 or just close), the connection ends and no ask was started.
    let rest = tokio::time::timeout(std::time::Duration::from_secs(60), conn.read_to_eof())
        .await
        .expect("the server closes a connection whose headers never finish");
    let text = String::from_utf8_lossy(&rest);
    assert!(
        !text.contains("text/event-stream"),
        "no answer was started: {text}"
    );
    assert_eq!(server.service.in_flight(), 0);
}

/// A connection that never sends a byte is closed at the header timeout too: before the
/// first byte the server does not yet know which protocol it will speak.
#[tokio::test(start_paused = true)]
async fn a_connection_that_never_speaks_is_closed() {
    let server = TestServer::start(fast_config()).await;
    let mut conn = RawConn::connect(server.addr).await;
    let rest = tokio::time::timeout(std::time::Duration::from_secs(60), conn.read_to_eof())
        .await
        .expect("the server closes a connection that stays silent");
    assert!(rest.is_empty(), "nothing was asked, nothing answered");
}

/// A silent connection neither delays a shutdown nor survives it.
#[tokio::test(start_paused = true)]
async fn a_silent_connection_is_closed_by_shutdown() {
    let mut config = fast_config();
    config.header_timeout = Duration::from_secs(3600);
    let mut server = TestServer::start(config).await;
    let mut conn = RawConn::connect(server.addr).await;
    // Connections are accepted in order: once a later one is answered, the silent one
    // is past accept, waiting for its first byte.
    let mut later = RawConn::connect(server.addr).await;
    later.get("/healthz", "").await;
    assert_eq!(later.read_head().await.status, 200);
    let serve = server.signal_shutdown();
    let rest = tokio::time::timeout(std::time::Duration::from_secs(60), conn.read_to_eof())
        .await
        .expect("the drain closes a silent connection");
    assert!(rest.is_empty());
    drop(later);
    tokio::time::timeout(std::time::Duration::from_secs(60), serve)
        .await
        .expect("serve returns without waiting for the silent connection")
        .expect("serve does not panic");
}

#[tokio::test(start_paused = true)]
async fn a_body_that_never_finishes_is_refused_and_not_charged() {
    let server = TestServer::start(fast_config()).await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.send(
        b"POST /api/v1/ai/ask HTTP/1.1\r\nhost: test\r\nauthorization: Bearer slow\r\n\
          content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"query\":",
    )
    .await;
    let head = tokio::time::timeout(std::time::Duration::from_secs(60), conn.read_head())
        .await
        .expect("the server answers a stalled body");
    assert_eq!(head.status, 400);
    let body: Value = serde_json::from_slice(&conn.read_body(&head).await).unwrap();
    assert_eq!(body["code"], "BAD_REQUEST");
    assert!(
        body["message"].as_str().unwrap().contains("did not arrive"),
        "{body}"
    );
    assert_eq!(support::quota(server.addr, "slow").await["remaining"], 20);
}
