//! The per-ask driver: runs the pipeline for one charged ask and decides, exactly once,
//! whether the charge is kept or refunded.
//!
//! Both modes share one loop, [`drive`], that races the generator against everything that
//! can end an answer early; they differ only in where tokens go (a [`Sink`]):
//!
//! - **streaming**: each token's pre-encoded frame goes into the [`SseSender`]; the answer
//!   counts as delivered when the body yields the `done` frame to hyper;
//! - **JSON**: tokens are concatenated; the answer counts as delivered when the response
//!   body yields the JSON document ([`JsonBody`]).
//!
//! The [`Charge`] is owned here and consumed on exactly one path: settled on delivery,
//! refunded otherwise — also when the pipeline panics (the panic is caught per ask) and,
//! as a last resort, by `Charge`'s own `Drop`.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, sleep_until};

use crate::auth::UserId;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::{Finished, Metrics};
use crate::pipeline::sim::later;
use crate::pipeline::{
    Chunk, Generator, Passage, PipelineError, PipelineErrorKind, Prompt, Retriever, Token, Usage,
};
use crate::quota::Charge;
use crate::shutdown::Shutdown;
use crate::sse::body::{Delivery, Probe, SseSender, TrySendError};
use crate::sse::encode::{self, Done, Source, TimingField, UsageField};

/// What an answer needs from the server: the pipeline, the clocks, the shutdown signal.
pub(crate) struct Pipeline {
    pub retriever: Arc<dyn Retriever>,
    pub generator: Arc<dyn Generator>,
    pub shutdown: Shutdown,
    pub ttft_timeout: Duration,
    pub idle_timeout: Duration,
    pub heartbeat: Duration,
    pub slow_client: Duration,
    pub metrics: Arc<Metrics>,
}

/// One admitted ask: validated, identified, charged.
pub(crate) struct Ask {
    pub id: QueryId,
    pub query: Arc<str>,
    pub top_k: usize,
    pub user: UserId,
    /// When the request reached the service; TTFT and total time count from here.
    pub received: Instant,
}

/// A unique, URL-safe, 128-bit query id: 32 lowercase hex digits.
///
/// The high half is random per process, the low half a counter passed through a
/// bijective mixer, so ids never repeat within a process, are unlikely to repeat across
/// processes, and cost no system call.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueryId([u8; 32]);

impl QueryId {
    /// The next id.
    pub fn next() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static SEED: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
        let (prefix, key) = *SEED.get_or_init(|| (random_u64(), random_u64()));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let value = (u128::from(prefix) << 64) | u128::from(mix64(n ^ key));
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let nibble = (value >> (124 - 4 * i)) & 0xf;
            *byte = b"0123456789abcdef"[nibble as usize];
        }
        QueryId(out)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for QueryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for QueryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QueryId({})", self.as_str())
    }
}

/// 64 random bits from the OS-seeded keys of std's `RandomState` (no extra dependency;
/// only used to seed query ids).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish()
}

/// SplitMix64's finalizer: a bijection on u64, so distinct counters give distinct ids.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How the pipeline part of an answer ended.
enum End {
    /// The generator finished: the answer can be completed.
    Complete {
        passages: Arc<[Passage]>,
        usage: Usage,
    },
    /// The client went away.
    Disconnected,
    /// The answer failed; the client gets this error.
    Failed(ApiError),
}

/// Counters an answer keeps for its `done` event and its log line.
#[derive(Default)]
struct Stats {
    tokens: u32,
    first_token: Option<Instant>,
}

/// Where tokens go: the SSE channel or the JSON answer text.
trait Sink {
    /// Hands a token on, waiting for room (but not past the server's stop); `Err` ends
    /// the answer.
    fn token(&mut self, token: &Token, p: &Pipeline) -> impl Future<Output = Result<(), End>>;
    /// Sends a heartbeat if it fits now (skipped while the buffer is full).
    fn heartbeat(&mut self);
    /// Whether heartbeats mean anything for this sink.
    fn wants_heartbeat(&self) -> bool;
}

struct StreamSink<'a> {
    tx: &'a SseSender,
}

