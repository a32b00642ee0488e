//! The shared store: one Redis (or Valkey) server counts every instance's asks
//! (contract §2.1).
//!
//! # Keys
//!
//! Each user has two keys, both carrying the user id as a hash tag (`{…}`) so they live in
//! one Redis Cluster slot and one script can touch both:
//!
//! - `askstream:{user}:n`, a hash: `w`, the window it counts, and `s`, the asks *settled*
//!   (delivered) in it. It expires when its window ends.
//! - `askstream:{user}:l`, a sorted set of *leases*: one member per answer in flight, named
//!   `<instance>:<sequence>`, scored by the millisecond (on the store's clock) at which it
//!   runs out unless renewed. It expires a little after its newest lease would.
//!
//! A user's used asks are `s` plus the unexpired leases. A charge that would go past the
//! limit adds nothing.
//!
//! # Operations, one Lua script each
//!
//! - **charge** (the only round trip on an ask's critical path): reads the store's `TIME`,
//!   rolls the window over if it has ended (dropping the old window's leases), removes
//!   expired leases (charges of an instance that died: they come back now, and counted as
//!   used until now), and adds a lease if `s + leases < limit`.
//! - **settle**: removes the lease and, if that removed something and the window is still
//!   the lease's, increments `s`. **refund**: removes the lease. Whichever of the two comes
//!   first removes the lease and decides; a second, or a repeat after a lost reply, finds
//!   nothing and changes nothing. Both are sent in the background, batched.
//! - **renew**: pushes an unexpired lease's expiry out by one lease period; an expired or
//!   removed lease stays gone. This instance renews all its live leases in one pipelined
//!   batch per tick (a third of the lease), not one timer per answer.
//! - **status**: the count as `/api/v1/quota` shows it, without writing.
//!
//! All arithmetic is on integers (Unix seconds and milliseconds well below 2^53).
//!
//! # Redis Cluster
//!
//! `redis+cluster://[user:password@]host:port,host:port…` names a cluster by some of its
//! nodes. Every script touches one user's keys only, so each runs on the node that owns
//! that user's slot. A cluster takes a pipeline only within one slot, so there the
//! background batches go out as one pipeline per user.
//!
//! # When the store fails
//!
//! A charge that errs, or gets no answer within the timeout, is refused as
//! [`QuotaError::Unavailable`]: never admitted uncharged. If the script did run (the reply
//! was lost), its lease is never renewed and runs out: the unknown outcome costs the user
//! one ask for at most one lease period. Settles and refunds are retried until they land or
//! their lease has certainly run out (a refund then has happened by itself; a settle is
//! lost, and counted). The connection reconnects on its own, so the store coming back heals
//! without a restart.
//!
//! # Failures designed out
//!
//! Counters shared in Redis by LLM gateways have failed their users in known ways; each
//! is impossible here by construction:
//!
//! - *A decrement lost when a stream is cancelled* (the client left during cleanup) leaks
//!   a slot for good: here nothing is decremented. A charge is a lease that runs out unless
//!   renewed, and the refund is queued from the charge's `Drop`, which cannot be cancelled.
//! - *An increment whose expiry is a second command* (cancelled in between) leaves a key
//!   that never expires: every key's TTL is set inside the script that writes it.
//! - *Incrementing before checking* leaks the rejected amount: the charge script checks,
//!   then adds.
//! - *A retried charge* counts twice: a charge is never retried; a timeout is an
//!   `UNAVAILABLE` refusal and the lease covers the unknown outcome.
//! - *Falling back to per-instance limits when the store fails* hands out N times the
//!   quota: an unreachable store refuses asks instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, RedisFuture, Script};
use tokio::sync::{Notify, OnceCell, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Charge, Hold, QuotaError, QuotaStatus, QuotaStore};
use crate::auth::UserId;
use crate::metrics::Histogram;
use crate::pipeline::BoxFuture;

