//! Test support: the real server on port 0, a raw-socket HTTP/1.1 client, and a tiny SSE
//! parser written independently of the crate's decoder (so a decoder bug cannot hide a
//! server bug).
// Each test binary uses some of these helpers, and `pub` here means "for the test files".
#![allow(dead_code, unreachable_pub)]

pub mod process;
#[cfg(feature = "redis")]
pub mod redis;
pub mod script;

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use askstream::pipeline::sim::SimConfig;
use askstream::quota::QuotaMap;
use askstream::{AskService, Builder, GeneratorConfig, QuotaStoreConfig, ServiceConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// [`fast_config`] with the per-user quota limit set to `limit`.
pub fn config_with_limit(limit: u32) -> ServiceConfig {
    fast_config_with(|c| c.quota_limit = limit)
}

/// [`fast_config`] changed by `f`.
pub fn fast_config_with(f: impl FnOnce(&mut ServiceConfig)) -> ServiceConfig {
    let mut c = fast_config();
    f(&mut c);
    c
}

/// A config for tests: instant sim, small and fast everything.
pub fn fast_config() -> ServiceConfig {
    ServiceConfig {
        generator: GeneratorConfig::Sim(SimConfig {
            ttft: Duration::ZERO,
            token_interval: Duration::ZERO,
            tokens: 8,
        }),
        shutdown_grace: Duration::from_secs(5),
        ..ServiceConfig::default()
    }
}

/// The sim settings of a config built on [`fast_config`], to change pacing or length.
pub fn sim(config: &mut ServiceConfig) -> &mut SimConfig {
    match &mut config.generator {
        GeneratorConfig::Sim(sim) => sim,
        other => panic!("not a sim config: {other:?}"),
    }
}

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub service: AskService,
    /// The service's quota store when it is in memory, readable after the server stopped
    /// listening. (A config naming a shared store keeps that store.)
    pub quota: Option<Arc<QuotaMap>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(config: ServiceConfig) -> TestServer {
        Self::start_with(AskService::builder(config)).await
    }

    /// Builds the service from `builder`, with a quota map the test can read, and
    /// serves it on 127.0.0.1:0.
    pub async fn start_with(builder: Builder) -> TestServer {
        let in_memory = matches!(builder.config().quota_store, QuotaStoreConfig::Memory);
        let quota = in_memory.then(|| Arc::new(QuotaMap::new(builder.config().quota_window)));
        let builder = match &quota {
            Some(q) => builder.quota(q.clone()),
            None => builder,
        };
        let service = builder.build().expect("service builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = service.clone();
        let task = tokio::spawn(async move {
            askstream::serve(listener, svc, async {
                let _ = stopped.await;
            })
            .await
        });
        TestServer {
            addr,
            service,
            quota,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The remaining quota in the server's store of the open-mode user behind bearer
    /// token `token`.
    pub fn remaining_in_store(&self, token: &str, limit: u32) -> u32 {
        let user = askstream::auth::UserId::of_bearer(token);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        self.quota
            .as_ref()
            .expect("a server with the in-memory store")
            .status_at(user.as_str(), limit, now)
            .remaining
    }

    /// Sends the shutdown signal and returns the serve task, to await its end.
    pub fn signal_shutdown(&mut self) -> JoinHandle<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.take().expect("shut down once")
    }

    /// Waits until every answer started so far has settled or refunded.
    pub async fn settled(&self) {
        tokio::time::timeout(Duration::from_secs(20), self.service.answers_finished())
            .await
            .expect("answers finish");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// A parsed HTTP/1.1 response head.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw HTTP/1.1 connection with just enough client to read heads and bodies.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects from a chosen local address (on Linux every 127.0.0.0/8 address is
    /// loopback), so a test can act as a second client IP.
    pub async fn connect_from(addr: SocketAddr, local: std::net::IpAddr) -> RawConn {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(local, 0)).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        RawConn::from_stream(stream)
    }

    /// Wraps an already connected stream (e.g. one made with `TcpSocket` to set buffer
    /// sizes before connecting).
    pub fn from_stream(stream: TcpStream) -> RawConn {
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Writes a POST to `path` with a JSON body and optional extra header lines.
    pub async fn post(&mut self, path: &str, body: &str, extra: &str) {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
            body.len()
        );
        self.send(req.as_bytes()).await;
    }

    /// Posts a streaming ask for `query` as bearer `user` and reads the response head,
    /// asserting 200 and `text/event-stream` (the answer is charged and running). The body
    /// is left to the caller.
    pub async fn start_stream(&mut self, query: &str, user: &str) -> Head {
        self.post(
            "/api/v1/ai/ask?stream=true",
            &ask_body(query),
            &bearer(user),
        )
        .await;
        let head = self.read_head().await;
        assert_eq!(head.status, 200);
        assert_eq!(head.header("content-type"), Some("text/event-stream"));
        head
    }

    pub async fn get(&mut self, path: &str, extra: &str) {
        self.send(format!("GET {path} HTTP/1.1\r\nhost: test\r\n{extra}\r\n").as_bytes())
            .await;
    }

    /// Reads more bytes; returns false on EOF or a reset.
    async fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 8192];
        match self.stream.read(&mut tmp).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    pub async fn read_head(&mut self) -> Head {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let text = String::from_utf8(self.buf[..end].to_vec()).unwrap();
                self.buf.drain(..end + 4);
                let mut lines = text.split("\r\n");
                let status = lines
                    .next()
                    .unwrap()
                    .split(' ')
                    .nth(1)
                    .unwrap()
                    .parse()
                    .unwrap();
                let headers = lines
                    .map(|l| {
                        let (k, v) = l.split_once(':').unwrap();
                        (k.trim().to_ascii_lowercase(), v.trim().to_string())
                    })
                    .collect();
                return Head { status, headers };
            }
            assert!(
                self.fill().await,
                "connection closed before the response head"
            );
        }
    }

    /// Reads one chunk of a chunked body: `Some(data)`, `Some(empty)` for the last chunk,
    /// `None` if the connection ended first.
    pub async fn read_chunk(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(line_end) = find(&self.buf, b"\r\n") {
                let size_text = std::str::from_utf8(&self.buf[..line_end]).unwrap();
                let size = usize::from_str_radix(size_text.trim(), 16).unwrap();
                if self.buf.len() >= line_end + 2 + size + 2 {
                    let data = self.buf[line_end + 2..line_end + 2 + size].to_vec();
                    self.buf.drain(..line_end + 2 + size + 2);
                    return Some(data);
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads a chunked body to its end (or to EOF): returns the bytes and whether the
    /// terminating chunk arrived.
    pub async fn read_chunked_body(&mut self) -> (Vec<u8>, bool) {
        let mut body = Vec::new();
        loop {
            match self.read_chunk().await {
                Some(c) if c.is_empty() => return (body, true),
                Some(c) => body.extend_from_slice(&c),
                None => return (body, false),
            }
        }
    }

    /// Reads a body of `content-length` bytes.
    pub async fn read_exact_body(&mut self, len: usize) -> Vec<u8> {
        while self.buf.len() < len {
            assert!(self.fill().await, "connection closed inside the body");
        }
        self.buf.drain(..len).collect()
    }

    /// Reads whatever the response body is (chunked or sized).
    pub async fn read_body(&mut self, head: &Head) -> Vec<u8> {
        if head
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            let (body, complete) = self.read_chunked_body().await;
            assert!(complete, "chunked body ended early");
            body
        } else {
            let len = head
                .header("content-length")
                .map_or(0, |v| v.parse().unwrap());
            self.read_exact_body(len).await
        }
    }

    /// Everything until EOF, raw.
    pub async fn read_to_eof(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }
}

/// The first position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The simplest frontend parser, as contract §1.1 promises works: split on a blank line, keep
/// lines starting with `data: `, parse each as JSON. Comments are returned as strings.
pub fn parse_sse(body: &[u8]) -> (Vec<Value>, Vec<String>) {
    let text = std::str::from_utf8(body).expect("the stream is UTF-8");
    let mut events = Vec::new();
    let mut comments = Vec::new();
    for block in text.split("\n\n") {
        for line in block.lines() {
            if let Some(json) = line.strip_prefix("data: ") {
                events.push(serde_json::from_str(json).expect("each data line is one JSON value"));
            } else if let Some(c) = line.strip_prefix(':') {
                comments.push(c.trim().to_string());
            }
        }
    }
    (events, comments)
}

/// The concatenated `token` events.
pub fn answer_text(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["token"].as_str().unwrap())
        .collect()
}

