#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| askstream_fuzz::upstream_chunks::upstream_chunks(data));
