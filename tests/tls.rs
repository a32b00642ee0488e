//! TLS on the port (contract §1.4), against the real server on a real socket with a
//! certificate the test makes: ALPN picks h2 or HTTP/1.1; streams, JSON and errors work
//! over both, with several streams multiplexed on one h2 connection; a client that
//! leaves mid-answer is refunded; a handshake that stalls is dropped at the head
//! deadline; unusable files stop the start.

#![cfg(feature = "tls")]

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use askstream::{AskService, ServiceConfig, StartupError, TlsFiles};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use support::{TestServer, ask_body, config_with_limit, data_events, dechunk_prefix, find};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const WAIT: Duration = Duration::from_secs(20);
const QUERY: &str = "How do quota refunds work?";

/// A self-signed certificate for `localhost` and 127.0.0.1, written to a fresh folder.
struct Cert {
    dir: PathBuf,
    der: CertificateDer<'static>,
}

impl Cert {
    fn new(name: &str) -> Cert {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("a certificate");
        let dir = std::env::temp_dir().join(format!("askstream-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), made.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), made.key_pair.serialize_pem()).unwrap();
        Cert {
            dir,
            der: made.cert.der().clone(),
        }
    }

    /// Puts this certificate and key in place of `other`'s files, each by a rename, as
    /// certificate tools renew them.
    fn install_over(&self, other: &Cert) {
        for name in ["cert.pem", "key.pem"] {
            let tmp = other.dir.join(format!("{name}.new"));
            std::fs::copy(self.dir.join(name), &tmp).unwrap();
            std::fs::rename(&tmp, other.dir.join(name)).unwrap();
        }
    }

    fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.dir.join("cert.pem"),
            key: self.dir.join("key.pem"),
        }
    }
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_config(cert: &Cert, limit: u32) -> ServiceConfig {
    let mut c = config_with_limit(limit);
    c.tls = Some(cert.files());
    c
}

/// A TLS client that trusts only `cert`, offering `alpn`.
async fn connect(addr: std::net::SocketAddr, cert: &Cert, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    try_connect(addr, cert, alpn)
        .await
        .expect("the TLS handshake completes")
}

/// [`connect`], with the handshake's error (an untrusted certificate) returned.
async fn try_connect(
    addr: std::net::SocketAddr,
    cert: &Cert,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

fn alpn(stream: &TlsStream<TcpStream>) -> Option<&[u8]> {
    stream.get_ref().1.alpn_protocol()
}

/// One HTTP/1.1 request over `stream` with `connection: close`; the raw response.
async fn http1(mut stream: TlsStream<TcpStream>, request: &str) -> Vec<u8> {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut out))
        .await
        .expect("the response ends");
    out
}

