//! The `openai` generator (contract §4) against a fake OpenAI-compatible upstream, through the
//! real server and real sockets: what the upstream receives, the exact tokens streamed,
//! cancellation of the upstream request when the client leaves, every failure with its
//! code and refund, timeouts, connection reuse, and the bounds on what a broken or hostile
//! upstream can cost (answer length, event size, unreadable bodies).
//!
//! Cancellation is proven without timing: the fake upstream hangs forever with its
//! connection open, so when it sees that connection close, askstream closed it.

mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use askstream::pipeline::openai::{
    ApiKey, ChatMessage, ConfigError, OpenAiConfig, OpenAiGenerator,
};
use askstream::{AskService, GeneratorConfig, ServiceConfig, StartupError};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use support::*;
use upstream::*;

const KEY: &str = "sk-test-7f3a9c0d1e2b";
const QUERY: &str = "How do quota refunds work?";
const STREAM: &str = "/api/v1/ai/ask?stream=true";
const JSON_MODE: &str = "/api/v1/ai/ask";

/// The test config with the `openai` generator aimed at `upstream`.
fn config_for(upstream: &FakeUpstream) -> ServiceConfig {
    let mut c = fast_config();
    c.generator = GeneratorConfig::OpenAi(OpenAiConfig::new(upstream.base_url(), "test-model"));
    c
}

/// The server configured by flags only (no key).
async fn server_for(upstream: &FakeUpstream, tweak: impl FnOnce(&mut ServiceConfig)) -> TestServer {
    let mut c = config_for(upstream);
    tweak(&mut c);
    TestServer::start(c).await
}

/// The server with a generator built through the library, with [`KEY`].
async fn server_with_key(upstream: &FakeUpstream) -> TestServer {
    let generator = OpenAiGenerator::new(
        OpenAiConfig::new(upstream.base_url(), "test-model").with_api_key(ApiKey::new(KEY)),
    )
    .unwrap();
    let service = AskService::builder(config_for(upstream)).generator(Arc::new(generator));
    TestServer::start_with(service).await
}

/// A streaming ask: status and events.
async fn stream(server: &TestServer, user: &str) -> (u16, Vec<Value>) {
    let (head, body) = ask(server.addr, STREAM, &ask_body(QUERY), &bearer(user)).await;
    (head.status, parse_sse(&body).0)
}

/// A JSON-mode ask: status and document.
async fn json_ask(server: &TestServer, user: &str) -> (u16, Value) {
    let (head, body) = ask(server.addr, JSON_MODE, &ask_body(QUERY), &bearer(user)).await;
    (head.status, serde_json::from_slice(&body).unwrap())
}

fn tokens(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["token"].as_str().unwrap())
        .collect()
}

/// The user's quota once every answer has settled or refunded.
async fn settled_remaining(server: &TestServer, user: &str) -> u64 {
    server.settled().await;
    remaining(server.addr, user).await
}

/// Starts a streaming ask on a raw connection and reads the response head.
async fn start_stream(server: &TestServer, user: &str) -> RawConn {
    let mut c = RawConn::connect(server.addr).await;
    c.post(STREAM, &ask_body(QUERY), &bearer(user)).await;
    let head = c.read_head().await;
    assert_eq!(head.status, 200);
    c
}

/// Reads SSE events from a raw stream until one of type `kind` arrives.
async fn read_until(c: &mut RawConn, kind: &str) -> Vec<Value> {
    let mut body = Vec::new();
    loop {
        let chunk = c.read_chunk().await.expect("the stream goes on");
        body.extend_from_slice(&chunk);
        let events = parse_sse(&body).0;
        if events.iter().any(|e| e["type"] == kind) {
            return events;
        }
    }
}

// ---------------------------------------------------------------------------------------
// A whole answer
// ---------------------------------------------------------------------------------------

/// Tokens with the text JSON and SSE make awkward: multi-byte characters (split across
/// writes below), quotes, backslashes, newlines, a would-be SSE line.
const TOKENS: [&str; 10] = [
    "Refunds",
    " are naïve-proof",
    " — café",
    " 日本語",
    " \"quoted\"",
    "\nnew line",
    " 🚀",
    " back\\slash",
    "\ndata: not an event\n\n",
    " done.",
];

/// The upstream's stream for [`TOKENS`], with every quirk real servers have: the role
/// chunk, an empty delta and a `null` content, a keep-alive comment, CRLF line endings,
/// `data:` without a space, the finish chunk, the usage chunk and `[DONE]`.
fn quirky_answer() -> Vec<u8> {
    let mut s = String::new();
    s.push_str(&format!("data: {}\n\n", role_chunk()));
    s.push_str(": ping - keep-alive comment\n\n");
    s.push_str("data: {\"choices\":[{\"index\":0,\"delta\":{}}]}\n\n");
    s.push_str("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":null}}]}\n\n");
    for (i, t) in TOKENS.iter().enumerate() {
        match i % 3 {
            0 => s.push_str(&format!("data: {}\n\n", content_chunk(t))),
            1 => s.push_str(&format!("data:{}\r\n\r\n", content_chunk(t))),
            _ => s.push_str(&format!("data: {}\r\n\n", content_chunk(t))),
        }
        if i == 4 {
            s.push_str("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"}}]}\n\n");
        }
    }
    s.push_str(&format!("data: {}\n\n", finish_chunk()));
    s.push_str(&format!("data: {}\n\n", usage_chunk(321, 10)));
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

