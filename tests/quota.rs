//! Quota rules of contract §2 through the real server: the `/api/v1/quota` shape, one ask per
//! delivered answer in both modes, who shares a quota (open mode and keys mode), no
//! overdraft under concurrent asks, no refund of a delivered answer, refunds of failures.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use askstream::AskService;
use askstream::pipeline::PipelineError;
use serde_json::{Value, json};
use support::script::{ScriptGen, Step};
use support::*;
use tokio::sync::Barrier;

const ASK: &str = "/api/v1/ai/ask";
const ASK_STREAM: &str = "/api/v1/ai/ask?stream=true";
const QUERY: &str = r#"{"query":"How are quotas refunded?"}"#;

/// GET /api/v1/quota on `conn` with optional extra header lines; status must be 200.
async fn quota_on(mut conn: RawConn, extra: &str) -> Value {
    conn.get("/api/v1/quota", extra).await;
    let head = conn.read_head().await;
    let body = conn.read_body(&head).await;
    assert_eq!(head.status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// A complete streaming answer's `done` event (asserting the stream is complete).
fn done_of(head: &Head, body: &[u8]) -> Value {
    assert_eq!(head.status, 200, "{}", String::from_utf8_lossy(body));
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    let (events, _) = parse_sse(body);
    let done = events.last().expect("events").clone();
    assert_eq!(done["type"], "done", "{events:?}");
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| e["type"] == "token")
    );
    done
}

/// A JSON answer's document.
fn json_of(head: &Head, body: &[u8]) -> Value {
    assert_eq!(head.status, 200, "{}", String::from_utf8_lossy(body));
    assert_eq!(head.header("content-type"), Some("application/json"));
    serde_json::from_slice(body).unwrap()
}

