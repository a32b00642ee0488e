//! `--spawn`: run the askstream binary (or the floor) as the target, pinned to its own
//! core; and the process-level chores of a load run (CPU pinning, the open-file limit).
//!
//! Pinning and limits go through the `taskset` and `prlimit` commands (util-linux) rather
//! than libc calls, which this crate does not depend on. Where they are missing the run
//! goes on unpinned, with a warning, since a number from an unpinned run is still a number.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::compare::ServerKind;
use crate::procfs;
use crate::workload::Sim;

/// How long the server may take to start listening and answer `/healthz`.
const STARTUP: Duration = Duration::from_secs(15);

/// A spawned askstream server; killed if dropped without [`Server::stop`].
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its process id (taskset execs it, so this is the server itself).
    pub pid: u32,
    /// Its log (stderr).
    pub log: PathBuf,
    kind: ServerKind,
}

/// How to start the server.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The server binary.
    pub binary: PathBuf,
    /// What it is: askstream takes flags, the floor its environment.
    pub kind: ServerKind,
    /// Its sim flags.
    pub sim: Sim,
    /// `--max-streams`: above the tool's concurrency, so the server never refuses.
    pub max_streams: u32,
    /// Pin to this CPU with `taskset`, if set.
    pub cpu: Option<usize>,
    /// File for its stderr.
    pub log: PathBuf,
    /// Extra flags (`--server-arg`, `--vs-arg`), after the standard ones. A standard flag
    /// they name is left out rather than repeated (askstream's flag parser refuses a flag
    /// given twice), so these override it.
    pub server_args: Vec<String>,
    /// It speaks TLS: readiness is a connection accepted, not `/healthz` in cleartext.
    pub tls: bool,
}

/// Finds the askstream binary next to this executable (where cargo builds both: the
/// workspace shares one target folder).
///
/// When the tool was started by `cargo run`, it first runs `cargo build -p askstream --bin
/// askstream` in the same profile, so the one command reproduces the README's table from a
/// clean checkout and never measures a stale server.
pub fn locate_server() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let binary = exe.with_file_name(format!("askstream{}", std::env::consts::EXE_SUFFIX));
    let release = exe
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == "release");
    let mut build = vec!["build", "-p", "askstream", "--bin", "askstream"];
    if release {
        build.push("--release");
    }
    let shown = format!("cargo {}", build.join(" "));
    if let Some(cargo) = std::env::var_os("CARGO") {
        // This crate's manifest: cargo finds the workspace (and `-p askstream`) from it.
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        eprintln!("loadtest: building the server ({shown})");
        let status = Command::new(cargo)
            .args(&build)
            .args(["--quiet", "--manifest-path", manifest])
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!("building the askstream binary failed ({shown})"));
        }
    }
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!(
            "{} not found; build it: {shown} (or pass --server-bin)",
            binary.display()
        ))
    }
}

