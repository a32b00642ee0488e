//! The wire format: every document the API sends is shaped and encoded here, once, as
//! [`Bytes`]. The token, `done` and `error` events (contract §1.1), the heartbeat, the error
//! object of a JSON error, and the JSON answer.
//!
//! An event is exactly `data: <one-line JSON>\n\n` (or a comment line), so the simplest
//! client parser — split on `\n\n`, keep lines starting with `data: ` — reads every event.
//! Compact `serde_json` output never contains a raw newline (they are escaped inside
//! strings), which is what keeps each event on one line.
//!
//! This module knows field names, not meanings: an error is a code string and a message,
//! so the error vocabulary ([`crate::ErrorCode`]) depends on the wire and not the reverse.
//!
//! ```
//! use askstream::wire;
//! assert_eq!(&wire::token(" north")[..], b"data: {\"type\":\"token\",\"token\":\" north\"}\n\n");
//! assert_eq!(&wire::KEEP_ALIVE[..], b": keep-alive\n\n");
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

const PREFIX: &[u8] = b"data: ";
const SUFFIX: &[u8] = b"\n\n";

/// The heartbeat comment. Static: sending it allocates nothing.
pub const KEEP_ALIVE: Bytes = Bytes::from_static(b": keep-alive\n\n");

/// Encodes any serializable value as one `data:` event.
pub fn data<T: Serialize + ?Sized>(value: &T) -> Bytes {
    let mut buf = BytesMut::with_capacity(64);
    data_into(&mut buf, value);
    buf.freeze()
}

/// Appends one `data:` event for `value` to `buf`.
///
/// Generators that prepare many frames at once ([`crate::pipeline::Token::batch`]) append
/// them all to one buffer and split it: one allocation for all of them.
pub fn data_into<T: Serialize + ?Sized>(buf: &mut BytesMut, value: &T) {
    buf.put_slice(PREFIX);
    // Writing JSON into a BytesMut cannot fail: the writer is infallible and the types we
    // serialize have no fallible Serialize impls (no maps with non-string keys).
    let _ = serde_json::to_writer((&mut *buf).writer(), value);
    buf.put_slice(SUFFIX);
}

#[derive(Serialize)]
struct TokenEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    token: &'a str,
}

/// The `token` event for one piece of generated text.
pub fn token(text: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(text.len() + 36);
    token_into(&mut buf, text);
    buf.freeze()
}

/// Appends the `token` event for `text` to `buf` (see [`data_into`]).
pub fn token_into(buf: &mut BytesMut, text: &str) {
    data_into(
        buf,
        &TokenEvent {
            kind: "token",
            token: text,
        },
    );
}

/// The error object, `{"type":"error","code":…,"message":…}`: the body of an error in
/// JSON mode, and the payload of the `error` event.
#[derive(Serialize)]
struct ErrorObject<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'a str,
    message: &'a str,
}

/// The `error` event: the error object as one `data:` event.
pub fn error_event(code: &str, message: &str) -> Bytes {
    data(&ErrorObject {
        kind: "error",
        code,
        message,
    })
}

/// The error object as a JSON document, for an error answered before a JSON answer began.
pub fn error_json(code: &str, message: &str) -> Bytes {
    json(&ErrorObject {
        kind: "error",
        code,
        message,
    })
}

/// Any serializable value as a compact JSON document.
fn json<T: Serialize + ?Sized>(value: &T) -> Bytes {
    let mut buf = BytesMut::with_capacity(128);
    // As in `data_into`: writing into memory, with nothing fallible to serialize.
    let _ = serde_json::to_writer((&mut buf).writer(), value);
    buf.freeze()
}

/// One source as the `done` event (and the JSON answer) lists it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Source<'a> {
    /// Passage id within the corpus.
    pub id: &'a str,
    /// Document title.
    pub title: &'a str,
    /// Retrieval score, higher is better.
    pub score: f32,
    /// Where the document can be read, when it has an address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<&'a str>,
}

/// The `usage` field: token accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageField {
    /// Token events sent (or the model's own count, when it reports one).
    pub completion_tokens: u32,
    /// Prompt tokens, when the model reports them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
}

/// The `timing` field, in milliseconds with 0.1 ms resolution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TimingField {
    /// Request received → first token handed on; `null` if there was none.
    pub ttft_ms: Option<f64>,
    /// Request received → answer complete.
    pub total_ms: f64,
}

/// Everything the `done` event carries. More fields may be added to the event; none of
/// these is ever removed or renamed.
#[derive(Clone, Copy, Debug)]
pub struct Done<'a> {
    /// The ask's id (also in the `x-query-id` header).
    pub query_id: &'a str,
    /// The passages the answer drew on.
    pub sources: &'a [Source<'a>],
    /// The caller's quota left after this ask.
    pub quota_remaining: u32,
    /// Token accounting.
    pub usage: UsageField,
    /// Timings.
    pub timing: TimingField,
}

/// The `done` event: the last frame of a complete answer.
pub fn done(d: &Done<'_>) -> Bytes {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Event<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        query_id: &'a str,
        sources: &'a [Source<'a>],
        quota_remaining: u32,
        usage: UsageField,
        timing: TimingField,
    }
    data(&Event {
        kind: "done",
        query_id: d.query_id,
        sources: d.sources,
        quota_remaining: d.quota_remaining,
        usage: d.usage,
        timing: d.timing,
    })
}

