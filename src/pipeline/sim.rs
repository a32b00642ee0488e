//! The simulated generator: a deterministic, nearly free "model" for demos and load tests.
//!
//! It answers with the words of the retrieved passages, in rank order, with Markdown
//! syntax stripped, so answers are on topic and the same query over the same corpus always
//! streams the same tokens. Each passage's words are cut out and encoded as token frames
//! once, the first time the passage is seen, and kept by the generator;
//! an answer is then a cursor over the passages' shared lists, and yielding a token clones
//! two `Bytes` handles. Nothing is encoded or allocated per token, and next to nothing
//! per answer, so what a load test measures is the server, not its stand-in model.
//!
//! Pacing uses absolute deadlines: token `i` is due at `start + ttft + i * token_interval`,
//! where `start` is the moment [`Generator::generate`] is called (the model "receives the
//! prompt" then, so a late first poll does not push the answer back). A consumer that falls
//! behind gets the overdue tokens immediately and then continues on the original schedule;
//! timer lateness never accumulates. One `Sleep` per stream is reset from deadline to
//! deadline, and with no pacing at all the timer is never touched.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_core::Stream;
use tokio::time::{Instant, Sleep};

use super::{Chunk, Generator, PipelineError, Prompt, Token, TokenStream, Usage};
use crate::clock::later;

/// What the answer says when no passage was retrieved (repeated as needed).
const FALLBACK: &str = "I found nothing in the corpus about that question.";

/// Emitted (as its own token) each time the answer runs out of words and starts over.
const SEPARATOR: &str = " —";

/// Pacing and length of simulated answers (the `--sim-*` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Delay from `generate()` to the first token.
    pub ttft: Duration,
    /// Delay between consecutive tokens (zero: as fast as the consumer reads).
    pub token_interval: Duration,
    /// Exact number of token events per answer.
    pub tokens: u32,
}

impl Default for SimConfig {
    /// The contract's defaults (§4): 150 ms to the first token, then one every 20 ms, 64 in all.
    fn default() -> Self {
        SimConfig {
            ttft: Duration::from_millis(150),
            token_interval: Duration::from_millis(20),
            tokens: 64,
        }
    }
}

/// A [`Generator`] that streams an answer extracted from the retrieved passages.
#[derive(Clone, Debug, Default)]
pub struct SimGenerator {
    config: SimConfig,
    words: Arc<WordCache>,
}