/// Asks once in the given mode; returns `quotaRemaining` of the delivered answer.
async fn ask_ok(server: &TestServer, streaming: bool, extra: &str) -> u64 {
    if streaming {
        let (h, b) = ask(server.addr, ASK_STREAM, QUERY, extra).await;
        done_of(&h, &b)["quotaRemaining"].as_u64().unwrap()
    } else {
        let (h, b) = ask(server.addr, ASK, QUERY, extra).await;
        json_of(&h, &b)["quotaRemaining"].as_u64().unwrap()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Checks `YYYY-MM-DDTHH:MM:SSZ` character by character.
fn is_rfc3339_utc_seconds(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

#[tokio::test]
async fn quota_endpoint_shape_and_one_ask_per_delivered_answer_in_both_modes() {
    let mut config = config_with_limit(6);
    config.quota_window = Duration::from_secs(3600);
    let server = TestServer::start(config).await;
    let auth = bearer("shape");

    let before = unix_now();
    let mut c = RawConn::connect(server.addr).await;
    c.get("/api/v1/quota", &auth).await;
    let head = c.read_head().await;
    let body = c.read_body(&head).await;
    let after = unix_now();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("application/json"));
    let v: Value = serde_json::from_slice(&body).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["limit", "remaining", "resetsAt"], "{v}");
    assert_eq!(v["limit"], 6);
    assert_eq!(v["remaining"], 6);
    let resets_at = v["resetsAt"].as_str().expect("resetsAt is a string");
    assert!(is_rfc3339_utc_seconds(resets_at), "{resets_at}");
    // Hour windows aligned to the epoch end on the hour.
    assert!(resets_at.ends_with(":00:00Z"), "{resets_at}");
    // The end of the current hour, as the system's `date` prints it: an oracle
    // independent of the server's calendar arithmetic.
    let boundary = |t: u64| {
        let out = std::process::Command::new("date")
            .args(["-u", "-d", &format!("@{}", (t / 3600 + 1) * 3600)])
            .arg("+%Y-%m-%dT%H:%M:%SZ")
            .output()
            .expect("date runs");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert!(
        resets_at == boundary(before) || resets_at == boundary(after),
        "{resets_at} is not the end of the current hour"
    );

    // Each delivered answer takes exactly one, in either mode; `quotaRemaining` is the
    // remaining after that ask, as the quota endpoint then reports.
    for (i, streaming) in [true, false, true, true, false].into_iter().enumerate() {
        let expected = 6 - (i as u64 + 1);
        assert_eq!(
            ask_ok(&server, streaming, &auth).await,
            expected,
            "ask {i} (streaming: {streaming})"
        );
        let v = quota(server.addr, "shape").await;
        assert_eq!(v["remaining"], expected);
        assert_eq!(v["limit"], 6);
    }
    server.settled().await;
    assert_eq!(remaining(server.addr, "shape").await, 1);
}

#[tokio::test]
async fn open_mode_bearer_tokens_have_separate_quotas() {
    let server = TestServer::start(config_with_limit(5)).await;
    assert_eq!(ask_ok(&server, true, &bearer("alpha")).await, 4);
    assert_eq!(ask_ok(&server, false, &bearer("alpha")).await, 3);
    assert_eq!(ask_ok(&server, true, &bearer("beta")).await, 4);
    assert_eq!(remaining(server.addr, "alpha").await, 3);
    assert_eq!(remaining(server.addr, "beta").await, 4);
    assert_eq!(remaining(server.addr, "gamma").await, 5);
    // Bearer users are not the client IP's quota.
    let v = quota_on(RawConn::connect(server.addr).await, "").await;
    assert_eq!(v["remaining"], 5);
}

#[tokio::test]
async fn open_mode_without_a_bearer_token_the_client_ip_is_the_user() {
    let server = TestServer::start(config_with_limit(5)).await;
    let one = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    let two = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

    // Two asks from 127.0.0.1 without a token (one per mode).
    for (path, streaming) in [(ASK_STREAM, true), (ASK, false)] {
        let mut c = RawConn::connect_from(server.addr, one).await;
        c.post(path, QUERY, "").await;
        let h = c.read_head().await;
        let b = c.read_body(&h).await;
        if streaming {
            assert_eq!(done_of(&h, &b)["quotaRemaining"], 4);
        } else {
            assert_eq!(json_of(&h, &b)["quotaRemaining"], 3);
        }
    }
    let v = quota_on(RawConn::connect_from(server.addr, one).await, "").await;
    assert_eq!(
        (v["limit"].as_u64(), v["remaining"].as_u64()),
        (Some(5), Some(3))
    );
    // Another address is another user.
    let v = quota_on(RawConn::connect_from(server.addr, two).await, "").await;
    assert_eq!(v["remaining"], 5);
    let mut c = RawConn::connect_from(server.addr, two).await;
    c.post(ASK, QUERY, "").await;
    let h = c.read_head().await;
    let b = c.read_body(&h).await;
    assert_eq!(json_of(&h, &b)["quotaRemaining"], 4);
    // A token from the same address is its own user too.
    assert_eq!(remaining(server.addr, "someone").await, 5);
    let v = quota_on(RawConn::connect_from(server.addr, one).await, "").await;
    assert_eq!(v["remaining"], 3);
}

/// A keys file in a fresh temporary directory, removed on drop.
struct TempKeys(std::path::PathBuf);

impl TempKeys {
    fn new(text: &str) -> TempKeys {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "askstream-quota-test-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, text).unwrap();
        TempKeys(path)
    }
}

impl Drop for TempKeys {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[tokio::test]
async fn keys_mode_per_key_limit_and_keys_of_one_user_share_a_quota() {
    let keys = TempKeys::new(
        "# test keys\n\
         k-alice-1 alice\n\
         k-alice-2 alice\n\
         k-carol carol 3   # carol has her own limit\n\
         k-zed zed 0\n",
    );
    let mut config = config_with_limit(20);
    config.keys = Some(keys.0.clone());
    let server = TestServer::start(config).await;

    // The per-key limit overrides --quota-limit.
    let v = quota(server.addr, "k-carol").await;
    assert_eq!(
        (v["limit"].as_u64(), v["remaining"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(ask_ok(&server, true, &bearer("k-carol")).await, 2);
    assert_eq!(ask_ok(&server, false, &bearer("k-carol")).await, 1);
    assert_eq!(ask_ok(&server, true, &bearer("k-carol")).await, 0);
    let (h, b) = ask(server.addr, ASK, QUERY, &bearer("k-carol")).await;
    assert_eq!(h.status, 429, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["code"],
        "QUOTA_EXCEEDED"
    );
    // A limit of 0 refuses every ask.
    let (h, _) = ask(server.addr, ASK_STREAM, QUERY, &bearer("k-zed")).await;
    assert_eq!(h.status, 429);

    // Two keys of alice draw from one quota of --quota-limit asks.
    let v = quota(server.addr, "k-alice-2").await;
    assert_eq!(
        (v["limit"].as_u64(), v["remaining"].as_u64()),
        (Some(20), Some(20))
    );
    assert_eq!(ask_ok(&server, true, &bearer("k-alice-1")).await, 19);
    assert_eq!(remaining(server.addr, "k-alice-2").await, 19);
    assert_eq!(ask_ok(&server, false, &bearer("k-alice-2")).await, 18);
    assert_eq!(ask_ok(&server, true, &bearer("k-alice-2")).await, 17);
    assert_eq!(remaining(server.addr, "k-alice-1").await, 17);
    // Carol's use did not touch alice's, nor alice's carol's.
    assert_eq!(remaining(server.addr, "k-carol").await, 0);
    server.settled().await;
    assert_eq!(remaining(server.addr, "k-alice-1").await, 17);
}

/// `n` asks from one user on `n` connections, released together by a barrier.
async fn race(server: &TestServer, n: usize, path: &'static str) -> Vec<(Head, Vec<u8>)> {
    let barrier = Arc::new(Barrier::new(n));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let barrier = barrier.clone();
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = RawConn::connect(addr).await;
            barrier.wait().await;
            c.post(path, QUERY, &bearer("racer")).await;
            let head = c.read_head().await;
            let body = c.read_body(&head).await;
            (head, body)
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("ask task"));
    }
    out
}

async fn no_overdraft(streaming: bool) {
    const LIMIT: u64 = 10;
    const N: usize = 40;
    let server = TestServer::start(config_with_limit(LIMIT as u32)).await;
    let path = if streaming { ASK_STREAM } else { ASK };
    let results = race(&server, N, path).await;

    let mut remainings = Vec::new();
    let mut refused = 0;
    for (head, body) in &results {
        match head.status {
            200 => {
                let v = if streaming {
                    done_of(head, body)
                } else {
                    json_of(head, body)
                };
                remainings.push(v["quotaRemaining"].as_u64().unwrap());
            }
            429 => {
                let v = if streaming {
                    let (events, _) = parse_sse(body);
                    assert_eq!(events.len(), 1);
                    events[0].clone()
                } else {
                    serde_json::from_slice(body).unwrap()
                };
                assert_eq!(v["code"], "QUOTA_EXCEEDED");
                refused += 1;
            }
            other => panic!(
                "unexpected status {other}: {}",
                String::from_utf8_lossy(body)
            ),
        }
    }
    assert_eq!(remainings.len(), LIMIT as usize, "admitted");
    assert_eq!(refused, N - LIMIT as usize, "refused");
    // Each admitted ask took its own unit: the remainders are 9, 8, …, 0, once each.
    remainings.sort_unstable();
    assert_eq!(remainings, (0..LIMIT).collect::<Vec<_>>());

    assert_eq!(remaining(server.addr, "racer").await, 0);
    server.settled().await;
    assert_eq!(remaining(server.addr, "racer").await, 0, "nothing refunded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_overdraft_under_a_barrier_streaming() {
    no_overdraft(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_overdraft_under_a_barrier_json() {
    no_overdraft(false).await;
}

#[tokio::test]
async fn delivered_answers_are_never_refunded() {
    let server = TestServer::start(config_with_limit(10)).await;
    let auth = bearer("kept");
    for k in 1..=4u64 {
        let (h, b) = ask(server.addr, ASK_STREAM, QUERY, &auth).await;
        let done = done_of(&h, &b);
        assert_eq!(done["quotaRemaining"], 10 - k);
        assert_eq!(remaining(server.addr, "kept").await, 10 - k);
    }
    server.settled().await;
    assert_eq!(remaining(server.addr, "kept").await, 6);
    // The same on one keep-alive connection, JSON and streaming in turn.
    let mut c = RawConn::connect(server.addr).await;
    for (i, path) in [ASK, ASK_STREAM, ASK].into_iter().enumerate() {
        c.post(path, QUERY, &auth).await;
        let h = c.read_head().await;
        let b = c.read_body(&h).await;
        let v = if path == ASK {
            json_of(&h, &b)
        } else {
            done_of(&h, &b)
        };
        assert_eq!(v["quotaRemaining"], 6 - (i as u64 + 1));
    }
    server.settled().await;
    assert_eq!(remaining(server.addr, "kept").await, 3);
}

/// Fails for queries containing `fail`, panics for `boom`, answers otherwise.
fn flaky(query: &str) -> Vec<Step> {
    if query.contains("fail") {
        vec![
            Step::Tok("partial"),
            Step::Fail(PipelineError::upstream("model down")),
        ]
    } else if query.contains("boom") {
        vec![Step::Tok("partial"), Step::Panic]
    } else {
        vec![Step::Tok("fine"), Step::Tok(" answer")]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_of_delivered_and_failed_asks_costs_only_the_delivered_ones() {
    let service = AskService::builder(config_with_limit(10)).generator(Arc::new(ScriptGen(flaky)));
    let server = TestServer::start_with(service).await;
    let auth = bearer("mixed");
    let fail = json!({"query":"please fail"}).to_string();
    let boom = json!({"query":"boom"}).to_string();

    // (path, body, what the client gets: 200 for a delivered answer, else the code)
    let plan: [(&str, &str, &str); 9] = [
        (ASK_STREAM, QUERY, "done"),
        (ASK_STREAM, &fail, "UPSTREAM_ERROR"),
        (ASK, &fail, "UPSTREAM_ERROR"),
        (ASK, QUERY, "done"),
        (ASK_STREAM, &boom, "INTERNAL"),
        (ASK, &boom, "INTERNAL"),
        (ASK_STREAM, &fail, "UPSTREAM_ERROR"),
        (ASK_STREAM, QUERY, "done"),
        (ASK, QUERY, "done"),
    ];
    let mut delivered = 0u64;
    for (path, body, outcome) in plan {
        // Let the refunds of earlier failures land, so `quotaRemaining` is exact.
        server.settled().await;
        let (h, b) = ask(server.addr, path, body, &auth).await;
        match (outcome, path == ASK) {
            ("done", json_mode) => {
                delivered += 1;
                let v = if json_mode {
                    json_of(&h, &b)
                } else {
                    done_of(&h, &b)
                };
                assert_eq!(v["quotaRemaining"], 10 - delivered, "{path} {body}");
            }
            (code, true) => {
                let status = if code == "INTERNAL" { 500 } else { 502 };
                assert_eq!(h.status, status, "{path} {body}");
                let v: Value = serde_json::from_slice(&b).unwrap();
                assert_eq!(v["code"], code);
            }
            (code, false) => {
                assert_eq!(h.status, 200, "{path} {body}");
                let (events, _) = parse_sse(&b);
                let last = events.last().unwrap();
                assert_eq!(
                    (&last["type"], &last["code"]),
                    (&json!("error"), &json!(code))
                );
            }
        }
    }
    server.settled().await;
    assert_eq!(delivered, 4);
    assert_eq!(remaining(server.addr, "mixed").await, 10 - delivered);
}
