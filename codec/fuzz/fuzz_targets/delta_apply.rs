//! libFuzzer target: [`dwcp_codec_fuzz::delta_apply`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dwcp_codec_fuzz::delta_apply(data));
