//! A fake OpenAI-compatible upstream: a small hyper HTTP/1.1 server on port 0 that speaks
//! the streaming chat-completions format, quirks included, from a script.
//!
//! It records every request (path, headers, JSON body) and counts what happens to its
//! connections: accepted, and closed. Replies never end a connection on their own unless
//! the script says so (`Part::Cut`, or the body's end with keep-alive), and a hanging
//! reply waits forever; so when a test sees a connection close, only the other side
//! (askstream cancelling its request) can have closed it. No timing is involved.
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What has happened on the upstream so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// TCP connections accepted.
    pub accepted: usize,
    /// Connections that have ended (closed by the peer, or cut by the script).
    pub closed: usize,
    /// Requests received (bodies read in full).
    pub requests: usize,
    /// Replies whose script reached `Part::Hang`: the upstream is now waiting forever.
    pub hanging: usize,
}

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: HeaderMap,
    /// The body parsed as JSON (`Null` if it was not JSON).
    pub body: Value,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One piece of a scripted response body.
#[derive(Clone, Debug)]
pub enum Part {
    /// Bytes, sent as one chunk of the chunked body.
    Bytes(Bytes),
    /// Makes hyper write out what it has before going on, so the next bytes arrive in a
    /// separate write.
    Flush,
    /// Waits this long (a Tokio timer, so paused time skips it) before going on.
    Pause(Duration),
    /// Sends nothing more, ever, and keeps the connection open.
    Hang,
    /// Sends these bytes again and again, forever, each time in its own write: an endless
    /// body. Only the other side closing the connection stops it.
    Repeat(Bytes),
    /// Fails the body: hyper aborts the connection mid-response.
    Cut,
}

/// A scripted response.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    /// Sent as `content-type`; no such header when empty.
    pub content_type: String,
    /// More response headers.
    pub headers: Vec<(String, String)>,
    /// `false`: the response head is never sent (the request hangs before any answer).
    pub head: bool,
    pub parts: Vec<Part>,
}

impl Reply {
    /// A 200 event stream whose `data:` events are `datas`, each in its own write.
    pub fn events<S: AsRef<str>>(datas: &[S]) -> Reply {
        let mut parts = Vec::new();
        for d in datas {
            parts.push(Part::Bytes(Bytes::from(format!(
                "data: {}\n\n",
                d.as_ref()
            ))));
            parts.push(Part::Flush);
        }
        Reply {
            status: 200,
            content_type: "text/event-stream; charset=utf-8".into(),
            headers: Vec::new(),
            head: true,
            parts,
        }
    }

    /// A 200 event stream of exactly these bytes.
    pub fn raw(bytes: impl Into<Bytes>) -> Reply {
        Reply {
            status: 200,
            content_type: "text/event-stream".into(),
            headers: Vec::new(),
            head: true,
            parts: vec![Part::Bytes(bytes.into())],
        }
    }

    /// Any status with a plain body.
    pub fn status(status: u16, content_type: &str, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            content_type: content_type.into(),
            headers: Vec::new(),
            head: true,
            parts: vec![Part::Bytes(body.into())],
        }
    }

    /// Reads the request, then never answers.
    pub fn never() -> Reply {
        Reply {
            status: 200,
            content_type: "text/event-stream".into(),
            headers: Vec::new(),
            head: false,
            parts: Vec::new(),
        }
    }

    /// The same bytes re-cut into pieces of `n` bytes, each in its own write, so lines,
    /// CRLF pairs and UTF-8 characters are split across chunks.
    pub fn split_every(mut self, n: usize) -> Reply {
        let mut all = Vec::new();
        let mut tail = Vec::new();
        for p in self.parts.drain(..) {
            match p {
                Part::Bytes(b) if tail.is_empty() => all.extend_from_slice(&b),
                Part::Flush if tail.is_empty() => {}
                other => tail.push(other),
            }
        }
        for piece in all.chunks(n) {
            self.parts.push(Part::Bytes(Bytes::copy_from_slice(piece)));
            self.parts.push(Part::Flush);
        }
        self.parts.extend(tail);
        self
    }

    /// Then waits forever, the connection open.
    pub fn then_hang(mut self) -> Reply {
        self.parts.push(Part::Hang);
        self
    }

    /// Then waits `d` before going on (or ending the body).
    pub fn then_pause(mut self, d: Duration) -> Reply {
        self.parts.push(Part::Pause(d));
        self
    }

    /// Then aborts the connection.
    pub fn then_cut(mut self) -> Reply {
        self.parts.push(Part::Cut);
        self
    }

    /// Then sends `bytes` again and again, forever.
    pub fn then_repeat(mut self, bytes: impl Into<Bytes>) -> Reply {
        self.parts.push(Part::Repeat(bytes.into()));
        self
    }

    /// With one more response header.
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

// ---------------------------------------------------------------------------------------
// The chunks real servers send (shapes taken from the OpenAI API reference; vLLM,
// llama.cpp and Ollama send the same, with `usage: null` or without it).
// ---------------------------------------------------------------------------------------

/// The first chunk: the role, with empty content.
pub fn role_chunk() -> String {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "test-model",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}],
        "usage": null
    })
    .to_string()
}

