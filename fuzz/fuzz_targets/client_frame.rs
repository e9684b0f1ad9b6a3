//! Client frames, JSON and Protobuf, into the decoders (see tests/harness).
#![no_main]

#[path = "../../tests/harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::client_frame(data));
