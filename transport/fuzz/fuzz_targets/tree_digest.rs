//! libFuzzer target: [`dwcp_transport_fuzz::tree_digest`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dwcp_transport_fuzz::tree_digest(data));
