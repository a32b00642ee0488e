//! The OpenAI chat-completions wire format: the request body, and what one `data:` event
//! of the streamed answer means.
//!
//! Parsing is tolerant where servers differ and strict where a mistake would be silent:
//! unknown fields are ignored, `null` is as good as absent, a chunk without `choices`
//! (a usage-only chunk) is fine; but data that is not a JSON object is a malformed chunk,
//! never skipped, so a garbled stream cannot pass for a short answer.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::prompt::ChatMessage;
use crate::pipeline::Usage;

/// The body of `POST {base}/chat/completions`.
#[derive(Serialize)]
pub(super) struct ChatRequest<'a> {
    pub model: &'a str,
    pub stream: bool,
    /// Asks for a final chunk with token counts (`done.usage`). Understood by OpenAI, vLLM,
    /// llama.cpp's server and Ollama; servers that do not know it usually ignore it.
    pub stream_options: StreamOptions,
    /// The longest answer wanted, in tokens; not sent when `None`. `max_tokens` rather
    /// than the newer `max_completion_tokens`: every server above understands it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    pub messages: &'a [ChatMessage],
}

#[derive(Serialize)]
pub(super) struct StreamOptions {
    pub include_usage: bool,
}

/// The meaning of one `data:` event.
#[derive(Debug, PartialEq)]
pub(super) enum Event<'a> {
    /// `[DONE]`: the answer is complete.
    Done,
    /// A chunk of the answer. Any part may be missing: the role chunk, empty deltas and
    /// keep-alive chunks carry nothing.
    Chunk {
        /// A non-empty piece of text.
        token: Option<Cow<'a, str>>,
        /// Token counts, on the usage chunk.
        usage: Option<Usage>,
        /// A `finish_reason` was set: the model has stopped.
        finished: bool,
    },
    /// The upstream reported an error inside the stream; the text is its message, untrimmed.
    Error(Cow<'a, str>),
    /// Not a chunk the format allows.
    Malformed,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChunkWire<'a> {
    #[serde(borrow)]
    choices: Option<Vec<ChoiceWire<'a>>>,
    usage: Option<UsageWire>,
    #[serde(borrow)]
    error: Option<ErrorWire<'a>>,
    /// vLLM's older error shape: `{"object":"error","message":…}`.
    #[serde(borrow)]
    object: Option<Cow<'a, str>>,
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChoiceWire<'a> {
    index: u32,
    #[serde(borrow)]
    delta: Option<DeltaWire<'a>>,
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DeltaWire<'a> {
    #[serde(borrow)]
    content: Option<Text<'a>>,
}

/// A string borrowed from the event when it has no escapes, which is most tokens (serde
/// borrows a `Cow<str>` only when it is a field's whole type, hence the newtype).
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize, Default)]
#[serde(default)]
struct UsageWire {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// `"error": {"message": …}` (OpenAI, vLLM, llama.cpp) or `"error": "…"` (some proxies).
#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorWire<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Object {
        #[serde(default, borrow)]
        message: Option<Cow<'a, str>>,
    },
    Other(serde::de::IgnoredAny),
}

/// What the error field or object of a body says, if it has one; used for the stream's
/// events and for the body of a refused request.
pub(super) fn error_message(body: &[u8]) -> Option<String> {
    let chunk: ChunkWire<'_> = serde_json::from_slice(body).ok()?;
    chunk_error(&chunk).map(Cow::into_owned)
}

fn chunk_error<'a>(chunk: &ChunkWire<'a>) -> Option<Cow<'a, str>> {
    let unnamed = || Cow::Borrowed("(no message)");
    match &chunk.error {
        Some(ErrorWire::Text(t)) => Some(t.clone()),
        Some(ErrorWire::Object { message }) => Some(message.clone().unwrap_or_else(unnamed)),
        Some(ErrorWire::Other(_)) => Some(unnamed()),
        None if chunk.object.as_deref() == Some("error") => {
            Some(chunk.message.clone().unwrap_or_else(unnamed))
        }
        None => None,
    }
}