#[tokio::test]
async fn streams_the_exact_tokens_of_a_quirky_upstream_split_at_every_third_byte() {
    let upstream = FakeUpstream::start(Reply::raw(quirky_answer()).split_every(3)).await;
    let server = server_for(&upstream, |_| {}).await;

    let (status, events) = stream(&server, "whole").await;
    assert_eq!(status, 200);
    assert_eq!(
        tokens(&events),
        TOKENS,
        "one token event per content delta, in order"
    );
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.len(), TOKENS.len() + 1);
    assert_eq!(kinds.last(), Some(&"done"));
    let done = events.last().unwrap();
    assert_eq!(
        done["usage"],
        json!({ "completionTokens": 10, "promptTokens": 321 }),
        "done.usage is the upstream's usage"
    );
    assert!(!done["sources"].as_array().unwrap().is_empty());
    assert_eq!(done["quotaRemaining"], 19);
    assert_eq!(
        settled_remaining(&server, "whole").await,
        19,
        "a delivered answer is kept"
    );
}

#[tokio::test]
async fn json_mode_joins_the_same_tokens() {
    let upstream = FakeUpstream::start(Reply::raw(quirky_answer()).split_every(7)).await;
    let server = server_for(&upstream, |_| {}).await;

    let (status, doc) = json_ask(&server, "json-whole").await;
    assert_eq!(status, 200);
    assert_eq!(doc["answer"], TOKENS.concat());
    assert_eq!(
        doc["usage"],
        json!({ "completionTokens": 10, "promptTokens": 321 })
    );
    assert_eq!(settled_remaining(&server, "json-whole").await, 19);
}

#[tokio::test]
async fn without_upstream_usage_the_server_counts_the_tokens() {
    let datas = [
        role_chunk(),
        content_chunk("one"),
        content_chunk(" two"),
        finish_chunk(),
        DONE.to_owned(),
    ];
    let upstream = FakeUpstream::start(Reply::events(&datas)).await;
    let server = server_for(&upstream, |_| {}).await;
    let (_, events) = stream(&server, "no-usage").await;
    assert_eq!(tokens(&events), ["one", " two"]);
    assert_eq!(
        events.last().unwrap()["usage"],
        json!({ "completionTokens": 2 })
    );
}

/// Some older servers end the body after the finish chunk without `[DONE]`: the model said
/// it finished, so the answer is complete.
#[tokio::test]
async fn a_clean_end_after_a_finish_reason_completes_the_answer() {
    let datas = [role_chunk(), content_chunk("Short."), finish_chunk()];
    let upstream = FakeUpstream::start(Reply::events(&datas)).await;
    let server = server_for(&upstream, |_| {}).await;
    let (_, events) = stream(&server, "finish-no-done").await;
    assert_eq!(tokens(&events), ["Short."]);
    assert_eq!(events.last().unwrap()["type"], "done");
}

// ---------------------------------------------------------------------------------------
// What the upstream receives
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_upstream_receives_the_sources_the_question_and_the_key() {
    let upstream = FakeUpstream::start(answer(&["ok"])).await;
    let server = server_with_key(&upstream).await;
    let (_, events) = stream(&server, "request-shape").await;
    let done = events.last().unwrap();
    assert_eq!(done["type"], "done");

    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("accept"), Some("text/event-stream"));
    assert_eq!(r.header("accept-encoding"), Some("identity"));
    assert_eq!(r.body["model"], "test-model");
    assert!(
        r.body.get("max_tokens").is_none(),
        "a generator built by hand without max_tokens sends none"
    );
    assert_eq!(r.body["stream"], true);
    assert_eq!(r.body["stream_options"], json!({ "include_usage": true }));

    let messages = r.body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(messages[1], json!({ "role": "user", "content": QUERY }));
    let system = messages[0]["content"].as_str().unwrap();
    assert!(system.starts_with("Answer the question using only the sources below."));
    // Every source of `done.sources` is in the prompt, numbered in the same order.
    let sources = done["sources"].as_array().unwrap();
    assert!(!sources.is_empty());
    for (i, s) in sources.iter().enumerate() {
        let line = format!(
            "[{}] {} ({})\n",
            i + 1,
            s["title"].as_str().unwrap(),
            s["id"].as_str().unwrap()
        );
        assert!(system.contains(&line), "the prompt lists {line:?}");
    }
}

