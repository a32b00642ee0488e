//! What one streamed answer costs in system calls, counted by `strace` on the real binary:
//! the request is read once, the response head goes out in the same write as the first
//! token event, and while the answer streams the connection is written once per token
//! event at most and nothing is read from it (contract §6: "each token frame" is the hot
//! path). A change that splits the head from the first token, writes one event in two, or
//! reads the socket on every wake-up fails here, however fast the machine.
//!
//! Skipped (with a notice) where `strace` is missing or cannot trace (no ptrace), unless
//! `ASKSTREAM_REQUIRE_STRACE=1`, which `.ci/run` sets.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use support::process::{self, wait_for_line};
use support::*;

const WAIT: Duration = Duration::from_secs(30);
/// Paced far apart, so each token event is due in a wake-up of its own.
const TOKENS: usize = 8;

/// Whether `strace` runs and can trace here; panics instead of skipping when the
/// environment requires it.
fn strace_works() -> bool {
    let works = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        assert!(
            std::env::var_os("ASKSTREAM_REQUIRE_STRACE").is_none(),
            "ASKSTREAM_REQUIRE_STRACE is set but `strace` does not run or cannot trace here"
        );
        eprintln!("NOTE: skipped: `strace` is not on PATH or cannot trace on this machine");
    }
    works
}

/// The traced binary's own process (strace's child), so the test can stop it cleanly and
/// is sure to kill it if it fails first: killing strace alone would leave it running.
struct Traced(u32);

