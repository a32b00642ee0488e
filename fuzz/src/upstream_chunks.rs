//! What an OpenAI-compatible upstream sends, read the way the openai generator reads it.
//!
//! The chunk parser itself (`src/pipeline/openai/wire.rs`, `parse_event`) is private to
//! the crate, so this target reaches only its public half: the body goes through
//! `askstream::sse::decode::Decoder` with the generator's limits (1 MiB per line and per
//! event, `stream.rs`), and each event's `data` through `serde_json`, then through
//! [`meaning`], a model of what `wire.rs` documents an event to mean. `fuzz/README.md`
//! says which function the crate would have to expose for a direct target, which would then
//! compare `parse_event` with [`meaning`].
//!
//! The input is the upstream's response body (corpus files are event streams as vLLM,
//! llama.cpp's server or OpenAI send them). Invariants:
//!
//! - the steps the answer yields (tokens, usage, the end, or why it failed) do not depend on
//!   how the body is cut into frames;
//! - every token is non-empty; at most one end; nothing after a terminal step;
//! - `serde_json` agrees with itself: `from_str` and `from_slice` give the same value.

use askstream::sse::decode::{DecodeError, Decoder, Eof};
use serde_json::Value;

/// The generator's line and event limit (`MAX_EVENT` in `stream.rs`).
const MAX_EVENT: usize = 1 << 20;

/// What reading the upstream body produces, step by step (`Step` in `stream.rs`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Step {
    Token(String),
    Usage {
        prompt: Option<u64>,
        completion: Option<u64>,
    },
    /// `[DONE]`.
    Done,
    /// The body ended cleanly after a `finish_reason` (no `[DONE]`).
    End,
    UpstreamError(String),
    Malformed,
    TooLarge,
    /// The body ended before `[DONE]` (and not cleanly after a `finish_reason`).
    Cut,
}

/// What one event's `data` means (`Event` in `wire.rs`).
#[derive(Debug, PartialEq)]
pub(crate) enum Meaning {
    Done,
    Chunk {
        token: Option<String>,
        usage: Option<(Option<u64>, Option<u64>)>,
        finished: bool,
    },
    Error(String),
    Malformed,
}

pub fn upstream_chunks(input: &[u8]) {
    let whole = read(input, &[]);
    check_steps(&whole.steps);
    let every_byte: Vec<usize> = (1..input.len()).collect();
    assert_eq!(read(input, &every_byte), whole, "byte at a time");
    let n = input.len();
    for k in 1..8 {
        let cut = k * n / 8;
        assert_eq!(read(input, &[cut]), whole, "cut at {cut}");
    }
}

/// The steps of one body, and whether [`meaning`] was sure of every event's meaning.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Read {
    pub steps: Vec<Step>,
    /// Every event read was in the subset where [`meaning`] is exact (see there).
    pub exact: bool,
}

/// Reads `input` delivered as frames cut at `cuts`, as `Events::poll_step` does.
pub(crate) fn read(input: &[u8], cuts: &[usize]) -> Read {
    let mut steps = Vec::new();
    let mut exact = true;
    let end = read_into(input, cuts, &mut steps, &mut exact);
    steps.push(end);
    Read { steps, exact }
}

/// Pushes the steps before the last onto `steps`, and returns the last.
fn read_into(input: &[u8], cuts: &[usize], steps: &mut Vec<Step>, exact: &mut bool) -> Step {
    let mut decoder = Decoder::with_max_line(MAX_EVENT).with_max_event(MAX_EVENT);
    let mut finished = false;
    let mut from = 0;
    for &to in cuts.iter().chain([&input.len()]) {
        decoder.feed(&input[from..to]);
        from = to;
        loop {
            let event = match decoder.next_event() {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(DecodeError::LineTooLong { .. } | DecodeError::EventTooLarge { .. }) => {
                    return Step::TooLarge;
                }
            };
            let (meaning, sure) = meaning(&event.data);
            *exact &= sure;
            match meaning {
                Meaning::Done => return Step::Done,
                Meaning::Chunk {
                    token,
                    usage,
                    finished: f,
                } => {
                    finished |= f;
                    if let Some(t) = token {
                        steps.push(Step::Token(t));
                    }
                    if let Some((prompt, completion)) = usage {
                        steps.push(Step::Usage { prompt, completion });
                    }
                }
                Meaning::Error(message) => return Step::UpstreamError(message),
                Meaning::Malformed => return Step::Malformed,
            }
        }
    }
    let clean = decoder.finish() == Eof::Clean;
    if finished && clean {
        Step::End
    } else {
        Step::Cut
    }
}

fn check_steps(steps: &[Step]) {
    let (last, before) = steps.split_last().expect("a read always ends with a step");
    assert!(
        matches!(
            last,
            Step::Done
                | Step::End
                | Step::Cut
                | Step::UpstreamError(_)
                | Step::Malformed
                | Step::TooLarge
        ),
        "the last step ends the answer: {last:?}"
    );
    for step in before {
        match step {
            Step::Token(t) => assert!(!t.is_empty(), "an empty token"),
            Step::Usage { .. } => {}
            other => panic!("a terminal step before the end: {other:?}"),
        }
    }
}

