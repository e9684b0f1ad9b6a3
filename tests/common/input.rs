//! The broker-side input matrix: bytes any device may publish, and what a WebSocket client on a
//! `json`, `text` or `binary` route must receive for each (docs/PROTOCOL.md, "Payloads").
//! Every backend's tests publish these with the broker's own client and check each outcome,
//! then that a good message published right after still reaches every subscriber.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use super::Client;

/// A route `format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
    Binary,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Json, Format::Text, Format::Binary];

    /// The value of the route's `format` key.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Text => "text",
            Format::Binary => "binary",
        }
    }
}

/// What a subscriber sees of a payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The payload embedded as this JSON value.
    Value(Value),
    /// The payload as a JSON string of its text.
    Text,
    /// The payload base64-encoded, with `"encoding": "base64"`.
    Base64,
}

/// One bad (or borderline) payload.
pub struct Case {
    pub name: &'static str,
    pub bytes: Vec<u8>,
    pub json: Outcome,
    pub text: Outcome,
}

impl Case {
    pub fn outcome(&self, format: Format) -> &Outcome {
        match format {
            Format::Json => &self.json,
            Format::Text => &self.text,
            Format::Binary => &Outcome::Base64,
        }
    }
}

/// The payloads every backend is tested with.
pub fn cases() -> Vec<Case> {
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    vec![
        Case {
            name: "invalid UTF-8 inside a JSON string",
            bytes: b"\"\xff\"".to_vec(),
            json: Outcome::Base64,
            text: Outcome::Base64,
        },
        Case {
            name: "bare invalid UTF-8",
            bytes: vec![0xc3, 0x28, 0xff, 0xfe, 0x80],
            json: Outcome::Base64,
            text: Outcome::Base64,
        },
        Case {
            name: "NUL bytes",
            bytes: b"a\0b\0".to_vec(),
            json: Outcome::Text,
            text: Outcome::Text,
        },
        Case {
            name: "an empty payload",
            bytes: Vec::new(),
            json: Outcome::Text,
            text: Outcome::Text,
        },
        Case {
            name: "JSON nested 10,000 levels deep",
            bytes: deep.into_bytes(),
            json: Outcome::Text,
            text: Outcome::Text,
        },
        Case {
            name: "a number beyond f64",
            bytes: b"1e400".to_vec(),
            json: Outcome::Text,
            text: Outcome::Text,
        },
        Case {
            name: "an integer beyond i64",
            bytes: b"123456789012345678901234567890".to_vec(),
            json: Outcome::Value(json!(1.2345678901234568e29)),
            text: Outcome::Text,
        },
        Case {
            name: "a JSON object",
            bytes: br#"{"ok":true}"#.to_vec(),
            json: Outcome::Value(json!({"ok": true})),
            text: Outcome::Text,
        },
    ]
}

/// The good message published after each case; `n` tells them apart.
pub fn good(n: usize) -> Vec<u8> {
    format!(r#"{{"good":{n}}}"#).into_bytes()
}

/// Asserts that `message` shows `bytes` as `outcome` says.
pub fn assert_payload(message: &Value, bytes: &[u8], outcome: &Outcome, what: &str) {
    let payload = &message["payload"];
    match outcome {
        Outcome::Value(value) => {
            assert_eq!(payload, value, "{what}: {message}");
            assert!(message.get("encoding").is_none(), "{what}: {message}");
        }
        Outcome::Text => {
            let text = std::str::from_utf8(bytes).expect("a text case is UTF-8");
            assert_eq!(payload, &json!(text), "{what}");
            assert!(message.get("encoding").is_none(), "{what}: {message}");
        }
        Outcome::Base64 => {
            assert_eq!(message["encoding"], "base64", "{what}: {message}");
            let text = payload.as_str().expect("base64 text");
            let decoded = BASE64.decode(text).expect("valid base64");
            assert_eq!(decoded, bytes, "{what}");
        }
    }
}

/// Reads the next message of `client` (subscribed on a `format` route) and checks it is `case`,
/// then the good message `n`.
pub async fn expect_case(client: &mut Client, format: Format, case: &Case, n: usize) {
    let what = format!("{} on a {} route", case.name, format.name());
    let message = client.next_message().await;
    assert_payload(&message, &case.bytes, case.outcome(format), &what);
    let after = client.next_message().await;
    let expected = match format {
        Format::Json => Outcome::Value(json!({"good": n})),
        Format::Text => Outcome::Text,
        Format::Binary => Outcome::Base64,
    };
    assert_payload(
        &after,
        &good(n),
        &expected,
        &format!("the good message after {what}"),
    );
}

/// Asserts the gateway caught no panic (`wsbridge_panics_total` is absent or zero).
pub fn assert_no_panics(metrics: &str) {
    for line in metrics.lines() {
        if line.starts_with("wsbridge_panics_total") {
            assert!(line.ends_with(" 0"), "a panic was caught: {line}");
        }
    }
}
