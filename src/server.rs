//! The accept loop: sockets in, hyper connections out, and the shutdown sequence.
//!
//! Each accepted socket gets `TCP_NODELAY` (a token frame must not wait for Nagle),
//! TCP keepalive and `TCP_USER_TIMEOUT` (a peer that vanished without FIN or RST is found
//! and its ask refunded within `--dead-peer-secs`), then one task serving HTTP/1.1 or h2c
//! (prior knowledge), whichever the client speaks; or, with TLS, the handshake and then
//! whichever protocol ALPN chose.
//!
//! The protocol is chosen from the first bytes, read into the socket's read-ahead buffer
//! ([`peer`]), which hyper then reads before the socket: one read instead of a peek and a
//! read. (hyper-util's own detection replays them to hyper in a way that makes hyper's
//! HTTP/1 read buffer double to 16 KB for the connection's whole life: an idle stream's
//! largest single cost; see `Sniffed`.)

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::activity::Activity;
use crate::config::ServiceConfig;
use crate::peer;
use crate::service::AskService;
use crate::shutdown::Switch;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long connections get to flush their final events after the grace period, before
/// the server exits regardless.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Serves `listener` with `service` until `signal` resolves, then shuts down gracefully:
/// stop accepting and start draining; give answers in flight `--shutdown-grace-secs`;
/// then end the rest with `SHUTTING_DOWN` (refunded) and return.
pub async fn serve(listener: TcpListener, service: AskService, signal: impl Future<Output = ()>) {
    let config = service.config().clone();
    // Set when the accept loop ends: connections that have not sent a byte yet close, the
    // others finish the request in hand and close. (Not the service's drain: a service
    // drained while still accepting answers its health check with 503, so new connections
    // must still be served.) The service's own switch, because the service renders the
    // heads that must stop saying `keep-alive` then; connections reach it through
    // `Shared::service`.
    let closing = service.closing();
    let shared = Arc::new(Shared {
        protocols: Protocols::new(&config),
        service: service.clone(),
        deadlines: Deadlines {
            head: config.header_timeout,
            idle: config.idle_connection,
            slow_client: config.slow_client,
        },
    });
    if let Ok(addr) = listener.local_addr() {
        #[cfg(feature = "tls")]
        let tls = service.tls().is_some();
        #[cfg(not(feature = "tls"))]
        let tls = false;
        if tls {
            tracing::info!(%addr, "listening (TLS: h2 and HTTP/1.1 by ALPN)");
        } else {
            tracing::info!(%addr, "listening (HTTP/1.1 and h2c)");
        }
    }

    // On Linux an accepted socket inherits these options from its listener: set once,
    // they cost no system call per connection (six, otherwise, before the first byte).
    let inherited = cfg!(target_os = "linux") && tune(&SockRef::from(&listener), &config).is_ok();
    let mut signal = pin!(signal);
    // One permit per open connection (`--max-connections`): at the cap the loop waits
    // here, and the kernel's backlog holds new connections, instead of accepting sockets
    // it cannot serve (or running out of file descriptors). Holding them all again is
    // how the shutdown below knows every connection has closed.
    let all = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
    let connections = Arc::new(Semaphore::new(all as usize));
    loop {
        let permit = tokio::select! {
            biased;
            () = &mut signal => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        if !inherited {
            if let Err(e) = tune(&SockRef::from(&stream), &config) {
                tracing::debug!(%peer, error = %e, "could not tune socket");
            }
        }
        let shared = shared.clone();
        // Taken now: after a reload, connections accepted from then on get the new one.
        #[cfg(feature = "tls")]
        let tls = service.tls().map(|t| t.acceptor());
        // This task lives as long as its connection, and an async block keeps everything
        // it captured for its whole life: so it captures little (what all connections
        // share is one `Arc`), and builds the connection's service in place.
        tokio::spawn(async move {
            let _permit = &permit;
            #[cfg(feature = "tls")]
            if let Some(acceptor) = tls {
                // Boxed: a TLS session is large, and cleartext connections should not
                // carry room for one in their task.
                let served = Box::pin(serve_tls(acceptor, stream, peer, &shared)).await;
                if let Err(e) = served {
                    tracing::debug!(%peer, error = ?e, "connection ended with an error");
                }
                return;
            }
            let within = shared.deadlines.head;
            let Some((sniffed, first)) = sniff(&stream, within, shared.service.closing()).await
            else {
                return;
            };
            let (io, hangup) = peer::split(stream, first);
            let protocols = &shared.protocols;
            let service = || shared.service.with_peer(peer);
            let served: Result<(), BoxError> = match sniffed {
                // Inline: hyper's HTTP/1 connection is less than half the size of
                // hyper-util's enum over both protocols.
                Sniffed::Http1 => {
                    let service = service().watching(hangup);
                    serve_http1(
                        &protocols.http1,
                        TokioIo::new(io),
                        service,
                        shared.service.closing(),
                    )
                    .await
                    .map_err(Into::into)
                }
                // Boxed: h2 connections are few and long-lived.
                Sniffed::Http2 => {
                    drop(hangup);
                    let io = TokioIo::new(io);
                    Box::pin(serve_http2(
                        &protocols.http2,
                        io,
                        service(),
                        shared.service.closing(),
                        shared.deadlines,
                    ))
                    .await
                }
                // A split preface (hyper-util's detection) is rare.
                Sniffed::Unsure => {
                    drop(hangup);
                    let activity = Arc::new(Activity::default());
                    let service = service().counting(activity.clone());
                    let conn = protocols.unsure.serve_connection(TokioIo::new(io), service);
                    let d = shared.deadlines;
                    tokio::select! {
                        served = until_closed(Box::pin(conn), shared.service.closing(), |c| {
                            c.as_mut().graceful_shutdown();
                        }) => served,
                        () = activity.expired(d.head, d.idle, d.slow_client) => Ok(()),
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = ?e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    closing.set();
    service.shutdown().drain();
    let open = all as usize - connections.available_permits();
    tracing::info!(
        connections = open,
        answers = service.in_flight(),
        grace_secs = config.shutdown_grace.as_secs(),
        "shutting down: draining"
    );
    // The permits come back as connections close; the semaphore is never closed.
    let mut closed = pin!(connections.acquire_many(all));
    if tokio::time::timeout(config.shutdown_grace, &mut closed)
        .await
        .is_err()
    {
        tracing::warn!(
            answers = service.in_flight(),
            "grace period over: ending the answers still running"
        );
        service.shutdown().stop();
        if tokio::time::timeout(FINAL_FLUSH, &mut closed)
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close; exiting anyway");
        }
    }
    // Refunds happen in the answer tasks; let them land before returning, and reach a
    // shared quota store.
    service.shutdown().stop();
    let _ = tokio::time::timeout(FINAL_FLUSH, service.answers_finished()).await;
    if tokio::time::timeout(FINAL_FLUSH, service.flush_quota())
        .await
        .is_err()
    {
        tracing::warn!(
            "some settles and refunds did not reach the quota store; their leases will expire"
        );
    }
    tracing::info!("shut down");
}

/// What every connection task shares.
struct Shared {
    protocols: Protocols,
    /// The service, cloned for each connection with its peer.
    service: AskService,
    deadlines: Deadlines,
}

/// The deadlines a connection is held to: its first bytes (and, for h2, its first
/// request), idleness, and an h2 stream outliving its answer (see `Activity`).
#[derive(Clone, Copy)]
struct Deadlines {
    head: Duration,
    idle: Duration,
    slow_client: Duration,
}

/// Serves HTTP/1.1 on `io`. Its answers watch the socket themselves (`service` carries
/// the hangup): hyper stops reading it while a byte waits behind the request.
///
/// Not an `async fn`: the connection's task holds the returned future for the
/// connection's life, and an `async fn` would keep its arguments there as well.
fn serve_http1<'a, I>(
    http1: &http1::Builder,
    io: I,
    service: AskService,
    closing: &'a Switch,
) -> impl Future<Output = Result<(), hyper::Error>> + use<'a, I>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = http1.serve_connection(io, service);
    until_closed(conn, closing, |c| Pin::new(c).graceful_shutdown())
}

/// Serves HTTP/2 on `io`. hyper keeps no head deadline for h2 and no idle deadline at
/// all, so the connection's requests are counted and it is dropped when it has been
/// silent too long.
async fn serve_http2<I>(
    http2: &http2::Builder<TokioExecutor>,
    io: I,
    service: AskService,
    closing: &Switch,
    d: Deadlines,
) -> Result<(), BoxError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let conn = http2.serve_connection(io, service.counting(activity.clone()));
    tokio::select! {
        served = until_closed(conn, closing, |c| Pin::new(c).graceful_shutdown()) => {
            served.map_err(Into::into)
        }
        () = activity.expired(d.head, d.idle, d.slow_client) => Ok(()),
    }
}

/// Serves `conn` until it ends. Once `closing` is set, `shutdown` asks it to finish
/// the requests in hand and close (hyper's graceful shutdown), and it is served until it
/// has.
///
/// hyper-util's graceful watcher does the same with a watch channel, twice the state in
/// every connection's task; the closing switch and the accept loop's permits already say
/// what it says (see `serve`).
///
/// The switch's wait is polled once, to register the task's waker, and again only once
/// the switch is set: an HTTP/1 stream's task wakes for every frame, and a `select!`
/// polled the wait each time (a lock and a waker comparison per token). Between, each
/// wake asks the switch, one atomic load. A task's waker does not change, so the first
/// registration stands.
///
/// Not an `async fn`: one would keep `conn` twice, as its argument and as its local.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would store `conn` twice for the connection's life"
)]
fn until_closed<'a, C: Future + Unpin + 'a>(
    mut conn: C,
    closing: &'a Switch,
    shutdown: impl FnOnce(&mut C) + 'a,
) -> impl Future<Output = C::Output> + 'a {
    async move {
        {
            let mut cancelled = pin!(closing.wait());
            let mut registered = false;
            let served = poll_fn(|cx| {
                if let Poll::Ready(out) = Pin::new(&mut conn).poll(cx) {
                    return Poll::Ready(Some(out));
                }
                if !registered || closing.is_set() {
                    registered = true;
                    if cancelled.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                }
                Poll::Pending
            })
            .await;
            if let Some(out) = served {
                return out;
            }
        }
        shutdown(&mut conn);
        // By reference: awaiting `conn` itself would move it, and keep a second copy.
        (&mut conn).await
    }
}

