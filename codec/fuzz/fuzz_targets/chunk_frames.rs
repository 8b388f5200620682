//! libFuzzer target: [`dwcp_codec_fuzz::chunk_frames`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dwcp_codec_fuzz::chunk_frames(data));
