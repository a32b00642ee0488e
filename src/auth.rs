//! Who is asking: the keys file, or open mode.
//!
//! STUB — being implemented (see issue 2 §5). Signatures are the contract.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use http::HeaderMap;

use crate::error::ApiError;

/// A user's identity, the key of the quota map. Its `Debug`/`Display` never print a
/// secret: in open mode a bearer token is the user id, so it prints as a fingerprint.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserId {
    id: Arc<str>,
    secret: bool,
}

impl UserId {
    /// A user id that may be shown in logs.
    pub fn new(id: impl Into<Arc<str>>) -> Self { UserId { id: id.into(), secret: false } }
    /// A user id derived from a secret (open mode's bearer text); logs show a fingerprint.
    pub fn from_secret(id: impl Into<Arc<str>>) -> Self { UserId { id: id.into(), secret: true } }
    /// The id itself, for the quota map. Do not log it; log the `Display` form.
    pub fn as_str(&self) -> &str { &self.id }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.secret { f.write_str("bearer:?") } else { f.write_str(&self.id) }
    }
}

impl std::fmt::Debug for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserId({self})")
    }
}

/// The caller, as far as quota is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Whose quota this ask draws from.
    pub user: UserId,
    /// The user's own limit from the keys file, if set.
    pub limit: Option<u32>,
}

/// How callers are identified.
pub enum Auth {
    /// No keys file: user = bearer text, else client IP.
    Open,
    /// Keys from a keys file.
    Keys(KeyTable),
}

/// The parsed keys file.
pub struct KeyTable {}

/// A keys file that could not be read or parsed.
#[derive(Debug)]
pub struct KeysError(pub String);

impl Auth {
    /// Loads a keys file.
    pub fn from_file(path: &Path) -> Result<Auth, KeysError> { let _ = path; Ok(Auth::Open) }
    /// Identifies the caller of a request.
    pub fn identify(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Result<Identity, ApiError> {
        let _ = (headers, peer);
        Ok(Identity { user: UserId::new("anon"), limit: None })
    }
}
