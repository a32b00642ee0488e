//! Heap allocations on the per-token path, counted by a global allocator.
//!
//! The server's budget (contract §6.2) leaves no room for an allocation per token event: the
//! sim encodes each passage's frames once ([`Token::batch`]) and keeps them, and from then
//! on a token is two reference-count bumps on its way from the generator, through the
//! [`channel`], to the [`SseBody`] that hands it to hyper. These tests hold the code to
//! that by counting what it asks of the allocator.
//!
//! # How allocations are counted
//!
//! This binary installs [`Counting`] as its global allocator. It forwards every call to
//! [`System`] and bumps a counter kept **per thread** (a `const`-initialised thread-local
//! `Cell`, which needs no lazy initialisation, no destructor and hence no allocation of its
//! own). [`count`] reads the calling thread's counters before and after a closure.
//!
//! Per-thread counters make the tests independent of each other without a lock: the test
//! harness runs each test on its own thread, and everything measured here runs on the
//! calling thread — the streams are polled by hand with [`Waker::noop`], so no runtime, no
//! timer and no other thread is involved. An allocation made elsewhere could not be
//! attributed to the code under test anyway.
//!
//! An allocation is a call to `alloc` or `alloc_zeroed`; a `realloc` (growing a buffer in
//! place or by moving it) is counted separately, since a fresh block and a grown one cost
//! differently and the sim's batch encoding does both.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use askstream::pipeline::bm25::Bm25Index;
use askstream::pipeline::sim::{SimConfig, SimGenerator};
use askstream::pipeline::{Chunk, Generator, Prompt, Token, TokenStream};
use askstream::sse::body::{SseBody, SseSender, channel};
use http_body::Body;

/// Forwards to [`System`], counting calls on the calling thread.
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static REALLOCS: Cell<u64> = const { Cell::new(0) };
}

/// Adds one to a thread's counter. `try_with`, because the allocator may be called while
/// the thread's locals are being torn down; those calls are simply not counted.
fn bump(counter: &'static std::thread::LocalKey<Cell<u64>>) {
    let _ = counter.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the only other work is a thread-local counter update, which does
// not allocate and does not touch the memory being managed.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump(&ALLOCS);
        // SAFETY: the caller guarantees `layout` has non-zero size, as `System.alloc` requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump(&ALLOCS);
        // SAFETY: as for `alloc`: the caller's non-zero-size `layout` is passed on unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump(&REALLOCS);
        // SAFETY: the caller guarantees `ptr` was allocated by this allocator — which means
        // by `System`, since every block here comes from it — with `layout`, and that
        // `new_size` is valid for that layout's alignment.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller guarantees `ptr` was allocated by this allocator (so by
        // `System`) with `layout`, and is not used again.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What the calling thread asked of the allocator while a closure ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counts {
    allocs: u64,
    reallocs: u64,
}

/// Runs `f` and counts the allocator calls it made on this thread.
fn count<R>(f: impl FnOnce() -> R) -> (R, Counts) {
    let read = || (ALLOCS.with(Cell::get), REALLOCS.with(Cell::get));
    let (a0, r0) = read();
    let out = f();
    let (a1, r1) = read();
    let counts = Counts {
        allocs: a1 - a0,
        reallocs: r1 - r0,
    };
    (out, counts)
}

/// The sim's answer to a real question over the built-in corpus, as the server builds it.
fn sim_stream(tokens: u32) -> TokenStream {
    let query = "how are quotas refunded";
    let passages = Bm25Index::builtin().search(query, 4);
    assert!(
        !passages.is_empty(),
        "the built-in corpus answers the query"
    );
    let sim = SimGenerator::new(SimConfig {
        ttft: Duration::ZERO,
        token_interval: Duration::ZERO,
        tokens,
    });
    sim.generate(Prompt {
        query: query.into(),
        passages: Arc::from(passages),
    })
}

/// One token event end to end, as the server moves it: pull the token from the generator,
/// queue its frame, and let the body yield it. Allocates nothing itself on success; on a
/// broken expectation it panics, which fails the test anyway.
fn one_token(stream: &mut TokenStream, tx: &SseSender, body: &mut SseBody, cx: &mut Context<'_>) {
    let token = match stream.as_mut().poll_next(cx) {
        Poll::Ready(Some(Ok(Chunk::Token(t)))) => t,
        other => panic!("the unpaced sim has a token ready: {other:?}"),
    };
    if tx.try_send(token.frame().clone()).is_err() {
        panic!("the channel has room: the body drains every frame");
    }
    match Pin::new(body).poll_frame(cx) {
        Poll::Ready(Some(Ok(frame))) => {
            let sent = frame.into_data().ok();
            assert!(
                sent.as_ref() == Some(token.frame()),
                "the body yields the frame"
            );
        }
        _ => panic!("the body yields the queued frame at once"),
    }
}

