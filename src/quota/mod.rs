//! Per-user quotas: a sharded in-memory map and the self-refunding [`Charge`].
//!
//! Every ask costs one unit of its user's quota, taken before any pipeline work and given
//! back if the answer is not delivered (contract §2). This module owns both halves of that rule.
//!
//! ```
//! use std::time::Duration;
//! use askstream::quota::QuotaMap;
//!
//! let quota = QuotaMap::new(Duration::from_secs(3600));
//! let now = 1_800_000_000; // Unix seconds; `charge()` reads the clock itself
//! let first = quota.charge_at("alice", 2, now).unwrap();
//! assert_eq!(first.remaining(), 1);
//! first.settle(); // delivered: stays spent
//! let second = quota.charge_at("alice", 2, now).unwrap();
//! assert!(quota.charge_at("alice", 2, now).is_err()); // nothing left, nothing taken
//! drop(second); // not delivered: refunds itself
//! assert_eq!(quota.status_at("alice", 2, now).remaining, 1);
//! ```
//!
//! # Windows aligned to the epoch
//!
//! A window is an integer: `unix_secs / window_secs`. Aligning to the Unix epoch instead of
//! to each user's first ask means every process (and every replica sharing a store) agrees
//! on the boundaries without talking, `resetsAt` is plain arithmetic, and "a new window has
//! begun" needs no timer and no reset pass: the next charge simply sees an older index.
//!
//! # One atomic word per user
//!
//! An entry is a single `AtomicU64` packing the window index (high 32 bits) and the asks
//! used in it (low 32 bits). Taking an ask is one compare-and-swap loop over that word:
//! "is anything left?" and "take one" are a single indivisible step, so with `R` asks left
//! and `N` concurrent charges exactly `min(N, R)` succeed on any number of threads — no
//! overdraft, and no lock held while deciding. Rolling into a new window happens inside the
//! same CAS (an older stored index reads as zero used).
//!
//! # Shards
//!
//! Users are spread over 64 maps, each behind its own `RwLock`. An existing user —
//! the hot path — takes only a shared read lock and then works on its atomic word, so asks
//! never wait for each other. The exclusive lock is taken only to insert a user seen for the
//! first time (double-checked) and by the sweeper, and then blocks only one shard of 64. The shard is picked with a per-map random hasher so that clients cannot
//! choose user ids that all land in one shard.
//!
//! # The refund is a value
//!
//! A successful charge returns a [`Charge`], which gives the ask back when dropped unless
//! [`Charge::settle`] was called once the `done` frame was handed to the connection. Every
//! way an answer can fail — an error, a timeout, a disconnect that drops the response body,
//! a panic that unwinds through the pipeline, a cancelled future — drops the charge, so the
//! refund cannot be forgotten. `settle` and `refund` take `self`, so a charge is refunded at
//! most once by construction. A refund carries the window it was taken from and is a no-op
//! once that window has ended: it never lands in a later window than its deduction.
//!
//! # Sweeping
//!
//! An entry whose stored window is older than the current one reads exactly like a fresh
//! entry, so removing it changes nothing a user can observe; [`QuotaMap::sweep`] does that,
//! and memory follows active users, not every user ever seen. See [`QuotaMap::sweep_at`]
//! for why a live [`Charge`] pointing at a swept entry is harmless.
//!
//! # Shared stores
//!
//! Several instances behind one load balancer need one shared count. A shared store
//! implements [`QuotaStore`]; its `charge` wraps its own [`Hold`] (a lease in the store) in
//! the same self-refunding [`Charge`], and its background work (renewing leases, sending
//! settles and refunds) runs from [`QuotaStore::spawn_housekeeping`].
//! [`RedisStore`] (feature `redis`, on by default) is one: see its docs for the design.
//! The in-memory map does its work synchronously and returns a future that is already
//! ready.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::auth::UserId;
use crate::clock::rfc3339;
use crate::pipeline::BoxFuture;

mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use memory::QuotaMap;
#[cfg(feature = "redis")]
pub use redis::{RedisConfig, RedisStore};

/// Where quota lives: the in-memory [`QuotaMap`] by default, or a store shared by several
/// instances.
///
/// Object-safe, so the service holds an `Arc<dyn QuotaStore>` and is not generic over the
/// store: the in-memory path pays one small allocation per ask for its boxed future, next
/// to nothing beside the rest of an ask (the `dispatch` group in `benches/quota.rs`
/// measures it).
pub trait QuotaStore: Send + Sync + 'static {
    /// Takes one ask from `user`'s current window, or refuses without taking anything.
    fn charge<'a>(
        &'a self,
        user: &'a UserId,
        limit: u32,
    ) -> BoxFuture<'a, Result<Charge, QuotaError>>;

    /// The caller's standing in the current window, without charging.
    fn status<'a>(
        &'a self,
        user: &'a UserId,
        limit: u32,
    ) -> BoxFuture<'a, Result<QuotaStatus, QuotaError>>;

    /// Starts the store's background work (the in-memory map's sweeper; a shared store's
    /// lease renewals and its queue of settles and refunds), to run until `stop` is
    /// cancelled. The service calls it once, from inside the runtime, before its first
    /// ask, and cancels `stop` when its last clone is dropped, so an embedded service
    /// cannot leak the task. The default does nothing.
    fn spawn_housekeeping(self: Arc<Self>, stop: CancellationToken) {
        let _ = stop;
    }

    /// Resolves once the settles and refunds of finished answers have reached the store
    /// (the server awaits it, within a bound, before it exits). The default is ready at
    /// once: stores that settle synchronously have nothing pending.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Appends the store's own series to the `/metrics` exposition. The default adds none.
    fn render_metrics(&self, out: &mut String) {
        let _ = out;
    }
}

