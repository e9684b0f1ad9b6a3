//! Server-Sent Events on the wire: the [`SSE`] encoding the core uses for stream subscribers, and
//! the event ids that let a reconnecting `EventSource` resume a log where it stopped.
//!
//! A message event carries in `data:` the same JSON as a WebSocket `message` frame, so it is
//! made from the JSON protocol's frame once per subscription group and shared. A message with a
//! log position (Kafka) also gets an `id:`; since the id a client echoes must cover every
//! partition (and every channel) of its stream, not only the message's own, it is per stream:
//! the shared frame carries a marker line with the message's position and subscription, and each
//! stream's writer replaces it with the stream's [`EventIds`] (see [`EventIds::write_message`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::edge::json::JSON;
use crate::fanout::{Delivery, Encoding, Frame, Status};
use crate::transform::PayloadView;

/// How every message event starts; with a position, the marker line follows.
const MESSAGE_EVENT: &[u8] = b"event: message\n";
/// The marker line of a positioned message in a shared frame: `id: <p>:<o> <subscription>\n`.
const ID_MARKER: &[u8] = b"id: ";

/// Server-Sent Events: each message and status as one event whose data is the JSON protocol's
/// frame.
pub struct SseEncoding;

/// The one instance, which identifies the encoding to the core.
pub static SSE: SseEncoding = SseEncoding;

impl Encoding for SseEncoding {
    fn name(&self) -> &'static str {
        "sse"
    }

    fn wants_payload_view(&self) -> bool {
        true
    }

    fn delivery(&self, delivery: &Delivery<'_>, view: Option<&PayloadView>) -> Frame {
        let json = JSON.delivery(delivery, view);
        let mut out = Vec::with_capacity(json.len() + 64);
        out.extend_from_slice(MESSAGE_EVENT);
        if let Some(p) = delivery.message.position {
            // Subscriptions are client patterns, which hold no control characters: the marker
            // stays on one line. The stream's writer replaces it (see `EventIds`).
            let _ = writeln!(
                Utf8Vec(&mut out),
                "id: {}:{} {}",
                p.partition,
                p.offset,
                delivery.subscription
            );
        }
        push_data(&mut out, json.bytes());
        Frame::new(out)
    }

    fn status(&self, status: &Status) -> Frame {
        let json = JSON.status(status);
        let mut out = Vec::with_capacity(json.len() + 32);
        out.extend_from_slice(b"event: status\n");
        push_data(&mut out, json.bytes());
        Frame::new(out)
    }
}

/// `write!` into a byte vector.
struct Utf8Vec<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Utf8Vec<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Appends `data` as `data:` lines and ends the event. JSON strings never hold a raw line break,
/// but JSON embedded from a broker may have them between tokens; each line of the text (split at
/// CR LF, CR or LF, the three SSE line ends) becomes a `data:` line of its own, which the client
/// joins with LF: the same JSON value.
pub fn push_data(out: &mut Vec<u8>, data: &[u8]) {
    let mut rest = data;
    loop {
        out.extend_from_slice(b"data: ");
        match rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            None => {
                out.extend_from_slice(rest);
                out.extend_from_slice(b"\n\n");
                return;
            }
            Some(at) => {
                out.extend_from_slice(&rest[..at]);
                out.push(b'\n');
                let skip = if rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[at + skip..];
            }
        }
    }
}

/// A stream's last position per (channel index, partition), and the `id:` made from it.
///
/// The id lists every position as `<partition>:<offset>` (the offset of the last message seen on
/// that partition), comma-separated; positions of the stream's second, third, ... `channel`
/// parameter carry its index: `1/<partition>:<offset>`. A client that sends the last id it saw
/// back as `Last-Event-ID` resumes every partition right after what it saw.
#[derive(Debug, Default)]
pub struct EventIds {
    channels: Vec<String>,
    seen: BTreeMap<(usize, i32), i64>,
}

impl EventIds {
    /// Ids for a stream of these channels (in query order), starting from a resumed id's
    /// positions.
    pub fn new(channels: Vec<String>, resumed: &[ResumePoint]) -> Self {
        EventIds {
            channels,
            seen: resumed
                .iter()
                .map(|r| ((r.channel, r.partition), r.offset))
                .collect(),
        }
    }

