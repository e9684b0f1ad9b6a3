//! Broker bytes into every route format and client encoding (see tests/harness).
#![no_main]

#[path = "../../tests/harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The first bytes, when there are enough, become the key and a header value.
    let (key, rest) = data.split_at(data.len().min(4));
    let (header, payload) = rest.split_at(rest.len().min(4));
    harness::broker_bytes(payload, key, header);
});
