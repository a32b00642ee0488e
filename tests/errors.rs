//! Every error code of contract §1.1, against the real server on a real socket: the status,
//! the content type, and the error object `{"type":"error","code","message"}` — as a JSON
//! body in JSON mode and as exactly one `data:` event in streaming mode — plus, for every
//! error, that the caller's quota ends where the contract says.

mod support;

use std::sync::Arc;
use std::time::Duration;

use askstream::auth::Auth;
use askstream::pipeline::{BoxFuture, Passage, PipelineError, Retriever};
use askstream::{AskService, ServiceConfig};
use serde_json::{Value, json};
use support::script::{ScriptGen, Step};
use support::*;

const ASK: &str = "/api/v1/ai/ask";
const ASK_STREAM: &str = "/api/v1/ai/ask?stream=true";
const QUERY: &str = r#"{"query":"How are quotas refunded?"}"#;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A JSON-mode error: status, `application/json`, the error object. Returns the object.
fn expect_json_error(head: &Head, body: &[u8], status: u16, code: &str, ctx: &str) -> Value {
    assert_eq!(
        head.status,
        status,
        "{ctx}: {}",
        String::from_utf8_lossy(body)
    );
    assert_eq!(
        head.header("content-type"),
        Some("application/json"),
        "{ctx}"
    );
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{ctx}: body is not JSON ({e}): {body:?}"));
    assert_error_object(&v, code, ctx);
    v
}

/// A streaming-mode error before the answer: status, `text/event-stream`, and a body that
/// is exactly one `data: <json>\n\n` event. Returns the object.
fn expect_sse_error(head: &Head, body: &[u8], status: u16, code: &str, ctx: &str) -> Value {
    assert_eq!(
        head.status,
        status,
        "{ctx}: {}",
        String::from_utf8_lossy(body)
    );
    assert_eq!(
        head.header("content-type"),
        Some("text/event-stream"),
        "{ctx}"
    );
    let text = std::str::from_utf8(body).expect("UTF-8");
    assert!(
        text.starts_with("data: ") && text.ends_with("\n\n") && text.matches("\n\n").count() == 1,
        "{ctx}: not exactly one data event: {text:?}"
    );
    let (events, comments) = parse_sse(body);
    assert_eq!(events.len(), 1, "{ctx}: {text:?}");
    assert!(comments.is_empty(), "{ctx}: {comments:?}");
    assert_error_object(&events[0], code, ctx);
    events[0].clone()
}

/// Posts `body` in JSON mode and in streaming mode; both must be refused with `code`.
async fn expect_refused_both_modes(
    server: &TestServer,
    body: &str,
    extra: &str,
    status: u16,
    code: &str,
    ctx: &str,
) -> (Head, Head) {
    let (jh, jb) = ask(server.addr, ASK, body, extra).await;
    expect_json_error(&jh, &jb, status, code, &format!("{ctx} (json)"));
    let (sh, sb) = ask(server.addr, ASK_STREAM, body, extra).await;
    expect_sse_error(&sh, &sb, status, code, &format!("{ctx} (stream)"));
    (jh, sh)
}

/// A successful streaming answer: 200, event-stream, tokens then `done`. Returns events.
fn expect_stream_done(head: &Head, body: &[u8], ctx: &str) -> Vec<Value> {
    assert_eq!(head.status, 200, "{ctx}: {}", String::from_utf8_lossy(body));
    assert_eq!(
        head.header("content-type"),
        Some("text/event-stream"),
        "{ctx}"
    );
    let (events, _) = parse_sse(body);
    assert!(events.len() >= 2, "{ctx}: {events:?}");
    assert_eq!(events.last().unwrap()["type"], "done", "{ctx}: {events:?}");
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| e["type"] == "token"),
        "{ctx}: {events:?}"
    );
    events
}

