//! The binary protocol (`wsbridge.v1.protobuf`): one `ClientFrame` or `ServerFrame` per binary
//! frame, as defined in `schemas/wsbridge/v1/client.proto`. Payloads are raw bytes in both
//! directions.

use bytes::Bytes;
use prost::Message as _;

use super::{ProtocolError, Reply, Request, RequestId};
use crate::backends::StartPosition;
use crate::fanout::{Delivery, Encoding, Frame, Status};
use crate::transform::{ClientPayload, PayloadView};

/// The Protobuf encoding of deliveries and status events: payloads are the broker's bytes.
pub struct ProtobufEncoding;

/// The one instance, which identifies the encoding to the core.
pub static PROTOBUF: ProtobufEncoding = ProtobufEncoding;

impl Encoding for ProtobufEncoding {
    fn name(&self) -> &'static str {
        "wsbridge.v1.protobuf"
    }

    fn wants_payload_view(&self) -> bool {
        false
    }

    fn delivery(&self, delivery: &Delivery<'_>, _view: Option<&PayloadView>) -> Frame {
        Frame::new(encode_delivery(delivery))
    }

    fn status(&self, status: &Status) -> Frame {
        server_frame(server_frame::Frame::Status(status_envelope(status)))
    }
}

fn server_frame(frame: server_frame::Frame) -> Frame {
    Frame::new(envelope::ServerFrame { frame: Some(frame) }.encode_to_vec())
}

/// The envelope types generated from `schemas/wsbridge/v1/client.proto`.
#[allow(clippy::all, missing_docs)]
pub mod envelope {
    include!(concat!(env!("OUT_DIR"), "/wsbridge.v1.rs"));
}

use envelope::{client_frame, server_frame, start_position};

fn id_text(id: &RequestId) -> String {
    match id {
        RequestId::Str(s) => s.clone(),
        RequestId::Num(n) => n.to_string(),
    }
}

/// Decodes one client frame.
pub fn decode(bytes: &[u8]) -> Result<Request, ProtocolError> {
    let frame = envelope::ClientFrame::decode(bytes).map_err(|e| {
        ProtocolError::new(
            None,
            "invalid_frame",
            format!("not a wsbridge.v1.ClientFrame: {e}"),
        )
    })?;
    if frame.id.is_empty() {
        return Err(ProtocolError::new(
            None,
            "invalid_frame",
            "missing field \"id\"",
        ));
    }
    let id = RequestId::Str(frame.id);
    let bad = |message: &str| ProtocolError::new(Some(id.clone()), "invalid_frame", message);
    let Some(request) = frame.request else {
        return Err(bad(
            "the frame carries no request (subscribe, unsubscribe, publish, ping or auth)",
        ));
    };
    Ok(match request {
        client_frame::Request::Subscribe(s) => {
            let from = match s.from.and_then(|f| f.position) {
                None | Some(start_position::Position::Latest(_)) => StartPosition::Latest,
                Some(start_position::Position::Earliest(_)) => StartPosition::Earliest,
                Some(start_position::Position::TimestampMs(ms)) if ms >= 0 => {
                    StartPosition::Timestamp(ms)
                }
                Some(start_position::Position::TimestampMs(_)) => {
                    return Err(bad("from.timestamp_ms must not be negative"));
                }
                Some(start_position::Position::Offsets(offsets)) => {
                    let mut parsed: Vec<(i32, i64)> = offsets.next.into_iter().collect();
                    if parsed.is_empty() || parsed.iter().any(|(p, o)| *p < 0 || *o < 0) {
                        return Err(bad(
                            "from.offsets maps partition numbers to next offsets, none negative, at least one",
                        ));
                    }
                    parsed.sort_unstable();
                    StartPosition::Offsets(parsed)
                }
            };
            Request::Subscribe {
                id,
                channel: s.channel,
                from,
            }
        }
        client_frame::Request::Unsubscribe(u) => Request::Unsubscribe {
            id,
            channel: u.channel,
        },
        client_frame::Request::Publish(p) => {
            if p.partition.is_some_and(|n| n < 0) {
                return Err(bad("partition must not be negative"));
            }
            let mut headers: Vec<(String, String)> = p.headers.into_iter().collect();
            headers.sort();
            Request::Publish {
                id,
                channel: p.channel,
                payload: ClientPayload::Binary(p.payload),
                key: p.key,
                headers,
                partition: p.partition,
            }
        }
        client_frame::Request::Ping(_) => Request::Ping { id },
        client_frame::Request::Auth(a) => Request::Auth { id, token: a.token },
    })
}

fn status_envelope(status: &Status) -> envelope::Status {
    envelope::Status {
        code: status.code.to_owned(),
        message: status.message.clone(),
        backend: status.backend.clone(),
        subscriptions: status.subscriptions.clone(),
        count: status.count,
        partition: status.partition,
        requested_offset: status.requested_offset,
        available_offset: status.available_offset,
        reconnect_after_ms: status.reconnect_after_ms,
    }
}