impl Server {
    /// Starts the server on a free loopback port and waits until `/healthz` answers.
    pub fn start(launch: &Launch) -> Result<Server, String> {
        let log = std::fs::File::create(&launch.log)
            .map_err(|e| format!("cannot create {}: {e}", launch.log.display()))?;
        let mut cmd = match launch.cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string()]).arg(&launch.binary);
                c
            }
            None => Command::new(&launch.binary),
        };
        // The floor listens where it is told: a port free a moment ago. askstream is given
        // port 0 and says where it listens.
        let floor_addr = match launch.kind {
            ServerKind::Askstream => {
                cmd.args(command_line(launch));
                None
            }
            ServerKind::Floor => {
                let addr = free_port()?;
                cmd.envs(floor_env(launch, addr.port()));
                Some(addr)
            }
        };
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        // The user's ASKSTREAM_* settings (a keys file, other limits) would change what is
        // measured; the spawned server runs with the flags above and defaults only.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ASKSTREAM_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", launch.binary.display()))?;
        let pid = child.id();
        let mut server = Server {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pid,
            log: launch.log.clone(),
            kind: launch.kind,
        };
        match floor_addr {
            None => {
                server.addr = server.wait_listening()?;
                if launch.tls {
                    server.wait_accepting()?;
                } else {
                    server.wait_healthy()?;
                }
            }
            Some(addr) => {
                server.addr = addr;
                server.wait_accepting()?;
            }
        }
        Ok(server)
    }

    /// Polls until the floor accepts a connection (it has no health route).
    fn wait_accepting(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP;
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok() {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!("the floor never listened on {}", self.addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls the log for the `listening ... addr=<addr>` line.
    fn wait_listening(&mut self) -> Result<SocketAddr, String> {
        let deadline = Instant::now() + STARTUP;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(listening_addr) {
                return Ok(addr);
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "the server did not start listening; see {}",
                    self.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `GET /healthz` until it answers 200.
    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP;
        loop {
            if healthz(self.addr).unwrap_or(false) {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!("{} never answered /healthz with 200", self.addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn check_alive(&mut self) -> Result<(), String> {
        let child = self.child.as_mut().expect("running");
        match child.try_wait() {
            Ok(Some(status)) => Err(format!(
                "the server exited ({status}) during startup:\n{}",
                tail(&self.log, 20)
            )),
            Ok(None) => Ok(()),
            Err(e) => Err(format!("cannot watch the server: {e}")),
        }
    }

    /// SIGTERM (a graceful shutdown, as in production), then waits for the exit; kills it
    /// if it has not exited within 15 s.
    pub fn stop(mut self) -> Result<(), String> {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                // The floor has no signal handler: SIGTERM ends it.
                Ok(Some(_)) if self.kind == ServerKind::Floor => return Ok(()),
                Ok(Some(status)) => return Err(format!("the server exited with {status}")),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err("the server did not exit after SIGTERM; killed".into());
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The server's flags: the standard ones, less those `launch.server_args` name, then
/// `launch.server_args`.
pub(crate) fn command_line(launch: &Launch) -> Vec<String> {
    // Port 0 and the log line, rather than guessing a free port: no race with others.
    let standard = [
        ("--listen", "127.0.0.1:0".to_string()),
        ("--sim-ttft-ms", launch.sim.ttft_ms.to_string()),
        ("--sim-token-ms", launch.sim.token_ms.to_string()),
        ("--sim-tokens", launch.sim.tokens.to_string()),
        ("--quota-limit", "1000000000".to_string()),
        ("--max-streams", launch.max_streams.to_string()),
        ("--shutdown-grace-secs", "2".to_string()),
    ];
    let mut line = Vec::new();
    for (flag, value) in standard {
        if !names_flag(&launch.server_args, flag) {
            line.push(flag.to_string());
            line.push(value);
        }
    }
    line.extend(launch.server_args.iter().cloned());
    line
}

/// The floor's settings: where to listen and the workload's sim, in its environment.
pub(crate) fn floor_env(launch: &Launch, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("PORT", port.to_string()),
        ("SIM_TTFT_MS", launch.sim.ttft_ms.to_string()),
        ("SIM_TOKEN_MS", launch.sim.token_ms.to_string()),
        ("SIM_TOKENS", launch.sim.tokens.to_string()),
    ]
}

/// A loopback port nothing listens on now (the kernel's pick, released at once).
fn free_port() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// Whether `args` give `flag`, as `--flag VALUE` or `--flag=VALUE`.
fn names_flag(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| {
        a.strip_prefix(flag)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
    })
}

/// The value `args` give `flag` (`--flag VALUE` or `--flag=VALUE`; the last one counts).
pub(crate) fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let mut found = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(rest) = a.strip_prefix(flag) {
            if rest.is_empty() {
                found = it.next().map(String::as_str);
            } else if let Some(value) = rest.strip_prefix('=') {
                found = Some(value);
            }
        }
    }
    found
}

/// The address in a log line like `... listening (HTTP/1.1 and h2c) addr=127.0.0.1:41234`.
pub(crate) fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening") {
        return None;
    }
    let rest = &line[line.find("addr=")? + "addr=".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Whether `GET /healthz` answers 200.
fn healthz(addr: SocketAddr) -> std::io::Result<bool> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: loadtest\r\nconnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    Ok(&head[..] == b"HTTP/1.1 200")
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether the `taskset` command works here.
pub fn taskset_available() -> bool {
    Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pins this process (all its threads) to `cpu`.
pub fn pin_self(cpu: usize) -> Result<(), String> {
    let out = Command::new("taskset")
        .args([
            "-a",
            "-cp",
            &cpu.to_string(),
            &std::process::id().to_string(),
        ])
        .output()
        .map_err(|e| format!("cannot run taskset: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Makes sure this process may open `need` files, raising its soft limit up to the hard
/// one if needed (a spawned server inherits it). The error says what to run instead of
/// letting thousands of connects fail with "too many open files".
pub fn ensure_fd_limit(need: u64) -> Result<(), String> {
    let Some(limit) = procfs::fd_limit() else {
        return Ok(());
    };
    if limit.soft.is_none_or(|soft| soft >= need) {
        return Ok(());
    }
    let soft = limit.soft.unwrap_or(0);
    if limit.hard.is_some_and(|hard| hard < need) {
        return Err(format!(
            "this run needs about {need} open files, but `ulimit -n` is {soft} and its hard \
             limit {}; raise it (e.g. `ulimit -n {need}` as root, or in limits.conf) or lower \
             the concurrency",
            limit.hard.unwrap_or(0)
        ));
    }
    let hard = limit
        .hard
        .map_or("unlimited".to_string(), |h| h.to_string());
    let raised = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={need}:{hard}"))
        .status()
        .is_ok_and(|s| s.success());
    let now = procfs::fd_limit().and_then(|l| l.soft);
    if raised && now.is_none_or(|s| s >= need) {
        eprintln!("loadtest: raised the open-file limit from {soft} to {need}");
        return Ok(());
    }
    Err(format!(
        "this run needs about {need} open files, but `ulimit -n` is {soft}; run `ulimit -n {need}` \
         in this shell first, or lower the concurrency"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_listening_address_in_the_log() {
        let line = "2025-01-01T00:00:00.000Z  INFO askstream::server: listening (HTTP/1.1 and h2c) addr=127.0.0.1:41234";
        assert_eq!(
            listening_addr(line),
            Some("127.0.0.1:41234".parse().unwrap())
        );
        assert_eq!(
            listening_addr("INFO listening addr=[::1]:80 extra=1"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(listening_addr("WARN open mode addr=127.0.0.1:1"), None);
        assert_eq!(listening_addr("INFO listening"), None);
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn extra_flags_come_last_and_replace_standard_ones() {
        let launch = |server_args: &[&str]| Launch {
            binary: "askstream".into(),
            kind: ServerKind::Askstream,
            sim: Sim {
                ttft_ms: 0,
                token_ms: 20,
                tokens: 64,
            },
            max_streams: 74,
            cpu: None,
            log: "server.log".into(),
            server_args: strings(server_args),
            tls: false,
        };
        let plain = command_line(&launch(&[]));
        assert_eq!(
            floor_env(&launch(&[]), 18080),
            [
                ("PORT", "18080".to_string()),
                ("SIM_TTFT_MS", "0".to_string()),
                ("SIM_TOKEN_MS", "20".to_string()),
                ("SIM_TOKENS", "64".to_string()),
            ]
        );
        assert_eq!(plain[..2], strings(&["--listen", "127.0.0.1:0"]));
        assert!(
            plain
                .windows(2)
                .any(|w| w == strings(&["--sim-tokens", "64"]))
        );

        let line = command_line(&launch(&["--sim-tokens", "32", "--max-streams=9", "--x"]));
        assert_eq!(
            line.iter()
                .filter(|a| a.starts_with("--sim-tokens"))
                .count(),
            1
        );
        assert_eq!(
            line.iter()
                .filter(|a| a.starts_with("--max-streams"))
                .count(),
            1
        );
        assert_eq!(
            line[line.len() - 4..],
            strings(&["--sim-tokens", "32", "--max-streams=9", "--x"])
        );
        // A flag that merely starts like a standard one does not replace it.
        let line = command_line(&launch(&["--sim-tokens-extra", "1"]));
        assert!(
            line.windows(2)
                .any(|w| w == strings(&["--sim-tokens", "64"]))
        );
    }

    #[test]
    fn flag_values() {
        let args = strings(&["--a", "1", "--b=2", "--a=3", "--c"]);
        assert_eq!(flag_value(&args, "--a"), Some("3"));
        assert_eq!(flag_value(&args, "--b"), Some("2"));
        assert_eq!(flag_value(&args, "--c"), None);
        assert_eq!(flag_value(&args, "--d"), None);
    }
}