impl SimGenerator {
    /// A generator with the given pacing and length.
    pub fn new(config: SimConfig) -> Self {
        SimGenerator {
            config,
            words: Arc::default(),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }
}

impl Generator for SimGenerator {
    fn generate(&self, prompt: Prompt) -> TokenStream {
        let n = self.config.tokens;
        let SimConfig {
            ttft,
            token_interval,
            ..
        } = self.config;
        // Without any delay there is nothing to schedule: skip even reading the clock.
        let pacing = (!ttft.is_zero() || !token_interval.is_zero()).then(|| Pacing {
            first: later(Instant::now(), ttft),
            interval: token_interval,
            sleep: None,
        });
        Box::pin(SimStream {
            usage: Some(Usage {
                prompt_tokens: None,
                completion_tokens: Some(n),
            }),
            words: self.words.answer(&prompt, n as usize),
            left: n,
            next: 0,
            pacing,
        })
    }
}

/// One passage's words as tokens, each `" word"`, cut out and encoded once.
struct PassageWords {
    words: Vec<Token>,
    /// The first word without its space, for an answer that starts with this passage.
    first: Token,
}

impl PassageWords {
    /// `None` for a passage without a single word (only markup, or empty).
    fn of(text: &str) -> Option<PassageWords> {
        let mut all = String::with_capacity(text.len());
        let mut ends = Vec::new();
        push_plain_words(text, &mut all, &mut ends);
        let first_end = *ends.first()?;
        let mut start = 0;
        let texts = ends.iter().map(|&end| {
            let word = &all[start..end];
            start = end;
            word
        });
        Some(PassageWords {
            words: Token::batch(texts.collect::<Vec<_>>().iter().copied()),
            first: shared_token(&all[1..first_end]),
        })
    }
}

/// A token whose buffers are already reference-counted. (`Token::new`'s are promoted
/// to that on their first clone, which allocates: on a cached token, that would be in
/// the middle of some later answer.)
fn shared_token(text: &str) -> Token {
    Token::batch([text])
        .pop()
        .expect("a batch of one text is one token")
}

/// Passages the sim has already cut into tokens, keyed by their text's address.
///
/// Retrievers hand out clones of the same `Arc<str>` for the same passage (the built-in
/// index does), so the address identifies the text; the cache keeps each text alive, so
/// an address cannot be reused for another while it is cached. Bounded by passages and
/// by their text's bytes: once full, new passages are cut for their answer and not kept.
/// A retriever that builds fresh texts for every answer gains nothing here: each of its
/// passages is cut whole (not just the words an answer needs) on every answer.
struct WordCache {
    passages: Mutex<Cached>,
    /// The answer when the passages have no words at all.
    fallback: Arc<PassageWords>,
    separator: Token,
}

/// What the cache holds: each passage's text (kept alive, so its address stays its own)
/// and its words (`None` when it has none), and the total length of those texts.
#[derive(Default)]
struct Cached {
    by_address: HashMap<usize, (Arc<str>, Option<Arc<PassageWords>>)>,
    text_bytes: usize,
}

/// Passages kept at most; the built-in corpus has a few dozen.
const CACHED_PASSAGES: usize = 4096;
/// Passage text kept at most. The tokens cost about 18 bytes per byte of text (a word of
/// 6 letters: a 64-byte `Token`, its frame and its text), so this holds the cache near
/// 40 MB at worst.
const CACHED_TEXT_BYTES: usize = 2 << 20;

impl Default for WordCache {
    fn default() -> Self {
        WordCache {
            passages: Mutex::default(),
            fallback: Arc::new(
                PassageWords::of(FALLBACK).expect("the fallback sentence has words"),
            ),
            separator: shared_token(SEPARATOR),
        }
    }
}

impl std::fmt::Debug for WordCache {
    /// Counts, not contents: the cache may hold thousands of passages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.passages.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("WordCache")
            .field("passages", &cached.by_address.len())
            .field("text_bytes", &cached.text_bytes)
            .finish()
    }
}

impl WordCache {
    /// The words an answer of `n` tokens draws on: the passages in rank order, as far as
    /// they are needed.
    fn answer(self: &Arc<Self>, prompt: &Prompt, n: usize) -> AnswerWords {
        let mut lists = Vec::with_capacity(prompt.passages.len().min(8));
        let mut total = 0;
        for passage in prompt.passages.iter() {
            if total >= n {
                break;
            }
            if let Some(words) = self.words(&passage.stored.text) {
                total += words.words.len();
                lists.push(words);
            }
        }
        if lists.is_empty() {
            lists.push(self.fallback.clone());
        }
        AnswerWords {
            lists,
            list: 0,
            word: 0,
            started: false,
            cache: self.clone(),
        }
    }

    /// A passage's words, from the cache or cut now (outside the lock, so other answers
    /// are not held up by it) and kept if there is room.
    fn words(&self, text: &Arc<str>) -> Option<Arc<PassageWords>> {
        let key = Arc::as_ptr(text).cast::<u8>() as usize;
        let lock = || self.passages.lock().unwrap_or_else(PoisonError::into_inner);
        // The entry holds its text, so a key found is this very text.
        if let Some((_, words)) = lock().by_address.get(&key) {
            return words.clone();
        }
        let words = PassageWords::of(text).map(Arc::new);
        let mut cached = lock();
        if cached.by_address.len() < CACHED_PASSAGES
            && cached.text_bytes + text.len() <= CACHED_TEXT_BYTES
            && !cached.by_address.contains_key(&key)
        {
            cached.text_bytes += text.len();
            cached.by_address.insert(key, (text.clone(), words.clone()));
        }
        words
    }
}

/// A cursor over an answer's passages: their words in order, then `" —"`, then from the
/// start again, as often as the answer's length needs.
struct AnswerWords {
    /// Never empty, and no list in it is empty.
    lists: Vec<Arc<PassageWords>>,
    list: usize,
    word: usize,
    started: bool,
    cache: Arc<WordCache>,
}