/// The meaning `wire.rs` documents for one event's `data`: `[DONE]` ends the answer; data
/// that is not a JSON object is malformed; an `error` field (or vLLM's
/// `{"object":"error","message":…}`) is an upstream error; otherwise choice 0's non-empty
/// `delta.content` is a token, its `finish_reason` says the model stopped, and `usage`
/// gives the token counts. Unknown fields are ignored and `null` is as good as absent.
///
/// It reads a [`Value`], so it is more lenient than the typed parse in `wire.rs` where the
/// JSON has the right shape but the wrong types (`"index": -1`, a number for `content`, an
/// array where serde would fill a struct from it, duplicate keys). The second value says
/// whether the data is outside all of those, where this meaning is exactly the typed one.
pub(crate) fn meaning(data: &str) -> (Meaning, bool) {
    if data.trim() == "[DONE]" {
        return (Meaning::Done, true);
    }
    if !data.trim_start().starts_with('{') {
        return (Meaning::Malformed, true);
    }
    let sure = match serde_json::from_str::<Value>(data) {
        Ok(v) => well_typed(&v) && serde_json::from_str::<NoDuplicateKeys>(data).is_ok(),
        // Not JSON, even to serde's most lenient reading (the one of the fields `wire.rs`
        // ignores, which skips `\u` escapes unchecked): its typed parse fails too.
        Err(_) => serde_json::from_str::<serde::de::IgnoredAny>(data).is_err(),
    };
    (lenient_meaning(data), sure)
}

fn lenient_meaning(data: &str) -> Meaning {
    let value: Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(_) => {
            assert!(
                serde_json::from_slice::<Value>(data.as_bytes()).is_err(),
                "from_str and from_slice disagree"
            );
            return Meaning::Malformed;
        }
    };
    let from_slice: Value = serde_json::from_slice(data.as_bytes()).expect("from_slice too");
    assert_eq!(value, from_slice, "from_str and from_slice disagree");

    let Value::Object(chunk) = value else {
        return Meaning::Malformed;
    };
    match chunk.get("error") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => return Meaning::Error(s.clone()),
        Some(Value::Object(o)) => {
            return Meaning::Error(
                o.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("(no message)")
                    .to_owned(),
            );
        }
        Some(_) => return Meaning::Error("(no message)".to_owned()),
    }
    if chunk.get("object").and_then(Value::as_str) == Some("error") {
        let message = chunk.get("message").and_then(Value::as_str);
        return Meaning::Error(message.unwrap_or("(no message)").to_owned());
    }
    let usage = chunk.get("usage").and_then(Value::as_object).map(|u| {
        (
            u.get("prompt_tokens").and_then(Value::as_u64),
            u.get("completion_tokens").and_then(Value::as_u64),
        )
    });
    let choice = chunk
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|choices| {
            choices.iter().find(|c| {
                c.get("index")
                    .is_none_or(|i| i.is_null() || i.as_u64() == Some(0))
            })
        });
    let (token, finished) = match choice {
        Some(c) => (
            c.get("delta")
                .and_then(|d| d.get("content"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
            c.get("finish_reason").is_some_and(|f| !f.is_null()),
        ),
        None => (None, false),
    };
    Meaning::Chunk {
        token,
        usage,
        finished,
    }
}

/// Whether every field `wire.rs` reads has a type its typed parse takes (objects where it
/// reads structs, so that no struct is filled from an array).
fn well_typed(v: &Value) -> bool {
    let absent_or = |o: &serde_json::Map<String, Value>, key: &str, ok: &dyn Fn(&Value) -> bool| {
        o.get(key).is_none_or(|v| v.is_null() || ok(v))
    };
    let Value::Object(chunk) = v else {
        return false;
    };
    let choice_ok = |c: &Value| {
        let Value::Object(c) = c else {
            return false;
        };
        c.get("index")
            .is_none_or(|i| i.as_u64().is_some_and(|i| i <= u64::from(u32::MAX)))
            && absent_or(c, "delta", &|d| {
                d.as_object()
                    .is_some_and(|d| absent_or(d, "content", &Value::is_string))
            })
            && absent_or(c, "finish_reason", &Value::is_string)
    };
    absent_or(chunk, "choices", &|cs| {
        cs.as_array().is_some_and(|cs| cs.iter().all(choice_ok))
    }) && absent_or(chunk, "usage", &|u| {
        u.as_object().is_some_and(|u| {
            absent_or(u, "prompt_tokens", &|n| n.is_u64())
                && absent_or(u, "completion_tokens", &|n| n.is_u64())
        })
    }) && absent_or(chunk, "error", &|e| !e.is_array())
        && absent_or(chunk, "object", &Value::is_string)
        && absent_or(chunk, "message", &Value::is_string)
}

/// Any JSON without a key twice in one object (serde's derived structs refuse a known
/// field twice, and `Value` keeps the last one).
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON without duplicate keys")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut keys = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !keys.insert(key) {
                return Err(serde::de::Error::custom("duplicate key"));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(self)
    }
}
