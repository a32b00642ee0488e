//! Dead peers (contract §1.1): a client that vanished with no FIN and no RST is found by
//! TCP keepalive and `TCP_USER_TIMEOUT` (`--dead-peer-secs`), and its ask refunded, in
//! bounded time.
//!
//! The vanished peer is real: the client (`curl`) runs in a network namespace joined to
//! the host by a veth pair, and the server listens on the host side. Once the answer has
//! started, the client is stopped (SIGSTOP: it cannot close its socket) and the namespace's
//! end of the veth drops everything it would send (a `tc` qdisc: `netem loss 100%` where
//! the kernel has netem, else `pfifo limit 0`), so the client's kernel can neither ACK
//! the server's data nor answer its keepalive probes, nor send a FIN or an RST. Every other
//! timer of the server (generator pacing, upstream timeouts, slow client, and, in one test,
//! heartbeats) is an hour long: the only way the answer can end is the kernel declaring the
//! peer dead.
//!
//! Needs root, `ip` and `tc` (iproute2) and `curl`. Without them (or where network
//! namespaces cannot be made, e.g. an unprivileged container) the tests print why and
//! pass, unless `ASKSTREAM_REQUIRE_NETNS=1`, which makes that a failure (CI sets it).

mod support;

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use askstream::quota::QuotaMap;
use askstream::{AskService, ServiceConfig};
use tokio::sync::{mpsc, oneshot};

const LIMIT: u32 = 5;
/// The dead-peer bound under test: the smallest sensible `--dead-peer-secs`.
const DEAD_PEER: Duration = Duration::from_secs(2);
/// Long enough that no timer of the server can fire during a test.
const HOUR: Duration = Duration::from_secs(3600);
/// Generous bound for the refund after the peer vanished (the kernel needs a few seconds).
const REFUND_WITHIN: Duration = Duration::from_secs(30);
/// Bound for things that should happen at once (the answer starting, a signal landing).
const WAIT: Duration = Duration::from_secs(20);
/// Names of this suite's namespaces start with this, followed by `<pid>-<index>`.
const NS_PREFIX: &str = "askstream-dp-";

/// No heartbeats: after the first token the connection is idle, so it is TCP keepalive's
/// probes, unanswered, that let the kernel (with `TCP_USER_TIMEOUT`) give up on the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_idle_peer_is_found_by_keepalive_and_refunded() {
    vanished_peer_is_refunded(0, HOUR, "vanished-idle").await;
}

/// Heartbeats every second: after the peer vanishes a heartbeat stays unacknowledged, and
/// `TCP_USER_TIMEOUT` ends the connection once it has been so for `--dead-peer-secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_peer_with_unacked_heartbeats_is_found_and_refunded() {
    vanished_peer_is_refunded(1, Duration::from_secs(1), "vanished-heartbeat").await;
}

