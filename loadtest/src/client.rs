//! One streaming ask at a time over one TCP connection, measured as it arrives.
//!
//! A [`Client`] owns a connection (kept between asks with keep-alive), the decoders and the
//! request buffer, so after its first ask it allocates nothing but what the SSE decoder makes
//! for each event. It writes the ask, parses the response head, undoes the chunked coding,
//! feeds the crate's own SSE [`Decoder`], and tells an [`Observer`] about every token event
//! the moment it is parsed. It knows nothing of workloads, windows or statistics.
//!
//! Reads go through a buffer shared by every client of the tool (the tool runs on one
//! thread): a client waits until its socket is readable, then borrows the buffer, reads and
//! decodes without awaiting, and returns it. Thousands of open streams then cost one read
//! buffer, not thousands.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use askstream::sse::decode::Decoder;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::h2;
use crate::http1::{self, ChunkedDecoder, Framing, Head, HttpError};

/// What every ask of a run sends, and where.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// The server's address (loopback; the engine checks).
    pub(crate) addr: SocketAddr,
    /// The `host` header.
    pub(crate) host: String,
    /// The path and query of the streaming ask.
    pub(crate) path: String,
    /// The JSON request body.
    pub(crate) body: Vec<u8>,
    /// Reuse connections between asks; otherwise each ask asks the server to close after it.
    pub(crate) keep_alive: bool,
    /// Asks as HTTP/2 streams over these shared connections (`--h2c`), instead of HTTP/1.1.
    pub(crate) h2: Option<std::rc::Rc<h2::Pool>>,
    /// HTTP/1.1 over TLS (`--tls`): each new connection's handshake is made with this.
    pub(crate) tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// A connection: plain TCP, or TLS over it.
#[derive(Debug)]
enum Conn {
    Plain(TcpStream),
    /// Boxed: rustls's state is large, and most runs have none.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(bytes).await,
            Conn::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }
}

/// The plaintext of one TLS connection's reads: rustls decrypts into it while the read
/// awaits, so it cannot be the buffer all clients share. Only TLS clients have one.
const TLS_READ: usize = 16 * 1024;

/// Receives the measurements of one ask as they happen.
pub(crate) trait Observer {
    /// A new connection was established in `took`.
    fn connected(&self, took: Duration);
    /// The request is about to be written (the TTFT clock starts now).
    fn request_sent(&self, at: Instant);
    /// The first `token` event was parsed at `at`.
    fn first_token(&self, at: Instant);
    /// A later `token` event was parsed; `gap` is the time between the reads that brought
    /// it and the previous token (zero for tokens that arrived in one read).
    fn token(&self, gap: Duration);
}

/// An ask that ended with its `done` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Finished {
    /// Token events received.
    pub(crate) tokens: u64,
    /// From just before the request was written to the `done` event.
    pub(crate) total: Duration,
}

/// Why an ask did not end with `done`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The connection could not be made.
    Connect(io::ErrorKind),
    /// Writing the request or reading the response failed (e.g. reset by the server).
    Io(io::ErrorKind),
    /// A status other than 200, with the `code` of the error event that came with it.
    Status {
        /// The HTTP status.
        status: u16,
        /// The contract's error code, if the body carried one.
        code: Option<String>,
    },
    /// The stream ended (body or connection) before a `done` or `error` event.
    Truncated,
    /// An `error` event ended the stream.
    ErrorEvent(String),
    /// The response broke the HTTP or event-stream format.
    Protocol(String),
}

impl fmt::Display for Failure {
    /// The error kind under which the report counts this failure.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(kind) => write!(f, "connect: {kind}"),
            Failure::Io(kind) => write!(f, "io: {kind}"),
            Failure::Status { status, code } => match code {
                Some(code) => write!(f, "status {status} {code}"),
                None => write!(f, "status {status}"),
            },
            Failure::Truncated => write!(f, "truncated stream"),
            Failure::ErrorEvent(code) => write!(f, "error event {code}"),
            Failure::Protocol(why) => write!(f, "protocol: {why}"),
        }
    }
}

