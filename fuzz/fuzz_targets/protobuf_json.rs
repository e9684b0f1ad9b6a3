//! Protobuf bytes to proto3 JSON and back (see tests/harness).
#![no_main]

#[path = "../../tests/harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::protobuf_round_trip(data));