impl Sink for StreamSink<'_> {
    async fn token(&mut self, token: &Token, p: &Pipeline) -> Result<(), End> {
        match self.tx.try_send(token.frame().clone()) {
            Ok(()) => Ok(()),
            Err(TrySendError::Disconnected) => Err(End::Disconnected),
            // The client is behind: wait for room, but not forever, and not past the
            // server's stop. The timer exists only on this slow path, and is boxed with
            // the send: inline, the two would add some 400 bytes to every answer's future,
            // slow or not.
            Err(TrySendError::Full(frame)) => {
                let wait = Box::pin(async {
                    tokio::select! {
                        sent = tokio::time::timeout(p.slow_client, self.tx.send(frame)) => {
                            match sent {
                                Ok(Ok(())) => Ok(()),
                                Ok(Err(_)) => Err(End::Disconnected),
                                Err(_) => Err(End::Failed(slow_client(p.slow_client))),
                            }
                        }
                        () = p.shutdown.stopped() => Err(End::Failed(shutting_down())),
                    }
                });
                wait.await
            }
        }
    }

    fn heartbeat(&mut self) {
        let _ = self.tx.try_send(encode::KEEP_ALIVE);
    }

    fn wants_heartbeat(&self) -> bool {
        true
    }
}

struct JsonSink {
    answer: String,
}

impl Sink for JsonSink {
    async fn token(&mut self, token: &Token, _: &Pipeline) -> Result<(), End> {
        self.answer.push_str(token.text());
        Ok(())
    }

    fn heartbeat(&mut self) {}

    fn wants_heartbeat(&self) -> bool {
        false
    }
}

/// The deadlines one answer watches, kept as instants so a token costs two stores and
/// no timer reset: the single timer is re-armed only when it fires.
struct Deadlines {
    received: Instant,
    ttft_timeout: Duration,
    idle_timeout: Duration,
    heartbeat: Option<Duration>,
    /// Last chunk from the generator; `None` until the first.
    last_chunk: Option<Instant>,
    /// Last frame sent to the client, heartbeats included.
    last_event: Instant,
}

impl Deadlines {
    // Saturating sums: a flag set absurdly high (`--heartbeat-secs` in the billions)
    // means "never", not a panic in every answer.
    fn generator_deadline(&self) -> Instant {
        match self.last_chunk {
            None => later(self.received, self.ttft_timeout),
            Some(t) => later(t, self.idle_timeout),
        }
    }

    fn heartbeat_due(&self) -> Option<Instant> {
        self.heartbeat.map(|h| later(self.last_event, h))
    }

    fn next(&self) -> Instant {
        let g = self.generator_deadline();
        self.heartbeat_due().map_or(g, |h| g.min(h))
    }
}

/// Runs retrieval and generation for one ask, sending tokens into `sink`, until the
/// generator ends or something ends the answer first.
async fn drive<S: Sink>(
    p: &Pipeline,
    ask: &Ask,
    sink: &mut S,
    mut gone: Pin<&mut impl Future<Output = ()>>,
    stats: &mut Stats,
) -> End {
    let mut stop = pin!(p.shutdown.stopped());
    let mut clock = Deadlines {
        received: ask.received,
        ttft_timeout: p.ttft_timeout,
        idle_timeout: p.idle_timeout,
        heartbeat: sink.wants_heartbeat().then_some(p.heartbeat),
        last_chunk: None,
        // The response head went out at admission: heartbeats count from there, also
        // while a slow retriever works.
        last_event: Instant::now(),
    };
    // One timer for the whole answer, re-armed only when it fires (see `on_timer`).
    let mut timer = pin!(sleep_until(clock.next()));

    // Retrieval can end in four ways: the client leaves, the server stops, the retriever
    // answers, or the timer finds the first-token deadline passed (it may only send a
    // heartbeat). The timer is polled last, so an in-memory retriever, ready at once,
    // never registers it.
    let mut retrieving = p.retriever.retrieve(&ask.query, ask.top_k);
    let passages: Arc<[Passage]> = loop {
        tokio::select! {
            biased;
            () = &mut gone => return End::Disconnected,
            () = &mut stop => return End::Failed(shutting_down()),
            r = &mut retrieving => match r {
                Ok(found) => break found.into(),
                Err(e) => return End::Failed(pipeline_error(e)),
            },
            () = &mut timer => {
                if let Some(end) = on_timer(p, &mut clock, sink) {
                    return end;
                }
                timer.as_mut().reset(clock.next());
            }
        }
    };
    drop(retrieving);

    let mut tokens = p.generator.generate(Prompt {
        query: ask.query.clone(),
        passages: passages.clone(),
    });
    let mut usage = Usage::default();

    loop {
        // What can happen while the answer runs:
        // - the client goes away (the body was dropped): stop, refund;
        // - the grace period after a shutdown signal ends: SHUTTING_DOWN, refund;
        // - the generator yields a token, reports usage, fails, or finishes;
        // - the timer fires: first-token or idle deadline passed, or a heartbeat is due.
        tokio::select! {
            biased;
            () = &mut gone => return End::Disconnected,
            () = &mut stop => return End::Failed(shutting_down()),
            item = poll_fn(|cx| tokens.as_mut().poll_next(cx)) => {
                let token = match item {
                    Some(Ok(Chunk::Token(t))) => Some(t),
                    Some(Ok(Chunk::Usage(u))) => {
                        usage = u;
                        None
                    }
                    Some(Err(e)) => return End::Failed(pipeline_error(e)),
                    None => return End::Complete { passages, usage },
                };
                if let Some(t) = &token
                    && let Err(end) = sink.token(t, p).await
                {
                    return end;
                }
                // Read after the hand-off: a client that kept the token waiting for room
                // must not make the generator look idle.
                let now = Instant::now();
                if token.is_some() {
                    stats.tokens += 1;
                    stats.first_token.get_or_insert(now);
                    clock.last_event = now;
                }
                // The timer is re-armed lazily (it fires early, then moves on), which is
                // sound only while deadlines move later. The first chunk swaps the
                // first-token deadline for the idle deadline, which can be earlier: re-arm
                // once here, or an idle timeout shorter than the TTFT timeout would wait
                // for the TTFT deadline (or the next heartbeat) instead.
                if clock.last_chunk.replace(now).is_none() {
                    timer.as_mut().reset(clock.next());
                }
            }
            () = &mut timer => {
                if let Some(end) = on_timer(p, &mut clock, sink) {
                    return end;
                }
                timer.as_mut().reset(clock.next());
            }
        }
    }
}

