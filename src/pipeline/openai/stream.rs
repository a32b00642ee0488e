//! One upstream answer as a [`TokenStream`](crate::pipeline::TokenStream): a hand-written
//! state machine over the hyper client's response.
//!
//! ```text
//! Head ──2xx event stream──▶ Events ──[DONE]──▶ Draining ──▶ Finished
//!   │                          │ cut, malformed, error object, event over 1 MiB,
//!   ├─non-2xx or JSON─▶ Refused│ end without [DONE]
//!   │                     └────┴──────────────▶ error, Finished
//!   └─2xx of another type, or compressed ─────▶ error, Finished (body never read)
//! ```
//!
//! Everything the stream owns is either the pending response future or the response body.
//! Dropping the stream drops them, which is how cancellation works: hyper sees the
//! response receiver or the body receiver gone and closes the connection, since an HTTP/1.1
//! connection in the middle of a response cannot be used again. The model's server sees
//! the close and stops generating.
//!
//! Chunks are yielded the moment the event that completes them is decoded: no batching,
//! no re-buffering of tokens.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::client::legacy;
use tokio::time::Sleep;

use super::wire::{self, Event};
use crate::pipeline::{Chunk, PipelineError, Token, Usage};
use crate::sse::decode::{DecodeError, Decoder, Eof};

/// How much of a refused request's body is read for its error message. Enough for any
/// JSON error object (a cut-off one cannot be parsed, and only the status is reported);
/// little enough that a huge HTML error page costs nothing.
const ERROR_BODY_LIMIT: usize = 16 * 1024;

/// Longest piece of upstream-provided text put into a client-facing message, in chars.
const MESSAGE_LIMIT: usize = 200;

/// After `[DONE]`, how long to wait for the body's end. The end (the last chunk of the
/// HTTP/1.1 body) normally arrives with `[DONE]`; reading it is what returns the connection
/// to the pool. A server that keeps the body open past `[DONE]` gets its connection closed
/// instead, and the answer still completes.
const DONE_GRACE: Duration = Duration::from_millis(500);

/// Bytes accepted after `[DONE]` while waiting for the body's end.
const AFTER_DONE_LIMIT: usize = 16 * 1024;

/// The largest upstream event: its `data`, multi-line included, and any one line. Far
/// above any real chunk (a few hundred bytes); what a broken or hostile upstream can make
/// one ask hold.
const MAX_EVENT: usize = 1 << 20;

/// What the client is told about an event over [`MAX_EVENT`].
const EVENT_TOO_LARGE: &str = "the upstream sent an event larger than 1 MiB";

/// The stream of one upstream answer.
pub(super) struct UpstreamStream {
    state: State,
    /// The API key, only to scrub it from upstream text shown to clients (some servers
    /// echo the key they rejected).
    secret: Option<Arc<str>>,
}

enum State {
    /// Connecting (or checking a pooled connection out), sending the request, waiting
    /// for the response head.
    Head(legacy::ResponseFuture),
    /// The upstream said no (non-2xx) or answered without streaming: reading a bounded
    /// prefix of its body to say why.
    Refused(Box<Refused>),
    /// Reading the event stream.
    Events(Box<Events>),
    /// `[DONE]` has been seen: waiting briefly for the body's end so the connection can
    /// be reused.
    Draining(Draining),
    /// Built without a request: yields this error once.
    Failed(PipelineError),
    /// Ended (or failed); everything upstream has been dropped.
    Finished,
}

impl UpstreamStream {
    pub(super) fn new(response: legacy::ResponseFuture, secret: Option<Arc<str>>) -> Self {
        UpstreamStream {
            state: State::Head(response),
            secret,
        }
    }

    /// A stream that only reports `error`.
    pub(super) fn failed(error: PipelineError) -> Self {
        UpstreamStream {
            state: State::Failed(error),
            secret: None,
        }
    }

    /// Ends the stream with `error`; dropping the state closes the upstream connection.
    fn fail(&mut self, error: PipelineError) -> Poll<Option<Result<Chunk, PipelineError>>> {
        self.state = State::Finished;
        tracing::warn!(error = %error.message, "upstream answer failed");
        Poll::Ready(Some(Err(error)))
    }

    /// Upstream-provided text made fit for a client: the key scrubbed out, clipped.
    fn quote(&self, text: &str) -> String {
        quote(self.secret.as_deref(), text)
    }
}

