//! Streaming answers polled inside their connection's task.
//!
//! A spawned answer costs, per token, two task wake-ups: the model's timer wakes the
//! answer, whose frame wakes the connection, and each wake-up is a trip through tokio's
//! run queue. An HTTP/1 connection holds one answer at a time, so the server instead
//! hands its answers to the connection's [`Host`], and [`Hosting`] polls the connection
//! and its answers in one task: the timer wakes that task once, the answer queues its
//! frame, and hyper writes it in the same poll. Every open stream saves a task, too.
//!
//! Each future inside gets a waker of its own that raises its flag, so a poll reaches
//! only the futures that woke. A wake from inside the poll (the answer's frame waking
//! the body hyper polls) only raises a flag: the poll is still running and looks again
//! before it returns, so the task is not woken for nothing.
//!
//! Answers outlive their connection only briefly: once it closes, their bodies are gone,
//! they see it, refund and end, and the task ends after them.

use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// An answer, boxed: its type is the service's, and the connection's is hyper's.
pub(crate) type Answer = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Rounds of polls one task poll runs before it yields to the scheduler, should its
/// futures keep waking one another (or themselves, once tokio's budget runs out).
const ROUNDS: usize = 32;

/// Where a connection's service puts the answers it starts; cloned into the service.
#[derive(Clone)]
pub(crate) struct Host {
    shared: Arc<Shared>,
}

/// The connection's state, shared with its service; also the connection's own flag (its
/// waker raises `conn_woken`), which saves an allocation per connection.
struct Shared {
    /// True while the task is polling: a wake then only raises its flag.
    polling: AtomicBool,
    /// The connection has woken since its last poll.
    conn_woken: AtomicBool,
    /// The connection's task, woken by flags raised while it is not polling.
    task: Mutex<Option<Waker>>,
    /// Answers started since the last round, not polled by the host yet.
    arrived: Mutex<Vec<Answer>>,
    /// `arrived` is not empty (checked without its lock).
    any_arrived: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One future's wake-up: raises its flag, and wakes the task unless it is polling.
struct Flag {
    woken: AtomicBool,
    shared: Arc<Shared>,
}

impl Flag {
    fn new(shared: &Arc<Shared>) -> Arc<Flag> {
        // Raised: a future that was never polled here must be, once.
        Arc::new(Flag {
            woken: AtomicBool::new(true),
            shared: shared.clone(),
        })
    }

    /// Lowers the flag; true if it was raised.
    fn take(&self) -> bool {
        self.woken.swap(false, Ordering::SeqCst)
    }
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Both orderings SeqCst, and the poll's in the mirror order (lower `polling`,
        // then read the flags): either this sees the poll still running, and the poll
        // then sees this flag, or this wakes the task.
        self.woken.store(true, Ordering::SeqCst);
        self.shared.wake_unless_polling();
    }
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // As for an answer's `Flag`.
        self.conn_woken.store(true, Ordering::SeqCst);
        self.wake_unless_polling();
    }
}

impl Shared {
    fn wake_unless_polling(&self) {
        if !self.polling.load(Ordering::SeqCst) {
            let task = lock(&self.task).clone();
            if let Some(task) = task {
                task.wake();
            }
        }
    }
}

impl Host {
    pub(crate) fn new() -> Host {
        Host {
            shared: Arc::new(Shared {
                polling: AtomicBool::new(false),
                // Raised: the connection must be polled once.
                conn_woken: AtomicBool::new(true),
                task: Mutex::new(None),
                arrived: Mutex::new(Vec::new()),
                any_arrived: AtomicBool::new(false),
            }),
        }
    }

    /// Hands `answer` to the connection's task, which polls it from its next round on.
    pub(crate) fn run(&self, answer: Answer) {
        let mut arrived = lock(&self.shared.arrived);
        // One slot: an HTTP/1 connection rarely holds two answers at once.
        arrived.reserve_exact(1);
        arrived.push(answer);
        drop(arrived);
        self.shared.any_arrived.store(true, Ordering::SeqCst);
        self.shared.wake_unless_polling();
    }
}

/// A future polled only after its flag was raised.
struct Flagged<F> {
    fut: F,
    flag: Arc<Flag>,
    waker: Waker,
}

