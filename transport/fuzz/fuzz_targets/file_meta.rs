//! libFuzzer target: [`dwcp_transport_fuzz::file_meta`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dwcp_transport_fuzz::file_meta(data));