/// Posts an ask and reads the whole response (head + body) on a fresh connection.
pub async fn ask(addr: SocketAddr, path: &str, body: &str, extra: &str) -> (Head, Vec<u8>) {
    let mut c = RawConn::connect(addr).await;
    c.post(path, body, extra).await;
    let head = c.read_head().await;
    let body = c.read_body(&head).await;
    (head, body)
}

/// Sends raw request bytes on a fresh connection and reads the whole response, for
/// requests [`RawConn::post`] cannot write (odd methods, headers or framing).
pub async fn raw(server: &TestServer, request: impl AsRef<[u8]>) -> (Head, Vec<u8>) {
    let mut c = RawConn::connect(server.addr).await;
    c.send(request.as_ref()).await;
    let head = c.read_head().await;
    let body = c.read_body(&head).await;
    (head, body)
}

/// A streaming ask with the given bearer token; returns head and events.
pub async fn stream_ask(addr: SocketAddr, query: &str, token: &str) -> (Head, Vec<Value>) {
    let (head, raw) = ask(
        addr,
        "/api/v1/ai/ask?stream=true",
        &ask_body(query),
        &bearer(token),
    )
    .await;
    (head, parse_sse(&raw).0)
}

/// GET /api/v1/quota for a bearer token.
pub async fn quota(addr: SocketAddr, token: &str) -> Value {
    let mut c = RawConn::connect(addr).await;
    c.get("/api/v1/quota", &bearer(token)).await;
    let head = c.read_head().await;
    assert_eq!(head.status, 200);
    serde_json::from_slice(&c.read_body(&head).await).unwrap()
}