/// The JSON-mode answer: the `done` event's fields, plus the whole `answer` text.
pub fn json_answer(d: &Done<'_>, answer: &str) -> Bytes {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Document<'a> {
        query_id: &'a str,
        answer: &'a str,
        sources: &'a [Source<'a>],
        quota_remaining: u32,
        usage: UsageField,
        timing: TimingField,
    }
    json(&Document {
        query_id: d.query_id,
        answer,
        sources: d.sources,
        quota_remaining: d.quota_remaining,
        usage: d.usage,
        timing: d.timing,
    })
}

/// `GET /api/v1/quota`'s document.
pub(crate) fn quota_status(limit: u32, remaining: u32, resets_at: &str) -> Bytes {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Status<'a> {
        limit: u32,
        remaining: u32,
        resets_at: &'a str,
    }
    json(&Status {
        limit,
        remaining,
        resets_at,
    })
}

/// A comment frame (`: text\n\n`), which SSE clients ignore. Newlines in `text` are
/// replaced by spaces so the comment stays one line.
pub fn comment(text: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(text.len() + 4);
    buf.put_slice(b": ");
    for b in text.bytes() {
        buf.put_u8(if b == b'\n' || b == b'\r' { b' ' } else { b });
    }
    buf.put_slice(SUFFIX);
    buf.freeze()
}

/// `value` as 32 lower-case hex digits, the spelling of query ids and of open-mode user
/// ids. By table rather than `fmt`: both are made once per ask.
pub(crate) fn hex_128(value: u128) -> [u8; 32] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = DIGITS[((value >> (124 - 4 * i)) & 0xf) as usize];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_128_is_32_lower_case_digits_high_nibble_first() {
        assert_eq!(&hex_128(0), b"00000000000000000000000000000000");
        assert_eq!(
            &hex_128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
            b"0123456789abcdeffedcba9876543210"
        );
    }

    #[test]
    fn token_frame_is_one_data_line() {
        assert_eq!(
            &token(" north")[..],
            b"data: {\"type\":\"token\",\"token\":\" north\"}\n\n"
        );
    }

    #[test]
    fn newlines_inside_tokens_stay_escaped() {
        let f = token("a\nb\r\n\"c\"");
        let s = std::str::from_utf8(&f).unwrap();
        assert_eq!(s.matches('\n').count(), 2, "only the terminator: {s:?}");
        assert!(s.ends_with("\n\n"));
        let json: serde_json::Value = serde_json::from_str(&s[6..s.len() - 2]).unwrap();
        assert_eq!(json["token"], "a\nb\r\n\"c\"");
    }

    #[test]
    fn error_frame_carries_code_and_message() {
        let f = error_event("SLOW_CLIENT", "client stopped reading");
        assert_eq!(
            &f[..],
            b"data: {\"type\":\"error\",\"code\":\"SLOW_CLIENT\",\"message\":\"client stopped reading\"}\n\n"
        );
    }

    #[test]
    fn done_frame_has_the_contract_fields() {
        let sources = [Source {
            id: "a.md#1",
            title: "A",
            score: 1.5,
            url: None,
        }];
        let f = done(&Done {
            query_id: "q1",
            sources: &sources,
            quota_remaining: 3,
            usage: UsageField {
                completion_tokens: 64,
                prompt_tokens: None,
            },
            timing: TimingField {
                ttft_ms: Some(0.8),
                total_ms: 12.5,
            },
        });
        assert_eq!(
            std::str::from_utf8(&f).unwrap(),
            "data: {\"type\":\"done\",\"queryId\":\"q1\",\"sources\":[{\"id\":\"a.md#1\",\"title\":\"A\",\"score\":1.5}],\"quotaRemaining\":3,\"usage\":{\"completionTokens\":64},\"timing\":{\"ttftMs\":0.8,\"totalMs\":12.5}}\n\n"
        );
    }

    #[test]
    fn error_json_is_the_error_object() {
        let v: serde_json::Value =
            serde_json::from_slice(&error_json("QUOTA_EXCEEDED", "no asks left \"today\""))
                .unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "QUOTA_EXCEEDED");
        assert_eq!(v["message"], "no asks left \"today\"");
    }

    #[test]
    fn json_answer_is_done_plus_the_answer() {
        let d = Done {
            query_id: "q1",
            sources: &[],
            quota_remaining: 0,
            usage: UsageField::default(),
            timing: TimingField::default(),
        };
        assert_eq!(
            std::str::from_utf8(&json_answer(&d, "All of it.")).unwrap(),
            "{\"queryId\":\"q1\",\"answer\":\"All of it.\",\"sources\":[],\"quotaRemaining\":0,\"usage\":{\"completionTokens\":0},\"timing\":{\"ttftMs\":null,\"totalMs\":0.0}}"
        );
    }

    #[test]
    fn comment_is_single_line() {
        assert_eq!(&comment("a\nb")[..], b": a b\n\n");
        assert_eq!(&KEEP_ALIVE[..], b": keep-alive\n\n");
    }

    #[test]
    fn frames_appended_to_one_buffer_split_cleanly() {
        let mut buf = BytesMut::new();
        token_into(&mut buf, "a");
        let first = buf.split().freeze();
        token_into(&mut buf, "b");
        assert_eq!(first, token("a"));
        assert_eq!(buf.freeze(), token("b"));
    }
}
