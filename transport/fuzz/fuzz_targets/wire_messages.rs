//! libFuzzer target: [`dwcp_transport_fuzz::wire_messages`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dwcp_transport_fuzz::wire_messages(data));