/// A TLS connection: the handshake within the head deadline (a stalled one is dropped),
/// then HTTP/2 or HTTP/1.1 as ALPN chose. The answers' hangup watch sees the socket under
/// the TLS session.
#[cfg(feature = "tls")]
async fn serve_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    shared: &Shared,
) -> Result<(), BoxError> {
    let (io, hangup) = peer::split(stream, Vec::new());
    let handshake = tokio::select! {
        biased;
        () = shared.service.closing().wait() => return Ok(()),
        done = tokio::time::timeout(shared.deadlines.head, acceptor.accept(io)) => done,
    };
    let session = match handshake {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err("the TLS handshake did not complete in time".into()),
    };
    let service = shared.service.with_peer(peer);
    let protocols = &shared.protocols;
    if crate::tls::chose_h2(&session) {
        drop(hangup);
        let io = TokioIo::new(session);
        serve_http2(
            &protocols.http2,
            io,
            service,
            shared.service.closing(),
            shared.deadlines,
        )
        .await
    } else {
        let io = TokioIo::new(session);
        let service = service.watching(hangup);
        Ok(serve_http1(&protocols.http1, io, service, shared.service.closing()).await?)
    }
}

/// Waits for a connection's first bytes, reads what has arrived (at most
/// [`FIRST_READ`] bytes: a whole typical request) and says what it speaks. `None`: silent
/// for the whole header timeout (slowloris), closed before a byte, failed, or the accept
/// loop ended first; nothing to serve.
///
/// hyper's header timeout starts afresh once it reads, so a client whose first byte
/// comes just before this deadline has up to twice `--header-timeout-secs` for its head.
async fn sniff(stream: &TcpStream, within: Duration, stop: &Switch) -> Option<(Sniffed, Vec<u8>)> {
    let read = async {
        let mut first = Vec::new();
        loop {
            stream.readable().await?;
            // Only now: a connection that stays silent (slowloris) holds no buffer.
            first.reserve_exact(FIRST_READ);
            // A short read took all the socket held. Reported to the runtime as a
            // would-block, it clears the read readiness seen before the read, so hyper,
            // done with these bytes, waits for the next event instead of making a system
            // call that finds the socket empty. Bytes that arrive after the read are a
            // new event, which the clear does not touch. (`try_read_buf` is a `try_io` of
            // its own, which clears the readiness on a real would-block; this one is for
            // the short read. Reading the socket directly here instead would mean
            // initializing the buffer first, or `unsafe` to skip that.)
            let mut short = false;
            let read = stream.try_io(Interest::READABLE, || {
                let n = stream.try_read_buf(&mut first)?;
                short = n > 0 && n < FIRST_READ;
                if short {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            });
            match read {
                _ if short => return Ok(first),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                read => return read.map(|_| first),
            }
        }
    };
    tokio::select! {
        biased;
        () = stop.wait() => None,
        read = tokio::time::timeout(within, read) => match read {
            Ok(Ok(first)) if !first.is_empty() => Some((Sniffed::from_first_bytes(&first), first)),
            _ => None,
        },
    }
}

/// The most a connection's first read takes: a request head as clients send it, and an
/// h2 client's preface with its first frames. More stays in the socket for hyper.
const FIRST_READ: usize = 1024;

/// HTTP/2's connection preface: an h2c (prior knowledge) client's first 24 bytes.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's first bytes say it speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sniffed {
    Http1,
    Http2,
    /// The bytes so far are a strict prefix of the h2 preface (a client that split its
    /// first write): hyper-util reads until it knows. Rare, so its cost does not matter.
    Unsure,
}

