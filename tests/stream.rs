//! The streaming and JSON contract (contract §1.1) over a real socket.

mod support;

use askstream::sse::decode::{Decoder, Item};
use serde_json::Value;
use support::{RawConn, TestServer, answer_text, ask, ask_body, fast_config, parse_sse};

const ASK_STREAM: &str = "/api/v1/ai/ask?stream=true";

/// A client that asks to close gets `connection: close` alone, never beside
/// `keep-alive`, and the connection closes after the whole answer.
#[tokio::test]
async fn a_stream_for_a_client_that_closes_says_close_only() {
    let server = TestServer::start(fast_config()).await;
    let mut c = RawConn::connect(server.addr).await;
    c.post(
        ASK_STREAM,
        &ask_body("How do quota refunds work?"),
        "connection: close\r\n",
    )
    .await;
    let head = c.read_head().await;
    assert_eq!(head.status, 200);
    let connection: Vec<&str> = head
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(connection, ["close"]);
    let body = c.read_body(&head).await;
    let (events, _) = parse_sse(&body);
    assert_eq!(events.last().unwrap()["type"], "done");
    assert!(c.read_to_eof().await.is_empty(), "closed after the answer");
}

#[tokio::test]
async fn stream_headers_events_and_done() {
    let mut config = fast_config();
    support::sim(&mut config).tokens = 12;
    let server = TestServer::start(config).await;
    let (head, raw) = ask(
        server.addr,
        ASK_STREAM,
        &ask_body("How do quota refunds work?"),
        "accept-encoding: gzip, br\r\n",
    )
    .await;

    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(head.header("cache-control"), Some("no-cache"));
    assert_eq!(head.header("x-accel-buffering"), Some("no"));
    assert_eq!(head.header("connection"), Some("keep-alive"));
    assert_eq!(head.header("content-encoding"), None, "never compressed");
    let query_id = head
        .header("x-query-id")
        .expect("x-query-id header")
        .to_string();
    assert_eq!(query_id.len(), 32);
    assert!(
        query_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "URL-safe id: {query_id}"
    );

    // Every event is exactly `data: <one-line JSON>\n\n`.
    let text = std::str::from_utf8(&raw).unwrap();
    assert!(text.ends_with("\n\n"));
    let blocks: Vec<&str> = text.strip_suffix("\n\n").unwrap().split("\n\n").collect();
    assert_eq!(blocks.len(), 13, "12 tokens and done");
    for block in &blocks {
        let json = block
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not a data line: {block:?}"));
        assert!(!json.contains('\n'), "one line: {block:?}");
        serde_json::from_str::<Value>(json).unwrap();
    }

    let (events, comments) = parse_sse(&raw);
    assert!(comments.is_empty());
    let (done, tokens) = events.split_last().unwrap();
    assert!(
        tokens
            .iter()
            .all(|e| e["type"] == "token" && e["token"].is_string())
    );
    assert_eq!(done["type"], "done");
    assert_eq!(done["queryId"], query_id.as_str());
    assert_eq!(done["quotaRemaining"], 19);
    assert_eq!(done["usage"]["completionTokens"], 12);
    assert!(done["timing"]["ttftMs"].as_f64().unwrap() >= 0.0);
    assert!(
        done["timing"]["totalMs"].as_f64().unwrap() >= done["timing"]["ttftMs"].as_f64().unwrap()
    );
    let sources = done["sources"].as_array().unwrap();
    let matching = askstream::pipeline::bm25::Bm25Index::builtin()
        .search("How do quota refunds work?", 100)
        .len();
    assert!(matching > 4, "the query matches more than the default topK");
    assert_eq!(sources.len(), 4, "default topK is 4: {sources:?}");
    for s in sources {
        assert!(
            s["id"].is_string() && s["title"].is_string() && s["score"].as_f64().unwrap() > 0.0,
            "{s}"
        );
    }
    assert!(
        sources[0]["id"].as_str().unwrap().starts_with("quota.md"),
        "BM25 ranks the quota doc first: {sources:?}"
    );
}

#[tokio::test]
async fn json_answer_equals_the_streamed_tokens() {
    let mut config = fast_config();
    support::sim(&mut config).tokens = 40;
    let server = TestServer::start(config).await;
    let q = ask_body("How do I put askstream behind nginx?");
    let (_, raw) = ask(server.addr, ASK_STREAM, &q, "").await;
    let (events, _) = parse_sse(&raw);
    let streamed = answer_text(&events);
    let done = events.last().unwrap();

    let (head, json) = ask(server.addr, "/api/v1/ai/ask", &q, "").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("application/json"));
    let doc: Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(doc["answer"], streamed.as_str());
    assert_eq!(doc["sources"], done["sources"]);
    assert_eq!(doc["usage"]["completionTokens"], 40);
    assert_eq!(doc["quotaRemaining"], 18);
    assert_eq!(head.header("x-query-id"), doc["queryId"].as_str());
    assert_ne!(doc["queryId"], done["queryId"], "every ask has its own id");
    assert!(doc["timing"]["totalMs"].is_number());
}

