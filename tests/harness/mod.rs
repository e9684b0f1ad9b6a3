//! Checks over arbitrary bytes from the network, shared by the bounded property runs in
//! `tests/properties.rs` (part of every `cargo test`) and the `cargo fuzz` targets in `fuzz/`,
//! which run the same checks for as long as one likes. Each function panics when the gateway
//! would misbehave: a panic inside the gateway, or an output a client could not use.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use bytes::Bytes;
use prost_reflect::MessageDescriptor;
use serde_json::Value;
use serde_json::value::RawValue;
use wsbridge::backends::BrokerMessage;
use wsbridge::edge::{json, protobuf};
use wsbridge::fanout::{Delivery, Encoding};
use wsbridge::transform::{ClientPayload, PayloadFormat, PayloadView, Schemas};

/// `iot.v1.Reading` from the repository's `schemas/`.
pub fn reading() -> &'static MessageDescriptor {
    static READING: OnceLock<MessageDescriptor> = OnceLock::new();
    READING.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let dir = if dir.exists() {
            dir
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas")
        };
        let mut problems = Vec::new();
        let schemas = Schemas::load(&[dir], &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        schemas.message("iot.v1.Reading").expect("iot.v1.Reading")
    })
}

/// Broker bytes through every route format and both client encodings: nothing panics, every
/// JSON frame is UTF-8 that parses as JSON, and what it carries gives back the broker's bytes
/// (or their canonical JSON, or a `decode_error` on a Protobuf route).
pub fn broker_bytes(payload: &[u8], key: &[u8], header: &[u8]) {
    let message = BrokerMessage {
        topic: "t/x".into(),
        payload: Bytes::copy_from_slice(payload),
        key: Some(String::from_utf8_lossy(key).into_owned()),
        headers: vec![("h".into(), String::from_utf8_lossy(header).into_owned())],
        ..BrokerMessage::default()
    };
    let delivery = Delivery {
        channel: "t/x",
        subscription: "t/#",
        message: &message,
    };
    let formats = [
        PayloadFormat::Json,
        PayloadFormat::Text,
        PayloadFormat::Binary,
        PayloadFormat::Protobuf(reading().clone()),
    ];
    for format in &formats {
        let view = match format.to_client(&message.payload) {
            Ok(view) => view,
            Err(_) => {
                assert!(
                    matches!(format, PayloadFormat::Protobuf(_)),
                    "only Protobuf fails"
                );
                continue;
            }
        };
        let frame = json::JSON.delivery(&delivery, Some(&view));
        let text = std::str::from_utf8(frame.bytes()).expect("a JSON frame is UTF-8");
        let parsed: Value = serde_json::from_str(text).expect("a JSON frame parses");
        let shown = &parsed["payload"];
        match (&view, format) {
            (PayloadView::Binary(_), _) => {
                use base64::Engine;
                assert_eq!(parsed["encoding"], "base64");
                let b64 = shown.as_str().expect("base64 text");
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("valid base64");
                assert_eq!(bytes, payload);
            }
            (PayloadView::Text(_), _) => {
                assert_eq!(shown.as_str().map(str::as_bytes), Some(payload))
            }
            (PayloadView::Json(_), PayloadFormat::Protobuf(_)) => assert!(shown.is_object()),
            (PayloadView::Json(_), _) => {
                let original: Value = serde_json::from_slice(payload).expect("embedded JSON");
                assert_eq!(shown, &original);
            }
        }
        let frame = protobuf::PROTOBUF.delivery(&delivery, None);
        assert!(!frame.is_empty());
    }
}

/// A client frame as both protocols would receive it: a request or a documented error.
pub fn client_frame(bytes: &[u8]) {
    const CODES: &[&str] = &["invalid_json", "invalid_frame", "unknown_type"];
    if let Ok(text) = std::str::from_utf8(bytes)
        && let Err(e) = json::decode(text)
    {
        assert!(CODES.contains(&e.code), "{}", e.code);
    }
    if let Err(e) = protobuf::decode(bytes) {
        assert!(CODES.contains(&e.code), "{}", e.code);
    }
}

/// Protobuf bytes to JSON and back: what decodes has a JSON form that encodes again, to bytes
/// that decode to the same JSON.
pub fn protobuf_round_trip(bytes: &[u8]) {
    let message = reading();
    let Ok(json) = wsbridge::transform::protobuf::to_json(message, bytes) else {
        return;
    };
    let text = std::str::from_utf8(&json).expect("the JSON form is UTF-8");
    let raw = RawValue::from_string(text.to_owned()).expect("the JSON form parses");
    let encoded = wsbridge::transform::protobuf::from_client(message, ClientPayload::Json(raw))
        .expect("the JSON form of a message encodes again");
    let again =
        wsbridge::transform::protobuf::to_json(message, &encoded).expect("re-encoded decodes");
    // The same JSON value; the order of a map field's entries is not part of it.
    let parse = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes).expect("JSON");
    assert_eq!(parse(&json), parse(&again));
}
