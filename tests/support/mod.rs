//! Test support: the real server on port 0, a raw-socket HTTP/1.1 client, and a tiny SSE
//! parser written independently of the crate's decoder (so a decoder bug cannot hide a
//! server bug).
// Each test binary uses some of these helpers, and `pub` here means "for the test files".
#![allow(dead_code, unreachable_pub)]

pub mod script;

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use askstream::pipeline::sim::SimConfig;
use askstream::quota::QuotaMap;
use askstream::{AskService, Builder, GeneratorConfig, ServiceConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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
    /// The service's quota store, readable after the server stopped listening.
    pub quota: Arc<QuotaMap>,
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
        let quota = Arc::new(QuotaMap::new(builder.config().quota_window));
        let service = builder
            .quota(quota.clone())
            .build()
            .expect("service builds");
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

    /// `user`'s remaining quota in the server's store.
    pub fn remaining_in_store(&self, user: &str, limit: u32) -> u32 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        self.quota.status_at(user, limit, now).remaining
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

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The simplest frontend parser, as SPEC §1.1 promises works: split on a blank line, keep
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

/// A streaming ask with the given bearer token; returns head and events.
pub async fn stream_ask(addr: SocketAddr, query: &str, bearer: &str) -> (Head, Vec<Value>) {
    let body = serde_json::json!({ "query": query }).to_string();
    let (head, raw) = ask(
        addr,
        "/api/v1/ai/ask?stream=true",
        &body,
        &format!("authorization: Bearer {bearer}\r\n"),
    )
    .await;
    (head, parse_sse(&raw).0)
}

/// GET /api/v1/quota for a bearer token.
pub async fn quota(addr: SocketAddr, bearer: &str) -> Value {
    let mut c = RawConn::connect(addr).await;
    c.get(
        "/api/v1/quota",
        &format!("authorization: Bearer {bearer}\r\n"),
    )
    .await;
    let head = c.read_head().await;
    assert_eq!(head.status, 200);
    serde_json::from_slice(&c.read_body(&head).await).unwrap()
}

impl RawConn {
    /// Connects from a chosen local address (on Linux every 127.0.0.0/8 address is
    /// loopback), so a test can act as a second client IP.
    pub async fn connect_from(addr: SocketAddr, local: std::net::IpAddr) -> RawConn {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(local, 0)).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }
}

impl RawConn {
    /// Wraps an already connected stream (e.g. one made with `TcpSocket` to set buffer
    /// sizes before connecting).
    pub fn from_stream(stream: TcpStream) -> RawConn {
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }
}
