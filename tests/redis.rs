//! The shared quota store (contract §2.1) against a real `redis-server` each test starts on
//! its own unix socket: several askstream instances share one count, charges are leases
//! that outlive a dead instance by at most one lease, and a store that is down or slow
//! refuses asks with `QUOTA_UNAVAILABLE` instead of admitting them uncharged.
//!
//! Skipped (with a notice) on a machine without `redis-server`, unless
//! `ASKSTREAM_REQUIRE_REDIS=1`. Run alone: `cargo test -p askstream --test redis`.
//!
//! Leases and windows run on the store's real clock, so the tests that wait for a lease to
//! run out poll for the outcome with a generous bound; nothing asserts how fast.
#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use askstream::QuotaStoreConfig;
use serde_json::Value;
use support::redis::RedisServer;
use support::*;

const QUERY: &str = "How do quota refunds work?";
const STREAM: &str = "/api/v1/ai/ask?stream=true";
const JSON_MODE: &str = "/api/v1/ai/ask";

/// The fast test config on the shared store, with `limit` asks and a `lease`.
fn shared(redis: &RedisServer, limit: u32, lease: Duration) -> askstream::ServiceConfig {
    let mut c = config_with_limit(limit);
    c.quota_store = QuotaStoreConfig::Redis {
        url: redis.url(),
        lease,
        timeout: Duration::from_millis(250),
    };
    c
}

/// Asks (streaming) until the answer is delivered; the events it got.
async fn delivered(server: &TestServer, user: &str) -> Vec<Value> {
    let (head, events) = stream_ask(server.addr, QUERY, user).await;
    assert_eq!(head.status, 200, "{events:?}");
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some("done".into())
    );
    events
}