/// `text` with `secret` scrubbed out, clipped to [`MESSAGE_LIMIT`] chars.
fn quote(secret: Option<&str>, text: &str) -> String {
    let scrubbed = match secret {
        Some(key) if !key.is_empty() && text.contains(key) => text.replace(key, "[redacted]"),
        _ => text.to_owned(),
    };
    clip(&scrubbed, MESSAGE_LIMIT)
}

impl Stream for UpstreamStream {
    type Item = Result<Chunk, PipelineError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let next = match &mut this.state {
                State::Head(response) => match ready!(Pin::new(response).poll(cx)) {
                    Ok(res) => match on_head(res, this.secret.as_deref()) {
                        Ok(next) => next,
                        // Dropping the unread body closes the connection.
                        Err(error) => return this.fail(error),
                    },
                    Err(e) => return this.fail(request_error(&e)),
                },
                State::Refused(refused) => {
                    ready!(refused.poll_read(cx));
                    let (status, said) = (refused.status, wire::error_message(&refused.buf));
                    let said = said.map(|m| this.quote(&m));
                    return this.fail(PipelineError::upstream(refused_message(status, said)));
                }
                State::Events(events) => match ready!(events.poll_step(cx)) {
                    Step::Chunk(chunk) => return Poll::Ready(Some(Ok(chunk))),
                    Step::Done => match std::mem::replace(&mut this.state, State::Finished) {
                        State::Events(events) => State::Draining(Draining {
                            body: events.body,
                            grace: None,
                            left: AFTER_DONE_LIMIT,
                        }),
                        other => other,
                    },
                    Step::End => {
                        this.state = State::Finished;
                        return Poll::Ready(None);
                    }
                    Step::UpstreamError(text) => {
                        let message = format!("upstream error: {}", this.quote(&text));
                        return this.fail(PipelineError::upstream(message));
                    }
                    Step::Failed(error) => return this.fail(error),
                },
                State::Draining(draining) => {
                    ready!(draining.poll_end(cx));
                    this.state = State::Finished;
                    return Poll::Ready(None);
                }
                State::Failed(error) => {
                    let error = error.clone();
                    return this.fail(error);
                }
                State::Finished => return Poll::Ready(None),
            };
            this.state = next;
        }
    }
}

/// The state that follows the response head, or why the answer fails at once.
fn on_head(res: http::Response<Incoming>, secret: Option<&str>) -> Result<State, PipelineError> {
    let status = res.status();
    // A 2xx JSON answer means the server ignored `"stream": true` or put an error in a
    // 200; either way there is no event stream to read.
    let json = res
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !status.is_success() || json {
        return Ok(State::Refused(Box::new(Refused {
            status,
            body: res.into_body(),
            buf: Vec::new(),
            done: false,
        })));
    }
    if let Some(why) = unreadable(res.headers(), secret) {
        return Err(PipelineError::upstream(why));
    }
    Ok(State::Events(Box::new(Events {
        body: res.into_body(),
        decoder: Decoder::with_max_line(MAX_EVENT).with_max_event(MAX_EVENT),
        usage: None,
        finished: false,
    })))
}

/// Why the body of a 2xx (non-JSON) response cannot be read as an event stream, if it
/// cannot: its type is not `text/event-stream`, or it is compressed (askstream sends
/// `Accept-Encoding: identity`, and reads bytes as they come). Header text is quoted, with
/// `secret` scrubbed out.
fn unreadable(headers: &HeaderMap, secret: Option<&str>) -> Option<String> {
    let shown = |v: &http::HeaderValue| quote(secret, v.to_str().unwrap_or("(not text)").trim());
    match headers.get(CONTENT_TYPE) {
        None => {
            return Some(
                "the upstream answered without a content-type instead of an event stream"
                    .to_owned(),
            );
        }
        Some(v) => {
            let media = v.to_str().ok().and_then(|t| t.split(';').next());
            if !media.is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream")) {
                let media = media.map_or_else(|| shown(v), |m| quote(secret, m.trim()));
                return Some(format!(
                    "the upstream answered {media} instead of an event stream"
                ));
            }
        }
    }
    for v in headers.get_all(CONTENT_ENCODING) {
        let identity = v.to_str().is_ok_and(|t| {
            t.split(',')
                .map(str::trim)
                .all(|c| c.is_empty() || c.eq_ignore_ascii_case("identity"))
        });
        if !identity {
            return Some(format!(
                "the upstream sent a compressed event stream (content-encoding: {}); \
                 askstream reads identity only",
                shown(v)
            ));
        }
    }
    None
}

