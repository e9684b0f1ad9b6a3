//! The JSON protocol (`wsbridge.v1.json`): one JSON object per text frame.
//!
//! [`decode`] turns a client frame into a [`Request`]; [`JSON`] is the [`Encoding`] the core
//! uses for this protocol's subscribers, and [`encode_reply`] answers requests.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use super::{ProtocolError, Reply, Request, RequestId};
use crate::backends::StartPosition;
use crate::fanout::{Delivery, Encoding, Frame, Status};
use crate::transform::{ClientPayload, PayloadView};

/// The JSON encoding of deliveries and status events.
pub struct JsonEncoding;

/// The one instance, which identifies the encoding to the core.
pub static JSON: JsonEncoding = JsonEncoding;

impl Encoding for JsonEncoding {
    fn name(&self) -> &'static str {
        "wsbridge.v1.json"
    }

    fn wants_payload_view(&self) -> bool {
        true
    }

    fn delivery(&self, delivery: &Delivery<'_>, view: Option<&PayloadView>) -> Frame {
        let fallback;
        let view = match view {
            Some(v) => v,
            None => {
                fallback = PayloadView::Binary(delivery.message.payload.clone());
                &fallback
            }
        };
        Frame::new(encode_delivery(delivery, view))
    }

    fn status(&self, status: &Status) -> Frame {
        #[derive(Serialize)]
        struct StatusFrame<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            code: &'static str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            backend: Option<&'a str>,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            subscriptions: &'a [String],
            #[serde(skip_serializing_if = "Option::is_none")]
            count: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            partition: Option<i32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            requested_offset: Option<i64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            available_offset: Option<i64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reconnect_after_ms: Option<u64>,
        }
        to_frame(&StatusFrame {
            kind: "status",
            code: status.code,
            message: &status.message,
            backend: status.backend.as_deref(),
            subscriptions: &status.subscriptions,
            count: status.count,
            partition: status.partition,
            requested_offset: status.requested_offset,
            available_offset: status.available_offset,
            reconnect_after_ms: status.reconnect_after_ms,
        })
    }
}

/// Encodes a reply.
pub fn encode_reply(reply: &Reply) -> Frame {
    to_frame(reply)
}

fn to_frame(value: &impl Serialize) -> Frame {
    // These types hold only strings, integers and `serde_json` values, which always serialize.
    Frame::new(serde_json::to_vec(value).unwrap_or_default())
}

fn some_raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A client frame with every field kept raw, so type errors can name the field.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "some_raw")]
    kind: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    channel: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    payload: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    encoding: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    key: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    headers: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    partition: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    from: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    token: Option<&'a RawValue>,
}

/// Parses one JSON object with every field kept raw.
fn raw_frame(text: &str) -> Result<RawFrame<'_>, ProtocolError> {
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => ProtocolError::new(None, "invalid_frame", "a frame must be one JSON object"),
            Err(e) => ProtocolError::new(None, "invalid_json", format!("malformed JSON: {e}")),
        });
    }
    serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            ProtocolError::new(
                None,
                "invalid_frame",
                format!("a frame must be one JSON object: {e}"),
            )
        } else {
            ProtocolError::new(None, "invalid_json", format!("malformed JSON: {e}"))
        }
    })
}

