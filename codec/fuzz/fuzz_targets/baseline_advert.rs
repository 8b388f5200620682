//! libFuzzer target: [`dwcp_codec_fuzz::baseline_advert`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dwcp_codec_fuzz::baseline_advert(data));