/// `GET /healthz` over `stream` answers 200: the server serves on that connection.
async fn assert_healthy(stream: TlsStream<TcpStream>) {
    let raw = http1(
        stream,
        "GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

fn post(path: &str, body: &str, user: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\nauthorization: Bearer {user}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn split_response(raw: &[u8]) -> (String, &[u8]) {
    let end = find(raw, b"\r\n\r\n").expect("a response head") + 4;
    (
        String::from_utf8_lossy(&raw[..end]).into_owned(),
        &raw[end..],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_streams_answers_json_and_errors() {
    let cert = Cert::new("h1");
    let server = TestServer::start(tls_config(&cert, 2)).await;
    for offer in [&[b"http/1.1".as_slice()][..], &[]] {
        let stream = connect(server.addr, &cert, offer).await;
        assert_ne!(alpn(&stream), Some(b"h2".as_slice()));
        let raw = http1(
            stream,
            &post("/api/v1/ai/ask?stream=true", &ask_body(QUERY), "tls-h1"),
        )
        .await;
        let (head, body) = split_response(&raw);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("content-type: text/event-stream"), "{head}");
        let events = data_events(&dechunk_prefix(body).0);
        assert_eq!(
            events.last().map(|e| e["type"].clone()),
            Some("done".into())
        );
    }
    // The quota is spent: a JSON ask gets the error document, over TLS as in cleartext.
    let stream = connect(server.addr, &cert, &[b"http/1.1"]).await;
    let raw = http1(stream, &post("/api/v1/ai/ask", &ask_body(QUERY), "tls-h1")).await;
    let (head, body) = split_response(&raw);
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    let err: serde_json::Value = serde_json::from_slice(body).unwrap();
    support::assert_error_object(&err, "QUOTA_EXCEEDED", "json over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_multiplexes_answers_on_one_connection() {
    let cert = Cert::new("h2");
    let server = TestServer::start(tls_config(&cert, 100)).await;
    let stream = connect(server.addr, &cert, &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn(&stream), Some(b"h2".as_slice()));
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 over TLS");
    let driver = tokio::spawn(conn);
    let asks: Vec<_> = (0..8)
        .map(|i| {
            let mut send = send.clone();
            tokio::spawn(async move {
                let req = http::Request::post("https://localhost/api/v1/ai/ask?stream=true")
                    .header("content-type", "application/json")
                    .header("authorization", format!("Bearer tls-h2-{i}"))
                    .body(Full::new(Bytes::from(ask_body(QUERY))))
                    .unwrap();
                send.ready().await.unwrap();
                let res = send.send_request(req).await.expect("a response");
                assert_eq!(res.status(), 200);
                assert_eq!(res.version(), http::Version::HTTP_2);
                let body = res.into_body().collect().await.unwrap().to_bytes();
                let events = data_events(&body);
                assert_eq!(
                    events.last().map(|e| e["type"].clone()),
                    Some("done".into())
                );
            })
        })
        .collect();
    for a in asks {
        tokio::time::timeout(WAIT, a)
            .await
            .expect("the ask ends")
            .unwrap();
    }
    for i in 0..8 {
        assert_eq!(server.remaining_in_store(&format!("tls-h2-{i}"), 100), 99);
    }
    drop(send);
    driver.abort();
}

/// Posts a streaming ask as `user` over HTTP/1.1 on TLS and reads what arrives first:
/// the connection and those bytes, which hold the head and the first token event.
async fn start_stream_over_tls(
    server: &TestServer,
    cert: &Cert,
    user: &str,
) -> (TlsStream<TcpStream>, Vec<u8>) {
    let mut stream = connect(server.addr, cert, &[b"http/1.1"]).await;
    stream
        .write_all(post("/api/v1/ai/ask?stream=true", &ask_body(QUERY), user).as_bytes())
        .await
        .unwrap();
    let mut first = vec![0; 4096];
    let n = tokio::time::timeout(WAIT, stream.read(&mut first))
        .await
        .expect("the head and first token")
        .unwrap();
    first.truncate(n);
    assert!(find(&first, b"\"type\":\"token\"").is_some(), "{first:?}");
    (stream, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_answer_over_tls_is_refunded() {
    let cert = Cert::new("leave");
    let mut config = tls_config(&cert, 10);
    support::sim(&mut config).ttft = Duration::ZERO;
    support::sim(&mut config).token_interval = Duration::from_secs(3600);
    config.heartbeat = Duration::from_secs(3600);
    let server = TestServer::start(config).await;
    let (stream, _) = start_stream_over_tls(&server, &cert, "tls-leave").await;
    assert_eq!(server.remaining_in_store("tls-leave", 10), 9);
    drop(stream);
    server.settled().await;
    assert_eq!(server.remaining_in_store("tls-leave", 10), 10, "refunded");
}

/// A client that ends its TLS session (`close_notify`) mid-answer but keeps the TCP
/// connection open may go on reading, as TLS allows: it is sent the rest of its answer,
/// which is charged (README, "Serving browsers directly"). Only closing the connection
/// ends an answer over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_notify_with_tcp_open_mid_answer_gets_the_whole_answer() {
    let cert = Cert::new("notify");
    let mut config = tls_config(&cert, 10);
    support::sim(&mut config).ttft = Duration::ZERO;
    support::sim(&mut config).token_interval = Duration::from_millis(20);
    support::sim(&mut config).tokens = 6;
    let server = TestServer::start(config).await;
    let (mut stream, mut raw) = start_stream_over_tls(&server, &cert, "tls-notify").await;
    assert!(
        find(&raw, b"\"type\":\"done\"").is_none(),
        "still streaming"
    );

    // close_notify alone: the TCP connection stays open, and this side still reads.
    stream.get_mut().1.send_close_notify();
    stream.flush().await.expect("close_notify sent");
    let rest = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        // The server closes once the answer is done; how (with its own close_notify or
        // not) does not matter here.
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            raw.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(rest.is_ok(), "the server closes after the answer");
    let (_, body) = split_response(&raw);
    let events = data_events(&dechunk_prefix(body).0);
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some("done".into()),
        "{events:?}"
    );
    server.settled().await;
    assert_eq!(
        server.remaining_in_store("tls-notify", 10),
        9,
        "charged once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_dropped_at_the_head_deadline() {
    let cert = Cert::new("stall");
    let mut config = tls_config(&cert, 10);
    config.header_timeout = Duration::from_secs(1);
    let server = TestServer::start(config).await;
    // Connected, then silent: no ClientHello.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0; 64];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("the server closes the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Half a ClientHello, then silent.
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let read = tokio::time::timeout(WAIT, half.read(&mut buf))
        .await
        .expect("the server closes the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The server still serves.
    assert_healthy(connect(server.addr, &cert, &[b"http/1.1"]).await).await;
}

#[test]
fn unusable_tls_files_stop_the_start() {
    let cert = Cert::new("bad");
    let missing = TlsFiles {
        cert: cert.dir.join("nope.pem"),
        key: cert.dir.join("key.pem"),
    };
    std::fs::write(cert.dir.join("garbage.pem"), "not a certificate\n").unwrap();
    let garbage = TlsFiles {
        cert: cert.dir.join("garbage.pem"),
        key: cert.dir.join("key.pem"),
    };
    let other = Cert::new("other");
    let mismatched = TlsFiles {
        cert: cert.dir.join("cert.pem"),
        key: other.dir.join("key.pem"),
    };
    for (what, files) in [
        ("missing", missing),
        ("garbage", garbage),
        ("mismatched", mismatched),
    ] {
        let mut c = config_with_limit(5);
        c.tls = Some(files);
        match AskService::builder(c).build() {
            Err(StartupError::Tls(why)) => assert!(!why.is_empty(), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

/// The certificate is renewed while an answer streams over h2: after the reload, new
/// handshakes get the new certificate (a client trusting only the old one fails), the
/// connection accepted before keeps working (new streams too) and its live answer
/// finishes. A broken file then keeps the renewed certificate in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_gives_new_connections_the_new_certificate_and_spares_live_ones() {
    let old = Cert::new("renew-old");
    let new = Cert::new("renew-new");
    let gate = tokio_util::sync::CancellationToken::new();
    let server = TestServer::start_with(
        AskService::builder(tls_config(&old, 100))
            .generator(Arc::new(support::script::GateGen(gate.clone()))),
    )
    .await;

    let stream = connect(server.addr, &old, &[b"h2"]).await;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 over TLS");
    let driver = tokio::spawn(conn);
    let ask = |send: &hyper::client::conn::http2::SendRequest<Full<Bytes>>, user: &str| {
        let req = http::Request::post("https://localhost/api/v1/ai/ask?stream=true")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {user}"))
            .body(Full::new(Bytes::from(ask_body(QUERY))))
            .unwrap();
        send.clone().send_request(req)
    };
    let mut live = ask(&send, "renew-live")
        .await
        .expect("a response")
        .into_body();
    let first = tokio::time::timeout(WAIT, live.frame())
        .await
        .expect("the first token")
        .expect("a frame")
        .unwrap();
    let first = first.into_data().unwrap();
    assert!(find(&first, b"\"one\"").is_some(), "{first:?}");

    new.install_over(&old);
    server.service.reload().expect("the renewed files load");

    let err = try_connect(server.addr, &old, &[b"h2"]).await.err();
    assert!(
        err.is_some(),
        "a new handshake no longer shows the old certificate"
    );
    let fresh = connect(server.addr, &new, &[b"h2"]).await;
    let shown = fresh.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(shown, new.der, "a new handshake shows the new certificate");
    drop(fresh);

    // The old connection still carries new streams, and its live answer ends complete.
    gate.cancel();
    let again = ask(&send, "renew-again").await.expect("a response");
    assert_eq!(again.status(), 200);
    let again = again.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(data_events(&again).last().unwrap()["type"], "done");
    let rest = tokio::time::timeout(WAIT, live.collect())
        .await
        .expect("the live answer ends")
        .unwrap()
        .to_bytes();
    let events = data_events(&[first.as_ref(), rest.as_ref()].concat());
    let types: Vec<_> = events.iter().map(|e| e["type"].clone()).collect();
    assert_eq!(types, ["token", "token", "done"], "{events:?}");

    // A certificate file that does not parse: the renewed certificate stays.
    std::fs::write(old.dir.join("cert.pem"), "not a certificate\n").unwrap();
    let err = server
        .service
        .reload()
        .expect_err("garbage is not a certificate");
    assert!(err.to_string().contains("cert.pem"), "{err}");
    assert_healthy(connect(server.addr, &new, &[b"http/1.1"]).await).await;
    drop(send);
    driver.abort();
}

/// SIGHUP to the binary renews its certificate for new handshakes, and logs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_renews_the_certificate_of_the_binary() {
    use support::process::{self, send_signal, wait_for_line};
    let old = Cert::new("sighup-old");
    let new = Cert::new("sighup-new");
    let files = old.files();
    let (cert, key) = (
        files.cert.display().to_string(),
        files.key.display().to_string(),
    );
    let (child, lines, mut log, addr) = process::spawn(process::command(
        &["--tls-cert", &cert, "--tls-key", &key],
        &[],
    ));
    drop(connect(addr, &old, &[b"http/1.1"]).await);

    new.install_over(&old);
    send_signal(&child, "-HUP");
    wait_for_line(&lines, &mut log, "TLS certificate reloaded", WAIT);
    assert!(try_connect(addr, &old, &[b"http/1.1"]).await.is_err());
    let fresh = connect(addr, &new, &[b"http/1.1"]).await;
    assert_eq!(fresh.get_ref().1.peer_certificates().unwrap()[0], new.der);
    assert_healthy(fresh).await;
    drop(child);
}