#[tokio::test]
async fn answers_are_deterministic_and_tokens_keep_their_order() {
    let server = TestServer::start(fast_config()).await;
    let q = ask_body("What does SLOW_CLIENT mean?");
    let (_, a) = ask(server.addr, ASK_STREAM, &q, "").await;
    let (_, b) = ask(server.addr, "/api/v1/ai/ask?stream=1", &q, "").await;
    let tokens = |raw: &[u8]| -> Vec<Value> {
        parse_sse(raw)
            .0
            .into_iter()
            .filter(|e| e["type"] == "token")
            .collect()
    };
    assert_eq!(tokens(&a), tokens(&b));
    assert_eq!(tokens(&a).len(), 8);
}

#[tokio::test]
async fn multibyte_text_survives() {
    let mut config = fast_config();
    support::sim(&mut config).tokens = 200;
    let server = TestServer::start(config).await;
    let (_, raw) = ask(
        server.addr,
        ASK_STREAM,
        &ask_body("naïve café 日本語 internationalisation"),
        "",
    )
    .await;
    let answer = answer_text(&parse_sse(&raw).0);
    assert!(
        !answer.is_ascii(),
        "the i18n document answers with non-ASCII text: {answer}"
    );
}

#[tokio::test]
async fn top_k_bounds_the_sources() {
    let server = TestServer::start(fast_config()).await;
    let q = serde_json::json!({ "query": "quota refund window stream", "topK": 1 }).to_string();
    let (_, raw) = ask(server.addr, ASK_STREAM, &q, "").await;
    let (events, _) = parse_sse(&raw);
    assert_eq!(
        events.last().unwrap()["sources"].as_array().unwrap().len(),
        1
    );
}

#[tokio::test]
async fn keep_alive_serves_asks_back_to_back() {
    let server = TestServer::start(fast_config()).await;
    let mut conn = RawConn::connect(server.addr).await;
    for i in 0..3 {
        conn.post(ASK_STREAM, &ask_body("heartbeat"), "").await;
        let head = conn.read_head().await;
        assert_eq!(head.status, 200, "ask {i}");
        let (events, _) = parse_sse(&conn.read_body(&head).await);
        assert_eq!(events.last().unwrap()["quotaRemaining"], 19 - i);
    }
    conn.get("/healthz", "").await;
    let head = conn.read_head().await;
    assert_eq!(head.status, 200);
    assert_eq!(conn.read_body(&head).await, b"ok\n");
}

/// A body sent only once the server has read the head and asked for the rest: the
/// connection's first read took all the socket held (and told the runtime so), yet the
/// bytes that come later are still read and answered.
#[tokio::test]
async fn a_body_sent_after_100_continue_is_read_and_answered() {
    let server = TestServer::start(fast_config()).await;
    let mut conn = RawConn::connect(server.addr).await;
    let body = ask_body("How do quota refunds work?");
    conn.send(
        format!(
            "POST {ASK_STREAM} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nexpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    // hyper sends this only when the service reads the body: the head was read by then.
    let interim = conn.read_head().await;
    assert_eq!(interim.status, 100);
    conn.send(body.as_bytes()).await;
    let head = conn.read_head().await;
    assert_eq!(head.status, 200);
    let (events, _) = parse_sse(&conn.read_body(&head).await);
    assert_eq!(events.last().unwrap()["type"], "done");
}
/// The crate's own decoder, fed a real response split at every byte, sees exactly the
/// events the simplest parser sees.
#[tokio::test]
async fn decoder_agrees_with_the_simplest_parser_at_every_split() {
    let server = TestServer::start(fast_config()).await;
    let (_, raw) = ask(server.addr, ASK_STREAM, &ask_body("load testing TTFT"), "").await;
    let (expected, _) = parse_sse(&raw);
    for split in 0..=raw.len() {
        let mut decoder = Decoder::new();
        let mut got = Vec::new();
        for part in [&raw[..split], &raw[split..]] {
            decoder.feed(part);
            while let Some(item) = decoder.next_item().unwrap() {
                if let Item::Event(e) = item {
                    got.push(serde_json::from_str::<Value>(&e.data).unwrap());
                }
            }
        }
        assert_eq!(got, expected, "split at {split}");
    }
}
