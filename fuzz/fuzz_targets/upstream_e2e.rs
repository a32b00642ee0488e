#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| askstream_fuzz::upstream_e2e::upstream_e2e(data));
