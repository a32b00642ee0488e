//! The real `askstream` binary as a child process: killed if the test fails first, its
//! log lines on a channel (the pipe keeps draining), signals sent to it.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Kills the child if the test fails before it exits.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `askstream` with `args`, `--listen 127.0.0.1:0`, `RUST_LOG=info` and no `ASKSTREAM_*`
/// variable from the test's environment; `env` is set on top.
pub fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    wrapped(&[], args, env)
}

/// [`command`] run by another program: `wrapper` is that program and its arguments, and
/// the binary's path and arguments follow them (`strace -o trace askstream …`).
pub fn wrapped(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Command {
    let bin = env!("CARGO_BIN_EXE_askstream");
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut cmd = Command::new(program);
            cmd.args(rest).arg(bin);
            cmd
        }
        None => Command::new(bin),
    };
    cmd.args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars() {
        if key.starts_with("ASKSTREAM_") {
            cmd.env_remove(key);
        }
    }
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

/// Starts `cmd` (stderr piped); the child, its log lines as they come, the lines up to
/// and including the one saying it listens, and the address it listens on.
pub fn spawn(mut cmd: Command) -> (Child, mpsc::Receiver<String>, Vec<String>, SocketAddr) {
    let mut child = Child(cmd.spawn().expect("spawn askstream"));
    let stderr = child.0.stderr.take().expect("stderr is piped");
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let addr: SocketAddr = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no `listening` line; stderr so far: {log:#?}"));
        log.push(line.clone());
        if line.contains("listening (") {
            let addr = line
                .split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("no addr= in {line:?}"));
            break addr.parse().expect("a socket address");
        }
    };
    (child, lines, log, addr)
}

/// Waits, at most `within`, for a log line containing `needle`; the lines read on the
/// way are appended to `log`.
pub fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    log: &mut Vec<String>,
    needle: &str,
    within: Duration,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line with {needle:?} in {within:?}; log: {log:#?}"));
        log.push(line.clone());
        if line.contains(needle) {
            return line;
        }
    }
}

/// Sends `signal` (`-TERM`, `-HUP`, …) to the child.
pub fn send_signal(child: &Child, signal: &str) {
    assert!(signal_pid(child.0.id(), signal), "kill {signal} failed");
}

/// Sends `signal` to process `pid`; whether it was delivered. Quiet: a process already
/// gone is `false`, not a message.
pub fn signal_pid(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
