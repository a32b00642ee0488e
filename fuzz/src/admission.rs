//! Request admission through the public API: a request made from the input is served by an
//! [`AskService`] called as a hyper `Service`, and the response is drained and judged
//! against the contract (docs/contract.md §1.1).
//!
//! # Input
//!
//! A request written like an HTTP/1.1 request, so the corpus files are readable:
//!
//! ```text
//! POST /api/v1/ai/ask?stream=true HTTP/1.1
//! content-type: application/json
//! authorization: Bearer sk-fuzz
//!
//! {"query":"what is BM25?","topK":3}
//! ```
//!
//! - the request line is `METHOD TARGET [VERSION]`; `HTTP/1.0` and `HTTP/2` are
//!   honoured, anything else is HTTP/1.1. A method or target the `http` crate refuses
//!   ends the input there: hyper refuses such a request before any service sees it;
//! - header lines (`name: value`, `\n` or `\r\n` endings) up to the first empty line; a
//!   header the `http` crate refuses is left out, as hyper would refuse it;
//! - everything after the empty line is the body, sent whole (`Full`, its length known
//!   in advance, as with a `content-length`), unless a `transfer-encoding` header is
//!   present: then it is streamed in frames of 1, 2, 4, 8… bytes with no length known,
//!   and if that header's value contains `abort`, the body fails after its last frame (a
//!   client that went away mid-body);
//! - a header `x-fuzz-read-frames: N` is for the harness, not sent: the client reads N
//!   frames of the response body, then drops it (a client that leaves mid-answer).
//!
//! # Services
//!
//! Each input is served twice, by two services built once: an open-mode one (the default
//! config: 64 KiB bodies, quota limit `u32::MAX`), and one with a keys table (`sk-fuzz`,
//! with the config's limit, and `sk-zero`, with limit 0) and 1 KiB bodies. Both use the
//! sim generator with no delays and 4 tokens, so every answer completes at once.
//!
//! # Invariants
//!
//! - no panic, and the response (body included) comes within 10 s;
//! - the status is one of the contract's for this setup: 200, 400, 401, 404, 405, 413,
//!   415 or 429 (with the sim generator and in-memory quota nothing else can happen);
//! - an error is the error object `{"type":"error","code","message"}` with the code the
//!   table gives its status: a JSON body, or, for a streaming ask, one SSE `data:` event
//!   and nothing else; 405 carries `allow`, 429 carries `retry-after`;
//! - a 200 streaming answer has the contract's headers (`connection: keep-alive` on
//!   HTTP/1.x when the connection stays open, never otherwise), and its body decodes
//!   cleanly into exactly 4 `token` events then one `done` whose `queryId` is the
//!   `x-query-id` header; a 200 JSON answer has its fields;
//! - no answer is left in flight once its response is drained;
//! - the keys service answers as the open one does, except 401 (its auth), 429 (`sk-zero`)
//!   and 413 for bodies over its 1 KiB;
//! - quota is never lost: `sk-fuzz`'s remaining quota drops by exactly one per 200 ask
//!   whose answer (`done`, or the JSON document) reached the client, and never otherwise:
//!   a client that leaves before is refunded.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use askstream::auth::Auth;
use askstream::pipeline::sim::SimConfig;
use askstream::sse::decode::{Decoder, Eof, Item};
use askstream::{AskBody, AskService, GeneratorConfig, ServiceConfig};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::service::Service;
use serde_json::Value;

use crate::verbose;

const ASK_PATH: &str = "/api/v1/ai/ask";
const QUOTA_PATH: &str = "/api/v1/quota";
const KEYS: &str = "sk-fuzz fuzzer\nsk-zero nobody 0\n";
const KEYS_MAX_BODY: u64 = 1024;
const TOKENS: u32 = 4;

struct Harness {
    rt: tokio::runtime::Runtime,
    open: AskService,
    keys: AskService,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        let config = ServiceConfig {
            generator: GeneratorConfig::Sim(SimConfig {
                ttft: Duration::ZERO,
                token_interval: Duration::ZERO,
                tokens: TOKENS,
            }),
            quota_limit: u32::MAX,
            ..ServiceConfig::default()
        };
        let open = AskService::builder(config.clone())
            .build()
            .expect("the open service builds");
        let keys = AskService::builder(ServiceConfig {
            max_body_bytes: KEYS_MAX_BODY,
            ..config
        })
        .auth(Auth::parse(KEYS).expect("the keys parse"))
        .build()
        .expect("the keys service builds");
        Harness { rt, open, keys }
    })
}

/// The request an input describes, before it is built (it is built once per service).
struct Spec {
    method: Method,
    uri: Uri,
    version: Version,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    streamed: bool,
    abort: bool,
    /// `x-fuzz-read-frames: N`: the client reads N response frames, then leaves.
    read_frames: Option<usize>,
}

