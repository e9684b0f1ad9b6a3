//! The WebSocket client protocols and how a connection picks one (its subprotocol).

use axum::extract::ws::{Message, Utf8Bytes};

use crate::edge::{ProtocolError, Reply, Request, json, protobuf};
use crate::fanout::{Encoding, Frame, Status};

/// Subprotocol name of the JSON protocol (also used when a client asks for none).
pub const JSON_SUBPROTOCOL: &str = "wsbridge.v1.json";
/// Subprotocol name of the binary Protobuf protocol.
pub const PROTOBUF_SUBPROTOCOL: &str = "wsbridge.v1.protobuf";

/// A client protocol, chosen by subprotocol at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Json,
    Protobuf,
}

impl Protocol {
    /// Subprotocols the gateway offers, in order of preference.
    pub const SUBPROTOCOLS: &'static [&'static str] = &[JSON_SUBPROTOCOL, PROTOBUF_SUBPROTOCOL];

    pub fn from_subprotocol(name: Option<&str>) -> Option<Protocol> {
        match name {
            None | Some(JSON_SUBPROTOCOL) => Some(Protocol::Json),
            Some(PROTOBUF_SUBPROTOCOL) => Some(Protocol::Protobuf),
            Some(_) => None,
        }
    }

    /// The subprotocol's name.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Protocol::Json => JSON_SUBPROTOCOL,
            Protocol::Protobuf => PROTOBUF_SUBPROTOCOL,
        }
    }

    /// How the core encodes what this connection receives.
    pub fn encoding(self) -> &'static dyn Encoding {
        match self {
            Protocol::Json => &json::JSON,
            Protocol::Protobuf => &protobuf::PROTOBUF,
        }
    }

    /// Decodes one WebSocket data frame into a request.
    pub fn decode(self, message: &Message) -> Result<Request, ProtocolError> {
        match (self, message) {
            (Protocol::Json, Message::Text(text)) => json::decode(text.as_str()),
            (Protocol::Json, _) => Err(ProtocolError::new(
                None,
                "unsupported_frame",
                "binary frames are not part of wsbridge.v1.json; send one JSON object per text frame",
            )),
            (Protocol::Protobuf, Message::Binary(bytes)) => protobuf::decode(bytes),
            (Protocol::Protobuf, _) => Err(ProtocolError::new(
                None,
                "unsupported_frame",
                "text frames are not part of wsbridge.v1.protobuf; send one ClientFrame per binary frame",
            )),
        }
    }

    /// Encodes a reply.
    pub fn reply(self, reply: &Reply) -> Frame {
        match self {
            Protocol::Json => json::encode_reply(reply),
            Protocol::Protobuf => protobuf::encode_reply(reply),
        }
    }

    /// Encodes a status event.
    pub fn status(self, status: &Status) -> Frame {
        self.encoding().status(status)
    }

    /// The WebSocket message carrying a frame this protocol encoded: text for JSON, binary for
    /// Protobuf. `None` for a frame that is not text on a text protocol (no encoder makes one).
    pub fn message(self, frame: Frame) -> Option<Message> {
        match self {
            Protocol::Json => Utf8Bytes::try_from(frame.into_bytes())
                .ok()
                .map(Message::Text),
            Protocol::Protobuf => Some(Message::Binary(frame.into_bytes())),
        }
    }
}
