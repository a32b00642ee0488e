//! A `redis-server` of the test's own, on a unix socket in a fresh folder: never a shared
//! instance. Killed, restarted and paused at the test's will.
//!
//! Without `redis-server` on the machine the Redis suites skip themselves with a notice
//! (so `cargo test` on a machine with only Rust passes); with `ASKSTREAM_REQUIRE_REDIS=1`
//! (as `.ci/run` sets) a missing server fails them instead.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One running (or stopped) `redis-server`.
pub struct RedisServer {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    /// Keeps every write in an append-only file (fsync'd each time), so a restart finds
    /// the data again.
    persistent: bool,
}

/// The folder for one server: unique per process and call.
fn fresh_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "askstream-redis-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("make the server's folder");
    dir
}

fn have_redis_server() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl RedisServer {
    /// Starts a server, or returns `None` (after saying so) when the machine has none and
    /// the run does not require one.
    pub fn start() -> Option<RedisServer> {
        Self::start_with(false)
    }

    /// As [`start`](Self::start), with `appendonly yes` and `appendfsync always`: a
    /// restart loses nothing.
    pub fn start_persistent() -> Option<RedisServer> {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Option<RedisServer> {
        if !have_redis_server() {
            assert!(
                std::env::var_os("ASKSTREAM_REQUIRE_REDIS").is_none(),
                "ASKSTREAM_REQUIRE_REDIS is set but redis-server is not on PATH"
            );
            eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        let dir = fresh_dir();
        let socket = dir.join("redis.sock");
        let mut server = RedisServer {
            dir,
            socket,
            child: None,
            persistent,
        };
        server.restart();
        Some(server)
    }

    /// The store URL askstream takes.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Starts the server again on the same socket (after [`kill`](Self::kill)): empty, as
    /// a store that lost its data, unless it is persistent.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                if self.persistent { "yes" } else { "no" },
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.pings() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL): every connection to it drops at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(self.url().as_str()).expect("a valid URL")
    }

    fn pings(&self) -> bool {
        self.socket.exists()
            && self
                .client()
                .get_connection_with_timeout(Duration::from_secs(1))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
    }

    /// Runs one command on the server (a test's own connection, not askstream's).
    pub fn command<T: redis::FromRedisValue>(&self, name: &str, args: &[&str]) -> T {
        let mut c = self
            .client()
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the test's redis-server");
        let mut cmd = redis::cmd(name);
        for a in args {
            cmd.arg(*a);
        }
        cmd.query(&mut c).expect("the command succeeds")
    }

    /// Holds every client's commands for `ms` milliseconds (`CLIENT PAUSE … ALL`): a store
    /// slower than any timeout, that then runs what it was sent.
    pub fn pause(&self, ms: u64) {
        let () = self.command("CLIENT", &["PAUSE", &ms.to_string(), "ALL"]);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of its own: `nodes` primaries on loopback TCP ports (the cluster bus
/// needs TCP, at the port plus 10000), all slots assigned, no replicas.
pub struct RedisCluster {
    nodes: Vec<(u16, Child)>,
    dir: PathBuf,
}

/// A loopback port that is free now, with its cluster-bus port (+10000) in range.
fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    /// Starts the nodes and joins them (`redis-cli --cluster create`), or `None` as
    /// [`RedisServer::start`] does when the machine has no `redis-server`.
    pub fn start(nodes: usize) -> Option<RedisCluster> {
        if !have_redis_server() {
            assert!(
                std::env::var_os("ASKSTREAM_REQUIRE_REDIS").is_none(),
                "ASKSTREAM_REQUIRE_REDIS is set but redis-server is not on PATH"
            );
            eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        let dir = fresh_dir();
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        for i in 0..nodes {
            let port = free_port();
            let node_dir = cluster.dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            cluster.nodes.push((port, child));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for &(port, _) in &cluster.nodes {
            while !cli(port, &["PING"]).is_some_and(|o| o.contains("PONG")) {
                assert!(Instant::now() < deadline, "node {port} did not come up");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run redis-cli --cluster create");
        assert!(created.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        for &(port, _) in &cluster.nodes {
            while !cli(port, &["CLUSTER", "INFO"]).is_some_and(|o| o.contains("cluster_state:ok")) {
                assert!(Instant::now() < deadline, "the cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(cluster)
    }

    /// The store URL askstream takes: every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// How many keys each node holds.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|&(port, _)| {
                cli(port, &["DBSIZE"])
                    .and_then(|o| o.trim().parse().ok())
                    .expect("DBSIZE answers")
            })
            .collect()
    }
}

/// `redis-cli -p PORT ARGS…`'s output, if it ran.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
