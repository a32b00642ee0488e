//! The in-memory store: a sharded map, one atomic word per user (see the module docs of
//! [`crate::quota`] for the design).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Charge, QuotaError, QuotaStatus, QuotaStore};
use crate::auth::UserId;
use crate::clock::unix_now;
use crate::pipeline::BoxFuture;

/// How many shards a [`QuotaMap`] has. A power of two, so the shard is a mask of the hash;
/// 64 keeps writer collisions rare on any machine this runs on while costing ~4 KiB empty.
const SHARDS: usize = 64;

/// One shard: user id → that user's entry. `Arc` so a [`Charge`] can refund into the entry
/// without holding the shard lock or looking the user up again.
type Shard = RwLock<HashMap<Box<str>, Arc<Entry>>>;

/// The in-memory sharded quota map.
///
/// Locking rule: a charge runs its CAS while holding its shard's lock (read for existing
/// users, write for a new one). The sweeper removes entries under the write lock, so it can
/// never remove an entry between a charger's lookup and its CAS — which would let that
/// charge land on an orphaned entry while the next one starts a fresh count (an overdraft).
/// Refunds need no lock: they never move the window, so they cannot change a sweep decision.
pub struct QuotaMap {
    /// Window length in whole seconds, at least 1; the unit of window indices.
    window_secs: u64,
    /// The users, spread so that inserting one user blocks only its own shard.
    shards: Box<[Shard]>,
    /// Picks a shard from a user id; randomly keyed so clients cannot aim at one shard.
    hasher: RandomState,
    /// The newest window a sweep has judged entries by. A charge that read the clock
    /// before a sweep removed its user's entry (the clock crossed a boundary in between)
    /// must not start a fresh count in the window that just ended: that user may have
    /// used it up. Read under the shard lock, it moves such a charge to the new window.
    swept: AtomicU32,
}

impl QuotaMap {
    /// A map whose windows are `window` long, aligned to the Unix epoch.
    ///
    /// Sub-second parts of `window` are ignored: windows are whole seconds so that
    /// `resetsAt` and `retry-after` are whole seconds too.
    ///
    /// # Panics
    ///
    /// If `window` is shorter than one second.
    pub fn new(window: Duration) -> Self {
        let window_secs = window.as_secs();
        assert!(window_secs >= 1, "quota window must be at least one second");
        QuotaMap {
            window_secs,
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            swept: AtomicU32::new(0),
        }
    }