    /// The current id.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (&(channel, partition), offset) in &self.seen {
            if !out.is_empty() {
                out.push(',');
            }
            if channel != 0 {
                let _ = write!(out, "{channel}/");
            }
            let _ = write!(out, "{partition}:{offset}");
        }
        out
    }

    /// Appends a message frame made by [`SSE`] to `out`, with the stream's id in place of the
    /// shared frame's marker line.
    pub fn write_message(&mut self, frame: &[u8], out: &mut Vec<u8>) {
        let Some(marked) = frame
            .strip_prefix(MESSAGE_EVENT)
            .and_then(|rest| rest.strip_prefix(ID_MARKER))
        else {
            out.extend_from_slice(frame);
            return;
        };
        let Some(end) = marked.iter().position(|b| *b == b'\n') else {
            out.extend_from_slice(frame);
            return;
        };
        let (line, body) = (&marked[..end], &marked[end + 1..]);
        if let Some((channel, partition, offset)) = std::str::from_utf8(line)
            .ok()
            .and_then(|line| line.split_once(' '))
            .and_then(|(position, subscription)| {
                let (p, o) = position.split_once(':')?;
                let channel = self.channels.iter().position(|c| c == subscription)?;
                Some((channel, p.parse::<i32>().ok()?, o.parse::<i64>().ok()?))
            })
        {
            self.seen.insert((channel, partition), offset);
        }
        out.extend_from_slice(MESSAGE_EVENT);
        out.extend_from_slice(ID_MARKER);
        out.extend_from_slice(self.render().as_bytes());
        out.push(b'\n');
        out.extend_from_slice(body);
    }
}

/// One position of a `Last-Event-ID`: the last message seen on a partition of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePoint {
    /// Index of the channel among the stream's `channel` parameters.
    pub channel: usize,
    pub partition: i32,
    /// The offset of the last message seen; the stream resumes at the next one.
    pub offset: i64,
}

