//! Per-user quotas: a sharded in-memory map and the self-refunding [`Charge`].
//!
//! STUB — being implemented (see issue 2 §4). Signatures are the contract.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::UserId;

/// Where quota lives. The in-memory [`QuotaMap`] is the default; a shared store (Redis,
/// Valkey) can implement this trait without slowing the in-memory path, because the
/// server is generic over the store (static dispatch, no boxing).
pub trait QuotaStore: Send + Sync + 'static {
    /// Takes one ask from `user`'s current window, or refuses without taking anything.
    fn charge(&self, user: &UserId, limit: u32) -> impl Future<Output = Result<Charge, QuotaError>> + Send;
    /// The caller's standing in the current window, without charging.
    fn status(&self, user: &UserId, limit: u32) -> impl Future<Output = Result<QuotaStatus, QuotaError>> + Send;
}

/// Gives one ask back to the window it was taken from.
pub trait Refund: Send + Sync {
    /// Returns one ask to window `window`; a no-op if that window has ended.
    fn refund(&self, window: u64);
}

/// One deducted ask. Dropping it refunds; [`Charge::settle`] keeps it.
pub struct Charge {
    target: Option<Arc<dyn Refund>>,
    window: u64,
    remaining: u32,
    limit: u32,
    resets_at: u64,
}

impl Charge {
    /// A charge that refunds through `target` into `window` unless settled.
    pub fn new(target: Arc<dyn Refund>, window: u64, remaining: u32, limit: u32, resets_at: u64) -> Self {
        Charge { target: Some(target), window, remaining, limit, resets_at }
    }
    /// Asks left in the window after this one.
    pub fn remaining(&self) -> u32 { self.remaining }
    /// The window's limit.
    pub fn limit(&self) -> u32 { self.limit }
    /// Unix seconds at which the window ends.
    pub fn resets_at(&self) -> u64 { self.resets_at }
    /// The answer was delivered: the ask stays spent.
    pub fn settle(mut self) { self.target = None; }
    /// The answer was not delivered: give the ask back now (same as dropping).
    pub fn refund(self) {}
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(t) = self.target.take() {
            t.refund(self.window);
        }
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Charge").field("window", &self.window).field("remaining", &self.remaining).field("settled", &self.target.is_none()).finish()
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
    /// The store could not be reached (shared stores only).
    Unavailable(String),
}

/// The in-memory sharded quota map.
pub struct QuotaMap {
    window: Duration,
}

impl QuotaMap {
    /// A map whose windows are `window` long, aligned to the Unix epoch.
    pub fn new(window: Duration) -> Self { QuotaMap { window } }
    /// Drops entries idle for a whole window; returns how many were removed.
    pub fn sweep(&self) -> usize { let _ = self.window; 0 }
}

impl QuotaStore for QuotaMap {
    async fn charge(&self, _user: &UserId, limit: u32) -> Result<Charge, QuotaError> {
        Err(QuotaError::Exceeded { limit, resets_at: 0 })
    }
    async fn status(&self, _user: &UserId, limit: u32) -> Result<QuotaStatus, QuotaError> {
        Ok(QuotaStatus { limit, remaining: limit, resets_at: 0 })
    }
}