    /// The window length, as configured (in whole seconds).
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window_secs)
    }

    /// Takes one ask from `user` as of `now_unix_secs`; the clock is a parameter so tests
    /// (and callers that already read it) control time.
    ///
    /// Refuses with [`QuotaError::Exceeded`] and changes nothing when `limit` asks were
    /// already taken in the window; `limit == 0` refuses every ask. `limit` may differ
    /// between calls for the same user (a key with its own limit): each call is judged
    /// against the limit it passes.
    pub fn charge_at(
        &self,
        user: &str,
        limit: u32,
        now_unix_secs: u64,
    ) -> Result<Charge, QuotaError> {
        let now = self.window_index(now_unix_secs);
        if limit == 0 {
            return Err(QuotaError::Exceeded {
                limit,
                resets_at: self.resets_at(now),
            });
        }
        let shard = self.shard(user);
        {
            let map = shard.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = map.get(user) {
                return self.take(entry, limit, self.not_before_sweep(now));
            }
        }
        // A user seen for the first time. Another thread may have inserted it since the read
        // lock was released; `entry` keeps theirs if so.
        let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
        let entry = map.entry(Box::from(user)).or_default();
        self.take(entry, limit, self.not_before_sweep(now))
    }

    /// `user`'s standing as of `now_unix_secs`, without charging (and without inserting
    /// an unknown user).
    pub fn status_at(&self, user: &str, limit: u32, now_unix_secs: u64) -> QuotaStatus {
        let now = self.window_index(now_unix_secs);
        let (window, used) = {
            let map = self
                .shard(user)
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            map.get(user).map_or((now, 0), |e| e.current(now))
        };
        QuotaStatus {
            limit,
            remaining: limit.saturating_sub(used),
            resets_at: self.resets_at(window),
        }
    }

    /// Drops entries idle for a whole window; returns how many were removed.
    pub fn sweep(&self) -> usize {
        self.sweep_at(unix_now())
    }

    /// Drops the entries whose stored window is older than the window of `now_unix_secs`;
    /// returns how many were removed.
    ///
    /// Such an entry reads exactly like a fresh one (its count belongs to an ended window),
    /// so removing it is invisible to users. An entry may still be referenced by a live
    /// [`Charge`] (an answer that started in that ended window and is still streaming): the
    /// charge keeps the entry alive through its `Arc`, and its eventual refund targets the
    /// ended window, which is a no-op on any entry — swept or not. It can never reach the
    /// fresh entry a later charge creates, so no ask is returned twice or to the wrong window.
    ///
    /// Shards with nothing to remove are only read-locked, so a routine sweep that finds
    /// nothing never blocks a charge.
    pub fn sweep_at(&self, now_unix_secs: u64) -> usize {
        let now = self.window_index(now_unix_secs);
        // Before any removal, and so before the write locks under which chargers will see
        // it (see `swept`).
        self.swept.fetch_max(now, Ordering::Relaxed);
        let stale = |e: &Arc<Entry>| e.window() < now;
        let mut removed = 0;
        for shard in &self.shards {
            let any_stale = {
                let map = shard.read().unwrap_or_else(PoisonError::into_inner);
                map.values().any(stale)
            };
            if !any_stale {
                continue;
            }
            let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
            let before = map.len();
            map.retain(|_, e| !stale(e));
            removed += before - map.len();
            // A HashMap never shrinks on its own; after a mass expiry give the memory back,
            // keeping headroom so the next burst of users does not reallocate at once.
            if map.len() < map.capacity() / 4 {
                let keep = map.len() * 2;
                map.shrink_to(keep);
            }
        }
        removed
    }

    /// Sweeps every `every` until `stop` is cancelled or the map is dropped.
    ///
    /// The task holds only a weak reference, so it never keeps a discarded map alive. Each
    /// sweep runs on tokio's blocking pool: scanning a large map would otherwise stall every
    /// stream served by the worker thread it ran on.
    ///
    /// # Panics
    ///
    /// If `every` is zero, or when called outside a tokio runtime.
    pub fn spawn_sweeper(
        self: &Arc<Self>,
        every: Duration,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        assert!(!every.is_zero(), "sweep period must be positive");
        let map = Arc::downgrade(self);
        tokio::spawn(async move {
            let start = tokio::time::Instant::now() + every;
            let mut tick = tokio::time::interval_at(start, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // Either the server is stopping, or it is time for the next sweep.
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(strong) = map.upgrade() else { return };
                match tokio::task::spawn_blocking(move || (strong.sweep(), strong.len())).await {
                    Ok((0, _)) => {}
                    Ok((removed, users)) => {
                        tracing::debug!(removed, users, "swept idle quota entries");
                    }
                    Err(e) => tracing::error!(error = %e, "quota sweep failed"),
                }
            }
        })
    }

    /// How many users have an entry (active in the current window, or not yet swept).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether no user has an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The window containing `unix_secs`. Saturates rather than wraps past `u32::MAX`
    /// (the year 2106 for one-second windows), so time never appears to go backwards.
    fn window_index(&self, unix_secs: u64) -> u32 {
        u32::try_from(unix_secs / self.window_secs).unwrap_or(u32::MAX)
    }

    /// `now`, or the newest window a sweep has used if that is later. Called under the
    /// user's shard lock, which orders it after any sweep that removed entries there.
    fn not_before_sweep(&self, now: u32) -> u32 {
        now.max(self.swept.load(Ordering::Relaxed))
    }

    /// Unix seconds at which `window` ends.
    fn resets_at(&self, window: u32) -> u64 {
        (u64::from(window) + 1).saturating_mul(self.window_secs)
    }

    fn shard(&self, user: &str) -> &Shard {
        let h = self.hasher.hash_one(user) as usize;
        &self.shards[h & (SHARDS - 1)]
    }

    /// Charges `entry` and wraps the result; the caller holds the entry's shard lock.
    fn take(&self, entry: &Arc<Entry>, limit: u32, now: u32) -> Result<Charge, QuotaError> {
        match entry.take(now, limit) {
            Ok((window, used)) => Ok(Charge::memory(
                MemoryHold {
                    entry: Arc::clone(entry),
                    window,
                },
                limit - used,
            )),
            Err(window) => Err(QuotaError::Exceeded {
                limit,
                resets_at: self.resets_at(window),
            }),
        }
    }

    /// The raw (window, used) of `user`'s entry, for tests that check invariants.
    #[cfg(test)]
    fn raw(&self, user: &str) -> Option<(u32, u32)> {
        let map = self
            .shard(user)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(user)
            .map(|e| unpack(e.state.load(Ordering::Relaxed)))
    }
}