fn parse(data: &[u8]) -> Option<Spec> {
    let mut rest = data;
    let mut next_line = || -> Option<&[u8]> {
        if rest.is_empty() {
            return None;
        }
        let (line, after) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &b""[..]),
        };
        rest = after;
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    };
    let request_line = next_line()?;
    let mut parts = request_line.split(|&b| b == b' ').filter(|p| !p.is_empty());
    let method = Method::from_bytes(parts.next()?).ok()?;
    let uri = Uri::try_from(parts.next()?).ok()?;
    let version = match parts.next() {
        Some(b"HTTP/1.0") => Version::HTTP_10,
        Some(b"HTTP/2" | b"HTTP/2.0") => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    let mut headers = Vec::new();
    let mut streamed = false;
    let mut abort = false;
    let mut read_frames = None;
    while let Some(line) = next_line() {
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let trim = |b: &[u8]| -> Vec<u8> {
            let s = b
                .iter()
                .position(|c| !matches!(c, b' ' | b'\t'))
                .unwrap_or(b.len());
            let e = b
                .iter()
                .rposition(|c| !matches!(c, b' ' | b'\t'))
                .map_or(s, |i| i + 1);
            b[s..e.max(s)].to_vec()
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&trim(&line[colon + 1..])),
        ) else {
            continue;
        };
        if name == "x-fuzz-read-frames" {
            // For the harness, not the service.
            read_frames = value.to_str().ok().and_then(|v| v.parse().ok());
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            streamed = true;
            abort |= value.as_bytes().windows(5).any(|w| w == b"abort");
        }
        headers.push((name, value));
    }
    Some(Spec {
        method,
        uri,
        version,
        headers,
        body: Bytes::copy_from_slice(rest),
        streamed,
        abort,
        read_frames,
    })
}

/// A request body: whole with its length known, or frames with no length (and maybe a
/// failure at the end).
enum ReqBody {
    Whole(Option<Bytes>),
    Frames {
        frames: VecDeque<Bytes>,
        abort: bool,
    },
}

#[derive(Debug)]
struct ClientGone;

impl std::fmt::Display for ClientGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client went away")
    }
}

impl std::error::Error for ClientGone {}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = ClientGone;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientGone>>> {
        Poll::Ready(match self.get_mut() {
            ReqBody::Whole(bytes) => bytes.take().map(|b| Ok(Frame::data(b))),
            ReqBody::Frames { frames, abort } => match frames.pop_front() {
                Some(b) => Some(Ok(Frame::data(b))),
                None if *abort => {
                    *abort = false;
                    Some(Err(ClientGone))
                }
                None => None,
            },
        })
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Whole(bytes) => bytes.is_none(),
            ReqBody::Frames { frames, abort } => frames.is_empty() && !abort,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ReqBody::Whole(bytes) => {
                http_body::SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ReqBody::Frames { .. } => http_body::SizeHint::default(),
        }
    }
}

fn build(spec: &Spec) -> Request<ReqBody> {
    let body = if spec.streamed {
        let mut frames = VecDeque::new();
        let (mut at, mut size) = (0, 1);
        while at < spec.body.len() {
            let end = (at + size).min(spec.body.len());
            frames.push_back(spec.body.slice(at..end));
            at = end;
            size *= 2;
        }
        ReqBody::Frames {
            frames,
            abort: spec.abort,
        }
    } else {
        ReqBody::Whole(Some(spec.body.clone()))
    };
    let mut req = Request::new(body);
    *req.method_mut() = spec.method.clone();
    *req.uri_mut() = spec.uri.clone();
    *req.version_mut() = spec.version;
    for (name, value) in &spec.headers {
        req.headers_mut().append(name.clone(), value.clone());
    }
    req
}

/// A drained response.
struct Served {
    status: StatusCode,
    headers: http::HeaderMap,
    /// What was read of the body: all of it, unless the client left early.
    body: Bytes,
    /// The body was read to its end.
    complete: bool,
}