/// A content delta.
pub fn content_chunk(text: &str) -> String {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "test-model",
        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}],
        "usage": null
    })
    .to_string()
}

/// The last choice chunk: an empty delta with a finish reason.
pub fn finish_chunk() -> String {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "test-model",
        "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}],
        "usage": null
    })
    .to_string()
}

/// The usage chunk `stream_options.include_usage` asks for: no choices.
pub fn usage_chunk(prompt: u32, completion: u32) -> String {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "test-model", "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    })
    .to_string()
}

pub const DONE: &str = "[DONE]";

/// A complete, well-formed answer with these tokens.
pub fn answer(tokens: &[&str]) -> Reply {
    let mut datas = vec![role_chunk()];
    datas.extend(tokens.iter().map(|t| content_chunk(t)));
    datas.push(finish_chunk());
    datas.push(usage_chunk(50, tokens.len() as u32));
    datas.push(DONE.to_owned());
    Reply::events(&datas)
}

// ---------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------

struct Shared {
    /// Replies in order; the last one repeats.
    replies: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Received>>,
    counters: watch::Sender<Counters>,
}

impl Shared {
    fn bump(&self, f: impl FnOnce(&mut Counters)) {
        self.counters.send_modify(f);
    }

    fn next_reply(&self) -> Reply {
        let mut q = self.replies.lock().unwrap();
        if q.len() > 1 {
            q.pop_front().unwrap()
        } else {
            q.front().cloned().expect("at least one reply")
        }
    }
}

/// A running fake upstream.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    /// Answers every request with `reply`.
    pub async fn start(reply: Reply) -> FakeUpstream {
        Self::start_script(vec![reply]).await
    }

    /// Answers requests with `replies` in order; the last one repeats.
    pub async fn start_script(replies: Vec<Reply>) -> FakeUpstream {
        assert!(!replies.is_empty());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            replies: Mutex::new(replies.into()),
            requests: Mutex::new(Vec::new()),
            counters: watch::Sender::new(Counters::default()),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        FakeUpstream { addr, shared, task }
    }

    /// The API base to configure: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn counters(&self) -> Counters {
        *self.shared.counters.borrow()
    }

    pub fn requests(&self) -> Vec<Received> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Waits until `pred` holds. The bound is only a guard against a hung test: in every
    /// use the condition follows from an event the test has already caused.
    pub async fn wait(&self, what: &str, pred: impl Fn(&Counters) -> bool) {
        let mut rx = self.shared.counters.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| pred(c))).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "the upstream never saw: {what} (counters: {:?})",
            self.counters()
        );
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        // As vLLM (uvicorn) and Ollama (Go) do. Without it, Nagle's algorithm holds the
        // small writes of a streamed answer until the peer's delayed ACK.
        let _ = tcp.set_nodelay(true);
        shared.bump(|c| c.accepted += 1);
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc_shared = shared.clone();
            let svc = service_fn(move |req| handle(svc_shared.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
            shared.bump(|c| c.closed += 1);
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Script>, Infallible> {
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    shared.requests.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("", |p| p.as_str())
            .to_owned(),
        headers: parts.headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    });
    shared.bump(|c| c.requests += 1);
    let reply = shared.next_reply();
    if !reply.head {
        std::future::pending::<()>().await;
    }
    let mut res = Response::new(Script {
        parts: reply.parts.into(),
        flushing: false,
        sleep: None,
        shared,
    });
    *res.status_mut() = StatusCode::from_u16(reply.status).unwrap();
    if !reply.content_type.is_empty() {
        res.headers_mut()
            .insert("content-type", reply.content_type.parse().unwrap());
    }
    for (name, value) in &reply.headers {
        res.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    Ok(res)
}

/// A response body that plays its parts.
struct Script {
    parts: VecDeque<Part>,
    /// Inside a `Flush`: returned `Pending` once already.
    flushing: bool,
    /// The timer of the current `Pause`.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    shared: Arc<Shared>,
}

impl Body for Script {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        loop {
            match self.parts.front() {
                None => return Poll::Ready(None),
                Some(Part::Bytes(_)) => {
                    let Some(Part::Bytes(b)) = self.parts.pop_front() else {
                        unreachable!()
                    };
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Some(Part::Flush) => {
                    if self.flushing {
                        self.flushing = false;
                        self.parts.pop_front();
                        continue;
                    }
                    // Pending makes hyper flush; the wake brings it straight back.
                    self.flushing = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Some(&Part::Pause(d)) => {
                    let sleep = self
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.sleep = None;
                    self.parts.pop_front();
                }
                Some(Part::Hang) => {
                    if !self.flushing {
                        self.flushing = true;
                        self.shared.bump(|c| c.hanging += 1);
                    }
                    return Poll::Pending;
                }
                Some(Part::Repeat(b)) => {
                    // Each copy is followed by a flush, as `Flush` does it, so hyper writes
                    // it out (and sees a closed connection) before the next.
                    if self.flushing {
                        self.flushing = false;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    let b = b.clone();
                    self.flushing = true;
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Some(Part::Cut) => {
                    self.parts.clear();
                    return Poll::Ready(Some(Err(std::io::Error::other("cut by the script"))));
                }
            }
        }
    }
}