impl std::fmt::Debug for QuotaMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaMap")
            .field("window_secs", &self.window_secs)
            .field("users", &self.len())
            .finish()
    }
}

impl QuotaStore for QuotaMap {
    fn charge<'a>(
        &'a self,
        user: &'a UserId,
        limit: u32,
    ) -> BoxFuture<'a, Result<Charge, QuotaError>> {
        // Decided now; the future only carries the result.
        let charged = self.charge_at(user.as_str(), limit, unix_now());
        Box::pin(std::future::ready(charged))
    }

    fn status<'a>(
        &'a self,
        user: &'a UserId,
        limit: u32,
    ) -> BoxFuture<'a, Result<QuotaStatus, QuotaError>> {
        Box::pin(std::future::ready(Ok(self.status_at(
            user.as_str(),
            limit,
            unix_now(),
        ))))
    }

    fn spawn_housekeeping(self: Arc<Self>, stop: CancellationToken) {
        // Often enough that a short window's users go soon after it ends; at most once a
        // minute, so a day-long window does not scan the map for nothing.
        let every = self.window().min(Duration::from_secs(60));
        drop(self.spawn_sweeper(every, stop));
    }
}

/// One user's count: `(window index << 32) | used`, in one word so that reading the window
/// and the count, and replacing both, are each a single atomic step.
#[derive(Default)]
struct Entry {
    state: AtomicU64,
}

// Every access is a load or a read-modify-write on this one word, and RMWs on one location
// always see the latest value in its modification order; that alone gives the no-overdraft
// guarantee, so `Relaxed` suffices. Nothing else is published through the word.
impl Entry {
    /// The window the entry was last charged in.
    fn window(&self) -> u32 {
        unpack(self.state.load(Ordering::Relaxed)).0
    }

    /// (window, used) as seen from window `now`.
    fn current(&self, now: u32) -> (u32, u32) {
        effective(self.state.load(Ordering::Relaxed), now)
    }

    /// Takes one ask: `Ok((window, used after))`, or `Err(window)` when nothing is left.
    fn take(&self, now: u32, limit: u32) -> Result<(u32, u32), u32> {
        let step = |s| {
            let (window, used) = effective(s, now);
            (used < limit).then(|| pack(window, used + 1))
        };
        match self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, step)
        {
            Ok(prev) => {
                let (window, used) = effective(prev, now);
                Ok((window, used + 1))
            }
            Err(prev) => Err(effective(prev, now).0),
        }
    }
}

/// A charge's claim on its entry: refunding gives one ask back to `window`, settling
/// leaves it spent (nothing to do: the count already includes it).
pub(super) struct MemoryHold {
    entry: Arc<Entry>,
    window: u32,
}

impl MemoryHold {
    #[cfg(test)]
    pub(super) fn window(&self) -> u32 {
        self.window
    }

    pub(super) fn refund(self) {
        let window = self.window;
        // Only into the window the ask came from, and never below zero; if the window has
        // rolled over, the ask expired with it and there is nothing to give back.
        let _ = self
            .entry
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                let (w, used) = unpack(s);
                (w == window && used > 0).then(|| pack(w, used - 1))
            });
    }
}

fn pack(window: u32, used: u32) -> u64 {
    (u64::from(window) << 32) | u64::from(used)
}

fn unpack(state: u64) -> (u32, u32) {
    ((state >> 32) as u32, state as u32)
}

