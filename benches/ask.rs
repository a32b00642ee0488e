//! The server's share of time to first token: from a request hyper has parsed to the first
//! token frame the body yields, and the pieces of that path on their own. Workload D's
//! TTFT (contract §6.1) is this plus the network, hyper's parsing and the wake-ups; the
//! README's breakdown table is made from these figures and the load tool's.
//!
//! Groups:
//! - `first_frame`: `AskService::call` on a streaming ask (the sim with TTFT 0, as in the
//!   standard workloads), then polling the body until its first token frame. In memory,
//!   on a current-thread runtime; no socket.
//! - `whole_answer`: the same, then every frame of an unpaced 256-token answer to its
//!   end, as workload B runs it without the socket: the user-space cost per token of
//!   the answer's loop, the channel and the body (the figure over 256 tokens).
//! - `pieces`: BM25 retrieval of the query over the built-in corpus; the sim's answer up
//!   to its first token (assembly and frame encoding); one quota charge and settle.
//!
//! Run: `cargo bench -p askstream --bench ask`.

use std::future::poll_fn;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use askstream::pipeline::bm25::Bm25Index;
use askstream::pipeline::sim::{SimConfig, SimGenerator};
use askstream::pipeline::{Generator, Prompt, Retriever};
use askstream::quota::{QuotaMap, QuotaStore};
use askstream::{AskService, GeneratorConfig, ServiceConfig};
use bytes::Bytes;
use criterion::Criterion;
use http_body::Body;
use http_body_util::Full;
use hyper::service::Service;

const QUERY: &str = "How do quota refunds work?";

fn sim_config() -> SimConfig {
    SimConfig {
        ttft: Duration::ZERO,
        token_interval: Duration::from_millis(20),
        tokens: 64,
    }
}

fn request() -> http::Request<Full<Bytes>> {
    let body = format!("{{\"query\":\"{QUERY}\"}}");
    http::Request::post("/api/v1/ai/ask?stream=true")
        .header("content-type", "application/json")
        .header("authorization", "Bearer bench-user")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid request")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// A service answering with `sim` and never out of quota, built inside `rt`.
fn service(rt: &tokio::runtime::Runtime, sim: SimConfig) -> AskService {
    let config = ServiceConfig {
        generator: GeneratorConfig::Sim(sim),
        quota_limit: u32::MAX,
        ..ServiceConfig::default()
    };
    let _guard = rt.enter();
    AskService::builder(config)
        .build()
        .expect("the service builds")
}

/// Runs the answers' tasks to their end, so a figure includes a stream's end as well.
async fn settled(service: &AskService) {
    while service.in_flight() > 0 {
        tokio::task::yield_now().await;
    }
}

fn first_frame(c: &mut Criterion) {
    let rt = runtime();
    let service = service(&rt, sim_config());
    let mut group = c.benchmark_group("first_frame");
    group.bench_function("stream_ask", |b| {
        b.iter(|| {
            rt.block_on(async {
                let res = service.call(request()).await.expect("infallible");
                assert_eq!(res.status(), 200);
                let mut body = res.into_body();
                // The first frame is the first token: TTFT 0 queues it before the head.
                let frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
                    .await
                    .and_then(Result::ok)
                    .and_then(|f| f.into_data().ok())
                    .expect("a first frame");
                assert!(frame.starts_with(b"data: {\"type\":\"token\""), "{frame:?}");
                // Dropping the body ends the answer (a disconnect, refunded).
                drop(body);
                settled(&service).await;
                black_box(frame.len())
            })
        });
    });
    group.finish();
}

fn whole_answer(c: &mut Criterion) {
    let rt = runtime();
    let unpaced = SimConfig {
        ttft: Duration::ZERO,
        token_interval: Duration::ZERO,
        tokens: 256,
    };
    let service = service(&rt, unpaced);
    let mut group = c.benchmark_group("whole_answer");
    group.bench_function("unpaced_256", |b| {
        b.iter(|| {
            rt.block_on(async {
                let res = service.call(request()).await.expect("infallible");
                let mut body = res.into_body();
                let mut bytes = 0;
                while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                    bytes += frame
                        .ok()
                        .and_then(|f| f.into_data().ok())
                        .map_or(0, |d| d.len());
                }
                settled(&service).await;
                black_box(bytes)
            })
        });
    });
    group.finish();
}

fn pieces(c: &mut Criterion) {
    let index = Bm25Index::builtin();
    let passages: Arc<[_]> = index.search(QUERY, 4).into();
    let sim = SimGenerator::new(sim_config());
    let quota = QuotaMap::new(Duration::from_secs(86_400));
    let user = askstream::auth::UserId::of_bearer("bench-user");
    let rt = runtime();

    let mut group = c.benchmark_group("pieces");
    group.bench_function("bm25_top4", |b| {
        b.iter(|| black_box(index.search(black_box(QUERY), 4).len()));
    });
    group.bench_function("retrieve_via_trait", |b| {
        b.iter(|| {
            rt.block_on(async { black_box(index.retrieve(QUERY, 4).await.map(|p| p.len())) })
        });
    });
    group.bench_function("sim_first_token", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut tokens = sim.generate(Prompt {
                    query: Arc::from(QUERY),
                    passages: passages.clone(),
                });
                black_box(poll_fn(|cx| tokens.as_mut().poll_next(cx)).await.is_some())
            })
        });
    });
    group.bench_function("quota_charge_settle", |b| {
        b.iter(|| {
            rt.block_on(async {
                let charge = quota.charge(&user, u32::MAX).await.expect("room");
                charge.settle();
            })
        });
    });
    group.finish();
}

// `criterion_group!` would define an undocumented `pub fn`, which the crate's
// `missing_docs` lint rejects; this is what it and `criterion_main!` expand to.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    first_frame(&mut c);
    whole_answer(&mut c);
    pieces(&mut c);
    c.final_summary();
}