/// What the client is told when no response head came.
fn request_error(e: &legacy::Error) -> PipelineError {
    // The innermost cause is the precise one ("Connection refused (os error 111)",
    // "connection closed before message completed"); the outer layers only wrap it.
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    let message = if e.is_connect() {
        format!("cannot connect to the upstream: {cause}")
    } else {
        format!("the upstream request failed: {cause}")
    };
    PipelineError::upstream(message)
}

/// A response that is not an event stream.
struct Refused {
    status: StatusCode,
    body: Incoming,
    /// At most [`ERROR_BODY_LIMIT`] bytes of the body.
    buf: Vec<u8>,
    done: bool,
}

impl Refused {
    /// Reads until the body ends, fails, or the limit is reached.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while !self.done && self.buf.len() < ERROR_BODY_LIMIT {
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let room = ERROR_BODY_LIMIT - self.buf.len();
                        self.buf.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                Some(Err(_)) | None => self.done = true,
            }
        }
        Poll::Ready(())
    }
}

/// What a client is told about a response that is not an event stream: the status and,
/// when the body was a JSON error object, its message (`said`, already quoted). Never the
/// raw body: it could be a long HTML page, or echo the request.
fn refused_message(status: StatusCode, said: Option<String>) -> String {
    if status.is_success() {
        return match said {
            Some(m) => format!("upstream error: {m}"),
            None => "the upstream answered with JSON instead of an event stream \
                     (does it support \"stream\": true?)"
                .to_owned(),
        };
    }
    let mut out = format!("the upstream answered {status}");
    if let Some(m) = said {
        out.push_str(": ");
        out.push_str(&m);
    }
    if status == StatusCode::NOT_FOUND {
        out.push_str(" (is --upstream-url the API base, such as http://host:port/v1?)");
    }
    out
}

/// The event stream being read.
struct Events {
    body: Incoming,
    decoder: Decoder,
    /// A usage report that came in the same chunk as a token; yielded right after it.
    usage: Option<Usage>,
    /// Some choice carried a `finish_reason`: the model has stopped.
    finished: bool,
}

/// What reading the event stream produced.
enum Step {
    Chunk(Chunk),
    /// `[DONE]`.
    Done,
    /// The body ended cleanly after a `finish_reason` but without `[DONE]`.
    End,
    /// An error object in the stream, with its (unquoted) message.
    UpstreamError(String),
    Failed(PipelineError),
}

impl Events {
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        loop {
            if let Some(usage) = self.usage.take() {
                return Poll::Ready(Step::Chunk(Chunk::Usage(usage)));
            }
            // First whatever is already decoded, then more bytes.
            match self.decoder.next_event() {
                Ok(Some(event)) => match wire::parse_event(&event.data) {
                    Event::Done => return Poll::Ready(Step::Done),
                    Event::Chunk {
                        token,
                        usage,
                        finished,
                    } => {
                        self.finished |= finished;
                        if usage.is_some() {
                            self.usage = usage;
                        }
                        if let Some(text) = token {
                            return Poll::Ready(Step::Chunk(Chunk::Token(Token::new(&text))));
                        }
                        continue;
                    }
                    Event::Error(message) => {
                        return Poll::Ready(Step::UpstreamError(message.into_owned()));
                    }
                    Event::Malformed => return Poll::Ready(malformed()),
                },
                Ok(None) => {}
                Err(DecodeError::LineTooLong { .. } | DecodeError::EventTooLarge { .. }) => {
                    return Poll::Ready(Step::Failed(PipelineError::upstream(EVENT_TOO_LARGE)));
                }
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.decoder.feed(data);
                    }
                }
                Some(Err(_)) => {
                    return Poll::Ready(Step::Failed(PipelineError::upstream(
                        "the upstream connection was cut mid-answer",
                    )));
                }
                None => {
                    // Every server we know sends `[DONE]`. Some older ones only end the
                    // body after the last chunk; a clean end after a `finish_reason` is a
                    // complete answer, anything else was cut short.
                    let clean = self.decoder.finish() == Eof::Clean;
                    return Poll::Ready(if self.finished && clean {
                        Step::End
                    } else {
                        Step::Failed(PipelineError::upstream(
                            "the upstream ended the stream before [DONE]",
                        ))
                    });
                }
            }
        }
    }
}

