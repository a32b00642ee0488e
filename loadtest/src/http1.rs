//! Just enough HTTP/1.1 for the load tool: write an ask, parse a response head, undo chunked
//! transfer coding.
//!
//! A general client (hyper's) would cost the tool more CPU per stream than the server spends,
//! and hide where time goes. This module knows nothing of sockets or SSE: it turns bytes into
//! a [`Head`] and body bytes, and must give the same result however the bytes are split.

use std::fmt;
use std::io::Write as _;

/// The largest response head accepted; a peer sending more is broken, not slow.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// Why a response could not be understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HttpError {
    /// The status line or a header line is malformed.
    BadHead(&'static str),
    /// No blank line within [`MAX_HEAD`] bytes.
    HeadTooLarge,
    /// A chunk-size line is malformed, or a chunk does not end with CRLF.
    BadChunk(&'static str),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::BadHead(why) => write!(f, "bad response head: {why}"),
            HttpError::HeadTooLarge => write!(f, "response head over {MAX_HEAD} bytes"),
            HttpError::BadChunk(why) => write!(f, "bad chunked body: {why}"),
        }
    }
}

/// How the body's end is found (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `transfer-encoding: chunked`.
    Chunked,
    /// `content-length: n`.
    Length(u64),
    /// Neither: the body runs until the server closes.
    UntilClose,
}

/// The parts of a response head the load tool acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Head {
    /// The status code.
    pub(crate) status: u16,
    /// How the body ends.
    pub(crate) framing: Framing,
    /// The server will close after this response (`connection: close`, or HTTP/1.0 without
    /// keep-alive), so the connection cannot be reused.
    pub(crate) close: bool,
    /// `content-type: text/event-stream`.
    pub(crate) event_stream: bool,
}

/// Writes a `POST` of `body` to `path` into `out` (cleared first), authenticated as
/// `user-<user>`. Reuses `out`'s capacity, so after the first stream no allocation happens.
pub(crate) fn write_ask(
    out: &mut Vec<u8>,
    host: &str,
    path: &str,
    body: &[u8],
    user: u64,
    close: bool,
) {
    out.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n\
         accept: text/event-stream\r\nauthorization: Bearer user-{user}\r\n\
         content-length: {}\r\n{}\r\n",
        body.len(),
        if close { "connection: close\r\n" } else { "" },
    );
    out.extend_from_slice(body);
}

/// Parses a response head at the start of `buf`: `Ok(None)` until its blank line has
/// arrived, then the head and its length in bytes. Informational (1xx) heads are skipped.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let mut offset = 0;
    loop {
        let rest = &buf[offset..];
        let Some(end) = find_blank_line(rest) else {
            return if rest.len() > MAX_HEAD {
                Err(HttpError::HeadTooLarge)
            } else {
                Ok(None)
            };
        };
        if end > MAX_HEAD {
            return Err(HttpError::HeadTooLarge);
        }
        let head = parse_head_text(&rest[..end])?;
        offset += end + 4;
        // 101 would switch protocols, which the tool never asks for.
        if (100..200).contains(&head.status) && head.status != 101 {
            continue;
        }
        return Ok(Some((head, offset)));
    }
}

/// The index of the `\r\n\r\n` that ends a head.
fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Parses the head's text (status line and header lines, without the final blank line).
fn parse_head_text(text: &[u8]) -> Result<Head, HttpError> {
    let mut lines = text
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, |&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        _ => return Err(HttpError::BadHead("not an HTTP/1.x status line")),
    };
    let code = parts.next().unwrap_or_default();
    if code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::BadHead("status code is not three digits"));
    }
    let status = code
        .iter()
        .fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0'));

    let mut chunked = false;
    let mut length = None;
    let mut close = http10;
    let mut event_stream = false;
    for line in lines {
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(HttpError::BadHead("header line without a colon"))?;
        let name = &line[..colon];
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = has_token(value, b"chunked");
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(HttpError::BadHead("content-length is not a number"))?;
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::BadHead("conflicting content-length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"content-type") {
            let media = value.split(|&b| b == b';').next().unwrap_or_default();
            event_stream = media
                .trim_ascii()
                .eq_ignore_ascii_case(b"text/event-stream");
        } else if name.eq_ignore_ascii_case(b"connection") {
            if has_token(value, b"close") {
                close = true;
            } else if has_token(value, b"keep-alive") {
                close = false;
            }
        }
    }
    // Bodies that cannot exist (RFC 9112 §6.3): 1xx, 204 and 304.
    let framing = if status == 204 || status == 304 || status < 200 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    if framing == Framing::UntilClose {
        close = true;
    }
    Ok(Head {
        status,
        framing,
        close,
        event_stream,
    })
}

