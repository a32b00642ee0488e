//! Query ids: unique per ask, 128 bits, URL-safe, and free to make.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A unique, URL-safe, 128-bit query id: 32 lowercase hex digits.
///
/// The high half is random per process, the low half a counter passed through a
/// bijective mixer, so ids never repeat within a process, are unlikely to repeat across
/// processes, and cost no system call. Kept as the number and spelled out where it is
/// shown (three times an ask): every open answer holds one, and the digits are twice
/// its size.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct QueryId(u128);

/// A query id's 32 digits.
pub(crate) struct QueryIdText([u8; 32]);

impl QueryIdText {
    /// The digits as text.
    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl QueryId {
    /// The next id.
    pub(crate) fn next() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static SEED: OnceLock<(u64, u64)> = OnceLock::new();
        let (prefix, key) = *SEED.get_or_init(|| (random_u64(), random_u64()));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let value = (u128::from(prefix) << 64) | u128::from(mix64(n ^ key));
        QueryId(value)
    }

    /// The id as text.
    pub(crate) fn text(&self) -> QueryIdText {
        QueryIdText(crate::wire::hex_128(self.0))
    }
}

impl std::fmt::Display for QueryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text().as_str())
    }
}

impl std::fmt::Debug for QueryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QueryId({})", self.text().as_str())
    }
}

/// 64 random bits from the OS-seeded keys of std's `RandomState` (no extra dependency;
/// only used to seed query ids).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish()
}

/// SplitMix64's finalizer: a bijection on u64, so distinct counters give distinct ids.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_ids_are_unique_hex() {
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| QueryId::next()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            assert_eq!(id.text().as_str().len(), 32);
            assert!(
                id.text()
                    .as_str()
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
        }
    }

    #[test]
    fn mixer_is_a_bijection_on_samples() {
        let outs: std::collections::HashSet<_> = (0..100_000u64).map(mix64).collect();
        assert_eq!(outs.len(), 100_000);
    }
}
