//! What it costs to build the frames the server sends (`askstream::wire`).
//!
//! One group per question:
//! - `token_frame`: one `token` event for texts of different shapes (what `Token::new`
//!   pays, e.g. for an OpenAI-compatible upstream that streams one token at a time);
//! - `token_batch`: 64 tokens encoded with `Token::batch`, as the sim encodes a passage
//!   (criterion's element throughput gives the per-token cost), beside 64 separate frames;
//! - `done_event`: the last event of an answer, from a typed struct and from a
//!   `serde_json::Value`;
//! - `error_frame`: an `error` event.
//!
//! Run: `cargo bench -p askstream --bench encode`.

use std::hint::black_box;

use askstream::ErrorCode;
use askstream::pipeline::Token;
use askstream::wire::{self, Done, Source, TimingField, UsageField};
use criterion::{BenchmarkId, Criterion, Throughput};

/// A model's typical token: a short ASCII word with its leading space.
const SHORT: &str = " north";
/// A long token (some upstreams send whole phrases): 240 ASCII bytes, nothing to escape.
const LONG: &str = "Every ask costs one unit of its user's quota, taken before any pipeline \
                    work and given back if the answer is not delivered, so a client that \
                    leaves early or meets a server error never pays for an answer it did not get.";
/// A token serde_json must escape: quotes, a backslash, control characters.
const ESCAPED: &str = " \"quoted\" \\path\n\tnext";
/// Multi-byte UTF-8, which JSON passes through unescaped.
const MULTI_BYTE: &str = " 日本語 – café ✓ 🚀";

fn token_frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("token_frame");
    group.throughput(Throughput::Elements(1));
    for (name, text) in [
        ("short_ascii", SHORT),
        ("long_ascii", LONG),
        ("escaped", ESCAPED),
        ("multi_byte", MULTI_BYTE),
    ] {
        group.bench_with_input(BenchmarkId::new("token", name), text, |b, text| {
            b.iter(|| wire::token(black_box(text)));
        });
    }
    group.finish();
}

/// 64 words shaped like an answer: mostly short words, some punctuation and one escape.
fn answer_words() -> Vec<&'static str> {
    const WORDS: [&str; 16] = [
        "The",
        " quota",
        " is",
        " charged",
        " before",
        " retrieval,",
        " and",
        " refunded",
        " when",
        " the",
        " \"done\"",
        " event",
        " never",
        " reaches",
        " you.",
        " —",
    ];
    WORDS.iter().copied().cycle().take(64).collect()
}

fn token_batch(c: &mut Criterion) {
    let words = answer_words();
    let mut group = c.benchmark_group("token_batch");
    group.throughput(Throughput::Elements(words.len() as u64));
    group.bench_function("batch_64", |b| {
        b.iter(|| Token::batch(black_box(&words).iter().copied()));
    });
    group.bench_function("one_by_one_64", |b| {
        b.iter(|| {
            black_box(&words)
                .iter()
                .map(|w| Token::new(w))
                .collect::<Vec<_>>()
        });
    });
    group.finish();
}

const QUERY_ID: &str = "3f9c2a7d1e5b48c0a6f2d9e8b7c41a05";
const SOURCES: [Source<'static>; 4] = [
    Source {
        id: "quota.md#2",
        title: "Quotas",
        score: 7.41,
        url: None,
    },
    Source {
        id: "quota.md#0",
        title: "Quotas",
        score: 5.93,
        url: None,
    },
    Source {
        id: "errors.md#3",
        title: "Errors",
        score: 3.2,
        url: None,
    },
    Source {
        id: "overview.md#1",
        title: "Overview",
        score: 1.07,
        url: None,
    },
];

fn done_fields() -> Done<'static> {
    Done {
        query_id: QUERY_ID,
        sources: &SOURCES,
        quota_remaining: 3,
        usage: UsageField {
            completion_tokens: 64,
            prompt_tokens: None,
        },
        timing: TimingField {
            ttft_ms: Some(0.8),
            total_ms: 1290.4,
        },
    }
}

fn done_event(c: &mut Criterion) {
    let mut group = c.benchmark_group("done_event");
    group.throughput(Throughput::Elements(1));
    // What the server does once per answer.
    group.bench_function("done_4_sources", |b| {
        b.iter(|| wire::done(black_box(&done_fields())));
    });
    let value: serde_json::Value =
        serde_json::from_slice(&wire::done(&done_fields())[6..]).expect("the done event is JSON");
    group.bench_function("json_value_4_sources", |b| {
        b.iter(|| wire::data(black_box(&value)));
    });
    group.finish();
}

fn error_frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("error_frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("slow_client", |b| {
        b.iter(|| {
            wire::error_event(
                black_box(ErrorCode::SlowClient.as_str()),
                black_box("the stream was not read for 30 s; this ask was refunded"),
            )
        });
    });
    group.finish();
}

// `criterion_group!` would define an undocumented `pub fn`, which the crate's
// `missing_docs` lint rejects; this is what it and `criterion_main!` expand to.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    token_frame(&mut c);
    token_batch(&mut c);
    done_event(&mut c);
    error_frame(&mut c);
    c.final_summary();
}
