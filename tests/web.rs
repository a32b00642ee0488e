//! The demo page's routes against the real server: `/`, `/app.js`, `/client.js` and
//! `/style.css` are served with the right types and headers, the page's CSP allows no
//! inline code, the page loads only same-origin files, and other methods get 405.
//! (The page's behaviour in a real browser is `tests/browser/page.test.mjs`.)

mod support;

use askstream::auth::Auth;

// The demo's URLs, part of what the page and its users rely on.
const PAGE_PATH: &str = "/";
const APP_PATH: &str = "/app.js";
const CLIENT_PATH: &str = "/client.js";
const STYLE_PATH: &str = "/style.css";
use askstream::AskService;
use support::*;

async fn get(server: &TestServer, path: &str) -> (Head, String) {
    let (head, body) = raw(server, &format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n")).await;
    assert_eq!(head.status, 200, "GET {path}");
    (head, String::from_utf8(body).expect("UTF-8"))
}

/// The headers every file of the page carries.
fn check_common_headers(head: &Head, path: &str, content_type: &str) {
    assert_eq!(head.header("content-type"), Some(content_type), "{path}");
    assert_eq!(
        head.header("x-content-type-options"),
        Some("nosniff"),
        "{path}"
    );
    assert_eq!(head.header("cache-control"), Some("no-cache"), "{path}");
}

#[tokio::test]
async fn the_page_is_html_with_a_strict_content_security_policy() {
    let server = TestServer::start(fast_config()).await;
    let (head, body) = get(&server, PAGE_PATH).await;
    check_common_headers(&head, PAGE_PATH, "text/html; charset=utf-8");
    let csp = head
        .header("content-security-policy")
        .expect("the page has a CSP");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "style-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(
            csp.split(';').any(|d| d.trim() == directive),
            "{directive} in {csp}"
        );
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
    assert!(body.starts_with("<!doctype html>"));
    assert!(body.contains(r#"<script type="module" src="/app.js"></script>"#));
}

#[tokio::test]
async fn the_page_loads_only_same_origin_files_and_has_no_inline_code() {
    let server = TestServer::start(fast_config()).await;
    let (_, page) = get(&server, PAGE_PATH).await;
    let lower = page.to_ascii_lowercase();

    // Every src/href is a path on this server: no CDN, no protocol-relative URL.
    let mut urls = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for (at, _) in lower.match_indices(attr) {
            let rest = &page[at + attr.len()..];
            urls.push(&rest[..rest.find('"').expect("attribute closed")]);
        }
    }
    assert!(
        urls.contains(&APP_PATH) && urls.contains(&STYLE_PATH),
        "{urls:?}"
    );
    for url in &urls {
        assert!(
            url.starts_with('/') && !url.starts_with("//"),
            "not same-origin: {url}"
        );
    }

    // Each script has a `src` (no inline script), and nothing needs 'unsafe-inline'.
    let scripts = lower.matches("<script").count();
    assert_eq!(scripts, 1, "one module script");
    assert_eq!(
        lower.matches("<script type=\"module\" src=").count(),
        scripts
    );
    assert!(!lower.contains("<style"), "inline style element");
    assert!(!lower.contains(" style="), "inline style attribute");
    for (at, _) in lower.match_indices(" on") {
        let name: String = lower[at + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect();
        let next = lower[at + 1 + name.len()..].chars().next();
        assert!(
            !(name.len() > 2 && next == Some('=')),
            "inline event handler {name}"
        );
    }
}

#[tokio::test]
async fn scripts_and_styles_are_served_with_their_types() {
    let server = TestServer::start(fast_config()).await;
    let cases = [
        (
            APP_PATH,
            "text/javascript; charset=utf-8",
            include_str!("../src/web/app.js"),
        ),
        (
            CLIENT_PATH,
            "text/javascript; charset=utf-8",
            include_str!("../src/web/client.js"),
        ),
        (
            STYLE_PATH,
            "text/css; charset=utf-8",
            include_str!("../src/web/style.css"),
        ),
    ];
    for (path, content_type, file) in cases {
        let (head, body) = get(&server, path).await;
        check_common_headers(&head, path, content_type);
        assert_eq!(body, file, "{path} is the embedded file");
        assert_eq!(head.header("content-security-policy"), None, "{path}");
    }
    // The page's script builds on the published client, not a copy of it.
    let app = include_str!("../src/web/app.js");
    assert!(app.contains("from './client.js'"));
    let client = include_str!("../src/web/client.js");
    for export in [
        "export async function ask(",
        "export async function getQuota(",
        "export class EventStreamParser",
    ] {
        assert!(client.contains(export), "{export}");
    }
}

#[tokio::test]
async fn head_sends_the_headers_without_the_body() {
    let server = TestServer::start(fast_config()).await;
    for path in [PAGE_PATH, APP_PATH, CLIENT_PATH, STYLE_PATH] {
        let (get_head, body) = get(&server, path).await;
        let mut c = RawConn::connect(server.addr).await;
        c.send(format!("HEAD {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes())
            .await;
        let head = c.read_head().await;
        assert_eq!(head.status, 200, "HEAD {path}");
        assert_eq!(
            head.header("content-type"),
            get_head.header("content-type"),
            "{path}"
        );
        assert_eq!(
            head.header("content-length"),
            Some(body.len().to_string().as_str()),
            "{path}"
        );
        assert_eq!(
            head.header("content-security-policy"),
            get_head.header("content-security-policy"),
            "{path}"
        );
        assert!(c.read_to_eof().await.is_empty(), "HEAD {path} sent a body");
    }
}

/// The README: "askstream sends no CORS headers". A cross-origin preflight gets no
/// permission, and neither does a cross-origin ask.
#[tokio::test]
async fn no_cors_headers_even_for_another_origin() {
    let server = TestServer::start(fast_config()).await;
    for request in [
        "OPTIONS /api/v1/ai/ask HTTP/1.1\r\nhost: t\r\norigin: http://evil.example\r\naccess-control-request-method: POST\r\n\r\n",
        "POST /api/v1/ai/ask HTTP/1.1\r\nhost: t\r\norigin: http://evil.example\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"query\":\"hi\"}",
    ] {
        let (head, _) = raw(&server, request).await;
        assert!(
            head.headers
                .iter()
                .all(|(k, _)| !k.to_ascii_lowercase().starts_with("access-control-")),
            "{request}: {:?}",
            head.headers
        );
    }
}

#[tokio::test]
async fn other_methods_are_not_allowed() {
    let server = TestServer::start(fast_config()).await;
    for request in [
        "POST / HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        "PUT /client.js HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n",
        "DELETE /app.js HTTP/1.1\r\nhost: t\r\n\r\n",
        "OPTIONS /style.css HTTP/1.1\r\nhost: t\r\n\r\n",
    ] {
        let (head, body) = raw(&server, request).await;
        assert_eq!(head.status, 405, "{request}");
        assert_eq!(head.header("allow"), Some("GET, HEAD"), "{request}");
        assert_eq!(head.header("content-type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "METHOD_NOT_ALLOWED", "{request}");
    }
}

#[tokio::test]
async fn near_misses_are_not_found() {
    let server = TestServer::start(fast_config()).await;
    for path in [
        "/index.html",
        "/client.js/",
        "/app.js.map",
        "/web/client.js",
    ] {
        let (head, _) = raw(&server, &format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n")).await;
        assert_eq!(head.status, 404, "{path}");
    }
}

#[tokio::test]
async fn the_page_needs_no_key_even_when_asks_do() {
    let service = AskService::builder(fast_config()).auth(Auth::parse("key1 alice 5\n").unwrap());
    let server = TestServer::start_with(service).await;
    for path in [PAGE_PATH, APP_PATH, CLIENT_PATH, STYLE_PATH] {
        get(&server, path).await;
    }
    // The API behind it still does.
    let (head, _) = raw(&server, "GET /api/v1/quota HTTP/1.1\r\nhost: t\r\n\r\n").await;
    assert_eq!(head.status, 401);
}