impl Traced {
    fn child_of(strace: u32) -> Traced {
        for _ in 0..300 {
            let path = format!("/proc/{strace}/task/{strace}/children");
            if let Some(pid) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
            {
                return Traced(pid);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("strace started no child");
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        // Usually gone by now, having been stopped: then there is nothing to kill.
        process::signal_pid(self.0, "-KILL");
    }
}

/// One system call on the answer's connection: its name, and the bytes it wrote as
/// strace prints them (escaped), for a write.
#[derive(Debug)]
struct Call {
    name: String,
    text: String,
}

impl Call {
    fn is_read(&self) -> bool {
        matches!(
            self.name.as_str(),
            "read" | "recvfrom" | "recvmsg" | "readv"
        )
    }

    fn is_write(&self) -> bool {
        matches!(
            self.name.as_str(),
            "write" | "writev" | "sendto" | "sendmsg"
        )
    }

    /// A read that found the socket empty.
    fn is_empty_read(&self) -> bool {
        self.is_read() && self.text.contains("= -1 EAGAIN")
    }

    /// Token events in what it wrote (strace escapes the JSON's quotes).
    fn token_events(&self) -> usize {
        self.text.matches(r#"{\"type\":\"token\""#).count()
    }
}

/// The calls, in order, on the server's socket whose peer is the client's `port`. With
/// `-yy`, strace names a TCP descriptor `[local->peer]`. A call that another thread
/// interrupts is printed in two lines, `… <unfinished ...>` with the descriptor and
/// `<... name resumed> …` with the result; the two are joined here.
fn calls_on(trace: &str, port: u16) -> Vec<Call> {
    let peer = format!("->127.0.0.1:{port}]>");
    let mut calls: Vec<Call> = Vec::new();
    // The calls left unfinished, by thread: where they are in `calls`.
    let mut unfinished: HashMap<&str, usize> = HashMap::new();
    for line in trace.lines() {
        let Some((pid, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        if call.starts_with("<... ") {
            if let Some(i) = unfinished.remove(pid) {
                let result = call.split_once("resumed>").map_or(call, |(_, r)| r);
                calls[i].text.push_str(result);
            }
            continue;
        }
        let Some((name, args)) = call.split_once('(') else {
            continue;
        };
        let (fd, rest) = args.split_once(',').unwrap_or((args, ""));
        if fd.contains(&peer) {
            if rest.ends_with("<unfinished ...>") {
                unfinished.insert(pid, calls.len());
            }
            calls.push(Call {
                name: name.to_string(),
                text: rest.trim_start().to_string(),
            });
        }
    }
    calls
}

#[tokio::test]
async fn an_answer_reads_its_request_once_and_writes_each_token_event_once() {
    if !strace_works() {
        return;
    }
    let trace_file: PathBuf =
        std::env::temp_dir().join(format!("askstream-syscalls-{}.trace", std::process::id()));
    let trace_path = trace_file.to_string_lossy().into_owned();
    let tokens = TOKENS.to_string();
    let cmd = process::wrapped(
        &[
            "strace",
            "-f",
            "-qq",
            "-yy",
            "-s",
            "65536",
            "-e",
            "trace=read,readv,recvfrom,recvmsg,write,writev,sendto,sendmsg",
            "-o",
            &trace_path,
        ],
        &[
            "--sim-ttft-ms",
            "0",
            "--sim-token-ms",
            "20",
            "--sim-tokens",
            &tokens,
        ],
        &[],
    );
    let (mut strace, lines, mut log, addr) = process::spawn(cmd);
    let server = Traced::child_of(strace.0.id());

    let mut conn = RawConn::connect(addr).await;
    let port = conn.stream.local_addr().unwrap().port();
    conn.start_stream("how are refunds made", "syscall-user")
        .await;
    let (body, ended) = tokio::time::timeout(WAIT, conn.read_chunked_body())
        .await
        .expect("the answer ends");
    assert!(ended, "the body's last chunk arrived");
    let events = parse_sse(&body).0;
    assert_eq!(events.len(), TOKENS + 1, "{events:?}");
    assert_eq!(events[TOKENS]["type"], "done");
    drop(conn);
    wait_for_line(&lines, &mut log, "ask finished", WAIT);

    // A graceful stop, so strace sees the process out and the trace is whole.
    assert!(
        process::signal_pid(server.0, "-TERM"),
        "SIGTERM reaches the binary"
    );
    wait_for_line(&lines, &mut log, "shut down", WAIT);
    let _ = strace.0.wait();
    let trace = std::fs::read_to_string(&trace_file).expect("strace wrote its trace");
    let _ = std::fs::remove_file(&trace_file);

    let calls = calls_on(&trace, port);
    let writes: Vec<&Call> = calls.iter().filter(|c| c.is_write()).collect();
    let first = calls
        .iter()
        .position(Call::is_write)
        .unwrap_or_else(|| panic!("no write on the connection: {calls:#?}"));
    let last = calls.iter().rposition(Call::is_write).unwrap_or(first);

    // A read may find the socket empty where the runtime was told, late, that it is
    // readable: an edge-triggered event for the write side carries the read bit too, and
    // under load one can arrive after the read that took the request. That costs one
    // call, not one per token, and is allowed once; what was read is held exactly.
    let empty_reads: Vec<&Call> = calls[..=last]
        .iter()
        .filter(|c| c.is_empty_read())
        .collect();
    assert!(
        empty_reads.len() <= 1,
        "at most one read finds the socket empty before the answer ends: {calls:#?}"
    );
    let reads_before = calls[..first]
        .iter()
        .filter(|c| c.is_read() && !c.is_empty_read())
        .count();
    assert_eq!(
        reads_before, 1,
        "the request, sent in one write, is read in one read: {calls:#?}"
    );
    let head = &calls[first];
    assert!(
        head.text.contains("HTTP/1.1 200 OK") && head.token_events() == 1,
        "the head and the first token event leave in one write: {head:#?}"
    );
    let reads_while_streaming: Vec<&Call> = calls[first..=last]
        .iter()
        .filter(|c| c.is_read() && !c.is_empty_read())
        .collect();
    assert!(
        reads_while_streaming.is_empty(),
        "nothing is read while the answer streams (the client sent nothing): {reads_while_streaming:#?}"
    );
    let written: usize = writes.iter().map(|c| c.token_events()).sum();
    assert_eq!(
        written, TOKENS,
        "every token event was written once: {writes:#?}"
    );
    assert!(
        writes.len() <= TOKENS + 1,
        "at most one write per token event, and one for the end: {} writes: {writes:#?}",
        writes.len()
    );
    assert!(
        writes.iter().all(|w| w.text.starts_with('"')),
        "each write is one buffer (hyper copies the frames ready into one): {writes:#?}"
    );
}