/// What a store holds for one charged ask until the answer ends: the in-memory map's
/// count, or a shared store's lease. Exactly one of the two methods is called, once.
pub trait Hold: Send + 'static {
    /// The answer was delivered: the ask stays spent.
    fn settle(self: Box<Self>);
    /// The answer was not delivered: give the ask back to the window it came from (a
    /// no-op once that window has ended).
    fn refund(self: Box<Self>);
}

/// One deducted ask. Dropping it refunds; [`Charge::settle`] keeps it.
///
/// Holding the charge for as long as the answer is in flight is what makes refunds
/// exactly-once: whichever way the answer ends, the charge is either settled or dropped,
/// and both consume it.
#[must_use = "dropping a Charge refunds the ask at once; settle it when the answer is delivered"]
pub struct Charge {
    hold: Option<HoldKind>,
    remaining: u32,
}

/// The in-memory map's hold is inline, so its asks allocate nothing for the charge; a
/// shared store's is boxed behind [`Hold`].
enum HoldKind {
    Memory(memory::MemoryHold),
    Store(Box<dyn Hold>),
}

impl Charge {
    /// A charge that settles or refunds through `hold`; `remaining` is the user's quota
    /// left after it, for the `done` event.
    ///
    /// Public so that other [`QuotaStore`]s can hand out the same self-refunding guard.
    pub fn new(hold: Box<dyn Hold>, remaining: u32) -> Self {
        Charge {
            hold: Some(HoldKind::Store(hold)),
            remaining,
        }
    }

    fn memory(hold: memory::MemoryHold, remaining: u32) -> Self {
        Charge {
            hold: Some(HoldKind::Memory(hold)),
            remaining,
        }
    }

    /// Asks left in the window after this one, for the `done` event's `quotaRemaining`.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// The answer was delivered: the ask stays spent.
    pub fn settle(mut self) {
        match self.hold.take() {
            Some(HoldKind::Memory(_)) | None => {}
            Some(HoldKind::Store(h)) => h.settle(),
        }
    }

    /// The answer was not delivered: give the ask back now (same as dropping).
    pub fn refund(self) {}

    /// The window the in-memory map took the ask from.
    #[cfg(test)]
    fn window(&self) -> u64 {
        match &self.hold {
            Some(HoldKind::Memory(h)) => u64::from(h.window()),
            _ => panic!("not an in-memory charge"),
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        match self.hold.take() {
            Some(HoldKind::Memory(h)) => h.refund(),
            Some(HoldKind::Store(h)) => h.refund(),
            None => {}
        }
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Charge")
            .field("remaining", &self.remaining)
            .field("settled", &self.hold.is_none())
            .finish()
    }
}

/// A user's standing in the current window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaStatus {
    /// Asks per window.
    pub limit: u32,
    /// Asks left in this window.
    pub remaining: u32,
    /// Unix seconds at which the window ends.
    pub resets_at: u64,
}

/// Why a charge was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QuotaError {
    /// Nothing left in the window.
    Exceeded {
        /// Asks per window.
        limit: u32,
        /// Unix seconds at which the window ends.
        resets_at: u64,
    },
    /// The store could not be reached, or did not answer in time (shared stores only).
    /// Nothing was charged; a charge whose outcome is unknown is released by its lease.
    Unavailable(String),
}

impl QuotaError {
    /// Seconds a refused client should wait, for the `retry-after` header.
    ///
    /// At least 1, so a refusal in the window's last second never says "retry now" (which
    /// would be refused again). For [`QuotaError::Unavailable`], 1: a store that failed
    /// over or restarted is usually back within seconds, and clients back off on their own.
    pub fn retry_after_secs(&self, now_unix_secs: u64) -> u64 {
        match self {
            QuotaError::Exceeded { resets_at, .. } => {
                resets_at.saturating_sub(now_unix_secs).max(1)
            }
            QuotaError::Unavailable(_) => 1,
        }
    }
}

impl std::fmt::Display for QuotaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuotaError::Exceeded { limit, resets_at } => write!(
                f,
                "all {limit} asks of this window are used; the quota resets at {}",
                rfc3339(*resets_at)
            ),
            QuotaError::Unavailable(why) => write!(
                f,
                "the quota store is unavailable ({why}); nothing was charged, try again shortly"
            ),
        }
    }
}

impl std::error::Error for QuotaError {}
