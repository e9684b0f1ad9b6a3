//! The client protocols: requests a client sends, and the frames the gateway sends back.
//!
//! [`Protocol`] is the codec negotiated as the WebSocket subprotocol: JSON text frames
//! ([`json`]) or binary Protobuf frames ([`protobuf`]). Both decode into the same [`Request`] and
//! encode the same [`Reply`]; a broker message is encoded once per protocol by the fan-out
//! ([`Protocol::encode_delivery`]) and the frame shared by every subscriber on that protocol.
//! docs/PROTOCOL.md documents both side by side.

mod json;
pub mod protobuf;

use axum::extract::ws::{Message, Utf8Bytes};
use serde::Serialize;

use crate::backends::{BrokerMessage, Position, StartPosition};
use crate::transform::{ClientPayload, PayloadView};

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
    /// Number of protocols, for per-protocol caches indexed by [`Protocol::index`].
    pub const COUNT: usize = 2;

    pub fn from_subprotocol(name: Option<&str>) -> Option<Protocol> {
        match name {
            None | Some(JSON_SUBPROTOCOL) => Some(Protocol::Json),
            Some(PROTOBUF_SUBPROTOCOL) => Some(Protocol::Protobuf),
            Some(_) => None,
        }
    }

    pub fn index(self) -> usize {
        match self {
            Protocol::Json => 0,
            Protocol::Protobuf => 1,
        }
    }

    /// Whether deliveries in this protocol carry the route's client-side view of the payload
    /// (JSON) rather than the broker's bytes untouched (Protobuf).
    pub fn needs_payload_view(self) -> bool {
        matches!(self, Protocol::Json)
    }

    /// Decodes one WebSocket data frame into a request.
    pub fn decode(&self, message: &Message) -> Result<Request, ProtocolError> {
        match (self, message) {
            (Protocol::Json, Message::Text(text)) => json::decode_json(text.as_str()),
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

    /// Encodes a reply or status frame.
    pub fn encode_reply(&self, reply: &Reply) -> Message {
        match self {
            Protocol::Json => Message::Text(Utf8Bytes::from(
                serde_json::to_string(reply).expect("replies serialize"),
            )),
            Protocol::Protobuf => Message::Binary(protobuf::encode_reply(reply)),
        }
    }

    /// Encodes a broker message for one subscription; the frame is shared by its subscribers.
    /// `view` is the route's client-side view of the payload, required when
    /// [`Protocol::needs_payload_view`].
    pub fn encode_delivery(&self, delivery: &Delivery<'_>, view: Option<&PayloadView>) -> Message {
        match self {
            Protocol::Json => {
                let fallback;
                let view = match view {
                    Some(v) => v,
                    None => {
                        fallback = PayloadView::Binary(delivery.message.payload.clone());
                        &fallback
                    }
                };
                Message::Text(Utf8Bytes::from(json::encode_delivery_json(delivery, view)))
            }
            Protocol::Protobuf => Message::Binary(protobuf::encode_delivery(delivery)),
        }
    }
}

/// The `id` of a request, echoed in its reply exactly as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum RequestId {
    Str(String),
    Num(serde_json::Number),
}

/// A decoded client request.
#[derive(Debug, Clone)]
pub enum Request {
    Subscribe {
        id: RequestId,
        channel: String,
        from: StartPosition,
    },
    Unsubscribe {
        id: RequestId,
        channel: String,
    },
    Publish {
        id: RequestId,
        channel: String,
        payload: ClientPayload,
        key: Option<String>,
        headers: Vec<(String, String)>,
        partition: Option<i32>,
    },
    Ping {
        id: RequestId,
    },
    /// A fresh token for the same subject (in-band refresh).
    Auth {
        id: RequestId,
        token: String,
    },
}

impl Request {
    pub fn id(&self) -> &RequestId {
        match self {
            Request::Subscribe { id, .. }
            | Request::Unsubscribe { id, .. }
            | Request::Publish { id, .. }
            | Request::Ping { id }
            | Request::Auth { id, .. } => id,
        }
    }
}

/// A request the gateway could not accept, with its documented error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub id: Option<RequestId>,
    pub code: &'static str,
    pub message: String,
}

impl ProtocolError {
    pub fn new(id: Option<RequestId>, code: &'static str, message: impl Into<String>) -> Self {
        ProtocolError {
            id,
            code,
            message: message.into(),
        }
    }

    pub fn into_reply(self) -> Reply {
        Reply::Error {
            id: self.id,
            code: self.code,
            message: self.message,
        }
    }
}

/// A frame the gateway sends other than a broker message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Ok {
        id: RequestId,
        #[serde(skip_serializing_if = "Option::is_none")]
        position: Option<PositionJson>,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        code: &'static str,
        message: String,
    },
    Pong {
        id: RequestId,
    },
    Status(Status),
}

impl Reply {
    pub fn ok(id: RequestId) -> Reply {
        Reply::Ok { id, position: None }
    }

    pub fn error(id: RequestId, code: &'static str, message: impl Into<String>) -> Reply {
        Reply::Error {
            id: Some(id),
            code,
            message: message.into(),
        }
    }
}

/// A `status` frame: something the gateway reports on its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    /// What happened: `backend_down`, `backend_up`, `messages_dropped`, `gap`, `shutting_down`.
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The client's subscriptions the event concerns.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_offset: Option<i64>,
}

/// `{"partition": p, "offset": o}` in frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PositionJson {
    pub partition: i32,
    pub offset: i64,
}

impl From<Position> for PositionJson {
    fn from(p: Position) -> Self {
        PositionJson {
            partition: p.partition,
            offset: p.offset,
        }
    }
}

/// A broker message on its way to the subscribers of one client pattern.
pub struct Delivery<'a> {
    /// The concrete client channel.
    pub channel: &'a str,
    /// The client pattern the subscribers subscribed with.
    pub subscription: &'a str,
    pub message: &'a BrokerMessage,
}
