//! Memory for an answer is returned when the answer ends (contract §1.3, "no stream
//! outlives its answer"), counted in live heap bytes rather than RSS.
//!
//! RSS cannot show this: the allocator keeps freed pages for reuse, so a server's RSS after
//! a burst stays above its idle level however well it frees (the soak measures RSS, and
//! checks it does not grow). This binary installs [`Counting`], a global allocator that
//! keeps one process-wide count of the bytes allocated and not yet freed, and runs the real
//! server in-process on a real socket. A burst of streams, over HTTP/1.1 and HTTP/2, many
//! of them left early by their clients, is run three times; once the first burst has grown
//! every buffer and table to its high-water mark, the heap must return after each later
//! burst to where it was: any byte an answer kept would show here, multiplied by the
//! burst's size.
#![allow(unsafe_code)]

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{RawConn, TestServer, config_with_limit, stream_ask_request};
use tokio::io::AsyncWriteExt;

/// Forwards to [`System`] and keeps the count of live bytes.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the only other work is an atomic add, which neither allocates
// nor touches the memory being managed.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller guarantees `layout` has non-zero size, as `System.alloc` requires.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`: the caller's non-zero-size `layout` is passed on unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `ptr` was allocated by this allocator — so by
        // `System`, since every block here comes from it — with `layout`, and that
        // `new_size` is valid for that layout's alignment.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller guarantees `ptr` was allocated by this allocator (so by
        // `System`) with `layout`, and is not used again.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The count is process-wide, so the tests of this binary take turns: one test's server
/// would be in the other's figures.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(30);
/// Streams in one burst, half on each protocol.
const BURST: usize = 200;
/// The users every burst charges, so the quota table holds the same entries each time.
const USERS: usize = 8;

/// One HTTP/1.1 streaming ask on its own connection; the client leaves after `read`
/// chunks of the body (0: as soon as the request is sent), or reads it all.
async fn h1_ask(addr: SocketAddr, user: &str, read: Option<usize>) {
    let mut c = RawConn::connect(addr).await;
    c.send(stream_ask_request("How do quota refunds work?", user).as_bytes())
        .await;
    match read {
        Some(0) => {}
        Some(n) => {
            let head = c.read_head().await;
            assert_eq!(head.status, 200);
            for _ in 0..n {
                if c.read_chunk().await.is_none_or(|chunk| chunk.is_empty()) {
                    break;
                }
            }
        }
        None => {
            let head = c.read_head().await;
            assert_eq!(head.status, 200);
            let (_, ended) = c.read_chunked_body().await;
            assert!(ended, "a stream read to its end ends cleanly");
        }
    }
    let _ = c.stream.shutdown().await;
}

/// `n` streaming asks multiplexed on one HTTP/2 connection; stream `i` is dropped (reset)
/// after `i % 4` body frames, or read to its end when that is 3.
async fn h2_asks(addr: SocketAddr, n: usize) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let driver = tokio::spawn(conn);
    let mut asks = Vec::new();
    for i in 0..n {
        let mut send = send.clone();
        asks.push(tokio::spawn(async move {
            let body = support::ask_body("How do quota refunds work?");
            let req = http::Request::post(format!("http://{addr}/api/v1/ai/ask?stream=true"))
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer mem-user-{}", i % USERS))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            send.ready().await.expect("h2 connection ready");
            let res = send.send_request(req).await.expect("h2 response");
            assert_eq!(res.status(), 200);
            let mut body = res.into_body();
            let frames = i % 4;
            for _ in 0..frames {
                if body.frame().await.is_none() {
                    break;
                }
            }
            if frames == 3 {
                while let Some(f) = body.frame().await {
                    f.expect("the stream ends cleanly");
                }
            }
        }));
    }
    for a in asks {
        a.await.unwrap();
    }
    drop(send);
    driver.abort();
}

async fn burst(server: &TestServer) {
    let addr = server.addr;
    let mut clients = Vec::new();
    for i in 0..BURST / 2 {
        let user = format!("mem-user-{}", i % USERS);
        let read = match i % 4 {
            0 => Some(0),
            1 => Some(1),
            2 => Some(3),
            _ => None,
        };
        clients.push(tokio::spawn(async move { h1_ask(addr, &user, read).await }));
    }
    clients.push(tokio::spawn(h2_asks(addr, BURST / 2)));
    for c in clients {
        tokio::time::timeout(WAIT, c)
            .await
            .expect("the burst's clients finish")
            .unwrap();
    }
    // Every answer has ended (settled or refunded) and every connection is closed.
    server.settled().await;
    let closed = tokio::time::timeout(WAIT, async {
        while support::metric(addr, "askstream_active_streams").await > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "no stream outlives the burst");
}

/// The live heap once the server is idle: read after it stopped changing, because the
/// runtime frees some things (closed connections' registrations, finished tasks) lazily,
/// on its next turn.
async fn idle_heap() -> i64 {
    let mut last = LIVE.load(Ordering::Relaxed);
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = LIVE.load(Ordering::Relaxed);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heap_returns_to_its_level_after_every_burst_of_streams() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut config = config_with_limit(1_000_000);
    support::sim(&mut config).ttft = Duration::ZERO;
    support::sim(&mut config).token_interval = Duration::from_millis(2);
    support::sim(&mut config).tokens = 24;
    let server = TestServer::start(config).await;
    let before = idle_heap().await;

    burst(&server).await;
    let first = idle_heap().await;
    let mut after = Vec::new();
    for _ in 0..2 {
        burst(&server).await;
        after.push(idle_heap().await);
    }
    eprintln!(
        "live heap: fresh {before} B; after burst 1 {first} B; after bursts 2 and 3 {after:?} B"
    );
    for (i, level) in after.iter().enumerate() {
        // Seen here: within 100 B. The slack is for the test's own bookkeeping (task
        // handles, the metrics text); 20 bytes kept per answer would exceed it, and an
        // answer's buffers are KiBs.
        assert!(
            level - first < 4 * 1024,
            "burst {}: the heap grew from {first} B to {level} B",
            i + 2
        );
    }
}

/// What one open, idle stream holds on the heap (the server's side and this test's client
/// together), printed for the README's breakdown of workload C; and all of it is returned
/// when the streams close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_holds_a_bounded_heap_and_returns_it() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const OPEN: usize = 200;
    let mut config = config_with_limit(1_000_000);
    support::sim(&mut config).ttft = Duration::ZERO;
    support::sim(&mut config).token_interval = Duration::from_secs(3600);
    support::sim(&mut config).tokens = 10;
    config.heartbeat = Duration::from_secs(3600);
    let server = TestServer::start(config).await;
    // One stream first, so lazily made tables exist before the baseline.
    let mut warm = RawConn::connect(server.addr).await;
    warm.start_stream("How do quota refunds work?", "mem-open")
        .await;
    drop(warm);
    server.settled().await;
    let before = idle_heap().await;

    let mut conns = Vec::new();
    for _ in 0..OPEN {
        let mut c = RawConn::connect(server.addr).await;
        c.start_stream("How do quota refunds work?", "mem-open")
            .await;
        assert!(
            c.read_chunk().await.is_some_and(|t| !t.is_empty()),
            "a first token"
        );
        conns.push(c);
    }
    let open = idle_heap().await;
    let per_stream = (open - before) / OPEN as i64;
    eprintln!("live heap per open stream (server and test client): {per_stream} B");
    assert!(per_stream > 0);

    drop(conns);
    server.settled().await;
    let after = idle_heap().await;
    assert!(
        after - before < 4 * 1024,
        "the heap went from {before} B to {after} B after the streams closed"
    );
}
