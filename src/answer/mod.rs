//! The per-ask driver: runs the pipeline for one charged ask and decides, exactly once,
//! whether the charge is kept or refunded.
//!
//! - [`drive`] is the loop both modes share: retrieval, then generation, raced against the
//!   client leaving, timeouts, heartbeats and shutdown. Modes differ only in where tokens
//!   go: each token's pre-encoded frame into the [`SseSender`], or its text into the JSON
//!   answer.
//! - [`settle`] holds the [`Outcome`] of an answer and the [`Settlement`] that acts on it:
//!   the charge settled on delivery and refunded otherwise — also when the pipeline
//!   panics (caught per ask) and, as a last resort, by the settlement's own `Drop`.
//! - [`woken`] wraps the two ends no answer outlasts (the client leaving, the server
//!   stopping) so that the per-token loop polls them only after they woke.
//!
//! A streaming answer counts as delivered when the body yields its `done` frame to hyper;
//! a JSON answer when the body yields the document ([`JsonBody`]).

mod drive;
mod query_id;
mod settle;
mod woken;

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

pub(crate) use query_id::QueryId;
use settle::Mode;
pub(crate) use settle::{Outcome, Settlement};

use crate::auth::UserId;
use crate::body::JsonBody;
use crate::config::ServiceConfig;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::peer::Hangup;
use crate::pipeline::{Generator, Passage, Retriever, Usage};
use crate::quota::Charge;
use crate::shutdown::Shutdown;
use crate::sse::body::{SseSender, TrySendError};
use crate::wire::{self, Done, Source, TimingField, UsageField};
use drive::{
    Generated, Gone, JsonSink, Stats, StreamSink, catch_unwind, shutting_down, slow_client,
};

/// What an answer needs from the service: the pipeline, the clocks, the shutdown signal.
pub(crate) struct Pipeline {
    retriever: Arc<dyn Retriever>,
    generator: Arc<dyn Generator>,
    shutdown: Shutdown,
    ttft_timeout: Duration,
    idle_timeout: Duration,
    heartbeat: Duration,
    slow_client: Duration,
    /// Token events after which an answer is complete, whatever the generator says.
    max_tokens: u32,
    metrics: Arc<Metrics>,
}

impl Pipeline {
    pub(crate) fn new(
        retriever: Arc<dyn Retriever>,
        generator: Arc<dyn Generator>,
        shutdown: Shutdown,
        config: &ServiceConfig,
    ) -> Self {
        Pipeline {
            retriever,
            generator,
            shutdown,
            ttft_timeout: config.ttft_timeout,
            idle_timeout: config.idle_timeout,
            heartbeat: config.heartbeat,
            slow_client: config.slow_client,
            max_tokens: config.max_answer_tokens,
            metrics: Arc::new(Metrics::default()),
        }
    }

    pub(crate) fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// One admitted ask: validated, identified, charged.
pub(crate) struct Ask {
    pub(crate) id: QueryId,
    pub(crate) query: Arc<str>,
    pub(crate) top_k: usize,
    pub(crate) user: UserId,
    /// When the request reached the service; TTFT and total time count from here.
    pub(crate) received: Instant,
}

#[cfg(test)]
impl Ask {
    /// An ask about quota refunds from user `u`, received now, for the driver's tests.
    pub(crate) fn example() -> Ask {
        Ask {
            id: QueryId::next(),
            query: Arc::from("How do quota refunds work?"),
            top_k: 4,
            user: UserId::of_bearer("u"),
            received: Instant::now(),
        }
    }
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
    hangup: Option<Hangup>,
) -> impl Future<Output = ()> + Send {
    let mut answer = Settlement::new(&p.metrics, Mode::Stream, ask, charge, permit);
    answer.probe = Some(tx.probe());
    async move {
        // The driver is pinned here rather than in a helper shared with `json`: one more
        // future level would add its captures to every open answer (48 bytes, past the
        // size class the test below holds it to).
        //
        // The driver's result is matched as a temporary, not a local: a local that a
        // `match` moves out of stays in the future's state, and would sit in every open
        // answer while delivery waits. The passages go into the frame here.
        #[expect(
            clippy::blocks_in_conditions,
            reason = "bound with a `let`, the result would stay in every open answer's state"
        )]
        let done = match {
            let gone = Gone {
                body: Some(&tx),
                hangup: hangup.as_ref(),
            };
            let sink = StreamSink { tx: &tx };
            let drive = pin!(drive::drive(&p, &answer.ask, sink, gone, &mut answer.stats));
            catch_unwind(drive).await
        } {
            Ok(generated) => done_frame(&answer, &generated),
            Err(ended) => {
                if let Outcome::Failed(err) = &ended {
                    fail_stream(tx, err);
                }
                answer.finish(ended);
                return;
            }
        };
        let outcome = deliver_done(&p, tx, done).await;
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
                Ok(()) => Outcome::Delivered,
                Err(_) => Outcome::Disconnected,
            },
            () = tokio::time::sleep(p.slow_client) => slow_client(p.slow_client),
            () = p.shutdown.stopped() => shutting_down(),
        }
    };
    // Too late to finish: cut the stream, unless the body yielded `done` in the meantime.
    if tx.abort(ended_early.to_event()) {
        Outcome::Delivered
    } else {
        Outcome::Failed(ended_early)
    }
}

