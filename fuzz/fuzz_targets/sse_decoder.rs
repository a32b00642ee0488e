#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| askstream_fuzz::sse_decoder::sse_decoder(data));