// ---------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------

/// The `authorization` header line (with its CRLF) for a bearer token; in open mode the
/// token is the user, so each test picks its own to get its own quota.
pub fn bearer(token: &str) -> String {
    format!("authorization: Bearer {token}\r\n")
}

/// An ask request body with just a query.
pub fn ask_body(query: &str) -> String {
    serde_json::json!({ "query": query }).to_string()
}

/// The bytes of a whole streaming-ask request for `query` as bearer `user`, for tests
/// that drive a bare socket (to see resets and EOF that [`RawConn`] would assert on).
pub fn stream_ask_request(query: &str, user: &str) -> String {
    let body = ask_body(query);
    format!(
        "POST /api/v1/ai/ask?stream=true HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n{}content-length: {}\r\n\r\n{body}",
        bearer(user),
        body.len()
    )
}

/// `user`'s remaining quota, as `GET /api/v1/quota` reports it.
pub async fn remaining(addr: SocketAddr, user: &str) -> u64 {
    quota(addr, user).await["remaining"]
        .as_u64()
        .expect("remaining is a number")
}

/// [`remaining`], also asserting the reported limit, for suites that start every user
/// at a known `limit`.
pub async fn remaining_with_limit(addr: SocketAddr, user: &str, limit: u64) -> u64 {
    let q = quota(addr, user).await;
    assert_eq!(q["limit"].as_u64(), Some(limit), "{q}");
    q["remaining"].as_u64().expect("remaining is a number")
}

// ---------------------------------------------------------------------------------------
// Decoding what the server wrote, independently of hyper and of the crate's encoder
// ---------------------------------------------------------------------------------------

/// Decodes as much of a raw chunked body as arrived (hex size line, data, CRLF, …,
/// `0\r\n`): the data so far, including a cut last chunk's partial data, and, if the
/// last-chunk line arrived, the bytes after it. For clients that leave mid-response.
pub fn dechunk_prefix(mut raw: &[u8]) -> (Vec<u8>, Option<&[u8]>) {
    let mut body = Vec::new();
    while let Some(line_end) = find(raw, b"\r\n") {
        let size_text = std::str::from_utf8(&raw[..line_end]).expect("chunk size is ASCII");
        let size = usize::from_str_radix(size_text, 16).expect("a hex chunk size");
        let data = &raw[line_end + 2..];
        if size == 0 {
            return (body, Some(data));
        }
        body.extend_from_slice(&data[..size.min(data.len())]);
        if data.len() < size + 2 {
            break;
        }
        assert_eq!(&data[size..size + 2], b"\r\n", "chunk data ends with CRLF");
        raw = &data[size + 2..];
    }
    (body, None)
}

