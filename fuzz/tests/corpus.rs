//! Replays each target's committed corpus (`fuzz/corpus/<target>/`) through the target's
//! function, uninstrumented: a plain `cargo test` on stable, no cargo-fuzz, no libFuzzer.
//! A crash input saved under `fuzz/artifacts/<target>/` and then copied into the corpus
//! becomes a regression test this way.
//!
//! `ASKSTREAM_FUZZ_CORPUS=<dir>` replays `<dir>/<target>/` instead (a corpus grown by a
//! fuzzing run, say).

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let root = std::env::var_os("ASKSTREAM_FUZZ_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let dir = root.join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no corpus", dir.display());
    for file in &files {
        let input = std::fs::read(file).expect("a corpus file");
        let result = std::panic::catch_unwind(|| run(&input));
        assert!(result.is_ok(), "{target}: {} fails", file.display());
    }
    println!("{target}: {} inputs", files.len());
}

#[test]
fn admission_corpus() {
    replay("admission", askstream_fuzz::admission::admission);
}

#[test]
fn sse_decoder_corpus() {
    replay("sse_decoder", askstream_fuzz::sse_decoder::sse_decoder);
}

#[test]
fn upstream_chunks_corpus() {
    replay(
        "upstream_chunks",
        askstream_fuzz::upstream_chunks::upstream_chunks,
    );
}

#[test]
fn upstream_e2e_corpus() {
    replay("upstream_e2e", askstream_fuzz::upstream_e2e::upstream_e2e);
}
