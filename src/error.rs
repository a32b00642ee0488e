//! The error vocabulary of the API: one code per row of the contract's table (§1.1), its
//! HTTP status, and [`ApiError`], the value every refusal and failure travels as until the
//! service renders it ([`crate::wire`] shapes the bytes).

use bytes::Bytes;
use http::StatusCode;

use crate::wire;

/// A machine-readable error code, exactly the contract's table (§1.1).
///
/// Codes are part of the public contract: clients switch on the string, so a variant's
/// [`as_str`](ErrorCode::as_str) never changes once released. A new code goes before
/// `Internal` and into `ErrorCode::ALL` (the metrics index their counters by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed JSON, a missing/empty/too long `query`, a bad `topK` or `stream` value.
    BadRequest,
    /// Keys are configured and the bearer key is missing or unknown.
    Unauthorized,
    /// Unknown path.
    NotFound,
    /// Known path, wrong method.
    MethodNotAllowed,
    /// The request body is larger than `--max-body-bytes`.
    PayloadTooLarge,
    /// A `content-type` that is present and is not JSON.
    UnsupportedMediaType,
    /// Nothing left in the caller's quota window.
    QuotaExceeded,
    /// `--max-streams` answers are already in flight.
    Overloaded,
    /// The shared quota store is unreachable or too slow; nothing was charged.
    QuotaUnavailable,
    /// The server is draining.
    ShuttingDown,
    /// The generator or retriever failed.
    UpstreamError,
    /// No first token in time, or too long a gap between tokens.
    UpstreamTimeout,
    /// The client did not drain its stream for `--slow-client-secs`.
    SlowClient,
    /// A bug; logged with the query id.
    Internal,
}

impl ErrorCode {
    /// Every code, in declaration order, so `code as usize` indexes it.
    pub(crate) const ALL: [ErrorCode; 14] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::QuotaExceeded,
        ErrorCode::Overloaded,
        ErrorCode::QuotaUnavailable,
        ErrorCode::ShuttingDown,
        ErrorCode::UpstreamError,
        ErrorCode::UpstreamTimeout,
        ErrorCode::SlowClient,
        ErrorCode::Internal,
    ];

    /// The code as clients see it in the `code` field.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
            ErrorCode::Overloaded => "OVERLOADED",
            ErrorCode::QuotaUnavailable => "QUOTA_UNAVAILABLE",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::UpstreamError => "UPSTREAM_ERROR",
            ErrorCode::UpstreamTimeout => "UPSTREAM_TIMEOUT",
            ErrorCode::SlowClient => "SLOW_CLIENT",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    /// The HTTP status used when the error happens before an answer starts.
    ///
    /// `SLOW_CLIENT` can only happen mid-stream; its status (408) is never sent in practice.
    pub const fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Overloaded | ErrorCode::QuotaUnavailable | ErrorCode::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::UpstreamError => StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::SlowClient => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error on its way to a client: a code and a human message.
///
/// Handlers return these as values; the service renders them in one place, as a JSON body
/// or as one SSE event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// What went wrong, for machines.
    pub code: ErrorCode,
    /// What went wrong, for people. Never carries a key or an upstream body.
    pub message: String,
    /// Seconds until retrying can succeed; becomes a `retry-after` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the client when a retry can succeed.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The error object as a JSON document: `{"type":"error","code":…,"message":…}`.
    pub fn to_json(&self) -> Bytes {
        wire::error_json(self.code.as_str(), &self.message)
    }

    /// The error object as one SSE `data:` event.
    pub fn to_event(&self) -> Bytes {
        wire::error_event(self.code.as_str(), &self.message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_every_code_in_declaration_order() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i, "{}", code.as_str());
        }
        assert_eq!(ErrorCode::Internal as usize, ErrorCode::ALL.len() - 1);
    }

    #[test]
    fn json_body_is_the_error_object() {
        let e = ApiError::new(ErrorCode::QuotaExceeded, "no asks left \"today\"");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "QUOTA_EXCEEDED");
        assert_eq!(v["message"], "no asks left \"today\"");
    }

    #[test]
    fn statuses_follow_the_spec_table() {
        assert_eq!(ErrorCode::QuotaExceeded.status(), 429);
        assert_eq!(ErrorCode::Overloaded.status(), 503);
        assert_eq!(ErrorCode::QuotaUnavailable.status(), 503);
        assert_eq!(ErrorCode::ShuttingDown.status(), 503);
        assert_eq!(ErrorCode::UpstreamError.status(), 502);
        assert_eq!(ErrorCode::UpstreamTimeout.status(), 504);
        assert_eq!(ErrorCode::PayloadTooLarge.status(), 413);
        assert_eq!(ErrorCode::UnsupportedMediaType.status(), 415);
    }
}