impl AnswerWords {
    fn next_token(&mut self) -> Token {
        if self.list == self.lists.len() {
            self.list = 0;
            return self.cache.separator.clone();
        }
        let words = &self.lists[self.list];
        let token = if self.started {
            words.words[self.word].clone()
        } else {
            self.started = true;
            words.first.clone()
        };
        self.word += 1;
        if self.word == words.words.len() {
            self.list += 1;
            self.word = 0;
        }
        token
    }
}

/// The exact tokens the sim streams for `prompt`: `n` of them, deterministic.
///
/// Words come from the passages in rank order, with Markdown syntax removed (heading and
/// list markers, emphasis, backticks, link targets, table rules, code fences; a heading
/// gets a full stop so it reads as a sentence). Each token is one word with its leading
/// space, the first without, so concatenating the tokens reads as text. When the words
/// run out before `n`, a `" —"` token follows and the words repeat from the start, as often
/// as needed. With no passages (or none with any words) the words of a fixed sentence,
/// "I found nothing in the corpus about that question.", are used the same way.
///
/// This is what [`SimGenerator`] streams; it keeps each passage's tokens for the next
/// answer, which this function does not.
#[cfg(test)]
fn answer_tokens(prompt: &Prompt, n: u32) -> Vec<Token> {
    let mut words = Arc::new(WordCache::default()).answer(prompt, n as usize);
    (0..n).map(|_| words.next_token()).collect()
}

/// Appends the plain-text words of Markdown `text` to `out` (each as `" word"`), recording
/// each word's end in `ends`.
fn push_plain_words(text: &str, out: &mut String, ends: &mut Vec<usize>) {
    for line in text.lines() {
        let mut line = line.trim();
        if line.starts_with("```") || line.starts_with("~~~") || is_rule(line) {
            continue;
        }
        while let Some(rest) = line.strip_prefix('>') {
            line = rest.trim_start();
        }
        let heading = line.starts_with('#');
        if heading {
            line = line.trim_start_matches('#').trim_start();
            line = line.trim_end_matches('#').trim_end();
        }
        line = strip_list_marker(line);
        let before = ends.len();
        push_inline_words(line, out, ends);
        // A heading runs straight into the next paragraph; a full stop keeps it readable.
        if heading && ends.len() > before && out.ends_with(char::is_alphanumeric) {
            out.push('.');
            if let Some(end) = ends.last_mut() {
                *end = out.len();
            }
        }
    }
}

/// Words of one line with inline Markdown removed: backticks and `*` vanish, `[text](url)`
/// and `![alt](url)` keep only their text, and markup-only words (`|`, `-`, `:---:`) go.
fn push_inline_words(line: &str, out: &mut String, ends: &mut Vec<usize>) {
    let mut word_start = None;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        let content = match c {
            '`' | '*' | '[' => None,
            '!' if chars.peek() == Some(&'[') => None,
            ']' => {
                if chars.peek() == Some(&'(') {
                    skip_link_target(&mut chars);
                }
                None
            }
            c if c.is_whitespace() => {
                finish_word(&mut word_start, out, ends);
                None
            }
            c => Some(c),
        };
        if let Some(c) = content {
            if word_start.is_none() {
                out.push(' ');
                word_start = Some(out.len());
            }
            out.push(c);
        }
    }
    finish_word(&mut word_start, out, ends);
}

/// Skips `(…)` after a link's `]`, allowing nested parentheses inside the URL.
fn skip_link_target(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    let mut depth = 0usize;
    for c in chars.by_ref() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return;
                }
            }
            _ => {}
        }
    }
}

/// Ends the word being built: records it, or drops it (and its space) if it is only markup.
fn finish_word(word_start: &mut Option<usize>, out: &mut String, ends: &mut Vec<usize>) {
    let Some(start) = word_start.take() else {
        return;
    };
    if out[start..]
        .chars()
        .all(|c| matches!(c, '|' | '-' | '+' | '>' | '#' | '=' | '~' | '_' | ':'))
    {
        out.truncate(start - 1);
    } else {
        ends.push(out.len());
    }
}

