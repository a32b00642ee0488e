//! The answer pipeline: a [`Retriever`] finds passages, a [`Generator`] streams tokens.
//!
//! Both are traits so users of the crate can put their own vector store or model behind
//! the server. The embedded defaults need no setup: [`bm25::Bm25Index`] over the built-in
//! corpus (or a folder of `.md`/`.txt` files) and the deterministic [`sim::SimGenerator`].
//! A real model plugs in through [`openai::OpenAiGenerator`], for any OpenAI-compatible
//! streaming server.
//!
//! A generator's output is a [`TokenStream`]; dropping it cancels generation. The server
//! drops it the moment the client is gone, so an upstream model stops working for nobody.
//!
//! A generator of your own is a struct and a stream. This one answers every prompt with
//! the same two tokens:
//!
//! ```
//! use std::sync::Arc;
//! use askstream::pipeline::{Chunk, Generator, Prompt, Token, TokenStream};
//!
//! struct Canned;
//!
//! impl Generator for Canned {
//!     fn generate(&self, _prompt: Prompt) -> TokenStream {
//!         let tokens = Token::batch(["Hello", ", world"]);
//!         // Any `Stream` works; a ready-made iterator stream keeps the example short.
//!         Box::pin(Iter(tokens.into_iter().map(|t| Ok(Chunk::Token(t)))))
//!     }
//! }
//!
//! struct Iter<I>(I);
//! impl<I: Iterator + Unpin> futures_core::Stream for Iter<I> {
//!     type Item = I::Item;
//!     fn poll_next(mut self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>)
//!         -> std::task::Poll<Option<I::Item>> {
//!         std::task::Poll::Ready(self.0.next())
//!     }
//! }
//!
//! // Mount it: the built-in retriever, your generator.
//! let service = askstream::AskService::builder(askstream::ServiceConfig::default())
//!     .generator(Arc::new(Canned))
//!     .build()
//!     .unwrap();
//! # let _ = service;
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_core::Stream;

use crate::wire;

pub mod bm25;
mod corpus;
pub mod openai;
pub mod sim;

/// A boxed future, as the pipeline traits return them (they must be object-safe so the
/// server can hold `Arc<dyn Retriever>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The stream a [`Generator`] returns. Dropping it must stop generation.
pub type TokenStream = Pin<Box<dyn Stream<Item = Result<Chunk, PipelineError>> + Send>>;

/// One retrieved passage: what the generator reads and what `done.sources` lists.
///
/// The passage itself is shared with the corpus, so a hit costs one reference count
/// rather than one per field, and an open answer keeps 16 bytes per source rather than
/// 72 (it holds its sources until `done`).
#[derive(Clone, Debug, PartialEq)]
pub struct Passage {
    /// The passage as the corpus stores it.
    pub stored: Arc<StoredPassage>,
    /// Relevance score from the retriever; higher is better.
    pub score: f32,
}

impl Passage {
    /// `stored` as a hit that scored `score`. A retriever that keeps its passages in
    /// `Arc`s hands out clones of them, so a hit costs a reference count.
    pub fn new(stored: impl Into<Arc<StoredPassage>>, score: f32) -> Self {
        Passage {
            stored: stored.into(),
            score,
        }
    }
}

/// A passage as a corpus stores it, whatever it matched.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredPassage {
    /// Stable identifier of the passage within its corpus (e.g. `quota.md#2`).
    pub id: Arc<str>,
    /// Title of the document the passage belongs to.
    pub title: Arc<str>,
    /// Where a reader can open the document, if it has an address.
    pub url: Option<Arc<str>>,
    /// The passage text handed to the generator.
    pub text: Arc<str>,
}

impl StoredPassage {
    /// A passage with no address (see [`with_url`](Self::with_url)).
    pub fn new(
        id: impl Into<Arc<str>>,
        title: impl Into<Arc<str>>,
        text: impl Into<Arc<str>>,
    ) -> Self {
        StoredPassage {
            id: id.into(),
            title: title.into(),
            url: None,
            text: text.into(),
        }
    }

    /// The same passage, opened by a reader at `url` (`done.sources[].url`).
    pub fn with_url(self, url: impl Into<Arc<str>>) -> Self {
        StoredPassage {
            url: Some(url.into()),
            ..self
        }
    }
}