/// `max_tokens` is `max_answer_tokens` (2048 by default), or the generator config's own
/// value when that is smaller.
#[tokio::test]
async fn max_tokens_is_max_answer_tokens_unless_the_config_asks_for_fewer() {
    let upstream = FakeUpstream::start(answer(&["ok"])).await;
    // (max_answer_tokens if not the default, the generator config's own max_tokens)
    for (max_answer_tokens, own) in [
        (None, None),
        (Some(100), None),
        (None, Some(50)),
        (None, Some(5000)),
    ] {
        let server = server_for(&upstream, |c| {
            if let Some(n) = max_answer_tokens {
                c.max_answer_tokens = n;
            }
            if let Some(n) = own {
                c.generator = GeneratorConfig::OpenAi(
                    OpenAiConfig::new(upstream.base_url(), "test-model").with_max_tokens(n),
                );
            }
        })
        .await;
        let (_, events) = stream(&server, "max-tokens").await;
        assert_eq!(tokens(&events), ["ok"]);
    }
    let sent: Vec<Value> = upstream
        .requests()
        .iter()
        .map(|r| r.body["max_tokens"].clone())
        .collect();
    assert_eq!(sent, [json!(2048), json!(100), json!(50), json!(2048)]);
}

#[tokio::test]
async fn no_key_configured_means_no_authorization_header() {
    let upstream = FakeUpstream::start(answer(&["ok"])).await;
    let server = server_for(&upstream, |_| {}).await;
    stream(&server, "no-key").await;
    assert_eq!(upstream.requests()[0].header("authorization"), None);
}

#[tokio::test]
async fn a_custom_template_shapes_the_messages() {
    let upstream = FakeUpstream::start(answer(&["Arr"])).await;
    let generator = OpenAiGenerator::new(OpenAiConfig::new(upstream.base_url(), "pirate"))
        .unwrap()
        .with_template(|p: &askstream::pipeline::Prompt| {
            vec![
                ChatMessage::system(format!("Talk like a pirate. {} sources.", p.passages.len())),
                ChatMessage::assistant("Aye."),
                ChatMessage::user(format!("Q: {}", p.query)),
            ]
        });
    let service = AskService::builder(config_for(&upstream)).generator(Arc::new(generator));
    let server = TestServer::start_with(service).await;
    let (_, events) = stream(&server, "template").await;
    assert_eq!(tokens(&events), ["Arr"]);
    let body = &upstream.requests()[0].body;
    assert_eq!(body["model"], "pirate");
    let sources = events.last().unwrap()["sources"].as_array().unwrap().len();
    assert_eq!(
        body["messages"],
        json!([
            { "role": "system", "content": format!("Talk like a pirate. {sources} sources.") },
            { "role": "assistant", "content": "Aye." },
            { "role": "user", "content": format!("Q: {QUERY}") },
        ])
    );
}

// ---------------------------------------------------------------------------------------
// Cancellation: the client leaves, the upstream connection closes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn leaving_before_the_upstream_answers_closes_the_upstream_connection() {
    let upstream = FakeUpstream::start(Reply::never()).await;
    let server = server_for(&upstream, |_| {}).await;

    let c = start_stream(&server, "leave-head").await;
    upstream.wait("the request", |c| c.requests == 1).await;
    drop(c);
    upstream
        .wait("its connection closing", |c| c.closed == 1)
        .await;
    assert_eq!(
        settled_remaining(&server, "leave-head").await,
        20,
        "refunded"
    );
}

#[tokio::test]
async fn leaving_before_the_first_token_closes_the_upstream_connection() {
    // The head and the role chunk are sent; the model is still "thinking".
    let upstream = FakeUpstream::start(Reply::events(&[role_chunk()]).then_hang()).await;
    let server = server_for(&upstream, |_| {}).await;

    let c = start_stream(&server, "leave-ttft").await;
    upstream.wait("the reply hanging", |c| c.hanging == 1).await;
    drop(c);
    upstream
        .wait("its connection closing", |c| c.closed == 1)
        .await;
    assert_eq!(settled_remaining(&server, "leave-ttft").await, 20);
}

#[tokio::test]
async fn leaving_after_the_first_token_closes_the_upstream_connection() {
    let reply = Reply::events(&[role_chunk(), content_chunk("Hello")]).then_hang();
    let upstream = FakeUpstream::start(reply).await;
    let server = server_for(&upstream, |_| {}).await;

    let mut c = start_stream(&server, "leave-mid").await;
    let events = read_until(&mut c, "token").await;
    assert_eq!(tokens(&events), ["Hello"]);
    drop(c);
    upstream
        .wait("its connection closing", |c| c.closed == 1)
        .await;
    assert_eq!(settled_remaining(&server, "leave-mid").await, 20);
}

