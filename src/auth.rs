//! Who is asking: the keys file, or open mode.
//!
//! With `--keys FILE` every request must carry `Authorization: Bearer <api-key>` naming a
//! key from the file; the key maps to a user id (the quota map's key) and optionally to
//! that user's own limit. Without a keys file the server runs in open mode, meant for local
//! use and load tests: the bearer token stands for its user (as a digest, see
//! [`UserId::of_bearer`]), else the client's IP address does.
//!
//! Keys are secrets and never leave this module in readable form (contract §3): errors about the
//! keys file name a line number, not the key; `Debug` for [`Auth`] prints
//! counts; an unknown key is refused without echoing it; and an open-mode bearer token,
//! possibly someone's real key, is kept only as its digest and displays as 32 bits of it.
//!
//! Keys are looked up in a `HashMap` with std's randomly keyed SipHash, so a client cannot
//! aim guesses at a key's bucket and learn from response timing which prefixes exist.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::num::IntErrorKind;
use std::path::Path;
use std::sync::Arc;

use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::error::{ApiError, ErrorCode};

/// A user's identity, the key of the quota map. Its `Debug`/`Display` never print a
/// secret: in open mode a bearer token is the user id, so it prints as a fingerprint.
///
/// Equality and hashing look at the id alone, exactly as the quota map does (it is keyed
/// by [`UserId::as_str`]): two `UserId`s that share a quota compare equal.
#[derive(Clone)]
pub struct UserId {
    id: Arc<str>,
    secret: bool,
}

impl UserId {
    /// A user id that may be shown in logs.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        UserId {
            id: id.into(),
            secret: false,
        }
    }
    /// The user an open-mode bearer token stands for: `token:` and 128 bits of the token's
    /// SHA-256, in hex. A digest, so that a user costs the same memory (and the same store
    /// key) whatever the token's length, and so that every instance and every build maps
    /// a token to the same user; in its own namespace, so a token that reads like an IP
    /// address is not that address's user. Logs show only its first 32 bits.
    pub fn of_bearer(token: &str) -> Self {
        use sha2::{Digest, Sha256};
        const PREFIX: &[u8] = b"token:";
        let digest = Sha256::digest(token.as_bytes());
        let mut high = [0u8; 16];
        high.copy_from_slice(&digest[..16]);
        // Spelled out on the stack, then one allocation for the id: every ask in open
        // mode comes through here, and formatting each byte cost more than the digest.
        let mut id = [0u8; PREFIX.len() + 32];
        id[..PREFIX.len()].copy_from_slice(PREFIX);
        id[PREFIX.len()..].copy_from_slice(&crate::wire::hex_128(u128::from_be_bytes(high)));
        let id = std::str::from_utf8(&id).expect("a prefix and hex digits are ASCII");
        UserId {
            id: id.into(),
            secret: true,
        }
    }

    /// The user an open-mode client without a token is: its address, in the `ip:`
    /// namespace.
    pub(crate) fn of_address(ip: Option<IpAddr>) -> Self {
        let id = match ip {
            // A dual-stack listener reports IPv4 clients as `::ffff:a.b.c.d`; use the
            // plain IPv4 form so one client is one user however it connected.
            Some(ip) => format!("ip:{}", ip.to_canonical()),
            None => "ip:unknown".to_owned(),
        };
        UserId::new(id)
    }
    /// The id itself, for the quota map. Do not log it; log the `Display` form.
    pub fn as_str(&self) -> &str {
        &self.id
    }
    /// Whether the id came from a secret, so that its `Display` form is a fingerprint.
    #[cfg(test)]
    fn is_secret(&self) -> bool {
        self.secret
    }
}

impl PartialEq for UserId {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for UserId {}

impl Hash for UserId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.secret {
            // The digest's first 32 bits: enough to tell one caller's lines from another's,
            // too few to search for the token.
            let hex = self.id.strip_prefix("token:").unwrap_or_default();
            write!(f, "bearer:{}", hex.get(..8).unwrap_or_default())
        } else {
            f.write_str(&self.id)
        }
    }
}

impl std::fmt::Debug for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserId({self})")
    }
}

/// The caller, as far as quota is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    /// Whose quota this ask draws from.
    pub(crate) user: UserId,
    /// The user's own limit from the keys file, if set.
    pub(crate) limit: Option<u32>,
}

