//! The loop that runs one answer: retrieval, then generation, raced against everything
//! that can end it early. Both modes share it; they differ only in their [`Sink`].

use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use super::woken::Woken;
use super::{Ask, Outcome, Pipeline};
use crate::clock::later;
use crate::error::{ApiError, ErrorCode};
use crate::peer::Hangup;
use crate::pipeline::{Chunk, Passage, PipelineError, PipelineErrorKind, Prompt, Token, Usage};
use crate::sse::body::{SseSender, TrySendError};
use crate::wire;

/// What a complete run of the pipeline leaves to deliver.
pub(super) struct Generated {
    pub(super) passages: Arc<[Passage]>,
    pub(super) usage: Usage,
}

/// How the driver ended: the answer is generated, or it ended early with an
/// [`Outcome`] that is never [`Outcome::Delivered`].
pub(super) type Driven = Result<Generated, Outcome>;

/// Counters an answer keeps for its `done` event, its log line and its metrics.
#[derive(Default)]
pub(super) struct Stats {
    pub(super) tokens: u32,
    pub(super) first_token: Option<Instant>,
}

/// How the driver learns that the client has gone.
#[derive(Clone, Copy)]
pub(super) struct Gone<'a> {
    /// A streaming answer's body: dropped by hyper when the client leaves.
    pub(super) body: Option<&'a SseSender>,
    /// The HTTP/1 socket, watched for a hang-up while hyper is not reading it.
    pub(super) hangup: Option<&'a Hangup>,
}

/// A sink's wait for room: it resolves when the token was taken, or with why the answer
/// ends.
pub(super) type Wait<'a> = Pin<Box<dyn Future<Output = Result<(), Outcome>> + Send + 'a>>;

/// Where tokens go: the SSE channel or the JSON answer text.
pub(super) trait Sink {
    /// Hands a token on: `Ok(None)` if it was taken now, `Ok(Some(wait))` if the sink is
    /// full and `wait` must be awaited, `Err` if the answer ends. The wait is boxed: it
    /// exists only on the slow path, and inline it would add its timer to every answer's
    /// future, slow or not.
    fn token<'s>(&'s mut self, token: Token, p: &'s Pipeline) -> Result<Option<Wait<'s>>, Outcome>;
    /// Sends a heartbeat if it fits now (skipped while the buffer is full).
    fn heartbeat(&mut self);
    /// Whether heartbeats mean anything for this sink.
    fn wants_heartbeat(&self) -> bool;
}

/// Tokens into a streaming answer's channel, as their pre-encoded frames.
pub(super) struct StreamSink<'a> {
    pub(super) tx: &'a SseSender,
}

impl Sink for StreamSink<'_> {
    fn token<'s>(&'s mut self, token: Token, p: &'s Pipeline) -> Result<Option<Wait<'s>>, Outcome> {
        // The frame moves into the channel: no reference-count traffic per token.
        match self.tx.try_send(token.into_frame()) {
            Ok(()) => Ok(None),
            Err(TrySendError::Disconnected) => Err(Outcome::Disconnected),
            // The client is behind: wait for room, but not forever, and not past the
            // server's stop.
            Err(TrySendError::Full(frame)) => {
                let tx = self.tx;
                Ok(Some(Box::pin(async move {
                    tokio::select! {
                        sent = tokio::time::timeout(p.slow_client, tx.send(frame)) => {
                            match sent {
                                Ok(Ok(())) => Ok(()),
                                Ok(Err(_)) => Err(Outcome::Disconnected),
                                Err(_) => Err(Outcome::Failed(slow_client(p.slow_client))),
                            }
                        }
                        () = p.shutdown.stopped() => Err(Outcome::Failed(shutting_down())),
                    }
                })))
            }
        }
    }

    fn heartbeat(&mut self) {
        let _ = self.tx.try_send(wire::KEEP_ALIVE);
    }

    fn wants_heartbeat(&self) -> bool {
        true
    }
}

/// Tokens into a JSON answer's text.
#[derive(Default)]
pub(super) struct JsonSink {
    pub(super) answer: String,
}

impl Sink for JsonSink {
    fn token<'s>(&'s mut self, token: Token, _: &'s Pipeline) -> Result<Option<Wait<'s>>, Outcome> {
        self.answer.push_str(token.text());
        Ok(None)
    }

    fn heartbeat(&mut self) {}

    fn wants_heartbeat(&self) -> bool {
        false
    }
}