#[tokio::test]
async fn a_json_client_leaving_closes_the_upstream_connection() {
    let reply = Reply::events(&[role_chunk(), content_chunk("Hello")]).then_hang();
    let upstream = FakeUpstream::start(reply).await;
    let server = server_for(&upstream, |_| {}).await;

    let mut c = RawConn::connect(server.addr).await;
    c.post(JSON_MODE, &ask_body(QUERY), &bearer("leave-json"))
        .await;
    upstream.wait("the reply hanging", |c| c.hanging == 1).await;
    drop(c);
    upstream
        .wait("its connection closing", |c| c.closed == 1)
        .await;
    assert_eq!(settled_remaining(&server, "leave-json").await, 20);
}

/// On HTTP/2 the client resets one stream and keeps the connection: the upstream request
/// of that stream is cancelled all the same.
#[tokio::test]
async fn an_h2_stream_reset_closes_the_upstream_connection() {
    let reply = Reply::events(&[role_chunk(), content_chunk("Hello")]).then_hang();
    let upstream = FakeUpstream::start(reply).await;
    let server = server_for(&upstream, |_| {}).await;

    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}{STREAM}", server.addr))
        .header("content-type", "application/json")
        .header("authorization", "Bearer h2-reset")
        .body(Full::new(Bytes::from(ask_body(QUERY))))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("\"type\":\"token\"") {
        let frame = body.frame().await.expect("more frames").unwrap();
        seen.extend_from_slice(frame.data_ref().unwrap());
    }
    drop(body); // RST_STREAM(CANCEL); the connection stays open
    upstream
        .wait("its connection closing", |c| c.closed == 1)
        .await;

    // The h2 connection is still usable.
    let health = http::Request::get(format!("http://{}/healthz", server.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(sender.send_request(health).await.unwrap().status(), 200);
    assert_eq!(settled_remaining(&server, "h2-reset").await, 20);
}

#[tokio::test]
async fn shutdown_closes_the_upstream_connection() {
    let reply = Reply::events(&[role_chunk(), content_chunk("Hello")]).then_hang();
    let upstream = FakeUpstream::start(reply).await;
    let mut server = server_for(&upstream, |c| c.shutdown_grace = Duration::ZERO).await;

    let mut c = start_stream(&server, "shutdown").await;
    read_until(&mut c, "token").await;
    let serving = server.signal_shutdown();
    let events = read_until(&mut c, "error").await;
    assert_eq!(events.last().unwrap()["code"], "SHUTTING_DOWN");
    upstream
        .wait("its connection closing", |c| c.closed == 1)
        .await;
    serving.await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Failures: each an error with its code, and a refund, in both modes
// ---------------------------------------------------------------------------------------

/// Runs one streaming and one JSON ask against `reply` and checks that both fail with
/// `code`, a message containing `fragment` and never the key, and are refunded. Returns
/// the streaming ask's events.
async fn assert_fails(reply: Reply, code: &str, fragment: &str) -> Vec<Value> {
    let upstream = FakeUpstream::start(reply).await;
    assert_fails_on(&upstream, code, fragment).await
}

/// [`assert_fails`] against a running upstream, for tests that look at it afterwards.
async fn assert_fails_on(upstream: &FakeUpstream, code: &str, fragment: &str) -> Vec<Value> {
    let server = server_with_key(upstream).await;
    let status = if code == "UPSTREAM_TIMEOUT" { 504 } else { 502 };

    let (head_status, events) = stream(&server, "fail-stream").await;
    assert_eq!(head_status, 200, "the stream had started");
    let err = events.last().unwrap();
    assert_eq!(err["type"], "error", "{events:?}");
    assert_eq!(err["code"], code);
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains(fragment),
        "{message:?} mentions {fragment:?}"
    );
    assert!(!message.contains(KEY), "the key leaked: {message}");
    assert_eq!(
        settled_remaining(&server, "fail-stream").await,
        20,
        "refunded"
    );

    let (json_status, doc) = json_ask(&server, "fail-json").await;
    assert_eq!(json_status, status);
    assert_eq!(doc["type"], "error");
    assert_eq!(doc["code"], code);
    assert_eq!(doc["message"].as_str().unwrap(), message);
    assert_eq!(
        settled_remaining(&server, "fail-json").await,
        20,
        "refunded"
    );
    events
}

#[tokio::test]
async fn an_error_status_gives_the_status_and_the_upstream_message_only() {
    let body = json!({
        "error": { "message": "the model is overloaded", "type": "server_error" },
        "debug": "x".repeat(10_000),
    });
    let events = assert_fails(
        Reply::status(503, "application/json", body.to_string()),
        "UPSTREAM_ERROR",
        "the upstream answered 503 Service Unavailable: the model is overloaded",
    )
    .await;
    let message = events.last().unwrap()["message"].as_str().unwrap();
    assert!(!message.contains("xxxx"), "no raw body: {message}");
    assert_eq!(events.len(), 1, "no token before the error");
}

#[tokio::test]
async fn an_html_error_page_is_not_echoed() {
    let page = format!("<html><body>{}</body></html>", "Bad gateway. ".repeat(500));
    let events = assert_fails(
        Reply::status(502, "text/html", page),
        "UPSTREAM_ERROR",
        "the upstream answered 502 Bad Gateway",
    )
    .await;
    let message = events.last().unwrap()["message"].as_str().unwrap();
    assert!(!message.contains("<html>"), "{message}");
}

#[tokio::test]
async fn a_rejected_key_echoed_by_the_upstream_is_redacted() {
    let body = json!({ "error": { "message": format!("Incorrect API key provided: {KEY}.") } });
    assert_fails(
        Reply::status(401, "application/json", body.to_string()),
        "UPSTREAM_ERROR",
        "401 Unauthorized: Incorrect API key provided: [redacted].",
    )
    .await;
}

#[tokio::test]
async fn a_refused_connection_is_upstream_error() {
    // A port that was just free: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let mut c = fast_config();
    c.generator = GeneratorConfig::OpenAi(OpenAiConfig::new(format!("http://{addr}/v1"), "m"));
    let server = TestServer::start(c).await;

    let (_, events) = stream(&server, "refused").await;
    let err = events.last().unwrap();
    assert_eq!(err["code"], "UPSTREAM_ERROR");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .starts_with("cannot connect to the upstream"),
        "{err}"
    );
    assert_eq!(settled_remaining(&server, "refused").await, 20);
    let (status, doc) = json_ask(&server, "refused-json").await;
    assert_eq!((status, &doc["code"]), (502, &json!("UPSTREAM_ERROR")));
    assert_eq!(settled_remaining(&server, "refused-json").await, 20);
}