/// `---`, `***`, `___` (thematic breaks) and `|---|:--:|` (table delimiter rows).
fn is_rule(line: &str) -> bool {
    line.len() >= 3
        && line
            .chars()
            .all(|c| matches!(c, '-' | '*' | '_' | '=' | '|' | ':' | ' '))
}

fn strip_list_marker(line: &str) -> &str {
    for marker in ["- ", "* ", "+ "] {
        if let Some(rest) = line.strip_prefix(marker) {
            return rest.trim_start();
        }
    }
    let digits = line.len() - line.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits > 0 {
        let rest = &line[digits..];
        if let Some(rest) = rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") ")) {
            return rest.trim_start();
        }
    }
    line
}

/// The stream of one simulated answer: `left` tokens, then one usage chunk.
struct SimStream {
    words: AnswerWords,
    /// Tokens still to yield.
    left: u32,
    /// Index of the next token, which fixes its deadline.
    next: u32,
    /// `None` when ttft and interval are both zero: every token is due at once.
    pacing: Option<Pacing>,
    /// Sent after the last token; `None` once sent, which ends the stream.
    usage: Option<Usage>,
}

/// When tokens are due, and the one timer that waits for them.
struct Pacing {
    /// Deadline of token 0 (`start + ttft`); token `i` is due `i * interval` later.
    first: Instant,
    interval: Duration,
    /// Created at the first deadline that is still ahead, then reset, never recreated.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Pacing {
    fn deadline(&self, i: u32) -> Instant {
        match self.interval.checked_mul(i) {
            Some(offset) => later(self.first, offset),
            None => later(self.first, Duration::MAX),
        }
    }

    /// Ready once token `i` is due. A deadline already passed returns at once without
    /// registering a timer, which is how a late consumer catches up.
    fn poll_due(&mut self, i: u32, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline(i);
        if deadline <= Instant::now() {
            return Poll::Ready(());
        }
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        sleep.as_mut().poll(cx)
    }
}