/// Counts the allocator calls for tokens `from..n` (0-based) of an `n`-token sim answer
/// sent through a `channel(capacity)`, one token at a time. Setup and tokens `..from` are
/// excluded; `from` must be at least 1, so the first-ever uses of thread-locals and of the
/// channel's first slot are never counted.
fn token_path(n: u32, from: u32, capacity: usize) -> Counts {
    assert!(from >= 1 && from <= n);
    let mut cx = Context::from_waker(Waker::noop());
    let mut stream = sim_stream(n);
    let (tx, mut body) = channel(capacity);
    for _ in 0..from {
        one_token(&mut stream, &tx, &mut body, &mut cx);
    }
    let ((), counts) = count(|| {
        for _ in from..n {
            one_token(&mut stream, &tx, &mut body, &mut cx);
        }
    });
    counts
}

/// The server's default `--stream-buffer`.
const STREAM_BUFFER: usize = 64;

/// The requirement, as stated: after setup and the first token, not one
/// allocation for the rest of the answer, however long. (With tokio's `mpsc` this failed
/// once per stream: its 32-slot blocks made the 33rd frame of every stream allocate.
/// The channel now starts with a few slots and grows only when a client falls behind.)
#[test]
fn sim_token_path_allocates_nothing_after_the_first_token() {
    for n in [2, 32, 33, 64, 1024, 4096] {
        let counts = token_path(n, 1, STREAM_BUFFER);
        assert_eq!(counts.allocs + counts.reallocs, 0, "{n} tokens: {counts:?}");
    }
}

/// Zero allocations per token event in steady state: 960 token events, each pulled from
/// the sim, queued and yielded by the body, allocate nothing.
#[test]
fn sim_token_path_allocates_nothing_per_token_in_steady_state() {
    let counts = token_path(1024, 64, STREAM_BUFFER);
    assert_eq!(
        counts,
        Counts {
            allocs: 0,
            reallocs: 0
        }
    );
}

/// A client that falls behind: the generator fills the whole buffer, then the body drains
/// it, round after round. The first round grows the queue to the buffer's size; the
/// rounds after it allocate nothing.
#[test]
fn a_full_default_buffer_turns_over_without_allocating() {
    let mut cx = Context::from_waker(Waker::noop());
    let mut stream = sim_stream(64 * 10);
    let (tx, mut body) = channel(STREAM_BUFFER);
    let mut round = || {
        let tokens: [Token; STREAM_BUFFER] =
            std::array::from_fn(|_| match stream.as_mut().poll_next(&mut cx) {
                Poll::Ready(Some(Ok(Chunk::Token(t)))) => t,
                other => panic!("the unpaced sim has a token ready: {other:?}"),
            });
        for t in &tokens {
            assert!(
                tx.try_send(t.frame().clone()).is_ok(),
                "the buffer has room"
            );
        }
        for t in &tokens {
            let yielded = match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
                _ => None,
            };
            assert!(
                yielded.as_ref() == Some(t.frame()),
                "frames arrive in order"
            );
        }
    };
    round();
    let ((), counts) = count(|| {
        for _ in 2..10 {
            round();
        }
    });
    assert_eq!(
        counts,
        Counts {
            allocs: 0,
            reallocs: 0
        }
    );
}

/// The same with a buffer much larger than the default. (tokio's `mpsc` failed this: it
/// freed and reallocated its 32-slot blocks when more than about 96 frames were queued.)
#[test]
fn a_full_large_buffer_turns_over_without_allocating() {
    const BUFFER: usize = 256;
    let mut cx = Context::from_waker(Waker::noop());
    let (tx, mut body) = channel(BUFFER);
    let frame = askstream::wire::token(" north");
    let mut round = || {
        for _ in 0..BUFFER {
            assert!(tx.try_send(frame.clone()).is_ok(), "the buffer has room");
        }
        for _ in 0..BUFFER {
            let yielded = Pin::new(&mut body).poll_frame(&mut cx);
            assert!(
                matches!(yielded, Poll::Ready(Some(Ok(_)))),
                "a frame is ready"
            );
        }
    };
    round();
    let ((), counts) = count(|| {
        for _ in 0..8 {
            round();
        }
    });
    assert_eq!(counts.allocs + counts.reallocs, 0, "{counts:?}");
}

/// `Token::batch` makes the same number of fresh allocations for any number of tokens.
///
/// The 4, for any count: the frame buffer, the list of token ends, the output `Vec`, and
/// the frame buffer's shared reference-count header when it is frozen and sliced into
/// tokens. With any text that escaping changes, 2 more: the buffer for those texts, and
/// its header. All are sized up front (a frame is its text plus a 35-byte envelope, and
/// one byte per token is reserved for escapes), so nothing is reallocated: these words
/// need fewer escapes than that slack.
#[test]
fn token_batch_allocates_a_constant_number_of_buffers() {
    let words = [
        "The",
        " north",
        " wind",
        " \"quoted\"",
        " é",
        " 日本語",
        " tab\t",
    ];
    for n in [1usize, 2, 64, 1000, 10_000] {
        let texts: Vec<&str> = (0..n).map(|i| words[i % words.len()]).collect();
        let (tokens, counts) = count(|| Token::batch(texts.iter().copied()));
        assert_eq!(tokens.len(), n);
        let escapes = texts.iter().any(|t| t.contains(['"', '\t']));
        let expected = if escapes { 6 } else { 4 };
        assert_eq!(counts.allocs, expected, "{n} tokens: {counts:?}");
        assert_eq!(counts.reallocs, 0, "{n} tokens: {counts:?}");
    }
}
