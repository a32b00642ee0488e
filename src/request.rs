//! From an HTTP request to a typed ask: mode, content type, a size-limited body, JSON rules.
//!
//! Everything here answers "is this request well-formed?" and nothing else; each check
//! returns an [`ApiError`] with the contract's code (§1.1), so the service can refuse before any
//! quota is touched.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Uri, Version, header};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;

use crate::error::{ApiError, ErrorCode};

/// Longest accepted query, in characters after trimming.
pub(crate) const MAX_QUERY_CHARS: usize = 4000;
/// `topK` when the request does not say.
pub(crate) const DEFAULT_TOP_K: usize = 4;
/// Largest accepted `topK`.
pub(crate) const MAX_TOP_K: usize = 20;

/// A validated ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AskRequest {
    /// The question, trimmed, 1 to [`MAX_QUERY_CHARS`] characters.
    pub query: Arc<str>,
    /// How many passages to retrieve, 1 to [`MAX_TOP_K`].
    pub top_k: usize,
}

/// Reads `?stream=`: `true`/`1` streams, absent/`false`/`0` answers as JSON.
pub(crate) fn stream_mode(uri: &Uri) -> Result<bool, ApiError> {
    let mut mode = false;
    for pair in uri.query().unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "stream" {
            continue;
        }
        mode = match value {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => {
                return Err(bad_request(
                    "`stream` must be true, false, 1 or 0".to_string(),
                ));
            }
        };
    }
    Ok(mode)
}

/// Whether the connection stays open after this response, as hyper decides it: on
/// HTTP/1.1 unless the client sent `connection: close`, on HTTP/1.0 only if it sent
/// `connection: keep-alive`, never on HTTP/2 (whose streams have no such header).
///
/// A streaming response says `connection: keep-alive` only then (contract §1.1). To a
/// client that asked to close, hyper adds `connection: close` itself; saying both would
/// contradict it, and hyper would keep the second value's allocation for as long as the
/// stream runs.
pub(crate) fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match version {
        Version::HTTP_11 => !has("close"),
        Version::HTTP_10 => has("keep-alive"),
        _ => false,
    }
}

/// Refuses a `content-type` that is present and is not JSON (`application/json` or any
/// `+json` type, parameters such as `charset` allowed).
pub(crate) fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    let json = |e: &str| {
        let (kind, sub) = e.split_once('/').unwrap_or((e, ""));
        kind.eq_ignore_ascii_case("application")
            && (sub.eq_ignore_ascii_case("json")
                || sub.len() > 5 && sub[sub.len() - 5..].eq_ignore_ascii_case("+json"))
    };
    match essence {
        Some(e) if json(e) => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "the request body must be JSON (content-type: application/json)",
        )),
    }
}

/// Reads the whole body, refusing more than `max` bytes while reading (a declared length
/// over the limit is refused before reading anything) and a body slower than `timeout`.
pub(crate) async fn read_body<B>(body: B, max: u64, timeout: Duration) -> Result<Bytes, ApiError>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if body.size_hint().lower() > max {
        return Err(too_large(max));
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
    match collected {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(too_large(max)),
        Ok(Err(_)) => Err(bad_request(
            "the request body could not be read".to_string(),
        )),
        Err(_) => Err(bad_request(format!(
            "the request body did not arrive within {} s",
            timeout.as_secs()
        ))),
    }
}

/// The JSON body as sent; validated into [`AskRequest`] by [`parse_ask`].
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAsk {
    query: Option<serde_json::Value>,
    top_k: Option<serde_json::Value>,
}

/// Parses `{"query": "...", "topK": n}`; unknown fields are ignored.
pub(crate) fn parse_ask(body: &[u8]) -> Result<AskRequest, ApiError> {
    // serde would also read the struct from an array of its fields (`["...", 3]`).
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(bad_request("the body must be a JSON object".to_string()));
    }
    let raw: RawAsk = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("the body is not a valid ask: {e}")))?;
    let query = match raw.query {
        Some(serde_json::Value::String(q)) => q,
        Some(_) => return Err(bad_request("`query` must be a string".to_string())),
        None => return Err(bad_request("`query` is required".to_string())),
    };
    let trimmed = query.trim();
    if trimmed.is_empty() {
        return Err(bad_request("`query` must not be empty".to_string()));
    }
    let chars = trimmed.chars().count();
    if chars > MAX_QUERY_CHARS {
        return Err(bad_request(format!(
            "`query` has {chars} characters; at most {MAX_QUERY_CHARS} are allowed"
        )));
    }
    let top_k = match raw.top_k {
        None | Some(serde_json::Value::Null) => DEFAULT_TOP_K,
        Some(v) => match v.as_u64() {
            Some(k) if (1..=MAX_TOP_K as u64).contains(&k) => k as usize,
            _ => {
                return Err(bad_request(format!(
                    "`topK` must be an integer from 1 to {MAX_TOP_K}"
                )));
            }
        },
    };
    Ok(AskRequest {
        query: Arc::from(trimmed),
        top_k,
    })
}