/// The answer's timer fired: fail it if the generator's deadline (first token or idle)
/// has passed, send a heartbeat if one is due, or nothing (it fired for a deadline that
/// has since moved). The caller re-arms it for `clock.next()`.
fn on_timer(p: &Pipeline, clock: &mut Deadlines, sink: &mut impl Sink) -> Option<End> {
    let now = Instant::now();
    if now >= clock.generator_deadline() {
        return Some(End::Failed(match clock.last_chunk {
            None => no_first_token(p.ttft_timeout),
            Some(_) => stalled(p.idle_timeout),
        }));
    }
    if clock.heartbeat_due().is_some_and(|due| now >= due) {
        sink.heartbeat();
        clock.last_event = now;
    }
    None
}

/// Streams one answer into `tx`; owns the charge and settles or refunds it exactly once.
///
/// Not an `async fn`: the settlement is built before the future, so the future holds it
/// once rather than as arguments and again as a local (every open stream carries this
/// future).
pub(crate) fn stream(
    p: Arc<Pipeline>,
    ask: Ask,
    charge: Charge,
    permit: OwnedSemaphorePermit,
    tx: SseSender,
) -> impl Future<Output = ()> + Send {
    let mut answer = Settlement::new(&p, "stream", ask, charge, permit);
    answer.probe = Some(tx.probe());
    async move {
        let end = {
            let mut sink = StreamSink { tx: &tx };
            let gone = pin!(tx.closed());
            let drive = pin!(drive(&p, &answer.ask, &mut sink, gone, &mut answer.stats));
            catch_unwind(drive).await
        };
        let outcome = match end {
            End::Complete { passages, usage } => {
                let done = done_frame(
                    &answer.ask,
                    &passages,
                    answer.remaining(),
                    usage,
                    &answer.stats,
                );
                deliver_done(&p, tx, done).await
            }
            End::Disconnected => Outcome::Disconnected,
            End::Failed(err) => {
                fail_stream(tx, &err);
                Outcome::Failed(err.code)
            }
        };
        answer.finish(outcome);
    }
}

/// Hands the `done` frame over and waits to learn whether the body yielded it.
async fn deliver_done(p: &Pipeline, tx: SseSender, done: Bytes) -> Outcome {
    let ended_early = {
        let delivered = tx.finish(done);
        // Waiting for delivery can end three ways: the body yields `done` (or is dropped),
        // the client stops reading for too long, or the server stops.
        tokio::select! {
            d = delivered => return match d {
                Delivery::Delivered => Outcome::Done,
                Delivery::NotDelivered => Outcome::Disconnected,
            },
            () = tokio::time::sleep(p.slow_client) => slow_client(p.slow_client),
            () = p.shutdown.stopped() => shutting_down(),
        }
    };
    // Too late to finish: cut the stream, unless the body yielded `done` in the meantime.
    match tx.abort(ended_early.to_event()) {
        Delivery::Delivered => Outcome::Done,
        Delivery::NotDelivered => Outcome::Failed(ended_early.code),
    }
}

