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

    /// Starts the server again on the same socket (after [`kill`](Self::kill)), empty:
    /// no persistence, as a store that lost its data.
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
                "no",
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
