//! What one connection is doing, for the deadlines hyper does not keep for HTTP/2: a first
//! request within `--header-timeout-secs` (a client that sends part of the preface, or
//! SETTINGS and nothing more, or a HEADERS block it never finishes), a close after
//! `--idle-connection-secs` with no stream open, and no stream outliving its answer.
//!
//! The last is about h2 flow control: a client that never opens a stream's window gets
//! `SLOW_CLIENT` and its answer ends, but hyper holds the stream (and a frame) waiting for
//! window space it will never get, and never polls the body again, so nothing in the
//! stream can end it. A body that outlives its answer by `--slow-client-secs` therefore
//! closes its connection: the client has not read for twice that long.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::sse::body::Probe;

/// Requests a connection has started, and those still open (request in, response body not
/// yet dropped).
#[derive(Debug, Default)]
pub(crate) struct Activity {
    started: AtomicU64,
    open: AtomicUsize,
    changed: Notify,
    /// The streaming answers' bodies, to find one that outlives its answer.
    streams: Mutex<Vec<Probe>>,
}

/// One request of a connection, from its arrival to the end of its response body.
#[derive(Debug)]
pub(crate) struct Open(Arc<Activity>);

impl Activity {
    /// A request arrived.
    pub(crate) fn open(self: &Arc<Self>) -> Open {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.open.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
        Open(self.clone())
    }

    /// Watches a streaming answer's body (bodies already gone are forgotten here).
    pub(crate) fn track(&self, probe: Probe) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.retain(|p| !p.body_gone());
        streams.push(probe);
    }

    /// Whether a body has outlived its answer by `linger`.
    fn lingering(&self, linger: Duration) -> bool {
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams
            .iter()
            .filter_map(Probe::lingering_since)
            .any(|since| since.elapsed() >= linger)
    }

    /// Resolves when the connection should close: no request within `first`, none open
    /// for `idle` after the last one ended, or a body outliving its answer by `linger`.
    pub(crate) async fn expired(&self, first: Duration, idle: Duration, linger: Duration) {
        tokio::select! {
            () = self.quiet(first, idle) => {}
            () = self.stuck(linger) => {}
        }
    }

    /// Checks for a lingering body every `linger`: a body found lingering is at most
    /// twice `linger` past its answer when the connection closes.
    async fn stuck(&self, linger: Duration) {
        let mut tick = tokio::time::interval_at(Instant::now() + linger, linger);
        loop {
            tick.tick().await;
            if self.lingering(linger) {
                tracing::debug!("closing a connection whose stream outlived its answer");
                return;
            }
        }
    }

    async fn quiet(&self, first: Duration, idle: Duration) {
        loop {
            // Registered before the counters are read, so no change can slip between the
            // read and the wait.
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            let started = self.started.load(Ordering::Acquire);
            if self.open.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            let wait = if started == 0 { first } else { idle };
            tokio::select! {
                () = tokio::time::sleep(wait) => {
                    let quiet = self.open.load(Ordering::Acquire) == 0
                        && self.started.load(Ordering::Acquire) == started;
                    if quiet {
                        return;
                    }
                }
                () = &mut changed => {}
            }
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    /// How long until `a` expires, waited for in a task of its own.
    fn time_to_expiry(a: &Arc<Activity>) -> tokio::task::JoinHandle<Duration> {
        let a = a.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            a.expired(FIRST, IDLE, Duration::from_secs(24 * 3600)).await;
            start.elapsed()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn no_first_request_expires_after_the_first_deadline() {
        let a = Arc::new(Activity::default());
        let start = tokio::time::Instant::now();
        a.expired(FIRST, IDLE, Duration::from_secs(24 * 3600)).await;
        assert_eq!(start.elapsed(), FIRST);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_request_holds_the_connection_and_idleness_counts_from_its_end() {
        let a = Arc::new(Activity::default());
        let open = a.open();
        let waiter = time_to_expiry(&a);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!waiter.is_finished(), "a request is open");
        drop(open);
        let waited = waiter.await.unwrap();
        assert_eq!(waited, Duration::from_secs(3600) + IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_during_the_idle_wait_restarts_it() {
        let a = Arc::new(Activity::default());
        drop(a.open());
        let waiter = time_to_expiry(&a);
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(a.open());
        assert_eq!(waiter.await.unwrap(), Duration::from_secs(30) + IDLE);
    }
}