/// Parses a `Last-Event-ID` as made by [`EventIds::render`] for a stream of `channels` channels.
/// An empty id resumes nothing.
pub fn parse_last_event_id(id: &str, channels: usize) -> Result<Vec<ResumePoint>, String> {
    let id = id.trim();
    let mut points: Vec<ResumePoint> = Vec::new();
    if id.is_empty() {
        return Ok(points);
    }
    let bad = |part: &str| {
        format!(
            "Last-Event-ID {id:?}: {part:?} is not <partition>:<offset> or <channel index>/<partition>:<offset>"
        )
    };
    for part in id.split(',') {
        let part = part.trim();
        let (channel, position) = match part.split_once('/') {
            Some((c, rest)) => (c.parse::<usize>().map_err(|_| bad(part))?, rest),
            None => (0, part),
        };
        let (p, o) = position.split_once(':').ok_or_else(|| bad(part))?;
        let partition = p.parse::<i32>().ok().filter(|p| *p >= 0);
        let offset = o.parse::<i64>().ok().filter(|o| *o >= 0 && *o < i64::MAX);
        let (Some(partition), Some(offset)) = (partition, offset) else {
            return Err(bad(part));
        };
        if channel >= channels {
            return Err(format!(
                "Last-Event-ID {id:?} names channel {channel}, but the stream has {channels} channel parameter(s)"
            ));
        }
        if points
            .iter()
            .any(|r| r.channel == channel && r.partition == partition)
        {
            return Err(format!(
                "Last-Event-ID {id:?} names partition {partition} twice"
            ));
        }
        points.push(ResumePoint {
            channel,
            partition,
            offset,
        });
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::{BrokerMessage, Position};
    use bytes::Bytes;

    fn text(frame: &[u8]) -> &str {
        std::str::from_utf8(frame).unwrap()
    }

    /// What an `EventSource` makes of one event: its type, id and data.
    fn parse_event(event: &str) -> (String, Option<String>, String) {
        let (mut kind, mut id, mut data) = ("message".to_owned(), None, Vec::new());
        let normalized = event.replace("\r\n", "\n").replace('\r', "\n");
        for line in normalized.lines() {
            let (field, value) = line.split_once(": ").unwrap_or((line, ""));
            match field {
                "event" => kind = value.to_owned(),
                "id" => id = Some(value.to_owned()),
                "data" => data.push(value.to_owned()),
                _ => {}
            }
        }
        (kind, id, data.join("\n"))
    }

    #[test]
    fn data_lines_keep_multi_line_json_intact() {
        for (raw, lines) in [
            ("{\"a\":1}", 1),
            ("{\n  \"a\": 1\n}", 3),
            ("{\r\n\"a\":\r1}", 3),
            ("[1,\n\n2]", 3),
            ("", 1),
        ] {
            let mut out = Vec::new();
            push_data(&mut out, raw.as_bytes());
            let event = text(&out);
            assert!(event.ends_with("\n\n"), "{event:?}");
            let body = event.trim_end_matches('\n');
            assert_eq!(
                body.lines().count(),
                lines,
                "every line is a data line: {event:?}"
            );
            assert!(body.lines().all(|l| l.starts_with("data: ")), "{event:?}");
            assert!(
                !event.trim_end_matches("\n\n").contains("\n\n"),
                "no empty line inside the event: {event:?}"
            );
            let (_, _, data) = parse_event(event);
            if !raw.is_empty() {
                let want: serde_json::Value = serde_json::from_str(raw).unwrap();
                let got: serde_json::Value = serde_json::from_str(&data).unwrap();
                assert_eq!(got, want, "{event:?}");
            }
        }
    }

    #[test]
    fn a_message_event_carries_the_json_frame_and_the_streams_id() {
        let message = BrokerMessage {
            topic: "t".into(),
            payload: Bytes::from_static(b"{\n\"temp\": 21.5\n}"),
            position: Some(Position {
                partition: 2,
                offset: 41,
            }),
            timestamp: Some(7),
            ..Default::default()
        };
        let view = PayloadView::Json(message.payload.clone());
        let frame = SSE.delivery(
            &Delivery {
                channel: "events/a b",
                subscription: "events/a b",
                message: &message,
            },
            Some(&view),
        );
        let mut ids = EventIds::new(vec!["other".into(), "events/a b".into()], &[]);
        let mut out = Vec::new();
        ids.write_message(frame.bytes(), &mut out);
        let (kind, id, data) = parse_event(text(&out));
        assert_eq!(kind, "message");
        assert_eq!(id.as_deref(), Some("1/2:41"));
        let json: serde_json::Value = serde_json::from_str(&data).unwrap();
        let same = JSON.delivery(
            &Delivery {
                channel: "events/a b",
                subscription: "events/a b",
                message: &message,
            },
            Some(&view),
        );
        assert_eq!(
            json,
            serde_json::from_slice::<serde_json::Value>(same.bytes()).unwrap(),
            "the data is the WebSocket message frame"
        );
        assert_eq!(json["payload"]["temp"], 21.5);

        // A later message on another partition: the id covers both.
        let later = BrokerMessage {
            position: Some(Position {
                partition: 0,
                offset: 3,
            }),
            ..message.clone()
        };
        let frame = SSE.delivery(
            &Delivery {
                channel: "events/a b",
                subscription: "events/a b",
                message: &later,
            },
            Some(&view),
        );
        out.clear();
        ids.write_message(frame.bytes(), &mut out);
        assert_eq!(parse_event(text(&out)).1.as_deref(), Some("1/0:3,1/2:41"));
    }

    #[test]
    fn messages_without_a_position_have_no_id() {
        let message = BrokerMessage {
            payload: Bytes::from_static(b"hi"),
            ..Default::default()
        };
        let view = PayloadView::Text(message.payload.clone());
        let frame = SSE.delivery(
            &Delivery {
                channel: "a",
                subscription: "a",
                message: &message,
            },
            Some(&view),
        );
        let mut out = Vec::new();
        EventIds::default().write_message(frame.bytes(), &mut out);
        let (kind, id, data) = parse_event(text(&out));
        assert_eq!((kind.as_str(), id), ("message", None));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&data).unwrap()["payload"],
            "hi"
        );
    }

    #[test]
    fn status_events() {
        let frame = SSE.status(&Status {
            code: "shutting_down",
            message: "bye\nnow".into(),
            reconnect_after_ms: Some(0),
            ..Status::default()
        });
        let (kind, id, data) = parse_event(text(frame.bytes()));
        assert_eq!((kind.as_str(), id), ("status", None));
        let json: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(json["code"], "shutting_down");
        assert_eq!(json["message"], "bye\nnow");
    }

    #[test]
    fn last_event_ids_round_trip_and_bad_ones_are_refused() {
        let points = parse_last_event_id("0:5, 2:9,1/0:3", 2).unwrap();
        assert_eq!(
            points,
            vec![
                ResumePoint {
                    channel: 0,
                    partition: 0,
                    offset: 5
                },
                ResumePoint {
                    channel: 0,
                    partition: 2,
                    offset: 9
                },
                ResumePoint {
                    channel: 1,
                    partition: 0,
                    offset: 3
                },
            ]
        );
        assert_eq!(
            EventIds::new(vec!["a".into(), "b".into()], &points).render(),
            "0:5,2:9,1/0:3"
        );
        assert_eq!(parse_last_event_id("", 1).unwrap(), vec![]);
        for bad in [
            "x", "1:", ":1", "-1:2", "1:-2", "1:2:3", "0:1,0:2", "a/0:1", "5/0:1",
        ] {
            assert!(parse_last_event_id(bad, 2).is_err(), "{bad}");
        }
    }
}
