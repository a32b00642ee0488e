//! The demo page, and the browser client it is built on.
//!
//! `GET /` is a small page that shows what the API promises: an answer printing token by
//! token, its sources, the caller's quota, errors with their codes, and a Stop button
//! that disconnects (and so refunds). Its script, `/app.js`, renders; `/client.js` is the
//! reusable part — the fetch + stream-reader client of the README, as an ES module that
//! anyone writing a frontend can import or copy.
//!
//! Every file is compiled into the binary and served from a static [`Bytes`]: no files
//! beside the server, no build step, no framework, no CDN. The page's
//! [content security policy](PAGE_CSP) allows only same-origin scripts, styles and
//! requests, and no inline script or style, so the page itself must never need them: it
//! renders server data as text, never as HTML.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

/// The page.
pub(crate) const PAGE_PATH: &str = "/";
/// The page's script: the form, rendering, the Stop button.
pub(crate) const APP_PATH: &str = "/app.js";
/// The reusable client module: `ask()`, `getQuota()` and an incremental event parser.
pub(crate) const CLIENT_PATH: &str = "/client.js";
/// The page's style sheet (a file, because the CSP forbids inline styles).
pub(crate) const STYLE_PATH: &str = "/style.css";

/// The page's content security policy: everything from its own origin, nothing inline,
/// nothing framed, no `<base>` rewriting, no form posting elsewhere.
pub(crate) const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
    style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// One embedded file and how it is served.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Asset {
    /// The path it is served at.
    pub path: &'static str,
    /// Its `content-type`.
    pub content_type: &'static str,
    /// Its bytes, compiled into the binary.
    pub body: &'static [u8],
    /// A `content-security-policy`, for documents (scripts and styles need none).
    pub csp: Option<&'static str>,
}

/// Every file of the demo page.
pub(crate) const ASSETS: [Asset; 4] = [
    Asset {
        path: PAGE_PATH,
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("index.html"),
        csp: Some(PAGE_CSP),
    },
    Asset {
        path: APP_PATH,
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("app.js"),
        csp: None,
    },
    Asset {
        path: CLIENT_PATH,
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("client.js"),
        csp: None,
    },
    Asset {
        path: STYLE_PATH,
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("style.css"),
        csp: None,
    },
];

/// The file served at `path`, if any.
pub(crate) fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

impl Asset {
    /// A 200 response with the file and its headers. The body is the same for `HEAD`:
    /// hyper sends the headers (with the `content-length`) and leaves the body out.
    pub(crate) fn response(&self) -> Response<Bytes> {
        let mut res = Response::new(Bytes::from_static(self.body));
        *res.status_mut() = StatusCode::OK;
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        // The files change with the binary, not with time: revalidate on every load so an
        // upgraded server is never paired with a cached older script.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        if let Some(csp) = self.csp {
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(csp),
            );
            // For browsers older than CSP's `frame-ancestors`.
            h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_finds_its_asset() {
        for a in &ASSETS {
            assert_eq!(asset(a.path).map(|b| b.path), Some(a.path));
            assert!(!a.body.is_empty(), "{} is empty", a.path);
        }
        assert!(asset("/index.html").is_none());
        assert!(asset("/client.js/").is_none());
    }

    #[test]
    fn the_page_policy_allows_nothing_inline() {
        assert!(!PAGE_CSP.contains("unsafe"));
        assert!(PAGE_CSP.starts_with("default-src 'none'"));
        // `from_static` panics on a bad value; building the response proves it is valid.
        let res = asset(PAGE_PATH).unwrap().response();
        assert_eq!(res.headers()[header::CONTENT_SECURITY_POLICY], PAGE_CSP);
    }
}