/// How callers are identified: open mode, or the keys of a keys file.
pub struct Auth {
    mode: Mode,
}

impl std::fmt::Debug for Auth {
    /// `Open`, or the number of keys and users: never a key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.mode.fmt(f)
    }
}

#[derive(Debug)]
enum Mode {
    /// No keys file: user = bearer text, else client IP.
    Open,
    /// Keys from a keys file.
    Keys(KeyTable),
}

/// The parsed keys file.
struct KeyTable {
    /// Key text → who it identifies. The `Identity` is built once at load time, so
    /// identifying a request clones an `Arc` instead of allocating.
    keys: HashMap<Box<str>, Identity>,
}

/// A keys file that could not be read or parsed. The message names the file and line,
/// never a key.
#[derive(Debug)]
pub struct KeysError(String);

impl std::fmt::Display for KeysError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeysError {}

/// The line format, quoted in parse errors so the fix is obvious.
const FORMAT: &str = "expected `<api-key> <user-id> [limit]`";

/// Limits longer than this are not quoted in errors: a long word in the limit column is
/// more likely a misplaced key than a mistyped number.
const MAX_QUOTED_LIMIT: usize = 16;

impl KeyTable {
    /// Parses the text of a keys file: one `<api-key> <user-id> [limit]` per line,
    /// whitespace-separated; blank lines are skipped, and a word starting with `#` starts a
    /// comment that runs to the end of the line (so `#` inside a key is part of the key).
    ///
    /// A file with no keys is an error: it would refuse every request, which is never
    /// what a server started with `--keys` is for.
    fn parse(text: &str) -> Result<KeyTable, KeysError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // Key → (line it was defined on, identity); borrows the text until the end.
        let mut seen: HashMap<&str, (usize, Identity)> = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let n = index + 1;
            let err = |what: String| KeysError(format!("line {n}: {what}"));
            let mut fields = line.split_whitespace().take_while(|w| !w.starts_with('#'));
            let Some(key) = fields.next() else { continue };
            let Some(user) = fields.next() else {
                return Err(err(format!("a key with no user id; {FORMAT}")));
            };
            let limit = fields
                .next()
                .map(|t| parse_limit(t).map_err(err))
                .transpose()?;
            if fields.next().is_some() {
                return Err(err(format!(
                    "too many fields; {FORMAT} (a `#` comment must follow whitespace)"
                )));
            }
            // A header value that is not visible ASCII never reaches us as text, so such a
            // key could never be used; better to say so now than to refuse it forever.
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err(
                    "the key has characters an Authorization header cannot carry \
                     (only visible ASCII is allowed)"
                        .to_owned(),
                ));
            }
            let identity = Identity {
                user: UserId::new(user),
                limit,
            };
            match seen.entry(key) {
                Entry::Occupied(first) => {
                    return Err(err(format!(
                        "duplicate key (first defined on line {})",
                        first.get().0
                    )));
                }
                Entry::Vacant(slot) => {
                    slot.insert((n, identity));
                }
            }
        }
        if seen.is_empty() {
            return Err(KeysError(
                "no keys defined: every request would be refused".to_owned(),
            ));
        }
        let keys = seen
            .into_iter()
            .map(|(key, (_, identity))| (Box::from(key), identity))
            .collect();
        Ok(KeyTable { keys })
    }

    /// Who `key` identifies, if anyone.
    fn lookup(&self, key: &str) -> Option<&Identity> {
        self.keys.get(key)
    }

    /// How many keys the file defined.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys.len()
    }
}

impl std::fmt::Debug for KeyTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut users: Vec<&str> = self.keys.values().map(|i| i.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        f.debug_struct("KeyTable")
            .field("keys", &self.keys.len())
            .field("users", &users.len())
            .finish()
    }
}