async fn vanished_peer_is_refunded(index: u32, heartbeat: Duration, token: &str) {
    let mut net = match Netns::create(index) {
        Ok(net) => net,
        Err(why) => return unavailable(&why),
    };

    let mut config = support::config_with_limit(LIMIT);
    config.dead_peer = DEAD_PEER;
    config.heartbeat = heartbeat;
    config.ttft_timeout = HOUR;
    config.idle_timeout = HOUR;
    config.slow_client = HOUR;
    // The first token at once, then silence.
    support::sim(&mut config).ttft = Duration::ZERO;
    support::sim(&mut config).token_interval = HOUR;
    support::sim(&mut config).tokens = 10;
    let server = Server::start(config, net.host_ip).await;
    let user = askstream::auth::UserId::of_bearer(token);
    let remaining = || server.remaining(user.as_str());
    assert_eq!(remaining(), LIMIT, "a fresh user");

    // The client, inside the namespace: prints each SSE line as it arrives.
    let url = format!(
        "http://{}:{}/api/v1/ai/ask?stream=true",
        net.host_ip, server.port
    );
    let body = support::ask_body("how are quotas refunded?");
    let mut child = net
        .command("curl")
        .args(["-sS", "-N", "--connect-timeout", "10", "-X", "POST", &url])
        .args(["-H", "content-type: application/json"])
        .args(["-H", &format!("authorization: Bearer {token}")])
        .args(["-d", &body])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn curl in the namespace");
    let stdout = child.stdout.take().expect("curl's stdout");
    let pid = child.id();
    net.client = Some(child);
    let (line_tx, mut lines) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });

    // The answer started: charged, in flight, its first event received by the client.
    let first = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.recv().await {
            if line.starts_with("data:") {
                return Some(line);
            }
        }
        None
    })
    .await
    .expect("the client receives its first event in time")
    .expect("the client's stream ended before its first event (see curl's stderr)");
    eprintln!("client received: {first}");
    // And, right before the peer vanishes, neither refunded nor ended.
    assert_eq!(remaining(), LIMIT - 1, "the started answer is charged");
    assert_eq!(server.service.in_flight(), 1, "the answer is in flight");

    // Vanish: the client process stops (it cannot close the socket), and everything its
    // host would send (ACKs, keepalive replies, a FIN, an RST) is dropped at the veth.
    signal(pid, "STOP");
    wait_for(WAIT, "the client to be stopped", || {
        process_state(pid) == Some('T')
    });
    net.drop_everything_sent();
    let vanished = Instant::now();

    // The server finds out by itself, and refunds.
    let refunded = tokio::time::timeout(REFUND_WITHIN, async {
        while remaining() != LIMIT || server.service.in_flight() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let took = vanished.elapsed();
    assert!(
        refunded.is_ok(),
        "not refunded within {REFUND_WITHIN:?} of the peer vanishing \
         (remaining {}, in flight {})",
        remaining(),
        server.service.in_flight()
    );
    tokio::time::timeout(WAIT, server.service.answers_finished())
        .await
        .expect("the answer finished");
    eprintln!(
        "refunded {:.1} s after the peer vanished (dead_peer {DEAD_PEER:?}, heartbeat {heartbeat:?})",
        took.as_secs_f64()
    );

    // The vanishing was real. The client is still stopped: it never closed anything.
    assert_eq!(process_state(pid), Some('T'), "the client stayed stopped");
    // What its host sent meanwhile (ACKs of the server's data, keepalive replies) was
    // dropped. (Supporting evidence only: ARP would count too.)
    let dropped = net.dropped_packets();
    assert!(dropped > 0, "no packet from the namespace was dropped");
    // And nothing gets through: a new connection from the namespace times out (a refused
    // one, exit 7, would mean packets still flow).
    let probe = net
        .command("curl")
        .args(["-sS", "-o", "/dev/null", "--connect-timeout", "1"])
        .arg(format!("http://{}:{}/healthz", net.host_ip, server.port))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run curl in the namespace");
    assert_eq!(
        probe.code(),
        Some(28),
        "a connection from the vanished namespace must time out"
    );
    eprintln!("{dropped} packets from the namespace dropped; a new connection timed out");

    server.stop().await;
    drop(net);
}

// ---------------------------------------------------------------------------------------
// The server, listening on the host's end of the veth
// ---------------------------------------------------------------------------------------

struct Server {
    port: u16,
    service: AskService,
    quota: Arc<QuotaMap>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(config: ServiceConfig, ip: Ipv4Addr) -> Server {
        let quota = Arc::new(QuotaMap::new(config.quota_window));
        let service = AskService::builder(config)
            .quota(quota.clone())
            .build()
            .expect("service builds");
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind the host end of the veth");
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(askstream::serve(listener, service.clone(), async {
            let _ = stopped.await;
        }));
        Server {
            port,
            service,
            quota,
            stop,
            task,
        }
    }

    fn remaining(&self, user: &str) -> u32 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        self.quota.status_at(user, LIMIT, now).remaining
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the server stops")
            .expect("the serve task");
    }
}

// ---------------------------------------------------------------------------------------
// The namespace
// ---------------------------------------------------------------------------------------

/// A network namespace joined to the host by a veth pair with a private /30, removed on
/// drop (also when the test panics), with the client process killed first.
struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: Ipv4Addr,
    /// The qdisc (as `tc` arguments) that drops every packet, the first this kernel has.
    drop_qdisc: &'static [&'static str],
    client: Option<Child>,
}

/// Qdiscs that drop everything, in order of preference: netem is the usual tool but a
/// module some kernels lack; a FIFO of length 0 (always built in) drops every packet too.
const DROP_QDISCS: [&[&str]; 2] = [&["netem", "loss", "100%"], &["pfifo", "limit", "0"]];

impl Netns {
    /// Sets it all up; `Err` says which capability is missing. (What was made before a
    /// failure is removed again.)
    fn create(index: u32) -> Result<Netns, String> {
        if !is_root() {
            return Err("not running as root".into());
        }
        for (tool, arg) in [("ip", "-V"), ("tc", "-V"), ("curl", "--version")] {
            match Command::new(tool).arg(arg).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => return Err(format!("`{tool} {arg}` failed: {}", out.status)),
                Err(e) => return Err(format!("`{tool}` is not available: {e}")),
            }
        }
        remove_stale_namespaces();

