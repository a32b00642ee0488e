//! Incremental Server-Sent Events decoder: the client side of [`crate::wire`].
//!
//! The project's load tool reads thousands of streams at once and timestamps the first
//! `token` event of each, and the integration tests read what the real server sends. Both
//! get bytes in whatever chunks the network delivers, so the decoder is incremental: it
//! [`feed`](Decoder::feed)s chunks that may split a line, a CRLF pair or a UTF-8 character
//! anywhere, and yields an [`Item`] as soon as the line that completes it has arrived.
//!
//! It implements the WHATWG "event stream interpretation" rules (HTML §9.2.6) rather than
//! only the `data: <json>\n\n` shape our server emits, so it can also judge other servers
//! and catch our own server drifting from the format.
//!
//! Three properties matter to its users:
//!
//! - **Cheap**: each byte is searched for a line ending once, however the stream is chunked;
//!   the consumed prefix of the buffer is dropped in amortised O(1); field values go
//!   straight into the [`Event`]'s strings, and comments cost nothing when
//!   [`next_event`](Decoder::next_event) skips them.
//! - **Bounded**: a line longer than the limit is an error even before its end arrives, so a
//!   peer sending endless bytes without a newline cannot make the decoder buffer them all;
//!   and an event whose `data` grows past the event limit is an error as soon as the line
//!   that crosses it arrives, so a peer sending endless `data:` lines without the blank
//!   line that ends an event cannot either.
//! - **Exact**: the output does not depend on where the chunk boundaries fall.

use std::borrow::Cow;
use std::fmt;
use std::mem;

/// The UTF-8 byte order mark, dropped once at the start of a stream.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// The event type from the `event` field; `"message"` when the block did not set one,
    /// as a browser's `EventSource` reports it.
    pub event: String,
    /// The block's `data` lines joined with `'\n'`.
    pub data: String,
    /// The last event ID as of this event. It persists across events until an `id` field
    /// changes it, which is what a reconnecting client sends as `Last-Event-ID`. `None` if
    /// no `id` field has been seen on this stream.
    pub id: Option<String>,
    /// The reconnection time in milliseconds, if this event's block set one.
    pub retry: Option<u64>,
}

/// What the decoder yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A dispatched event: a block of fields ended by a blank line, with at least one `data`.
    Event(Event),
    /// A comment line: the text after the `':'`, without one leading space. Servers send
    /// them as heartbeats (`: keep-alive`), so a client may want to see them.
    Comment(String),
}