/// The limit column: a whole number of asks per window.
fn parse_limit(text: &str) -> Result<u32, String> {
    text.parse::<u32>().map_err(|e| match e.kind() {
        // A long run of digits is quoted no more than any other long word: it may be a
        // numeric key in the wrong column, and a line of a million digits is no message.
        IntErrorKind::PosOverflow if text.len() > MAX_QUOTED_LIMIT => format!(
            "the limit ({} digits) is too large (at most {})",
            text.len(),
            u32::MAX
        ),
        IntErrorKind::PosOverflow => {
            format!("limit `{text}` is too large (at most {})", u32::MAX)
        }
        _ if text.len() > MAX_QUOTED_LIMIT => {
            "the limit is not a number (is a key in the wrong column?)".to_owned()
        }
        _ => format!("limit `{text}` is not a number"),
    })
}

impl Auth {
    /// Open mode: the user is the bearer text, else the client's address. For local use
    /// and load tests; anyone can spend anyone's quota by naming it.
    pub fn open() -> Auth {
        Auth { mode: Mode::Open }
    }

    /// Loads a keys file.
    pub fn from_file(path: &Path) -> Result<Auth, KeysError> {
        let in_file =
            |why: &dyn std::fmt::Display| KeysError(format!("keys file {}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| in_file(&e))?;
        Auth::parse(&text).map_err(|e| in_file(&e))
    }

    /// Parses the text of a keys file: one `<api-key> <user-id> [limit]` per line,
    /// whitespace-separated, blank lines skipped, and a word starting with `#` starts a
    /// comment to the end of the line. For embedders that keep keys elsewhere than a file.
    ///
    /// A text with no keys is an error: it would refuse every request.
    pub fn parse(text: &str) -> Result<Auth, KeysError> {
        KeyTable::parse(text).map(|t| Auth {
            mode: Mode::Keys(t),
        })
    }

    /// Identifies the caller of a request.
    ///
    /// Keys mode: the bearer key must be in the table, else `UNAUTHORIZED`. Open mode never
    /// refuses: the user is the bearer token's digest, else the client's address (`peer`),
    /// else `ip:unknown` when the transport knows no address. An `Authorization` header that is
    /// not a well-formed single `Bearer <token>` counts as no header.
    pub(crate) fn identify(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Identity, ApiError> {
        let token = bearer_token(headers);
        match &self.mode {
            Mode::Keys(table) => match token {
                None => Err(ApiError::new(
                    ErrorCode::Unauthorized,
                    "missing API key: send `Authorization: Bearer <api-key>`",
                )),
                Some(token) => table
                    .lookup(token)
                    .cloned()
                    .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "unknown API key")),
            },
            Mode::Open => {
                let user = match token {
                    Some(token) => UserId::of_bearer(token),
                    None => UserId::of_address(peer),
                };
                Ok(Identity { user, limit: None })
            }
        }
    }
}

/// The token of a single `Authorization: Bearer <token>` header. The scheme is
/// case-insensitive (RFC 9110 §11.1); anything else — no header, several, another scheme,
/// bytes that are not visible ASCII, an empty or space-containing token — is `None`.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        // Two credentials are ambiguous (a proxy may have read the other one).
        return None;
    }
    let (scheme, token) = value.to_str().ok()?.trim().split_once([' ', '\t'])?;
    let token = token.trim_matches([' ', '\t']);
    let well_formed =
        scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains([' ', '\t']);
    well_formed.then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const FILE: &str = "\
# askstream keys
sk-alice-1   alice
sk-alice-2\talice 50   # a second key for alice, with her own limit

  sk-bob#7 bob 0 # bob may not ask; `#` inside a key is part of it