/// Serves `req`, reading at most `read_frames` frames of the response body (all of it
/// when `None`) and then dropping it, as a client that leaves.
fn serve<B>(
    h: &Harness,
    service: &AskService,
    req: Request<B>,
    read_frames: Option<usize>,
) -> Served
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    h.rt.block_on(async {
        let served = tokio::time::timeout(Duration::from_secs(10), async {
            let res: Response<AskBody> = match service.call(req).await {
                Ok(res) => res,
                Err(never) => match never {},
            };
            let (parts, mut body) = res.into_parts();
            let mut read = Vec::new();
            let mut frames = 0;
            let complete = loop {
                if read_frames.is_some_and(|n| frames >= n) {
                    break body.is_end_stream();
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        frames += 1;
                        if let Some(data) = frame.data_ref() {
                            read.extend_from_slice(data);
                        }
                    }
                    Some(Err(never)) => match never {},
                    None => break true,
                }
            };
            drop(body);
            // Every answer spawned for this request settles or refunds.
            service.answers_finished().await;
            Served {
                status: parts.status,
                headers: parts.headers,
                body: Bytes::from(read),
                complete,
            }
        })
        .await
        .expect("the response, body included, came within 10 s (a hang)");
        assert_eq!(
            service.in_flight(),
            0,
            "an answer still in flight after its end"
        );
        served
    })
}

pub fn admission(data: &[u8]) {
    let Some(spec) = parse(data) else {
        return;
    };
    let h = harness();
    let is_ask = spec.method == Method::POST && spec.uri.path() == ASK_PATH;

    let open = serve(h, &h.open, build(&spec), spec.read_frames);
    check(&spec, &open);
    if verbose() {
        eprintln!(
            "{} {} {:?}: open {} {}",
            spec.method,
            spec.uri,
            spec.version,
            open.status,
            String::from_utf8_lossy(&open.body[..open.body.len().min(160)])
        );
    }

    let before = is_ask.then(|| quota_of_sk_fuzz(h));
    let keys = serve(h, &h.keys, build(&spec), spec.read_frames);
    check(&spec, &keys);
    if verbose() {
        eprintln!(
            "    keys {} {}",
            keys.status,
            String::from_utf8_lossy(&keys.body[..keys.body.len().min(160)])
        );
    }
    if keys.status != open.status {
        let allowed = keys.status == StatusCode::UNAUTHORIZED
            || keys.status == StatusCode::TOO_MANY_REQUESTS
            || (keys.status == StatusCode::PAYLOAD_TOO_LARGE
                && spec.body.len() as u64 > KEYS_MAX_BODY);
        assert!(
            allowed,
            "the keys service answered {} where the open one answered {}",
            keys.status, open.status
        );
    }
    if let Some(before) = before {
        let after = quota_of_sk_fuzz(h);
        // Only a 200 whose answer reached the client spends (`sk-zero` never gets one); a
        // client that left before it is refunded. A window that turned in between resets
        // the count, so the check is skipped then.
        let spent = u64::from(keys.status == StatusCode::OK && delivered(&keys));
        if verbose() {
            eprintln!(
                "    sk-fuzz quota {} -> {} (complete: {}, delivered: {})",
                before.0,
                after.0,
                keys.complete,
                delivered(&keys)
            );
        }
        if before.1 == after.1 {
            assert_eq!(
                after.0,
                before.0 - spent,
                "sk-fuzz's remaining quota across a {} ask",
                keys.status
            );
        }
    }
}

/// Whether the client got the answer: the `done` event of a stream, or the JSON document.
fn delivered(res: &Served) -> bool {
    if !header_is(res, header::CONTENT_TYPE, "text/event-stream") {
        return !res.body.is_empty();
    }
    let mut decoder = Decoder::new();
    decoder.feed(&res.body);
    while let Ok(Some(item)) = decoder.next_item() {
        if let Item::Event(e) = item
            && serde_json::from_str::<Value>(&e.data).is_ok_and(|v| v["type"] == "done")
        {
            return true;
        }
    }
    false
}

/// `sk-fuzz`'s remaining quota and the end of its window.
fn quota_of_sk_fuzz(h: &Harness) -> (u64, String) {
    let req = Request::get(QUOTA_PATH)
        .header(header::AUTHORIZATION, "Bearer sk-fuzz")
        .body(ReqBody::Whole(None))
        .expect("a quota request");
    let res = serve(h, &h.keys, req, None);
    assert_eq!(res.status, StatusCode::OK, "quota status of sk-fuzz");
    let v: Value = serde_json::from_slice(&res.body).expect("the quota status is JSON");
    (
        v["remaining"].as_u64().expect("remaining"),
        v["resetsAt"].as_str().expect("resetsAt").to_owned(),
    )
}