fn bad_request(message: String) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("the request body is larger than {max} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn keeps_alive_follows_the_version_and_the_connection_tokens() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CONNECTION, v.parse().unwrap());
            }
            h
        };
        let v11 = Version::HTTP_11;
        let v10 = Version::HTTP_10;
        assert!(keeps_alive(v11, &with(&[])));
        assert!(keeps_alive(v11, &with(&["keep-alive"])));
        assert!(
            keeps_alive(v11, &with(&["upgrade, closed"])),
            "a whole token only"
        );
        assert!(!keeps_alive(v11, &with(&["close"])));
        assert!(!keeps_alive(v11, &with(&["Keep-Alive, CLOSE"])));
        assert!(
            !keeps_alive(v11, &with(&["te", " close "])),
            "any of the headers"
        );
        assert!(!keeps_alive(v10, &with(&[])));
        assert!(keeps_alive(v10, &with(&["Keep-Alive"])));
        assert!(
            !keeps_alive(Version::HTTP_2, &with(&[])),
            "no such header on h2"
        );
    }

    #[test]
    fn stream_values() {
        assert_eq!(stream_mode(&uri("/a")), Ok(false));
        assert_eq!(stream_mode(&uri("/a?stream=true")), Ok(true));
        assert_eq!(stream_mode(&uri("/a?x=1&stream=1")), Ok(true));
        assert_eq!(stream_mode(&uri("/a?stream=false")), Ok(false));
        assert_eq!(stream_mode(&uri("/a?stream=0")), Ok(false));
        for bad in ["/a?stream=yes", "/a?stream=", "/a?stream", "/a?stream=TRUE"] {
            assert_eq!(
                stream_mode(&uri(bad)).unwrap_err().code,
                ErrorCode::BadRequest,
                "{bad}"
            );
        }
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert!(check_content_type(&h).is_ok(), "absent is fine");
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/vnd.ask+json",
        ] {
            h.insert(header::CONTENT_TYPE, ok.parse().unwrap());
            assert!(check_content_type(&h).is_ok(), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", "json"] {
            h.insert(header::CONTENT_TYPE, bad.parse().unwrap());
            assert_eq!(
                check_content_type(&h).unwrap_err().code,
                ErrorCode::UnsupportedMediaType
            );
        }
    }

    #[test]
    fn ask_rules() {
        let ok = parse_ask(br#"{"query":"  why? ","extra":[1]}"#).unwrap();
        assert_eq!((&*ok.query, ok.top_k), ("why?", DEFAULT_TOP_K));
        assert_eq!(parse_ask(br#"{"query":"q","topK":20}"#).unwrap().top_k, 20);
        assert_eq!(
            parse_ask(br#"{"query":"q","topK":null}"#).unwrap().top_k,
            DEFAULT_TOP_K
        );
        let long_ok = format!(r#"{{"query":"{}"}}"#, "é".repeat(MAX_QUERY_CHARS));
        assert!(
            parse_ask(long_ok.as_bytes()).is_ok(),
            "limit counts characters, not bytes"
        );
        let bad: &[&[u8]] = &[
            b"",
            b"{",
            b"[]",
            b"{}",
            br#"{"query":5}"#,
            br#"{"query":"   "}"#,
            br#"{"query":"q","topK":0}"#,
            br#"{"query":"q","topK":21}"#,
            br#"{"query":"q","topK":2.5}"#,
            br#"{"query":"q","topK":"3"}"#,
            br#"{"query":"q","topK":-1}"#,
        ];
        for b in bad {
            let e = parse_ask(b).unwrap_err();
            assert_eq!(
                e.code,
                ErrorCode::BadRequest,
                "{}",
                String::from_utf8_lossy(b)
            );
        }
        let too_long = format!(r#"{{"query":"{}"}}"#, "a".repeat(MAX_QUERY_CHARS + 1));
        assert_eq!(
            parse_ask(too_long.as_bytes()).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }

    #[tokio::test]
    async fn body_limits() {
        let d = Duration::from_secs(1);
        let body = Full::new(Bytes::from_static(b"12345"));
        assert_eq!(read_body(body, 5, d).await.unwrap(), "12345");
        let body = Full::new(Bytes::from_static(b"123456"));
        assert_eq!(
            read_body(body, 5, d).await.unwrap_err().code,
            ErrorCode::PayloadTooLarge
        );
    }
}
