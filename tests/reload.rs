//! Reloading the keys file (contract §1.3): [`AskService::reload`] in a server on a real
//! socket, and SIGHUP to the real binary. Asks identified after a reload use the new keys;
//! an answer streaming across the reload finishes and is charged once; a file that fails
//! to load keeps the old keys. (The certificate's reload is in `tests/tls.rs`.)

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use askstream::AskService;
use support::process::{self, send_signal, wait_for_line};
use support::script::GateGen;
use support::*;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// A keys file in a fresh folder, rewritten by the test.
struct KeysFile(PathBuf);

impl KeysFile {
    fn new(name: &str, text: &str) -> KeysFile {
        let dir =
            std::env::temp_dir().join(format!("askstream-reload-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = KeysFile(dir.join("keys.txt"));
        file.write(text);
        file
    }

    /// Replaces the file whole (a rename, as deploy tools do), so a reload never reads
    /// half of it.
    fn write(&self, text: &str) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }
}

impl Drop for KeysFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The status of `GET /api/v1/quota` with bearer `key`, and the body when it is 200.
async fn quota_with(addr: SocketAddr, key: &str) -> (u16, Option<serde_json::Value>) {
    let mut c = RawConn::connect(addr).await;
    c.get("/api/v1/quota", &bearer(key)).await;
    let head = c.read_head().await;
    let body = c.read_body(&head).await;
    let value = (head.status == 200).then(|| serde_json::from_slice(&body).unwrap());
    (head.status, value)
}

/// Alice's key is rotated while one of her answers streams: from the reload on, the old
/// key is refused and the new one is hers, with her quota; the live answer finishes and
/// is charged once. A broken file then changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_keys_for_new_asks_and_spares_the_live_answer() {
    let keys = KeysFile::new("rotate", "old-key alice 5\n");
    let config = fast_config_with(|c| c.keys = Some(keys.0.clone()));
    let gate = CancellationToken::new();
    let server = TestServer::start_with(
        AskService::builder(config).generator(Arc::new(GateGen(gate.clone()))),
    )
    .await;

    let mut live = RawConn::connect(server.addr).await;
    live.start_stream("rotate me", "old-key").await;
    let first = live.read_chunk().await.expect("the first token");
    assert!(find(&first, b"\"one\"").is_some(), "{first:?}");

    keys.write("new-key alice 5\n");
    server.service.reload().expect("the new file loads");

    assert_eq!(quota_with(server.addr, "old-key").await.0, 401);
    let (status, _) = quota_with(server.addr, "new-key").await;
    assert_eq!(status, 200, "the rotated key is accepted");

    // The answer identified with the old key goes on, and ends complete.
    gate.cancel();
    let (rest, ended) = tokio::time::timeout(WAIT, live.read_chunked_body())
        .await
        .expect("the live answer ends");
    assert!(ended, "the body's last chunk arrived");
    let events = parse_sse(&[first, rest].concat()).0;
    let types: Vec<_> = events.iter().map(|e| e["type"].clone()).collect();
    assert_eq!(types, ["token", "token", "done"], "{events:?}");
    server.settled().await;
    let (_, q) = quota_with(server.addr, "new-key").await;
    assert_eq!(
        q.unwrap()["remaining"],
        4,
        "the live answer was charged once, to alice"
    );

    // A file that does not parse leaves the keys as they were, and says which file.
    keys.write("new-key\n");
    let err = server.service.reload().expect_err("a key without a user");
    assert!(err.to_string().contains("keys.txt"), "{err}");
    assert!(
        !err.to_string().contains("new-key"),
        "the key is not echoed: {err}"
    );
    assert_eq!(quota_with(server.addr, "new-key").await.0, 200);
    assert_eq!(quota_with(server.addr, "old-key").await.0, 401);

    // A file that has gone is the same.
    std::fs::remove_file(&keys.0).unwrap();
    assert!(server.service.reload().is_err());
    assert_eq!(quota_with(server.addr, "new-key").await.0, 200);
}

/// Keys the embedder handed the builder are not replaced by a reload, even with
/// `config.keys` set: the service never read that file.
#[tokio::test]
async fn a_reload_keeps_keys_given_to_the_builder() {
    let keys = KeysFile::new("given", "file-key bob\n");
    let config = fast_config_with(|c| c.keys = Some(keys.0.clone()));
    let auth = askstream::auth::Auth::parse("given-key carol\n").unwrap();
    let server = TestServer::start_with(AskService::builder(config).auth(auth)).await;
    server.service.reload().expect("nothing to reload");
    assert_eq!(quota_with(server.addr, "given-key").await.0, 200);
    assert_eq!(quota_with(server.addr, "file-key").await.0, 401);
}

/// SIGHUP to the binary reloads the keys file and logs it; a broken file is logged and
/// the old keys stay; the process keeps serving (SIGHUP's default would end it).
#[tokio::test]
async fn sighup_reloads_the_keys_file_of_the_binary() {
    let keys = KeysFile::new("sighup", "first-key dave\n");
    let path = keys.0.to_string_lossy().into_owned();
    let (child, lines, mut log, addr) = process::spawn(process::command(&["--keys", &path], &[]));
    assert_eq!(quota_with(addr, "first-key").await.0, 200);

    keys.write("second-key dave\n");
    send_signal(&child, "-HUP");
    wait_for_line(&lines, &mut log, "keys file reloaded", WAIT);
    assert_eq!(quota_with(addr, "first-key").await.0, 401);
    assert_eq!(quota_with(addr, "second-key").await.0, 200);

    keys.write("second-key dave not-a-number\n");
    send_signal(&child, "-HUP");
    let line = wait_for_line(&lines, &mut log, "keys file not reloaded", WAIT);
    assert!(line.contains("WARN") && line.contains("line 1"), "{line}");
    assert!(
        !line.contains("second-key"),
        "the key is not logged: {line}"
    );
    assert_eq!(quota_with(addr, "second-key").await.0, 200);
    drop(child);
}