/// Reads a raw chunked body strictly: hex size line, data, CRLF, …, `0\r\n\r\n`, no
/// trailers, nothing after. `None` if the body was cut before its last chunk.
pub fn dechunk(raw: &[u8]) -> Option<Vec<u8>> {
    let (body, Some(rest)) = dechunk_prefix(raw) else {
        return None;
    };
    assert_eq!(
        rest, b"\r\n",
        "the last chunk ends the body, nothing follows"
    );
    Some(body)
}

/// One SSE frame as it appeared on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Exactly `: keep-alive\n\n`, the only comment the server sends.
    KeepAlive,
    /// Exactly `data: <one-line JSON object>\n\n`.
    Data(Value),
}

/// The strict SSE parser: splits a body into frames, insisting on the exact wire format.
/// Every frame is either `: keep-alive\n\n` or `data: <one-line JSON object>\n\n`, and
/// nothing else (no other fields or comments, no stray bytes, no frame cut short at the
/// end); anything else fails the test. Unlike [`parse_sse`] (what a naive frontend does),
/// this is for asserting exactly what the server wrote.
pub fn frames(body: &[u8]) -> Vec<Frame> {
    let text = std::str::from_utf8(body).expect("the stream is UTF-8");
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest
            .find("\n\n")
            .unwrap_or_else(|| panic!("an unterminated frame at the end: {rest:?}"));
        let frame = &rest[..end];
        rest = &rest[end + 2..];
        if frame == ": keep-alive" {
            out.push(Frame::KeepAlive);
            continue;
        }
        let json = frame
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not a keep-alive nor a data frame: {frame:?}"));
        assert!(
            !json.contains('\n') && !json.contains('\r'),
            "one line per event: {frame:?}"
        );
        let value: Value = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("data is one JSON value ({e}): {json:?}"));
        assert!(value.is_object(), "events are JSON objects: {json}");
        out.push(Frame::Data(value));
    }
    out
}

/// The data events of a body parsed by [`frames`] (so just as strictly); keep-alives are
/// dropped.
pub fn data_events(body: &[u8]) -> Vec<Value> {
    frames(body)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Data(v) => Some(v),
            Frame::KeepAlive => None,
        })
        .collect()
}

/// Asserts `v` is exactly an error object with `code` (contract §1.1): the keys `type`,
/// `code`, `message` and no others, `type` is `error`, and the message is not blank.
/// `ctx` names the case in failure messages.
pub fn assert_error_object(v: &Value, code: &str, ctx: &str) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{ctx}: not an object: {v}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "type"], "{ctx}: {v}");
    assert_eq!(v["type"], "error", "{ctx}: {v}");
    assert_eq!(v["code"], code, "{ctx}: {v}");
    let message = v["message"].as_str().expect("message is a string");
    assert!(!message.trim().is_empty(), "{ctx}: empty message: {v}");
}

/// One sample of `GET /metrics` by its full series name (labels included), such as
/// `askstream_active_streams` or `askstream_asks_total{outcome="done"}`.
pub async fn metric(addr: SocketAddr, series: &str) -> u64 {
    let mut c = RawConn::connect(addr).await;
    c.get("/metrics", "").await;
    let head = c.read_head().await;
    let text = String::from_utf8(c.read_body(&head).await).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// The address a spawned askstream (stderr piped) logs when it starts listening; its log
/// keeps draining on a thread afterwards, so the child never blocks on a full pipe.
pub fn listening_addr(child: &mut std::process::Child) -> SocketAddr {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = std::io::BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line.expect("askstream's log is text");
        if let Some(rest) = line.split("addr=").nth(1) {
            let addr = rest.split_whitespace().next().unwrap_or_default();
            if let Ok(addr) = addr.parse() {
                std::thread::spawn(move || for _ in lines {});
                return addr;
            }
        }
    }
    panic!("askstream exited before listening");
}