/// Whether a comma-separated header value contains `token` (case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Where the chunked decoder is within the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex digits of a chunk size: the value so far, whether any digit was seen.
    Size { value: u64, digits: bool },
    /// Past the size digits: skipping whitespace or a `;extension` up to the line's LF.
    SizeLine(u64),
    /// Inside a chunk's data, with this many bytes left.
    Data(u64),
    /// After a chunk's data: expecting its CR.
    DataCr,
    /// After a chunk's data and CR: expecting its LF.
    DataLf,
    /// After the last (zero) chunk: in a trailer line; whether the line is empty so far.
    Trailer { empty: bool },
    /// The body ended.
    Done,
}

/// An incremental decoder of `transfer-encoding: chunked` that hands out the data without
/// copying it.
#[derive(Clone, Debug)]
pub(crate) struct ChunkedDecoder {
    state: ChunkState,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub(crate) fn new() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size {
                value: 0,
                digits: false,
            },
        }
    }

    /// Whether the terminating chunk and trailer have been read.
    pub(crate) fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, passing each run of body data to `data` as it is found. Returns how
    /// many bytes were consumed: all of `input`, or fewer when the body ended inside it.
    pub(crate) fn decode(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<usize, HttpError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                ChunkState::Data(left) => {
                    let n = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    data(&input[i..i + n]);
                    i += n;
                    let left = left - n as u64;
                    if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left)
                    }
                }
                ChunkState::Done => return Ok(i),
                // The common case, taken whole: one event per chunk means a size line and
                // a CRLF for every token, and stepping through them a byte at a time (the
                // state stored back each time) was a quarter of the tool's time under B.
                ChunkState::DataCr if input[i..].starts_with(b"\r\n") => {
                    i += 2;
                    ChunkState::Size {
                        value: 0,
                        digits: false,
                    }
                }
                ChunkState::Size {
                    value: 0,
                    digits: false,
                } if let Some((size, len)) = size_line(&input[i..]) => {
                    i += len;
                    Self::chunk_start(size)
                }
                state => {
                    i += 1;
                    Self::step(state, b)?
                }
            };
        }
        Ok(i)
    }

    /// The state after byte `b` outside chunk data.
    fn step(state: ChunkState, b: u8) -> Result<ChunkState, HttpError> {
        Ok(match state {
            ChunkState::Size { value, digits } => match (hex(b), b) {
                (Some(d), _) => {
                    if value >> 60 != 0 {
                        return Err(HttpError::BadChunk("chunk size overflows"));
                    }
                    ChunkState::Size {
                        value: value << 4 | u64::from(d),
                        digits: true,
                    }
                }
                _ if !digits => return Err(HttpError::BadChunk("chunk size has no digits")),
                (None, b'\n') => Self::chunk_start(value),
                (None, b'\r' | b';' | b' ' | b'\t') => ChunkState::SizeLine(value),
                _ => return Err(HttpError::BadChunk("unexpected byte after the chunk size")),
            },
            ChunkState::SizeLine(size) if b == b'\n' => Self::chunk_start(size),
            ChunkState::SizeLine(size) => ChunkState::SizeLine(size),
            ChunkState::DataCr if b == b'\r' => ChunkState::DataLf,
            ChunkState::DataLf if b == b'\n' => ChunkState::Size {
                value: 0,
                digits: false,
            },
            ChunkState::DataCr | ChunkState::DataLf => {
                return Err(HttpError::BadChunk("chunk data not followed by CRLF"));
            }
            ChunkState::Trailer { empty } => match b {
                b'\n' if empty => ChunkState::Done,
                b'\n' => ChunkState::Trailer { empty: true },
                b'\r' => ChunkState::Trailer { empty },
                _ => ChunkState::Trailer { empty: false },
            },
            ChunkState::Data(_) | ChunkState::Done => state,
        })
    }

    /// The state once a size line for `size` has ended.
    fn chunk_start(size: u64) -> ChunkState {
        if size == 0 {
            ChunkState::Trailer { empty: true }
        } else {
            ChunkState::Data(size)
        }
    }
}

/// A whole size line with no extension at the start of `input` (`1a\r\n`): the size and
/// the line's length. `None` for anything else (an extension, a line split across reads,
/// more than 15 digits), which the byte-at-a-time path decides.
fn size_line(input: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (n, &b) in input.iter().enumerate().take(16) {
        match hex(b) {
            Some(d) => value = value << 4 | u64::from(d),
            None => {
                let ends = n > 0 && input[n..].starts_with(b"\r\n");
                return ends.then_some((value, n + 2));
            }
        }
    }
    None
}

