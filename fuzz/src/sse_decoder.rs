//! `askstream::sse::decode::Decoder` on arbitrary bytes.
//!
//! The input is the byte stream itself (the corpus files are plain event streams). Each
//! input is decoded under five pairs of limits, each fed whole, a byte at a time, cut at
//! every position (short inputs) or at spread positions (long ones), and in pieces sized
//! by the input's own bytes. Invariants:
//!
//! - **chunking never matters**: every feeding gives the same items, error and end;
//! - **the WHATWG rules**: the result equals the one of [`reference`], a naive
//!   line-by-line implementation of HTML §9.2.6 with the decoder's documented extensions
//!   (comments as items, `retry` on its event, the sticky limit errors);
//! - **decoding per line is decoding the stream**: the lines the reference splits from the
//!   bytes (then decodes one by one, as the decoder does) are the lines of the whole stream
//!   decoded first, as the spec does;
//! - `next_event` is `next_item` without the comments; `finish` really resets (the same
//!   decoder decodes the input again to the same result); no event has more `data` than the
//!   event limit; the last event ID and reconnection time match the reference.

use askstream::sse::decode::{DecodeError, Decoder, Eof, Event, Item};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Everything one decoding produced.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Outcome {
    items: Vec<Item>,
    error: Option<DecodeError>,
    eof: Eof,
    last_event_id: Option<String>,
    reconnection_time: Option<u64>,
}

pub fn sse_decoder(input: &[u8]) {
    check_lines_decode_like_the_stream(input);
    let n = input.len();
    let limits = [
        (Decoder::DEFAULT_MAX_LINE, Decoder::DEFAULT_MAX_EVENT),
        (12, Decoder::DEFAULT_MAX_EVENT.max(12)),
        (Decoder::DEFAULT_MAX_LINE, 8),
        (0, Decoder::DEFAULT_MAX_EVENT),
        (n / 3, n / 4),
    ];
    for (i, &(max_line, max_event)) in limits.iter().enumerate() {
        let new = || Decoder::with_max_line(max_line).with_max_event(max_event);
        let expected = reference(input, max_line, max_event);
        let whole = run(new(), input, &[], true);
        assert_eq!(
            whole, expected,
            "limits ({max_line}, {max_event}): decoder (left) differs from the WHATWG reference (right)"
        );
        if let Some(err) = &whole.error {
            let limit = match err {
                DecodeError::LineTooLong { limit } => (*limit, max_line),
                DecodeError::EventTooLarge { limit } => (*limit, max_event),
            };
            assert_eq!(limit.0, limit.1, "the error names the limit in force");
        }
        for item in &whole.items {
            if let Item::Event(e) = item {
                assert!(e.data.len() <= max_event, "event over the event limit");
            }
        }

        let every_byte: Vec<usize> = (1..n).collect();
        assert_eq!(
            run(new(), input, &every_byte, true),
            whole,
            "byte at a time"
        );
        let single_cuts: Vec<usize> = if n <= 64 {
            (0..=n).collect()
        } else {
            (0..=16).map(|k| k * n / 16).collect()
        };
        for cut in single_cuts {
            assert_eq!(run(new(), input, &[cut], true), whole, "cut at {cut}");
        }
        assert_eq!(
            run(new(), input, &self_sized_cuts(input), true),
            whole,
            "pieces sized by the input"
        );

        if i == 0 {
            let events_only = Outcome {
                items: whole
                    .items
                    .iter()
                    .filter(|item| matches!(item, Item::Event(_)))
                    .cloned()
                    .collect(),
                ..whole.clone()
            };
            assert_eq!(run(new(), input, &[], false), events_only, "next_event");
            assert_eq!(
                run(new(), input, &every_byte, false),
                events_only,
                "next_event, byte at a time"
            );
            // `finish` resets the decoder for a new stream: the same decoder, used again.
            let mut reused = new();
            let _ = run_on(&mut reused, input, &[], true);
            assert_eq!(run_on(&mut reused, input, &[], true), whole, "after finish");
        }
    }
}

/// Cut positions: pieces of 1 to 8 bytes, each size taken from the byte where it starts.
fn self_sized_cuts(input: &[u8]) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut at = 0;
    while at < input.len() {
        at += usize::from(input[at] % 8) + 1;
        if at < input.len() {
            cuts.push(at);
        }
    }
    cuts
}

fn run(mut decoder: Decoder, input: &[u8], cuts: &[usize], comments: bool) -> Outcome {
    run_on(&mut decoder, input, cuts, comments)
}

/// Feeds `input` cut at `cuts` (sorted), reading everything after each feed and stopping
/// at the first error, then finishes the stream.
fn run_on(decoder: &mut Decoder, input: &[u8], cuts: &[usize], comments: bool) -> Outcome {
    let mut items = Vec::new();
    let mut error = None;
    let mut from = 0;
    'chunks: for &to in cuts.iter().chain([&input.len()]) {
        decoder.feed(&input[from..to]);
        from = to;
        loop {
            let next = if comments {
                decoder.next_item()
            } else {
                decoder.next_event().map(|e| e.map(Item::Event))
            };
            match next {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(err) => {
                    // Sticky: every later call says the same, whatever is fed.
                    decoder.feed(b"data: more\n\n");
                    assert_eq!(decoder.next_item(), Err(err.clone()), "sticky error");
                    assert_eq!(decoder.next_event(), Err(err.clone()), "sticky error");
                    error = Some(err);
                    break 'chunks;
                }
            }
        }
    }
    let last_event_id = decoder.last_event_id().map(str::to_owned);
    let reconnection_time = decoder.reconnection_time();
    let eof = decoder.finish();
    Outcome {
        items,
        error,
        eof,
        last_event_id,
        reconnection_time,
    }
}