/// The start of the two scripts that read a user's window: `limit` and `window_secs` from
/// ARGV[1..2], the store's clock (`now_s`, `now_ms`), the window it is in (`win`) and the
/// one stored in `KEYS[1]` (`stored`). One clock for every instance: the store's.
macro_rules! window_prelude {
    () => {
        r"
local limit = tonumber(ARGV[1])
local window_secs = tonumber(ARGV[2])
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local win = math.floor(now_s / window_secs)
local stored = tonumber(redis.call('HGET', KEYS[1], 'w'))
"
    };
}

const CHARGE: &str = concat!(
    "-- KEYS[1]: count hash (w, s); KEYS[2]: leases; ARGV: limit, window_secs, lease_ms, lease id",
    window_prelude!(),
    r"local lease_ms = tonumber(ARGV[3])
local settled = 0
if stored and stored >= win then
  -- The current window (or a later one, if the store's clock stepped back: keep it).
  win = stored
  settled = tonumber(redis.call('HGET', KEYS[1], 's')) or 0
else
  -- A new window: the old window's leases no longer count against anything.
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'w', win, 's', 0)
end
local resets_at = (win + 1) * window_secs
redis.call('EXPIREAT', KEYS[1], resets_at + 1)
local expired = redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
local used = settled + redis.call('ZCARD', KEYS[2])
if used >= limit then
  return {0, win, 0, resets_at, expired}
end
redis.call('ZADD', KEYS[2], now_ms + lease_ms, ARGV[4])
redis.call('PEXPIREAT', KEYS[2], now_ms + lease_ms + 1000)
return {1, win, limit - used - 1, resets_at, expired}
"
);

const SETTLE: &str = r"
-- KEYS[1]: count hash; KEYS[2]: leases; ARGV: the lease's window, lease id
if redis.call('ZREM', KEYS[2], ARGV[2]) == 0 then
  return 0
end
if tonumber(redis.call('HGET', KEYS[1], 'w')) == tonumber(ARGV[1]) then
  redis.call('HINCRBY', KEYS[1], 's', 1)
end
return 1
";

const REFUND: &str = r"
-- KEYS[1]: leases; ARGV: lease id
return redis.call('ZREM', KEYS[1], ARGV[1])
";

const RENEW: &str = r"
-- KEYS[1]: leases; ARGV: lease id, lease_ms
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if not expiry or expiry < now_ms then
  return 0
end
local lease_ms = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now_ms + lease_ms, ARGV[1])
redis.call('PEXPIREAT', KEYS[1], now_ms + lease_ms + 1000)
return 1
";

const STATUS: &str = concat!(
    "-- KEYS[1]: count hash; KEYS[2]: leases; ARGV: limit, window_secs",
    window_prelude!(),
    r"local used = 0
if stored and stored >= win then
  win = stored
  used = (tonumber(redis.call('HGET', KEYS[1], 's')) or 0)
    + redis.call('ZCOUNT', KEYS[2], '(' .. now_ms, '+inf')
end
local remaining = limit - used
if remaining < 0 then
  remaining = 0
end
return {remaining, (win + 1) * window_secs}
"
);

/// Where the shared store is and how long to trust it.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `redis+unix:///path`.
    pub url: String,
    /// The quota window, aligned to the epoch on the store's clock; whole seconds.
    pub window: Duration,
    /// How long a charge is held without renewal.
    pub lease: Duration,
    /// A store slower than this is unavailable.
    pub timeout: Duration,
}

/// A [`QuotaStore`] in Redis, shared by every instance pointed at it (see the module
/// docs for the keys and scripts).
///
/// Call [`QuotaStore::spawn_housekeeping`] once inside the runtime before use (the
/// service does): it runs the renewals and the queue of settles and refunds.
pub struct RedisStore {
    shared: Arc<Shared>,
}

struct Shared {
    client: Client,
    /// Made on first use, inside the runtime; reconnects by itself after a failure.
    conn: OnceCell<Conn>,
    window_secs: u64,
    lease: Duration,
    timeout: Duration,
    /// Names this process's leases apart from every other instance's.
    instance: String,
    next_lease: AtomicU64,
    /// This instance's answers in flight, by lease sequence: what the renewals renew.
    live: Mutex<HashMap<u64, Lease>>,
    ops: mpsc::UnboundedSender<Op>,
    /// Taken by the housekeeping task that sends the queue.
    ops_rx: Mutex<Option<mpsc::UnboundedReceiver<Op>>>,
    /// Settles and refunds queued and not yet landed (or given up), for `flush`.
    pending: AtomicUsize,
    drained: Notify,
    scripts: Scripts,
    stats: Stats,
}