/// Decodes one client frame.
pub fn decode<'a>(text: &'a str) -> Result<Request, ProtocolError> {
    let frame: RawFrame<'a> = raw_frame(text)?;

    let id = match frame.id {
        Some(raw) => match serde_json::from_str::<serde_json::Value>(raw.get()) {
            Ok(serde_json::Value::String(s)) => Some(RequestId::Str(s)),
            Ok(serde_json::Value::Number(n)) => Some(RequestId::Num(n)),
            _ => {
                return Err(ProtocolError::new(
                    None,
                    "invalid_frame",
                    "field \"id\" must be a string or a number",
                ));
            }
        },
        None => None,
    };
    let kind: String = match frame.kind {
        Some(raw) => field(raw, "type", &id)?,
        None => {
            return Err(ProtocolError::new(
                id,
                "invalid_frame",
                "missing field \"type\"",
            ));
        }
    };
    let Some(id) = id else {
        return Err(ProtocolError::new(
            None,
            "invalid_frame",
            format!("missing field \"id\" in {kind:?} request"),
        ));
    };
    let some_id = Some(id.clone());
    let required = |raw: Option<&'a RawValue>, name: &str| {
        raw.ok_or_else(|| {
            ProtocolError::new(
                Some(id.clone()),
                "invalid_frame",
                format!("missing field {name:?} in {kind:?} request"),
            )
        })
    };

    match kind.as_str() {
        "subscribe" => Ok(Request::Subscribe {
            channel: field(required(frame.channel, "channel")?, "channel", &some_id)?,
            from: match frame.from {
                None => StartPosition::Latest,
                Some(raw) => start_position(raw, &some_id)?,
            },
            id,
        }),
        "unsubscribe" => Ok(Request::Unsubscribe {
            channel: field(required(frame.channel, "channel")?, "channel", &some_id)?,
            id,
        }),
        "publish" => {
            let fields = publish_fields(&frame, &some_id)?;
            Ok(Request::Publish {
                id,
                channel: fields.channel,
                payload: fields.payload,
                key: fields.key,
                headers: fields.headers,
                partition: fields.partition,
            })
        }
        "ping" => Ok(Request::Ping { id }),
        "auth" => Ok(Request::Auth {
            token: field(required(frame.token, "token")?, "token", &some_id)?,
            id,
        }),
        other => Err(ProtocolError::new(
            some_id,
            "unknown_type",
            format!(
                "unknown request type {other:?}; expected subscribe, unsubscribe, publish, ping or auth"
            ),
        )),
    }
}

/// The fields of a publish: a `publish` frame without `type` and `id`.
#[derive(Debug)]
pub struct PublishFields {
    pub channel: String,
    pub payload: ClientPayload,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub partition: Option<i32>,
}

/// Decodes a publish given as one JSON object `{"channel", "payload", "encoding"?, "key"?,
/// "headers"?, "partition"?}` (the body of `POST /publish`), with the same rules and error codes
/// as a `publish` frame. Other fields are ignored, as in frames.
pub fn decode_publish(text: &str) -> Result<PublishFields, ProtocolError> {
    publish_fields(&raw_frame(text)?, &None)
}

/// Parses a subscription's start position written as JSON: `"latest"`, `"earliest"`,
/// `{"timestamp": ms}` or `{"offsets": {"<partition>": <next offset>, ...}}`.
pub fn decode_start_position(text: &str) -> Result<StartPosition, ProtocolError> {
    let raw: &RawValue = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(None, "invalid_frame", format!("malformed JSON: {e}")))?;
    start_position(raw, &None)
}

fn publish_fields<'a>(
    frame: &RawFrame<'a>,
    some_id: &Option<RequestId>,
) -> Result<PublishFields, ProtocolError> {
    let required = |raw: Option<&'a RawValue>, name: &str| {
        raw.ok_or_else(|| {
            ProtocolError::new(
                some_id.clone(),
                "invalid_frame",
                format!("missing field {name:?} in \"publish\" request"),
            )
        })
    };
    let channel = field(required(frame.channel, "channel")?, "channel", some_id)?;
    let payload = required(frame.payload, "payload")?;
    let encoding: Option<String> = frame
        .encoding
        .map(|raw| field(raw, "encoding", some_id))
        .transpose()?;
    let payload = match encoding.as_deref() {
        None => match serde_json::from_str::<String>(payload.get()) {
            Ok(text) => ClientPayload::Text(text),
            Err(_) => ClientPayload::Json(payload.to_owned()),
        },
        Some("base64") => {
            let text: String = field(payload, "payload", some_id)?;
            ClientPayload::Binary(Bytes::from(BASE64.decode(text.as_bytes()).map_err(
                |e| {
                    ProtocolError::new(
                        some_id.clone(),
                        "invalid_frame",
                        format!("field \"payload\" is not valid base64: {e}"),
                    )
                },
            )?))
        }
        Some(other) => {
            return Err(ProtocolError::new(
                some_id.clone(),
                "invalid_frame",
                format!("field \"encoding\" must be \"base64\" when present, not {other:?}"),
            ));
        }
    };
    let key = frame
        .key
        .map(|raw| field(raw, "key", some_id))
        .transpose()?;
    let headers = match frame.headers {
        None => Vec::new(),
        Some(raw) => {
            let map: serde_json::Map<String, serde_json::Value> = field(raw, "headers", some_id)?;
            let mut headers = Vec::with_capacity(map.len());
            for (name, value) in map {
                let serde_json::Value::String(value) = value else {
                    return Err(ProtocolError::new(
                        some_id.clone(),
                        "invalid_frame",
                        format!("header {name:?} must have a string value"),
                    ));
                };
                headers.push((name, value));
            }
            headers
        }
    };
    let partition = frame
        .partition
        .map(|raw| field::<i32>(raw, "partition", some_id))
        .transpose()?;
    if partition.is_some_and(|p| p < 0) {
        return Err(ProtocolError::new(
            some_id.clone(),
            "invalid_frame",
            "field \"partition\" must not be negative",
        ));
    }
    Ok(PublishFields {
        channel,
        payload,
        key,
        headers,
        partition,
    })
}