/// A stream that began (200) and then failed: returns the events; the last is the error
/// object with `code`, and nothing else but tokens precedes it.
fn expect_stream_failed(head: &Head, body: &[u8], code: &str, ctx: &str) -> Vec<Value> {
    assert_eq!(head.status, 200, "{ctx}: {}", String::from_utf8_lossy(body));
    assert_eq!(
        head.header("content-type"),
        Some("text/event-stream"),
        "{ctx}"
    );
    let (events, _) = parse_sse(body);
    let last = events.last().unwrap_or_else(|| panic!("{ctx}: no events"));
    assert_error_object(last, code, ctx);
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| e["type"] == "token"),
        "{ctx}: {events:?}"
    );
    events
}

// ---------------------------------------------------------------------------------------
// Test pipeline pieces
// ---------------------------------------------------------------------------------------

/// Answers `ok ok` for any query, unless the query names a failure:
/// `fail` → two tokens then an upstream error; `boom` → a token then a panic;
/// `stall` → a token then silence; `hold` → silence from the start.
fn scripted(query: &str) -> Vec<Step> {
    use Step::*;
    if query.contains("fail") {
        vec![
            Tok("Two"),
            Tok(" tokens"),
            Fail(PipelineError::upstream("the model server returned 500")),
        ]
    } else if query.contains("boom") {
        vec![Tok("Before"), Panic]
    } else if query.contains("stall") {
        vec![Tok("Only"), Hang]
    } else if query.contains("hold") {
        vec![Hang]
    } else {
        vec![Tok("ok"), Tok(" ok")]
    }
}

async fn scripted_server(config: ServiceConfig) -> TestServer {
    let service = AskService::builder(config).generator(Arc::new(ScriptGen(scripted)));
    TestServer::start_with(service).await
}

struct DownRetriever;

impl Retriever for DownRetriever {
    fn retrieve<'a>(
        &'a self,
        _query: &'a str,
        _top_k: usize,
    ) -> BoxFuture<'a, Result<Vec<Passage>, PipelineError>> {
        Box::pin(async { Err(PipelineError::upstream("the vector store is unreachable")) })
    }
}