/// What a generator is asked to answer. Cheap to clone: the fields are shared.
#[derive(Clone, Debug)]
pub struct Prompt {
    /// The user's question, trimmed.
    pub query: Arc<str>,
    /// The retrieved passages, best first.
    pub passages: Arc<[Passage]>,
}

/// Finds the passages that answer a query.
///
/// A retriever of your own, here one that knows a single page:
///
/// ```
/// use std::sync::Arc;
/// use askstream::pipeline::{BoxFuture, Passage, PipelineError, Retriever, StoredPassage};
///
/// struct OnePage(Arc<StoredPassage>);
///
/// impl Retriever for OnePage {
///     fn retrieve<'a>(
///         &'a self,
///         _query: &'a str,
///         top_k: usize,
///     ) -> BoxFuture<'a, Result<Vec<Passage>, PipelineError>> {
///         let hits = (top_k > 0).then(|| Passage::new(self.0.clone(), 1.0));
///         // Ready at once; a vector store would await its client here.
///         Box::pin(std::future::ready(Ok(hits.into_iter().collect())))
///     }
/// }
///
/// let page = StoredPassage::new("refunds.md#1", "Refunds", "A cut answer is refunded.")
///     .with_url("https://example.com/refunds");
/// let service = askstream::AskService::builder(askstream::ServiceConfig::default())
///     .retriever(Arc::new(OnePage(page.into())))
///     .build()
///     .unwrap();
/// # let _ = service;
/// ```
pub trait Retriever: Send + Sync + 'static {
    /// Returns at most `top_k` passages, best first. An empty result is not an error.
    fn retrieve<'a>(
        &'a self,
        query: &'a str,
        top_k: usize,
    ) -> BoxFuture<'a, Result<Vec<Passage>, PipelineError>>;
}

/// Turns a prompt into a stream of tokens.
pub trait Generator: Send + Sync + 'static {
    /// Starts generating. The stream yields [`Chunk::Token`]s in order and may yield one
    /// [`Chunk::Usage`]; it ends when the answer is complete. Dropping it cancels.
    fn generate(&self, prompt: Prompt) -> TokenStream;
}

/// One item of a [`TokenStream`].
#[derive(Clone, Debug)]
pub enum Chunk {
    /// The next piece of the answer.
    Token(Token),
    /// Token accounting reported by the model (fills `done.usage`).
    Usage(Usage),
}

/// Token accounting for the `done` event's `usage` field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the prompt, when the model reports it.
    pub prompt_tokens: Option<u32>,
    /// Tokens generated, when the model reports it; otherwise the server counts events.
    pub completion_tokens: Option<u32>,
}

/// A generated token together with its encoded SSE frame.
///
/// The frame is built once, when the token is made, so sending it is a reference-count
/// bump. Generators that know many tokens up front encode their frames into one buffer
/// with [`Token::batch`] (the sim does, once per passage, and keeps them).
///
/// Most texts need no JSON escaping, and then the frame holds the text as it is: the
/// token is the frame alone, and cloning one is a single reference-count bump.
#[derive(Clone, Debug)]
pub struct Token {
    frame: Bytes,
    /// The text, when escaping it made the frame's copy differ; `None` when the text is
    /// the frame between [`TOKEN_PREFIX`] and [`TOKEN_SUFFIX`].
    escaped: Option<Bytes>,
}

/// What a `token` frame holds before its text.
const TOKEN_PREFIX: &[u8] = br#"data: {"type":"token","token":""#;
/// What a `token` frame holds after its text.
const TOKEN_SUFFIX: &[u8] = b"\"}\n\n";

/// The text of `frame` when it is the frame's text unescaped.
fn unescaped(frame: &[u8], text: &str) -> bool {
    frame
        .len()
        .checked_sub(TOKEN_SUFFIX.len())
        .and_then(|end| frame.get(TOKEN_PREFIX.len()..end))
        == Some(text.as_bytes())
}

impl Token {
    /// A token for `text`, with its `token` event encoded now.
    pub fn new(text: &str) -> Self {
        let frame = wire::token(text);
        let escaped = (!unescaped(&frame, text)).then(|| Bytes::copy_from_slice(text.as_bytes()));
        Token { frame, escaped }
    }

