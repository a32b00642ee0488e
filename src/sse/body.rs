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
//!   or a server that must stop now. Delivery and abort race through one atomic, so exactly
//!   one of them wins.
//!
//! Memory is bounded by the channel capacity, whatever the client does.
//!
//! ```
//! use askstream::sse::body::{Delivery, channel};
//! use askstream::sse::encode;
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let (tx, body) = channel(64);
//! // The producer: tokens, then the frame that completes the answer.
//! let producer = tokio::spawn(async move {
//!     tx.send(encode::token("Hello")).await?;
//!     tx.send_last(encode::data(&serde_json::json!({"type": "done"}))).await?;
//!     Ok::<_, askstream::sse::body::Disconnected>(tx.delivered().await)
//! });
//! // hyper would poll `body` as a response body; here we read it ourselves.
//! let bytes = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
//! assert!(bytes.starts_with(b"data: {\"type\":\"token\",\"token\":\"Hello\"}\n\n"));
//! assert_eq!(producer.await.unwrap(), Ok(Delivery::Delivered));
//! # }
//! ```

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The stream is running: neither delivered nor aborted.
const OPEN: u8 = 0;
/// The body yielded the last frame to hyper.
const DELIVERED: u8 = 1;
/// The sender aborted before the last frame was yielded.
const ABORTED: u8 = 2;

/// State shared by one sender/body pair; written at most twice per stream.
struct Shared {
    /// `OPEN`, then `DELIVERED` or `ABORTED`, whichever side gets there first.
    state: AtomicU8,
    /// The frame that replaces the rest of the stream after an abort. Written before the
    /// state turns `ABORTED` and read only after, so the body always finds it set.
    abort_frame: OnceLock<Bytes>,
    /// When the body yielded its first frame: the server-side time to first byte.
    first_yield: OnceLock<Instant>,
    /// When hyper dropped the body before it ended: the moment the client was lost, from
    /// which the producer's detection lag is measured.
    dropped: OnceLock<Instant>,
}

/// A message in the channel: a frame, or the frame that completes the answer.
enum Msg {
    Frame(Bytes),
    Last(Bytes),
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
    let (tx, rx) = mpsc::channel(capacity);
    let shared = Arc::new(Shared {
        state: AtomicU8::new(OPEN),
        abort_frame: OnceLock::new(),
        first_yield: OnceLock::new(),
        dropped: OnceLock::new(),
    });
    let body = SseBody {
        rx: Some(rx),
        shared: shared.clone(),
        yielded: false,
    };
    (SseSender { tx, shared }, body)
}

/// The response body hyper polls: yields frames in order, ends after the last one.
pub struct SseBody {
    /// `None` once the stream has ended. Dropping the receiver is what tells the sender
    /// the stream is over, so it is dropped as soon as the last frame is yielded.
    rx: Option<mpsc::Receiver<Msg>>,
    shared: Arc<Shared>,
    /// Whether a frame has been yielded yet; the first one is timestamped.
    yielded: bool,
}

impl SseBody {
    /// Ends the stream with the abort frame (the sender aborted).
    fn take_abort_frame(&mut self) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx = None;
        match self.shared.abort_frame.get().cloned() {
            Some(b) => self.yield_frame(b),
            None => Poll::Ready(None),
        }
    }

    /// Hands a frame to hyper, noting the time of the first.
    fn yield_frame(&mut self, b: Bytes) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if !self.yielded {
            self.yielded = true;
            let _ = self.shared.first_yield.set(Instant::now());
        }
        Poll::Ready(Some(Ok(Frame::data(b))))
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        if self.rx.is_some() {
            let _ = self.shared.dropped.set(Instant::now());
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.rx.is_none() {
            return Poll::Ready(None);
        }
        if self.shared.state.load(Ordering::Acquire) == ABORTED {
            return self.take_abort_frame();
        }
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(Msg::Frame(b))) => self.yield_frame(b),
            Poll::Ready(Some(Msg::Last(b))) => {
                let won = self.shared.state.compare_exchange(
                    OPEN,
                    DELIVERED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                if won.is_err() {
                    return self.take_abort_frame();
                }
                // Dropping the receiver wakes the sender's `closed()`/`delivered()`.
                self.rx = None;
                self.yield_frame(b)
            }
            Poll::Ready(None) => {
                // Every sender is gone. If that was an abort, its frame ends the stream;
                // otherwise the producer stopped without a last frame.
                if self.shared.state.load(Ordering::Acquire) == ABORTED {
                    return self.take_abort_frame();
                }
                self.rx = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rx.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl std::fmt::Debug for SseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseBody")
            .field("ended", &self.rx.is_none())
            .finish()
    }
}

/// The producing half: sends frames, and learns when the client has gone.
pub struct SseSender {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
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

/// How a stream's last frame fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The body yielded the last frame to hyper.
    Delivered,
    /// The body was dropped (or the stream aborted) before yielding it.
    NotDelivered,
}

impl SseSender {
    /// Queues a frame, waiting while the buffer is full. Fails only if the body is gone.
    pub async fn send(&self, frame: Bytes) -> Result<(), Disconnected> {
        self.tx
            .send(Msg::Frame(frame))
            .await
            .map_err(|_| Disconnected)
    }