#[tokio::test]
async fn a_connection_cut_mid_answer_is_upstream_error() {
    let reply = Reply::events(&[role_chunk(), content_chunk("Half")]).then_cut();
    let events = assert_fails(reply, "UPSTREAM_ERROR", "cut mid-answer").await;
    assert_eq!(
        tokens(&events),
        ["Half"],
        "what came before the cut was streamed"
    );
}

#[tokio::test]
async fn a_malformed_chunk_is_upstream_error() {
    let reply = Reply::events(&[
        role_chunk(),
        content_chunk("Half"),
        "{\"choices\":[{\"delta\":".to_owned(),
    ])
    .then_hang();
    let events = assert_fails(reply, "UPSTREAM_ERROR", "malformed chunk from upstream").await;
    assert_eq!(tokens(&events), ["Half"]);
}

#[tokio::test]
async fn an_error_object_in_the_stream_is_upstream_error() {
    let reply = Reply::events(&[
        role_chunk(),
        content_chunk("Half"),
        json!({ "error": { "message": "CUDA out of memory", "type": "server_error", "code": 500 } })
            .to_string(),
    ])
    .then_hang();
    let events = assert_fails(
        reply,
        "UPSTREAM_ERROR",
        "upstream error: CUDA out of memory",
    )
    .await;
    assert_eq!(tokens(&events), ["Half"]);
}

#[tokio::test]
async fn a_body_ending_before_done_is_upstream_error() {
    let reply = Reply::events(&[role_chunk(), content_chunk("Half")]);
    assert_fails(reply, "UPSTREAM_ERROR", "ended the stream before [DONE]").await;
}