sk-carol carol#not-a-comment\r
";

    fn headers(auth: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in auth {
            h.append(AUTHORIZATION, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn keys() -> Auth {
        Auth::parse(FILE).unwrap()
    }

    #[test]
    fn parses_keys_users_limits_and_comments() {
        let Mode::Keys(t) = keys().mode else {
            panic!("keys mode")
        };
        assert_eq!(t.len(), 4);
        let id = |k| t.lookup(k).cloned();
        assert_eq!(
            id("sk-alice-1"),
            Some(Identity {
                user: UserId::new("alice"),
                limit: None
            })
        );
        assert_eq!(
            id("sk-alice-2"),
            Some(Identity {
                user: UserId::new("alice"),
                limit: Some(50)
            })
        );
        assert_eq!(
            id("sk-bob#7"),
            Some(Identity {
                user: UserId::new("bob"),
                limit: Some(0)
            })
        );
        assert_eq!(id("sk-carol").unwrap().user.as_str(), "carol#not-a-comment");
        assert_eq!(id("sk-bob"), None);
        assert_eq!(id("#"), None);
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_key() {
        let auth = Auth::parse("\u{feff}k1 u1\n").unwrap();
        let h = headers(&[b"Bearer k1"]);
        assert_eq!(auth.identify(&h, None).unwrap().user.as_str(), "u1");
    }

    #[test]
    fn parse_errors_name_the_line_and_never_the_key() {
        let secret = "sk-SECRET-123";
        let digits = "9".repeat(5000);
        let cases: [(String, &str); 8] = [
            (
                format!("{secret} u {digits}"),
                "line 1: the limit (5000 digits) is too large (at most 4294967295)",
            ),
            (format!("ok u\n{secret}\n"), "line 2: a key with no user id"),
            (
                format!("# c\n\n{secret} u abc\n"),
                "line 3: limit `abc` is not a number",
            ),
            (
                format!("{secret} u -1"),
                "line 1: limit `-1` is not a number",
            ),
            (
                format!("{secret} u 4294967296"),
                "line 1: limit `4294967296` is too large",
            ),
            (format!("{secret} u 5 extra"), "line 1: too many fields"),
            (
                format!("{secret} u\nx y\n{secret} v"),
                "line 3: duplicate key (first defined on line 1)",
            ),
            (
                format!("{secret}\u{e9} u"),
                "line 1: the key has characters",
            ),
        ];
        for (text, expected) in cases {
            let e = Auth::parse(&text).unwrap_err().to_string();
            assert!(
                e.starts_with(expected),
                "{e:?} should start with {expected:?}"
            );
            assert!(!e.contains(secret), "{e:?} leaks the key");
        }
        // A long word in the limit column may be a key; it is not quoted.
        let e = Auth::parse("k u sk-live-0123456789abcdef")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "line 1: the limit is not a number (is a key in the wrong column?)"
        );
    }

    #[test]
    fn a_file_without_keys_is_an_error() {
        for text in ["", "\n\n", "# only comments\n   # here\n"] {
            let e = Auth::parse(text).unwrap_err();
            assert!(e.to_string().contains("no keys"), "{e}");
        }
    }

    #[test]
    fn from_file_reads_and_names_the_file() {
        let path = std::env::temp_dir().join(format!("askstream-keys-{}.txt", std::process::id()));
        std::fs::write(&path, "sk-file-key fileuser 3\nsk-file-key other\n").unwrap();
        let e = Auth::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains(&*path.to_string_lossy()) && e.contains("line 2: duplicate key"),
            "{e}"
        );
        assert!(!e.contains("sk-file-key"));
        std::fs::write(&path, "sk-file-key fileuser 3\n").unwrap();
        let auth = Auth::from_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let Mode::Keys(table) = &auth.mode else {
            panic!("keys mode")
        };
        assert_eq!(table.len(), 1);

        let e = Auth::from_file(&path).unwrap_err().to_string();
        assert!(
            e.starts_with("keys file ") && e.contains(&*path.to_string_lossy()),
            "{e}"
        );
    }

    #[test]
    fn keys_mode_identifies_known_keys() {
        let auth = keys();
        let id = auth
            .identify(&headers(&[b"Bearer sk-alice-2"]), None)
            .unwrap();
        assert_eq!(
            id,
            Identity {
                user: UserId::new("alice"),
                limit: Some(50)
            }
        );
        assert!(!id.user.is_secret());
    }

    #[test]
    fn keys_mode_refuses_missing_and_unknown_keys_without_echoing() {
        let auth = keys();
        let peer = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        for h in [
            headers(&[]),
            headers(&[b"Bearer sk-wrong-guess"]),
            headers(&[b"Basic sk-alice-1"]),
        ] {
            let e = auth.identify(&h, peer).unwrap_err();
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert!(!e.message.contains("sk-"), "{}", e.message);
        }
    }

    #[test]
    fn open_mode_uses_the_token_then_the_address() {
        let auth = Auth::open();
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

        let id = auth
            .identify(&headers(&[b"Bearer load-test-42"]), Some(v4))
            .unwrap();
        // SHA-256("load-test-42"), first 128 bits (checked with `sha256sum`).
        assert_eq!(id.user.as_str(), "token:75850255b63e78a3c6da2b7a0dbdf3b3");
        assert!(id.user.is_secret());
        assert_eq!(id.limit, None);

        let id = auth.identify(&headers(&[]), Some(v4)).unwrap();
        assert_eq!(
            (id.user.as_str(), id.user.is_secret()),
            ("ip:192.0.2.7", false)
        );
        // A token that reads like an address is not that address's user.
        let id = auth
            .identify(&headers(&[b"Bearer 192.0.2.7"]), Some(v4))
            .unwrap();
        assert!(id.user.as_str().starts_with("token:"), "{:?}", id.user);
        // Every token, however long, is a user of the same size.
        let long = format!("Bearer {}", "x".repeat(300_000));
        let id = auth.identify(&headers(&[long.as_bytes()]), None).unwrap();
        assert_eq!(id.user.as_str().len(), "token:".len() + 32);

        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(
            auth.identify(&headers(&[]), Some(mapped))
                .unwrap()
                .user
                .as_str(),
            "ip:192.0.2.7"
        );
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(
            auth.identify(&headers(&[]), Some(v6))
                .unwrap()
                .user
                .as_str(),
            "ip:::1"
        );

        let id = auth
            .identify(&headers(&[b"Basic dXNlcjpwdw=="]), None)
            .unwrap();
        assert_eq!(id.user.as_str(), "ip:unknown");
    }

    #[test]
    fn bearer_header_edge_cases() {
        let ok: [&[u8]; 6] = [
            b"Bearer tok",
            b"bearer tok",
            b"BEARER tok",
            b"Bearer    tok   ",
            b"  Bearer\ttok",
            b"bEaReR \t tok\t",
        ];
        for v in ok {
            assert_eq!(
                bearer_token(&headers(&[v])),
                Some("tok"),
                "{}",
                String::from_utf8_lossy(v)
            );
        }
        let missing: [&[&[u8]]; 9] = [
            &[],
            &[b"Basic tok"],
            &[b"Bearer"],
            &[b"Bearer   "],
            &[b"Bearertok"],
            &[b"Bearer two words"],
            &[b"Bearer t\xffk"],
            &[b"Bearer tok", b"Bearer tok"],
            &[b"Token tok"],
        ];
        for vs in missing {
            assert_eq!(bearer_token(&headers(vs)), None, "{vs:?}");
        }
    }

    #[test]
    fn non_utf8_header_in_keys_mode_is_unauthorized() {
        let e = keys()
            .identify(&headers(&[b"Bearer sk-alice-1\xe9"]), None)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
    }

    #[test]
    fn debug_never_prints_keys() {
        let auth = keys();
        let dbg = format!("{auth:?} {auth:#?}");
        assert!(!dbg.contains("sk-"), "{dbg}");
        assert!(dbg.contains("keys: 4") && dbg.contains("users: 3"), "{dbg}");
        assert_eq!(format!("{:?}", Auth::open()), "Open");
    }

    #[test]
    fn secret_ids_print_a_stable_fingerprint() {
        let a = UserId::of_bearer("sk-live-very-secret");
        let shown = a.to_string();
        assert!(!shown.contains("secret") && !format!("{a:?}").contains("secret"));
        assert_eq!(shown.len(), "bearer:".len() + 8);
        assert!(shown.starts_with("bearer:"));
        assert!(
            shown["bearer:".len()..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit())
        );
        assert_eq!(
            UserId::of_bearer(&String::from("sk-live-very-secret")).to_string(),
            shown
        );
        assert_ne!(UserId::of_bearer("sk-live-very-secreT").to_string(), shown);
        assert_eq!(format!("{a:?}"), format!("UserId({shown})"));
        // Plain ids print as they are.
        assert_eq!(UserId::new("alice").to_string(), "alice");
    }

    #[test]
    fn equality_and_hash_follow_the_id() {
        use std::collections::HashSet;
        let secret = UserId::of_bearer("x");
        let plain = UserId::new(secret.as_str().to_owned());
        assert_eq!(plain, secret);
        let set: HashSet<UserId> = [plain, secret].into_iter().collect();
        assert_eq!(set.len(), 1);
        assert_ne!(UserId::new("x"), UserId::new("y"));
    }
}