// ---------------------------------------------------------------------------------------
// BAD_REQUEST
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_request_for_malformed_or_invalid_bodies_in_both_modes() {
    let server = TestServer::start(config_with_limit(5)).await;
    let auth = bearer("bad-bodies");
    let cases: &[(&str, &str)] = &[
        ("malformed JSON", r#"{"query":"#),
        ("not JSON at all", "query=hello"),
        ("empty body", ""),
        ("array", r#"["query"]"#),
        // serde reads a struct from an array of its fields; an ask is an object only.
        ("array of an ask's fields", r#"["what is askstream?", 3]"#),
        (
            "array of an ask's fields, spaced",
            " \n[\"what is askstream?\", null]",
        ),
        ("missing query", r#"{"topK":3}"#),
        ("null query", r#"{"query":null}"#),
        ("numeric query", r#"{"query":42}"#),
        ("empty query", r#"{"query":""}"#),
        ("whitespace query", r#"{"query":"  \n\t  "}"#),
    ];
    for (what, body) in cases {
        expect_refused_both_modes(&server, body, &auth, 400, "BAD_REQUEST", what).await;
    }
    assert_eq!(
        remaining(server.addr, "bad-bodies").await,
        5,
        "nothing charged"
    );
}

#[tokio::test]
async fn bad_request_query_length_is_counted_in_characters_after_trimming() {
    let server = TestServer::start(config_with_limit(10)).await;
    let auth = bearer("lengths");

    let too_long = ask_body(&"a".repeat(4001));
    expect_refused_both_modes(&server, &too_long, &auth, 400, "BAD_REQUEST", "4001 ASCII").await;
    let too_long_mb = ask_body(&"é".repeat(4001));
    expect_refused_both_modes(&server, &too_long_mb, &auth, 400, "BAD_REQUEST", "4001 é").await;
    assert_eq!(
        remaining(server.addr, "lengths").await,
        10,
        "refusals cost nothing"
    );

    // 4000 two-byte characters (8000 bytes) are within the limit, in both modes.
    let max_mb = ask_body(&"é".repeat(4000));
    let (h, b) = ask(server.addr, ASK, &max_mb, &auth).await;
    assert_eq!(h.status, 200, "{}", String::from_utf8_lossy(&b));
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["quotaRemaining"], 9);
    let (h, b) = ask(server.addr, ASK_STREAM, &max_mb, &auth).await;
    let events = expect_stream_done(&h, &b, "4000 é streaming");
    assert_eq!(events.last().unwrap()["quotaRemaining"], 8);

    // Surrounding whitespace does not count.
    let padded = ask_body(&format!("  \n{}\t ", "a".repeat(4000)));
    let (h, b) = ask(server.addr, ASK, &padded, &auth).await;
    assert_eq!(h.status, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(remaining(server.addr, "lengths").await, 7);
}

#[tokio::test]
async fn bad_request_for_top_k_outside_1_to_20_or_not_an_integer() {
    let server = TestServer::start(config_with_limit(10)).await;
    let auth = bearer("topk");
    for top_k in ["0", "21", "2.5", r#""3""#, "-1", "true", "1e400"] {
        let body = format!(r#"{{"query":"quota","topK":{top_k}}}"#);
        expect_refused_both_modes(&server, &body, &auth, 400, "BAD_REQUEST", &body).await;
    }
    assert_eq!(
        remaining(server.addr, "topk").await,
        10,
        "refusals cost nothing"
    );
    // The bounds themselves, and unknown fields, are accepted.
    for body in [
        r#"{"query":"quota","topK":1}"#,
        r#"{"query":"quota","topK":20,"temperature":0.2,"extra":{"a":[1]}}"#,
    ] {
        let (h, b) = ask(server.addr, ASK, body, &auth).await;
        assert_eq!(h.status, 200, "{body}: {}", String::from_utf8_lossy(&b));
    }
    assert_eq!(remaining(server.addr, "topk").await, 8);
}

#[tokio::test]
async fn bad_request_for_a_stream_value_other_than_true_false_1_0() {
    let server = TestServer::start(config_with_limit(5)).await;
    let auth = bearer("stream-flag");
    for query in [
        "stream=yes",
        "stream=",
        "stream",
        "stream=TRUE",
        "stream=2",
        "a=b&stream=on",
    ] {
        let path = format!("{ASK}?{query}");
        let (h, b) = ask(server.addr, &path, QUERY, &auth).await;
        expect_json_error(&h, &b, 400, "BAD_REQUEST", &path);
    }
    assert_eq!(
        remaining(server.addr, "stream-flag").await,
        5,
        "nothing charged"
    );
    // The accepted spellings.
    for (query, streaming) in [
        ("stream=true", true),
        ("stream=1", true),
        ("stream=false", false),
        ("stream=0", false),
    ] {
        let path = format!("{ASK}?{query}");
        let (h, b) = ask(server.addr, &path, QUERY, &auth).await;
        assert_eq!(h.status, 200, "{path}");
        let ct = if streaming {
            "text/event-stream"
        } else {
            "application/json"
        };
        assert_eq!(h.header("content-type"), Some(ct), "{path}");
        if streaming {
            expect_stream_done(&h, &b, &path);
        }
    }
    assert_eq!(remaining(server.addr, "stream-flag").await, 1);
}

// ---------------------------------------------------------------------------------------
// UNAUTHORIZED
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn unauthorized_without_a_known_key_and_the_key_is_never_echoed() {
    let service = AskService::builder(fast_config()).auth(Auth::parse("key1 alice 5\n").unwrap());
    let server = TestServer::start_with(service).await;

    let secret = "sk-live-DO-NOT-ECHO-4242";
    let cases = [
        ("no authorization header", String::new()),
        ("unknown key", bearer(secret)),
        (
            "another scheme",
            format!("authorization: Basic {secret}\r\n"),
        ),
        (
            "bearer without a token",
            "authorization: Bearer\r\n".to_string(),
        ),
        ("key with a suffix", bearer("key1x")),
    ];
    for (what, extra) in &cases {
        let (jh, jb) = ask(server.addr, ASK, QUERY, extra).await;
        expect_json_error(&jh, &jb, 401, "UNAUTHORIZED", what);
        let (sh, sb) = ask(server.addr, ASK_STREAM, QUERY, extra).await;
        expect_sse_error(&sh, &sb, 401, "UNAUTHORIZED", what);
        for (head, body) in [(&jh, &jb), (&sh, &sb)] {
            let text = String::from_utf8_lossy(body);
            assert!(!text.contains(secret), "{what}: key echoed: {text}");
            assert!(
                head.headers.iter().all(|(_, v)| !v.contains(secret)),
                "{what}: key echoed in a header: {head:?}"
            );
        }

        // The quota endpoint has the same rule.
        let mut c = RawConn::connect(server.addr).await;
        c.get("/api/v1/quota", extra).await;
        let h = c.read_head().await;
        let b = c.read_body(&h).await;
        expect_json_error(&h, &b, 401, "UNAUTHORIZED", &format!("quota: {what}"));
        assert!(!String::from_utf8_lossy(&b).contains(secret));
    }

    // The known key works and was never charged by the refusals above.
    let v = quota(server.addr, "key1").await;
    assert_eq!(
        (v["limit"].as_u64(), v["remaining"].as_u64()),
        (Some(5), Some(5))
    );
    let (h, b) = ask(server.addr, ASK_STREAM, QUERY, &bearer("key1")).await;
    let events = expect_stream_done(&h, &b, "known key");
    assert_eq!(events.last().unwrap()["quotaRemaining"], 4);
}

// ---------------------------------------------------------------------------------------
// NOT_FOUND, METHOD_NOT_ALLOWED
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn not_found_for_unknown_paths() {
    let server = TestServer::start(fast_config()).await;
    for request in [
        "GET /index.html HTTP/1.1\r\nhost: t\r\n\r\n",
        "GET /api/v1/ai HTTP/1.1\r\nhost: t\r\n\r\n",
        "GET /api/v1/quota/ HTTP/1.1\r\nhost: t\r\n\r\n",
        "POST /api/v1/ai/ask/ HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}",
        "POST /api/v1/ai/asks?stream=true HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}",
        "DELETE /nope HTTP/1.1\r\nhost: t\r\n\r\n",
    ] {
        let (h, b) = raw(&server, request.as_bytes()).await;
        expect_json_error(&h, &b, 404, "NOT_FOUND", request);
    }
}

#[tokio::test]
async fn method_not_allowed_names_the_allowed_methods() {
    let server = TestServer::start(fast_config()).await;
    let cases = [
        ("GET /api/v1/ai/ask HTTP/1.1\r\nhost: t\r\n\r\n", "POST"),
        (
            "GET /api/v1/ai/ask?stream=true HTTP/1.1\r\nhost: t\r\n\r\n",
            "POST",
        ),
        (
            "PUT /api/v1/ai/ask HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}",
            "POST",
        ),
        (
            "POST /healthz HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}",
            "GET, HEAD",
        ),
        (
            "DELETE /api/v1/quota HTTP/1.1\r\nhost: t\r\n\r\n",
            "GET, HEAD",
        ),
    ];
    for (request, allow) in cases {
        let (h, b) = raw(&server, request.as_bytes()).await;
        expect_json_error(&h, &b, 405, "METHOD_NOT_ALLOWED", request);
        assert_eq!(h.header("allow"), Some(allow), "{request}");
    }
}

// ---------------------------------------------------------------------------------------
// PAYLOAD_TOO_LARGE
// ---------------------------------------------------------------------------------------

/// A valid ask body of exactly `len` bytes (padded with JSON whitespace).
fn body_of_len(len: usize) -> String {
    let mut b = QUERY.to_string();
    assert!(len >= b.len());
    b.insert_str(b.len() - 1, &" ".repeat(len - QUERY.len()));
    assert_eq!(b.len(), len);
    b
}

#[tokio::test]
async fn payload_too_large_over_max_body_bytes_and_the_limit_itself_is_accepted() {
    let mut config = config_with_limit(5);
    config.max_body_bytes = 256;
    let server = TestServer::start(config).await;
    let auth = bearer("sizes");

    let over = body_of_len(257);
    expect_refused_both_modes(&server, &over, &auth, 413, "PAYLOAD_TOO_LARGE", "257").await;
    let way_over = body_of_len(4000);
    expect_refused_both_modes(&server, &way_over, &auth, 413, "PAYLOAD_TOO_LARGE", "4000").await;
    assert_eq!(
        remaining(server.addr, "sizes").await,
        5,
        "refusals cost nothing"
    );

    let exact = body_of_len(256);
    let (h, b) = ask(server.addr, ASK, &exact, &auth).await;
    assert_eq!(h.status, 200, "{}", String::from_utf8_lossy(&b));
    let (h, b) = ask(server.addr, ASK_STREAM, &exact, &auth).await;
    expect_stream_done(&h, &b, "256 bytes");
    assert_eq!(remaining(server.addr, "sizes").await, 3);
}

#[tokio::test]
async fn payload_too_large_for_a_huge_declared_length_without_reading_the_body() {
    let mut config = config_with_limit(5);
    // A server that waited for the body would be cut by this timeout (as a 400) only long
    // after the guard below has failed the test.
    config.header_timeout = Duration::from_secs(120);
    let server = TestServer::start(config).await;
    for (path, streaming) in [(ASK, false), (ASK_STREAM, true)] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
             authorization: Bearer huge\r\ncontent-length: 10000000000\r\n\r\n"
        );
        let mut c = RawConn::connect(server.addr).await;
        c.send(head.as_bytes()).await;
        // Only the head was sent: the answer must come without the body.
        let (h, b) = tokio::time::timeout(Duration::from_secs(10), async {
            let h = c.read_head().await;
            let b = c.read_body(&h).await;
            (h, b)
        })
        .await
        .expect("the server answered 413 without waiting for the body");
        if streaming {
            expect_sse_error(&h, &b, 413, "PAYLOAD_TOO_LARGE", path);
        } else {
            expect_json_error(&h, &b, 413, "PAYLOAD_TOO_LARGE", path);
        }
    }
    assert_eq!(remaining(server.addr, "huge").await, 5);
}

#[tokio::test]
async fn payload_too_large_for_a_chunked_body_checked_while_reading() {
    let mut config = config_with_limit(5);
    config.max_body_bytes = 256;
    config.header_timeout = Duration::from_secs(120);
    let server = TestServer::start(config).await;
    let chunked_head = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
             authorization: Bearer chunky\r\ntransfer-encoding: chunked\r\n\r\n"
        )
    };

    // A chunked body under the limit is read and accepted.
    let ok = QUERY;
    let request = format!("{}{:x}\r\n{ok}\r\n0\r\n\r\n", chunked_head(ASK), ok.len());
    let (h, b) = raw(&server, request.as_bytes()).await;
    assert_eq!(h.status, 200, "{}", String::from_utf8_lossy(&b));

    // Over the limit, and never finished: one chunk that announces 1 MiB, of which 1024
    // bytes are sent. Only a server that counts while reading can answer.
    for (path, streaming) in [(ASK, false), (ASK_STREAM, true)] {
        let mut request = format!("{}100000\r\n{{\"query\":\"", chunked_head(path)).into_bytes();
        request.extend(std::iter::repeat_n(b'a', 1024));
        let mut c = RawConn::connect(server.addr).await;
        c.send(&request).await;
        let (h, b) = tokio::time::timeout(Duration::from_secs(10), async {
            let h = c.read_head().await;
            let b = c.read_body(&h).await;
            (h, b)
        })
        .await
        .expect("the server answered 413 while the body was still arriving");
        if streaming {
            expect_sse_error(&h, &b, 413, "PAYLOAD_TOO_LARGE", path);
        } else {
            expect_json_error(&h, &b, 413, "PAYLOAD_TOO_LARGE", path);
        }
    }
    assert_eq!(
        remaining(server.addr, "chunky").await,
        4,
        "only the accepted ask"
    );
}

// ---------------------------------------------------------------------------------------
// UNSUPPORTED_MEDIA_TYPE
// ---------------------------------------------------------------------------------------

fn post_with_headers(path: &str, headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: t\r\n{headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn unsupported_media_type_for_non_json_and_absent_content_type_is_accepted() {
    let server = TestServer::start(config_with_limit(10)).await;
    let auth = bearer("media");
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/json",
    ] {
        let headers = format!("{auth}content-type: {ct}\r\n");
        let (h, b) = raw(&server, post_with_headers(ASK, &headers, QUERY).as_bytes()).await;
        expect_json_error(&h, &b, 415, "UNSUPPORTED_MEDIA_TYPE", ct);
        let (h, b) = raw(
            &server,
            post_with_headers(ASK_STREAM, &headers, QUERY).as_bytes(),
        )
        .await;
        expect_sse_error(&h, &b, 415, "UNSUPPORTED_MEDIA_TYPE", ct);
    }
    assert_eq!(remaining(server.addr, "media").await, 10, "nothing charged");

    // No content-type at all (curl -d without -H) is accepted, as are JSON with
    // parameters and `+json` types.
    let (h, b) = raw(&server, post_with_headers(ASK, &auth, QUERY).as_bytes()).await;
    assert_eq!(h.status, 200, "{}", String::from_utf8_lossy(&b));
    let (h, b) = raw(
        &server,
        post_with_headers(ASK_STREAM, &auth, QUERY).as_bytes(),
    )
    .await;
    expect_stream_done(&h, &b, "no content-type");
    for ct in [
        "application/json; charset=utf-8",
        "application/vnd.api+json",
    ] {
        let headers = format!("{auth}content-type: {ct}\r\n");
        let (h, b) = raw(&server, post_with_headers(ASK, &headers, QUERY).as_bytes()).await;
        assert_eq!(h.status, 200, "{ct}: {}", String::from_utf8_lossy(&b));
    }
    assert_eq!(remaining(server.addr, "media").await, 6);
}

// ---------------------------------------------------------------------------------------
// QUOTA_EXCEEDED
// ---------------------------------------------------------------------------------------

fn retry_after(head: &Head, ctx: &str) -> u64 {
    let value = head
        .header("retry-after")
        .unwrap_or_else(|| panic!("{ctx}: no retry-after"));
    let secs: u64 = value
        .parse()
        .unwrap_or_else(|_| panic!("{ctx}: retry-after {value:?} is not an integer"));
    assert!(
        (1..=86_400).contains(&secs),
        "{ctx}: retry-after {secs} is not within the 24 h window"
    );
    secs
}

#[tokio::test]
async fn quota_exceeded_with_retry_after_in_both_modes_and_nothing_deducted() {
    // Two keys of one user: `small` may use 2 asks, `big` 5, from the same count. What
    // `big` sees left shows exactly how many asks were taken, refusals included.
    let service = AskService::builder(fast_config())
        .auth(Auth::parse("small alice 2\nbig alice 5\n").unwrap());
    let server = TestServer::start_with(service).await;
    let small = bearer("small");

    let (h, b) = ask(server.addr, ASK_STREAM, QUERY, &small).await;
    assert_eq!(
        expect_stream_done(&h, &b, "1st").last().unwrap()["quotaRemaining"],
        1
    );
    let (h, b) = ask(server.addr, ASK, QUERY, &small).await;
    assert_eq!(h.status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["quotaRemaining"],
        0
    );

    for _ in 0..3 {
        let (jh, sh) =
            expect_refused_both_modes(&server, QUERY, &small, 429, "QUOTA_EXCEEDED", "3rd").await;
        retry_after(&jh, "json");
        retry_after(&sh, "stream");
    }

    let v = quota(server.addr, "small").await;
    assert_eq!(
        (v["limit"].as_u64(), v["remaining"].as_u64()),
        (Some(2), Some(0))
    );
    let v = quota(server.addr, "big").await;
    assert_eq!(
        (v["limit"].as_u64(), v["remaining"].as_u64()),
        (Some(5), Some(3)),
        "the six refused asks took nothing"
    );
    server.settled().await;
    assert_eq!(
        remaining(server.addr, "big").await,
        3,
        "and nothing was refunded"
    );
}

// ---------------------------------------------------------------------------------------
// OVERLOADED
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_while_max_streams_answers_are_in_flight() {
    let mut config = config_with_limit(10);
    config.max_streams = 1;
    config.ttft_timeout = Duration::from_millis(3_600_000);
    let server = scripted_server(config).await;
    let auth = bearer("busy");

    // One answer in flight: its model never answers.
    let mut first = RawConn::connect(server.addr).await;
    first
        .post(ASK_STREAM, &ask_body("hold the line"), &auth)
        .await;
    let head = first.read_head().await;
    assert_eq!(head.status, 200);
    assert_eq!(server.service.in_flight(), 1);

    for _ in 0..2 {
        expect_refused_both_modes(&server, QUERY, &auth, 503, "OVERLOADED", "2nd").await;
    }
    assert_eq!(
        remaining(server.addr, "busy").await,
        9,
        "only the answer in flight is charged"
    );

    // The client leaves: its ask is refunded and the slot is free again.
    drop(first);
    server.settled().await;
    assert_eq!(server.service.in_flight(), 0);
    assert_eq!(remaining(server.addr, "busy").await, 10);

    let (h, b) = ask(server.addr, ASK_STREAM, QUERY, &auth).await;
    let events = expect_stream_done(&h, &b, "after the slot freed");
    assert_eq!(answer_text(&events), "ok ok");
    assert_eq!(events.last().unwrap()["quotaRemaining"], 9);
    // The answer task holds its slot until it has settled, a moment after the client has
    // read `done`; wait for that before asking again with a single slot.
    server.settled().await;
    let (h, b) = ask(server.addr, ASK, QUERY, &auth).await;
    assert_eq!(h.status, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["answer"],
        "ok ok"
    );
}

// ---------------------------------------------------------------------------------------
// SHUTTING_DOWN
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn shutting_down_refuses_asks_in_both_modes_and_healthz_turns_503() {
    let server = TestServer::start(config_with_limit(5)).await;
    let auth = bearer("late");

    let mut c = RawConn::connect(server.addr).await;
    c.get("/healthz", "").await;
    let h = c.read_head().await;
    assert_eq!(h.status, 200);
    assert_eq!(c.read_body(&h).await, b"ok\n");

    server.service.shutdown().drain();

    expect_refused_both_modes(&server, QUERY, &auth, 503, "SHUTTING_DOWN", "draining").await;
    let mut c = RawConn::connect(server.addr).await;
    c.get("/healthz", "").await;
    let h = c.read_head().await;
    assert_eq!(h.status, 503);
    let _ = c.read_body(&h).await;
    assert_eq!(remaining(server.addr, "late").await, 5, "nothing charged");
}

// ---------------------------------------------------------------------------------------
// UPSTREAM_ERROR
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_error_after_tokens_ends_the_stream_and_refunds() {
    let server = scripted_server(config_with_limit(5)).await;
    let auth = bearer("upstream");

    let (h, b) = ask(server.addr, ASK_STREAM, &ask_body("please fail"), &auth).await;
    let events = expect_stream_failed(&h, &b, "UPSTREAM_ERROR", "stream");
    assert_eq!(
        events[..2],
        [
            json!({"type":"token","token":"Two"}),
            json!({"type":"token","token":" tokens"})
        ]
    );
    assert_eq!(events.len(), 3);
    server.settled().await;
    assert_eq!(remaining(server.addr, "upstream").await, 5, "refunded");

    let (h, b) = ask(server.addr, ASK, &ask_body("please fail"), &auth).await;
    expect_json_error(&h, &b, 502, "UPSTREAM_ERROR", "json");
    assert_eq!(remaining(server.addr, "upstream").await, 5, "refunded");

    // A good ask still costs one.
    let (h, b) = ask(server.addr, ASK_STREAM, QUERY, &auth).await;
    expect_stream_done(&h, &b, "good");
    assert_eq!(remaining(server.addr, "upstream").await, 4);
}

#[tokio::test]
async fn upstream_error_when_the_retriever_fails() {
    let service = AskService::builder(config_with_limit(5)).retriever(Arc::new(DownRetriever));
    let server = TestServer::start_with(service).await;
    let auth = bearer("retriever");

    let (h, b) = ask(server.addr, ASK_STREAM, QUERY, &auth).await;
    let events = expect_stream_failed(&h, &b, "UPSTREAM_ERROR", "stream");
    assert_eq!(events.len(), 1, "no tokens: {events:?}");
    server.settled().await;
    assert_eq!(remaining(server.addr, "retriever").await, 5, "refunded");

    let (h, b) = ask(server.addr, ASK, QUERY, &auth).await;
    expect_json_error(&h, &b, 502, "UPSTREAM_ERROR", "json");
    assert_eq!(remaining(server.addr, "retriever").await, 5, "refunded");
}

// ---------------------------------------------------------------------------------------
// UPSTREAM_TIMEOUT
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_timeout_without_a_first_token() {
    let mut config = config_with_limit(5);
    support::sim(&mut config).ttft = Duration::from_millis(3_600_000);
    config.ttft_timeout = Duration::from_millis(50);
    let server = TestServer::start(config).await;
    let auth = bearer("ttft");

    let (h, b) = ask(server.addr, ASK_STREAM, QUERY, &auth).await;
    let events = expect_stream_failed(&h, &b, "UPSTREAM_TIMEOUT", "stream");
    assert_eq!(events.len(), 1, "no tokens: {events:?}");
    server.settled().await;
    assert_eq!(remaining(server.addr, "ttft").await, 5, "refunded");

    let (h, b) = ask(server.addr, ASK, QUERY, &auth).await;
    expect_json_error(&h, &b, 504, "UPSTREAM_TIMEOUT", "json");
    assert_eq!(remaining(server.addr, "ttft").await, 5, "refunded");
}

#[tokio::test]
async fn upstream_timeout_when_the_model_goes_silent_between_tokens() {
    let mut config = config_with_limit(5);
    // Only the idle deadline can end these answers: the first-token deadline and the
    // heartbeat are an hour away, far beyond the guard below.
    config.ttft_timeout = Duration::from_millis(3_600_000);
    config.heartbeat = Duration::from_secs(3600);
    config.idle_timeout = Duration::from_millis(50);
    let server = scripted_server(config).await;
    let auth = bearer("idle");
    let guard = Duration::from_secs(10);

    let (h, b) = tokio::time::timeout(
        guard,
        ask(server.addr, ASK_STREAM, &ask_body("stall please"), &auth),
    )
    .await
    .expect("the idle deadline ended the stream");
    let events = expect_stream_failed(&h, &b, "UPSTREAM_TIMEOUT", "stream");
    assert_eq!(events[0], json!({"type":"token","token":"Only"}));
    assert_eq!(events.len(), 2);
    server.settled().await;
    assert_eq!(remaining(server.addr, "idle").await, 5, "refunded");

    let (h, b) = tokio::time::timeout(
        guard,
        ask(server.addr, ASK, &ask_body("stall please"), &auth),
    )
    .await
    .expect("the idle deadline ended the answer");
    expect_json_error(&h, &b, 504, "UPSTREAM_TIMEOUT", "json");
    assert_eq!(remaining(server.addr, "idle").await, 5, "refunded");
}

// ---------------------------------------------------------------------------------------
// INTERNAL
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_when_the_generator_panics_and_the_server_keeps_serving() {
    let server = scripted_server(config_with_limit(5)).await;
    let auth = bearer("panic");

    let (h, b) = ask(server.addr, ASK_STREAM, &ask_body("boom"), &auth).await;
    let events = expect_stream_failed(&h, &b, "INTERNAL", "stream");
    assert_eq!(events[0], json!({"type":"token","token":"Before"}));
    assert_eq!(events.len(), 2);
    server.settled().await;
    assert_eq!(remaining(server.addr, "panic").await, 5, "refunded");

    let (h, b) = ask(server.addr, ASK, &ask_body("boom"), &auth).await;
    expect_json_error(&h, &b, 500, "INTERNAL", "json");
    assert_eq!(remaining(server.addr, "panic").await, 5, "refunded");

    // Still serving, in both modes, on new connections.
    let (h, b) = ask(server.addr, ASK_STREAM, QUERY, &auth).await;
    let events = expect_stream_done(&h, &b, "after the panic");
    assert_eq!(answer_text(&events), "ok ok");
    let (h, b) = ask(server.addr, ASK, QUERY, &auth).await;
    assert_eq!(h.status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["answer"],
        "ok ok"
    );
    assert_eq!(remaining(server.addr, "panic").await, 3);
}