impl From<HttpError> for Failure {
    fn from(e: HttpError) -> Self {
        Failure::Protocol(e.to_string())
    }
}

/// The fields of an event's JSON the tool looks at.
#[derive(Deserialize)]
struct EventHead<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
}

/// What an event means to the tool.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Token,
    Done,
    Error(String),
    /// Blank data, or a type this tool does not know: skipped.
    Other,
}

/// Classifies an event's data. Our server's token events all start the same way, so they
/// skip JSON parsing; anything else (other servers, other field orders) is parsed.
fn classify(data: &str) -> Result<Kind, Failure> {
    if data.starts_with(r#"{"type":"token""#) {
        return Ok(Kind::Token);
    }
    if data.trim().is_empty() {
        return Ok(Kind::Other);
    }
    let head: EventHead<'_> = serde_json::from_str(data)
        .map_err(|e| Failure::Protocol(format!("event data is not an event object: {e}")))?;
    Ok(match &*head.kind {
        "token" => Kind::Token,
        "done" => Kind::Done,
        "error" => Kind::Error(
            head.code
                .map_or_else(|| "(no code)".into(), Cow::into_owned),
        ),
        _ => Kind::Other,
    })
}

/// The progress of one response through its bytes.
struct Response {
    /// Set once the head is parsed.
    head: Option<Head>,
    /// Body bytes still expected, for [`Framing::Length`].
    left: u64,
    /// When the request was written, for `total`.
    sent: Instant,
    tokens: u64,
    /// When the read holding the previous token returned.
    last_token: Option<Instant>,
    /// The connection is to be reused, so the body must be read to its end.
    keep_alive: bool,
    /// The answer's last event arrived: `Ok` for `done`, `Err` for an error.
    ended: Option<Result<Finished, Failure>>,
    /// The body's framing says it is complete.
    body_done: bool,
    /// Any response byte arrived; a reused connection that fails before is retried.
    any_byte: bool,
}

impl Response {
    /// After a complete answer on a connection to be reused, the body's end (the last
    /// chunk) still has to be read before the connection can carry the next ask.
    fn must_read_body_end(&self) -> bool {
        self.keep_alive
            && matches!(self.ended, Some(Ok(_)))
            && self
                .head
                .is_some_and(|h| !h.close && h.framing != Framing::UntilClose)
    }
}

/// One connection and everything reused from ask to ask.
#[derive(Debug)]
pub(crate) struct Client {
    conn: Option<Conn>,
    /// The plaintext buffer of a TLS connection (empty until the first TLS read).
    tls_buf: Vec<u8>,
    /// Only a response head split across reads is copied here.
    head_buf: Vec<u8>,
    chunked: ChunkedDecoder,
    sse: Decoder,
    request: Vec<u8>,
}

/// Local addresses new connections to an IPv4 loopback target come from, in turn.
///
/// One address pair has some 28,000 ephemeral ports (32768–60999), and a connection
/// closed by the client holds its port in TIME_WAIT for a minute: at 15,000 open streams
/// with a new connection each, connects would wait for ports and TTFT would measure the
/// port search. The whole of 127.0.0.0/8 is local on Linux, so 16 source addresses give
/// 16 times the ports, and the server sees nothing else different.
const SOURCES: u8 = 16;