impl Sniffed {
    /// Any byte that departs from the preface means HTTP/1 (`POST` differs at the second
    /// byte); the whole preface means h2.
    fn from_first_bytes(seen: &[u8]) -> Sniffed {
        let n = seen.len().min(H2_PREFACE.len());
        if seen[..n] != H2_PREFACE[..n] {
            Sniffed::Http1
        } else if n == H2_PREFACE.len() {
            Sniffed::Http2
        } else {
            Sniffed::Unsure
        }
    }
}

/// The connection builders, configured alike: hyper's own for a known protocol, and
/// hyper-util's detecting one (which reads and replays the first bytes) for a split h2
/// preface.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    unsure: auto::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(config: &ServiceConfig) -> Protocols {
        // hyper-util's builder wraps hyper's two but takes no finished ones, hence the
        // same settings twice.
        // A head that does not fit hyper's read buffer is refused with 431; the buffer
        // starts at 8 KiB whatever the cap, so the cap costs nothing until it is used.
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            .max_buf_size(config.max_header_bytes)
            .writev(false)
            // Every answer on these connections watches the socket for the client leaving
            // (`peer::Hangup`, which counts a half-close as leaving). With hyper's own
            // watch off, it stops polling the socket for end-of-file each time it wakes
            // to write a frame: a readiness check, a lock and a waker swap per token.
            // Between requests it reads as always. (`unsure` keeps hyper's watch: its
            // connections have no hangup.)
            .half_close(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        h2_settings(&mut http2, config);
        let mut unsure = auto::Builder::new(TokioExecutor::new());
        unsure
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            .max_buf_size(config.max_header_bytes)
            .writev(false);
        h2_settings(&mut unsure.http2(), config);
        Protocols {
            http1,
            http2,
            unsure,
        }
    }
}