#[tokio::test]
async fn a_json_answer_instead_of_a_stream_is_upstream_error() {
    let body =
        json!({ "choices": [{ "index": 0, "message": { "role": "assistant", "content": "hi" } }] });
    assert_fails(
        Reply::status(200, "application/json", body.to_string()),
        "UPSTREAM_ERROR",
        "instead of an event stream",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Bounded upstreams (contract §1.3): what a broken or hostile upstream can cost one ask
// ---------------------------------------------------------------------------------------

/// A body that never ends: the role chunk, then the same content delta forever.
fn endless_tokens() -> Reply {
    Reply::events(&[role_chunk()]).then_repeat(format!("data: {}\n\n", content_chunk("w")))
}

/// An upstream that would stream forever is stopped after `max_answer_tokens` token
/// events: the answer is complete (`done`, charged), and the upstream connection closes.
/// (The upstream never ends its body, so only askstream can have closed it.)
#[tokio::test]
async fn an_endless_answer_ends_at_max_answer_tokens_and_closes_the_upstream_connection() {
    let upstream = FakeUpstream::start(endless_tokens()).await;
    let server = server_for(&upstream, |c| c.max_answer_tokens = 5).await;

    let (status, events) = stream(&server, "endless").await;
    assert_eq!(status, 200);
    assert_eq!(
        tokens(&events),
        ["w"; 5],
        "exactly max_answer_tokens tokens"
    );
    assert_eq!(events.len(), 6, "then done, and nothing else: {events:?}");
    let done = events.last().unwrap();
    assert_eq!(done["type"], "done");
    assert_eq!(done["usage"]["completionTokens"], 5);
    upstream
        .wait("its connection closing", |c| c.closed == 1)
        .await;
    assert_eq!(
        settled_remaining(&server, "endless").await,
        19,
        "a complete answer is charged"
    );
    assert_eq!(upstream.requests()[0].body["max_tokens"], 5);

    let (status, doc) = json_ask(&server, "endless-json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["answer"], "wwwww");
    upstream
        .wait("the second connection closing", |c| c.closed == 2)
        .await;
    assert_eq!(settled_remaining(&server, "endless-json").await, 19);
}

/// 64 KiB of `data:` lines, none of them blank: repeated forever, one event that never
/// ends.
fn data_lines_block() -> String {
    format!("data: {}\n", "x".repeat(1017)).repeat(64)
}

#[tokio::test]
async fn an_endless_multi_line_data_event_is_upstream_error() {
    let reply =
        Reply::events(&[role_chunk(), content_chunk("Half")]).then_repeat(data_lines_block());
    let upstream = FakeUpstream::start(reply).await;
    let events = assert_fails_on(
        &upstream,
        "UPSTREAM_ERROR",
        "the upstream sent an event larger than 1 MiB",
    )
    .await;
    assert_eq!(tokens(&events), ["Half"], "what came before was streamed");
    assert_eq!(
        events.last().unwrap()["message"],
        "the upstream sent an event larger than 1 MiB"
    );
    // Both asks (stream and JSON) gave up their endless bodies.
    upstream
        .wait("both connections closing", |c| c.closed == 2)
        .await;
}

/// One `data:` line that never ends (the decoder's line limit, as before, but now with
/// the same message as any other event over 1 MiB).
#[tokio::test]
async fn an_endless_line_is_upstream_error() {
    let mut reply = Reply::events(&[role_chunk(), content_chunk("Half")]);
    reply.parts.push(Part::Bytes(Bytes::from_static(b"data: ")));
    let reply = reply.then_repeat("y".repeat(64 * 1024));
    let events = assert_fails(
        reply,
        "UPSTREAM_ERROR",
        "the upstream sent an event larger than 1 MiB",
    )
    .await;
    assert_eq!(tokens(&events), ["Half"]);
}

#[tokio::test]
async fn a_plain_text_2xx_is_upstream_error_at_once() {
    // The body never ends: askstream must judge the response by its head alone.
    let reply = Reply::status(200, "text/plain; charset=utf-8", "Hello from a proxy").then_hang();
    let upstream = FakeUpstream::start(reply).await;
    let events = assert_fails_on(
        &upstream,
        "UPSTREAM_ERROR",
        "the upstream answered text/plain instead of an event stream",
    )
    .await;
    assert_eq!(events.len(), 1, "no token before the error");
    assert_eq!(
        events[0]["message"], "the upstream answered text/plain instead of an event stream",
        "the body is not echoed"
    );
    upstream
        .wait("both connections closing", |c| c.closed == 2)
        .await;
}

#[tokio::test]
async fn a_2xx_without_a_content_type_is_upstream_error() {
    let mut reply = answer(&["Hi"]).then_hang();
    reply.content_type.clear();
    let events = assert_fails(
        reply,
        "UPSTREAM_ERROR",
        "the upstream answered without a content-type instead of an event stream",
    )
    .await;
    assert_eq!(events.len(), 1, "no token: the body was not read");
}

/// A compressed stream is refused from its head: were its (here uncompressed) body read,
/// "Hi" would be streamed.
#[tokio::test]
async fn a_gzip_event_stream_is_upstream_error_at_once() {
    let reply = answer(&["Hi"])
        .with_header("content-encoding", "gzip")
        .then_hang();
    let upstream = FakeUpstream::start(reply).await;
    let events = assert_fails_on(
        &upstream,
        "UPSTREAM_ERROR",
        "the upstream sent a compressed event stream (content-encoding: gzip); askstream \
         reads identity only",
    )
    .await;
    assert_eq!(events.len(), 1, "no token: the body was not read");
    upstream
        .wait("both connections closing", |c| c.closed == 2)
        .await;
}

#[tokio::test]
async fn an_identity_content_encoding_is_read() {
    let reply = answer(&["Plain", " bytes"]).with_header("content-encoding", "identity");
    let upstream = FakeUpstream::start(reply).await;
    let server = server_for(&upstream, |_| {}).await;
    let (_, events) = stream(&server, "identity").await;
    assert_eq!(tokens(&events), ["Plain", " bytes"]);
    assert_eq!(events.last().unwrap()["type"], "done");
}

// ---------------------------------------------------------------------------------------
// Timeouts (paused time: the deadlines pass at once, deterministically)
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn no_first_token_in_time_is_upstream_timeout_and_cancels_the_request() {
    let upstream = FakeUpstream::start(Reply::never()).await;
    let server = server_for(&upstream, |c| c.ttft_timeout = Duration::from_millis(5_000)).await;

    let (_, events) = stream(&server, "ttft").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["code"], "UPSTREAM_TIMEOUT");
    assert_eq!(events[0]["message"], "no first token within 5000 ms");
    upstream
        .wait("its connection closing", |c| c.closed == 1)
        .await;
    assert_eq!(settled_remaining(&server, "ttft").await, 20);

    let (status, doc) = json_ask(&server, "ttft-json").await;
    assert_eq!((status, &doc["code"]), (504, &json!("UPSTREAM_TIMEOUT")));
    assert_eq!(settled_remaining(&server, "ttft-json").await, 20);
}

#[tokio::test(start_paused = true)]
async fn a_head_and_a_role_chunk_are_not_a_first_token() {
    let upstream = FakeUpstream::start(Reply::events(&[role_chunk()]).then_hang()).await;
    let server = server_for(&upstream, |c| c.ttft_timeout = Duration::from_millis(5_000)).await;
    let (_, events) = stream(&server, "ttft-role").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["code"], "UPSTREAM_TIMEOUT");
    assert_eq!(events[0]["message"], "no first token within 5000 ms");
    upstream
        .wait("its connection closing", |c| c.closed == 1)
        .await;
    assert_eq!(settled_remaining(&server, "ttft-role").await, 20);
}

#[tokio::test(start_paused = true)]
async fn a_silent_gap_is_upstream_timeout_and_cancels_the_request() {
    let reply = Reply::events(&[role_chunk(), content_chunk("Hello")]).then_hang();
    let upstream = FakeUpstream::start(reply).await;
    let server = server_for(&upstream, |c| {
        c.ttft_timeout = Duration::from_millis(60_000);
        c.idle_timeout = Duration::from_millis(5_000);
    })
    .await;

    let (_, events) = stream(&server, "idle").await;
    assert_eq!(tokens(&events), ["Hello"]);
    let err = events.last().unwrap();
    assert_eq!(err["code"], "UPSTREAM_TIMEOUT");
    assert_eq!(err["message"], "the generator was silent for 5000 ms");
    upstream
        .wait("its connection closing", |c| c.closed == 1)
        .await;
    assert_eq!(settled_remaining(&server, "idle").await, 20);
}

// ---------------------------------------------------------------------------------------
// Connection reuse
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn sequential_asks_reuse_one_upstream_connection() {
    let upstream = FakeUpstream::start(answer(&["Hello", " again"])).await;
    let server = server_for(&upstream, |_| {}).await;

    for user in ["reuse-1", "reuse-2"] {
        let (_, events) = stream(&server, user).await;
        assert_eq!(tokens(&events), ["Hello", " again"]);
    }
    let (status, doc) = json_ask(&server, "reuse-3").await;
    assert_eq!((status, doc["answer"].as_str()), (200, Some("Hello again")));

    let c = upstream.counters();
    assert_eq!(c.requests, 3);
    assert_eq!(c.accepted, 1, "one pooled connection served every ask");
    assert_eq!(c.closed, 0);
}

#[tokio::test]
async fn a_cancelled_ask_does_not_poison_the_pool() {
    let hang = Reply::events(&[role_chunk(), content_chunk("Hello")]).then_hang();
    let upstream = FakeUpstream::start_script(vec![hang, answer(&["Fine"])]).await;
    let server = server_for(&upstream, |_| {}).await;

    let mut c = start_stream(&server, "poison-1").await;
    read_until(&mut c, "token").await;
    drop(c);
    upstream
        .wait("the first connection closing", |c| c.closed == 1)
        .await;
    let (_, events) = stream(&server, "poison-2").await;
    assert_eq!(tokens(&events), ["Fine"]);
    assert_eq!(events.last().unwrap()["type"], "done");
    assert_eq!(upstream.counters().accepted, 2);
}

/// The body's end may come a moment after `[DONE]`: the answer waits for it, so the
/// connection goes back to the pool instead of being closed.
#[tokio::test(start_paused = true)]
async fn a_body_end_arriving_after_done_keeps_the_connection() {
    let reply = answer(&["Hi"]).then_pause(Duration::from_millis(100));
    let upstream = FakeUpstream::start(reply).await;
    let server = server_for(&upstream, |_| {}).await;
    for user in ["late-end-1", "late-end-2"] {
        let (_, events) = stream(&server, user).await;
        assert_eq!(
            events.last().unwrap()["type"],
            "done",
            "{user}: {events:?} {:?}",
            upstream.counters()
        );
    }
    assert_eq!(upstream.counters().accepted, 1);
}

/// An upstream that never ends its body after `[DONE]` still completes the answer; only
/// its connection is given up.
#[tokio::test(start_paused = true)]
async fn a_body_that_never_ends_after_done_still_completes_the_answer() {
    let upstream = FakeUpstream::start(answer(&["Hi"]).then_hang()).await;
    let server = server_for(&upstream, |_| {}).await;
    let (_, events) = stream(&server, "no-end").await;
    assert_eq!(tokens(&events), ["Hi"]);
    assert_eq!(events.last().unwrap()["type"], "done");
    upstream
        .wait("the connection closing", |c| c.closed == 1)
        .await;
    assert_eq!(
        settled_remaining(&server, "no-end").await,
        19,
        "a delivered answer is kept"
    );
}

// ---------------------------------------------------------------------------------------
// Startup errors
// ---------------------------------------------------------------------------------------

fn startup_error(config: ServiceConfig) -> StartupError {
    AskService::builder(config)
        .build()
        .expect_err("the service must not build")
}

/// (A missing URL, model or key variable is the binary's to refuse, with the flag's name:
/// see `src/cli.rs` and the binary test below.)
#[test]
fn an_https_upstream_is_a_startup_error() {
    let mut c = fast_config();
    c.generator = GeneratorConfig::OpenAi(OpenAiConfig::new(
        "https://api.openai.com/v1",
        "gpt-4o-mini",
    ));
    let err = startup_error(c);
    assert!(matches!(
        err,
        StartupError::Upstream(ConfigError::Https { .. })
    ));
    assert!(err.to_string().contains("TLS-terminating proxy"), "{err}");
}

// ---------------------------------------------------------------------------------------
// The binary, flags and environment as a user runs it
// ---------------------------------------------------------------------------------------

/// The `askstream` binary as a child process, killed when dropped.
struct Child {
    child: std::process::Child,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_askstream(args: &[&str], env: &[(&str, &str)]) -> Child {
    use std::io::BufRead;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_askstream"));
    cmd.args(args)
        .env("RUST_LOG", "trace")
        .env_remove("ASKSTREAM_UPSTREAM_URL")
        .env_remove("ASKSTREAM_UPSTREAM_MODEL")
        .env_remove("ASKSTREAM_UPSTREAM_API_KEY_ENV")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the binary starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Child { child, stderr: rx }
}

impl Child {
    /// The next stderr line, or `None` when stderr closed.
    fn line(&self) -> Option<String> {
        self.stderr
            .recv_timeout(std::time::Duration::from_secs(20))
            .ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_sends_the_key_from_the_named_variable_and_never_logs_it() {
    let upstream = FakeUpstream::start(answer(&["From", " the", " binary"])).await;
    let base = upstream.base_url();
    let child = spawn_askstream(
        &[
            "--listen",
            "127.0.0.1:0",
            "--generator",
            "openai",
            "--upstream-url",
            &base,
            "--upstream-model",
            "test-model",
            "--upstream-api-key-env",
            "ASKSTREAM_TEST_UPSTREAM_KEY",
        ],
        &[("ASKSTREAM_TEST_UPSTREAM_KEY", KEY)],
    );
    let mut log = Vec::new();
    let addr: std::net::SocketAddr = loop {
        let line = tokio::task::block_in_place(|| child.line()).expect("the server logs");
        log.push(line.clone());
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };

    let (head, body) = ask(addr, STREAM, &ask_body(QUERY), &bearer("binary")).await;
    assert_eq!(head.status, 200);
    let events = parse_sse(&body).0;
    assert_eq!(tokens(&events), ["From", " the", " binary"]);
    assert_eq!(
        upstream.requests()[0].header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );

    // Everything logged (at trace level) up to and including the ask's own line, written
    // when it settles, is free of the key.
    loop {
        let line = tokio::task::block_in_place(|| child.line()).expect("the server logs the ask");
        let settled = line.contains("ask finished");
        log.push(line);
        if settled {
            break;
        }
    }
    while let Ok(line) = child.stderr.try_recv() {
        log.push(line);
    }
    assert!(log.len() > 1);
    assert!(
        log.iter().all(|l| !l.contains(KEY)),
        "the key was logged: {log:?}"
    );
}

#[test]
fn the_binary_refuses_to_start_without_the_key_variable() {
    let mut child = spawn_askstream(
        &[
            "--listen",
            "127.0.0.1:0",
            "--generator",
            "openai",
            "--upstream-url",
            "http://127.0.0.1:9/v1",
            "--upstream-model",
            "m",
            "--upstream-api-key-env",
            "ASKSTREAM_TEST_SURELY_UNSET_KEY",
        ],
        &[],
    );
    let status = child.child.wait().unwrap();
    assert!(!status.success());
    let mut out = Vec::new();
    while let Some(line) = child.line() {
        out.push(line);
    }
    let out = out.join("\n");
    assert!(
        out.contains("ASKSTREAM_TEST_SURELY_UNSET_KEY") && out.contains("--upstream-api-key-env"),
        "{out}"
    );
}
