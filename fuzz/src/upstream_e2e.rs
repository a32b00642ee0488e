//! The openai generator itself (`askstream::pipeline::openai::OpenAiGenerator`) against a
//! fake upstream on loopback that answers with the input: the crate-private chunk parser
//! (`wire.rs`) and the stream's state machine (`stream.rs`: head checks, refused bodies,
//! events, draining after `[DONE]`) reached through the public API, without changing src/.
//!
//! # Input
//!
//! - If it starts with `HTTP/`, it is the whole response, written to the socket as it is
//!   (status line, headers, body; then the connection is closed): hyper's client parses the
//!   head, and the generator judges status, `content-type`, `content-encoding`, a refused
//!   body's error object.
//! - Otherwise it is the body of a `200` `text/event-stream` response, sent chunked in
//!   chunks of 1, 2, 4, 8… bytes (corpus files are event streams, as for `upstream_chunks`).
//!
//! Each input gets a new generator (so a new connection: a pooled one could be stale and
//! make the result depend on the input before). The generator has an API key,
//! `sk-fuzz-secret-key`, which upstream text may echo.
//!
//! # Invariants
//!
//! - no panic; the stream ends within 10 s; nothing follows an error; every token is
//!   non-empty; at most one usage report per chunk that had one;
//! - no error message carries the API key, and none is longer than 600 characters (upstream
//!   text is clipped to 200);
//! - for a body (second form) whose every event is in the subset where
//!   `upstream_chunks::meaning` is exact, the tokens, usage reports and the way the answer
//!   ends are exactly what that model of `wire.rs` and `stream.rs` says.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use askstream::pipeline::openai::{ApiKey, OpenAiConfig, OpenAiGenerator};
use askstream::pipeline::{Chunk, Generator, PipelineError, PipelineErrorKind, Prompt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::upstream_chunks::{self, Step};

const KEY: &str = "sk-fuzz-secret-key";

struct Harness {
    rt: tokio::runtime::Runtime,
    base: String,
    /// What the fake upstream answers to the next request.
    response: Arc<Mutex<Vec<u8>>>,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let response = Arc::new(Mutex::new(Vec::new()));
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port");
        let base = format!("http://{}/v1", listener.local_addr().expect("its address"));
        let answer = response.clone();
        rt.spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let answer = answer.clone();
                tokio::spawn(fake_upstream(socket, answer));
            }
        });
        Harness { rt, base, response }
    })
}

/// Reads one request (head, then a `content-length` body), writes the response, closes.
async fn fake_upstream(mut socket: tokio::net::TcpStream, answer: Arc<Mutex<Vec<u8>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let response = answer.lock().expect("not poisoned").clone();
    let _ = socket.write_all(&response).await;
    let _ = socket.shutdown().await;
}

/// The bytes the fake upstream sends for `input`.
fn response_for(input: &[u8]) -> Vec<u8> {
    if input.starts_with(b"HTTP/") {
        return input.to_vec();
    }
    let mut out =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    let (mut at, mut size) = (0, 1);
    while at < input.len() {
        let end = (at + size).min(input.len());
        out.extend_from_slice(format!("{:x}\r\n", end - at).as_bytes());
        out.extend_from_slice(&input[at..end]);
        out.extend_from_slice(b"\r\n");
        at = end;
        size *= 2;
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// What the generator yielded, in the model's terms.
fn yielded(items: &[Result<Chunk, PipelineError>]) -> Vec<Step> {
    let mut steps = Vec::new();
    for item in items {
        steps.push(match item {
            Ok(Chunk::Token(t)) => Step::Token(t.text().to_owned()),
            Ok(Chunk::Usage(u)) => Step::Usage {
                prompt: u.prompt_tokens.map(u64::from),
                completion: u.completion_tokens.map(u64::from),
            },
            Err(e) => match e.message.as_str() {
                "malformed chunk from upstream" => Step::Malformed,
                "the upstream ended the stream before [DONE]" => Step::Cut,
                "the upstream sent an event larger than 1 MiB" => Step::TooLarge,
                m => match m.strip_prefix("upstream error: ") {
                    Some(said) => Step::UpstreamError(said.to_owned()),
                    None => panic!("an error the model does not know: {m}"),
                },
            },
        });
    }
    steps
}

pub fn upstream_e2e(input: &[u8]) {
    let h = harness();
    *h.response.lock().expect("not poisoned") = response_for(input);
    let generator = OpenAiGenerator::new(
        OpenAiConfig::new(h.base.clone(), "fuzz-model").with_api_key(ApiKey::new(KEY)),
    )
    .expect("the generator is configured");
    let prompt = Prompt {
        query: Arc::from("what does the upstream say?"),
        passages: Arc::from(Vec::new()),
    };
    let items = h.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            let mut stream = generator.generate(prompt);
            let mut items = Vec::new();
            while let Some(item) = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
                let failed = item.is_err();
                items.push(item);
                if failed {
                    // Nothing may follow an error.
                    let after = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await;
                    assert!(after.is_none(), "an item after an error: {after:?}");
                    break;
                }
            }
            items
        })
        .await
        .expect("the answer ended within 10 s (a hang)")
    });

    if crate::verbose() {
        eprintln!(
            "{:?}: {items:?}",
            String::from_utf8_lossy(&input[..input.len().min(60)])
        );
    }
    for item in &items {
        match item {
            Ok(Chunk::Token(t)) => assert!(!t.text().is_empty(), "an empty token"),
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.kind, PipelineErrorKind::Upstream, "{e:?}");
                assert!(
                    !e.message.contains(KEY),
                    "the key in a message: {}",
                    e.message
                );
                assert!(
                    e.message.chars().count() <= 600,
                    "an unclipped message: {}",
                    e.message
                );
            }
        }
    }

    if input.starts_with(b"HTTP/") {
        return;
    }
    let model = upstream_chunks::read(input, &[]);
    if !model.exact {
        return;
    }
    let mut expected = model.steps;
    // A clean end (`[DONE]`, or the end of the body after a `finish_reason`) is the end of
    // the stream, not an item.
    if matches!(expected.last(), Some(Step::Done | Step::End)) {
        expected.pop();
    }
    for step in &mut expected {
        match step {
            // Upstream text in an error is quoted: the key scrubbed out, then clipped to 200
            // chars.
            Step::UpstreamError(said) => {
                let scrubbed = said.replace(KEY, "[redacted]");
                *said = match scrubbed.char_indices().nth(200) {
                    Some((end, _)) => format!("{}…", &scrubbed[..end]),
                    None => scrubbed,
                };
            }
            // Counts saturate at u32::MAX.
            Step::Usage { prompt, completion } => {
                let saturate = |n: &mut Option<u64>| *n = n.map(|n| n.min(u64::from(u32::MAX)));
                saturate(prompt);
                saturate(completion);
            }
            _ => {}
        }
    }
    assert_eq!(
        yielded(&items),
        expected,
        "the generator (left) differs from the model of wire.rs and stream.rs (right)"
    );
}