/// Encodes a reply.
pub fn encode_reply(reply: &Reply) -> Frame {
    server_frame(match reply {
        Reply::Ok { id, position } => server_frame::Frame::Ok(envelope::Ok {
            id: id_text(id),
            position: position.map(|p| envelope::Position {
                partition: p.partition,
                offset: p.offset,
            }),
        }),
        Reply::Error { id, code, message } => server_frame::Frame::Error(envelope::Error {
            id: id.as_ref().map(id_text),
            code: (*code).to_owned(),
            message: message.clone(),
        }),
        Reply::Pong { id } => server_frame::Frame::Pong(envelope::Pong { id: id_text(id) }),
    })
}

fn encode_delivery(d: &Delivery<'_>) -> Bytes {
    let m = d.message;
    let frame = envelope::ServerFrame {
        frame: Some(server_frame::Frame::Message(envelope::Delivery {
            channel: d.channel.to_owned(),
            subscription: d.subscription.to_owned(),
            payload: m.payload.clone(),
            key: m.key.clone(),
            headers: m
                .headers
                .iter()
                .map(|(name, value)| envelope::Header {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            content_type: m.content_type.clone(),
            message_id: m.message_id.clone(),
            correlation_id: m.correlation_id.clone(),
            timestamp: m.timestamp,
            position: m.position.map(|p| envelope::Position {
                partition: p.partition,
                offset: p.offset,
            }),
        })),
    };
    Bytes::from(frame.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::{BrokerMessage, Position};
    use crate::edge::PositionJson;

    fn encode(frame: envelope::ClientFrame) -> Vec<u8> {
        frame.encode_to_vec()
    }

    #[test]
    fn decodes_requests_with_raw_payloads() {
        let bytes = encode(envelope::ClientFrame {
            id: "7".into(),
            request: Some(client_frame::Request::Publish(envelope::Publish {
                channel: "a/b".into(),
                payload: Bytes::from_static(&[0, 159, 146, 150]),
                key: Some("k".into()),
                headers: [("z".to_string(), "1".to_string()), ("a".into(), "2".into())]
                    .into_iter()
                    .collect(),
                partition: Some(2),
            })),
        });
        let Request::Publish {
            id,
            payload,
            headers,
            partition,
            ..
        } = decode(&bytes).unwrap()
        else {
            panic!("not a publish")
        };
        assert_eq!(id, RequestId::Str("7".into()));
        assert!(matches!(payload, ClientPayload::Binary(b) if b[..] == [0, 159, 146, 150]));
        assert_eq!(headers[0].0, "a");
        assert_eq!(partition, Some(2));

        let bytes = encode(envelope::ClientFrame {
            id: "8".into(),
            request: Some(client_frame::Request::Subscribe(envelope::Subscribe {
                channel: "a/#".into(),
                from: Some(envelope::StartPosition {
                    position: Some(start_position::Position::Offsets(envelope::Offsets {
                        next: [(1, 5), (0, 3)].into_iter().collect(),
                    })),
                }),
            })),
        });
        assert!(matches!(
            decode(&bytes).unwrap(),
            Request::Subscribe { from: StartPosition::Offsets(o), .. } if o == vec![(0, 3), (1, 5)]
        ));
    }

    #[test]
    fn explains_bad_frames() {
        assert_eq!(
            decode(&[0xff, 0xff, 0xff]).unwrap_err().code,
            "invalid_frame"
        );
        let no_id = encode(envelope::ClientFrame {
            id: String::new(),
            request: Some(client_frame::Request::Ping(envelope::Ping {})),
        });
        assert_eq!(decode(&no_id).unwrap_err().id, None);
        let empty = encode(envelope::ClientFrame {
            id: "1".into(),
            request: None,
        });
        let e = decode(&empty).unwrap_err();
        assert_eq!(
            (e.id, e.code),
            (Some(RequestId::Str("1".into())), "invalid_frame")
        );
    }

    #[test]
    fn encodes_replies_and_deliveries() {
        let reply = encode_reply(&Reply::Ok {
            id: RequestId::Num(3.into()),
            position: Some(PositionJson {
                partition: 1,
                offset: 2,
            }),
        });
        let frame = envelope::ServerFrame::decode(reply.into_bytes()).unwrap();
        assert!(matches!(
            frame.frame,
            Some(server_frame::Frame::Ok(envelope::Ok { id, position: Some(p) })) if id == "3" && p.offset == 2
        ));
        let message = BrokerMessage {
            payload: Bytes::from_static(b"\x08\x01"),
            position: Some(Position {
                partition: 0,
                offset: 9,
            }),
            ..Default::default()
        };
        let bytes = encode_delivery(&Delivery {
            channel: "c",
            subscription: "c/#",
            message: &message,
        });
        let Some(server_frame::Frame::Message(m)) =
            envelope::ServerFrame::decode(bytes).unwrap().frame
        else {
            panic!("not a message")
        };
        assert_eq!(&m.payload[..], b"\x08\x01");
        assert_eq!(m.position.unwrap().offset, 9);
    }
}