/// The value of a hex digit.
fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        Transfer-Encoding: chunked\r\nconnection: keep-alive\r\nx-query-id: abc\r\n\r\n";

    /// Decodes `input` split at every position in `cuts`, returning the data and whether the
    /// body ended, and the bytes consumed in all.
    fn decode_split(input: &[u8], cuts: &[usize]) -> (Vec<u8>, bool, usize) {
        let mut decoder = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let n = decoder
                .decode(&input[from..cut], |d| out.extend_from_slice(d))
                .unwrap();
            consumed += n;
            from = cut;
            if decoder.is_done() {
                break;
            }
        }
        (out, decoder.is_done(), consumed)
    }

    #[test]
    fn head_parses_at_every_split() {
        let mut input = HEAD.to_vec();
        input.extend_from_slice(b"1a\r\n");
        for cut in 0..=input.len() {
            let got = parse_head(&input[..cut]).unwrap();
            if cut < HEAD.len() {
                assert_eq!(got, None, "cut at {cut}");
            } else {
                let (head, len) = got.expect("complete head");
                assert_eq!(len, HEAD.len());
                assert_eq!(
                    head,
                    Head {
                        status: 200,
                        framing: Framing::Chunked,
                        close: false,
                        event_stream: true,
                    }
                );
            }
        }
    }

    #[test]
    fn head_framing_and_close() {
        let parse = |text: &str| parse_head(text.as_bytes()).unwrap().unwrap().0;
        let h =
            parse("HTTP/1.1 429 Too Many Requests\r\ncontent-length: 12\r\nretry-after: 5\r\n\r\n");
        assert_eq!(
            (h.status, h.framing, h.close),
            (429, Framing::Length(12), false)
        );
        let h = parse("HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 2\r\n\r\n");
        assert!(h.close && !h.event_stream);
        let h = parse("HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream; charset=utf-8\r\n\r\n");
        assert!(h.event_stream);
        let h = parse("HTTP/1.0 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.close), (Framing::UntilClose, true));
        let h = parse("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n");
        assert!(!h.close);
        let h = parse("HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(0));
        // A 100 Continue is skipped; the final head's length includes it.
        let text = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        let (h, len) = parse_head(text).unwrap().unwrap();
        assert_eq!((h.status, len), (503, text.len()));
        assert_eq!(parse_head(&text[..30]).unwrap(), None);
    }

    #[test]
    fn bad_heads_are_errors() {
        for text in [
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 2x0 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: lots\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        ] {
            assert!(parse_head(text.as_bytes()).is_err(), "{text:?}");
        }
        let endless = vec![b'a'; MAX_HEAD + 10];
        let mut line = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        line.extend_from_slice(&endless);
        assert_eq!(parse_head(&line), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn chunked_decodes_at_every_split_and_pair_of_splits() {
        let body: &[u8] = b"18\r\ndata: {\"type\":\"token\"}\n\n\r\n\
            5;ext=1\r\nhello\r\nA \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let want = b"data: {\"type\":\"token\"}\n\nhello0123456789";
        let end = body.len() - 4;
        for a in 0..=body.len() {
            let (out, done, consumed) = decode_split(body, &[a]);
            assert_eq!(out, want, "cut at {a}");
            assert!(done);
            assert_eq!(consumed, end, "stops before the next response");
            for b in a..=body.len() {
                let (out, done, _) = decode_split(body, &[a, b]);
                assert_eq!((out.as_slice(), done), (&want[..], true), "cuts {a} {b}");
            }
        }
        // One byte at a time.
        let cuts: Vec<usize> = (1..body.len()).collect();
        assert_eq!(decode_split(body, &cuts).0, want);
    }

    #[test]
    fn chunked_without_trailer_and_unfinished() {
        let (out, done, _) = decode_split(b"3\r\nabc\r\n0\r\n\r\n", &[]);
        assert_eq!((out.as_slice(), done), (&b"abc"[..], true));
        let (out, done, _) = decode_split(b"3\r\nabc\r\n", &[]);
        assert_eq!((out.as_slice(), done), (&b"abc"[..], false));
    }

    #[test]
    fn bad_chunks_are_errors() {
        for body in [
            &b"\r\n"[..],
            b"zz\r\n",
            b"3\r\nabcX",
            b"3\r\nabc\rX",
            b"3x\r\n",
            b"11111111111111111\r\n",
        ] {
            let mut d = ChunkedDecoder::new();
            assert!(d.decode(body, |_| {}).is_err(), "{body:?}");
        }
    }

    #[test]
    fn ask_request_is_well_formed() {
        let mut out = Vec::with_capacity(8);
        write_ask(
            &mut out,
            "127.0.0.1:8080",
            "/api/v1/ai/ask?stream=true",
            b"{\"query\":\"q\"}",
            7,
            true,
        );
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("POST /api/v1/ai/ask?stream=true HTTP/1.1\r\n"));
        assert!(text.contains("\r\nauthorization: Bearer user-7\r\n"));
        assert!(text.contains("\r\ncontent-length: 13\r\n"));
        assert!(text.contains("\r\nconnection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"query\":\"q\"}"));
        write_ask(&mut out, "h", "/", b"", 0, false);
        assert!(!String::from_utf8(out).unwrap().contains("connection"));
    }
}
