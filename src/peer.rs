//! A connection's socket, shared between hyper and the answer it is serving, so a client
//! that leaves is seen even when hyper is not reading (HTTP/1); and the bytes read to
//! choose the protocol, which hyper reads first (every protocol).
//!
//! hyper notices a closed HTTP/1 connection mid-answer by reading from the socket, but only
//! while its read buffer is empty. A byte behind the request (a stray CRLF, a pipelined
//! request) stays in that buffer until the answer ends, so hyper stops reading and the
//! client's FIN or RST goes unseen until the next write fails: a JSON answer is charged
//! although nothing was delivered, and an idle stream runs on (contract §1.3).
//!
//! So the socket is hyper's IO through [`PeerIo`], and an answer in flight watches the same
//! socket's readiness through a [`Hangup`]. A FIN or RST ends the answer at once. Bytes the
//! client sends meanwhile are read ahead into a small buffer that hyper reads first, so
//! their readiness can be cleared and the next event seen; no byte is lost or reordered.
//! Once the hangup is seen, the connection's writes fail, so hyper closes it rather than
//! serve the requests the client left behind. Since the watch sees every hang-up,
//! hyper's own is off (`half_close`) on the connections that have one: hyper then reads
//! only between requests, not each time it wakes to write.
//!
//! The socket has one registration with the runtime: hyper's writes use its writer slot
//! (`poll_write_ready`), and its reader slot (`poll_read_ready`) serves hyper's reads and
//! the watch in turn, never together: hyper reads a request and, with `half_close` on,
//! not again until its response has ended; the watch lives in the answer, which starts
//! after the request was read and is gone before the response ends. So the watch needs
//! no waiter of its own, nor a future: it is polled in place, and every open answer is
//! that much smaller.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// At most this many bytes are read ahead of hyper; past it, the watch stops and the
/// hangup is found at the next write, as without it. (A client does not send a request
/// this large while its previous answer is streaming, unless it means harm.)
const READ_AHEAD: usize = 8 * 1024;

/// Splits an accepted socket into hyper's IO and the connection's hangup watch; `first`
/// is what was read from it already, which hyper reads first.
pub(crate) fn split(stream: TcpStream, first: Vec<u8>) -> (PeerIo, Hangup) {
    let shared = Arc::new(Shared {
        stream,
        ahead: Mutex::new(first),
        hung_up: AtomicBool::new(false),
    });
    (PeerIo(shared.clone()), Hangup(shared))
}

struct Shared {
    stream: TcpStream,
    /// Bytes read from the socket that hyper has not read yet. Locked across every read
    /// from the socket, so the bytes reach hyper in order.
    ahead: Mutex<Vec<u8>>,
    /// The watch saw the peer leave: writes fail from now on.
    hung_up: AtomicBool,
}

impl Shared {
    fn ahead(&self) -> MutexGuard<'_, Vec<u8>> {
        // The lock guards plain bytes and no code under it panics, but a poisoned lock
        // still holds valid bytes.
        self.ahead.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One write, as `write` does it once the socket is writable; refused once the
    /// client hung up.
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            if self.hung_up.load(Ordering::Relaxed) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the client hung up",
                )));
            }
            ready!(self.stream.poll_write_ready(cx))?;
            match write(&self.stream) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }
}

/// The socket as hyper's IO (through `TokioIo`): reads take the bytes read ahead first.
pub(crate) struct PeerIo(Arc<Shared>);

impl AsyncRead for PeerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = &*self.0;
        let mut ahead = shared.ahead();
        loop {
            if !ahead.is_empty() {
                let n = ahead.len().min(buf.remaining());
                buf.put_slice(&ahead[..n]);
                if n == ahead.len() {
                    // Most connections have their first bytes here and nothing after:
                    // give the memory back.
                    *ahead = Vec::new();
                } else {
                    ahead.drain(..n);
                }
                return Poll::Ready(Ok(()));
            }
            // Polled under the lock: the watch reads ahead only after a readiness event,
            // and that event also wakes the waker registered here.
            ready!(shared.stream.poll_read_ready(cx))?;
            match shared.stream.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done.map(drop)),
            }
        }
    }
}

