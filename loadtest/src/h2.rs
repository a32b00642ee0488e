//! `--h2c N`: asks as HTTP/2 streams with prior knowledge (h2c), multiplexed over N
//! connections that every ask of a run shares, round-robin.
//!
//! HTTP/2's framing, flow control and HPACK are not something to write again for a load
//! tool: this is hyper's client, which the server's crate builds anyway. What the tool
//! measures is the same as over HTTP/1.1: the TTFT clock starts just before the request is
//! handed to the connection, and every body frame is fed to askstream's own SSE decoder as
//! it arrives.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::client::{Failure, Target};

/// The run's HTTP/2 connections, each made when an ask first needs it, and made again
/// if the server closed it.
#[derive(Debug)]
pub(crate) struct Pool {
    conns: Vec<RefCell<Option<SendRequest<Full<Bytes>>>>>,
    next: Cell<usize>,
}

impl Pool {
    /// A pool of `n` connections (at least one).
    pub(crate) fn new(n: u32) -> Self {
        Pool {
            conns: (0..n.max(1)).map(|_| RefCell::new(None)).collect(),
            next: Cell::new(0),
        }
    }

    /// The next connection in turn, connecting it first if it is new or closed.
    pub(crate) async fn next(&self, addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let i = self.next.get();
        self.next.set((i + 1) % self.conns.len());
        let open = self.conns[i].borrow().clone().filter(|c| !c.is_closed());
        let mut conn = match open {
            Some(conn) => conn,
            None => {
                // Asks that find the slot empty at once each connect; the last one stays.
                let conn = handshake(addr).await?;
                *self.conns[i].borrow_mut() = Some(conn.clone());
                conn
            }
        };
        conn.ready()
            .await
            .map_err(|e| Failure::Protocol(format!("h2 connection: {e}")))?;
        Ok(conn)
    }
}

async fn handshake(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, Failure> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| Failure::Connect(e.kind()))?;
    tcp.set_nodelay(true)
        .map_err(|e| Failure::Connect(e.kind()))?;
    // askstream sends each token as its own small DATA frame. h2 (0.4.20 on) counts the
    // small frames a connection holds unread against a budget of half its receive window
    // and sends GOAWAY (ENHANCE_YOUR_CALM, "too_many_data_frames") past it: with hyper's
    // default 5 MiB window that is some 12,000 frames, which 64 streams of 256 tokens
    // exceed whenever the tool falls behind. A 256 MiB window makes it a million.
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_connection_window_size(256 << 20)
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| Failure::Protocol(format!("h2 handshake: {e}")))?;
    // The connection's own task: it ends when every `SendRequest` is dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// The streaming ask as an HTTP/2 request.
pub(crate) fn request(target: &Target, user: u64) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("http://{}{}", target.host, target.path))
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .header("authorization", format!("Bearer user-{user}"))
        .body(Full::new(Bytes::copy_from_slice(&target.body)))
        .expect("a request from valid parts")
}

/// Sends `req`; the response's status, whether it is an event stream, and its body.
pub(crate) async fn send(
    mut conn: SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> Result<(u16, bool, Incoming), Failure> {
    let res = conn
        .send_request(req)
        .await
        .map_err(|e| Failure::Protocol(format!("h2 request: {e}")))?;
    let event_stream = res
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    Ok((res.status().as_u16(), event_stream, res.into_body()))
}

/// The next data frame of `body`, or `None` at its end.
pub(crate) async fn next_data(body: &mut Incoming) -> Result<Option<Bytes>, Failure> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::Protocol(format!("h2 body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}