/// Connects to `addr`, from the next of [`SOURCES`] loopback addresses when it is an IPv4
/// loopback address.
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    use std::sync::atomic::{AtomicU8, Ordering};
    static NEXT: AtomicU8 = AtomicU8::new(0);
    match addr {
        SocketAddr::V4(v4) if v4.ip().is_loopback() => {
            let k = NEXT.fetch_add(1, Ordering::Relaxed) % SOURCES;
            let source = std::net::Ipv4Addr::new(127, 0, 0, 1 + k);
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((source, 0)))?;
            socket.connect(addr).await
        }
        _ => TcpStream::connect(addr).await,
    }
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    /// A client with no connection yet.
    pub(crate) fn new() -> Self {
        Client {
            conn: None,
            tls_buf: Vec::new(),
            head_buf: Vec::new(),
            chunked: ChunkedDecoder::new(),
            sse: Decoder::new(),
            request: Vec::with_capacity(256),
        }
    }

    /// Closes the connection, e.g. after a timeout left it mid-response.
    pub(crate) fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Sends one ask as `user-<user>` and reads its answer to the end.
    ///
    /// With keep-alive a reused connection that turns out to be closed by the server before
    /// any response byte is retried once on a new connection: that is the server ending an
    /// idle connection, not a failed ask.
    pub(crate) async fn ask(
        &mut self,
        target: &Target,
        user: u64,
        read_buf: &RefCell<Vec<u8>>,
        observer: &impl Observer,
    ) -> Result<Finished, Failure> {
        if let Some(pool) = &target.h2 {
            return self.ask_h2(pool, target, user, observer).await;
        }
        http1::write_ask(
            &mut self.request,
            &target.host,
            &target.path,
            &target.body,
            user,
            !target.keep_alive,
        );
        let reused = self.conn.is_some();
        match self.exchange(target, read_buf, observer).await {
            Err((Failure::Io(_) | Failure::Truncated, false)) if reused => {
                self.conn = None;
                self.exchange(target, read_buf, observer)
                    .await
                    .map_err(|(f, _)| f)
            }
            other => other.map_err(|(f, _)| f),
        }
    }

    /// Connects if needed, writes the request and reads the response. A failure comes with
    /// whether any response byte had arrived.
    async fn exchange(
        &mut self,
        target: &Target,
        read_buf: &RefCell<Vec<u8>>,
        observer: &impl Observer,
    ) -> Result<Finished, (Failure, bool)> {
        if self.conn.is_none() {
            let started = Instant::now();
            let conn = connect(target.addr)
                .await
                .map_err(|e| (Failure::Connect(e.kind()), false))?;
            // Without it a small request can wait for a delayed ACK: ~40 ms of fake latency.
            conn.set_nodelay(true)
                .map_err(|e| (Failure::Connect(e.kind()), false))?;
            let conn = match &target.tls {
                None => Conn::Plain(conn),
                Some(tls) => Conn::Tls(Box::new(
                    TlsConnector::from(tls.clone())
                        .connect(crate::tls::server_name(), conn)
                        .await
                        .map_err(|e| (Failure::Connect(e.kind()), false))?,
                )),
            };
            // With TLS, the handshake is part of connecting.
            observer.connected(started.elapsed());
            self.conn = Some(conn);
        }
        self.head_buf.clear();
        self.chunked = ChunkedDecoder::new();
        self.sse.finish();

        let conn = self.conn.as_mut().expect("connected above");
        let sent = Instant::now();
        observer.request_sent(sent);
        if let Err(e) = conn.write_all(&self.request).await {
            self.conn = None;
            return Err((Failure::Io(e.kind()), false));
        }
        let mut response = Response {
            head: None,
            left: 0,
            sent,
            tokens: 0,
            last_token: None,
            keep_alive: target.keep_alive,
            ended: None,
            body_done: false,
            any_byte: false,
        };
        let result = self.read_response(&mut response, read_buf, observer).await;
        let reusable = target.keep_alive
            && response.body_done
            && result.is_ok()
            && response.head.is_some_and(|h| !h.close);
        if !reusable {
            self.conn = None;
        }
        result.map_err(|f| (f, response.any_byte))
    }

    /// One ask as an HTTP/2 stream on the pool's next connection. The body is decoded as
    /// HTTP/1's would be with no framing: HTTP/2 frames it already.
    async fn ask_h2(
        &mut self,
        pool: &h2::Pool,
        target: &Target,
        user: u64,
        observer: &impl Observer,
    ) -> Result<Finished, Failure> {
        let conn = pool.next(target.addr).await?;
        self.sse.finish();
        let req = h2::request(target, user);
        let sent = Instant::now();
        observer.request_sent(sent);
        let mut response = Response {
            head: None,
            left: 0,
            sent,
            tokens: 0,
            last_token: None,
            keep_alive: false,
            ended: None,
            body_done: false,
            any_byte: false,
        };
        let (status, event_stream, mut body) = h2::send(conn, req).await?;
        let head = Head {
            status,
            framing: Framing::UntilClose,
            close: false,
            event_stream,
        };
        self.start_body(&mut response, head)?;
        // Read to the stream's end even after `done` (which the end follows at once): a
        // client that resets every stream looks like an attack (HTTP/2 rapid reset) and
        // gets its connection closed.
        loop {
            let Some(data) = h2::next_data(&mut body).await? else {
                break;
            };
            response.any_byte = true;
            self.body(&mut response, &data, Instant::now(), observer)?;
        }
        response
            .ended
            .take()
            .unwrap_or_else(|| Err(self.at_eof(&response).unwrap_or(Failure::Truncated)))
    }

    /// Reads until the answer has ended (and, with keep-alive, its body too).
    async fn read_response(
        &mut self,
        response: &mut Response,
        read_buf: &RefCell<Vec<u8>>,
        observer: &impl Observer,
    ) -> Result<Finished, Failure> {
        loop {
            let conn = match self.conn.as_mut().expect("connected") {
                Conn::Plain(conn) => conn,
                Conn::Tls(tls) => {
                    let mut buf = std::mem::take(&mut self.tls_buf);
                    buf.resize(TLS_READ, 0);
                    let read = tls.read(&mut buf).await;
                    let outcome = self.after_read(response, read, &buf, observer);
                    self.tls_buf = buf;
                    match outcome {
                        Some(end) => return end,
                        None => continue,
                    }
                }
            };
            conn.readable().await.map_err(|e| Failure::Io(e.kind()))?;
            // No await from here to the end of the iteration: the shared buffer is ours.
            let mut buf = read_buf.borrow_mut();
            let read = match conn.try_read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                read => read,
            };
            if let Some(end) = self.after_read(response, read, &buf, observer) {
                return end;
            }
        }
    }

    /// What one read (into `buf`) means for the answer: `Some` when it has ended (EOF, a
    /// failed read, a broken response, or its end parsed), `None` to read on.
    fn after_read(
        &mut self,
        response: &mut Response,
        read: io::Result<usize>,
        buf: &[u8],
        observer: &impl Observer,
    ) -> Option<Result<Finished, Failure>> {
        let ended = match read {
            Ok(0) => Failure::Truncated,
            Ok(n) => return self.consume(response, &buf[..n], observer),
            Err(e) => Failure::Io(e.kind()),
        };
        Some(
            response
                .ended
                .take()
                .unwrap_or_else(|| Err(self.at_eof(response).unwrap_or(ended))),
        )
    }

    /// Feeds `bytes` to the answer; `Some` once it has ended.
    fn consume(
        &mut self,
        response: &mut Response,
        bytes: &[u8],
        observer: &impl Observer,
    ) -> Option<Result<Finished, Failure>> {
        response.any_byte = true;
        if let Err(f) = self.process(response, bytes, Instant::now(), observer) {
            return Some(Err(f));
        }
        (response.body_done || (response.ended.is_some() && !response.must_read_body_end()))
            .then(|| response.ended.take().unwrap_or(Err(Failure::Truncated)))
    }

    /// The failure a non-200 response amounts to once its body is over.
    fn at_eof(&self, response: &Response) -> Option<Failure> {
        let head = response.head?;
        (head.status != 200).then_some(Failure::Status {
            status: head.status,
            code: None,
        })
    }

    /// Consumes the bytes of one read.
    fn process(
        &mut self,
        response: &mut Response,
        bytes: &[u8],
        now: Instant,
        observer: &impl Observer,
    ) -> Result<(), Failure> {
        if response.head.is_some() {
            return self.body(response, bytes, now, observer);
        }
        // The usual case: the whole head in this read, parsed where it lies.
        let parsed = if self.head_buf.is_empty() {
            http1::parse_head(bytes)?
        } else {
            None
        };
        if let Some((head, len)) = parsed {
            self.start_body(response, head)?;
            return self.body(response, &bytes[len..], now, observer);
        }
        self.head_buf.extend_from_slice(bytes);
        let Some((head, len)) = http1::parse_head(&self.head_buf)? else {
            return Ok(());
        };
        self.start_body(response, head)?;
        let rest = std::mem::take(&mut self.head_buf);
        let result = self.body(response, &rest[len..], now, observer);
        self.head_buf = rest;
        self.head_buf.clear();
        result
    }

    fn start_body(&mut self, response: &mut Response, head: Head) -> Result<(), Failure> {
        if head.status == 200 && !head.event_stream {
            // E.g. a JSON answer because the path lacks `?stream=true`.
            return Err(Failure::Protocol(
                "200 response is not text/event-stream".into(),
            ));
        }
        response.head = Some(head);
        if let Framing::Length(n) = head.framing {
            response.left = n;
            response.body_done = n == 0;
        }
        Ok(())
    }

    /// Undoes the transfer coding, feeds the SSE decoder, and handles the events.
    fn body(
        &mut self,
        response: &mut Response,
        bytes: &[u8],
        now: Instant,
        observer: &impl Observer,
    ) -> Result<(), Failure> {
        let head = response.head.expect("head parsed");
        match head.framing {
            Framing::Chunked => {
                let sse = &mut self.sse;
                self.chunked.decode(bytes, |data| sse.feed(data))?;
                response.body_done = self.chunked.is_done();
            }
            Framing::Length(_) => {
                let n = bytes
                    .len()
                    .min(usize::try_from(response.left).unwrap_or(usize::MAX));
                self.sse.feed(&bytes[..n]);
                response.left -= n as u64;
                response.body_done = response.left == 0;
            }
            Framing::UntilClose => self.sse.feed(bytes),
        }
        while let Some(event) = self
            .sse
            .next_event()
            .map_err(|e| Failure::Protocol(e.to_string()))?
        {
            if response.ended.is_some() {
                continue;
            }
            let kind = classify(&event.data)?;
            if head.status != 200 {
                if let Kind::Error(code) = kind {
                    response.ended = Some(Err(Failure::Status {
                        status: head.status,
                        code: Some(code),
                    }));
                }
                continue;
            }
            match kind {
                Kind::Token => {
                    response.tokens += 1;
                    match response.last_token {
                        None => observer.first_token(Instant::now()),
                        Some(last) => observer.token(now.saturating_duration_since(last)),
                    }
                    response.last_token = Some(now);
                }
                Kind::Done => {
                    response.ended = Some(Ok(Finished {
                        tokens: response.tokens,
                        total: now.saturating_duration_since(response.sent),
                    }));
                }
                Kind::Error(code) => response.ended = Some(Err(Failure::ErrorEvent(code))),
                Kind::Other => {}
            }
        }
        if response.body_done && response.ended.is_none() && head.status != 200 {
            response.ended = Some(Err(Failure::Status {
                status: head.status,
                code: None,
            }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_events() {
        assert_eq!(classify(r#"{"type":"token","token":"a"}"#), Ok(Kind::Token));
        assert_eq!(classify(r#"{"token":"a","type":"token"}"#), Ok(Kind::Token));
        assert_eq!(
            classify(r#"{"type":"done","queryId":"x","usage":{"completionTokens":3}}"#),
            Ok(Kind::Done)
        );
        assert_eq!(
            classify(r#"{"type":"error","code":"SLOW_CLIENT","message":"m"}"#),
            Ok(Kind::Error("SLOW_CLIENT".into()))
        );
        assert_eq!(classify(r#"{"type":"ping"}"#), Ok(Kind::Other));
        assert_eq!(classify(""), Ok(Kind::Other));
        assert!(matches!(classify("not json"), Err(Failure::Protocol(_))));
    }

    #[test]
    fn failures_name_their_kind() {
        let status = Failure::Status {
            status: 429,
            code: Some("QUOTA_EXCEEDED".into()),
        };
        assert_eq!(status.to_string(), "status 429 QUOTA_EXCEEDED");
        assert_eq!(Failure::Truncated.to_string(), "truncated stream");
        assert_eq!(
            Failure::ErrorEvent("UPSTREAM_ERROR".into()).to_string(),
            "error event UPSTREAM_ERROR"
        );
    }
}