/// Whether the connection stays open after the response, by HTTP/1's rule: on 1.1
/// unless the client sent a `close` token, on 1.0 only with a `keep-alive` token.
fn stays_open(spec: &Spec) -> bool {
    let has = |token: &str| {
        spec.headers
            .iter()
            .filter(|(name, _)| *name == header::CONNECTION)
            .filter_map(|(_, value)| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match spec.version {
        Version::HTTP_11 => !has("close"),
        Version::HTTP_10 => has("keep-alive"),
        _ => false,
    }
}

fn header_is(res: &Served, name: HeaderName, value: &str) -> bool {
    res.headers.get(&name).and_then(|v| v.to_str().ok()) == Some(value)
}

fn check(spec: &Spec, res: &Served) {
    let code = match res.status.as_u16() {
        200 => None,
        400 => Some("BAD_REQUEST"),
        401 => Some("UNAUTHORIZED"),
        404 => Some("NOT_FOUND"),
        405 => Some("METHOD_NOT_ALLOWED"),
        413 => Some("PAYLOAD_TOO_LARGE"),
        415 => Some("UNSUPPORTED_MEDIA_TYPE"),
        429 => Some("QUOTA_EXCEEDED"),
        other => panic!("status {other}, not one this setup can give"),
    };
    let event_stream = header_is(res, header::CONTENT_TYPE, "text/event-stream");
    let is_ask = spec.method == Method::POST && spec.uri.path() == ASK_PATH;
    if event_stream {
        assert!(is_ask, "an event stream from something else than an ask");
        assert!(header_is(res, header::CACHE_CONTROL, "no-cache"));
        assert!(header_is(
            res,
            HeaderName::from_static("x-accel-buffering"),
            "no"
        ));
        let keep_alive = header_is(res, header::CONNECTION, "keep-alive");
        assert_eq!(
            keep_alive,
            stays_open(spec),
            "connection: keep-alive on HTTP/1.x, when the connection stays open"
        );
    }
    if !res.complete {
        // The client left: what it read may be any prefix.
        return;
    }
    match code {
        Some(code) => {
            let object = if event_stream {
                let events = decode_events(&res.body);
                assert_eq!(events.len(), 1, "a refusal is exactly one event");
                events.into_iter().next().unwrap_or_default()
            } else {
                assert!(
                    header_is(res, header::CONTENT_TYPE, "application/json"),
                    "an error body is JSON"
                );
                String::from_utf8(res.body.to_vec()).expect("the error body is UTF-8")
            };
            let v: Value = serde_json::from_str(&object).expect("the error object is JSON");
            assert_eq!(v["type"], "error", "{object}");
            assert_eq!(v["code"], code, "{object}");
            assert!(v["message"].is_string(), "{object}");
            if code == "METHOD_NOT_ALLOWED" {
                assert!(res.headers.contains_key(header::ALLOW), "405 without allow");
            }
            if code == "QUOTA_EXCEEDED" {
                assert!(
                    res.headers.contains_key(header::RETRY_AFTER),
                    "429 without retry-after"
                );
            }
        }
        None if is_ask => {
            let query_id = res
                .headers
                .get("x-query-id")
                .and_then(|v| v.to_str().ok())
                .expect("an answer has an x-query-id")
                .to_owned();
            if event_stream {
                let events = decode_events(&res.body);
                let docs: Vec<Value> = events
                    .iter()
                    .map(|e| serde_json::from_str(e).expect("each event is JSON"))
                    .collect();
                let (done, tokens) = docs.split_last().expect("an answer has events");
                assert_eq!(tokens.len(), TOKENS as usize, "token events: {events:?}");
                for t in tokens {
                    assert_eq!(t["type"], "token", "{t}");
                    assert!(t["token"].is_string(), "{t}");
                }
                assert_eq!(done["type"], "done", "the last event: {done}");
                assert_eq!(done["queryId"], query_id.as_str(), "{done}");
                assert!(done["sources"].is_array(), "{done}");
                assert!(done["quotaRemaining"].is_u64(), "{done}");
            } else {
                assert!(header_is(res, header::CONTENT_TYPE, "application/json"));
                let v: Value = serde_json::from_slice(&res.body).expect("the answer is JSON");
                assert_eq!(v["queryId"], query_id.as_str(), "{v}");
                assert!(v["answer"].is_string(), "{v}");
                assert!(v["sources"].is_array(), "{v}");
                assert!(v["quotaRemaining"].is_u64(), "{v}");
                assert!(v["usage"].is_object() && v["timing"].is_object(), "{v}");
            }
        }
        None => {}
    }
}

/// The `data` of each event of a complete stream; comments (heartbeats) are skipped.
fn decode_events(body: &[u8]) -> Vec<String> {
    let mut decoder = Decoder::new();
    decoder.feed(body);
    let mut out = Vec::new();
    while let Some(item) = decoder.next_item().expect("the stream decodes") {
        match item {
            Item::Event(e) => {
                assert_eq!(e.event, "message", "only unnamed events");
                out.push(e.data);
            }
            Item::Comment(_) => {}
        }
    }
    assert_eq!(
        decoder.finish(),
        Eof::Clean,
        "the stream ends between events"
    );
    out
}
