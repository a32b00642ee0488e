//! The response bodies the service produces, behind one concrete type so hyper's write
//! path is monomorphic: a small complete body, a streaming answer, or a JSON answer whose
//! yield is its delivery.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use crate::activity::Open;
use crate::answer::{Outcome, Settlement};
use crate::sse::body::SseBody;

/// Every response body an [`AskService`](crate::AskService) answers with. Opaque: an
/// embedder only polls it (or boxes it with its own bodies).
#[derive(Debug)]
pub struct AskBody(Kind, Option<Open>);

#[derive(Debug)]
enum Kind {
    /// A complete small body (errors, quota, health, assets).
    Full(Full<Bytes>),
    /// A streaming answer.
    Sse(SseBody),
    /// A JSON answer, which settles its charge when yielded.
    Json(JsonBody),
}

impl AskBody {
    pub(crate) fn full(bytes: Bytes) -> Self {
        AskBody(Kind::Full(Full::new(bytes)), None)
    }

    pub(crate) fn sse(body: SseBody) -> Self {
        AskBody(Kind::Sse(body), None)
    }

    pub(crate) fn json(body: JsonBody) -> Self {
        AskBody(Kind::Json(body), None)
    }

    /// Keeps the connection's request counted as open until this body is dropped.
    pub(crate) fn holding(mut self, open: Open) -> Self {
        self.1 = Some(open);
        self
    }
}

impl Body for AskBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().0 {
            Kind::Full(b) => Pin::new(b).poll_frame(cx),
            Kind::Sse(b) => Pin::new(b).poll_frame(cx),
            Kind::Json(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(b) => b.is_end_stream(),
            Kind::Sse(b) => b.is_end_stream(),
            Kind::Json(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(b) => b.size_hint(),
            Kind::Sse(b) => b.size_hint(),
            Kind::Json(b) => b.size_hint(),
        }
    }
}

/// A JSON answer's body: one frame. Yielding it settles the charge; dropping it before
/// that refunds (the client left while the document was ready but unsent).
pub(crate) struct JsonBody {
    bytes: Option<Bytes>,
    /// Boxed: it is large, and this body shares an enum with the small streaming one.
    answer: Option<Box<Settlement>>,
}

impl JsonBody {
    pub(crate) fn new(document: Bytes, answer: Settlement) -> Self {
        JsonBody {
            bytes: Some(document),
            answer: Some(Box::new(answer)),
        }
    }

    fn len(&self) -> usize {
        self.bytes.as_ref().map_or(0, Bytes::len)
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
            answer.finish(Outcome::Delivered);
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
