//! Smoke test of the load tool's engine against the real server, in-process: a couple of
//! seconds at low load must produce no error and every answer must carry all its tokens.
//! No timing is asserted — CI machines vary; the load tool itself is how speed is measured.
//!
//! Also against `hyper_floor` (the floor's job done through hyper), started as the tool
//! starts a server: its flags, its `listening` line.

use std::time::Duration;

use askstream::pipeline::sim::SimConfig;
use askstream::{AskService, GeneratorConfig, ServiceConfig};
use loadtest::engine::{self, Load, Results, Settings};
use tokio::sync::oneshot;

const TOKENS: u32 = 6;

/// A server on 127.0.0.1:0 paced like a (fast) real model, with room for every ask.
async fn start_server() -> (
    std::net::SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    start_server_with(None).await
}

/// [`start_server`], speaking TLS with `tls` when given.
async fn start_server_with(
    tls: Option<askstream::TlsFiles>,
) -> (
    std::net::SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let config = ServiceConfig {
        tls,
        generator: GeneratorConfig::Sim(SimConfig {
            ttft: Duration::ZERO,
            token_interval: Duration::from_millis(2),
            tokens: TOKENS,
        }),
        quota_limit: 1_000_000_000,
        shutdown_grace: Duration::from_secs(2),
        ..ServiceConfig::default()
    };
    let service = AskService::builder(config).build().expect("service builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        askstream::serve(listener, service, async {
            let _ = stopped.await;
        })
        .await;
    });
    (addr, stop, task)
}

fn settings(addr: std::net::SocketAddr, load: Load, keep_alive: bool) -> Settings {
    Settings {
        label: "smoke".into(),
        addr,
        path: "/api/v1/ai/ask?stream=true".into(),
        query: "How do quota refunds work?".into(),
        load,
        duration: Duration::from_secs(2),
        warmup: Duration::from_millis(200),
        ramp: Duration::from_millis(50),
        users: 3,
        keep_alive,
        h2c: None,
        tls: false,
        tls_resume: false,
        stream_timeout: Duration::from_secs(20),
        max_streams_total: 100_000,
        expect_tokens: Some(u64::from(TOKENS)),
        server_pid: Some(std::process::id()),
        progress: false,
        seed: 7,
    }
}