/// HTTP/2's bounds: concurrent streams per connection, the header list's size, and
/// keep-alive pings every half `--dead-peer-secs` that drop a peer which does not answer
/// one in time (TCP keepalive alone cannot see a peer whose kernel still ACKs).
fn h2_settings<B: H2Settings>(b: &mut B, config: &ServiceConfig) {
    let half = (config.dead_peer / 2).max(Duration::from_secs(1));
    b.settings(
        config.max_streams_per_connection,
        u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX),
        half,
    );
}

/// The two HTTP/2 builders (hyper's and hyper-util's wrapper) take the same settings
/// through different types.
trait H2Settings {
    fn settings(&mut self, streams: u32, header_list: u32, ping_every: Duration);
}

impl H2Settings for http2::Builder<TokioExecutor> {
    fn settings(&mut self, streams: u32, header_list: u32, ping_every: Duration) {
        self.timer(TokioTimer::new())
            .max_concurrent_streams(streams)
            .max_header_list_size(header_list)
            .keep_alive_interval(ping_every)
            .keep_alive_timeout(ping_every);
    }
}

impl H2Settings for auto::Http2Builder<'_, TokioExecutor> {
    fn settings(&mut self, streams: u32, header_list: u32, ping_every: Duration) {
        self.timer(TokioTimer::new())
            .max_concurrent_streams(streams)
            .max_header_list_size(header_list)
            .keep_alive_interval(ping_every)
            .keep_alive_timeout(ping_every);
    }
}