/// A sink the caller keeps, to read it after the answer (the JSON text).
impl<T: Sink> Sink for &mut T {
    fn token<'s>(&'s mut self, token: Token, p: &'s Pipeline) -> Result<Option<Wait<'s>>, Outcome> {
        (**self).token(token, p)
    }

    fn heartbeat(&mut self) {
        (**self).heartbeat();
    }

    fn wants_heartbeat(&self) -> bool {
        (**self).wants_heartbeat()
    }
}

/// The deadlines one answer watches, kept as instants so a token costs two stores and
/// no timer reset: the single timer is re-armed only when it fires. The timeouts are read
/// from the [`Pipeline`] rather than copied: this lives in every open answer.
struct Deadlines {
    heartbeat: bool,
    /// Whether the generator has sent a chunk yet.
    chunked: bool,
    /// The last chunk from the generator; until the first, when the ask arrived.
    last_chunk: Instant,
    /// Last frame sent to the client, heartbeats included.
    last_event: Instant,
}

impl Deadlines {
    // Saturating sums: a setting absurdly high (a heartbeat in the billions of seconds)
    // means "never", not a panic in every answer.
    fn generator_deadline(&self, p: &Pipeline) -> Instant {
        let timeout = if self.chunked {
            p.idle_timeout
        } else {
            p.ttft_timeout
        };
        later(self.last_chunk, timeout)
    }

    fn heartbeat_due(&self, p: &Pipeline) -> Option<Instant> {
        self.heartbeat.then(|| later(self.last_event, p.heartbeat))
    }

    fn next(&self, p: &Pipeline) -> Instant {
        let g = self.generator_deadline(p);
        self.heartbeat_due(p).map_or(g, |h| g.min(h))
    }
}

