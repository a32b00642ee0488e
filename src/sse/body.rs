//! The streaming response body: a bounded channel of pre-encoded frames.
//!
//! [`channel`] returns an [`SseSender`] for the task producing the answer and an [`SseBody`]
//! that hyper polls. Frames are [`Bytes`] encoded once by the producer; the body hands them
//! to hyper as they are, so nothing is copied on the write path, and hyper coalesces every
//! frame that is ready into one write.
//!
//! Three facts travel back from the body to the sender, and the server's quota rules rest on
//! them:
//!
//! - **The client is gone.** hyper drops the body when the connection closes or the HTTP/2
//!   stream is reset. The sender's [`closed`](SseSender::closed) future resolves at once, so
//!   a producer waiting on a slow model notices without having to write first.
//! - **The last frame was handed over.** A frame sent with [`send_last`](SseSender::send_last)
//!   counts as delivered only when the body yields it to hyper (not when it enters the
//!   channel); [`delivered`](SseSender::delivered) reports which happened first: that, or the
//!   body being dropped.
//! - **The stream was cut short.** [`abort`](SseSender::abort) replaces whatever the body has
//!   not yielded yet with one final frame (an error event), for clients that stopped reading
//!   or a server that must stop now. Delivery and abort are decided under the channel's
//!   lock, so exactly one of them wins.
//!
//! Memory is bounded by the channel capacity, whatever the client does.
//!
//! ```
//! use askstream::sse::body::channel;
//! use askstream::wire;
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let (tx, body) = channel(64);
//! // The producer: tokens, then the frame that completes the answer.
//! let producer = tokio::spawn(async move {
//!     tx.send(wire::token("Hello")).await?;
//!     tx.send_last(wire::data(&serde_json::json!({"type": "done"}))).await?;
//!     tx.delivered().await
//! });
//! // hyper would poll `body` as a response body; here we read it ourselves.
//! let bytes = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
//! assert!(bytes.starts_with(b"data: {\"type\":\"token\",\"token\":\"Hello\"}\n\n"));
//! assert_eq!(producer.await.unwrap(), Ok(())); // the last frame reached hyper
//! # }
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// Slots a channel starts with. The queue grows (by doubling, so its storage can round
/// a capacity up to the next power of two) only when a client falls behind. A client that
/// keeps up holds one frame, two at the end (the last token and `done`), and every open
/// stream pays for these slots (32 bytes each).
const INITIAL_SLOTS: usize = 2;

/// Everything one sender/body pair shares, in one allocation behind one lock.
///
/// A lock rather than atomics: the two sides are one producer and one consumer that
/// meet once per frame, almost always on the same thread, so the lock is uncontended;
/// and every rule below (last frame versus abort, closing versus queuing) is decided
/// under it, so no interleaving needs an argument.
struct Chan {
    /// Frames not yet yielded, oldest first; never longer than `capacity`.
    queue: VecDeque<Bytes>,
    /// 32 bits, which no buffer reaches: with them the shared state is 192 bytes, an
    /// allocator size class below the 224 a `usize` would take.
    capacity: u32,
    /// The newest queued frame completes the answer (`send_last`).
    last_queued: bool,
    /// Open, delivered or aborted.
    state: State,
    /// Replaces the unread frames after an abort.
    abort_frame: Option<Bytes>,
    /// The body has ended (yielded its last frame) or was dropped: the sender's
    /// `closed()`.
    body_gone: bool,
    /// The sender was dropped: once the queue is drained the body ends.
    sender_gone: bool,
    /// The body, waiting for a frame.
    body_waker: Option<Waker>,
    /// The sender, waiting for room.
    room_waker: Option<Waker>,
    /// The sender, waiting for the body to go (`closed`, `delivered`).
    closed_waker: Option<Waker>,
    /// When the body yielded its first event (a `data:` frame; heartbeat comments do not
    /// count): the server-side time to first token.
    first_yield: Option<Instant>,
    /// When the client was seen to leave before the body ended: hyper dropped the body,
    /// or the connection's hang-up watch fired ([`SseSender::client_left`]). The
    /// producer's detection lag is measured from it.
    lost: Option<Instant>,
    /// When the sender went (the answer ended), for a body that outlives its answer
    /// because the client does not read what is left.
    sender_dropped: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Neither of the two below yet.
    Open,
    /// The body yielded the last frame to hyper.
    Delivered,
    /// The sender aborted before the last frame was yielded.
    Aborted,
}