/// Why a stream could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A line exceeded the decoder's limit (in bytes, line ending not counted).
    LineTooLong {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The `data` of one event (its `data` lines joined with `'\n'`, in bytes of UTF-8)
    /// exceeded the decoder's event limit.
    EventTooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LineTooLong { limit } => {
                write!(f, "event stream line longer than {limit} bytes")
            }
            Self::EventTooLarge { limit } => {
                write!(f, "event stream event with more than {limit} bytes of data")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// How a stream ended, as reported by [`Decoder::finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eof {
    /// The stream ended between events: nothing was discarded.
    Clean,
    /// Something was discarded: an unterminated line, an event block whose blank line never
    /// came, lines not yet read with [`Decoder::next_item`], or the rest of a stream after
    /// an error. For our server this means the answer was cut off.
    Truncated,
}

/// An incremental event-stream decoder.
///
/// Feed it chunks as they arrive, then call [`next_item`](Self::next_item) or
/// [`next_event`](Self::next_event) until it returns `Ok(None)`; at the end of the stream call
/// [`finish`](Self::finish).
///
/// Memory is bounded by about twice the line limit plus the event limit plus the largest
/// chunk fed, provided items are read between feeds.
///
/// # After an error
/// The errors are a line longer than the line limit and an event whose `data` is larger
/// than the event limit. Both are sticky: the decoder frees its buffer, drops the event
/// being built, ignores further input and returns the same error from every call until
/// [`finish`](Self::finish) resets it for a new stream.
///
/// # Example
/// ```
/// use askstream::sse::decode::{Decoder, Eof};
///
/// let mut decoder = Decoder::new();
/// // A chunk boundary may fall anywhere, even between the CR and LF of one line ending.
/// decoder.feed(b"data: {\"type\":\"token\"}\r");
/// decoder.feed(b"\n\r\n: keep-alive\n\nid: 7\ndata: a\ndata: b\n\n");
///
/// let first = decoder.next_event()?.expect("a complete event");
/// assert_eq!(first.data, r#"{"type":"token"}"#);
/// assert_eq!(first.event, "message");
///
/// // `next_event` skips the comment.
/// let second = decoder.next_event()?.expect("a complete event");
/// assert_eq!(second.data, "a\nb");
/// assert_eq!(second.id.as_deref(), Some("7"));
///
/// assert_eq!(decoder.next_event()?, None);
/// assert_eq!(decoder.finish(), Eof::Clean);
/// # Ok::<(), askstream::sse::decode::DecodeError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Decoder {
    /// Received bytes; `buf[..start]` is consumed and waits for the next compaction.
    buf: Vec<u8>,
    /// Where the next unprocessed line begins.
    start: usize,
    /// How far the current line has been searched for a line ending, so bytes that arrived
    /// in earlier chunks are not searched again.
    scan: usize,
    max_line: usize,
    /// The most bytes of `data` one event may carry (see [`Decoder::with_max_event`]).
    max_event: usize,
    /// No byte has been processed yet, so a BOM may still be dropped (and may still be
    /// arriving one byte at a time).
    at_stream_start: bool,
    /// The last line ended with a CR. A following LF belongs to that line ending, but it may
    /// be in a chunk that has not arrived; waiting for it would delay the line (and, for a
    /// blank line, the event), so the line is processed now and the LF skipped later.
    after_cr: bool,
    /// Set after a line was too long; see the type's `# After an error`.
    failed: Option<DecodeError>,
    /// A field line has been seen since the last blank line, so an end of stream now would
    /// cut an event block short.
    in_block: bool,
    /// The WHATWG data buffer; becomes the next event's `data` without a copy.
    data: String,
    /// The WHATWG event type buffer; empty means `"message"`.
    event_type: String,
    /// The WHATWG last event ID buffer.
    last_event_id: Option<String>,
    /// A `retry` seen in the current block, reported on the event it belongs to.
    block_retry: Option<u64>,
    /// The latest `retry` on the stream, kept even when its block dispatched nothing.
    reconnection_time: Option<u64>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// The default line limit: 1 MiB. Our server's longest line is the `done` event (a few
    /// KiB with its sources); this leaves room for other servers' large payloads while
    /// bounding what one misbehaving stream can make the load tool hold.
    pub const DEFAULT_MAX_LINE: usize = 1 << 20;

    /// The default event limit: 1 MiB of `data` per event, multi-line data included. As
    /// large as the longest line, so any single-line event the line limit lets through
    /// fits; small enough that endless `data:` lines without a blank line cannot grow one
    /// event without bound.
    pub const DEFAULT_MAX_EVENT: usize = 1 << 20;

    /// A decoder for a new stream, with [`DEFAULT_MAX_LINE`](Self::DEFAULT_MAX_LINE) and
    /// [`DEFAULT_MAX_EVENT`](Self::DEFAULT_MAX_EVENT).
    pub fn new() -> Self {
        Self::with_max_line(Self::DEFAULT_MAX_LINE)
    }

    /// A decoder for a new stream that rejects lines longer than `max_line` bytes (line
    /// ending not counted). With 0, only blank lines are accepted.
    ///
    /// Its event limit is [`DEFAULT_MAX_EVENT`](Self::DEFAULT_MAX_EVENT), or `max_line` if
    /// that is larger, so every event of one line within the line limit fits; change it
    /// with [`with_max_event`](Self::with_max_event).
    pub fn with_max_line(max_line: usize) -> Self {
        Self::with_limits(max_line, max_line.max(Self::DEFAULT_MAX_EVENT))
    }

    /// The same decoder with an event limit of `max_event`: an event whose `data` (its
    /// `data` lines joined with `'\n'`, counted in bytes of UTF-8 after decoding) would be
    /// longer than `max_event` bytes is [`DecodeError::EventTooLarge`], reported as soon as
    /// the `data` line that crosses the limit has arrived, without waiting for the blank
    /// line that would end the event. With 0, only events with empty data are accepted.
    ///
    /// Meant to be called on a new decoder, before anything is fed.
    #[must_use]
    pub fn with_max_event(mut self, max_event: usize) -> Self {
        self.max_event = max_event;
        self
    }

    /// The line limit, in bytes.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// The event limit, in bytes of `data`.
    pub fn max_event(&self) -> usize {
        self.max_event
    }

    fn with_limits(max_line: usize, max_event: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            scan: 0,
            max_line,
            max_event,
            at_stream_start: true,
            after_cr: false,
            failed: None,
            in_block: false,
            data: String::new(),
            event_type: String::new(),
            last_event_id: None,
            block_retry: None,
            reconnection_time: None,
        }
    }

    /// Appends the next bytes of the stream. A chunk may end anywhere: inside a line, a
    /// UTF-8 character, a BOM or between the CR and LF of a line ending.
    ///
    /// Ignored after an error, so a peer cannot grow the buffer of a failed decoder.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.failed.is_some() || chunk.is_empty() {
            return;
        }
        self.compact();
        self.buf.extend_from_slice(chunk);
    }

    /// The next event or comment, or `Ok(None)` when more bytes are needed.
    ///
    /// # Errors
    /// [`DecodeError::LineTooLong`] when a line is, or is about to be, longer than the line
    /// limit; [`DecodeError::EventTooLarge`] when a `data` line makes the event's data
    /// longer than the event limit. The decoder then stays failed (see the type's
    /// `# After an error`).
    pub fn next_item(&mut self) -> Result<Option<Item>, DecodeError> {
        self.next_inner(true)
    }

    /// The next event, skipping comments (without allocating for them), or `Ok(None)` when
    /// more bytes are needed.
    ///
    /// # Errors
    /// As [`next_item`](Self::next_item).
    pub fn next_event(&mut self) -> Result<Option<Event>, DecodeError> {
        loop {
            match self.next_inner(false)? {
                Some(Item::Event(event)) => return Ok(Some(event)),
                // Not produced with comments off; skipping keeps this correct regardless.
                Some(Item::Comment(_)) => {}
                None => return Ok(None),
            }
        }
    }

    /// Ends the stream and resets the decoder for a new one (keeping its limits and buffer
    /// capacity).
    ///
    /// As the WHATWG rules require, an event whose blank line never arrived is not an event:
    /// it is discarded, and the return value says whether anything was. Read items with
    /// [`next_item`](Self::next_item) until `Ok(None)` first, or the lines still buffered
    /// are discarded too.
    pub fn finish(&mut self) -> Eof {
        let truncated = self.failed.is_some() || self.in_block || self.start < self.buf.len();
        let mut buf = mem::take(&mut self.buf);
        buf.clear();
        *self = Self {
            buf,
            ..Self::with_limits(self.max_line, self.max_event)
        };
        if truncated {
            Eof::Truncated
        } else {
            Eof::Clean
        }
    }

    /// The last event ID buffer: what a reconnecting client would send as `Last-Event-ID`.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// The latest valid `retry` value on this stream, in milliseconds, including one from a
    /// block that dispatched no event (and so appears on no [`Event`]).
    pub fn reconnection_time(&self) -> Option<u64> {
        self.reconnection_time
    }

    /// Drops the consumed prefix when doing so is cheap: at once when everything was
    /// consumed (the usual case, chunks holding whole events), otherwise only when the bytes
    /// to move are no more than those consumed, which keeps the cost amortised O(1) per byte.
    fn compact(&mut self) {
        if self.start > 0 && self.start >= self.buf.len() - self.start {
            self.buf.drain(..self.start);
            self.scan -= self.start;
            self.start = 0;
        }
    }

    fn next_inner(&mut self, comments: bool) -> Result<Option<Item>, DecodeError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        loop {
            if self.at_stream_start && !self.skip_bom() {
                return Ok(None);
            }
            if self.after_cr {
                let Some(&byte) = self.buf.get(self.start) else {
                    return Ok(None);
                };
                if byte == b'\n' {
                    self.start += 1;
                    self.scan = self.start;
                }
                self.after_cr = false;
            }
            let Some(end) = self.find_line_end() else {
                if self.buf.len() - self.start > self.max_line {
                    return Err(self.line_too_long());
                }
                return Ok(None);
            };
            if end - self.start > self.max_line {
                return Err(self.line_too_long());
            }
            let line_start = self.start;
            self.after_cr = self.buf[end] == b'\r';
            self.start = end + 1;
            self.scan = self.start;
            match self.process_line(line_start, end, comments) {
                Ok(Some(item)) => return Ok(Some(item)),
                Ok(None) => {}
                Err(err) => return Err(self.fail(err)),
            }
        }
    }

    /// Drops a BOM at the start of the stream. Returns false while the bytes so far are a
    /// proper prefix of a BOM, since only the next byte can tell.
    fn skip_bom(&mut self) -> bool {
        let pending = &self.buf[self.start..];
        let n = pending.len().min(BOM.len());
        if pending[..n] != BOM[..n] {
            self.at_stream_start = false;
            return true;
        }
        if n < BOM.len() {
            return false;
        }
        self.start += BOM.len();
        self.scan = self.start;
        self.at_stream_start = false;
        true
    }

    /// The index of the CR or LF ending the current line, if it has arrived.
    fn find_line_end(&mut self) -> Option<usize> {
        let from = self.scan;
        // memchr searches a vector's width at a time: a frame's line is tens of bytes, and
        // this search was the decoder's largest cost in the load tool.
        match memchr::memchr2(b'\n', b'\r', &self.buf[from..]) {
            Some(i) => Some(from + i),
            None => {
                self.scan = self.buf.len();
                None
            }
        }
    }

    /// Applies one line (`buf[start..end]`, ending excluded) to the event being built.
    /// Fails only when a `data` line would make the event larger than the event limit.
    fn process_line(
        &mut self,
        start: usize,
        end: usize,
        comments: bool,
    ) -> Result<Option<Item>, DecodeError> {
        let line = &self.buf[start..end];
        if line.is_empty() {
            return Ok(self.dispatch().map(Item::Event));
        }
        if line[0] == b':' {
            if !comments {
                return Ok(None);
            }
            let text = lossy(strip_space(&line[1..])).into_owned();
            return Ok(Some(Item::Comment(text)));
        }
        self.in_block = true;
        // ':' is ASCII, so splitting before decoding cannot cut a character: the result is
        // the same as decoding the whole stream first, as the spec does.
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => (&line[..colon], strip_space(&line[colon + 1..])),
            None => (line, &[][..]),
        };
        match name {
            b"data" => {
                let value = lossy(value);
                // `data` holds each earlier line plus its '\n' separator, so this is the
                // length the event's data would have if the block ended after this line.
                if self.data.len() + value.len() > self.max_event {
                    return Err(DecodeError::EventTooLarge {
                        limit: self.max_event,
                    });
                }
                self.data.push_str(&value);
                self.data.push('\n');
            }
            b"event" => {
                self.event_type.clear();
                self.event_type.push_str(&lossy(value));
            }
            // A NUL could never be sent back in a `Last-Event-ID` header.
            b"id" if !value.contains(&0) => {
                let id = self.last_event_id.get_or_insert_with(String::new);
                id.clear();
                id.push_str(&lossy(value));
            }
            b"retry" => {
                if let Some(ms) = parse_retry(value) {
                    self.block_retry = Some(ms);
                    self.reconnection_time = Some(ms);
                }
            }
            _ => {}
        }
        Ok(None)
    }

    /// A blank line: the event built so far, if it has data; the block's buffers are reset
    /// either way (except the last event ID, which persists by design).
    fn dispatch(&mut self) -> Option<Event> {
        self.in_block = false;
        let retry = self.block_retry.take();
        if self.data.is_empty() {
            self.event_type.clear();
            return None;
        }
        // Every data line appended a '\n'; the spec removes the last one.
        self.data.pop();
        let event = if self.event_type.is_empty() {
            String::from("message")
        } else {
            mem::take(&mut self.event_type)
        };
        Some(Event {
            event,
            data: mem::take(&mut self.data),
            id: self.last_event_id.clone(),
            retry,
        })
    }

    fn line_too_long(&mut self) -> DecodeError {
        self.fail(DecodeError::LineTooLong {
            limit: self.max_line,
        })
    }

    /// Records `err` and frees the buffer and the event being built; they are meaningless
    /// after a lost line or an event cut short.
    fn fail(&mut self, err: DecodeError) -> DecodeError {
        self.failed = Some(err.clone());
        self.buf = Vec::new();
        self.start = 0;
        self.scan = 0;
        self.data = String::new();
        self.event_type.clear();
        self.block_retry = None;
        err
    }
}