/// Runs retrieval and generation for one ask, sending tokens into `sink`, until the
/// generator ends or something ends the answer first.
///
/// Every open answer is this future, so its state is kept lean: the two ends are polled
/// in place rather than through futures of their own where they can be, and nothing but
/// a boxed wait lives across a token hand-off. Not an `async fn`, which would keep its
/// arguments twice (as arguments and as locals).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would store its arguments twice in every open answer"
)]
pub(super) fn drive<'a, S: Sink + 'a>(
    p: &'a Pipeline,
    ask: &'a Ask,
    mut sink: S,
    gone: Gone<'a>,
    stats: &'a mut Stats,
) -> impl Future<Output = Driven> + 'a {
    async move {
        // The two ends no answer can outlast, polled only after one of them woke: the loop
        // below runs once per token, and they almost never fire.
        let mut stop = pin!(p.shutdown.stopped());
        let body = gone.body;
        let mut ends = Woken::new(poll_fn(move |cx| {
            // The body first: when both have happened, hyper dropping it is what counts.
            if body.is_some_and(|tx| tx.poll_closed(cx).is_ready()) {
                Poll::Ready(Err(Outcome::Disconnected))
            } else if gone.hangup.is_some_and(|h| h.poll_hung_up(cx).is_ready()) {
                // Seen here before hyper drops the body (it no longer reads mid-answer).
                body.inspect(|tx| tx.client_left());
                Poll::Ready(Err(Outcome::Disconnected))
            } else if stop.as_mut().poll(cx).is_ready() {
                Poll::Ready(Err(Outcome::Failed(shutting_down())))
            } else {
                Poll::Pending
            }
        }));
        let mut clock = Deadlines {
            heartbeat: sink.wants_heartbeat(),
            chunked: false,
            last_chunk: ask.received,
            // The response head went out at admission: heartbeats count from there, also
            // while a slow retriever works.
            last_event: Instant::now(),
        };
        // One timer for the whole answer, re-armed only when it fires (see `on_timer`).
        let mut timer = pin!(sleep_until(clock.next(p)));

        // Retrieval can end in four ways: the client leaves, the server stops, the retriever
        // answers, or the timer finds the first-token deadline passed (it may only send a
        // heartbeat). The timer is polled last, so an in-memory retriever, ready at once,
        // never registers it.
        let passages: Arc<[Passage]> = {
            let mut retrieving = p.retriever.retrieve(&ask.query, ask.top_k);
            loop {
                // Polled by hand like the generation loop below: a `select!` here kept
                // its own bookkeeping in every answer's state.
                let woke = poll_fn(|cx| {
                    if let Poll::Ready(ended) = Pin::new(&mut ends).poll(cx) {
                        Poll::Ready(Woke::End(ended))
                    } else if let Poll::Ready(r) = retrieving.as_mut().poll(cx) {
                        Poll::Ready(Woke::Ready(r))
                    } else if timer.as_mut().poll(cx).is_ready() {
                        Poll::Ready(Woke::Timer)
                    } else {
                        Poll::Pending
                    }
                })
                .await;
                match woke {
                    Woke::End(ended) => return ended,
                    Woke::Ready(Ok(found)) => break found.into(),
                    Woke::Ready(Err(e)) => return Err(Outcome::Failed(pipeline_error(e))),
                    Woke::Timer => {
                        on_timer(p, &mut clock, &mut sink)?;
                        timer.as_mut().reset(clock.next(p));
                    }
                }
            }
        };

        let mut tokens = p.generator.generate(Prompt {
            query: ask.query.clone(),
            passages: passages.clone(),
        });
        let mut usage = Usage::default();

        loop {
            // What can happen while the answer runs, checked in this order:
            // - the client goes away (the body was dropped): stop, refund;
            // - the grace period after a shutdown signal ends: SHUTTING_DOWN, refund;
            // - the generator yields a token, reports usage, fails, or finishes;
            // - the timer fires: first-token or idle deadline passed, or a heartbeat is due.
            // Polled by hand rather than with `select!`: this runs once per token, and the
            // macro's branch bookkeeping showed in profiles of fast streams.
            // The task's cooperative budget is spent here, once per chunk: nothing else in
            // the loop spends it on the fast path, and a generator that is always ready,
            // read by a connection on another thread, would otherwise never yield.
            let mut waited = false;
            // Scoped so that nothing but the boxed wait lives across the hand-off's await:
            // not what woke the loop, not the token.
            let (is_token, wait) = {
                let woke = poll_fn(|cx| {
                    let Poll::Ready(coop) = tokio::task::coop::poll_proceed(cx) else {
                        waited = true;
                        return Poll::Pending;
                    };
                    if let Poll::Ready(ended) = Pin::new(&mut ends).poll(cx) {
                        Poll::Ready(Woke::End(ended))
                    } else if let Poll::Ready(item) = tokens.as_mut().poll_next(cx) {
                        coop.made_progress();
                        Poll::Ready(Woke::Ready(item))
                    } else if timer.as_mut().poll(cx).is_ready() {
                        Poll::Ready(Woke::Timer)
                    } else {
                        waited = true;
                        Poll::Pending
                    }
                })
                .await;
                match woke {
                    Woke::End(ended) => return ended,
                    Woke::Ready(Some(Ok(Chunk::Token(t)))) => (true, sink.token(t, p)?),
                    Woke::Ready(Some(Ok(Chunk::Usage(u)))) => {
                        usage = u;
                        (false, None)
                    }
                    Woke::Ready(Some(Err(e))) => return Err(Outcome::Failed(pipeline_error(e))),
                    Woke::Ready(None) => return Ok(Generated { passages, usage }),
                    Woke::Timer => {
                        on_timer(p, &mut clock, &mut sink)?;
                        timer.as_mut().reset(clock.next(p));
                        continue;
                    }
                }
            };
            if let Some(wait) = wait {
                wait.await?;
                waited = true;
            }
            // The clock is read once after each wait rather than once per chunk: chunks that
            // were ready together share the time of the first (they came within
            // microseconds; the deadlines they move are seconds away). Read after the
            // hand-off: a client that kept the token waiting for room must not make the
            // generator look idle.
            let now = if clock.chunked && !waited {
                clock.last_chunk
            } else {
                Instant::now()
            };
            if is_token {
                stats.tokens += 1;
                stats.first_token.get_or_insert(now);
                clock.last_event = now;
                // The longest answer allowed is a complete one: drop the stream (which stops
                // an upstream) and deliver what was said.
                if stats.tokens >= p.max_tokens {
                    return Ok(Generated { passages, usage });
                }
            }
            // The timer is re-armed lazily (it fires early, then moves on), which is sound
            // only while deadlines move later. The first chunk swaps the first-token deadline
            // for the idle deadline, which can be earlier: re-arm once here, or an idle
            // timeout shorter than the TTFT timeout would wait for the TTFT deadline (or the
            // next heartbeat) instead.
            clock.last_chunk = now;
            if !std::mem::replace(&mut clock.chunked, true) {
                timer.as_mut().reset(clock.next(p));
            }
        }
    }
}

/// What one wait of the driver ended with: an end, the awaited retrieval or chunk, or
/// the timer.
enum Woke<T> {
    /// The client left or the server stopped: always an `Err`.
    End(Driven),
    Ready(T),
    Timer,
}

