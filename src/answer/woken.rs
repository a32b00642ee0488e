//! A future that is polled again only after it has woken.
//!
//! The generation loop races every token against the client leaving and the server
//! stopping. Polling those two futures once per token cost a channel lock, a socket
//! readiness check and a cancellation check each time, though they almost never fire.
//! [`Woken`] gives the inner future a waker of its own that raises a flag before waking
//! the task, so a poll of the wrapper costs one atomic swap until the inner future has
//! something to say. It is the Future contract taken at its word: a future needs polling
//! only after it woke its waker.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// Wraps a future (pinned by the caller: `F` is a `Pin<&mut _>`) so that polls between
/// its wake-ups do not reach it.
pub(super) struct Woken<F> {
    fut: F,
    /// Also the inner future's waker, made at each of its (rare) polls rather than kept:
    /// this is part of every open answer.
    flag: Arc<Flag>,
    /// The task waker last handed to the flag, to hand it again only when it changes.
    task: Option<Waker>,
}

/// Set by the inner future's waker; then the task is woken.
struct Flag {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Raised before the task is woken, so the poll the wake causes sees it.
        self.woken.store(true, Ordering::Release);
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl<F: Future + Unpin> Woken<F> {
    pub(super) fn new(fut: F) -> Self {
        // Raised at first: the inner future has not been polled, so it has registered
        // nothing and must be polled once.
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Woken {
            fut,
            flag,
            task: None,
        }
    }
}

impl<F: Future + Unpin> Future for Woken<F> {
    type Output = F::Output;

    /// Polls the inner future if it has woken since its last poll; `Pending` otherwise.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // The task to wake must be the one polling now (the first poll may come from a
        // no-op waker, before the answer has a task).
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let task = cx.waker().clone();
            *this
                .flag
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(task.clone());
            this.task = Some(task);
        }
        // Lowered before the poll: a wake during it raises it again.
        if !this.flag.woken.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        let inner = Waker::from(this.flag.clone());
        Pin::new(&mut this.fut).poll(&mut Context::from_waker(&inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `open` is set, waking its waker when set through
    /// `Gate::open`.
    struct Gate {
        polls: AtomicUsize,
        open: AtomicBool,
        waker: Mutex<Option<Waker>>,
    }

    impl Gate {
        fn new() -> Arc<Gate> {
            Arc::new(Gate {
                polls: AtomicUsize::new(0),
                open: AtomicBool::new(false),
                waker: Mutex::new(None),
            })
        }

        fn open(&self) {
            self.open.store(true, Ordering::SeqCst);
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }

        async fn wait(self: Arc<Self>) {
            std::future::poll_fn(|cx| {
                self.polls.fetch_add(1, Ordering::SeqCst);
                if self.open.load(Ordering::SeqCst) {
                    Poll::Ready(())
                } else {
                    *self.waker.lock().unwrap() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await
        }
    }

    /// A task waker that counts its wake-ups.
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn polls_the_inner_future_only_after_it_woke() {
        let gate = Gate::new();
        let task = Arc::new(Task(AtomicUsize::new(0)));
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        let mut w = Woken::new(Box::pin(gate.clone().wait()));

        // The first poll reaches the inner future; the next ones do not.
        for _ in 0..5 {
            assert!(Pin::new(&mut w).poll(&mut cx).is_pending());
        }
        assert_eq!(gate.polls.load(Ordering::SeqCst), 1);

        // Its wake-up reaches the task, and the next poll reaches it again.
        gate.open();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(Pin::new(&mut w).poll(&mut cx).is_ready());
        assert_eq!(gate.polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_wake_up_reaches_the_task_that_polled_last() {
        let gate = Gate::new();
        let first = Arc::new(Task(AtomicUsize::new(0)));
        let second = Arc::new(Task(AtomicUsize::new(0)));
        let mut w = Woken::new(Box::pin(gate.clone().wait()));

        // Polled first by one task (as the inline first poll does with a no-op waker),
        // then by another: the wake-up goes to the second.
        let waker = Waker::from(first.clone());
        assert!(
            Pin::new(&mut w)
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        let waker = Waker::from(second.clone());
        assert!(
            Pin::new(&mut w)
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        gate.open();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(
            Pin::new(&mut w)
                .poll(&mut Context::from_waker(&waker))
                .is_ready()
        );
    }
}