/// Removes the one space the format allows after a colon.
fn strip_space(value: &[u8]) -> &[u8] {
    value.strip_prefix(b" ").unwrap_or(value)
}

/// Decodes UTF-8 with U+FFFD for invalid sequences, borrowing (not allocating) when valid.
fn lossy(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// A `retry` value: ASCII digits only, at least one. Values beyond `u64` saturate, since
/// "wait practically forever" is what such a server means.
fn parse_retry(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0u64, |acc, &d| {
        acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `input` cut at `cuts` (sorted positions), reading items after each chunk and
    /// stopping at the first error, then finishes.
    fn run(input: &[u8], cuts: &[usize], max_line: usize) -> (Vec<Item>, Option<DecodeError>, Eof) {
        run_with(Decoder::with_max_line(max_line), input, cuts)
    }

    /// [`run`] with a decoder of the caller's choosing.
    fn run_with(
        mut decoder: Decoder,
        input: &[u8],
        cuts: &[usize],
    ) -> (Vec<Item>, Option<DecodeError>, Eof) {
        let mut items = Vec::new();
        let mut error = None;
        let mut from = 0;
        'chunks: for &to in cuts.iter().chain([&input.len()]) {
            decoder.feed(&input[from..to]);
            from = to;
            loop {
                match decoder.next_item() {
                    Ok(Some(item)) => items.push(item),
                    Ok(None) => break,
                    Err(err) => {
                        error = Some(err);
                        break 'chunks;
                    }
                }
            }
        }
        let eof = decoder.finish();
        (items, error, eof)
    }

    /// The items of `input` fed as the given chunks, with the default limit.
    fn chunked(chunks: &[&[u8]]) -> Vec<Item> {
        let mut decoder = Decoder::new();
        let mut items = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk);
            while let Some(item) = decoder.next_item().unwrap() {
                items.push(item);
            }
        }
        items
    }

    fn items(input: &[u8]) -> Vec<Item> {
        chunked(&[input])
    }

    fn datas(input: &[u8]) -> Vec<String> {
        items(input)
            .into_iter()
            .filter_map(|item| match item {
                Item::Event(e) => Some(e.data),
                Item::Comment(_) => None,
            })
            .collect()
    }

    fn message(data: &str) -> Item {
        Item::Event(Event {
            event: "message".into(),
            data: data.into(),
            id: None,
            retry: None,
        })
    }

    /// Every two-chunk split and byte-at-a-time feeding give the same as one chunk.
    fn assert_split_invariant(input: &[u8]) {
        let whole = run(input, &[], Decoder::DEFAULT_MAX_LINE);
        for cut in 0..=input.len() {
            assert_eq!(
                run(input, &[cut], Decoder::DEFAULT_MAX_LINE),
                whole,
                "cut {cut}"
            );
        }
        let bytes: Vec<usize> = (1..input.len()).collect();
        assert_eq!(run(input, &bytes, Decoder::DEFAULT_MAX_LINE), whole);
    }

    #[test]
    fn bom_is_dropped_at_stream_start() {
        assert_eq!(items(b"\xEF\xBB\xBFdata: x\n\n"), [message("x")]);
    }

    #[test]
    fn bom_split_across_chunks_is_dropped() {
        assert_eq!(
            chunked(&[b"\xEF", b"\xBB", b"\xBFdata: x\n\n"]),
            [message("x")]
        );
        assert_split_invariant(b"\xEF\xBB\xBFdata: x\n\n");
    }

    #[test]
    fn bom_is_dropped_only_once() {
        // The second BOM becomes part of the field name "\u{FEFF}data", an unknown field.
        assert_eq!(items(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n"), []);
    }

    #[test]
    fn bom_is_dropped_only_at_start() {
        assert_eq!(
            items(b"data: a\n\n\xEF\xBB\xBFdata: b\n\ndata: \xEF\xBB\xBFc\n\n"),
            [message("a"), message("\u{FEFF}c")]
        );
    }

    #[test]
    fn bom_prefix_that_is_not_a_bom_is_content() {
        let mut decoder = Decoder::new();
        decoder.feed(b"\xEF\xBB");
        assert_eq!(decoder.next_item(), Ok(None));
        decoder.feed(b"x\n");
        assert_eq!(decoder.next_item(), Ok(None));
        assert_eq!(
            decoder.finish(),
            Eof::Truncated,
            "an unknown field started a block"
        );
    }

    #[test]
    fn lf_cr_and_crlf_all_end_lines() {
        assert_eq!(
            datas(b"data: a\ndata: b\rdata: c\r\ndata: d\n\n"),
            ["a\nb\nc\nd"]
        );
        for input in [
            &b"data: x\n\n"[..],
            b"data: x\r\r",
            b"data: x\r\n\r\n",
            b"data: x\r\n\n",
            b"data: x\n\r",
        ] {
            assert_eq!(items(input), [message("x")], "{input:?}");
        }
        // CR CR LF is a CR line ending then a CRLF blank line, not two blank lines.
        assert_eq!(datas(b"data: x\r\r\ndata: y\r\n\r\n"), ["x", "y"]);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_ending() {
        // Were the LF a second line ending, "a" would be dispatched alone.
        assert_eq!(
            chunked(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]),
            [message("a\nb")]
        );
        assert_split_invariant(b"data: a\r\ndata: b\r\n\r\ndata: c\r\r\n\r\n");
    }

    #[test]
    fn event_ending_in_cr_is_dispatched_without_waiting_for_next_chunk() {
        let mut decoder = Decoder::new();
        decoder.feed(b"data: a\r\r");
        assert_eq!(decoder.next_item(), Ok(Some(message("a"))));
        decoder.feed(b"\ndata: b\n\n");
        assert_eq!(decoder.next_item(), Ok(Some(message("b"))));
    }

    #[test]
    fn multi_line_data_is_joined_with_lf() {
        assert_eq!(datas(b"data: a\ndata:\ndata: c\n\n"), ["a\n\nc"]);
        assert_eq!(datas(b"data\ndata\n\n"), ["\n"]);
    }

    #[test]
    fn comments_are_items_and_next_event_skips_them() {
        assert_eq!(
            items(b": keep-alive\n:no space\n:  two\n:\n:a: b\n"),
            [
                Item::Comment("keep-alive".into()),
                Item::Comment("no space".into()),
                Item::Comment(" two".into()),
                Item::Comment(String::new()),
                Item::Comment("a: b".into()),
            ]
        );
        let mut decoder = Decoder::new();
        decoder.feed(b": hi\ndata: x\n: inside\n\n: after\n\n");
        assert_eq!(
            decoder.next_event(),
            Ok(Some(Event {
                event: "message".into(),
                data: "x".into(),
                ..Event::default()
            }))
        );
        assert_eq!(decoder.next_event(), Ok(None));
        assert_eq!(decoder.finish(), Eof::Clean);
    }

    #[test]
    fn field_without_colon_has_empty_value() {
        assert_eq!(datas(b"data\n\n"), [""]);
        assert_eq!(
            items(b"event: add\nevent\ndata: x\n\n"),
            [message("x")],
            "a bare `event` sets the type to empty, i.e. message"
        );
        assert_eq!(
            items(b"id\ndata: x\n\n"),
            [Item::Event(Event {
                event: "message".into(),
                data: "x".into(),
                id: Some(String::new()),
                retry: None,
            })]
        );
    }

    #[test]
    fn one_space_after_colon_is_removed() {
        assert_eq!(datas(b"data:x\n\n"), ["x"]);
        assert_eq!(datas(b"data: x\n\n"), ["x"]);
        assert_eq!(datas(b"data:  two spaces\n\n"), [" two spaces"]);
        assert_eq!(datas(b"data:\tx\n\n"), ["\tx"], "only a space is removed");
        assert_eq!(
            datas(b"data: a:b: c\n\n"),
            ["a:b: c"],
            "the first colon splits"
        );
        assert_eq!(datas(b"data: x \n\n"), ["x "], "trailing spaces are kept");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert_eq!(
            items(b"foo: bar\nDATA: x\ndata : y\n data: z\ndatum: w\n\n"),
            []
        );
        assert_eq!(datas(b"foo: bar\ndata: x\nbaz\n\n"), ["x"]);
    }

    #[test]
    fn event_type_is_set_and_reset_by_blank_lines() {
        let got = items(b"event: add\ndata: 1\n\ndata: 2\n\nevent: lost\n\ndata: 3\n\n");
        let types: Vec<_> = got
            .iter()
            .map(|item| match item {
                Item::Event(e) => e.event.as_str(),
                Item::Comment(_) => "comment",
            })
            .collect();
        assert_eq!(types, ["add", "message", "message"]);
    }

    #[test]
    fn id_persists_and_an_id_with_nul_is_ignored() {
        let ids: Vec<_> = items(
            b"id: 1\ndata: a\n\ndata: b\n\nid: 2\0x\ndata: c\n\nid: 3\n\ndata: d\n\nid:\ndata: e\n\n",
        )
        .into_iter()
        .map(|item| match item {
            Item::Event(e) => e.id,
            Item::Comment(_) => unreachable!(),
        })
        .collect();
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(ids, [some("1"), some("1"), some("1"), some("3"), some("")]);
        assert_eq!(items(b"data: x\n\n"), [message("x")], "None before any id");

        let mut decoder = Decoder::new();
        decoder.feed(b"id: 9\n\n");
        assert_eq!(decoder.next_item(), Ok(None));
        assert_eq!(decoder.last_event_id(), Some("9"));
    }

    #[test]
    fn retry_needs_ascii_digits_only() {
        let retry_of = |input: &[u8]| match items(input).as_slice() {
            [Item::Event(e)] => e.retry,
            other => panic!("{other:?}"),
        };
        assert_eq!(retry_of(b"retry: 1500\ndata: x\n\n"), Some(1500));
        assert_eq!(retry_of(b"retry:0\ndata: x\n\n"), Some(0));
        for bad in ["15x", "-1", "1.5", " 15", "15 ", "+3", "", "\u{0661}"] {
            let input = format!("retry: {bad}\ndata: x\n\n");
            assert_eq!(retry_of(input.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(retry_of(b"retry\ndata: x\n\n"), None);
        assert_eq!(
            retry_of(b"retry: 99999999999999999999999\ndata: x\n\n"),
            Some(u64::MAX),
            "saturates"
        );
        assert_eq!(
            retry_of(b"retry: 1\nretry: x\ndata: x\n\n"),
            Some(1),
            "an invalid retry leaves the earlier one"
        );
    }

    #[test]
    fn retry_belongs_to_its_block_but_the_stream_remembers_it() {
        let mut decoder = Decoder::new();
        decoder.feed(b"retry: 10\n\ndata: a\n\nretry: 20\ndata: b\n\ndata: c\n\n");
        let retries: Vec<_> =
            std::iter::from_fn(|| decoder.next_event().unwrap().map(|e| e.retry)).collect();
        assert_eq!(retries, [None, Some(20), None]);
        assert_eq!(decoder.reconnection_time(), Some(20));
    }

    #[test]
    fn blocks_without_data_are_not_dispatched() {
        assert_eq!(items(b"\n\n\r\n\r"), []);
        assert_eq!(items(b"event: x\n\nid: 1\n\nretry: 5\n\nfoo\n\n"), []);
        assert_eq!(
            items(b": c\n\n"),
            [Item::Comment("c".into())],
            "a comment is not an event"
        );
        assert_eq!(datas(b"data:\n\n"), [""], "an empty data line is data");
    }

    #[test]
    fn finish_discards_a_partial_event_and_resets() {
        let mut decoder = Decoder::new();
        decoder.feed(b"event: e\nid: 1\ndata: partial\n");
        assert_eq!(decoder.next_item(), Ok(None));
        assert_eq!(decoder.finish(), Eof::Truncated);
        // A fresh stream: no type, id or data carried over, and a BOM is dropped again.
        decoder.feed(b"\xEF\xBB\xBFdata: x\n\n");
        assert_eq!(decoder.next_item(), Ok(Some(message("x"))));
        assert_eq!(decoder.finish(), Eof::Clean);

        decoder.feed(b"data: unterminated");
        assert_eq!(decoder.next_item(), Ok(None));
        assert_eq!(decoder.finish(), Eof::Truncated);

        decoder.feed(b"data: unread\n\n");
        assert_eq!(
            decoder.finish(),
            Eof::Truncated,
            "unread lines are discarded"
        );

        decoder.feed(b"data: x\n\n: trailing comment\n");
        while decoder.next_item().unwrap().is_some() {}
        assert_eq!(decoder.finish(), Eof::Clean);
        assert_eq!(decoder.finish(), Eof::Clean, "an empty stream is clean");
    }

    #[test]
    fn line_too_long_with_terminator() {
        let mut decoder = Decoder::with_max_line(8);
        decoder.feed(b"data: 12\r\ndata: 12\n\ndata: 123\n\n");
        assert_eq!(
            decoder.next_item(),
            Ok(Some(message("12\n12"))),
            "8 bytes fit"
        );
        let err = DecodeError::LineTooLong { limit: 8 };
        assert_eq!(decoder.next_item(), Err(err.clone()));
        assert_eq!(decoder.next_item(), Err(err.clone()), "the error is sticky");
        assert_eq!(decoder.next_event(), Err(err));
        assert_eq!(decoder.finish(), Eof::Truncated);
        decoder.feed(b"data: ok\n\n");
        assert_eq!(
            decoder.next_item(),
            Ok(Some(message("ok"))),
            "usable after finish"
        );
    }

    #[test]
    fn line_too_long_without_terminator_keeps_memory_bounded() {
        let mut decoder = Decoder::with_max_line(64);
        decoder.feed(&[b'a'; 64]);
        assert_eq!(
            decoder.next_item(),
            Ok(None),
            "64 bytes may still be a valid line"
        );
        decoder.feed(b"a");
        assert_eq!(
            decoder.next_item(),
            Err(DecodeError::LineTooLong { limit: 64 })
        );
        for _ in 0..1000 {
            decoder.feed(&[b'a'; 1024]);
        }
        assert!(
            decoder.buf.capacity() < 1024,
            "a failed decoder buffers nothing"
        );
        assert_eq!(decoder.finish(), Eof::Truncated);
    }

    #[test]
    fn zero_limit_accepts_only_blank_lines() {
        let mut decoder = Decoder::with_max_line(0);
        decoder.feed(b"\n\r\n");
        assert_eq!(decoder.next_item(), Ok(None));
        decoder.feed(b":");
        assert!(decoder.next_item().is_err());
    }

    #[test]
    fn error_message_names_the_limit() {
        let err = DecodeError::LineTooLong { limit: 10 };
        assert_eq!(err.to_string(), "event stream line longer than 10 bytes");
        let _: &dyn std::error::Error = &err;
        assert_eq!(
            DecodeError::EventTooLarge { limit: 10 }.to_string(),
            "event stream event with more than 10 bytes of data"
        );
    }

    #[test]
    fn the_event_limit_defaults_to_1_mib_and_covers_the_longest_line() {
        let d = Decoder::new();
        assert_eq!((d.max_line(), d.max_event()), (1 << 20, 1 << 20));
        assert_eq!(
            Decoder::with_max_line(8).max_event(),
            Decoder::DEFAULT_MAX_EVENT
        );
        assert_eq!(Decoder::with_max_line(4 << 20).max_event(), 4 << 20);
        assert_eq!(Decoder::new().with_max_event(7).max_event(), 7);
        assert_eq!(Decoder::new().with_max_event(7).max_line(), 1 << 20);
    }

    #[test]
    fn multi_line_data_is_limited_as_a_whole() {
        // "12\n34" is 5 bytes of data: it fits a limit of 5, not of 4.
        let input = b"data: 12\ndata: 34\n\n";
        let fits = run_with(Decoder::new().with_max_event(5), input, &[]);
        assert_eq!(fits, (vec![message("12\n34")], None, Eof::Clean));
        let err = DecodeError::EventTooLarge { limit: 4 };
        let too_big = run_with(Decoder::new().with_max_event(4), input, &[]);
        assert_eq!(too_big, (vec![], Some(err), Eof::Truncated));
        // Each event is measured alone: the limit does not add up across events.
        let many = run_with(
            Decoder::new().with_max_event(2),
            b"data: ab\n\ndata: cd\n\ndata\ndata\ndata\n\n",
            &[],
        );
        assert_eq!(
            many,
            (
                vec![message("ab"), message("cd"), message("\n\n")],
                None,
                Eof::Clean
            )
        );
        // Other fields and comments do not count.
        let others = run_with(
            Decoder::new().with_max_event(1),
            b"event: long-type\nid: long-id\n: a long comment\nfoo: bar\ndata: x\n\n",
            &[],
        );
        assert_eq!(others.1, None);
        // Decoded size: an invalid byte becomes a 3-byte U+FFFD.
        let lossy = run_with(Decoder::new().with_max_event(2), b"data: \xFF\n\n", &[]);
        assert_eq!(lossy.1, Some(DecodeError::EventTooLarge { limit: 2 }));
        assert_eq!(
            run_with(
                Decoder::new().with_max_event(0),
                b"data\n\ndata: x\n\n",
                &[]
            )
            .1,
            Some(DecodeError::EventTooLarge { limit: 0 }),
            "0 accepts empty data only"
        );
    }

    #[test]
    fn an_event_too_large_is_reported_before_its_blank_line_and_is_sticky() {
        let mut decoder = Decoder::new().with_max_event(10);
        decoder.feed(b"data: 12345\ndata: 1234\n");
        assert_eq!(decoder.next_item(), Ok(None), "exactly 10 bytes so far");
        decoder.feed(b"data: x");
        assert_eq!(decoder.next_item(), Ok(None), "the line has not ended");
        decoder.feed(b"\n");
        let err = DecodeError::EventTooLarge { limit: 10 };
        assert_eq!(
            decoder.next_item(),
            Err(err.clone()),
            "no blank line needed"
        );
        decoder.feed(b"\n\ndata: more\n\n");
        assert_eq!(
            decoder.next_event(),
            Err(err.clone()),
            "the error is sticky"
        );
        assert_eq!(decoder.next_item(), Err(err));
        assert_eq!(decoder.finish(), Eof::Truncated);
        // `finish` keeps the limit for the next stream.
        assert_eq!(decoder.max_event(), 10);
        decoder.feed(b"data: ok\n\ndata: 12345678901\n");
        assert_eq!(decoder.next_item(), Ok(Some(message("ok"))));
        assert_eq!(
            decoder.next_item(),
            Err(DecodeError::EventTooLarge { limit: 10 })
        );
    }

    #[test]
    fn endless_data_lines_keep_memory_bounded() {
        let mut decoder = Decoder::new().with_max_event(64 * 1024);
        let line = format!("data: {}\n", "a".repeat(1000));
        let mut error = None;
        for _ in 0..1000 {
            decoder.feed(line.as_bytes());
            if let Err(e) = decoder.next_item() {
                error = Some(e);
                break;
            }
        }
        assert_eq!(error, Some(DecodeError::EventTooLarge { limit: 64 * 1024 }));
        for _ in 0..1000 {
            decoder.feed(line.as_bytes());
        }
        assert!(
            decoder.buf.capacity() < 1024 && decoder.data.capacity() == 0,
            "a failed decoder holds nothing"
        );
    }

    #[test]
    fn multibyte_utf8_split_across_chunks_survives() {
        let input = "event: é\ndata: €😀\n: ü\n\n".as_bytes();
        assert_eq!(
            items(input),
            [
                Item::Comment("ü".into()),
                Item::Event(Event {
                    event: "é".into(),
                    data: "€😀".into(),
                    ..Event::default()
                }),
            ]
        );
        assert_split_invariant(input);
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters() {
        assert_eq!(
            items(b"event: \xFFe\ndata: a\xFFb\xE2\x82\ndata: \xF0\x9F\n:\xC3\n\n"),
            [
                Item::Comment("\u{FFFD}".into()),
                Item::Event(Event {
                    event: "\u{FFFD}e".into(),
                    data: "a\u{FFFD}b\u{FFFD}\n\u{FFFD}".into(),
                    ..Event::default()
                }),
            ]
        );
        // A truncated sequence before a line ending does not swallow the ending.
        assert_split_invariant(b"data: \xE2\x82\r\ndata: \xF0\r\n\r\n");
    }

    #[test]
    fn buffer_is_compacted_while_streaming() {
        let mut decoder = Decoder::new();
        let frame = b"data: {\"type\":\"token\",\"token\":\"word\"}\n\n";
        for _ in 0..10_000 {
            // Chunks that cut events in two, so the buffer is rarely empty at a feed.
            for half in frame.chunks(frame.len() / 2 + 3) {
                decoder.feed(half);
                while decoder.next_event().unwrap().is_some() {}
            }
        }
        assert!(
            decoder.buf.capacity() <= 4 * frame.len(),
            "{}",
            decoder.buf.capacity()
        );
    }

    // ---- Property tests --------------------------------------------------------------

    /// One generated line, before encoding.
    #[derive(Clone, Debug)]
    enum Line {
        Data(String),
        Event(String),
        Id(String),
        Retry(String),
        Comment(String),
        Unknown(&'static str, String),
        /// A field name alone, no colon.
        Bare(&'static str),
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Ending {
        Lf,
        Cr,
        CrLf,
    }

    /// A line with its encoding choices: line ending, and a space after the colon or not.
    type Encoded<L> = (L, Ending, bool);

    #[derive(Clone, Debug)]
    struct Stream {
        bom: bool,
        /// Each block is its lines, then the ending of the blank line that dispatches it.
        blocks: Vec<(Vec<Encoded<Line>>, Ending)>,
        /// Field lines after the last blank line: an event cut off by the end of stream.
        tail: Vec<Encoded<Line>>,
        /// Whether the tail's last line has its line ending.
        tail_terminated: bool,
    }

    /// Characters that stress the rules: separators, NUL, multi-byte, a BOM character.
    fn text() -> impl Strategy<Value = String> {
        let alphabet = [
            'a', 'Z', '7', ' ', ':', '\0', '\t', 'é', '€', '😀', '\u{FEFF}',
        ];
        prop::collection::vec(prop::sample::select(alphabet.to_vec()), 0..6)
            .prop_map(|chars| chars.into_iter().collect())
    }

    fn retry_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<u32>().prop_map(|n| n.to_string()),
            prop::sample::select(&["", "15x", " 1", "-1", "99999999999999999999999"][..])
                .prop_map(String::from),
            text(),
        ]
    }

    fn field_line() -> impl Strategy<Value = Line> {
        prop_oneof![
            3 => text().prop_map(Line::Data),
            1 => text().prop_map(Line::Event),
            1 => text().prop_map(Line::Id),
            1 => retry_value().prop_map(Line::Retry),
            1 => (prop::sample::select(&["foo", "Data", "dat", "datas", " data", "ID"][..]), text())
                .prop_map(|(name, value)| Line::Unknown(name, value)),
            1 => prop::sample::select(&["data", "event", "id", "retry", "foo"][..]).prop_map(Line::Bare),
        ]
    }

    fn any_line() -> impl Strategy<Value = Line> {
        prop_oneof![4 => field_line(), 1 => text().prop_map(Line::Comment)]
    }

    fn ending() -> impl Strategy<Value = Ending> {
        prop::sample::select(&[Ending::Lf, Ending::Cr, Ending::CrLf][..])
    }

    fn encoded<L: std::fmt::Debug>(
        line: impl Strategy<Value = L>,
    ) -> impl Strategy<Value = Encoded<L>> {
        (line, ending(), any::<bool>())
    }

    fn stream() -> impl Strategy<Value = Stream> {
        let block = (prop::collection::vec(encoded(any_line()), 0..4), ending());
        (
            any::<bool>(),
            prop::collection::vec(block, 0..6),
            prop::collection::vec(encoded(field_line()), 0..3),
            any::<bool>(),
        )
            .prop_map(|(bom, blocks, tail, tail_terminated)| Stream {
                bom,
                blocks,
                tail,
                tail_terminated,
            })
    }

    fn render(line: &Line, space: bool) -> String {
        let field = |name: &str, value: &str| {
            // Without the space, a value starting with one would lose it.
            let sep = if space || value.starts_with(' ') {
                ": "
            } else {
                ":"
            };
            format!("{name}{sep}{value}")
        };
        match line {
            Line::Data(v) => field("data", v),
            Line::Event(v) => field("event", v),
            Line::Id(v) => field("id", v),
            Line::Retry(v) => field("retry", v),
            Line::Comment(v) => field("", v),
            Line::Unknown(name, v) => field(name, v),
            Line::Bare(name) => (*name).to_owned(),
        }
    }

    /// Writes lines, keeping a CR ending from merging with a following blank line's LF.
    struct Writer {
        out: Vec<u8>,
        after_cr: bool,
    }

    impl Writer {
        fn line(&mut self, content: &str, ending: Ending) {
            self.content(content);
            self.ending(content, ending);
        }

        fn content(&mut self, content: &str) {
            self.out.extend_from_slice(content.as_bytes());
        }

        fn ending(&mut self, content: &str, ending: Ending) {
            let ending = if content.is_empty() && self.after_cr && ending == Ending::Lf {
                Ending::CrLf
            } else {
                ending
            };
            self.out.extend_from_slice(match ending {
                Ending::Lf => b"\n",
                Ending::Cr => b"\r",
                Ending::CrLf => b"\r\n",
            });
            self.after_cr = ending == Ending::Cr;
        }
    }

    fn encode(stream: &Stream) -> Vec<u8> {
        let mut w = Writer {
            out: Vec::new(),
            after_cr: false,
        };
        if stream.bom {
            w.out.extend_from_slice(BOM);
        }
        for (lines, blank) in &stream.blocks {
            for (line, ending, space) in lines {
                w.line(&render(line, *space), *ending);
            }
            w.line("", *blank);
        }
        for (i, (line, ending, space)) in stream.tail.iter().enumerate() {
            let content = render(line, *space);
            w.content(&content);
            if i + 1 < stream.tail.len() || stream.tail_terminated {
                w.ending(&content, *ending);
            }
        }
        w.out
    }

    /// The items and end a conforming decoder must produce, computed from the lines'
    /// meaning rather than their bytes.
    fn model(stream: &Stream) -> (Vec<Item>, Eof) {
        let mut out = Vec::new();
        let mut last_id: Option<String> = None;
        for (lines, _) in &stream.blocks {
            let mut data: Vec<&str> = Vec::new();
            let mut event_type = "";
            let mut retry = None;
            for (line, _, _) in lines {
                match line {
                    Line::Data(v) => data.push(v),
                    Line::Event(v) => event_type = v,
                    Line::Id(v) if !v.contains('\0') => last_id = Some(v.clone()),
                    Line::Retry(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                        retry = Some(v.parse().unwrap_or(u64::MAX));
                    }
                    Line::Comment(v) => out.push(Item::Comment(v.clone())),
                    Line::Bare("data") => data.push(""),
                    Line::Bare("event") => event_type = "",
                    Line::Bare("id") => last_id = Some(String::new()),
                    _ => {}
                }
            }
            if !data.is_empty() {
                out.push(Item::Event(Event {
                    event: if event_type.is_empty() {
                        "message"
                    } else {
                        event_type
                    }
                    .to_owned(),
                    data: data.join("\n"),
                    id: last_id.clone(),
                    retry,
                }));
            }
        }
        let eof = if stream.tail.is_empty() {
            Eof::Clean
        } else {
            Eof::Truncated
        };
        (out, eof)
    }

    /// Bytes drawn mostly from those the rules care about, for streams no generator of
    /// well-formed lines would produce.
    fn byte_soup() -> impl Strategy<Value = Vec<u8>> {
        let alphabet = [
            b'\r', b'\n', b':', b' ', b'd', b'a', b't', b'i', b'e', b'v', b'n', b'r', b'y', b'1',
            0, 0xEF, 0xBB, 0xBF, 0xE2, 0x82, 0xAC, 0xFF,
        ];
        prop::collection::vec(prop::sample::select(alphabet.to_vec()), 0..120)
    }

    fn cuts(len: usize, picks: &[prop::sample::Index]) -> Vec<usize> {
        let mut cuts: Vec<usize> = picks.iter().map(|p| p.index(len + 1)).collect();
        cuts.sort_unstable();
        cuts
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn decodes_to_the_generated_events(stream in stream()) {
            let input = encode(&stream);
            let (items, error, eof) = run(&input, &[], Decoder::DEFAULT_MAX_LINE);
            prop_assert_eq!(error, None);
            prop_assert_eq!((items, eof), model(&stream));
        }

        #[test]
        fn chunking_never_changes_the_result(
            stream in stream(),
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let input = encode(&stream);
            let whole = run(&input, &[], Decoder::DEFAULT_MAX_LINE);
            for cut in 0..=input.len() {
                prop_assert_eq!(&run(&input, &[cut], Decoder::DEFAULT_MAX_LINE), &whole, "cut at {}", cut);
            }
            let every_byte: Vec<usize> = (1..input.len()).collect();
            prop_assert_eq!(&run(&input, &every_byte, Decoder::DEFAULT_MAX_LINE), &whole);
            prop_assert_eq!(&run(&input, &cuts(input.len(), &picks), Decoder::DEFAULT_MAX_LINE), &whole);
        }

        #[test]
        fn chunking_never_changes_the_result_of_arbitrary_bytes(
            input in byte_soup(),
            max_line in prop_oneof![Just(Decoder::DEFAULT_MAX_LINE), 0..24usize],
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let whole = run(&input, &[], max_line);
            for cut in 0..=input.len() {
                prop_assert_eq!(&run(&input, &[cut], max_line), &whole, "cut at {}", cut);
            }
            let every_byte: Vec<usize> = (1..input.len()).collect();
            prop_assert_eq!(&run(&input, &every_byte, max_line), &whole);
            prop_assert_eq!(&run(&input, &cuts(input.len(), &picks), max_line), &whole);
        }

        #[test]
        fn chunking_never_changes_the_result_under_a_small_event_limit(
            input in byte_soup(),
            max_event in 0..24usize,
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let decoder = || Decoder::new().with_max_event(max_event);
            let whole = run_with(decoder(), &input, &[]);
            if let (items, None, _) = &whole {
                for item in items {
                    if let Item::Event(e) = item {
                        prop_assert!(e.data.len() <= max_event);
                    }
                }
            }
            for cut in 0..=input.len() {
                prop_assert_eq!(&run_with(decoder(), &input, &[cut]), &whole, "cut at {}", cut);
            }
            let every_byte: Vec<usize> = (1..input.len()).collect();
            prop_assert_eq!(&run_with(decoder(), &input, &every_byte), &whole);
            prop_assert_eq!(&run_with(decoder(), &input, &cuts(input.len(), &picks)), &whole);
        }
    }
}