fn malformed() -> Step {
    Step::Failed(PipelineError::upstream("malformed chunk from upstream"))
}

/// The body after `[DONE]`.
struct Draining {
    body: Incoming,
    /// Created only if the end did not come at once.
    grace: Option<Pin<Box<Sleep>>>,
    /// Bytes still accepted before giving up on the connection.
    left: usize,
}

impl Draining {
    /// Ready when the body has ended, or when waiting for it is no longer worth it (the
    /// body is then dropped, and the connection closed).
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let n = frame.data_ref().map_or(0, Bytes::len);
                    if n > self.left {
                        return Poll::Ready(());
                    }
                    self.left -= n;
                }
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => break,
            }
        }
        self.grace
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(DONE_GRACE)))
            .as_mut()
            .poll(cx)
    }
}

/// At most `limit` chars of `text`, with `…` when cut.
fn clip(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_counts_chars_not_bytes() {
        assert_eq!(clip("héllo", 10), "héllo");
        assert_eq!(clip("héllo", 2), "hé…");
        assert_eq!(clip(&"日".repeat(300), 200).chars().count(), 201);
    }

    #[test]
    fn quoted_text_never_carries_the_key() {
        let s = UpstreamStream {
            state: State::Finished,
            secret: Some("sk-secret-123".into()),
        };
        assert_eq!(
            s.quote("Incorrect API key provided: sk-secret-123."),
            "Incorrect API key provided: [redacted]."
        );
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn only_an_uncompressed_event_stream_is_read() {
        let check = |pairs: &[(&str, &str)]| unreadable(&headers(pairs), Some("sk-key"));
        for ok in [
            &[("content-type", "text/event-stream")][..],
            &[("content-type", "text/event-stream; charset=utf-8")],
            &[("content-type", " Text/Event-Stream ;charset=UTF-8")],
            &[
                ("content-type", "text/event-stream"),
                ("content-encoding", "identity"),
            ],
            &[
                ("content-type", "text/event-stream"),
                ("content-encoding", "IDENTITY, identity"),
            ],
        ] {
            assert_eq!(check(ok), None, "{ok:?}");
        }
        assert_eq!(
            check(&[("content-type", "text/plain; charset=utf-8")]).as_deref(),
            Some("the upstream answered text/plain instead of an event stream")
        );
        assert_eq!(
            check(&[]).as_deref(),
            Some("the upstream answered without a content-type instead of an event stream")
        );
        assert_eq!(
            check(&[("content-type", "text/event-streamx")]).as_deref(),
            Some("the upstream answered text/event-streamx instead of an event stream")
        );
        assert_eq!(
            check(&[("content-type", "text/sk-key")]).as_deref(),
            Some("the upstream answered text/[redacted] instead of an event stream"),
            "header text is quoted like any upstream text"
        );
        let gzip = "the upstream sent a compressed event stream (content-encoding: gzip); \
                    askstream reads identity only";
        assert_eq!(
            check(&[
                ("content-type", "text/event-stream"),
                ("content-encoding", "gzip")
            ])
            .as_deref(),
            Some(gzip)
        );
        assert_eq!(
            check(&[
                ("content-type", "text/event-stream"),
                ("content-encoding", "identity"),
                ("content-encoding", "gzip"),
            ])
            .as_deref(),
            Some(gzip),
            "every content-encoding header counts"
        );
        assert!(
            check(&[
                ("content-type", "text/event-stream"),
                ("content-encoding", "identity, br")
            ])
            .is_some()
        );
    }

    #[test]
    fn refused_messages_show_status_and_the_error_message_only() {
        let refused = |status: u16, body: &[u8]| {
            refused_message(
                StatusCode::from_u16(status).unwrap(),
                wire::error_message(body),
            )
        };
        assert_eq!(
            refused(503, br#"{"error":{"message":"overloaded"}}"#),
            "the upstream answered 503 Service Unavailable: overloaded"
        );
        assert_eq!(
            refused(502, b"<html>lots of html</html>"),
            "the upstream answered 502 Bad Gateway"
        );
        assert!(
            refused(404, b"")
                .ends_with("(is --upstream-url the API base, such as http://host:port/v1?)")
        );
        assert_eq!(refused(200, br#"{"error":"no"}"#), "upstream error: no");
        assert!(refused(200, br#"{"choices":[]}"#).contains("instead of an event stream"));
    }
}