type Shared = Arc<Mutex<Chan>>;

/// Locks the channel. Nothing panics while holding the lock, but a poisoned lock would
/// still hold consistent state, so it is used rather than propagated.
fn lock(shared: &Shared) -> MutexGuard<'_, Chan> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Stores `cx`'s waker in `slot`, cloning only when it changed.
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// Creates a body and its sender, buffering at most `capacity` frames.
///
/// # Panics
/// If `capacity` is 0.
pub fn channel(capacity: usize) -> (SseSender, SseBody) {
    assert!(
        capacity > 0,
        "an SSE channel needs room for at least one frame"
    );
    let shared = Arc::new(Mutex::new(Chan {
        queue: VecDeque::with_capacity(capacity.min(INITIAL_SLOTS)),
        capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
        last_queued: false,
        state: State::Open,
        abort_frame: None,
        body_gone: false,
        sender_gone: false,
        body_waker: None,
        room_waker: None,
        closed_waker: None,
        first_yield: None,
        lost: None,
        sender_dropped: None,
    }));
    let body = SseBody {
        shared: shared.clone(),
        ended: false,
    };
    (SseSender { shared }, body)
}

/// The response body hyper polls: yields frames in order, ends after the last one.
pub struct SseBody {
    shared: Shared,
    /// Set once the stream has ended; also a lock-free answer for `is_end_stream`.
    ended: bool,
}

impl Chan {
    /// The body is finished with: ended or dropped. Returns the sender's wakers, to wake
    /// once the lock is released.
    fn body_ends(&mut self) -> [Option<Waker>; 2] {
        self.body_gone = true;
        self.queue.clear();
        [self.closed_waker.take(), self.room_waker.take()]
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        let mut chan = lock(&self.shared);
        if !self.ended {
            chan.lost.get_or_insert_with(Instant::now);
        }
        let wake = chan.body_ends();
        drop(chan);
        wake.into_iter().flatten().for_each(Waker::wake);
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let mut chan = lock(&self.shared);
        let (frame, wake, ends) = if chan.state == State::Aborted {
            // The abort frame replaces whatever is still queued, and ends the stream.
            (chan.abort_frame.take(), chan.body_ends(), true)
        } else if let Some(frame) = chan.queue.pop_front() {
            if chan.queue.is_empty() && chan.last_queued {
                // Handing over the last frame is delivery; an abort can no longer win.
                chan.state = State::Delivered;
                (Some(frame), chan.body_ends(), true)
            } else {
                (Some(frame), [chan.room_waker.take(), None], false)
            }
        } else if chan.sender_gone {
            // The producer stopped without a last frame.
            (None, chan.body_ends(), true)
        } else {
            register(&mut chan.body_waker, cx);
            return Poll::Pending;
        };
        if chan.first_yield.is_none() && frame.as_ref().is_some_and(|f| !f.starts_with(b":")) {
            chan.first_yield = Some(Instant::now());
        }
        drop(chan);
        self.ended = ends;
        wake.into_iter().flatten().for_each(Waker::wake);
        Poll::Ready(frame.map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl std::fmt::Debug for SseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseBody")
            .field("ended", &self.ended)
            .finish()
    }
}

/// The producing half: sends frames, and learns when the client has gone.
///
/// One producer: the channel keeps one waker for a send waiting for room and one for
/// `closed`/`delivered`, so each of those has one waiter at a time (the answer's task).
pub struct SseSender {
    shared: Shared,
}

/// The body is gone: the client disconnected (or the stream already ended).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disconnected;

impl std::fmt::Display for Disconnected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client disconnected")
    }
}

impl std::error::Error for Disconnected {}

/// Why [`SseSender::try_send`] did not take a frame.
#[derive(Debug)]
pub enum TrySendError {
    /// The buffer is full: the client is not keeping up. The frame is handed back.
    Full(Bytes),
    /// The body is gone.
    Disconnected,
}