/// The quota route's status and body, whatever the status.
async fn quota_raw(server: &TestServer, user: &str) -> (u16, Value) {
    let mut c = RawConn::connect(server.addr).await;
    c.get("/api/v1/quota", &bearer(user)).await;
    let head = c.read_head().await;
    let body = c.read_body(&head).await;
    (
        head.status,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// Polls `remaining` until it equals `want`, within `bound`.
async fn remaining_becomes(server: &TestServer, user: &str, want: u64, bound: Duration) {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let (status, q) = quota_raw(server, user).await;
        if status == 200 && q["remaining"] == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "remaining never became {want}: last {status} {q}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_answers_are_charged_and_refused_asks_are_not() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = TestServer::start(shared(&redis, 3, Duration::from_secs(30))).await;
    let user = "basic";
    for left in [2, 1, 0] {
        let events = delivered(&server, user).await;
        assert_eq!(events.last().unwrap()["quotaRemaining"], left);
    }
    let (head, body) = ask(server.addr, JSON_MODE, &ask_body(QUERY), &bearer(user)).await;
    assert_eq!(head.status, 429, "{}", String::from_utf8_lossy(&body));
    server.settled().await;
    server.service.flush_quota().await;
    let q = quota(server.addr, user).await;
    assert_eq!(
        (q["limit"].as_u64(), q["remaining"].as_u64()),
        (Some(3), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_is_refunded_in_the_shared_store() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut config = shared(&redis, 5, Duration::from_secs(30));
    support::sim(&mut config).token_interval = Duration::from_secs(3600);
    let server = TestServer::start(config).await;
    let user = "leaver";
    let mut c = RawConn::connect(server.addr).await;
    let head = c.start_stream(QUERY, user).await;
    assert_eq!(head.status, 200);
    assert!(c.read_chunk().await.is_some(), "the first token arrives");
    // Held while it streams: the lease counts as used.
    assert_eq!(remaining(server.addr, user).await, 4);
    drop(c);
    server.settled().await;
    server.service.flush_quota().await;
    assert_eq!(remaining(server.addr, user).await, 5, "refunded");
}

/// N racing asks for R left, spread over two instances: exactly min(N, R) admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_asks_on_two_instances_admit_exactly_what_is_left() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const LEFT: u32 = 7;
    const ASKS: usize = 40;
    let a = TestServer::start(shared(&redis, LEFT, Duration::from_secs(30))).await;
    let b = TestServer::start(shared(&redis, LEFT, Duration::from_secs(30))).await;
    let user = "racer";
    let mut tasks = Vec::new();
    for i in 0..ASKS {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        tasks.push(tokio::spawn(async move {
            let (head, _) = ask(addr, JSON_MODE, &ask_body(QUERY), &bearer(user)).await;
            head.status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(
        (admitted, refused),
        (LEFT as usize, ASKS - LEFT as usize),
        "{statuses:?}"
    );
    for s in [&a, &b] {
        s.settled().await;
        s.service.flush_quota().await;
    }
    assert_eq!(remaining(a.addr, user).await, 0);
    assert_eq!(remaining(b.addr, user).await, 0);
}

/// Clients of two instances leave at every point of their answers: what ends up charged
/// is exactly the `done` events the clients received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_storm_across_instances_charges_exactly_the_answers_received() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const LIMIT: u32 = 1000;
    const STREAMS: usize = 60;
    const TOKENS: u32 = 12;
    let config = || {
        let mut c = shared(&redis, LIMIT, Duration::from_secs(30));
        support::sim(&mut c).tokens = TOKENS;
        support::sim(&mut c).token_interval = Duration::from_millis(2);
        c
    };
    let a = TestServer::start(config()).await;
    let b = TestServer::start(config()).await;
    let user = "storm";
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        // Leave after `stop` chunks: before the first token, mid-answer, or never.
        let stop = i % (TOKENS as usize + 4);
        tasks.push(tokio::spawn(async move {
            let mut c = RawConn::connect(addr).await;
            let head = c.start_stream(QUERY, user).await;
            assert_eq!(head.status, 200);
            let mut body = Vec::new();
            for _ in 0..stop {
                match c.read_chunk().await {
                    Some(chunk) if !chunk.is_empty() => body.extend_from_slice(&chunk),
                    _ => break,
                }
            }
            // Leave with a FIN and keep reading: whatever hyper wrote before it noticed
            // still arrives, so "received done" is exactly "done was handed over".
            tokio::io::AsyncWriteExt::shutdown(&mut c.stream)
                .await
                .expect("half-close");
            let rest = c.read_to_eof().await;
            body.extend_from_slice(&dechunk_prefix(&rest).0);
            parse_sse(&body).0.iter().any(|e| e["type"] == "done")
        }));
    }
    let mut done_received = 0;
    for t in tasks {
        done_received += u64::from(t.await.unwrap());
    }
    for s in [&a, &b] {
        s.settled().await;
        s.service.flush_quota().await;
    }
    let charged = u64::from(LIMIT) - remaining(a.addr, user).await;
    assert_eq!(charged, done_received);
    assert!(
        done_received > 0 && done_received < STREAMS as u64,
        "{done_received}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_limits_hold_across_instances() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let keys =
        || askstream::auth::Auth::parse("key-a shared-user 2\nkey-b shared-user 2\n").unwrap();
    let a = TestServer::start_with(
        askstream::AskService::builder(shared(&redis, 50, Duration::from_secs(30))).auth(keys()),
    )
    .await;
    let b = TestServer::start_with(
        askstream::AskService::builder(shared(&redis, 50, Duration::from_secs(30))).auth(keys()),
    )
    .await;
    let mut statuses = Vec::new();
    for (server, key) in [(&a, "key-a"), (&b, "key-b"), (&a, "key-b"), (&b, "key-a")] {
        let (head, _) = ask(server.addr, JSON_MODE, &ask_body(QUERY), &bearer(key)).await;
        statuses.push(head.status);
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_answers_stay_charged_when_every_instance_restarts() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let user = "restart";
    {
        let mut first = TestServer::start(shared(&redis, 5, Duration::from_secs(30))).await;
        delivered(&first, user).await;
        delivered(&first, user).await;
        first.signal_shutdown().await.unwrap();
    }
    let second = TestServer::start(shared(&redis, 5, Duration::from_secs(30))).await;
    assert_eq!(remaining(second.addr, user).await, 3);
}

/// The store goes down while answers stream, and comes back with its data (AOF): the
/// answers go on meanwhile, and their settle and refund, which failed while it was down,
/// are retried until they land — long before the leases could have decided it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settles_and_refunds_of_answers_in_flight_land_after_a_store_restart() {
    let Some(mut redis) = RedisServer::start_persistent() else {
        return;
    };
    let lease = Duration::from_secs(120);
    let mut config = shared(&redis, 10, lease);
    sim(&mut config).ttft = Duration::ZERO;
    sim(&mut config).token_interval = Duration::from_millis(200);
    sim(&mut config).tokens = 6;
    let server = TestServer::start(config).await;
    let user = "in-flight-restart";
    let mut kept = RawConn::connect(server.addr).await;
    kept.start_stream(QUERY, user).await;
    let mut left = RawConn::connect(server.addr).await;
    left.start_stream(QUERY, user).await;
    remaining_becomes(&server, user, 8, Duration::from_secs(10)).await;

    redis.kill();
    // One client leaves, the other reads its answer to the end, both while the store is
    // down: neither the refund nor the settle can land now.
    assert!(left.read_chunk().await.is_some_and(|c| !c.is_empty()));
    drop(left);
    let (body, ended) = tokio::time::timeout(Duration::from_secs(20), kept.read_chunked_body())
        .await
        .expect("the answer streams on while the store is down");
    assert!(ended);
    let events = parse_sse(&body).0;
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some("done".into())
    );
    server.settled().await;

    redis.restart();
    // The leases would keep both charges for two minutes; only the retried settle and
    // refund make it one charge now.
    remaining_becomes(&server, user, 9, Duration::from_secs(30)).await;
    assert_eq!(metric(server.addr, "askstream_refunds_total").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_refuses_with_quota_unavailable_and_a_returning_one_heals() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let server = TestServer::start(shared(&redis, 5, Duration::from_secs(30))).await;
    let user = "outage";
    delivered(&server, user).await;
    redis.kill();

    // Streaming: the status, the SSE error event, retry-after, nothing charged.
    let (head, body) = ask(server.addr, STREAM, &ask_body(QUERY), &bearer(user)).await;
    assert_eq!(head.status, 503);
    assert_eq!(head.header("retry-after"), Some("1"));
    let events = parse_sse(&body).0;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_error_object(&events[0], "QUOTA_UNAVAILABLE", "stream");
    // JSON mode and the quota route alike.
    let (head, body) = ask(server.addr, JSON_MODE, &ask_body(QUERY), &bearer(user)).await;
    assert_eq!(head.status, 503);
    assert_eq!(head.header("retry-after"), Some("1"));
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert_error_object(&err, "QUOTA_UNAVAILABLE", "json");
    let (status, err) = quota_raw(&server, user).await;
    assert_eq!(status, 503);
    assert_error_object(&err, "QUOTA_UNAVAILABLE", "quota route");

    // The store comes back (empty: it kept nothing): asks work again, no restart.
    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (head, _) = ask(server.addr, JSON_MODE, &ask_body(QUERY), &bearer(user)).await;
        if head.status == 200 {
            break;
        }
        assert_eq!(head.status, 503);
        assert!(tokio::time::Instant::now() < deadline, "never healed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric(server.addr, "askstream_quota_store_errors_total").await >= 3);
    assert!(
        metric(
            server.addr,
            "askstream_asks_total{outcome=\"rejected\",code=\"QUOTA_UNAVAILABLE\"}"
        )
        .await
            >= 2,
        "the streaming and the JSON ask"
    );
    assert!(metric(server.addr, "askstream_quota_store_seconds_count").await > 0);
}

/// A store slower than the timeout: the ask is refused, and the charge the store made
/// anyway (the script ran once the pause ended) is held by its lease, then given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_refuses_and_the_lease_settles_the_unknown_outcome() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let lease = Duration::from_secs(2);
    let server = TestServer::start(shared(&redis, 5, lease)).await;
    let user = "paused";
    // One answer first: connected, scripts loaded, so the pause meets the charge itself.
    delivered(&server, user).await;
    redis.pause(1500);
    let (head, _) = ask(server.addr, JSON_MODE, &ask_body(QUERY), &bearer(user)).await;
    assert_eq!(head.status, 503);
    // Once the pause is over the lost charge shows as held (it ran)...
    remaining_becomes(&server, user, 3, Duration::from_secs(10)).await;
    // ...and comes back when its lease runs out, since nobody renews it.
    remaining_becomes(&server, user, 4, Duration::from_secs(30)).await;
}

/// An answer that lasts several leases keeps its charge all along (renewed), and a
/// delivered answer stays charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_longer_than_its_lease_keeps_its_charge() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut config = shared(&redis, 5, Duration::from_secs(1));
    support::sim(&mut config).tokens = 5;
    support::sim(&mut config).token_interval = Duration::from_millis(800);
    let server = TestServer::start(config).await;
    let user = "long";
    let watcher = {
        let addr = server.addr;
        tokio::spawn(async move {
            // Sample the count while the 3 s answer runs: always held.
            let mut seen = Vec::new();
            for _ in 0..12 {
                tokio::time::sleep(Duration::from_millis(250)).await;
                seen.push(remaining(addr, user).await);
            }
            seen
        })
    };
    delivered(&server, user).await;
    let seen = watcher.await.unwrap();
    assert!(seen.iter().all(|&r| r == 4), "{seen:?}");
    server.settled().await;
    server.service.flush_quota().await;
    assert_eq!(remaining(server.addr, user).await, 4);
    let renewed = metric(server.addr, "askstream_quota_leases_renewed_total").await;
    assert!(
        renewed >= 2,
        "a 3 s answer on a 1 s lease is renewed: {renewed}"
    );
}

/// kill -9 of an instance with answers in flight: its charges stay held (no overdraft),
/// then come back when their leases run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_gives_its_charges_back_within_the_lease() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_askstream"))
        .args(["--listen", "127.0.0.1:0", "--quota-limit", "3"])
        .args(["--quota-store", &redis.url(), "--quota-lease-secs", "6"])
        .args(["--sim-ttft-ms", "0", "--sim-token-ms", "60000"])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start askstream");
    let addr = listening_addr(&mut child);
    let user = "killed";
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut c = RawConn::connect(addr).await;
        assert_eq!(c.start_stream(QUERY, user).await.status, 200);
        assert!(c.read_chunk().await.is_some());
        streams.push(c);
    }
    let lease = Duration::from_secs(6);
    let observer = TestServer::start(shared(&redis, 3, lease)).await;
    assert_eq!(remaining(observer.addr, user).await, 1);
    let killed = std::time::Instant::now();
    child.kill().expect("kill -9");
    child.wait().unwrap();
    // Held until the leases run out: no overdraft meanwhile. Leases are renewed every
    // third of their length, so none can run out before two thirds of it after the kill.
    let (head, _) = ask(observer.addr, JSON_MODE, &ask_body(QUERY), &bearer(user)).await;
    assert_eq!(head.status, 200, "the one ask left");
    let (head, _) = ask(observer.addr, JSON_MODE, &ask_body(QUERY), &bearer(user)).await;
    if killed.elapsed() < lease * 2 / 3 {
        assert_eq!(
            head.status, 429,
            "the killed instance's charges are still held"
        );
    } else {
        assert!(head.status == 429 || head.status == 200, "{}", head.status);
    }
    observer.settled().await;
    observer.service.flush_quota().await;
    // Then given back: only what the observer delivered stays charged.
    let kept = if head.status == 200 { 2 } else { 1 };
    remaining_becomes(&observer, user, 3 - kept, Duration::from_secs(30)).await;
}

/// Sleeps until `offset` into the next window of `window` (on this machine's clock, which
/// is the store's: same host).
async fn into_next_window(window: Duration, offset: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let w = window.as_millis();
    let into = now.as_millis() % w;
    let wait = Duration::from_millis(u64::try_from(w - into).unwrap()) + offset;
    tokio::time::sleep(wait).await;
}

/// Answers charged in one window and ending in the next: a refund does not land in the
/// new window, a settle does not spend it, and the new window starts full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_crossing_a_window_boundary_touch_only_their_own_window() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let window = Duration::from_secs(2);
    let mut held_config = shared(&redis, 3, Duration::from_secs(30));
    held_config.quota_window = window;
    support::sim(&mut held_config).token_interval = Duration::from_secs(3600);
    let held = TestServer::start(held_config).await;
    let mut slow_config = shared(&redis, 3, Duration::from_secs(30));
    slow_config.quota_window = window;
    support::sim(&mut slow_config).tokens = 6;
    support::sim(&mut slow_config).token_interval = Duration::from_millis(400);
    let slow = TestServer::start(slow_config).await;
    let user = "boundary";

    // Early in a window: one answer that will be refunded, and one that will be delivered
    // (6 tokens 400 ms apart: it ends about 0.5 s into the next window), both charged
    // here.
    into_next_window(window, Duration::from_millis(100)).await;
    let mut leaver = RawConn::connect(held.addr).await;
    assert_eq!(leaver.start_stream(QUERY, user).await.status, 200);
    assert!(leaver.read_chunk().await.is_some());
    let finisher = {
        let addr = slow.addr;
        tokio::spawn(async move { stream_ask(addr, QUERY, user).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        remaining(held.addr, user).await,
        1,
        "both held in their window"
    );

    // The next window: full, whatever the answers of the last one do now.
    into_next_window(window, Duration::from_millis(300)).await;
    assert_eq!(
        remaining(held.addr, user).await,
        3,
        "a new window starts full"
    );
    let (head, events) = finisher.await.unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(
        events.last().unwrap()["type"],
        "done",
        "delivered after the boundary"
    );
    drop(leaver);
    held.settled().await;
    slow.settled().await;
    held.service.flush_quota().await;
    slow.service.flush_quota().await;
    assert_eq!(
        remaining(held.addr, user).await,
        3,
        "neither the refund nor the settle landed in the new window"
    );
    let events = delivered(&slow, user).await;
    assert_eq!(events.last().unwrap()["quotaRemaining"], 2);
}

/// The same rules on a three-node Redis Cluster started by the test: users spread over
/// the nodes, each user's keys on one, racing asks over two instances admit exactly what
/// is left, refunds and renewals reach the right node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_keeps_every_rule() {
    use support::redis::RedisCluster;
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    const LEFT: u32 = 3;
    const USERS: usize = 8;
    let config = |lease: Duration| {
        let mut c = config_with_limit(LEFT);
        c.quota_store = QuotaStoreConfig::Redis {
            url: cluster.url(),
            lease,
            timeout: Duration::from_secs(2),
        };
        c
    };
    let a = TestServer::start(config(Duration::from_secs(30))).await;
    let b = TestServer::start(config(Duration::from_secs(30))).await;
    let mut tasks = Vec::new();
    for u in 0..USERS {
        for i in 0..8 {
            let addr = if i % 2 == 0 { a.addr } else { b.addr };
            tasks.push(tokio::spawn(async move {
                let user = format!("cluster-user-{u}");
                let (head, _) = ask(addr, JSON_MODE, &ask_body(QUERY), &bearer(&user)).await;
                (u, head.status)
            }));
        }
    }
    let mut admitted = [0u32; USERS];
    for t in tasks {
        let (u, status) = t.await.unwrap();
        assert!(status == 200 || status == 429, "{status}");
        admitted[u] += u32::from(status == 200);
    }
    assert_eq!(admitted, [LEFT; USERS]);
    let spread = cluster.keys_per_node();
    assert!(
        spread.iter().filter(|&&n| n > 0).count() >= 2,
        "users land on several nodes: {spread:?}"
    );

    // A refund and a renewed lease on the cluster.
    let mut long = config(Duration::from_secs(1));
    support::sim(&mut long).token_interval = Duration::from_secs(3600);
    let held = TestServer::start(long).await;
    let mut c = RawConn::connect(held.addr).await;
    assert_eq!(c.start_stream(QUERY, "cluster-held").await.status, 200);
    assert!(c.read_chunk().await.is_some());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        remaining(held.addr, "cluster-held").await,
        2,
        "held past its lease"
    );
    drop(c);
    held.settled().await;
    held.service.flush_quota().await;
    assert_eq!(remaining(held.addr, "cluster-held").await, 3, "refunded");
}