impl Stream for SimStream {
    type Item = Result<Chunk, PipelineError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(this.usage.take().map(|u| Ok(Chunk::Usage(u))));
        }
        if let Some(pacing) = &mut this.pacing {
            ready!(pacing.poll_due(this.next, cx));
        }
        this.next += 1;
        this.left -= 1;
        Poll::Ready(Some(Ok(Chunk::Token(this.words.next_token()))))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.left as usize + usize::from(self.usage.is_some());
        (left, Some(left))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;
    use std::task::Waker;

    use super::*;
    use crate::pipeline::bm25::Bm25Index;
    use crate::pipeline::{Passage, StoredPassage};

    fn passage(id: &str, text: &str) -> Passage {
        Passage::new(StoredPassage::new(id, "T", text), 1.0)
    }

    fn prompt(texts: &[&str]) -> Prompt {
        let passages: Vec<_> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| passage(&format!("p#{i}"), t))
            .collect();
        Prompt {
            query: "q".into(),
            passages: passages.into(),
        }
    }

    fn joined(tokens: &[Token]) -> String {
        tokens.iter().map(Token::text).collect()
    }

    async fn next(s: &mut TokenStream) -> Option<Result<Chunk, PipelineError>> {
        poll_fn(|cx| s.as_mut().poll_next(cx)).await
    }

    /// Polls once with a waker that does nothing: what "ready right now" means.
    fn poll_now(s: &mut TokenStream) -> Poll<Option<Result<Chunk, PipelineError>>> {
        s.as_mut()
            .poll_next(&mut Context::from_waker(Waker::noop()))
    }

    fn unpaced(tokens: u32) -> SimGenerator {
        SimGenerator::new(SimConfig {
            ttft: Duration::ZERO,
            token_interval: Duration::ZERO,
            tokens,
        })
    }

    const SHORT: &str = "The north wind blows over the quiet harbour every winter morning.";

    #[test]
    fn exactly_n_tokens_even_beyond_the_passage_words() {
        let p = prompt(&[SHORT]); // 11 words
        for n in [1, 2, 11, 12, 13, 64, 1000] {
            let t = answer_tokens(&p, n);
            assert_eq!(t.len(), n as usize, "n = {n}");
            assert!(t.iter().all(|t| !t.text().is_empty()));
        }
        assert!(answer_tokens(&p, 0).is_empty());
        assert_eq!(
            joined(&answer_tokens(&p, 14)),
            "The north wind blows over the quiet harbour every winter morning. — The north"
        );
    }

    #[test]
    fn answers_are_deterministic() {
        let p = prompt(&[SHORT, "Second passage here."]);
        assert_eq!(answer_tokens(&p, 40), answer_tokens(&p, 40));
        let texts = |chunks: Vec<Chunk>| -> Vec<String> {
            chunks
                .iter()
                .filter_map(|c| {
                    if let Chunk::Token(t) = c {
                        Some(t.text().to_owned())
                    } else {
                        None
                    }
                })
                .collect()
        };
        let a = texts(collect_now(unpaced(40).generate(p.clone())));
        let b = texts(collect_now(unpaced(40).generate(p)));
        assert_eq!(a.len(), 40);
        assert_eq!(a, b);
    }

    #[test]
    fn tokens_read_as_the_passage_text_in_rank_order() {
        let p = prompt(&[
            "# Heading one\n\nSome **bold** and `code` and a [link](https://x.org/a_(b)) here.\n\n\
             - item *one*\n- item two\n\n| a | b |\n|---|:-:|\n| 1 | 2 |\n\n```sh\ncurl -N x\n```\n> quoted ![alt](i.png) text",
            "---\nSecond passage.",
        ]);
        let t = answer_tokens(&p, 26);
        assert_eq!(t[0].text(), "Heading");
        assert_eq!(t[1].text(), " one.");
        assert_eq!(
            joined(&t),
            "Heading one. Some bold and code and a link here. item one item two a b 1 2 \
             curl -N x quoted alt text Second passage."
        );
    }

    #[test]
    fn no_passages_fall_back_to_a_fixed_sentence() {
        for p in [prompt(&[]), prompt(&["---\n\n```\n```\n| - |"])] {
            let t = answer_tokens(&p, 13);
            assert_eq!(t.len(), 13);
            assert_eq!(
                joined(&t),
                "I found nothing in the corpus about that question. — I found nothing"
            );
        }
    }

    #[test]
    fn multi_byte_text_is_preserved() {
        let text = "naïve café – 日本語 – Ωmega ✓ 🚀";
        let t = answer_tokens(&prompt(&[text]), 8);
        assert_eq!(joined(&t), text);
        assert_eq!(t[3].text(), " 日本語");
        let frame = std::str::from_utf8(t[3].frame()).unwrap();
        assert_eq!(
            frame,
            "data: {\"type\":\"token\",\"token\":\" 日本語\"}\n\n"
        );
    }

    fn tokens_of(chunks: Vec<Chunk>) -> Vec<Token> {
        chunks
            .into_iter()
            .filter_map(|c| match c {
                Chunk::Token(t) => Some(t),
                Chunk::Usage(_) => None,
            })
            .collect()
    }

    #[test]
    fn answers_share_each_passage_s_frames() {
        let sim = unpaced(20);
        let p = prompt(&[SHORT]);
        let first = tokens_of(collect_now(sim.generate(p.clone())));
        let second = tokens_of(collect_now(sim.generate(p.clone())));
        assert_eq!(first, second);
        for (a, b) in first.iter().zip(&second) {
            assert_eq!(
                a.frame().as_ptr(),
                b.frame().as_ptr(),
                "the second answer reuses the first one's frames"
            );
        }
        // After the first token (which has no leading space), a passage's words are
        // slices of one buffer.
        for w in first[1..11].windows(2) {
            let (a, b) = (w[0].frame(), w[1].frame());
            assert_eq!(
                a.as_ptr() as usize + a.len(),
                b.as_ptr() as usize,
                "frames are contiguous"
            );
        }
    }

    /// What the generator streams, from a cold cache and a warm one, is exactly
    /// `answer_tokens`, for prompts of every shape and answers of every length.
    #[test]
    fn the_generator_streams_answer_tokens() {
        let index = Bm25Index::builtin();
        let mut prompts = vec![
            prompt(&[SHORT]),
            prompt(&[SHORT, "Second passage here."]),
            prompt(&["| --- | :-: |", SHORT, "# A heading\nThen text."]),
            prompt(&["```", "---"]),
            prompt(&[]),
        ];
        for q in [
            "how are quotas refunded",
            "what is askstream",
            "sse disconnect",
        ] {
            prompts.push(Prompt {
                query: q.into(),
                passages: Arc::from(index.search(q, 4)),
            });
        }
        for n in [1, 2, 5, 11, 12, 13, 64, 300] {
            let sim = unpaced(n);
            for p in &prompts {
                let expected = answer_tokens(p, n);
                assert_eq!(expected.len(), n as usize);
                for round in ["cold", "warm"] {
                    let got = tokens_of(collect_now(sim.generate(p.clone())));
                    assert_eq!(got, expected, "{round} cache, n = {n}, {:?}", p.passages);
                }
            }
        }
    }

    #[test]
    fn the_cache_is_bounded() {
        let sim = unpaced(3);
        let texts: Vec<String> = (0..CACHED_PASSAGES + 10)
            .map(|i| format!("word{i} and more"))
            .collect();
        for text in &texts {
            let p = prompt(&[text]);
            let got = tokens_of(collect_now(sim.generate(p.clone())));
            assert_eq!(got, answer_tokens(&p, 3));
        }
        let kept = sim.words.passages.lock().unwrap().by_address.len();
        assert_eq!(kept, CACHED_PASSAGES);

        // And by bytes: passages of 100 kB fill the text budget after 20.
        let sim = unpaced(3);
        for i in 0..30 {
            let text = format!("passage{i} ").repeat(12_000);
            assert!(text.len() >= 100_000);
            let p = prompt(&[&text]);
            let got = tokens_of(collect_now(sim.generate(p.clone())));
            assert_eq!(got, answer_tokens(&p, 3));
        }
        let cached = sim.words.passages.lock().unwrap();
        assert!(cached.text_bytes <= CACHED_TEXT_BYTES);
        assert!(cached.by_address.len() < 30, "{}", cached.by_address.len());
    }

    #[test]
    fn builtin_corpus_answer_starts_with_the_top_passage() {
        let index = Bm25Index::builtin();
        let passages = index.search("how are quotas refunded", 4);
        let top = passages[0].stored.text.clone();
        let first_word = top
            .split_whitespace()
            .find(|w| w.chars().any(char::is_alphanumeric));
        let p = Prompt {
            query: "how are quotas refunded".into(),
            passages: Arc::from(passages),
        };
        let t = answer_tokens(&p, 64);
        assert_eq!(t.len(), 64);
        assert_eq!(Some(t[0].text()), first_word);
    }

    /// Drains a stream that must never wait (no pacing), without any runtime: creating a
    /// timer here would panic, which proves unpaced streams never touch it.
    fn collect_now(mut s: TokenStream) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            match poll_now(&mut s) {
                Poll::Ready(Some(Ok(c))) => out.push(c),
                Poll::Ready(None) => return out,
                other => panic!("unpaced stream not ready: {other:?}"),
            }
        }
    }

    #[test]
    fn unpaced_stream_never_waits_and_ends_with_usage() {
        let s = unpaced(100).generate(prompt(&[SHORT]));
        assert_eq!(s.size_hint(), (101, Some(101)));
        let chunks = collect_now(s);
        assert_eq!(chunks.len(), 101);
        let text: String = chunks[..100]
            .iter()
            .map(|c| match c {
                Chunk::Token(t) => t.text(),
                Chunk::Usage(_) => panic!("usage before the last token"),
            })
            .collect();
        assert_eq!(text, joined(&answer_tokens(&prompt(&[SHORT]), 100)));
        match &chunks[100] {
            Chunk::Usage(u) => assert_eq!(
                *u,
                Usage {
                    prompt_tokens: None,
                    completion_tokens: Some(100)
                }
            ),
            Chunk::Token(_) => panic!("the last chunk must be usage"),
        }
    }

    #[test]
    fn ended_stream_stays_ended() {
        let mut s = unpaced(1).generate(prompt(&[SHORT]));
        assert!(matches!(
            poll_now(&mut s),
            Poll::Ready(Some(Ok(Chunk::Token(_))))
        ));
        assert!(matches!(
            poll_now(&mut s),
            Poll::Ready(Some(Ok(Chunk::Usage(_))))
        ));
        assert!(matches!(poll_now(&mut s), Poll::Ready(None)));
        assert!(matches!(poll_now(&mut s), Poll::Ready(None)));
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn paced(ttft: u64, interval: u64, tokens: u32) -> SimGenerator {
        SimGenerator::new(SimConfig {
            ttft: ms(ttft),
            token_interval: ms(interval),
            tokens,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_arrive_at_absolute_deadlines() {
        let start = Instant::now();
        let mut s = paced(150, 20, 10).generate(prompt(&[SHORT]));
        for i in 0..10u64 {
            assert!(matches!(next(&mut s).await, Some(Ok(Chunk::Token(_)))));
            assert_eq!(start.elapsed(), ms(150 + 20 * i), "token {i}");
            // A consumer that takes 7 ms per token is slower than instant but within the
            // interval: every token must still land on its own deadline, no drift.
            tokio::time::sleep(ms(7)).await;
        }
        assert!(matches!(next(&mut s).await, Some(Ok(Chunk::Usage(_)))));
        assert!(next(&mut s).await.is_none());
        assert_eq!(
            start.elapsed(),
            ms(150 + 20 * 9 + 7),
            "usage and end do not wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_consumer_catches_up_without_shifting_later_tokens() {
        let start = Instant::now();
        let mut s = paced(150, 20, 10).generate(prompt(&[SHORT]));
        for _ in 0..3 {
            next(&mut s).await; // tokens 0..=2, the last at 190 ms
        }
        assert_eq!(start.elapsed(), ms(190));
        tokio::time::sleep(ms(75)).await; // now 265 ms: tokens 3, 4, 5 (210, 230, 250) are overdue
        for i in 3..6 {
            let ready = poll_now(&mut s);
            assert!(
                matches!(ready, Poll::Ready(Some(Ok(Chunk::Token(_))))),
                "overdue token {i} is ready at once"
            );
        }
        assert_eq!(start.elapsed(), ms(265));
        // Token 6 keeps its original deadline (270 ms), not "265 + 20".
        assert!(poll_now(&mut s).is_pending());
        next(&mut s).await;
        assert_eq!(start.elapsed(), ms(270));
        next(&mut s).await;
        assert_eq!(start.elapsed(), ms(290));
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_count_from_generate_not_from_the_first_poll() {
        let start = Instant::now();
        let mut s = paced(100, 10, 3).generate(prompt(&[SHORT]));
        tokio::time::sleep(ms(40)).await;
        next(&mut s).await;
        assert_eq!(start.elapsed(), ms(100));
    }

    #[tokio::test(start_paused = true)]
    async fn ttft_only_then_every_token_at_once() {
        let start = Instant::now();
        let mut s = paced(150, 0, 5).generate(prompt(&[SHORT]));
        assert!(poll_now(&mut s).is_pending());
        next(&mut s).await;
        assert_eq!(start.elapsed(), ms(150));
        for _ in 1..5 {
            assert!(matches!(
                poll_now(&mut s),
                Poll::Ready(Some(Ok(Chunk::Token(_))))
            ));
        }
        assert!(matches!(
            poll_now(&mut s),
            Poll::Ready(Some(Ok(Chunk::Usage(_))))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_ttft_paced_stream_starts_immediately() {
        let start = Instant::now();
        let mut s = paced(0, 20, 3).generate(prompt(&[SHORT]));
        assert!(matches!(
            poll_now(&mut s),
            Poll::Ready(Some(Ok(Chunk::Token(_))))
        ));
        next(&mut s).await;
        next(&mut s).await;
        assert_eq!(start.elapsed(), ms(40));
    }
}