/// The (window, used) that counts at window `now`: an older stored window has ended, so
/// nothing is used in the current one. A stored window *newer* than `now` (the wall clock
/// stepped back) stays in force, so stepping the clock back and forth across a boundary
/// cannot hand out a fresh window twice.
fn effective(state: u64, now: u32) -> (u32, u32) {
    let (window, used) = unpack(state);
    if window >= now {
        (window, used)
    } else {
        (now, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::sync::atomic::AtomicUsize;

    const DAY: u64 = 86_400;

    fn map() -> QuotaMap {
        QuotaMap::new(Duration::from_secs(DAY))
    }

    #[test]
    fn windows_are_aligned_to_the_epoch() {
        let q = QuotaMap::new(Duration::from_secs(3600));
        let now = 10 * 3600 + 1234;
        let c = q.charge_at("u", 5, now).unwrap();
        assert_eq!(c.window(), 10);
        assert_eq!(c.remaining(), 4);
        c.settle();
        let s = q.status_at("u", 5, 11 * 3600 - 1);
        assert_eq!(
            s,
            QuotaStatus {
                limit: 5,
                remaining: 4,
                resets_at: 11 * 3600
            }
        );
    }

    #[test]
    fn sub_second_window_parts_are_ignored() {
        let q = QuotaMap::new(Duration::from_millis(2500));
        assert_eq!(q.window(), Duration::from_secs(2));
    }

    #[test]
    #[should_panic(expected = "at least one second")]
    fn a_window_under_a_second_is_refused() {
        let _ = QuotaMap::new(Duration::from_millis(999));
    }

    #[test]
    fn exhausting_then_rolling_over() {
        let q = map();
        let t0 = 20_000 * DAY + 5;
        for i in 0..3 {
            let c = q.charge_at("u", 3, t0 + i).unwrap();
            assert_eq!(c.remaining(), 2 - i as u32);
            c.settle();
        }
        let err = q.charge_at("u", 3, t0 + 10).unwrap_err();
        assert_eq!(
            err,
            QuotaError::Exceeded {
                limit: 3,
                resets_at: 20_001 * DAY
            }
        );
        assert_eq!(err.retry_after_secs(t0 + 10), DAY - 15);
        assert_eq!(err.retry_after_secs(20_001 * DAY), 1);
        // A refusal takes nothing.
        assert_eq!(q.raw("u"), Some((20_000, 3)));
        assert_eq!(q.status_at("u", 3, 20_001 * DAY - 1).remaining, 0);

        // The first second of the next window starts from zero.
        assert_eq!(q.status_at("u", 3, 20_001 * DAY).remaining, 3);
        let c = q.charge_at("u", 3, 20_001 * DAY).unwrap();
        assert_eq!((c.window(), c.remaining()), (20_001, 2));
        c.settle();
        assert_eq!(q.status_at("u", 3, 20_001 * DAY).resets_at, 20_002 * DAY);
    }

    #[test]
    fn dropping_a_charge_refunds_exactly_one() {
        let q = map();
        let a = q.charge_at("u", 5, 0).unwrap();
        let b = q.charge_at("u", 5, 0).unwrap();
        let c = q.charge_at("u", 5, 0).unwrap();
        assert_eq!(q.status_at("u", 5, 0).remaining, 2);
        drop(a);
        assert_eq!(q.status_at("u", 5, 0).remaining, 3);
        b.refund();
        assert_eq!(q.status_at("u", 5, 0).remaining, 4);
        c.settle();
        assert_eq!(q.status_at("u", 5, 0).remaining, 4);
        assert_eq!(q.raw("u"), Some((0, 1)));
    }

    #[test]
    fn settled_charges_are_never_refunded() {
        let q = map();
        for _ in 0..4 {
            q.charge_at("u", 4, 7).unwrap().settle();
        }
        assert_eq!(q.status_at("u", 4, 7).remaining, 0);
        assert!(q.charge_at("u", 4, 7).is_err());
        assert_eq!(q.raw("u"), Some((0, 4)));
    }

    #[test]
    fn a_refund_after_rollover_is_a_no_op() {
        let q = map();
        let old = q.charge_at("u", 3, DAY - 1).unwrap();
        let new1 = q.charge_at("u", 3, DAY).unwrap();
        let new2 = q.charge_at("u", 3, DAY + 1).unwrap();
        assert_eq!(new2.remaining(), 1);
        drop(old);
        assert_eq!(q.status_at("u", 3, DAY + 2).remaining, 1);
        assert_eq!(q.raw("u"), Some((1, 2)));
        new1.settle();
        new2.settle();
    }

    #[test]
    fn a_refund_never_goes_below_zero() {
        // A refund for the current window can only follow its own deduction, but the entry
        // guards the count anyway: a stray refund must not wrap to u32::MAX.
        let q = map();
        let c = q.charge_at("u", 3, 0).unwrap();
        let entry = q
            .shards
            .iter()
            .find_map(|s| s.read().unwrap().get("u").cloned())
            .unwrap();
        let stray = || MemoryHold {
            entry: entry.clone(),
            window: 0,
        };
        stray().refund();
        stray().refund();
        assert_eq!(q.raw("u"), Some((0, 0)));
        c.settle();
        assert_eq!(q.raw("u"), Some((0, 0)));
    }

    /// The race the sweeper's `swept` mark closes: a charge whose clock was read just
    /// before a boundary, locking only after a sweep (judging by the new window) removed
    /// the user's exhausted entry, must not start a fresh count in the old window.
    #[test]
    fn a_charge_that_read_the_clock_before_a_sweep_lands_in_the_sweeps_window() {
        let q = map();
        let last_second = 20_001 * DAY - 1;
        for _ in 0..3 {
            q.charge_at("u", 3, last_second).unwrap().settle();
        }
        assert!(q.charge_at("u", 3, last_second).is_err(), "exhausted");
        // The clock crosses into the next day; the sweeper runs first.
        assert_eq!(q.sweep_at(20_001 * DAY), 1);
        // A charge that read the clock before the boundary gets the lock only now.
        let late = q.charge_at("u", 3, last_second).unwrap();
        assert_eq!(late.window(), 20_001, "counted in the new window");
        late.settle();
        assert_eq!(q.status_at("u", 3, 20_001 * DAY).remaining, 2);
    }

    #[test]
    fn a_clock_stepping_back_does_not_reopen_a_window() {
        let q = map();
        q.charge_at("u", 1, DAY).unwrap().settle();
        // The wall clock steps back into the previous window: the newer window still holds.
        let err = q.charge_at("u", 1, DAY - 1).unwrap_err();
        assert_eq!(
            err,
            QuotaError::Exceeded {
                limit: 1,
                resets_at: 2 * DAY
            }
        );
        assert_eq!(q.status_at("u", 1, DAY - 1).remaining, 0);
    }

    #[test]
    fn limit_zero_refuses_everything() {
        let q = map();
        assert_eq!(
            q.charge_at("u", 0, 5).unwrap_err(),
            QuotaError::Exceeded {
                limit: 0,
                resets_at: DAY
            }
        );
        assert!(q.is_empty(), "a refused ask stores nothing");
        assert_eq!(
            q.status_at("u", 0, 5),
            QuotaStatus {
                limit: 0,
                remaining: 0,
                resets_at: DAY
            }
        );
    }

    #[test]
    fn each_call_is_judged_by_its_own_limit() {
        let q = map();
        for _ in 0..3 {
            q.charge_at("u", 10, 0).unwrap().settle();
        }
        // The keys file now gives this user a lower limit than already used.
        assert!(q.charge_at("u", 2, 0).is_err());
        assert_eq!(q.status_at("u", 2, 0).remaining, 0);
        assert_eq!(q.status_at("u", 10, 0).remaining, 7);
        let c = q.charge_at("u", 4, 0).unwrap();
        assert_eq!(c.remaining(), 0);
        c.settle();
    }

    #[test]
    fn users_are_independent() {
        let q = map();
        q.charge_at("a", 1, 0).unwrap().settle();
        assert!(q.charge_at("a", 1, 0).is_err());
        q.charge_at("b", 1, 0).unwrap().settle();
        assert_eq!(q.status_at("nobody", 1, 0).remaining, 1);
        assert_eq!(q.len(), 2, "status does not insert");
    }

    #[test]
    fn sweep_removes_idle_users_only() {
        let q = map();
        for i in 0..200 {
            q.charge_at(&format!("idle{i}"), 5, 3).unwrap().settle();
        }
        q.charge_at("active", 5, 3).unwrap().settle();
        q.charge_at("active", 5, DAY + 3).unwrap().settle();
        assert_eq!(q.len(), 201);

        assert_eq!(
            q.sweep_at(DAY - 1),
            0,
            "nothing is idle for a whole window yet"
        );
        assert_eq!(q.sweep_at(DAY + 4), 200);
        assert_eq!(q.len(), 1);
        assert_eq!(q.raw("active"), Some((1, 1)));
        assert_eq!(q.status_at("idle7", 5, DAY + 4).remaining, 5);
        assert_eq!(q.sweep_at(DAY + 5), 0);
        assert_eq!(q.sweep_at(2 * DAY), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn a_live_charge_on_a_swept_entry_is_harmless() {
        let q = map();
        let old = q.charge_at("u", 2, 10).unwrap();
        assert_eq!(q.sweep_at(DAY), 1);
        let new = q.charge_at("u", 2, DAY).unwrap();
        drop(old);
        assert_eq!(q.raw("u"), Some((1, 1)));
        assert_eq!(q.status_at("u", 2, DAY).remaining, 1);
        new.settle();
    }

    #[test]
    fn concurrent_charges_never_overdraw() {
        const THREADS: usize = 8;
        const ATTEMPTS: usize = 250;
        const LIMIT: u32 = 3000;
        let n = (THREADS * ATTEMPTS) as u32;
        for remaining in [0, 1, 17, n - 1, n, n + 1, LIMIT] {
            let q = map();
            for _ in 0..LIMIT - remaining {
                q.charge_at("u", LIMIT, 0).unwrap().settle();
            }
            let admitted = AtomicUsize::new(0);
            let start = Barrier::new(THREADS + 1);
            std::thread::scope(|s| {
                for _ in 0..THREADS {
                    s.spawn(|| {
                        start.wait();
                        let mut held = Vec::new();
                        for _ in 0..ATTEMPTS {
                            if let Ok(c) = q.charge_at("u", LIMIT, 0) {
                                held.push(c);
                            }
                        }
                        admitted.fetch_add(held.len(), Ordering::Relaxed);
                        held.into_iter().for_each(Charge::settle);
                    });
                }
                // An observer racing the chargers: the count never passes the limit.
                s.spawn(|| {
                    start.wait();
                    for _ in 0..20_000 {
                        let (_, used) = q.raw("u").unwrap_or_default();
                        assert!(used <= LIMIT, "overdraft: {used} > {LIMIT}");
                    }
                });
            });
            let expected = remaining.min(n);
            assert_eq!(
                admitted.load(Ordering::Relaxed),
                expected as usize,
                "R = {remaining}"
            );
            assert_eq!(q.raw("u").map(|r| r.1), Some(LIMIT - remaining + expected));
        }
    }

    #[test]
    fn racing_charges_and_refunds_leave_only_the_settled() {
        const THREADS: usize = 8;
        const ATTEMPTS: usize = 2000;
        const LIMIT: u32 = 64;
        let q = map();
        let settled = AtomicUsize::new(0);
        let admitted = AtomicUsize::new(0);
        let start = Barrier::new(THREADS);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (q, settled, admitted, start) = (&q, &settled, &admitted, &start);
                s.spawn(move || {
                    start.wait();
                    let mut held = Vec::new();
                    for i in 0..ATTEMPTS {
                        if let Ok(c) = q.charge_at("u", LIMIT, 0) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            assert!(c.remaining() < LIMIT);
                            if (t + i) % 7 == 0 {
                                settled.fetch_add(1, Ordering::Relaxed);
                                c.settle();
                            } else {
                                held.push(c);
                            }
                        }
                        // Refund in bursts so other threads meet both full and empty windows.
                        if i % 5 == 4 {
                            held.clear();
                        }
                    }
                });
            }
        });
        let settled = settled.load(Ordering::Relaxed) as u32;
        assert!(settled > 0 && settled <= LIMIT);
        assert!(admitted.load(Ordering::Relaxed) >= settled as usize);
        assert_eq!(q.raw("u"), Some((0, settled)));
    }

    #[tokio::test]
    async fn the_store_trait_uses_the_wall_clock() {
        fn assert_send<T: Send>(t: T) -> T {
            t
        }
        let q = map();
        let user = UserId::new("u");
        let before = unix_now();
        let c = assert_send(QuotaStore::charge(&q, &user, 2)).await.unwrap();
        assert_eq!(c.remaining(), 1);
        let s = QuotaStore::status(&q, &user, 2).await.unwrap();
        assert_eq!(s.remaining, 1);
        assert!(s.resets_at > before && s.resets_at <= before + DAY + 1);
        drop(c);
        assert_eq!(QuotaStore::status(&q, &user, 2).await.unwrap().remaining, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_runs_until_cancelled() {
        let q = Arc::new(QuotaMap::new(Duration::from_secs(60)));
        // Charged two windows ago by the wall clock, so the next sweep finds it idle.
        q.charge_at("idle", 1, unix_now() - 120).unwrap().settle();
        let stop = CancellationToken::new();
        let task = q.spawn_sweeper(Duration::from_secs(5), stop.clone());
        for _ in 0..10 {
            if q.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        assert!(q.is_empty());
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_ends_with_its_map() {
        let q = Arc::new(map());
        let task = q.spawn_sweeper(Duration::from_secs(1), CancellationToken::new());
        drop(q);
        task.await.unwrap();
    }

    #[test]
    fn exceeded_reads_well() {
        let e = QuotaError::Exceeded {
            limit: 20,
            resets_at: 1_795_478_400,
        };
        assert_eq!(
            e.to_string(),
            "all 20 asks of this window are used; the quota resets at 2026-11-24T00:00:00Z"
        );
        assert_eq!(
            QuotaError::Unavailable("down".into()).retry_after_secs(0),
            1
        );
    }
}
