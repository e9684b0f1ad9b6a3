//! Payload transforms between broker bytes and what clients see.
//!
//! Each route has a [`PayloadFormat`] describing its broker-side encoding. A broker message is
//! turned into a [`PayloadView`] once, then every subscriber's protocol encodes that view; a
//! client publish arrives as a [`ClientPayload`] and becomes broker bytes here.
//!
//! The rules for the default `json` format (see docs/PROTOCOL.md, "Payloads"):
//! - broker bytes that are one valid JSON value arrive as that value;
//! - other valid UTF-8 arrives as a JSON string;
//! - anything else arrives base64-encoded, flagged with `"encoding": "base64"`;
//! - a client's JSON string is sent as its raw UTF-8 text, any other JSON value as its JSON text,
//!   and a payload flagged `"encoding": "base64"` as the decoded bytes.
//!
//! `protobuf:<message>` routes decode broker bytes with a message type compiled at start-up from
//! the `schemas` files ([`protobuf::Schemas`]) into canonical proto3 JSON, and encode clients' JSON
//! into the binary form. A route's optional [`json_schema::JsonSchema`] checks what clients publish.

pub mod json_schema;
pub mod protobuf;

use bytes::Bytes;
use prost_reflect::MessageDescriptor;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

pub use json_schema::JsonSchema;
pub use protobuf::Schemas;

/// A publish whose payload does not fit the route; sent to the client as `invalid_payload`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PayloadError(pub String);

/// Broker bytes that cannot be shown to JSON clients (they do not decode as the route's type).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// A route's broker-side payload encoding (`format` in the route config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PayloadFormat {
    /// JSON where the bytes are JSON, text where they are UTF-8, base64 otherwise.
    #[default]
    Json,
    /// Always a JSON string of the text (base64 when not UTF-8); JSON is not interpreted.
    Text,
    /// Always base64.
    Binary,
    /// Protobuf-encoded messages of this type; JSON clients see the proto3 JSON mapping.
    Protobuf(MessageDescriptor),
}

impl PayloadFormat {
    /// Parses a route's `format` value.
    pub fn parse(text: &str, schemas: &Schemas) -> Result<PayloadFormat, String> {
        match text {
            "json" => Ok(PayloadFormat::Json),
            "text" => Ok(PayloadFormat::Text),
            "binary" => Ok(PayloadFormat::Binary),
            other => match other.strip_prefix("protobuf:") {
                Some(name) => schemas.message(name).map(PayloadFormat::Protobuf),
                None => Err(format!(
                    "unknown format {other:?}; one of \"json\", \"text\", \"binary\", \"protobuf:<full message name>\""
                )),
            },
        }
    }

    /// Turns broker bytes into the client-side (JSON protocol) view.
    pub fn to_client(&self, bytes: &Bytes) -> Result<PayloadView, DecodeError> {
        // UTF-8 is checked first and on its own: serde_json skips the contents of strings it
        // ignores without validating them, so `"\xff"` would pass a JSON check on raw bytes.
        let text = std::str::from_utf8(bytes).ok();
        Ok(match (self, text) {
            (PayloadFormat::Json, Some(text)) if is_json(text) => PayloadView::Json(bytes.clone()),
            (PayloadFormat::Json | PayloadFormat::Text, Some(_)) => {
                PayloadView::Text(bytes.clone())
            }
            (PayloadFormat::Protobuf(message), _) => {
                PayloadView::Json(protobuf::to_json(message, bytes)?)
            }
            _ => PayloadView::Binary(bytes.clone()),
        })
    }

    /// Turns a client payload into broker bytes.
    pub fn to_broker(&self, payload: ClientPayload) -> Result<Bytes, PayloadError> {
        match (self, payload) {
            (PayloadFormat::Protobuf(message), payload) => protobuf::from_client(message, payload),
            (_, ClientPayload::Json(raw)) => Ok(Bytes::from(raw.get().to_owned().into_bytes())),
            (_, ClientPayload::Text(text)) => Ok(Bytes::from(text.into_bytes())),
            (_, ClientPayload::Binary(bytes)) => Ok(bytes),
        }
    }