    /// Queues a frame if there is room now; never waits.
    pub fn try_send(&self, frame: Bytes) -> Result<(), TrySendError> {
        self.tx.try_send(Msg::Frame(frame)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(Msg::Frame(b) | Msg::Last(b)) => TrySendError::Full(b),
            mpsc::error::TrySendError::Closed(_) => TrySendError::Disconnected,
        })
    }

    /// Queues the frame that completes the stream, waiting while the buffer is full.
    ///
    /// Queuing is not delivery: await [`delivered`](Self::delivered) to learn whether the
    /// body yielded it.
    pub async fn send_last(&self, frame: Bytes) -> Result<(), Disconnected> {
        self.tx
            .send(Msg::Last(frame))
            .await
            .map_err(|_| Disconnected)
    }

    /// Resolves when the body is gone: dropped by hyper (the client left), or ended after
    /// yielding the last frame. Cancel-safe, and cheap to keep pinned across a loop.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Whether the body is already gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Waits until the last frame is yielded to hyper or the body is dropped, and says
    /// which. Call after [`send_last`](Self::send_last).
    pub async fn delivered(&self) -> Delivery {
        self.tx.closed().await;
        self.delivery()
    }

    /// Whether the last frame has been yielded, right now.
    fn delivery(&self) -> Delivery {
        match self.shared.state.load(Ordering::Acquire) {
            DELIVERED => Delivery::Delivered,
            _ => Delivery::NotDelivered,
        }
    }

    /// Queues the last frame and waits for the outcome: [`send_last`](Self::send_last)
    /// then [`delivered`](Self::delivered).
    pub async fn finish(self, frame: Bytes) -> Delivery {
        if self.send_last(frame).await.is_err() {
            return Delivery::NotDelivered;
        }
        self.delivered().await
    }

    /// Ends the stream now: frames the body has not yielded yet are dropped and `frame`
    /// is the last thing the client gets (when it reads again).
    ///
    /// Returns [`Delivery::Delivered`] if the body had already yielded the last frame, in
    /// which case nothing changes: a delivered answer cannot be taken back.
    pub fn abort(self, frame: Bytes) -> Delivery {
        // Set before the state flips, so a body that sees ABORTED finds the frame.
        let _ = self.shared.abort_frame.set(frame);
        match self
            .shared
            .state
            .compare_exchange(OPEN, ABORTED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Delivery::NotDelivered,
            Err(DELIVERED) => Delivery::Delivered,
            Err(_) => Delivery::NotDelivered,
        }
        // Dropping `self` closes the channel, which wakes a body waiting for a frame.
    }

    /// Frames that can be queued right now without waiting.
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// A handle that reports the body's timestamps after the sender is gone.
    pub fn probe(&self) -> Probe {
        Probe {
            shared: self.shared.clone(),
        }
    }
}

/// Timestamps of one body, readable by the producer at any time (for metrics).
#[derive(Clone)]
pub struct Probe {
    shared: Arc<Shared>,
}

impl Probe {
    /// When the body yielded its first frame to hyper, if it has.
    pub fn first_frame_at(&self) -> Option<Instant> {
        self.shared.first_yield.get().copied()
    }

    /// When hyper dropped the body before it ended (the client left), if it did.
    pub fn dropped_at(&self) -> Option<Instant> {
        self.shared.dropped.get().copied()
    }
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("first_frame_at", &self.first_frame_at())
            .field("dropped_at", &self.dropped_at())
            .finish()
    }
}

impl std::fmt::Debug for SseSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseSender")
            .field("closed", &self.tx.is_closed())
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
        assert_eq!(tx.delivered().await, Delivery::Delivered);
        assert!(next(&mut body).await.is_none());
    }

    #[tokio::test]
    async fn queued_last_frame_is_not_delivered_when_the_body_drops() {
        let (tx, body) = channel(4);
        tx.send_last(Bytes::from_static(b"done")).await.unwrap();
        drop(body);
        assert_eq!(tx.delivered().await, Delivery::NotDelivered);
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
        assert_eq!(probe.dropped_at(), None);
        drop(body);
        assert!(probe.dropped_at().is_some(), "dropped before its end");

        let (tx, mut body) = channel(1);
        let probe = tx.probe();
        tx.send_last(Bytes::from_static(b"done")).await.unwrap();
        next(&mut body).await.unwrap();
        drop(body);
        assert_eq!(
            probe.dropped_at(),
            None,
            "a body that ended was not cut short"
        );
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

    #[tokio::test]
    async fn abort_replaces_unread_frames() {
        let (tx, mut body) = channel(8);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert_eq!(next(&mut body).await.unwrap(), "a");
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        tx.send(Bytes::from_static(b"c")).await.unwrap();
        assert_eq!(tx.abort(Bytes::from_static(b"err")), Delivery::NotDelivered);
        assert_eq!(next(&mut body).await.unwrap(), "err");
        assert!(body.is_end_stream());
        assert!(next(&mut body).await.is_none());
    }

    #[tokio::test]
    async fn abort_wakes_a_waiting_body() {
        let (tx, mut body) = channel(8);
        let reader = tokio::spawn(async move { next(&mut body).await });
        tokio::task::yield_now().await;
        tx.abort(Bytes::from_static(b"err"));
        assert_eq!(reader.await.unwrap().unwrap(), "err");
    }

    #[tokio::test]
    async fn abort_after_delivery_changes_nothing() {
        let (tx, mut body) = channel(2);
        tx.send_last(Bytes::from_static(b"done")).await.unwrap();
        assert_eq!(next(&mut body).await.unwrap(), "done");
        assert_eq!(tx.abort(Bytes::from_static(b"err")), Delivery::Delivered);
        assert!(next(&mut body).await.is_none());
    }

    #[tokio::test]
    async fn abort_before_the_last_frame_is_yielded_wins() {
        let (tx, mut body) = channel(2);
        tx.send_last(Bytes::from_static(b"done")).await.unwrap();
        assert_eq!(tx.abort(Bytes::from_static(b"err")), Delivery::NotDelivered);
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
                let outcome = aborter.await.unwrap();
                match outcome {
                    Delivery::Delivered => assert_eq!(got, "done"),
                    Delivery::NotDelivered => assert_eq!(got, "err"),
                }
            }
        });
    }
}