/// What every smoke run must show, whatever the machine's speed.
fn assert_clean(r: &Results) {
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert!(
        r.warmup_errors.is_empty(),
        "warm-up errors: {:?}",
        r.warmup_errors
    );
    assert!(r.completed > 0, "no answer completed");
    let expected = u64::from(TOKENS);
    assert_eq!(r.tokens_per_answer, Some((expected, expected)));
    // (Not `token_events >= completed * TOKENS`: an answer that began in the warm-up had
    // some of its tokens counted there.)
    assert!(r.token_events > 0);
    assert!(r.ttft.count() > 0 && r.gap.count() > 0 && r.total.count() > 0);
    assert!(r.server.cpu.is_some() || !std::path::Path::new("/proc/self/stat").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_new_connection_per_answer() {
    let (addr, stop, task) = start_server().await;
    let r = engine::run(settings(addr, Load::Closed { concurrency: 4 }, false))
        .await
        .expect("runs");
    assert_clean(&r);
    assert!(r.connect.count() > 0);
    assert!(r.peak_in_flight <= 4);
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_keep_alive_reuses_connections() {
    let (addr, stop, task) = start_server().await;
    let r = engine::run(settings(addr, Load::Closed { concurrency: 4 }, true))
        .await
        .expect("runs");
    assert_clean(&r);
    // Four slots: new connections only when a slot starts (or a server closes one).
    assert!(
        r.connect.count() < r.completed,
        "{} connects for {} answers",
        r.connect.count(),
        r.completed
    );
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_measures_from_arrival() {
    let (addr, stop, task) = start_server().await;
    let load = Load::Open {
        rate: 40.0,
        max_in_flight: 64,
    };
    let r = engine::run(settings(addr, load, false))
        .await
        .expect("runs");
    assert_clean(&r);
    assert_eq!(r.ttft_from_arrival.count(), r.ttft.count());
    assert_eq!(r.send_lag.count(), r.ttft.count());
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn refuses_non_loopback_targets() {
    let mut s = settings(
        "127.0.0.1:1".parse().unwrap(),
        Load::Closed { concurrency: 1 },
        false,
    );
    s.addr = "192.0.2.1:80".parse().unwrap();
    let err = engine::run(s).await.unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}

#[tokio::test]
async fn counts_refused_connections_as_errors() {
    // Bind then drop: nothing listens on this port any more.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut s = settings(addr, Load::Closed { concurrency: 1 }, false);
    s.duration = Duration::from_millis(300);
    s.warmup = Duration::ZERO;
    s.max_streams_total = 5;
    let r = engine::run(s).await.expect("runs");
    assert_eq!(r.completed, 0);
    assert!(
        r.errors.keys().any(|k| k.starts_with("connect")),
        "{:?}",
        r.errors
    );
}

/// Six slots as HTTP/2 streams over two shared connections (hyper's client cannot fall
/// back to HTTP/1.1, so a clean run is an h2c run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_over_h2c_multiplexes_on_shared_connections() {
    let (addr, stop, task) = start_server().await;
    let mut s = settings(addr, Load::Closed { concurrency: 6 }, false);
    s.h2c = Some(2);
    let r = engine::run(s).await.expect("runs");
    assert_clean(&r);
    assert!(r.peak_in_flight <= 6);
    let _ = stop.send(());
    task.await.unwrap();
}

/// HTTP/1.1 over TLS, new connection per answer (full handshakes, then resumed ones) and
/// keep-alive, against a server that speaks TLS only (so a clean run is a TLS run), with
/// the certificate the tool makes for spawned servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_over_tls_with_and_without_keep_alive() {
    let dir = std::env::temp_dir().join(format!("loadtest-smoke-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = loadtest::tls::self_signed(&dir).expect("a certificate");
    let (addr, stop, task) = start_server_with(Some(askstream::TlsFiles { cert, key })).await;
    for (keep_alive, resume) in [(false, false), (false, true), (true, false)] {
        let mut s = settings(addr, Load::Closed { concurrency: 4 }, keep_alive);
        s.tls = true;
        s.tls_resume = resume;
        let r = engine::run(s).await.expect("runs");
        assert_clean(&r);
        // Keep-alive connects during the warm-up only, outside the measured window.
        assert!(keep_alive || r.connect.count() > 0);
    }
    let _ = stop.send(());
    task.await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `hyper_floor` as a child process; killed when dropped, so a failed assertion leaves
/// nothing behind.
struct HyperFloor {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Drop for HyperFloor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `hyper_floor` on a free port, paced as [`start_server`]'s server, and reads
/// where it listens from its first line.
fn start_hyper_floor() -> HyperFloor {
    start_hyper_floor_with(&[])
}

/// [`start_hyper_floor`] with more flags.
fn start_hyper_floor_with(extra: &[&str]) -> HyperFloor {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hyper_floor"))
        .args(["--listen", "127.0.0.1:0", "--sim-token-ms", "2"])
        .args(["--sim-tokens", &TOKENS.to_string()])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("hyper_floor starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut line = String::new();
    std::io::BufReader::new(stderr)
        .read_line(&mut line)
        .expect("reads the listening line");
    let addr = line
        .split_once("addr=")
        .and_then(|(_, addr)| addr.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    HyperFloor { child, addr }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_floor_answers_every_ask_whole() {
    let server = start_hyper_floor();
    let s = Settings {
        server_pid: Some(server.child.id()),
        ..settings(server.addr, Load::Closed { concurrency: 4 }, false)
    };
    let r = engine::run(s).await.expect("runs");
    assert_clean(&r);
}

/// One ask on a connection of its own (`connection: close`), `extra` being more header
/// lines; the whole response, read to the close.
fn ask_once(addr: std::net::SocketAddr, path: &str, extra: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connects");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = r#"{"query":"q"}"#;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n{extra}\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).expect("reads to the close");
    response
}

/// As the floor does: no bearer token, no answer.
#[test]
fn hyper_floor_refuses_an_ask_without_a_bearer_token() {
    let server = start_hyper_floor();
    let response = ask_once(server.addr, "/api/v1/ai/ask?stream=true", "");
    assert!(
        response.starts_with("HTTP/1.1 401 "),
        "not a 401: {response:?}"
    );
}

/// A non-streaming ask is refused with 501 before it is charged: with a quota of one,
/// the streaming ask after it is still answered, and only the next is refused.
#[test]
fn hyper_floor_refuses_a_json_ask_without_charging_it() {
    let server = start_hyper_floor_with(&["--quota-limit", "1"]);
    let auth = "authorization: Bearer floor-user\r\n";
    let json = ask_once(server.addr, "/api/v1/ai/ask", auth);
    assert!(json.starts_with("HTTP/1.1 501 "), "not a 501: {json:?}");
    let stream = ask_once(server.addr, "/api/v1/ai/ask?stream=true", auth);
    assert!(
        stream.starts_with("HTTP/1.1 200 ") && stream.contains("\"type\":\"done\""),
        "the quota's one ask is still there: {stream:?}"
    );
    let over = ask_once(server.addr, "/api/v1/ai/ask?stream=true", auth);
    assert!(over.starts_with("HTTP/1.1 429 "), "not a 429: {over:?}");
}