/// Ends a stream with an error event. Tokens already queued go first when there is room;
/// a client that is not reading, or a server that must stop, gets the error in their place.
fn fail_stream(tx: SseSender, err: &ApiError) {
    let frame = err.to_event();
    let cut = matches!(err.code, ErrorCode::SlowClient | ErrorCode::ShuttingDown);
    if cut {
        tx.abort(frame);
        return;
    }
    if let Err(TrySendError::Full(frame)) = tx.try_send(frame) {
        tx.abort(frame);
    }
    // Dropping `tx` ends the stream after the error frame.
}

/// Runs one answer to completion for JSON mode. On success, the returned body settles the
/// charge when hyper takes the document; dropping it unsent refunds.
///
/// When the client leaves while the answer is generated, hyper drops this future, and
/// with it the [`Settlement`], which refunds and logs the disconnect.
pub(crate) async fn json(
    p: Arc<Pipeline>,
    ask: Ask,
    charge: Charge,
    permit: OwnedSemaphorePermit,
) -> Result<JsonBody, ApiError> {
    let mut answer = Settlement::new(&p, "json", ask, charge, permit);
    let mut sink = JsonSink {
        answer: String::new(),
    };
    let gone = pin!(std::future::pending());
    let end = {
        let drive = pin!(drive(&p, &answer.ask, &mut sink, gone, &mut answer.stats));
        catch_unwind(drive).await
    };
    match end {
        End::Complete { passages, usage } => {
            let doc = JsonAnswer {
                query_id: answer.ask.id.as_str(),
                answer: &sink.answer,
                sources: &sources(&passages),
                quota_remaining: answer.remaining(),
                usage: usage_field(usage, &answer.stats),
                timing: timing(&answer.ask, &answer.stats),
            };
            let bytes = Bytes::from(serde_json::to_vec(&doc).unwrap_or_default());
            Ok(JsonBody {
                bytes: Some(bytes),
                answer: Some(Box::new(answer)),
            })
        }
        End::Disconnected => {
            answer.finish(Outcome::Disconnected);
            Err(ApiError::new(ErrorCode::Internal, "the client went away"))
        }
        End::Failed(err) => {
            answer.finish(Outcome::Failed(err.code));
            Err(err)
        }
    }
}

/// An admitted answer's obligations: its charge, its `--max-streams` permit, and its log
/// line. [`finish`](Settlement::finish) settles the charge for a delivered answer and
/// refunds it otherwise; dropping an unfinished settlement (a future dropped by hyper, a
/// panic outside the pipeline) refunds and logs a disconnect. Either way, exactly once.
struct Settlement {
    mode: &'static str,
    ask: Ask,
    stats: Stats,
    charge: Option<Charge>,
    /// Held only so the answer counts against `--max-streams` until it is settled.
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
    /// The response body's timestamps (streaming answers): first frame, early drop.
    probe: Option<Probe>,
}

impl Settlement {
    fn new(
        p: &Pipeline,
        mode: &'static str,
        ask: Ask,
        charge: Charge,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        Settlement {
            mode,
            ask,
            stats: Stats::default(),
            charge: Some(charge),
            _permit: permit,
            metrics: p.metrics.clone(),
            probe: None,
        }
    }

    /// The caller's remaining quota after this ask, for the `done` event.
    fn remaining(&self) -> u32 {
        self.charge.as_ref().map_or(0, Charge::remaining)
    }

    fn finish(mut self, outcome: Outcome) {
        self.settle(outcome);
    }

    fn settle(&mut self, outcome: Outcome) {
        let Some(charge) = self.charge.take() else {
            return;
        };
        let refunded = outcome != Outcome::Done;
        if refunded {
            charge.refund();
        } else {
            charge.settle();
        }
        let ttft_ms = self.stats.first_token.map(|t| ms(t - self.ask.received));
        tracing::info!(
            query_id = %self.ask.id,
            user = %self.ask.user,
            mode = self.mode,
            outcome = outcome.as_str(),
            ttft_ms,
            tokens = self.stats.tokens,
            refunded,
            "ask finished"
        );
        let probe = self.probe.as_ref();
        self.metrics.finished(Finished {
            failure: match outcome {
                Outcome::Done => None,
                Outcome::Disconnected => Some(None),
                Outcome::Failed(code) => Some(Some(code)),
            },
            refunded,
            tokens: self.stats.tokens,
            // An answer that failed before its first token has no time to first token,
            // even if its error event went out.
            ttft: probe
                .filter(|_| self.stats.tokens > 0)
                .and_then(Probe::first_frame_at)
                .map(|t| t - self.ask.received),
            disconnect_lag: match outcome {
                Outcome::Disconnected => probe.and_then(Probe::dropped_at).map(|t| t.elapsed()),
                _ => None,
            },
        });
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.settle(Outcome::Disconnected);
    }
}

