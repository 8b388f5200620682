//! libFuzzer target: [`dwcp_codec_fuzz::frame_header`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dwcp_codec_fuzz::frame_header(data));
