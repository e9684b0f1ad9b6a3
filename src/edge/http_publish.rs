//! The HTTP publish edge: `POST /publish` with one publish as a JSON body.
//!
//! The body is a `publish` frame without `type` and `id`, decoded by the JSON protocol
//! ([`super::json::decode_publish`]), so it has the same fields, rules and error codes. The
//! publish then takes the same path as a WebSocket client's: the channel check, the publish rates
//! (per client address here, since there is no connection to count against), the hub's routing,
//! authorisation and transform, and the backend. The answer waits for the broker's
//! acknowledgement.

use std::net::IpAddr;

use super::json::decode_publish;
use super::{PositionJson, ProtocolError};
use crate::auth::Principal;
use crate::fanout::Hub;
use crate::limits::AddressPublishLimiter;
use crate::routing::ChannelPattern;

/// Publishes the message in `body` for `principal` (from `ip`) and waits for the broker's
/// acknowledgement; returns the message's position where the backend has one.
pub async fn publish(
    body: &[u8],
    principal: &Principal,
    ip: IpAddr,
    hub: &Hub,
    limiter: &AddressPublishLimiter,
) -> Result<Option<PositionJson>, ProtocolError> {
    let fail = |code, message: String| ProtocolError::new(None, code, message);
    let text = std::str::from_utf8(body)
        .map_err(|e| fail("invalid_json", format!("the body is not UTF-8: {e}")))?;
    let fields = decode_publish(text)?;
    let channel = ChannelPattern::parse_concrete(&fields.channel)
        .map_err(|e| fail("invalid_channel", e.to_string()))?;
    limiter
        .check_publish(ip, fields.payload.len())
        .map_err(|m| fail("rate_limited", m))?;
    let prepared = hub
        .prepare_publish(
            principal,
            &channel,
            fields.payload,
            fields.key,
            fields.headers,
            fields.partition,
        )
        .map_err(|e| fail(e.code, e.message))?;
    let receipt = hub
        .publish(prepared)
        .await
        .map_err(|e| fail(e.code, e.message))?;
    Ok(receipt.position.map(PositionJson::from))
}

/// The `200` body of an acknowledged publish: `{"type":"ok"}`, with `"position"` where the
/// backend has one.
pub fn ok_body(position: Option<PositionJson>) -> String {
    match position {
        None => r#"{"type":"ok"}"#.to_owned(),
        Some(p) => format!(
            r#"{{"type":"ok","position":{{"partition":{},"offset":{}}}}}"#,
            p.partition, p.offset
        ),
    }
}

/// The body of a refusal: `{"code": ..., "message": ...}`.
pub fn error_body(error: &ProtocolError) -> String {
    serde_json::json!({ "code": error.code, "message": error.message }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies() {
        assert_eq!(ok_body(None), r#"{"type":"ok"}"#);
        let v: serde_json::Value = serde_json::from_str(&ok_body(Some(PositionJson {
            partition: 1,
            offset: 9,
        })))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "ok", "position": {"partition": 1, "offset": 9}})
        );
        let e = ProtocolError::new(None, "no_route", "no \"route\"");
        let v: serde_json::Value = serde_json::from_str(&error_body(&e)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": "no_route", "message": "no \"route\""})
        );
    }
}