        let pid = std::process::id();
        let (host_ip, ns_ip) = free_subnet(pid, index)?;
        let mut net = Netns {
            name: format!("{NS_PREFIX}{pid}-{index}"),
            host_if: format!("dp{pid}h{index}"),
            ns_if: format!("dp{pid}n{index}"),
            host_ip,
            drop_qdisc: &[],
            client: None,
        };
        let (ns, host_if, ns_if) = (net.name.clone(), net.host_if.clone(), net.ns_if.clone());
        let host_cidr = format!("{host_ip}/30");
        let ns_cidr = format!("{ns_ip}/30");
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns])?;
        // No IPv6 chatter on the namespace's end (router solicitations, MLD), so every
        // packet dropped there is the client's host answering the server. Best effort.
        let _ = net
            .command("sh")
            .arg("-c")
            .arg(format!(
                "echo 1 > /proc/sys/net/ipv6/conf/{ns_if}/disable_ipv6"
            ))
            .stderr(Stdio::null())
            .status();
        ip(&["addr", "add", &host_cidr, "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&["-n", &ns, "addr", "add", &ns_cidr, "dev", &ns_if])?;
        ip(&["-n", &ns, "link", "set", &ns_if, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;

        // Find (and take off again) a qdisc that drops everything.
        let mut tried = Vec::new();
        for qdisc in DROP_QDISCS {
            match net.tc_qdisc("add", qdisc) {
                Ok(_) => {
                    net.tc_qdisc("del", &[])?;
                    net.drop_qdisc = qdisc;
                    break;
                }
                Err(e) => tried.push(e),
            }
        }
        if net.drop_qdisc.is_empty() {
            return Err(format!("no qdisc to drop packets: {}", tried.join("; ")));
        }
        Ok(net)
    }

    /// A command run inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// `tc qdisc <action> dev <ns_if> root <args>` inside the namespace.
    fn tc_qdisc(&self, action: &str, args: &[&str]) -> Result<String, String> {
        let mut c = self.command("tc");
        c.args(["qdisc", action, "dev", &self.ns_if, "root"])
            .args(args);
        run(c)
    }

    /// From now on every packet leaving the namespace is lost, silently.
    fn drop_everything_sent(&self) {
        self.tc_qdisc("add", self.drop_qdisc)
            .expect("install the dropping qdisc");
    }

    /// Packets the dropping qdisc has dropped so far.
    fn dropped_packets(&self) -> u64 {
        let mut c = self.command("tc");
        c.args(["-s", "qdisc", "show", "dev", &self.ns_if]);
        let out = run(c).expect("tc -s qdisc show");
        let n = out
            .split("dropped ")
            .nth(1)
            .and_then(|rest| rest.split(|ch: char| !ch.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok());
        n.unwrap_or_else(|| panic!("no drop count in: {out}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut child) = self.client.take() {
            let _ = child.kill(); // SIGKILL also ends a stopped process
            let _ = child.wait();
        }
        // Deleting one end of the pair deletes both, at once (a namespace's own deletion
        // is finished by the kernel in the background).
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Deletes namespaces this suite left behind in runs that were killed (their pid is gone).
fn remove_stale_namespaces() {
    let Ok(list) = run({
        let mut c = Command::new("ip");
        c.args(["netns", "list"]);
        c
    }) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// A /30 in 10.203.0.0/16 derived from the pid and the test's index, skipping any whose
/// addresses the host already has: `(host end, namespace end)`.
fn free_subnet(pid: u32, index: u32) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let addrs = ip(&["-4", "-o", "addr", "show"])?;
    let start = pid.wrapping_mul(2).wrapping_add(index);
    for i in 0..64 {
        // 16384 /30s in the /16; step by 2 so the two tests of one run never collide.
        let n = start.wrapping_add(i * 2) % 16384;
        let base = u32::from(Ipv4Addr::new(10, 203, 0, 0)) + n * 4;
        let (host, ns) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        if !addrs.contains(&format!("inet {host}/")) && !addrs.contains(&format!("inet {ns}/")) {
            return Ok((host, ns));
        }
    }
    Err("no free /30 in 10.203.0.0/16".into())
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/// A missing capability: skips the test (with a notice), or fails it when CI asks for it.
fn unavailable(why: &str) {
    if std::env::var("ASKSTREAM_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
        panic!("ASKSTREAM_REQUIRE_NETNS=1, but the dead-peer test cannot run: {why}");
    }
    eprintln!(
        "SKIPPED dead_peer test: {why} (needs root, iproute2, curl and network namespaces; \
         ASKSTREAM_REQUIRE_NETNS=1 makes this a failure)"
    );
}

/// Effective uid 0, from `/proc/self/status` (`Uid: real effective saved fs`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Runs `ip <args>` on the host.
fn ip(args: &[&str]) -> Result<String, String> {
    let mut c = Command::new("ip");
    c.args(args);
    run(c)
}

/// Runs a command to its end: its stdout, or an error with its stderr.
fn run(mut c: Command) -> Result<String, String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{c:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{c:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Sends `SIG<name>` to `pid` (through the shell's `kill`, present wherever `sh` is).
fn signal(pid: u32, name: &str) {
    let status = Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "sh", name, &pid.to_string()])
        .status()
        .expect("run sh");
    assert!(status.success(), "kill -s {name} {pid}: {status}");
}

/// The state letter of `/proc/<pid>/stat` (`T` when stopped), `None` once it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ...`: the comm may hold spaces or parentheses, the state follows the
    // last `)`.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Polls `cond` until it holds; fails the test after `bound`.
fn wait_for(bound: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < bound, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
