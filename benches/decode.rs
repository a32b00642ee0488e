//! How fast the incremental SSE decoder (`askstream::sse::decode`) reads what the server
//! sends, however the network chunks it.
//!
//! One group, one question — what does chunking cost? The same stream (a 64-token sim
//! answer over the built-in corpus and its `done` event, encoded with
//! `askstream::sse::encode` exactly as the server does) is decoded from one buffer, one
//! byte at a time, and in random chunks of 1–256 bytes (a fixed-seed xorshift, so every
//! run splits alike). Throughput is in bytes of stream; each iteration is a new decoder,
//! as each stream of the load tool gets one.
//!
//! Run: `cargo bench -p askstream --bench decode`.

use std::hint::black_box;
use std::sync::Arc;

use askstream::pipeline::Prompt;
use askstream::pipeline::bm25::Bm25Index;
use askstream::pipeline::sim::{SimConfig, SimGenerator};
use askstream::pipeline::{Chunk, Generator};
use askstream::sse::decode::{Decoder, Eof};
use askstream::wire;
use criterion::{BenchmarkId, Criterion, Throughput};
use serde_json::json;

const TOKENS: u32 = 64;

/// 64 token events and the `done` event, as one answer's bytes on the wire.
fn answer_stream() -> Vec<u8> {
    let query = "how are quotas refunded";
    let passages = Bm25Index::builtin().search(query, 4);
    let sources: Vec<_> = passages
        .iter()
        .map(|p| json!({"id": &*p.stored.id, "title": &*p.stored.title, "score": p.score}))
        .collect();
    let prompt = Prompt {
        query: query.into(),
        passages: Arc::from(passages),
    };
    let mut stream = Vec::new();
    // An unpaced sim is always ready: poll it to its end with a waker that is never used.
    let mut tokens = SimGenerator::new(SimConfig {
        ttft: std::time::Duration::ZERO,
        token_interval: std::time::Duration::ZERO,
        tokens: TOKENS,
    })
    .generate(prompt);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    while let std::task::Poll::Ready(Some(chunk)) = tokens.as_mut().poll_next(&mut cx) {
        if let Ok(Chunk::Token(t)) = chunk {
            stream.extend_from_slice(t.frame());
        }
    }
    stream.extend_from_slice(&wire::data(&json!({
        "type": "done",
        "queryId": "3f9c2a7d1e5b48c0a6f2d9e8b7c41a05",
        "sources": sources,
        "quotaRemaining": 3,
        "usage": {"completionTokens": TOKENS},
        "timing": {"ttftMs": 0.8, "totalMs": 1290.4},
    })));
    stream
}

/// Marsaglia's xorshift64: deterministic chunk sizes without a `rand` dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Splits `len` bytes into chunks of 1..=`max` bytes; returns the chunk ends.
fn random_splits(len: usize, max: u64, seed: u64) -> Vec<usize> {
    let mut rng = XorShift(seed);
    let mut ends = Vec::new();
    let mut at = 0;
    while at < len {
        at = (at + 1 + (rng.next() % max) as usize).min(len);
        ends.push(at);
    }
    ends
}

/// Feeds `stream` in the chunks ending at `ends`, reading events as they complete, the way
/// a client does. Returns how many events it read.
fn decode(stream: &[u8], ends: &[usize]) -> usize {
    let mut decoder = Decoder::new();
    let mut events = 0;
    let mut start = 0;
    for &end in ends {
        decoder.feed(&stream[start..end]);
        start = end;
        while let Some(event) = decoder.next_event().expect("the server's lines are short") {
            black_box(&event.data);
            events += 1;
        }
    }
    assert_eq!(decoder.finish(), Eof::Clean);
    events
}

fn chunking(c: &mut Criterion) {
    let stream = answer_stream();
    let whole = vec![stream.len()];
    let bytes: Vec<usize> = (1..=stream.len()).collect();
    let random = random_splits(stream.len(), 256, 0x9e37_79b9_7f4a_7c15);
    let events = TOKENS as usize + 1;
    for ends in [&whole, &bytes, &random] {
        assert_eq!(decode(&stream, ends), events, "every event is decoded");
    }

    let mut group = c.benchmark_group("chunking");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    for (name, ends) in [
        ("whole", &whole),
        ("1_byte", &bytes),
        ("random_1_256", &random),
    ] {
        group.bench_with_input(BenchmarkId::new("answer_64", name), ends, |b, ends| {
            b.iter(|| decode(black_box(&stream), ends));
        });
    }
    group.finish();
}

// `criterion_group!` would define an undocumented `pub fn`, which the crate's
// `missing_docs` lint rejects; this is what it and `criterion_main!` expand to.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    chunking(&mut c);
    c.final_summary();
}