/// The stream as the WHATWG rules read it, with the decoder's documented limits.
///
/// Lines are split on the bytes (CR LF, LF or CR), then each is decoded with U+FFFD for
/// invalid UTF-8; [`check_lines_decode_like_the_stream`] checks that this is the same as
/// decoding the whole stream first.
fn reference(input: &[u8], max_line: usize, max_event: usize) -> Outcome {
    let mut out = Outcome {
        items: Vec::new(),
        error: None,
        eof: Eof::Clean,
        last_event_id: None,
        reconnection_time: None,
    };
    if input.is_empty() {
        return out;
    }
    if input.len() < BOM.len() && BOM.starts_with(input) {
        // Only the next byte could tell whether this is a BOM: nothing is read yet.
        out.eof = Eof::Truncated;
        return out;
    }
    let (lines, tail) = split_lines(input.strip_prefix(BOM).unwrap_or(input));

    let mut data: Option<String> = None; // joined with '\n'; None: no data line yet
    let mut event_type = String::new();
    let mut block_retry = None;
    let mut in_block = false;
    let fail = |out: &mut Outcome, err| {
        out.error = Some(err);
        out.eof = Eof::Truncated;
    };
    for line in lines {
        if line.len() > max_line {
            fail(&mut out, DecodeError::LineTooLong { limit: max_line });
            return out;
        }
        if line.is_empty() {
            in_block = false;
            if let Some(d) = data.take() {
                out.items.push(Item::Event(Event {
                    event: if event_type.is_empty() {
                        "message".to_owned()
                    } else {
                        event_type.clone()
                    },
                    data: d,
                    id: out.last_event_id.clone(),
                    retry: block_retry,
                }));
            }
            event_type.clear();
            block_retry = None;
            continue;
        }
        if line[0] == b':' {
            let text = line[1..].strip_prefix(b" ").unwrap_or(&line[1..]);
            out.items
                .push(Item::Comment(String::from_utf8_lossy(text).into_owned()));
            continue;
        }
        in_block = true;
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(c) => (
                &line[..c],
                line[c + 1..].strip_prefix(b" ").unwrap_or(&line[c + 1..]),
            ),
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match name {
            b"data" => {
                let joined = match &data {
                    Some(d) => d.len() + 1 + value.len(),
                    None => value.len(),
                };
                if joined > max_event {
                    fail(&mut out, DecodeError::EventTooLarge { limit: max_event });
                    return out;
                }
                match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(&value);
                    }
                    None => data = Some(value.into_owned()),
                }
            }
            b"event" => event_type = value.into_owned(),
            b"id" if !value.contains('\0') => out.last_event_id = Some(value.into_owned()),
            b"retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                let ms = value.bytes().fold(0u64, |acc, d| {
                    acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))
                });
                block_retry = Some(ms);
                out.reconnection_time = Some(ms);
            }
            _ => {}
        }
    }
    if tail.len() > max_line {
        fail(&mut out, DecodeError::LineTooLong { limit: max_line });
        return out;
    }
    if in_block || !tail.is_empty() {
        out.eof = Eof::Truncated;
    }
    out
}

/// The complete lines (endings removed) and the unterminated rest.
fn split_lines(bytes: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut lines = Vec::new();
    let mut at = 0;
    while let Some(i) = bytes[at..].iter().position(|&b| b == b'\r' || b == b'\n') {
        let end = at + i;
        lines.push(&bytes[at..end]);
        at = end + 1;
        if bytes[end] == b'\r' && bytes.get(at) == Some(&b'\n') {
            at += 1;
        }
    }
    (lines, &bytes[at..])
}

/// The same split done the spec's way: decode the whole stream (dropping one leading
/// U+FEFF), then split on CR LF, LF or CR.
fn check_lines_decode_like_the_stream(input: &[u8]) {
    if input.len() < BOM.len() && BOM.starts_with(input) {
        return;
    }
    let (lines, tail) = split_lines(input.strip_prefix(BOM).unwrap_or(input));
    let by_line: Vec<String> = lines
        .iter()
        .chain([&tail])
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();

    let whole = String::from_utf8_lossy(input);
    let text = whole.strip_prefix('\u{FEFF}').unwrap_or(&whole);
    let mut by_stream = Vec::new();
    let mut line = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' | '\n' => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                by_stream.push(std::mem::take(&mut line));
            }
            c => line.push(c),
        }
    }
    by_stream.push(line);
    assert_eq!(
        by_line, by_stream,
        "decoding line by line differs from decoding the stream"
    );
}