    /// Tokens for every piece of `texts`, all frames in one allocation (and the few texts
    /// that escaping changed in another); each token then shares those buffers.
    pub fn batch<'a>(texts: impl IntoIterator<Item = &'a str> + Clone) -> Vec<Token> {
        // Size the buffer up front: a frame is its text plus 35 bytes of envelope when
        // nothing needs escaping, so one pass over the lengths avoids regrowing (and
        // copying) the buffer as the answer is encoded.
        let (count, text_len, escaped_len) =
            texts
                .clone()
                .into_iter()
                .fold((0, 0, 0), |(n, len, esc), t| {
                    let escapes = t.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\');
                    (
                        n + 1,
                        len + t.len(),
                        esc + if escapes { t.len() } else { 0 },
                    )
                });
        let mut frame_buf = BytesMut::with_capacity(text_len + count * 36);
        let mut escaped_buf = BytesMut::with_capacity(escaped_len);
        let mut ends = Vec::with_capacity(count);
        for t in texts.clone() {
            let start = frame_buf.len();
            wire::token_into(&mut frame_buf, t);
            let escaped = (!unescaped(&frame_buf[start..], t)).then(|| {
                escaped_buf.extend_from_slice(t.as_bytes());
                escaped_buf.len()
            });
            ends.push((frame_buf.len(), escaped));
        }
        let frame_all = frame_buf.freeze();
        let escaped_all = escaped_buf.freeze();
        let mut out = Vec::with_capacity(ends.len());
        let (mut f0, mut t0) = (0, 0);
        for (f1, escaped) in ends {
            out.push(Token {
                frame: frame_all.slice(f0..f1),
                escaped: escaped.map(|t1| {
                    let text = escaped_all.slice(t0..t1);
                    t0 = t1;
                    text
                }),
            });
            f0 = f1;
        }
        out
    }

    /// The token's text.
    pub fn text(&self) -> &str {
        let bytes = match &self.escaped {
            Some(text) => &text[..],
            None => &self.frame[TOKEN_PREFIX.len()..self.frame.len() - TOKEN_SUFFIX.len()],
        };
        // Built only from `&str` (see the constructors), so this is always valid UTF-8.
        std::str::from_utf8(bytes).unwrap_or_default()
    }

    /// The encoded `data: {"type":"token",…}\n\n` frame.
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    /// The encoded frame, taking it from the token: for a sink that sends it on.
    pub fn into_frame(self) -> Bytes {
        self.frame
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Token) -> bool {
        self.frame == other.frame
    }
}

impl Eq for Token {}

/// Why the pipeline failed; decides the error code the client sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipelineErrorKind {
    /// The retriever or generator (or its upstream) failed: `UPSTREAM_ERROR`.
    Upstream,
    /// The upstream did not answer in time: `UPSTREAM_TIMEOUT`.
    Timeout,
    /// A bug in the pipeline: `INTERNAL`.
    Internal,
}

/// A pipeline failure: a kind and a message safe to show a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineError {
    /// Which class of failure this is.
    pub kind: PipelineErrorKind,
    /// Human text; must never carry secrets (keys, full upstream bodies).
    pub message: String,
}

impl PipelineError {
    /// An upstream failure.
    pub fn upstream(message: impl Into<String>) -> Self {
        PipelineError {
            kind: PipelineErrorKind::Upstream,
            message: message.into(),
        }
    }

    /// An upstream timeout.
    pub fn timeout(message: impl Into<String>) -> Self {
        PipelineError {
            kind: PipelineErrorKind::Timeout,
            message: message.into(),
        }
    }

    /// A bug.
    pub fn internal(message: impl Into<String>) -> Self {
        PipelineError {
            kind: PipelineErrorKind::Internal,
            message: message.into(),
        }
    }
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PipelineError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_matches_single_tokens() {
        let words = [
            "The",
            " north",
            "",
            " \"quoted\"",
            " é",
            "a\\b",
            " wind",
            "line\n",
            "\u{1}",
            " 日本語",
        ];
        let batch = Token::batch(words.iter().copied());
        assert_eq!(batch.len(), words.len());
        for (t, w) in batch.iter().zip(words) {
            let single = Token::new(w);
            assert_eq!(t, &single);
            assert_eq!(t.text(), w);
            assert_eq!(single.text(), w);
            assert_eq!(t.frame(), &wire::token(w));
            // Only a text that escaping changed is kept apart from its frame.
            let changed = w.contains(['"', '\\', '\n', '\u{1}']);
            assert_eq!(t.escaped.is_some(), changed, "{w:?}");
            assert_eq!(single.escaped.is_some(), changed, "{w:?}");
            assert_eq!(t.clone().into_frame(), wire::token(w));
        }
    }
}