    /// The JSON a client payload stands for, as checked by a route's JSON schema.
    pub fn json_view(&self, payload: &ClientPayload) -> Result<serde_json::Value, PayloadError> {
        match (self, payload) {
            (_, ClientPayload::Json(raw)) => serde_json::from_str(raw.get())
                .map_err(|e| PayloadError(format!("payload is not valid JSON: {e}"))),
            (_, ClientPayload::Text(text)) => Ok(serde_json::Value::String(text.clone())),
            (PayloadFormat::Protobuf(message), ClientPayload::Binary(bytes)) => {
                let json = protobuf::to_json(message, bytes).map_err(|e| PayloadError(e.0))?;
                serde_json::from_slice(&json).map_err(|e| PayloadError(e.to_string()))
            }
            (_, ClientPayload::Binary(bytes)) => serde_json::from_slice(bytes).map_err(|_| {
                PayloadError(
                    "payload is not JSON, so it cannot be checked against the route's JSON schema"
                        .into(),
                )
            }),
        }
    }
}

/// Deepest nesting of arrays and objects a payload may have and still be embedded as JSON. The
/// frame around it adds a level, and common JSON parsers stop at 128 (serde_json's default), so
/// this leaves room for every client to parse the frame that carries it.
pub const MAX_JSON_DEPTH: usize = 100;

/// Whether `text` is exactly one JSON value that every client can parse embedded in a frame:
/// valid, nested at most [`MAX_JSON_DEPTH`] levels, every number finite as an f64 (`1e400` is
/// valid JSON that many parsers refuse). Anything else arrives as text.
fn is_json(text: &str) -> bool {
    within_limits(text.as_bytes()) && serde_json::from_str::<IgnoredAny>(text).is_ok()
}

/// Checks nesting depth and number range outside strings in one pass. The input is not yet
/// known to be JSON; this only has to be right for JSON.
fn within_limits(bytes: &[u8]) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        i += 1;
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i - 1;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    i += 1;
                }
                let finite = std::str::from_utf8(&bytes[start..i])
                    .ok()
                    .and_then(|n| n.parse::<f64>().ok())
                    .is_none_or(f64::is_finite);
                if !finite {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

/// A broker payload as clients see it; cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadView {
    /// Valid JSON text, embedded as a value.
    Json(Bytes),
    /// Valid UTF-8, sent as a JSON string.
    Text(Bytes),
    /// Arbitrary bytes, sent base64-encoded.
    Binary(Bytes),
}

impl PayloadView {
    /// The bytes behind the view, as the broker sent them.
    pub fn bytes(&self) -> &Bytes {
        match self {
            PayloadView::Json(b) | PayloadView::Text(b) | PayloadView::Binary(b) => b,
        }
    }
}

/// A payload from a client.
#[derive(Debug, Clone)]
pub enum ClientPayload {
    /// A JSON value other than a string, as the client wrote it.
    Json(Box<RawValue>),
    Text(String),
    Binary(Bytes),
}

