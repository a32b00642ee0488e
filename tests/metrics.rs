//! `GET /metrics` (contract §1.2) over a real socket: every outcome lands in its series.

mod support;

use std::time::Duration;

use support::{RawConn, TestServer, ask, fast_config, stream_ask};

async fn scrape(server: &TestServer) -> String {
    let mut c = RawConn::connect(server.addr).await;
    c.get("/metrics", "").await;
    let head = c.read_head().await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    String::from_utf8(c.read_body(&head).await).unwrap()
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn outcomes_tokens_refunds_and_histograms() {
    let mut config = fast_config();
    config.quota_limit = 2;
    support::sim(&mut config).tokens = 7;
    let server = TestServer::start(config).await;

    // Two delivered answers: the user's whole quota.
    for _ in 0..2 {
        let (head, events) = stream_ask(server.addr, "quota", "m").await;
        assert_eq!(head.status, 200);
        assert_eq!(events.last().unwrap()["type"], "done");
    }
    // A third is refused by the quota; a malformed one by validation.
    assert_eq!(stream_ask(server.addr, "quota", "m").await.0.status, 429);
    let (head, _) = ask(server.addr, "/api/v1/ai/ask", "{", "").await;
    assert_eq!(head.status, 400);
    server.settled().await;

    let text = scrape(&server).await;
    assert_eq!(sample(&text, "askstream_asks_total{outcome=\"done\"}"), 2.0);
    assert_eq!(
        sample(&text, "askstream_asks_total{outcome=\"quota_exceeded\"}"),
        1.0
    );
    assert_eq!(sample(&text, "askstream_quota_rejections_total"), 1.0);
    assert_eq!(
        sample(
            &text,
            "askstream_asks_total{outcome=\"rejected\",code=\"BAD_REQUEST\"}"
        ),
        1.0
    );
    assert_eq!(sample(&text, "askstream_tokens_streamed_total"), 14.0);
    assert_eq!(sample(&text, "askstream_refunds_total"), 0.0);
    assert_eq!(sample(&text, "askstream_active_streams"), 0.0);
    assert_eq!(
        sample(&text, "askstream_ttft_seconds_count"),
        2.0,
        "server-side TTFT of both streams"
    );
    assert_eq!(
        sample(&text, "askstream_ttft_seconds_bucket{le=\"+Inf\"}"),
        2.0
    );
}

#[tokio::test]
async fn a_disconnect_is_counted_with_its_detection_lag_and_refund() {
    let mut config = fast_config();
    support::sim(&mut config).ttft = Duration::from_millis(3_600_000);
    let server = TestServer::start(config).await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.post("/api/v1/ai/ask?stream=true", r#"{"query":"quota"}"#, "")
        .await;
    assert_eq!(conn.read_head().await.status, 200);
    assert_eq!(
        sample(&scrape(&server).await, "askstream_active_streams"),
        1.0
    );
    drop(conn);
    server.settled().await;

    let text = scrape(&server).await;
    assert_eq!(
        sample(&text, "askstream_asks_total{outcome=\"disconnected\"}"),
        1.0
    );
    assert_eq!(sample(&text, "askstream_disconnects_total"), 1.0);
    assert_eq!(sample(&text, "askstream_refunds_total"), 1.0);
    assert_eq!(sample(&text, "askstream_active_streams"), 0.0);
    assert_eq!(
        sample(&text, "askstream_disconnect_detection_seconds_count"),
        1.0
    );
    assert_eq!(
        sample(&text, "askstream_ttft_seconds_count"),
        0.0,
        "no frame was ever yielded"
    );
}