impl AsyncWrite for PeerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write_with(cx, |s| s.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write_with(cx, |s| s.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shut = socket2::SockRef::from(&self.0.stream).shutdown(std::net::Shutdown::Write);
        Poll::Ready(match shut {
            // The peer is gone already: the shutdown has nothing left to do.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

/// Watches an HTTP/1 connection for its client leaving. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub(crate) struct Hangup(Arc<Shared>);

impl std::fmt::Debug for Hangup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hangup")
            .field("hung_up", &self.0.hung_up.load(Ordering::Relaxed))
            .finish()
    }
}

impl Hangup {
    /// Ready once the client has closed its side of the connection (FIN or RST), and
    /// from then on the connection's writes are refused. A half-close counts as leaving,
    /// as it does for hyper by default: hyper's own watch is off on these connections, so
    /// this one decides. Bytes the client sends meanwhile are read ahead; once the
    /// read-ahead is full, this stays pending without registering (the hangup is found
    /// at the next write), and a later poll, after hyper has taken bytes, watches again.
    ///
    /// Registers `cx` in the socket's reader slot, which is the watch's while an answer
    /// runs (see the module's doc).
    pub(crate) fn poll_hung_up(&self, cx: &mut Context<'_>) -> Poll<()> {
        let shared = &*self.0;
        loop {
            if shared.hung_up.load(Ordering::Relaxed) {
                return Poll::Ready(());
            }
            match shared.stream.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => break,
                Poll::Ready(Ok(())) => {}
            }
            match self.read_ahead() {
                // The socket would block, which cleared its readiness: poll again to
                // register for the next event.
                Ahead::Drained => continue,
                Ahead::Closed => break,
                // Bounded: not registered, so polled again only when something else
                // wakes the answer.
                Ahead::Full => return Poll::Pending,
            }
        }
        shared.hung_up.store(true, Ordering::Relaxed);
        Poll::Ready(())
    }

    /// [`poll_hung_up`](Self::poll_hung_up) as a future.
    #[cfg(test)]
    pub(crate) async fn hung_up(&self) {
        std::future::poll_fn(|cx| self.poll_hung_up(cx)).await
    }

    /// Moves the bytes waiting in the socket into the read-ahead buffer, until the socket
    /// would block (which clears its readiness) or the buffer is full.
    fn read_ahead(&self) -> Ahead {
        let shared = &*self.0;
        let mut ahead = shared.ahead();
        loop {
            if ahead.len() >= READ_AHEAD {
                return Ahead::Full;
            }
            let room = READ_AHEAD - ahead.len();
            ahead.reserve(room);
            match shared.stream.try_read_buf(&mut (&mut *ahead).limit(room)) {
                Ok(0) => return Ahead::Closed,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ahead::Drained,
                Err(_) => return Ahead::Closed,
            }
        }
    }
}

enum Ahead {
    /// Nothing more in the socket for now.
    Drained,
    /// The peer closed (or the socket failed).
    Closed,
    /// The read-ahead buffer is full.
    Full,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, PeerIo, Hangup) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (io, hangup) = split(server, Vec::new());
        (client, io, hangup)
    }

    #[tokio::test]
    async fn bytes_read_ahead_reach_the_reader_in_order_and_the_hangup_is_seen() {
        let (mut client, mut io, hangup) = pair().await;
        client.write_all(b"first ").await.unwrap();
        let mut got = vec![0; 6];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"first ");

        // While nobody reads, the watch takes what arrives and waits on.
        let watch = tokio::spawn({
            let hangup = hangup.clone();
            async move { hangup.hung_up().await }
        });
        client.write_all(b"second ").await.unwrap();
        client.write_all(b"third").await.unwrap();
        let wait_for_ahead = async {
            while hangup.0.ahead().len() < 12 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), wait_for_ahead)
            .await
            .expect("the watch reads ahead");
        assert!(!watch.is_finished());

        drop(client);
        tokio::time::timeout(std::time::Duration::from_secs(10), watch)
            .await
            .expect("the hangup is seen")
            .unwrap();
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"second third");
        let refused = io.write_all(b"late").await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test]
    async fn the_first_bytes_come_before_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (mut io, _hangup) = split(server, b"POST / HT".to_vec());
        client.write_all(b"TP/1.1\r\n").await.unwrap();
        drop(client);
        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"POST / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn a_full_read_ahead_loses_no_byte_and_is_watched_again_once_taken() {
        let (mut client, mut io, hangup) = pair().await;
        let sent: Vec<u8> = (0..READ_AHEAD * 2).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).await.unwrap();
        // Poll the watch until it stops at the bound, still pending.
        let stopped = async {
            loop {
                hangup.0.stream.readable().await.unwrap();
                let polled = std::future::poll_fn(|cx| Poll::Ready(hangup.poll_hung_up(cx))).await;
                assert!(polled.is_pending(), "the client has not left");
                if hangup.0.ahead().len() >= READ_AHEAD {
                    return;
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), stopped)
            .await
            .expect("the read-ahead fills");
        assert_eq!(
            hangup.0.ahead().len(),
            READ_AHEAD,
            "the read-ahead is bounded"
        );
        // The reader (hyper, between asks) takes everything, then the client leaves:
        // a later poll must watch the socket again and see it.
        let mut got = vec![0; sent.len()];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(got, sent, "every byte reaches the reader, in order");
        drop(client);
        tokio::time::timeout(std::time::Duration::from_secs(10), hangup.hung_up())
            .await
            .expect("the hangup is seen after the read-ahead was full");
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "no byte is read twice");
        let refused = io.write_all(b"late").await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionAborted);
    }
}
