//! CORS for named origins (contract §1.4), against the real server on a real socket: a
//! named origin's preflight is answered and every response it gets is marked (a stream,
//! a JSON answer, errors, a 429 with its `retry-after`); another origin, and any origin
//! when none is named, gets no CORS header.

mod support;

use support::{Head, TestServer, ask_body, bearer, config_with_limit, raw};

const APP: &str = "https://app.example.com";
const OTHER: &str = "https://evil.example.net";
const CORS_HEADERS: [&str; 6] = [
    "access-control-allow-origin",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-max-age",
    "access-control-expose-headers",
    "access-control-allow-credentials",
];

async fn server(limit: u32, origins: &[&str]) -> TestServer {
    let mut c = config_with_limit(limit);
    c.cors_origins = origins.iter().map(|o| o.to_string()).collect();
    TestServer::start(c).await
}

fn post(path: &str, body: &str, origin: &str, user: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: api\r\norigin: {origin}\r\ncontent-type: application/json\r\n{}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        bearer(user),
        body.len()
    )
}

fn preflight(origin: &str) -> String {
    format!(
        "OPTIONS /api/v1/ai/ask?stream=true HTTP/1.1\r\nhost: api\r\norigin: {origin}\r\naccess-control-request-method: POST\r\naccess-control-request-headers: authorization, content-type\r\nconnection: close\r\n\r\n"
    )
}

fn assert_marked(head: &Head, what: &str) {
    assert_eq!(
        head.header("access-control-allow-origin"),
        Some(APP),
        "{what}"
    );
    assert_eq!(
        head.header("access-control-expose-headers"),
        Some("x-query-id, retry-after"),
        "{what}"
    );
    assert!(
        head.headers
            .iter()
            .any(|(k, v)| k == "vary" && v.to_ascii_lowercase().contains("origin")),
        "{what}: vary: origin"
    );
    assert_eq!(
        head.header("access-control-allow-credentials"),
        None,
        "{what}"
    );
}

fn assert_unmarked(head: &Head, what: &str) {
    for name in CORS_HEADERS {
        assert_eq!(head.header(name), None, "{what}: {name}");
    }
}

#[tokio::test]
async fn a_named_origins_preflight_is_answered() {
    let server = server(5, &[APP, "http://localhost:5173"]).await;
    let (head, body) = raw(&server, preflight(APP)).await;
    assert_eq!(head.status, 204);
    assert!(body.is_empty());
    assert_eq!(head.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        head.header("access-control-allow-methods"),
        Some("GET, POST")
    );
    assert_eq!(
        head.header("access-control-allow-headers"),
        Some("authorization, content-type")
    );
    assert_eq!(head.header("access-control-max-age"), Some("600"));

    // Another named origin gets its own name back, never the list.
    let (head, _) = raw(&server, preflight("http://localhost:5173")).await;
    assert_eq!(head.status, 204);
    assert_eq!(
        head.header("access-control-allow-origin"),
        Some("http://localhost:5173")
    );
}

#[tokio::test]
async fn every_response_to_a_named_origin_is_marked() {
    let server = server(1, &[APP]).await;
    let user = "cors-marked";
    let stream = post(
        "/api/v1/ai/ask?stream=true",
        &ask_body("How do quota refunds work?"),
        APP,
        user,
    );
    let (head, body) = raw(&server, &stream).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert!(head.header("x-query-id").is_some());
    assert_marked(&head, "stream");
    assert!(String::from_utf8_lossy(&body).contains("\"done\""));

    // The quota is spent: 429 with retry-after, marked so the page can read both.
    let json = post(
        "/api/v1/ai/ask",
        &ask_body("How do quota refunds work?"),
        APP,
        user,
    );
    let (head, _) = raw(&server, &json).await;
    assert_eq!(head.status, 429);
    assert!(head.header("retry-after").is_some());
    assert_marked(&head, "429");

    // A refused body, an unknown route, the quota route.
    let (head, _) = raw(&server, post("/api/v1/ai/ask", "{", APP, user)).await;
    assert_eq!(head.status, 400);
    assert_marked(&head, "400");
    let (head, _) = raw(
        &server,
        format!("GET /nope HTTP/1.1\r\nhost: api\r\norigin: {APP}\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(head.status, 404);
    assert_marked(&head, "404");
    let (head, _) = raw(
        &server,
        format!(
            "GET /api/v1/quota HTTP/1.1\r\nhost: api\r\norigin: {APP}\r\n{}connection: close\r\n\r\n",
            bearer(user)
        ),
    )
    .await;
    assert_eq!(head.status, 200);
    assert_marked(&head, "quota");
}

#[tokio::test]
async fn another_origin_and_an_unconfigured_server_send_no_cors_header() {
    let server = server(5, &[APP]).await;
    let json = post(
        "/api/v1/ai/ask",
        &ask_body("How do quota refunds work?"),
        OTHER,
        "cors-other",
    );
    let (head, _) = raw(&server, &json).await;
    assert_eq!(
        head.status, 200,
        "the server answers; the browser withholds it"
    );
    assert_unmarked(&head, "another origin's ask");
    let (head, _) = raw(&server, preflight(OTHER)).await;
    assert_ne!(head.status, 204);
    assert_unmarked(&head, "another origin's preflight");
    // An origin that differs only by a port or a trailing slash is another origin.
    let (head, _) = raw(&server, preflight("https://app.example.com:443")).await;
    assert_unmarked(&head, "same host, explicit port");
    let (head, _) = raw(&server, preflight("https://app.example.com/")).await;
    assert_unmarked(&head, "trailing slash");

    let plain = server_without_cors().await;
    let (head, _) = raw(&plain, preflight(APP)).await;
    assert_eq!(head.status, 405, "OPTIONS is not a method the API serves");
    assert_unmarked(&head, "no --cors-origin");
    let (head, _) = raw(
        &plain,
        post("/api/v1/ai/ask", &ask_body("hi"), APP, "cors-none"),
    )
    .await;
    assert_eq!(head.status, 200);
    assert_unmarked(&head, "no --cors-origin, an ask");
}

async fn server_without_cors() -> TestServer {
    server(5, &[]).await
}

#[test]
fn a_malformed_origin_is_refused_at_startup() {
    for bad in [
        "*",
        "https://app.example.com/",
        "app.example.com",
        "https://App.example.com",
    ] {
        let mut c = config_with_limit(5);
        c.cors_origins = vec![bad.to_string()];
        let err = askstream::AskService::builder(c)
            .build()
            .expect_err("a malformed origin is a startup error");
        let text = err.to_string();
        assert!(text.contains("cors_origins"), "{bad}: {text}");
        assert!(text.contains("exact origin"), "{bad}: {text}");
    }
}
