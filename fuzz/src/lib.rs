//! The fuzz targets' bodies. Each `fuzz_targets/<name>.rs` is one line that hands libFuzzer's
//! input to the function of the same name here; `tests/corpus.rs` replays the committed
//! corpora through the same functions as a plain `cargo test`.
//!
//! Every function panics on an invariant that does not hold: a panic is a finding.

pub mod admission;
pub mod sse_decoder;
pub mod upstream_chunks;
pub mod upstream_e2e;

/// `ASKSTREAM_FUZZ_VERBOSE=1`: the targets that serve requests print what was answered.
pub(crate) fn verbose() -> bool {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("ASKSTREAM_FUZZ_VERBOSE").is_some_and(|v| v == "1"))
}