/// A JSON answer's body: one frame. Yielding it settles the charge; dropping it before
/// that refunds (the client left while the document was ready but unsent).
pub struct JsonBody {
    bytes: Option<Bytes>,
    /// Boxed: it is large, and this body shares an enum with the small streaming one.
    answer: Option<Box<Settlement>>,
}

impl JsonBody {
    /// The document's length, for `content-length`.
    pub fn len(&self) -> usize {
        self.bytes.as_ref().map_or(0, Bytes::len)
    }

    /// Whether the document has been handed over already.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_none()
    }
}

impl Body for JsonBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = self.bytes.take();
        if frame.is_some()
            && let Some(answer) = self.answer.take()
        {
            answer.finish(Outcome::Done);
        }
        Poll::Ready(frame.map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len() as u64)
    }
}

impl std::fmt::Debug for JsonBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonBody")
            .field("len", &self.len())
            .finish()
    }
}

/// How an answer ended, for the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Disconnected,
    Failed(ErrorCode),
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Disconnected => "disconnected",
            Outcome::Failed(code) => code.as_str(),
        }
    }
}

/// Polls a future, turning a panic inside it into an `INTERNAL` failure of this ask only.
///
/// Takes the future pinned by the caller: an `async fn` that took it by value would keep
/// it twice in its state (the argument, then the pinned local), doubling every answer's
/// largest allocation.
async fn catch_unwind(mut fut: Pin<&mut impl Future<Output = End>>) -> End {
    poll_fn(
        |cx| match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                tracing::error!("the answer pipeline panicked");
                Poll::Ready(End::Failed(ApiError::new(
                    ErrorCode::Internal,
                    "the answer pipeline failed",
                )))
            }
        },
    )
    .await
}

fn pipeline_error(e: PipelineError) -> ApiError {
    let code = match e.kind {
        PipelineErrorKind::Upstream => ErrorCode::UpstreamError,
        PipelineErrorKind::Timeout => ErrorCode::UpstreamTimeout,
        PipelineErrorKind::Internal => ErrorCode::Internal,
    };
    ApiError::new(code, e.message)
}

fn shutting_down() -> ApiError {
    ApiError::new(
        ErrorCode::ShuttingDown,
        "the server is shutting down; this ask was refunded",
    )
}

fn slow_client(after: Duration) -> ApiError {
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

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// The JSON-mode document: the `done` event's fields plus the whole `answer`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonAnswer<'a> {
    query_id: &'a str,
    answer: &'a str,
    sources: &'a [Source<'a>],
    quota_remaining: u32,
    usage: UsageField,
    timing: TimingField,
}

fn sources(passages: &[Passage]) -> Vec<Source<'_>> {
    passages
        .iter()
        .map(|p| Source {
            id: &p.id,
            title: &p.title,
            score: p.score,
            url: p.url.as_deref(),
        })
        .collect()
}

fn usage_field(usage: Usage, stats: &Stats) -> UsageField {
    UsageField {
        completion_tokens: usage.completion_tokens.unwrap_or(stats.tokens),
        prompt_tokens: usage.prompt_tokens,
    }
}

fn timing(ask: &Ask, stats: &Stats) -> TimingField {
    TimingField {
        ttft_ms: stats.first_token.map(|t| ms(t - ask.received)),
        total_ms: ms(ask.received.elapsed()),
    }
}

fn done_frame(
    ask: &Ask,
    passages: &[Passage],
    remaining: u32,
    usage: Usage,
    stats: &Stats,
) -> Bytes {
    encode::done(&Done {
        query_id: ask.id.as_str(),
        sources: &sources(passages),
        quota_remaining: remaining,
        usage: usage_field(usage, stats),
        timing: timing(ask, stats),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_ids_are_unique_hex() {
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| QueryId::next()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            assert_eq!(id.as_str().len(), 32);
            assert!(
                id.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
        }
    }

    #[test]
    fn mixer_is_a_bijection_on_samples() {
        let outs: std::collections::HashSet<_> = (0..100_000u64).map(mix64).collect();
        assert_eq!(outs.len(), 100_000);
    }
}
