//! Client edges: how clients reach the core.
//!
//! An edge accepts clients in one wire format and speaks to the core through
//! [`crate::fanout::Hub`] (subscribe, publish) and [`crate::fanout::Encoding`] (what subscribers
//! receive). The WebSocket endpoint ([`ws`]) has two client protocols, chosen by subprotocol:
//! JSON text frames ([`json`], `wsbridge.v1.json`) and binary Protobuf frames ([`protobuf`],
//! `wsbridge.v1.protobuf`). Both decode into the same [`Request`] and answer with the same
//! [`Reply`], defined here. Two HTTP edges serve clients that cannot or need not hold a
//! WebSocket: Server-Sent Events ([`sse`], a subscription stream whose events carry the JSON
//! protocol's frames) and HTTP publish ([`http_publish`], one publish per request, parsed like a
//! JSON `publish` frame). They answer refusals with an HTTP status chosen by [`http_status`] from
//! the same error codes. docs/PROTOCOL.md documents the protocols side by side.

pub mod connections;
pub mod http_publish;
pub mod json;
pub mod protobuf;
pub mod sse;
pub mod ws;
pub mod ws_proxy;

use serde::Serialize;

use crate::backends::{Position, StartPosition};
use crate::transform::ClientPayload;

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

/// The gateway's answer to a request (status events and messages are encoded by the edge's
/// [`crate::fanout::Encoding`]).
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

/// The HTTP status for an error code, for the HTTP edges (`/sse` before its stream starts,
/// `/publish`, `/routes`). docs/PROTOCOL.md lists the mapping.
pub fn http_status(code: &str) -> u16 {
    match code {
        "invalid_token" => 401,
        "forbidden" => 403,
        "no_route" => 404,
        "unsupported_media_type" => 415,
        "message_too_big" | "message_too_large" => 413,
        "rate_limited" | "too_many_replays" => 429,
        "backend_unavailable" | "shutting_down" => 503,
        "backend_timeout" => 504,
        "invalid_json"
        | "invalid_frame"
        | "invalid_request"
        | "invalid_channel"
        | "invalid_payload"
        | "invalid_partition"
        | "unsupported"
        | "unsupported_pattern"
        | "already_subscribed"
        | "too_many_subscriptions" => 400,
        // `backend_error` and the refusals backends add for their brokers.
        _ => 502,
    }
}