impl SseSender {
    /// Queues a frame if there is room now; never waits. After the last frame has been
    /// queued, the stream takes nothing more: [`TrySendError::Disconnected`].
    pub fn try_send(&self, frame: Bytes) -> Result<(), TrySendError> {
        self.push(frame, false, None)
    }

    /// Queues a frame, waiting while the buffer is full. Fails only if the body is gone
    /// (or the last frame was already queued).
    pub async fn send(&self, frame: Bytes) -> Result<(), Disconnected> {
        self.send_waiting(frame, false).await
    }

    /// Queues the frame that completes the stream, waiting while the buffer is full.
    ///
    /// Queuing is not delivery: await [`delivered`](Self::delivered) to learn whether the
    /// body yielded it.
    pub async fn send_last(&self, frame: Bytes) -> Result<(), Disconnected> {
        self.send_waiting(frame, true).await
    }

    async fn send_waiting(&self, frame: Bytes, last: bool) -> Result<(), Disconnected> {
        let mut frame = Some(frame);
        poll_fn(|cx| {
            let Some(f) = frame.take() else {
                return Poll::Ready(Err(Disconnected));
            };
            match self.push(f, last, Some(cx)) {
                Ok(()) => Poll::Ready(Ok(())),
                Err(TrySendError::Disconnected) => Poll::Ready(Err(Disconnected)),
                Err(TrySendError::Full(f)) => {
                    frame = Some(f);
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Queues `frame` if there is room; when full and given a context, registers it to
    /// be woken when the body takes a frame.
    fn push(&self, frame: Bytes, last: bool, cx: Option<&Context<'_>>) -> Result<(), TrySendError> {
        let mut chan = lock(&self.shared);
        if chan.body_gone || chan.last_queued || chan.state != State::Open {
            return Err(TrySendError::Disconnected);
        }
        if chan.queue.len() >= chan.capacity as usize {
            if let Some(cx) = cx {
                register(&mut chan.room_waker, cx);
            }
            return Err(TrySendError::Full(frame));
        }
        chan.queue.push_back(frame);
        chan.last_queued = last;
        let wake = chan.body_waker.take();
        drop(chan);
        if let Some(w) = wake {
            w.wake();
        }
        Ok(())
    }

    /// The client was seen to leave by other means than hyper dropping the body (the
    /// connection's hang-up watch): the moment the detection lag is measured from.
    pub(crate) fn client_left(&self) {
        lock(&self.shared).lost.get_or_insert_with(Instant::now);
    }

    /// Resolves when the body is gone: dropped by hyper (the client left), or ended after
    /// yielding the last frame. Cancel-safe, and cheap to keep pinned across a loop.
    pub async fn closed(&self) {
        poll_fn(|cx| self.poll_closed(cx)).await
    }

    /// [`closed`](Self::closed) as a poll: lets an answer watch for the body going away
    /// without keeping a future for it.
    pub(crate) fn poll_closed(&self, cx: &Context<'_>) -> Poll<()> {
        let mut chan = lock(&self.shared);
        if chan.body_gone {
            Poll::Ready(())
        } else {
            register(&mut chan.closed_waker, cx);
            Poll::Pending
        }
    }

    /// Whether the body is already gone.
    fn is_closed(&self) -> bool {
        lock(&self.shared).body_gone
    }

    /// Waits until the last frame is yielded to hyper (`Ok`) or the body is gone without
    /// yielding it (`Err`). Call after [`send_last`](Self::send_last).
    pub async fn delivered(&self) -> Result<(), Disconnected> {
        self.closed().await;
        self.delivery()
    }

    /// Whether the body yielded the last frame; meaningful once it is gone.
    fn delivery(&self) -> Result<(), Disconnected> {
        match lock(&self.shared).state {
            State::Delivered => Ok(()),
            State::Open | State::Aborted => Err(Disconnected),
        }
    }

    /// Queues the last frame and waits for the outcome: [`send_last`](Self::send_last)
    /// then [`delivered`](Self::delivered). Borrows, so a caller that gives up waiting
    /// can still [`abort`](Self::abort).
    pub async fn finish(&self, frame: Bytes) -> Result<(), Disconnected> {
        // One poll function rather than the two awaits it stands for: every open answer
        // ends in this future, and the nested pair kept four times the state.
        let mut frame = Some(frame);
        poll_fn(|cx| {
            if let Some(f) = frame.take() {
                match self.push(f, true, Some(cx)) {
                    Ok(()) => {}
                    Err(TrySendError::Disconnected) => return Poll::Ready(Err(Disconnected)),
                    Err(TrySendError::Full(f)) => {
                        frame = Some(f);
                        return Poll::Pending;
                    }
                }
            }
            match self.poll_closed(cx) {
                Poll::Ready(()) => Poll::Ready(self.delivery()),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Ends the stream now: frames the body has not yielded yet are dropped and `frame`
    /// is the last thing the client gets (when it reads again).
    ///
    /// Returns whether the body had already yielded the last frame, in which case
    /// nothing changes: a delivered answer cannot be taken back.
    #[must_use = "an abort can lose to a delivery that already happened"]
    pub fn abort(self, frame: Bytes) -> bool {
        let mut chan = lock(&self.shared);
        match chan.state {
            State::Delivered => return true,
            State::Aborted => return false,
            State::Open => {}
        }
        chan.state = State::Aborted;
        chan.abort_frame = Some(frame);
        chan.queue.clear();
        let wake = chan.body_waker.take();
        drop(chan);
        if let Some(w) = wake {
            w.wake();
        }
        false
    }

    /// A handle that reports the body's timestamps after the sender is gone.
    pub(crate) fn probe(&self) -> Probe {
        Probe {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for SseSender {
    fn drop(&mut self) {
        let mut chan = lock(&self.shared);
        chan.sender_gone = true;
        chan.sender_dropped = Some(Instant::now());
        let wake = chan.body_waker.take();
        drop(chan);
        if let Some(w) = wake {
            w.wake();
        }
    }
}

/// Timestamps of one body, readable by the producer at any time (for metrics).
#[derive(Clone)]
pub(crate) struct Probe {
    shared: Shared,
}

impl Probe {
    /// When the body yielded its first event (not a heartbeat comment) to hyper, if it has.
    pub(crate) fn first_frame_at(&self) -> Option<Instant> {
        lock(&self.shared).first_yield
    }

    /// When the client was seen to leave before the body ended, if it was.
    pub(crate) fn lost_at(&self) -> Option<Instant> {
        lock(&self.shared).lost
    }

    /// Since when the body has outlived its answer (the sender is gone but the body has
    /// neither ended nor been dropped), if it has.
    pub(crate) fn lingering_since(&self) -> Option<Instant> {
        let chan = lock(&self.shared);
        chan.sender_dropped.filter(|_| !chan.body_gone)
    }

    /// Whether the body has ended or been dropped.
    pub(crate) fn body_gone(&self) -> bool {
        lock(&self.shared).body_gone
    }
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("first_frame_at", &self.first_frame_at())
            .field("lost_at", &self.lost_at())
            .finish()
    }
}

impl std::fmt::Debug for SseSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseSender")
            .field("closed", &self.is_closed())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn next(body: &mut SseBody) -> Option<Bytes> {
        body.frame().await.map(|f| f.unwrap().into_data().unwrap())
    }

    /// Every open stream holds one: with the `Arc`'s two counts it fits mimalloc's 192-byte
    /// size class, and a field more would put it in the 224-byte one.
    #[test]
    fn the_shared_state_fits_in_192_bytes() {
        assert!(size_of::<Mutex<Chan>>() + 2 * size_of::<usize>() <= 192);
    }

    #[tokio::test]
    async fn frames_arrive_in_order_and_last_ends_the_stream() {
        let (tx, mut body) = channel(4);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        tx.try_send(Bytes::from_static(b"b")).unwrap();
        tx.send_last(Bytes::from_static(b"done")).await.unwrap();
        assert!(!body.is_end_stream());
        assert_eq!(next(&mut body).await.unwrap(), "a");
        assert_eq!(next(&mut body).await.unwrap(), "b");
        assert_eq!(next(&mut body).await.unwrap(), "done");
        assert!(
            body.is_end_stream(),
            "hyper can end the response with the last frame"
        );
        assert_eq!(tx.delivered().await, Ok(()));
        assert!(next(&mut body).await.is_none());
    }

    #[tokio::test]
    async fn queued_last_frame_is_not_delivered_when_the_body_drops() {
        let (tx, body) = channel(4);
        tx.send_last(Bytes::from_static(b"done")).await.unwrap();
        drop(body);
        assert_eq!(tx.delivered().await, Err(Disconnected));
    }

    #[tokio::test]
    async fn probe_reports_first_yield_and_early_drop() {
        let (tx, mut body) = channel(4);
        let probe = tx.probe();
        assert_eq!(probe.first_frame_at(), None);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert_eq!(probe.first_frame_at(), None, "queued is not yielded");
        next(&mut body).await.unwrap();
        assert!(probe.first_frame_at().is_some());
        assert_eq!(probe.lost_at(), None);
        drop(body);
        assert!(probe.lost_at().is_some(), "dropped before its end");

        let (tx, mut body) = channel(1);
        let probe = tx.probe();
        tx.send_last(Bytes::from_static(b"done")).await.unwrap();
        next(&mut body).await.unwrap();
        drop(body);
        assert_eq!(probe.lost_at(), None, "a body that ended was not cut short");

        let (tx, body) = channel(1);
        let probe = tx.probe();
        tx.client_left();
        let seen = probe.lost_at().expect("the hang-up counts as the loss");
        drop(body);
        assert_eq!(probe.lost_at(), Some(seen), "the first sighting stays");
    }

    #[tokio::test]
    async fn a_heartbeat_is_not_the_first_event() {
        let (tx, mut body) = channel(4);
        let probe = tx.probe();
        tx.send(crate::wire::KEEP_ALIVE).await.unwrap();
        next(&mut body).await.unwrap();
        assert_eq!(probe.first_frame_at(), None, "a comment is not an event");
        tx.send(Bytes::from_static(b"data: {}\n\n")).await.unwrap();
        next(&mut body).await.unwrap();
        assert!(probe.first_frame_at().is_some());
    }

    #[tokio::test]
    async fn closed_resolves_when_the_body_drops() {
        let (tx, body) = channel(1);
        assert!(!tx.is_closed());
        drop(body);
        tx.closed().await;
        assert!(tx.is_closed());
        assert_eq!(tx.send(Bytes::new()).await, Err(Disconnected));
        assert!(matches!(
            tx.try_send(Bytes::new()),
            Err(TrySendError::Disconnected)
        ));
    }

    #[tokio::test]
    async fn try_send_reports_full_and_returns_the_frame() {
        let (tx, _body) = channel(1);
        tx.try_send(Bytes::from_static(b"1")).unwrap();
        match tx.try_send(Bytes::from_static(b"2")) {
            Err(TrySendError::Full(b)) => assert_eq!(b, "2"),
            other => panic!("expected Full, got {other:?}"),
        }
    }

    /// Awaits a spawned sender. Under paused time an idle runtime jumps to the bound at
    /// once, so a sender that is never woken fails the test instead of hanging it.
    async fn woken<T>(task: tokio::task::JoinHandle<T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(60), task)
            .await
            .expect("the waiting sender is woken")
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_waiting_for_room_goes_on_when_the_body_reads() {
        let (tx, mut body) = channel(1);
        tx.send(Bytes::from_static(b"1")).await.unwrap();
        let sender = tokio::spawn(async move {
            let sent = tx.send(Bytes::from_static(b"2")).await;
            (sent, tx)
        });
        tokio::task::yield_now().await;
        assert!(!sender.is_finished(), "the buffer is full");
        assert_eq!(next(&mut body).await.unwrap(), "1");
        let (sent, _tx) = woken(sender).await;
        assert_eq!(sent, Ok(()));
        assert_eq!(next(&mut body).await.unwrap(), "2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_waiting_for_room_fails_when_the_body_drops() {
        let (tx, body) = channel(1);
        tx.send(Bytes::from_static(b"1")).await.unwrap();
        let sender = tokio::spawn(async move { tx.send(Bytes::from_static(b"2")).await });
        tokio::task::yield_now().await;
        assert!(!sender.is_finished(), "the buffer is full");
        drop(body);
        assert_eq!(woken(sender).await, Err(Disconnected));
    }

    #[tokio::test]
    async fn nothing_is_queued_after_the_last_frame() {
        let (tx, mut body) = channel(4);
        tx.send_last(Bytes::from_static(b"done")).await.unwrap();
        assert!(matches!(
            tx.try_send(Bytes::from_static(b"late")),
            Err(TrySendError::Disconnected)
        ));
        assert_eq!(next(&mut body).await.unwrap(), "done");
        assert!(next(&mut body).await.is_none());
    }

    /// The queue starts small and grows to the capacity, never past it.
    #[tokio::test]
    async fn the_buffer_holds_exactly_its_capacity() {
        let (tx, mut body) = channel(40);
        for i in 0..40u8 {
            tx.try_send(Bytes::from(vec![i])).unwrap();
        }
        assert!(matches!(
            tx.try_send(Bytes::new()),
            Err(TrySendError::Full(_))
        ));
        for i in 0..40u8 {
            assert_eq!(next(&mut body).await.unwrap(), vec![i]);
        }
        // Drained: room for the whole capacity again, and not one frame more.
        for i in 0..40u8 {
            tx.try_send(Bytes::from(vec![i])).unwrap();
        }
        assert!(matches!(
            tx.try_send(Bytes::new()),
            Err(TrySendError::Full(_))
        ));
    }

    #[tokio::test]
    async fn abort_replaces_unread_frames() {
        let (tx, mut body) = channel(8);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert_eq!(next(&mut body).await.unwrap(), "a");
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        tx.send(Bytes::from_static(b"c")).await.unwrap();
        assert!(!tx.abort(Bytes::from_static(b"err")));
        assert_eq!(next(&mut body).await.unwrap(), "err");
        assert!(body.is_end_stream());
        assert!(next(&mut body).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn abort_wakes_a_waiting_body() {
        let (tx, mut body) = channel(8);
        let reader = tokio::spawn(async move { next(&mut body).await });
        tokio::task::yield_now().await;
        assert!(!reader.is_finished(), "nothing to read yet");
        assert!(!tx.abort(Bytes::from_static(b"err")));
        assert_eq!(woken(reader).await.unwrap(), "err");
    }

    #[tokio::test]
    async fn abort_after_delivery_changes_nothing() {
        let (tx, mut body) = channel(2);
        tx.send_last(Bytes::from_static(b"done")).await.unwrap();
        assert_eq!(next(&mut body).await.unwrap(), "done");
        assert!(tx.abort(Bytes::from_static(b"err")));
        assert!(next(&mut body).await.is_none());
    }

    #[tokio::test]
    async fn abort_before_the_last_frame_is_yielded_wins() {
        let (tx, mut body) = channel(2);
        tx.send_last(Bytes::from_static(b"done")).await.unwrap();
        assert!(!tx.abort(Bytes::from_static(b"err")));
        assert_eq!(next(&mut body).await.unwrap(), "err");
        assert!(next(&mut body).await.is_none());
    }

    #[tokio::test]
    async fn dropping_the_sender_ends_the_stream_after_queued_frames() {
        let (tx, mut body) = channel(2);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        drop(tx);
        assert_eq!(next(&mut body).await.unwrap(), "a");
        assert!(next(&mut body).await.is_none());
        assert!(body.is_end_stream());
    }

    /// Delivery and abort racing on many threads: exactly one side wins each time, and the
    /// body yields exactly the frame of the side that won.
    #[test]
    fn delivery_and_abort_race_has_one_winner() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..2000 {
                let (tx, mut body) = channel(1);
                tx.send_last(Bytes::from_static(b"done")).await.unwrap();
                let reader = tokio::spawn(async move { next(&mut body).await });
                let aborter = tokio::spawn(async move { tx.abort(Bytes::from_static(b"err")) });
                let got = reader.await.unwrap().unwrap();
                let already_delivered = aborter.await.unwrap();
                assert_eq!(got, if already_delivered { "done" } else { "err" });
            }
        });
    }
}
