//! CORS for the exact origins named by `--cors-origin` (contract §1.4), so a frontend on
//! another origin can call the API without a proxy in between.
//!
//! Deliberately small: an origin is allowed only if it is one of the configured ones,
//! byte for byte; there is no wildcard and no credentials mode (the key travels in
//! `Authorization`, not a cookie). A request from any other origin, or any request when
//! none is configured, gets no CORS header at all.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::body::AskBody;

/// The origins that may call the API from a browser.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cors {
    origins: Vec<HeaderValue>,
}

const ALLOW_METHODS: HeaderValue = HeaderValue::from_static("GET, POST");
const ALLOW_HEADERS: HeaderValue = HeaderValue::from_static("authorization, content-type");
const MAX_AGE: HeaderValue = HeaderValue::from_static("600");
const EXPOSE: HeaderValue = HeaderValue::from_static("x-query-id, retry-after");
const ORIGIN: HeaderValue = HeaderValue::from_static("origin");

impl Cors {
    /// The policy for `origins`, each already checked by [`check_origin`].
    pub(crate) fn new(origins: &[String]) -> Self {
        Cors {
            origins: origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect(),
        }
    }

    /// The request's `Origin`, if it is one of the allowed ones.
    pub(crate) fn allowed(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        if self.origins.is_empty() {
            return None;
        }
        let origin = headers.get(header::ORIGIN)?;
        self.origins
            .iter()
            .any(|o| o.as_bytes() == origin.as_bytes())
            .then(|| origin.clone())
    }

    /// The answer to a preflight from `origin`: 204 with what may follow.
    pub(crate) fn preflight(origin: HeaderValue) -> Response<AskBody> {
        let mut res = Response::new(AskBody::full(bytes::Bytes::new()));
        *res.status_mut() = StatusCode::NO_CONTENT;
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, ALLOW_METHODS);
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOW_HEADERS);
        h.insert(header::ACCESS_CONTROL_MAX_AGE, MAX_AGE);
        h.append(header::VARY, ORIGIN);
        res
    }

    /// Marks a response to `origin`, whatever it is (a stream, a JSON answer, an error),
    /// so the page can read it and its `x-query-id` and `retry-after`.
    pub(crate) fn mark<B>(res: &mut Response<B>, origin: HeaderValue) {
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE);
        h.append(header::VARY, ORIGIN);
    }
}

/// Why `origin` cannot be an allowed origin, if it cannot: it must be what a browser
/// sends in `Origin`, `http://` or `https://`, a lowercase host, an optional port, and
/// nothing after.
pub(crate) fn check_origin(origin: &str) -> Result<(), &'static str> {
    const SHAPE: &str = "each must be an exact origin like https://app.example.com \
                         (http or https, a lowercase host, an optional port; no path, \
                         no wildcard)";
    let Some(rest) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return Err(SHAPE);
    };
    let (host, port) = match rest.rsplit_once(':') {
        // An IPv6 literal's colons are inside brackets.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (rest, None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.[]:".contains(&b));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(SHAPE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_for_their_shape() {
        for good in [
            "https://app.example.com",
            "http://localhost:5173",
            "https://127.0.0.1:8443",
            "http://[::1]:3000",
        ] {
            assert_eq!(check_origin(good), Ok(()), "{good}");
        }
        for bad in [
            "*",
            "null",
            "app.example.com",
            "https://",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://App.Example.com",
            "https://*.example.com",
            "https://app.example.com:",
            "https://app.example.com:99999",
            "ftp://app.example.com",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_configured_origin_is_allowed_byte_for_byte() {
        let cors = Cors::new(&["https://app.example.com".to_string()]);
        let with = |origin: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
            h
        };
        assert_eq!(
            cors.allowed(&with("https://app.example.com")),
            Some(HeaderValue::from_static("https://app.example.com"))
        );
        assert_eq!(cors.allowed(&with("https://app.example.com:443")), None);
        assert_eq!(cors.allowed(&with("http://app.example.com")), None);
        assert_eq!(cors.allowed(&HeaderMap::new()), None);
        assert_eq!(
            Cors::default().allowed(&with("https://app.example.com")),
            None
        );
    }
}
