//! AMQP message properties to and from the gateway's message fields.
//!
//! Going out to clients, AMQP headers become string headers where the value has a natural string
//! form (strings, numbers, booleans, timestamps; arrays as repeated headers); content type,
//! message id, correlation id and timestamp (seconds in AMQP, milliseconds in frames) map to
//! their `message` fields. Coming in from clients, headers become AMQP long-string headers and
//! the message is stamped persistent with the current time.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::backends::adapter::{BackendError, BrokerMessage};

/// Delivery mode 2: a durable queue keeps the message across a broker restart.
const PERSISTENT: u8 = 2;

/// Builds the gateway message for a delivery's routing key, body and properties.
pub fn to_broker_message(
    routing_key: &str,
    body: Vec<u8>,
    properties: &BasicProperties,
) -> BrokerMessage {
    let mut headers = Vec::new();
    if let Some(table) = properties.headers() {
        for (name, value) in table.inner() {
            push_header(&mut headers, name.as_str(), value);
        }
    }
    let short = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
    BrokerMessage {
        topic: routing_key.to_owned(),
        payload: Bytes::from(body),
        headers,
        content_type: short(properties.content_type()),
        message_id: short(properties.message_id()),
        correlation_id: short(properties.correlation_id()),
        timestamp: properties
            .timestamp()
            .and_then(|s| i64::try_from(s).ok())
            .and_then(|s| s.checked_mul(1000)),
        ..BrokerMessage::default()
    }
}

/// The header in which RabbitMQ gives each message of a stream its offset.
pub const STREAM_OFFSET: &str = "x-stream-offset";

/// A stream delivery's offset, from its `x-stream-offset` header.
pub fn stream_offset(properties: &BasicProperties) -> Option<i64> {
    let value = properties.headers().as_ref()?.inner().get(STREAM_OFFSET)?;
    match *value {
        AMQPValue::LongLongInt(v) => Some(v),
        AMQPValue::LongInt(v) => Some(v.into()),
        AMQPValue::LongUInt(v) => Some(v.into()),
        AMQPValue::ShortInt(v) => Some(v.into()),
        AMQPValue::ShortUInt(v) => Some(v.into()),
        AMQPValue::ShortShortInt(v) => Some(v.into()),
        AMQPValue::ShortShortUInt(v) => Some(v.into()),
        _ => None,
    }
}

/// Adds a header value in string form; values without one (tables, binary, void) are left out.
fn push_header(headers: &mut Vec<(String, String)>, name: &str, value: &AMQPValue) {
    let text = match value {
        AMQPValue::Boolean(v) => v.to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortShortUInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::ShortUInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongUInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::Float(v) => v.to_string(),
        AMQPValue::Double(v) => v.to_string(),
        AMQPValue::Timestamp(v) => v.to_string(),
        AMQPValue::DecimalValue(d) => decimal(d.value, d.scale),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(s) => s.to_owned(),
            Err(_) => return,
        },
        AMQPValue::ByteArray(b) => match std::str::from_utf8(b.as_slice()) {
            Ok(s) => s.to_owned(),
            Err(_) => return,
        },
        AMQPValue::FieldArray(values) => {
            for value in values.as_slice() {
                if !matches!(value, AMQPValue::FieldArray(_)) {
                    push_header(headers, name, value);
                }
            }
            return;
        }
        AMQPValue::FieldTable(_) | AMQPValue::Void => return,
    };
    headers.push((name.to_owned(), text));
}

fn decimal(value: u32, scale: u8) -> String {
    let digits = value.to_string();
    let scale = usize::from(scale);
    if scale == 0 {
        return digits;
    }
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = digits.split_at(digits.len() - scale);
    format!("{int}.{frac}")
}

/// The properties of a client publish: its headers, persistent, stamped with the current time.
pub fn publish_properties(headers: &[(String, String)]) -> Result<BasicProperties, BackendError> {
    let mut properties = BasicProperties::default().with_delivery_mode(PERSISTENT);
    if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) {
        properties = properties.with_timestamp(now.as_secs());
    }
    if headers.is_empty() {
        return Ok(properties);
    }
    let mut table = FieldTable::default();
    for (name, value) in headers {
        let key = ShortString::try_new(name.as_str()).map_err(|_| BackendError::Rejected {
            code: "invalid_frame",
            message: format!(
                "header name {:?}... is longer than the 255 bytes AMQP allows",
                name.chars().take(32).collect::<String>()
            ),
        })?;
        table.insert(key, AMQPValue::LongString(LongString::from(value.as_str())));
    }
    Ok(properties.with_headers(table))
}

/// A routing key, exchange or queue name as an AMQP short string.
pub fn short(what: &str, value: &str) -> Result<ShortString, BackendError> {
    ShortString::try_new(value).map_err(|_| BackendError::Rejected {
        code: "invalid_channel",
        message: format!("the {what} would be longer than the 255 bytes AMQP allows"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{ByteArray, DecimalValue, FieldArray};

    #[test]
    fn properties_map_to_message_fields() {
        let mut table = FieldTable::default();
        table.insert("s".into(), AMQPValue::LongString("text".into()));
        table.insert("n".into(), AMQPValue::LongLongInt(-7));
        table.insert("b".into(), AMQPValue::Boolean(true));
        table.insert(
            "d".into(),
            AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 5 }),
        );
        table.insert(
            "many".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongString("x".into()),
                AMQPValue::LongInt(2),
            ])),
        );
        table.insert(
            "bin".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![0xff, 0xfe])),
        );
        table.insert(
            "nested".into(),
            AMQPValue::FieldTable(FieldTable::default()),
        );
        let properties = BasicProperties::default()
            .with_headers(table)
            .with_content_type("application/json".into())
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_timestamp(1_700_000_000);
        let m = to_broker_message("orders.eu.1", b"{}".to_vec(), &properties);
        assert_eq!(m.topic, "orders.eu.1");
        assert_eq!(&m.payload[..], b"{}");
        let mut headers = m.headers.clone();
        headers.sort();
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("b", "true"),
                ("d", "0.05"),
                ("many", "2"),
                ("many", "x"),
                ("n", "-7"),
                ("s", "text")
            ]
        );
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.message_id.as_deref(), Some("m-1"));
        assert_eq!(m.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(m.timestamp, Some(1_700_000_000_000));
    }

    #[test]
    fn client_headers_become_amqp_headers() {
        let p = publish_properties(&[("trace".into(), "abc".into())]).unwrap();
        let headers = p.headers().as_ref().unwrap();
        assert_eq!(
            headers.inner().get("trace"),
            Some(&AMQPValue::LongString("abc".into()))
        );
        assert_eq!(*p.delivery_mode(), Some(PERSISTENT));
        assert!(p.timestamp().is_some());

        let long = "h".repeat(300);
        let e = publish_properties(&[(long, "v".into())]).unwrap_err();
        assert_eq!(e.code(), "invalid_frame");
    }

    #[test]
    fn stream_offsets_are_read_from_their_header() {
        let mut table = FieldTable::default();
        table.insert(STREAM_OFFSET.into(), AMQPValue::LongLongInt(41));
        let properties = BasicProperties::default().with_headers(table);
        assert_eq!(stream_offset(&properties), Some(41));
        assert_eq!(stream_offset(&BasicProperties::default()), None);
    }

    #[test]
    fn decimals_keep_their_scale() {
        assert_eq!(decimal(12345, 2), "123.45");
        assert_eq!(decimal(5, 3), "0.005");
        assert_eq!(decimal(7, 0), "7");
    }
}