impl ClientPayload {
    /// Size in bytes, as it will be sent.
    pub fn len(&self) -> usize {
        match self {
            ClientPayload::Json(raw) => raw.get().len(),
            ClientPayload::Text(text) => text.len(),
            ClientPayload::Binary(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    fn view(format: &PayloadFormat, bytes: &[u8]) -> PayloadView {
        format.to_client(&b(bytes)).unwrap()
    }

    #[test]
    fn json_format_applies_the_payload_rules() {
        let f = PayloadFormat::Json;
        assert_eq!(view(&f, b"{\"a\": 1}"), PayloadView::Json(b(b"{\"a\": 1}")));
        assert_eq!(view(&f, b"42"), PayloadView::Json(b(b"42")));
        assert_eq!(view(&f, b"\"hi\""), PayloadView::Json(b(b"\"hi\"")));
        assert_eq!(
            view(&f, b"hello world"),
            PayloadView::Text(b(b"hello world"))
        );
        assert_eq!(view(&f, b"{broken"), PayloadView::Text(b(b"{broken")));
        assert_eq!(view(&f, b""), PayloadView::Text(b(b"")));
        assert_eq!(view(&f, b"\0"), PayloadView::Text(b(b"\0")));
        assert_eq!(
            view(&f, &[0xff, 0x00]),
            PayloadView::Binary(b(&[0xff, 0x00]))
        );
    }

    #[test]
    fn json_shaped_bytes_that_are_not_utf8_arrive_as_binary() {
        let f = PayloadFormat::Json;
        for bytes in [&b"\"\xff\""[..], b"{\"a\":\"\xc3\"}", b"[\"\xed\xa0\x80\"]"] {
            assert_eq!(view(&f, bytes), PayloadView::Binary(b(bytes)), "{bytes:?}");
            assert_eq!(
                view(&PayloadFormat::Text, bytes),
                PayloadView::Binary(b(bytes))
            );
        }
    }

    #[test]
    fn json_beyond_the_parser_limits_arrives_as_text() {
        let f = PayloadFormat::Json;
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let deep = nested(10_000);
        assert!(view(&f, deep.as_bytes()) == PayloadView::Text(b(deep.as_bytes())));
        let limit = nested(MAX_JSON_DEPTH);
        assert!(view(&f, limit.as_bytes()) == PayloadView::Json(b(limit.as_bytes())));
        let over = format!(r#"{{"a":"[[[","b":{}}}"#, nested(MAX_JSON_DEPTH));
        assert!(matches!(view(&f, over.as_bytes()), PayloadView::Text(_)));
        let strings = format!(r#"["{}\"{}"]"#, "[".repeat(500), "{".repeat(500));
        assert!(matches!(view(&f, strings.as_bytes()), PayloadView::Json(_)));
        assert_eq!(view(&f, b"1e400"), PayloadView::Text(b(b"1e400")));
        // Integers beyond i64/u64 are still numbers JSON can carry (as f64).
        let big = b"123456789012345678901234567890";
        assert_eq!(view(&f, big), PayloadView::Json(b(big)));
    }

    #[test]
    fn text_and_binary_formats_do_not_interpret_json() {
        assert_eq!(
            view(&PayloadFormat::Text, b"42"),
            PayloadView::Text(b(b"42"))
        );
        assert_eq!(
            view(&PayloadFormat::Binary, b"42"),
            PayloadView::Binary(b(b"42"))
        );
    }

    #[test]
    fn client_payloads_become_exact_bytes() {
        let f = PayloadFormat::Json;
        let raw = RawValue::from_string("{\"x\": [1, 2]}".into()).unwrap();
        assert_eq!(
            &f.to_broker(ClientPayload::Json(raw)).unwrap()[..],
            b"{\"x\": [1, 2]}"
        );
        assert_eq!(
            &f.to_broker(ClientPayload::Text("ON".into())).unwrap()[..],
            b"ON"
        );
        let bytes = ClientPayload::Binary(Bytes::from_static(&[1, 2]));
        assert_eq!(&f.to_broker(bytes).unwrap()[..], &[1, 2]);
    }

    #[test]
    fn formats_parse_by_name() {
        let schemas = Schemas::empty();
        assert_eq!(
            PayloadFormat::parse("text", &schemas),
            Ok(PayloadFormat::Text)
        );
        assert!(
            PayloadFormat::parse("yaml", &schemas)
                .unwrap_err()
                .contains("unknown format")
        );
        assert!(
            PayloadFormat::parse("protobuf:a.B", &schemas)
                .unwrap_err()
                .contains("unknown message type")
        );
    }
}