struct Scripts {
    charge: Script,
    settle: Script,
    refund: Script,
    renew: Script,
    status: Script,
}

impl Scripts {
    fn all(&self) -> [&Script; 5] {
        [
            &self.charge,
            &self.settle,
            &self.refund,
            &self.renew,
            &self.status,
        ]
    }
}

/// One lease as this instance knows it.
#[derive(Clone)]
struct Lease {
    keys: Arc<Keys>,
    member: Arc<str>,
    window: u64,
}

/// A user's two keys, in one cluster slot.
struct Keys {
    count: String,
    leases: String,
}

impl Keys {
    fn of(user: &UserId) -> Keys {
        let id = user.as_str();
        Keys {
            count: format!("askstream:{{{id}}}:n"),
            leases: format!("askstream:{{{id}}}:l"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Settle,
    Refund,
}

/// A settle or refund on its way to the store.
struct Op {
    kind: OpKind,
    lease: Lease,
    /// After this the store's lease has certainly run out: the op is moot.
    moot_at: Instant,
}

#[derive(Default)]
struct Stats {
    round_trips: Histogram,
    errors: AtomicU64,
    renewed: AtomicU64,
    expired: AtomicU64,
    settles_lost: AtomicU64,
}

impl RedisStore {
    /// A store for `config`. Checks the URL now; connects on first use, so a server can
    /// start while its store is down (asks get `QUOTA_UNAVAILABLE` until it is back).
    pub fn new(config: RedisConfig) -> Result<Self, String> {
        let client = Client::open(&config.url)?;
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let instance = format!("{:016x}", instance_nonce());
        Ok(RedisStore {
            shared: Arc::new(Shared {
                client,
                conn: OnceCell::new(),
                window_secs: config.window.as_secs().max(1),
                lease: config.lease,
                timeout: config.timeout,
                instance,
                next_lease: AtomicU64::new(0),
                live: Mutex::default(),
                ops,
                ops_rx: Mutex::new(Some(ops_rx)),
                pending: AtomicUsize::new(0),
                drained: Notify::new(),
                scripts: Scripts {
                    charge: Script::new(CHARGE),
                    settle: Script::new(SETTLE),
                    refund: Script::new(REFUND),
                    renew: Script::new(RENEW),
                    status: Script::new(STATUS),
                },
                stats: Stats::default(),
            }),
        })
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may carry a password.
        let s = &self.shared;
        f.debug_struct("RedisStore")
            .field("window_secs", &s.window_secs)
            .field("lease", &s.lease)
            .field("timeout", &s.timeout)
            .field("live_leases", &lock(&s.live).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// 64 bits that differ between processes (and between stores in one process), from std's
/// randomly keyed hasher.
fn instance_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNT.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish()
}

/// A store error as a client may see it: what kind of failure, never a URL or password.
fn describe(e: &RedisError) -> String {
    if e.is_timeout() {
        "the store timed out".to_owned()
    } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
        "cannot reach the store".to_owned()
    } else {
        format!("the store answered an error ({:?})", e.kind())
    }
}

/// One server, or a Redis Cluster (`redis+cluster://host:port,host:port…`).
enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

impl Client {
    fn open(url: &str) -> Result<Client, String> {
        let bad = |e: RedisError| format!("--quota-store: {}", describe(&e));
        let Some(rest) = url.strip_prefix("redis+cluster://") else {
            return redis::Client::open(url).map(Client::Single).map_err(bad);
        };
        // `[user:password@]host:port,host:port…`: the credentials apply to every node.
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((auth, hosts)) => (format!("{auth}@"), hosts),
            None => (String::new(), rest),
        };
        let seeds: Vec<String> = hosts
            .trim_end_matches('/')
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{auth}{h}"))
            .collect();
        if seeds.is_empty() {
            return Err("--quota-store: a redis+cluster:// URL names no node".to_owned());
        }
        ClusterClient::new(seeds).map(Client::Cluster).map_err(bad)
    }
}

/// A connection to either kind of store, so the scripts run alike on both.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Shared {
    async fn conn(&self) -> Result<Conn, QuotaError> {
        let made = self
            .conn
            .get_or_try_init(|| async {
                match &self.client {
                    Client::Single(client) => {
                        // An ask gives up on the store after `timeout` (its own deadline,
                        // in `round_trip`); the connection gives up much later, since
                        // dropping it would discard commands the store may still run,
                        // turning a slow store into lost settles. A connection silent that
                        // long is dead, and is remade.
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(self.timeout))
                            .set_response_timeout(Some(
                                (self.timeout * 8).max(Duration::from_secs(2)),
                            ))
                            .set_max_delay(Duration::from_secs(1));
                        ConnectionManager::new_lazy_with_config(client.clone(), config)
                            .map(Conn::Single)
                            .map_err(|e| QuotaError::Unavailable(describe(&e)))
                    }
                    // A cluster connection learns the slot map when it connects: within
                    // the ask's time budget, and retried by the next ask if it fails.
                    Client::Cluster(client) => self
                        .round_trip(client.get_async_connection())
                        .await
                        .map(Conn::Cluster),
                }
            })
            .await?;
        Ok(made.clone())
    }

    /// Runs one round trip to the store within the timeout, timing it; a failure is
    /// counted and logged, and comes back as the store's error, or `None` for a timeout.
    async fn try_round_trip<T>(
        &self,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, Option<RedisError>> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, call).await;
        self.stats.round_trips.observe(started.elapsed());
        let failure = match result {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "quota store call failed");
                Some(e)
            }
            Err(_) => None,
        };
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        Err(failure)
    }

    /// [`try_round_trip`](Self::try_round_trip), failures as [`QuotaError::Unavailable`].
    async fn round_trip<T>(
        &self,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, QuotaError> {
        self.try_round_trip(call).await.map_err(|failure| {
            QuotaError::Unavailable(match failure {
                Some(e) => describe(&e),
                None => format!("no answer within {} ms", self.timeout.as_millis()),
            })
        })
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX)
    }

    async fn charge(self: Arc<Self>, user: &UserId, limit: u32) -> Result<Charge, QuotaError> {
        let mut conn = self.conn().await?;
        let keys = Arc::new(Keys::of(user));
        let seq = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let member: Arc<str> = format!("{}:{seq}", self.instance).into();
        let mut call = self.scripts.charge.prepare_invoke();
        call.key(&keys.count)
            .key(&keys.leases)
            .arg(limit)
            .arg(self.window_secs)
            .arg(self.lease_ms())
            .arg(&*member);
        let (admitted, window, remaining, resets_at, expired): (u8, u64, u32, u64, u64) =
            self.round_trip(call.invoke_async(&mut conn)).await?;
        self.stats.expired.fetch_add(expired, Ordering::Relaxed);
        if admitted == 0 {
            return Err(QuotaError::Exceeded { limit, resets_at });
        }
        lock(&self.live).insert(
            seq,
            Lease {
                keys,
                member,
                window,
            },
        );
        let hold = RedisHold {
            shared: self.clone(),
            seq,
        };
        Ok(Charge::new(Box::new(hold), remaining))
    }

    async fn status(&self, user: &UserId, limit: u32) -> Result<QuotaStatus, QuotaError> {
        let mut conn = self.conn().await?;
        let keys = Keys::of(user);
        let mut call = self.scripts.status.prepare_invoke();
        call.key(&keys.count)
            .key(&keys.leases)
            .arg(limit)
            .arg(self.window_secs);
        let (remaining, resets_at): (u32, u64) =
            self.round_trip(call.invoke_async(&mut conn)).await?;
        Ok(QuotaStatus {
            limit,
            remaining,
            resets_at,
        })
    }

    /// An answer ended: queue its settle or refund (the charge's `Drop` may run anywhere,
    /// so nothing here waits).
    fn finish(&self, seq: u64, kind: OpKind) {
        let Some(lease) = lock(&self.live).remove(&seq) else {
            return;
        };
        self.pending.fetch_add(1, Ordering::AcqRel);
        let op = Op {
            kind,
            lease,
            moot_at: Instant::now() + self.lease,
        };
        if self.ops.send(op).is_err() {
            // The store is gone; its lease will run out by itself.
            self.landed(1);
        }
    }

    fn landed(&self, n: usize) {
        if self.pending.fetch_sub(n, Ordering::AcqRel) == n {
            self.drained.notify_waiters();
        }
    }

    /// The EVALSHA of one settle or refund.
    fn op_cmd(&self, op: &Op) -> redis::Cmd {
        let lease = &op.lease;
        let mut cmd = redis::cmd("EVALSHA");
        match op.kind {
            OpKind::Settle => cmd
                .arg(self.scripts.settle.get_hash())
                .arg(2)
                .arg(&lease.keys.count)
                .arg(&lease.keys.leases)
                .arg(lease.window)
                .arg(&*lease.member),
            OpKind::Refund => cmd
                .arg(self.scripts.refund.get_hash())
                .arg(1)
                .arg(&lease.keys.leases)
                .arg(&*lease.member),
        };
        cmd
    }

    /// Sends a batch of commands, each tagged with the keys it touches, and returns the
    /// replies (in no particular order). One server gets one pipeline; a cluster takes a
    /// pipeline only within one slot, so it gets one per user, one after the other.
    async fn batch(
        &self,
        cmds: Vec<(Arc<Keys>, redis::Cmd)>,
    ) -> Result<Vec<redis::Value>, QuotaError> {
        if !matches!(self.client, Client::Cluster(_)) {
            let cmds: Vec<_> = cmds.into_iter().map(|(_, c)| c).collect();
            return self.pipeline(&cmds).await;
        }
        let mut by_user: HashMap<&str, Vec<redis::Cmd>> = HashMap::new();
        for (keys, cmd) in &cmds {
            by_user.entry(&keys.leases).or_default().push(cmd.clone());
        }
        let mut replies = Vec::with_capacity(cmds.len());
        for group in by_user.values() {
            replies.extend(self.pipeline(group).await?);
        }
        Ok(replies)
    }

    /// Sends commands as one pipeline. An error from the store itself (not a timeout or a
    /// lost connection) is most likely NOSCRIPT after a restart or `SCRIPT FLUSH`: load
    /// the scripts and send the pipeline once more. Every command sent this way is
    /// idempotent, so sending one twice is safe.
    async fn pipeline(&self, cmds: &[redis::Cmd]) -> Result<Vec<redis::Value>, QuotaError> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        for c in cmds {
            pipe.add_command(c.clone());
        }
        match self.try_round_trip(pipe.query_async(&mut conn)).await {
            Ok(v) => return Ok(v),
            Err(Some(e)) if !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped()) => {}
            Err(_) => {
                return Err(QuotaError::Unavailable("cannot reach the store".to_owned()));
            }
        }
        for s in self.scripts.all() {
            let _: String = self.round_trip(s.load_async(&mut conn)).await?;
        }
        self.round_trip(pipe.query_async(&mut conn)).await
    }

    /// Lands a batch of settles and refunds, retrying (they are idempotent) until they do
    /// or their leases have run out.
    async fn apply(&self, mut batch: Vec<Op>, stop: &CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let now = Instant::now();
            let before = batch.len();
            batch.retain(|op| {
                let live = op.moot_at > now;
                if !live && op.kind == OpKind::Settle {
                    self.stats.settles_lost.fetch_add(1, Ordering::Relaxed);
                }
                live
            });
            self.landed(before - batch.len());
            if batch.is_empty() {
                return;
            }
            let cmds: Vec<_> = batch
                .iter()
                .map(|op| (op.lease.keys.clone(), self.op_cmd(op)))
                .collect();
            if self.batch(cmds).await.is_ok() {
                self.landed(batch.len());
                return;
            }
            // The store is down or slow: wait, but not past the server's end.
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Sends settles and refunds as they come, batching whatever is queued.
    async fn run_ops(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Op>,
        stop: CancellationToken,
    ) {
        const BATCH: usize = 256;
        loop {
            let first = tokio::select! {
                op = rx.recv() => op,
                () = stop.cancelled() => None,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.apply(batch, &stop).await;
        }
        // Stopping: one last attempt at whatever is still queued.
        let mut rest = Vec::new();
        while let Ok(op) = rx.try_recv() {
            rest.push(op);
        }
        if !rest.is_empty() {
            let cmds: Vec<_> = rest
                .iter()
                .map(|op| (op.lease.keys.clone(), self.op_cmd(op)))
                .collect();
            let _ = self.batch(cmds).await;
            self.landed(rest.len());
        }
    }

    /// Renews every live lease of this instance, one pipelined batch per tick.
    async fn run_renewals(self: Arc<Self>, stop: CancellationToken) {
        let every = (self.lease / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let leases: Vec<Lease> = lock(&self.live).values().cloned().collect();
            for chunk in leases.chunks(512) {
                let cmds: Vec<_> = chunk
                    .iter()
                    .map(|l| {
                        let mut cmd = redis::cmd("EVALSHA");
                        cmd.arg(self.scripts.renew.get_hash())
                            .arg(1)
                            .arg(&l.keys.leases)
                            .arg(&*l.member)
                            .arg(self.lease_ms());
                        (l.keys.clone(), cmd)
                    })
                    .collect();
                if let Ok(replies) = self.batch(cmds).await {
                    let renewed = replies
                        .iter()
                        .filter(|v| matches!(v, redis::Value::Int(1)))
                        .count();
                    self.stats
                        .renewed
                        .fetch_add(renewed as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A charged ask's lease; settling or refunding queues the matching script.
struct RedisHold {
    shared: Arc<Shared>,
    seq: u64,
}

impl Hold for RedisHold {
    fn settle(self: Box<Self>) {
        self.shared.finish(self.seq, OpKind::Settle);
    }

    fn refund(self: Box<Self>) {
        self.shared.finish(self.seq, OpKind::Refund);
    }
}

impl QuotaStore for RedisStore {
    fn charge<'a>(
        &'a self,
        user: &'a UserId,
        limit: u32,
    ) -> BoxFuture<'a, Result<Charge, QuotaError>> {
        Box::pin(self.shared.clone().charge(user, limit))
    }

    fn status<'a>(
        &'a self,
        user: &'a UserId,
        limit: u32,
    ) -> BoxFuture<'a, Result<QuotaStatus, QuotaError>> {
        Box::pin(self.shared.status(user, limit))
    }

    fn spawn_housekeeping(self: Arc<Self>, stop: CancellationToken) {
        let Some(rx) = lock(&self.shared.ops_rx).take() else {
            return;
        };
        let shared = self.shared.clone();
        // Loaded now, so the first asks do not pay a NOSCRIPT round trip; a store that
        // is down now gets them loaded on demand later.
        tokio::spawn(async move {
            if let Ok(mut conn) = shared.conn().await {
                for s in shared.scripts.all() {
                    let _: Result<String, _> = shared.round_trip(s.load_async(&mut conn)).await;
                }
            }
        });
        tokio::spawn(self.shared.clone().run_ops(rx, stop.clone()));
        tokio::spawn(self.shared.clone().run_renewals(stop));
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                let notified = self.shared.drained.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if self.shared.pending.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        })
    }

    fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let s = &self.shared.stats;
        s.round_trips.render(
            out,
            "askstream_quota_store_seconds",
            "Round trips to the shared quota store: charges, status reads, batches of settles, refunds and renewals.",
        );
        for (name, help, v) in [
            (
                "askstream_quota_store_errors_total",
                "Quota store round trips that failed or timed out.",
                &s.errors,
            ),
            (
                "askstream_quota_leases_renewed_total",
                "Leases of answers in flight renewed in the store.",
                &s.renewed,
            ),
            (
                "askstream_quota_leases_expired_total",
                "Leases that ran out unrenewed (an instance died or lost the store) and were given back.",
                &s.expired,
            ),
            (
                "askstream_quota_settles_lost_total",
                "Delivered answers whose settle could not reach the store before their lease ran out.",
                &s.settles_lost,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}