/// The answer's timer fired: fail it if the generator's deadline (first token or idle)
/// has passed, send a heartbeat if one is due, or nothing (it fired for a deadline that
/// has since moved). The caller re-arms it for `clock.next()`.
fn on_timer(p: &Pipeline, clock: &mut Deadlines, sink: &mut impl Sink) -> Result<(), Outcome> {
    let now = Instant::now();
    if now >= clock.generator_deadline(p) {
        return Err(Outcome::Failed(if clock.chunked {
            stalled(p.idle_timeout)
        } else {
            no_first_token(p.ttft_timeout)
        }));
    }
    if clock.heartbeat_due(p).is_some_and(|due| now >= due) {
        sink.heartbeat();
        clock.last_event = now;
    }
    Ok(())
}

/// Polls the driver, turning a panic inside it into an `INTERNAL` failure of this ask only.
///
/// Takes the future pinned by the caller: an `async fn` that took it by value would keep
/// it twice in its state (the argument, then the pinned local), doubling every answer's
/// largest allocation.
/// Not an `async fn` either, for the same reason: it returns the poll function itself.
pub(super) fn catch_unwind<F: Future<Output = Driven>>(
    mut fut: Pin<&mut F>,
) -> impl Future<Output = Driven> + '_ {
    poll_fn(
        move |cx| match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                tracing::error!("the answer pipeline panicked");
                Poll::Ready(Err(Outcome::Failed(ApiError::new(
                    ErrorCode::Internal,
                    "the answer pipeline failed",
                ))))
            }
        },
    )
}

fn pipeline_error(e: PipelineError) -> ApiError {
    let code = match e.kind {
        PipelineErrorKind::Upstream => ErrorCode::UpstreamError,
        PipelineErrorKind::Timeout => ErrorCode::UpstreamTimeout,
        PipelineErrorKind::Internal => ErrorCode::Internal,
    };
    ApiError::new(code, e.message)
}

pub(super) fn shutting_down() -> ApiError {
    ApiError::new(
        ErrorCode::ShuttingDown,
        "the server is shutting down; this ask was refunded",
    )
}

pub(super) fn slow_client(after: Duration) -> ApiError {
    ApiError::new(
        ErrorCode::SlowClient,
        format!(
            "the stream was not read for {} s; this ask was refunded",
            after.as_secs()
        ),
    )
}

fn no_first_token(after: Duration) -> ApiError {
    ApiError::new(
        ErrorCode::UpstreamTimeout,
        format!("no first token within {} ms", after.as_millis()),
    )
}

fn stalled(after: Duration) -> ApiError {
    ApiError::new(
        ErrorCode::UpstreamTimeout,
        format!("the generator was silent for {} ms", after.as_millis()),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::ServiceConfig;
    use crate::pipeline::bm25::Bm25Index;
    use crate::pipeline::sim::{SimConfig, SimGenerator};
    use crate::shutdown::Shutdown;

    /// Nothing in the loop waits when the generator is always ready and the sink never
    /// fills (a JSON answer; a stream read as fast as it is written from another
    /// thread): only the cooperative budget the loop spends per chunk makes it yield, so
    /// other tasks on its thread still run while it generates.
    #[tokio::test(flavor = "current_thread")]
    async fn an_always_ready_generator_lets_other_tasks_run() {
        let tokens = 5_000;
        let config = ServiceConfig {
            max_answer_tokens: tokens,
            ..ServiceConfig::default()
        };
        let generator = SimGenerator::new(SimConfig {
            ttft: Duration::ZERO,
            token_interval: Duration::ZERO,
            tokens,
        });
        let p = Pipeline::new(
            Arc::new(Bm25Index::builtin()),
            Arc::new(generator),
            Shutdown::new(),
            &config,
        );
        let ask = Ask::example();
        let runs = Arc::new(AtomicUsize::new(0));
        let other = tokio::spawn({
            let runs = runs.clone();
            async move {
                loop {
                    runs.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut sink = JsonSink::default();
        let mut stats = Stats::default();
        let gone = Gone {
            body: None,
            hangup: None,
        };
        let driven = drive(&p, &ask, &mut sink, gone, &mut stats).await;
        let ran = runs.load(Ordering::Relaxed);
        other.abort();
        assert!(driven.is_ok());
        assert_eq!(stats.tokens, tokens);
        assert!(ran > 0, "the other task never ran during {tokens} tokens");
    }
}
