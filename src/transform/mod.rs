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

use bytes::Bytes;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

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
}

impl PayloadFormat {
    /// Turns broker bytes into the client-side view.
    pub fn to_client(&self, bytes: &Bytes) -> PayloadView {
        match self {
            PayloadFormat::Json if serde_json::from_slice::<IgnoredAny>(bytes).is_ok() => {
                PayloadView::Json(bytes.clone())
            }
            PayloadFormat::Json | PayloadFormat::Text if std::str::from_utf8(bytes).is_ok() => {
                PayloadView::Text(bytes.clone())
            }
            _ => PayloadView::Binary(bytes.clone()),
        }
    }

    /// Turns a client payload into broker bytes.
    pub fn to_broker(&self, payload: ClientPayload) -> Bytes {
        match payload {
            ClientPayload::Json(raw) => Bytes::from(raw.get().to_owned().into_bytes()),
            ClientPayload::Text(text) => Bytes::from(text.into_bytes()),
            ClientPayload::Binary(bytes) => bytes,
        }
    }
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

    #[test]
    fn json_format_applies_the_payload_rules() {
        let f = PayloadFormat::Json;
        let b = |s: &[u8]| Bytes::copy_from_slice(s);
        assert_eq!(
            f.to_client(&b(b"{\"a\": 1}")),
            PayloadView::Json(b(b"{\"a\": 1}"))
        );
        assert_eq!(f.to_client(&b(b"42")), PayloadView::Json(b(b"42")));
        assert_eq!(f.to_client(&b(b"\"hi\"")), PayloadView::Json(b(b"\"hi\"")));
        assert_eq!(
            f.to_client(&b(b"hello world")),
            PayloadView::Text(b(b"hello world"))
        );
        assert_eq!(
            f.to_client(&b(b"{broken")),
            PayloadView::Text(b(b"{broken"))
        );
        assert_eq!(f.to_client(&b(b"")), PayloadView::Text(b(b"")));
        assert_eq!(
            f.to_client(&b(&[0xff, 0x00])),
            PayloadView::Binary(b(&[0xff, 0x00]))
        );
    }

    #[test]
    fn text_and_binary_formats_do_not_interpret_json() {
        let b = |s: &[u8]| Bytes::copy_from_slice(s);
        assert_eq!(
            PayloadFormat::Text.to_client(&b(b"42")),
            PayloadView::Text(b(b"42"))
        );
        assert_eq!(
            PayloadFormat::Binary.to_client(&b(b"42")),
            PayloadView::Binary(b(b"42"))
        );
    }

    #[test]
    fn client_payloads_become_exact_bytes() {
        let f = PayloadFormat::Json;
        let raw = RawValue::from_string("{\"x\": [1, 2]}".into()).unwrap();
        assert_eq!(
            &f.to_broker(ClientPayload::Json(raw))[..],
            b"{\"x\": [1, 2]}"
        );
        assert_eq!(&f.to_broker(ClientPayload::Text("ON".into()))[..], b"ON");
        assert_eq!(
            &f.to_broker(ClientPayload::Binary(Bytes::from_static(&[1, 2])))[..],
            &[1, 2]
        );
    }
}