fn field<T: for<'de> Deserialize<'de>>(
    raw: &RawValue,
    name: &str,
    id: &Option<RequestId>,
) -> Result<T, ProtocolError> {
    serde_json::from_str(raw.get()).map_err(|e| {
        let expected = e.to_string();
        let expected = expected
            .split(", expected ")
            .nth(1)
            .and_then(|s| s.split(" at line").next())
            .unwrap_or("another type");
        ProtocolError::new(
            id.clone(),
            "invalid_frame",
            format!("field {name:?} has the wrong type: expected {expected}"),
        )
    })
}

fn start_position(raw: &RawValue, id: &Option<RequestId>) -> Result<StartPosition, ProtocolError> {
    let bad = |message: String| ProtocolError::new(id.clone(), "invalid_frame", message);
    let value: serde_json::Value =
        serde_json::from_str(raw.get()).map_err(|e| bad(e.to_string()))?;
    match &value {
        serde_json::Value::String(s) if s == "latest" => Ok(StartPosition::Latest),
        serde_json::Value::String(s) if s == "earliest" => Ok(StartPosition::Earliest),
        serde_json::Value::Object(map) if map.len() == 1 => {
            if let Some(ts) = map.get("timestamp") {
                return ts
                    .as_i64()
                    .filter(|t| *t >= 0)
                    .map(StartPosition::Timestamp)
                    .ok_or_else(|| {
                        bad("\"from\": {\"timestamp\": ...} needs milliseconds since the epoch".into())
                    });
            }
            if let Some(serde_json::Value::Object(offsets)) = map.get("offsets") {
                let mut parsed = Vec::with_capacity(offsets.len());
                for (partition, offset) in offsets {
                    let p = partition.parse::<i32>().ok().filter(|p| *p >= 0);
                    let o = offset.as_i64().filter(|o| *o >= 0);
                    match (p, o) {
                        (Some(p), Some(o)) => parsed.push((p, o)),
                        _ => {
                            return Err(bad(format!(
                                "\"from\": {{\"offsets\": ...}} maps partition numbers to next offsets; {partition:?}: {offset} is not one"
                            )));
                        }
                    }
                }
                if parsed.is_empty() {
                    return Err(bad("\"from\": {\"offsets\": {}} names no partition".into()));
                }
                parsed.sort_unstable();
                return Ok(StartPosition::Offsets(parsed));
            }
            Err(bad(
                "field \"from\" must be \"latest\", \"earliest\", {\"timestamp\": ms} or {\"offsets\": {...}}".into(),
            ))
        }
        _ => Err(bad(
            "field \"from\" must be \"latest\", \"earliest\", {\"timestamp\": ms} or {\"offsets\": {...}}".into(),
        )),
    }
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

fn encode_delivery(d: &Delivery<'_>, payload: &PayloadView) -> Vec<u8> {
    let m = d.message;
    let mut out = Vec::with_capacity(payload.bytes().len() + d.channel.len() * 2 + 96);
    out.extend_from_slice(br#"{"type":"message","channel":"#);
    push_json_str(&mut out, d.channel);
    out.extend_from_slice(br#","subscription":"#);
    push_json_str(&mut out, d.subscription);
    out.extend_from_slice(br#","payload":"#);
    match payload {
        PayloadView::Json(bytes) => out.extend_from_slice(bytes),
        PayloadView::Text(bytes) => push_json_str(
            &mut out,
            std::str::from_utf8(bytes).expect("PayloadView::Text holds UTF-8"),
        ),
        PayloadView::Binary(bytes) => {
            out.push(b'"');
            out.extend_from_slice(BASE64.encode(bytes).as_bytes());
            out.extend_from_slice(br#"","encoding":"base64""#);
        }
    }
    if let Some(key) = &m.key {
        out.extend_from_slice(br#","key":"#);
        push_json_str(&mut out, key);
    }
    if !m.headers.is_empty() {
        out.extend_from_slice(br#","headers":"#);
        serde_json::to_writer(&mut out, &headers_json(&m.headers)).expect("headers serialize");
    }
    for (name, value) in [
        ("content_type", &m.content_type),
        ("message_id", &m.message_id),
        ("correlation_id", &m.correlation_id),
    ] {
        if let Some(value) = value {
            out.extend_from_slice(format!(r#","{name}":"#).as_bytes());
            push_json_str(&mut out, value);
        }
    }
    if let Some(ts) = m.timestamp {
        out.extend_from_slice(format!(r#","timestamp":{ts}"#).as_bytes());
    }
    if let Some(p) = m.position {
        out.extend_from_slice(
            format!(
                r#","position":{{"partition":{},"offset":{}}}"#,
                p.partition, p.offset
            )
            .as_bytes(),
        );
    }
    out.push(b'}');
    out
}

/// Headers as a JSON object; a name that repeats gets an array of its values, in order.
fn headers_json(headers: &[(String, String)]) -> serde_json::Map<String, serde_json::Value> {
    let mut map = serde_json::Map::new();
    for (name, value) in headers {
        let value = serde_json::Value::String(value.clone());
        match map.get_mut(name) {
            None => {
                map.insert(name.clone(), value);
            }
            Some(serde_json::Value::Array(values)) => values.push(value),
            Some(existing) => {
                let first = existing.take();
                *existing = serde_json::Value::Array(vec![first, value]);
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::{BrokerMessage, Position};

    fn err(text: &str) -> (Option<RequestId>, &'static str, String) {
        let e = decode(text).unwrap_err();
        (e.id, e.code, e.message)
    }

    #[test]
    fn decodes_every_request() {
        assert!(matches!(
            decode(r#"{"type":"subscribe","id":1,"channel":"a/+"}"#).unwrap(),
            Request::Subscribe { channel, from: StartPosition::Latest, .. } if channel == "a/+"
        ));
        assert!(matches!(
            decode(r#"{"type":"subscribe","id":"x","channel":"a","from":{"offsets":{"1":5,"0":2}}}"#).unwrap(),
            Request::Subscribe { from: StartPosition::Offsets(o), .. } if o == vec![(0, 2), (1, 5)]
        ));
        assert!(matches!(
            decode(r#"{"type":"unsubscribe","id":1,"channel":"a"}"#).unwrap(),
            Request::Unsubscribe { .. }
        ));
        let Request::Publish { payload, key, headers, partition, .. } = decode(
            r#"{"type":"publish","id":2,"channel":"a","payload":{"v": 1},"key":"k","headers":{"h":"v"},"partition":3}"#,
        )
        .unwrap() else {
            panic!("not a publish")
        };
        assert!(matches!(payload, ClientPayload::Json(raw) if raw.get() == r#"{"v": 1}"#));
        assert_eq!(key.as_deref(), Some("k"));
        assert_eq!(headers, vec![("h".to_string(), "v".to_string())]);
        assert_eq!(partition, Some(3));
        assert!(matches!(
            decode(r#"{"type":"publish","id":2,"channel":"a","payload":null}"#).unwrap(),
            Request::Publish { payload: ClientPayload::Json(raw), .. } if raw.get() == "null"
        ));
        assert!(matches!(
            decode(r#"{"type":"publish","id":2,"channel":"a","payload":"AQI=","encoding":"base64"}"#).unwrap(),
            Request::Publish { payload: ClientPayload::Binary(b), .. } if b[..] == [1, 2]
        ));
        assert!(matches!(
            decode(r#"{"type":"ping","id":7,"extra":true}"#).unwrap(),
            Request::Ping { .. }
        ));
    }

    #[test]
    fn explains_bad_frames() {
        assert_eq!(err("{nope").1, "invalid_json");
        assert_eq!(err("{nope").0, None);
        assert_eq!(err("[1,2]").1, "invalid_frame");
        assert_eq!(err(r#"{"id":1}"#).1, "invalid_frame");
        assert_eq!(err(r#"{"id":1}"#).0, Some(RequestId::Num(1.into())));
        assert_eq!(
            err(r#"{"type":"ping"}"#).2,
            "missing field \"id\" in \"ping\" request"
        );
        assert_eq!(err(r#"{"type":"dance","id":1}"#).1, "unknown_type");
        assert_eq!(
            err(r#"{"type":"subscribe","id":1}"#).2,
            "missing field \"channel\" in \"subscribe\" request"
        );
        let (id, code, msg) = err(r#"{"type":"subscribe","id":"a","channel":5}"#);
        assert_eq!(
            (id, code),
            (Some(RequestId::Str("a".into())), "invalid_frame")
        );
        assert!(msg.contains("\"channel\" has the wrong type"), "{msg}");
        assert!(
            err(r#"{"type":"publish","id":1,"channel":"a"}"#)
                .2
                .contains("\"payload\"")
        );
        assert!(
            err(r#"{"type":"publish","id":1,"channel":"a","payload":"%%","encoding":"base64"}"#)
                .2
                .contains("base64")
        );
        assert!(
            err(r#"{"type":"publish","id":1,"channel":"a","payload":1,"headers":{"h":1}}"#)
                .2
                .contains("header \"h\"")
        );
        assert!(
            err(r#"{"type":"publish","id":1,"channel":"a","payload":1,"partition":-1}"#)
                .2
                .contains("negative")
        );
        assert!(
            err(r#"{"type":"subscribe","id":1,"channel":"a","from":"yesterday"}"#)
                .2
                .contains("\"from\"")
        );
        assert_eq!(
            err(r#"{"type":"ping","id":[1]}"#).2,
            "field \"id\" must be a string or a number"
        );
    }

    #[test]
    fn encodes_deliveries_per_payload_kind() {
        let message = BrokerMessage {
            topic: "t".into(),
            key: Some("k".into()),
            headers: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            timestamp: Some(5),
            position: Some(Position {
                partition: 1,
                offset: 9,
            }),
            ..Default::default()
        };
        let frame = |payload: PayloadView| {
            let text = encode_delivery(
                &Delivery {
                    channel: "c/\"q\"",
                    subscription: "c/#",
                    message: &message,
                },
                &payload,
            );
            serde_json::from_slice::<serde_json::Value>(&text).unwrap()
        };
        let v = frame(PayloadView::Json(Bytes::from_static(b"{\"x\": [1]}")));
        assert_eq!(v["type"], "message");
        assert_eq!(v["channel"], "c/\"q\"");
        assert_eq!(v["subscription"], "c/#");
        assert_eq!(v["payload"]["x"][0], 1);
        assert_eq!(v["key"], "k");
        assert_eq!(v["headers"]["a"], serde_json::json!(["1", "2"]));
        assert_eq!(v["timestamp"], 5);
        assert_eq!(
            v["position"],
            serde_json::json!({"partition": 1, "offset": 9})
        );
        assert!(v.get("encoding").is_none());
        let v = frame(PayloadView::Text(Bytes::from_static(b"line \"1\"\n")));
        assert_eq!(v["payload"], "line \"1\"\n");
        let v = frame(PayloadView::Binary(Bytes::from_static(&[0xff, 0])));
        assert_eq!(v["payload"], "/wA=");
        assert_eq!(v["encoding"], "base64");
    }

    #[test]
    fn replies_echo_the_id_as_sent() {
        let text = |r: &Reply| String::from_utf8(encode_reply(r).into_bytes().to_vec()).unwrap();
        assert_eq!(
            text(&Reply::ok(RequestId::Num(3.into()))),
            r#"{"type":"ok","id":3}"#
        );
        assert_eq!(
            text(&Reply::error(RequestId::Str("a".into()), "no_route", "x")),
            r#"{"type":"error","id":"a","code":"no_route","message":"x"}"#
        );
        let status = JSON.status(&Status {
            code: "messages_dropped",
            message: "m".into(),
            count: Some(3),
            ..Default::default()
        });
        assert_eq!(
            String::from_utf8(status.into_bytes().to_vec()).unwrap(),
            r#"{"type":"status","code":"messages_dropped","message":"m","count":3}"#
        );
    }
}
