//! What a quota charge costs (`askstream::quota::QuotaMap`), alone and under contention.
//!
//! Groups:
//! - `one_thread`: an ask by a known user (charge, then settle as a delivered answer does,
//!   or drop as a failed one does, which refunds), and a user's first ask (the insert
//!   path: write lock, key and entry allocated);
//! - `contended`: 2 and 4 threads charging and settling at once, all as one user (one
//!   atomic word, one shard lock) or each as its own. Each thread does the measured number
//!   of asks; the time reported is the slowest thread's, so it reads as the time one ask
//!   takes while the others run, and the element throughput as asks per second in total.
//!   On a 2-vCPU machine the 4-thread runs are oversubscribed: they show what preemption
//!   inside the map costs, not more parallelism.
//!
//! - `dispatch`: what the service pays for holding the store as `Arc<dyn QuotaStore>`
//!   (a boxed future per ask, polled once) against calling the map directly, which is
//!   what a service generic over the store compiled to. This is the figure that decided
//!   the service is not generic. (It reads the system clock, as the trait does.)
//!
//! The clock is injected (`charge_at`) elsewhere, so no other benchmark reads the system
//! time.
//!
//! Run: `cargo bench -p askstream --bench quota`.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use askstream::auth::UserId;
use askstream::quota::{QuotaMap, QuotaStore};
use criterion::{BenchmarkId, Criterion, Throughput};

/// Some Unix second; windows are one second long.
const T0: u64 = 1_800_000_000;
/// Settled asks stay spent, so the settling loops move to a new window every 2^20 asks
/// and never run out; a new window is the same compare-and-swap as any other ask.
const ASKS_PER_WINDOW_LOG2: u32 = 20;
const LIMIT: u32 = u32::MAX;

fn now(ask: u64) -> u64 {
    T0 + (ask >> ASKS_PER_WINDOW_LOG2)
}

fn map() -> QuotaMap {
    QuotaMap::new(Duration::from_secs(1))
}

/// One ask that is delivered: charge, then settle.
fn ask_settled(map: &QuotaMap, user: &str, ask: u64) {
    map.charge_at(user, LIMIT, now(ask))
        .expect("the limit is never reached")
        .settle();
}

fn one_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("one_thread");
    group.throughput(Throughput::Elements(1));

    let quota = map();
    ask_settled(&quota, "alice", 0);
    let mut ask = 0;
    group.bench_function("charge_settle", |b| {
        b.iter(|| {
            ask += 1;
            ask_settled(&quota, black_box("alice"), ask);
        });
    });

    let quota = map();
    ask_settled(&quota, "alice", 0);
    group.bench_function("charge_refund", |b| {
        b.iter(|| {
            // Dropping the charge refunds it: what every failed answer does.
            drop(quota.charge_at(black_box("alice"), LIMIT, T0));
        });
    });

    // A fresh map per sample, so the map does not grow without bound across samples; the
    // names are made before the clock starts.
    group.bench_function("charge_settle_new_user", |b| {
        b.iter_custom(|iters| {
            let quota = map();
            let names: Vec<String> = (0..iters).map(|i| format!("user-{i}")).collect();
            let start = Instant::now();
            for name in &names {
                ask_settled(&quota, name, 0);
            }
            let elapsed = start.elapsed();
            drop(quota);
            elapsed
        });
    });
    group.finish();
}

/// Runs `threads` threads doing `iters` settled asks each, released together; returns the
/// slowest thread's time. `user(t)` is the user thread `t` asks as; `asked` counts the
/// asks of earlier runs, so the windows keep moving forward from run to run.
fn race(
    quota: &QuotaMap,
    threads: usize,
    asked: u64,
    iters: u64,
    user: impl Fn(usize) -> String,
) -> Duration {
    let start = Barrier::new(threads);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (start, name) = (&start, user(t));
                s.spawn(move || {
                    start.wait();
                    let began = Instant::now();
                    for ask in asked..asked + iters {
                        ask_settled(quota, &name, ask);
                    }
                    began.elapsed()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a bench thread panicked"))
            .max()
            .unwrap_or_default()
    })
}

fn contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("contended");
    for threads in [2, 4] {
        group.throughput(Throughput::Elements(threads as u64));

        let quota = map();
        ask_settled(&quota, "shared", 0);
        let mut asked = 0;
        group.bench_function(BenchmarkId::new("one_user", threads), |b| {
            b.iter_custom(|iters| {
                asked += iters;
                race(&quota, threads, asked - iters, iters, |_| {
                    "shared".to_owned()
                })
            });
        });

        // Distinct users usually live in distinct shards (64 of them, randomly keyed), so
        // this is the map's scaling case; the users exist before the clock starts.
        let quota = map();
        for t in 0..threads {
            ask_settled(&quota, &format!("user-{t}"), 0);
        }
        let mut asked = 0;
        group.bench_function(BenchmarkId::new("distinct_users", threads), |b| {
            b.iter_custom(|iters| {
                asked += iters;
                race(&quota, threads, asked - iters, iters, |t| {
                    format!("user-{t}")
                })
            });
        });
    }
    group.finish();
}

/// Polls a future that must be ready at once, as the in-memory store's are.
fn ready<T>(fut: impl Future<Output = T>) -> T {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the in-memory store never waits"),
    }
}

fn dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("dispatch");
    group.throughput(Throughput::Elements(1));
    let user = UserId::new("alice");
    let direct = map();
    group.bench_function("direct_charge_settle", |b| {
        b.iter(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            direct
                .charge_at(black_box(user.as_str()), LIMIT, now)
                .expect("the limit is never reached")
                .settle();
        });
    });
    let store: Arc<dyn QuotaStore> = Arc::new(map());
    group.bench_function("dyn_charge_settle", |b| {
        b.iter(|| {
            ready(store.charge(black_box(&user), LIMIT))
                .expect("the limit is never reached")
                .settle();
        });
    });
    group.finish();
}

// `criterion_group!` would define an undocumented `pub fn`, which the crate's
// `missing_docs` lint rejects; this is what it and `criterion_main!` expand to.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    one_thread(&mut c);
    contended(&mut c);
    dispatch(&mut c);
    c.final_summary();
}
