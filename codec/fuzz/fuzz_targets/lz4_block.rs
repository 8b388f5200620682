//! libFuzzer target: [`dwcp_codec_fuzz::lz4_block`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dwcp_codec_fuzz::lz4_block(data));
