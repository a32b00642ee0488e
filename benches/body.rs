//! What it costs to move frames from the producer to hyper through the SSE body
//! (`askstream::sse::body`).
//!
//! Groups:
//! - `send_poll`: the per-token hand-off with nothing else around it: `try_send` a frame,
//!   then poll `SseBody::poll_frame` (with a no-op waker, as hyper would poll it from its
//!   connection task), one frame at a time and in bursts of 64 (the default buffer, filled
//!   then drained, as when hyper writes a backlog in one go). The channel is reused, so
//!   this is the steady state (see `tests/alloc.rs` for its allocations).
//! - `answer`: a whole 64-token answer and its `done` frame, on a current-thread tokio
//!   runtime: a producer task sends, the consumer (standing in for hyper) reads every frame
//!   until the body ends, and the producer waits for delivery. Once with prebuilt frames
//!   (the channel and task wake-ups alone), once with the sim generator making the answer
//!   (what one answer costs without HTTP).
//!
//! Run: `cargo bench -p askstream --bench body`.

use std::future::poll_fn;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use askstream::pipeline::bm25::Bm25Index;
use askstream::pipeline::sim::{SimConfig, SimGenerator};
use askstream::pipeline::{Chunk, Generator, Prompt};
use askstream::sse::body::{SseBody, SseSender, TrySendError, channel};
use askstream::wire;
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use http_body::Body;
use http_body_util::BodyExt;
use serde_json::json;

/// The server's default `--stream-buffer`.
const STREAM_BUFFER: usize = 64;
const TOKENS: u32 = 64;

/// Polls the body once and returns the frame it yields, which must be ready.
fn poll_ready(body: &mut SseBody, cx: &mut Context<'_>) -> Bytes {
    match Pin::new(body).poll_frame(cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => panic!("a queued frame is ready"),
    }
}

fn send_poll(c: &mut Criterion) {
    let frame = wire::token(" north");
    let mut cx = Context::from_waker(Waker::noop());
    let mut group = c.benchmark_group("send_poll");

    let (tx, mut body) = channel(STREAM_BUFFER);
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_frame", |b| {
        b.iter(|| {
            assert!(tx.try_send(black_box(frame.clone())).is_ok());
            black_box(poll_ready(&mut body, &mut cx));
        });
    });

    let (tx, mut body) = channel(STREAM_BUFFER);
    group.throughput(Throughput::Elements(STREAM_BUFFER as u64));
    group.bench_function(BenchmarkId::new("burst", STREAM_BUFFER), |b| {
        b.iter(|| {
            for _ in 0..STREAM_BUFFER {
                assert!(tx.try_send(black_box(frame.clone())).is_ok());
            }
            for _ in 0..STREAM_BUFFER {
                black_box(poll_ready(&mut body, &mut cx));
            }
        });
    });
    group.finish();
}

/// Queues a frame as the server's per-ask driver does: at once if there is room,
/// otherwise waiting for the consumer.
async fn send(tx: &SseSender, frame: Bytes) {
    if let Err(TrySendError::Full(frame)) = tx.try_send(frame) {
        tx.send(frame).await.expect("the consumer reads to the end");
    }
}

/// Reads the body to its end, as hyper would; returns the bytes it carried.
async fn consume(mut body: SseBody) -> usize {
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        len += frame.map_or(0, |f| f.into_data().map_or(0, |d| d.len()));
    }
    len
}

fn answer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    let query = "how are quotas refunded";
    let prompt = Prompt {
        query: query.into(),
        passages: Arc::from(Bm25Index::builtin().search(query, 4)),
    };
    let sim = Arc::new(SimGenerator::new(SimConfig {
        ttft: Duration::ZERO,
        token_interval: Duration::ZERO,
        tokens: TOKENS,
    }));
    let frames: Arc<[Bytes]> = (0..TOKENS)
        .map(|i| wire::token(&format!(" word{i}")))
        .collect();
    let done = wire::data(&json!({"type": "done", "quotaRemaining": 3}));

    let mut group = c.benchmark_group("answer");
    group.throughput(Throughput::Elements(u64::from(TOKENS) + 1));
    group.bench_function("prebuilt_frames_64", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (tx, body) = channel(STREAM_BUFFER);
                let (frames, done) = (frames.clone(), done.clone());
                let producer = tokio::spawn(async move {
                    for frame in frames.iter() {
                        send(&tx, frame.clone()).await;
                    }
                    tx.finish(done).await
                });
                let len = consume(body).await;
                assert_eq!(producer.await.ok(), Some(Ok(())));
                len
            })
        });
    });
    group.bench_function("sim_64", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (tx, body) = channel(STREAM_BUFFER);
                let (sim, prompt, done) = (sim.clone(), prompt.clone(), done.clone());
                let producer = tokio::spawn(async move {
                    let mut tokens = sim.generate(prompt);
                    while let Some(chunk) = poll_fn(|cx| tokens.as_mut().poll_next(cx)).await {
                        if let Ok(Chunk::Token(token)) = chunk {
                            send(&tx, token.frame().clone()).await;
                        }
                    }
                    tx.finish(done).await
                });
                let len = consume(body).await;
                assert_eq!(producer.await.ok(), Some(Ok(())));
                len
            })
        });
    });
    group.finish();
}

// `criterion_group!` would define an undocumented `pub fn`, which the crate's
// `missing_docs` lint rejects; this is what it and `criterion_main!` expand to.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    send_poll(&mut c);
    answer(&mut c);
    c.final_summary();
}
