//! Graceful shutdown in two steps: *drain*, then *stop*.
//!
//! Draining stops new work in the service: `/healthz` turns 503 and new asks are refused
//! with `SHUTTING_DOWN`, while answers already streaming keep going. *Stopping* ends every
//! answer still running with a `SHUTTING_DOWN` event, refunded.
//!
//! These are the service's two states only. [`serve`](crate::serve) runs the whole sequence
//! around them: it ends the accept loop, drains, closes connections as their responses
//! finish, and stops once the grace period is over.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// The shutdown state shared by the accept loop, the service and every answer.
///
/// Cheap to clone; all clones see the same state.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    /// Asked by every ask and health check: a switch, so that is an atomic load rather
    /// than a lock of the token's mutex, which every clone shares.
    drain: Arc<Switch>,
    stop: CancellationToken,
}

impl Shutdown {
    /// A server that is running normally.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining: no new asks, `/healthz` 503. Idempotent.
    pub fn drain(&self) {
        self.drain.set();
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.drain.is_set()
    }

    /// The grace period is over: answers still running must end now. Implies draining.
    pub fn stop(&self) {
        self.drain.set();
        self.stop.cancel();
    }

    /// Whether answers have been told to stop.
    #[cfg(test)]
    fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves when answers must stop. Answers keep this pinned in their `select!`.
    pub fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }
}

/// A switch that is set once and stays set: asked with one atomic load, waited on as a
/// cancellation token.
///
/// tokio-util's `CancellationToken::is_cancelled` locks a mutex that every clone of the
/// token shares. The closing switch is asked on every wake of every connection's task,
/// so through a token alone each token event took one lock of a single server-wide
/// mutex, which threads on other cores would contend for.
#[derive(Debug, Default)]
pub(crate) struct Switch {
    set: AtomicBool,
    token: CancellationToken,
}

impl Switch {
    /// Sets the switch and wakes its waiters. Idempotent.
    pub(crate) fn set(&self) {
        // Stored before the wake-up, so a woken waiter that asks sees it set.
        self.set.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Whether the switch is set.
    pub(crate) fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Resolves once the switch is set.
    pub(crate) fn wait(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

/// SIGINT and SIGTERM as they arrive (SIGINT only on non-Unix platforms).
///
/// The handlers are installed by [`Signals::install`], not when a wait first starts, so a
/// signal that arrives right after the server starts listening is never lost. The binary
/// waits twice: the first signal starts the drain, a second ends it at once.
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers.
    ///
    /// # Errors
    /// If the handlers cannot be installed (outside a Tokio runtime with signals enabled).
    pub fn install() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    /// Resolves on the next SIGINT or SIGTERM.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_implies_drain_and_wakes_waiters() {
        let s = Shutdown::new();
        assert!(!s.is_draining() && !s.is_stopped());
        s.drain();
        assert!(s.is_draining() && !s.is_stopped());
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.stopped().await })
        };
        s.stop();
        waiter.await.unwrap();
        assert!(s.is_stopped());
    }

    #[test]
    fn a_clone_sees_the_drain() {
        let s = Shutdown::new();
        let clone = s.clone();
        s.drain();
        assert!(clone.is_draining());
    }

    #[tokio::test]
    async fn a_switch_wakes_its_waiters_and_stays_set() {
        let switch = Arc::new(Switch::default());
        assert!(!switch.is_set());
        let waiter = {
            let switch = switch.clone();
            tokio::spawn(async move {
                switch.wait().await;
                switch.is_set()
            })
        };
        // Let the waiter register before the switch is set.
        tokio::task::yield_now().await;
        switch.set();
        assert!(waiter.await.unwrap(), "the woken waiter sees it set");
        switch.set();
        assert!(switch.is_set());
        switch.wait().await;
    }
}