/// Ends a stream with an error event. Tokens already queued go first when there is room;
/// a client that is not reading, or a server that must stop, gets the error in their place.
fn fail_stream(tx: SseSender, err: &ApiError) {
    let frame = err.to_event();
    let cut = matches!(err.code, ErrorCode::SlowClient | ErrorCode::ShuttingDown);
    // No `done` frame was queued, so neither abort below can lose to a delivery.
    if cut {
        let _ = tx.abort(frame);
        return;
    }
    if let Err(TrySendError::Full(frame)) = tx.try_send(frame) {
        let _ = tx.abort(frame);
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
    hangup: Option<Hangup>,
) -> Result<JsonBody, ApiError> {
    let mut answer = Settlement::new(&p.metrics, Mode::Json, ask, charge, permit);
    let mut sink = JsonSink::default();
    // Without a hangup watch, a JSON answer learns of a departed client when hyper drops
    // this future.
    let driven = {
        let gone = Gone {
            body: None,
            hangup: hangup.as_ref(),
        };
        let drive = pin!(drive::drive(
            &p,
            &answer.ask,
            &mut sink,
            gone,
            &mut answer.stats
        ));
        catch_unwind(drive).await
    };
    match driven {
        Ok(generated) => {
            let sources = sources(&generated.passages);
            let id = answer.ask.id.text();
            let fields = done_fields(&answer, &generated, id.as_str(), &sources);
            let document = wire::json_answer(&fields, &sink.answer);
            Ok(JsonBody::new(document, answer))
        }
        Err(Outcome::Failed(err)) => {
            answer.finish(Outcome::Failed(err.clone()));
            Err(err)
        }
        Err(ended) => {
            answer.finish(ended);
            Err(ApiError::new(ErrorCode::Internal, "the client went away"))
        }
    }
}

fn sources(passages: &[Passage]) -> Vec<Source<'_>> {
    passages
        .iter()
        .map(|p| Source {
            id: &p.stored.id,
            title: &p.stored.title,
            score: p.score,
            url: p.stored.url.as_deref(),
        })
        .collect()
}

/// The fields of the `done` event (and of the JSON answer) for a generated answer.
fn done_fields<'a>(
    answer: &'a Settlement,
    generated: &Generated,
    query_id: &'a str,
    sources: &'a [Source<'a>],
) -> Done<'a> {
    let Usage {
        prompt_tokens,
        completion_tokens,
    } = generated.usage;
    let stats: &Stats = &answer.stats;
    let received = answer.ask.received;
    Done {
        query_id,
        sources,
        quota_remaining: answer.remaining(),
        usage: UsageField {
            completion_tokens: completion_tokens.unwrap_or(stats.tokens),
            prompt_tokens,
        },
        timing: TimingField {
            ttft_ms: stats.first_token.map(|t| settle::ms(t - received)),
            total_ms: settle::ms(received.elapsed()),
        },
    }
}

fn done_frame(answer: &Settlement, generated: &Generated) -> Bytes {
    let sources = sources(&generated.passages);
    let id = answer.ask.id.text();
    wire::done(&done_fields(answer, generated, id.as_str(), &sources))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::bm25::Bm25Index;
    use crate::pipeline::sim::{SimConfig, SimGenerator};
    use crate::quota::QuotaMap;

    /// Every open stream holds its answer's future, boxed, for the stream's whole life.
    /// It fits mimalloc's 640-byte size class, with nothing to spare; the next class up
    /// is 768 bytes, and the future was 1,496 bytes before nothing in it was kept twice
    /// (888 before the hang-up watch was polled in place, the driver's result stopped
    /// outliving its match and the query id was kept as a number). A change that grows it
    /// past the class costs every open stream 128 bytes: this says so at once.
    #[tokio::test]
    async fn an_open_answer_fits_in_640_bytes() {
        let p = Arc::new(Pipeline::new(
            Arc::new(Bm25Index::builtin()),
            Arc::new(SimGenerator::new(SimConfig::default())),
            Shutdown::new(),
            &ServiceConfig::default(),
        ));
        let charge = QuotaMap::new(Duration::from_secs(60))
            .charge_at("u", 10, 0)
            .expect("a fresh user has quota");
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .expect("a free permit");
        let ask = Ask::example();
        let (tx, _body) = crate::sse::body::channel(4);
        let answer = stream(p, ask, charge, permit, tx, None);
        let size = size_of_val(&answer);
        assert!(size <= 640, "an answer's future is {size} bytes");
    }
}