impl<F> Flagged<F> {
    fn new(fut: F, shared: &Arc<Shared>) -> Self {
        let flag = Flag::new(shared);
        Flagged {
            fut,
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

/// A connection and the answers its service started, polled as one future. Ends when
/// the connection has ended and so have its answers, with the connection's result.
pub(crate) struct Hosting<'c, C: Future> {
    /// The connection, dropped in place once it ends (its bodies with it, so that the
    /// answers see their clients gone).
    conn: Pin<&'c mut Option<C>>,
    /// The connection's waker: raises `shared.conn_woken`.
    conn_waker: Waker,
    ended: Option<C::Output>,
    answers: Vec<Flagged<Answer>>,
    shared: Arc<Shared>,
    /// The waker last handed to `shared.task`, to hand it again only when it changes.
    task: Option<Waker>,
}

impl<'c, C: Future> Hosting<'c, C> {
    /// Hosts the answers `host` receives alongside `conn` (pinned by the caller, as
    /// `Some`).
    pub(crate) fn new(conn: Pin<&'c mut Option<C>>, host: &Host) -> Self {
        Hosting {
            conn,
            conn_waker: Waker::from(host.shared.clone()),
            ended: None,
            answers: Vec::new(),
            shared: host.shared.clone(),
            task: None,
        }
    }

    /// Polls whatever woke, once each; true if anything did.
    fn round(&mut self) -> bool {
        let mut any = false;
        if self.shared.any_arrived.swap(false, Ordering::SeqCst) {
            let arrived = mem::take(&mut *lock(&self.shared.arrived));
            self.answers.reserve_exact(arrived.len());
            for answer in arrived {
                self.answers.push(Flagged::new(answer, &self.shared));
            }
        }
        // The connection first: when a client leaves, hyper seeing it drops the body,
        // and the answer then ends on that (the drop's moment is when its detection lag
        // starts) rather than on its own socket watch in the same round.
        if self.shared.conn_woken.swap(false, Ordering::SeqCst) {
            if let Some(conn) = self.conn.as_mut().as_pin_mut() {
                any = true;
                let mut cx = Context::from_waker(&self.conn_waker);
                if let Poll::Ready(out) = conn.poll(&mut cx) {
                    self.ended = Some(out);
                    self.conn.set(None);
                }
            }
        }
        let mut i = 0;
        while i < self.answers.len() {
            let answer = &mut self.answers[i];
            if answer.flag.take() {
                any = true;
                let mut cx = Context::from_waker(&answer.waker);
                if answer.fut.as_mut().poll(&mut cx).is_ready() {
                    self.answers.swap_remove(i);
                    continue;
                }
            }
            i += 1;
        }
        any
    }

    fn any_raised(&self) -> bool {
        self.shared.any_arrived.load(Ordering::SeqCst)
            || self.shared.conn_woken.load(Ordering::SeqCst)
            || self
                .answers
                .iter()
                .any(|a| a.flag.woken.load(Ordering::SeqCst))
    }
}

// Nothing in a `Hosting` is structurally pinned: the connection is pinned by the caller,
// the answers are boxed, and the connection's output is only ever moved out.
impl<C: Future> Unpin for Hosting<'_, C> {}

impl<C: Future> Future for Hosting<'_, C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let task = cx.waker().clone();
            *lock(&this.shared.task) = Some(task.clone());
            this.task = Some(task);
        }
        this.shared.polling.store(true, Ordering::SeqCst);
        let mut rounds = 0;
        while this.round() {
            rounds += 1;
            if rounds == ROUNDS {
                break;
            }
        }
        this.shared.polling.store(false, Ordering::SeqCst);
        // A flag raised during the poll woke nobody: come back for it. (After a full
        // `ROUNDS` this is also the yield that lets other tasks run.)
        if this.any_raised() {
            cx.waker().wake_by_ref();
        }
        if this.conn.is_none() && this.answers.is_empty() && !this.any_raised() {
            if let Some(out) = this.ended.take() {
                return Poll::Ready(out);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::{mpsc, oneshot};

    /// Counts the wake-ups the task gets.
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// An answer sends to its "connection" from inside the task's poll: the connection
    /// runs in that same poll, and the task is not woken for it.
    #[tokio::test]
    async fn a_wake_from_inside_the_poll_does_not_wake_the_task() {
        let host = Host::new();
        let (tx, mut rx) = mpsc::channel::<u32>(1);
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let (got_tx, mut got_rx) = oneshot::channel::<u32>();
        let (_hold, never) = oneshot::channel::<()>();
        host.run(Box::pin(async move {
            let _ = go_rx.await;
            let _ = tx.send(7).await;
        }));
        let conn = pin!(Some(async move {
            if let Some(n) = rx.recv().await {
                let _ = got_tx.send(n);
            }
            let _ = never.await;
        }));
        let mut hosting = pin!(Hosting::new(conn, &host));
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(hosting.as_mut().poll(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        // From outside the poll: the answer's wake reaches the task.
        go_tx.send(()).unwrap();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        // In one poll the answer sends and the connection receives, with no wake-up.
        assert!(hosting.as_mut().poll(&mut cx).is_pending());
        assert_eq!(got_rx.try_recv(), Ok(7));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    }

    /// The connection ending first does not end the task: its answers still run to
    /// their end (where they settle or refund), and the connection's result comes after.
    #[tokio::test]
    async fn answers_outlive_their_connection() {
        let host = Host::new();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let (ended_tx, mut ended_rx) = oneshot::channel::<()>();
        host.run(Box::pin(async move {
            let _ = go_rx.await;
            let _ = ended_tx.send(());
        }));
        let conn = pin!(Some(async { 42 }));
        let mut hosting = pin!(Hosting::new(conn, &host));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(hosting.as_mut().poll(&mut cx).is_pending());
        assert!(ended_rx.try_recv().is_err());
        go_tx.send(()).unwrap();
        assert_eq!(hosting.await, 42);
        assert!(ended_rx.try_recv().is_ok());
    }

    /// A future that wakes itself on every poll cannot keep the task from yielding.
    #[tokio::test(flavor = "current_thread")]
    async fn a_busy_answer_lets_other_tasks_run() {
        let host = Host::new();
        let other_ran = Arc::new(AtomicBool::new(false));
        let seen = other_ran.clone();
        host.run(Box::pin(std::future::poll_fn(move |cx| {
            if seen.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })));
        let flag = other_ran.clone();
        let other = tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
        let conn = pin!(Some(async {}));
        Hosting::new(conn, &host).await;
        assert!(other_ran.load(Ordering::SeqCst));
        other.await.unwrap();
    }
}