/// Interprets the `data` of one event.
pub(super) fn parse_event(data: &str) -> Event<'_> {
    if data.trim() == "[DONE]" {
        return Event::Done;
    }
    // serde fills a defaulted struct from an array too (`[]` would be an empty chunk),
    // so insist on an object first.
    if !data.trim_start().starts_with('{') {
        return Event::Malformed;
    }
    let Ok(chunk) = serde_json::from_str::<ChunkWire<'_>>(data) else {
        return Event::Malformed;
    };
    if let Some(message) = chunk_error(&chunk) {
        return Event::Error(message);
    }
    let usage = chunk.usage.map(|u| Usage {
        prompt_tokens: u.prompt_tokens.map(saturate),
        completion_tokens: u.completion_tokens.map(saturate),
    });
    // The answer is choice 0; askstream never asks for `n > 1`.
    let choice = chunk
        .choices
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.index == 0);
    let (token, finished) = match choice {
        Some(c) => (
            c.delta
                .and_then(|d| d.content)
                .map(|t| t.0)
                .filter(|t| !t.is_empty()),
            c.finish_reason.is_some(),
        ),
        None => (None, false),
    };
    Event::Chunk {
        token,
        usage,
        finished,
    }
}

fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(t: &str) -> Event<'_> {
        Event::Chunk {
            token: Some(Cow::Borrowed(t)),
            usage: None,
            finished: false,
        }
    }

    const NOTHING: Event<'static> = Event::Chunk {
        token: None,
        usage: None,
        finished: false,
    };

    #[test]
    fn content_deltas_are_tokens_and_the_rest_is_not() {
        let role = r#"{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        assert_eq!(parse_event(role), NOTHING);
        let null_content = r#"{"choices":[{"index":0,"delta":{"content":null}}],"usage":null}"#;
        assert_eq!(parse_event(null_content), NOTHING);
        assert_eq!(parse_event(r#"{"choices":[{"delta":{}}]}"#), NOTHING);
        assert_eq!(
            parse_event(r#"{"choices":[{"index":0,"delta":{"content":"The"}}]}"#),
            token("The")
        );
        assert_eq!(
            parse_event(r#"{"choices":[{"index":0,"delta":{"content":" \"q\"\n\u00e9"}}]}"#),
            token(" \"q\"\né")
        );
        assert_eq!(
            parse_event(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#),
            Event::Chunk {
                token: None,
                usage: None,
                finished: true
            }
        );
        assert_eq!(parse_event(" [DONE]"), Event::Done);
    }

    #[test]
    fn usage_chunks_fill_usage() {
        let e = parse_event(
            r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#,
        );
        assert_eq!(
            e,
            Event::Chunk {
                token: None,
                usage: Some(Usage {
                    prompt_tokens: Some(12),
                    completion_tokens: Some(3)
                }),
                finished: false
            }
        );
    }

    #[test]
    fn errors_in_the_stream_are_recognised_in_their_common_shapes() {
        assert_eq!(
            parse_event(r#"{"error":{"message":"model crashed","type":"server_error"}}"#),
            Event::Error("model crashed".into())
        );
        assert_eq!(
            parse_event(r#"{"error":"busy"}"#),
            Event::Error("busy".into())
        );
        assert_eq!(
            parse_event(r#"{"object":"error","message":"bad","code":400}"#),
            Event::Error("bad".into())
        );
        assert_eq!(
            parse_event(r#"{"error":{"code":500}}"#),
            Event::Error("(no message)".into())
        );
        assert_eq!(
            error_message(br#"{"error":{"message":"no such model"}}"#).as_deref(),
            Some("no such model")
        );
        assert_eq!(error_message(b"<html>"), None);
    }

    #[test]
    fn max_tokens_is_sent_only_when_set() {
        let messages = [ChatMessage::user("q")];
        let body = |max_tokens| {
            serde_json::to_value(ChatRequest {
                model: "m",
                stream: true,
                stream_options: StreamOptions {
                    include_usage: true,
                },
                max_tokens,
                messages: &messages,
            })
            .unwrap()
        };
        assert_eq!(body(Some(5))["max_tokens"], 5);
        assert!(body(None).get("max_tokens").is_none());
    }

    #[test]
    fn anything_but_a_json_object_is_malformed() {
        for data in [
            "{",
            "[1,2]",
            "[]",
            "[null]",
            "42",
            "hello",
            r#"{"choices":{"a":1}}"#,
        ] {
            assert_eq!(parse_event(data), Event::Malformed, "{data}");
        }
    }
}