/// Sets the per-socket options the contract requires (§1.1, §1.3), on an accepted socket
/// or on the listener its sockets inherit them from.
fn tune(sock: &SockRef<'_>, config: &ServiceConfig) -> io::Result<()> {
    sock.set_tcp_nodelay(true)?;
    let dead = config.dead_peer;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time((dead / 2).max(Duration::from_secs(1)))
        .with_interval((dead / 6).max(Duration::from_secs(1)))
        .with_retries(3);
    sock.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    sock.set_tcp_user_timeout(Some(dead))?;
    Ok(())
}

/// Accept errors are per-connection (the peer gave up) or resource exhaustion (out of
/// file descriptors). For the latter, back off so the loop does not spin.
async fn accept_failed(e: io::Error) {
    let exhausted =
        matches!(e.raw_os_error(), Some(23 | 24)) || e.kind() == io::ErrorKind::OutOfMemory;
    if exhausted {
        tracing::warn!(error = %e, "accept failed: out of resources; pausing 100 ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        tracing::debug!(error = %e, "accept failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_choose_the_protocol() {
        assert_eq!(Sniffed::from_first_bytes(b"POST /api"), Sniffed::Http1);
        assert_eq!(
            Sniffed::from_first_bytes(b"GET / HTTP/1.1\r\n"),
            Sniffed::Http1
        );
        assert_eq!(Sniffed::from_first_bytes(b"PRI * HTTP/1.1"), Sniffed::Http1);
        assert_eq!(Sniffed::from_first_bytes(b"P"), Sniffed::Unsure);
        assert_eq!(
            Sniffed::from_first_bytes(b"PRI * HTTP/2.0\r\n"),
            Sniffed::Unsure
        );
        assert_eq!(Sniffed::from_first_bytes(H2_PREFACE), Sniffed::Http2);
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(b"\0\0\x12\x04");
        assert_eq!(Sniffed::from_first_bytes(&more), Sniffed::Http2);
    }

    #[tokio::test]
    async fn accepted_sockets_are_tuned() {
        let config = ServiceConfig {
            dead_peer: Duration::from_secs(12),
            ..ServiceConfig::default()
        };
        let accept = async |tune_listener: bool| {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            if tune_listener {
                tune(&SockRef::from(&listener), &config).unwrap();
            }
            let addr = listener.local_addr().unwrap();
            let client = TcpStream::connect(addr).await.unwrap();
            (listener.accept().await.unwrap().0, client)
        };
        // Tuned once accepted (any OS)...
        let (server, _client) = accept(false).await;
        tune(&SockRef::from(&server), &config).unwrap();
        assert_tuned(&server);
        // ...or through the listener, as `serve` does on Linux.
        #[cfg(target_os = "linux")]
        {
            let (server, _client) = accept(true).await;
            assert_tuned(&server);
        }
    }

    fn assert_tuned(server: &TcpStream) {
        assert!(server.nodelay().unwrap());
        let sock = SockRef::from(server);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(6));
        #[cfg(target_os = "linux")]
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(12))
        );
    }
}
