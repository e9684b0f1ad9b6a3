//! The Server-Sent Events edge: `GET /sse?channel=<pattern>` as one subscription stream.
//!
//! A stream is opened in two steps. [`open`] checks the request (its channels, `from` and
//! `Last-Event-ID`) and subscribes every channel through the [`Hub`], like a WebSocket session
//! does; a refusal is answered before any byte of the stream with an HTTP status and the
//! protocol's error code. Then [`run`] is the stream's writer: it drains the stream's [`Outbox`]
//! into event-stream chunks (one chunk per batch), sends keepalive comments every
//! `server.ping_interval`, announces `shutting_down` and ends the stream at its point of the
//! drain window, ends it when the token expires, and gives up on a client that takes no data
//! for `server.write_timeout`. Messages arrive through the core like for any edge, encoded by
//! [`event::SSE`] once per subscription group.

pub mod event;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::ProtocolError;
use super::connections::{ConnectionKind, NewConnection};
use super::ws::{SessionContext, Subscriptions, drain_delay};
use crate::auth::Verified;
use crate::backends::StartPosition;
use crate::fanout::outbox::{Drained, OutItem, Outbox};
use crate::fanout::upstream::Member;
use crate::fanout::{Encoding, Status};
use crate::limits::RequestLimiter;
use crate::routing::ChannelPattern;
use event::{EventIds, ResumePoint, SSE};

/// A stream request: `GET /sse?channel=a/+&channel=b&from=earliest` plus `Last-Event-ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseRequest {
    /// The `channel` parameters, in order.
    pub channels: Vec<String>,
    /// Where channels start that the `Last-Event-ID` does not resume.
    pub from: StartPosition,
    /// Positions from `Last-Event-ID`; they win over `from` for their channels.
    pub resume: Vec<ResumePoint>,
}

fn invalid(message: impl Into<String>) -> ProtocolError {
    ProtocolError::new(None, "invalid_request", message)
}

/// Parses the query string and the `Last-Event-ID` header. Other query parameters (such as
/// `access_token`) are left to others.
pub fn parse_request(
    query: Option<&str>,
    last_event_id: Option<&str>,
) -> Result<SseRequest, ProtocolError> {
    let mut channels = Vec::new();
    let mut from = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "channel" => channels.push(value.into_owned()),
            "from" if from.is_some() => return Err(invalid("parameter \"from\" given twice")),
            "from" => from = Some(parse_from(&value)?),
            _ => {}
        }
    }
    if channels.is_empty() {
        return Err(invalid(
            "missing parameter \"channel\": GET /sse?channel=<pattern>[&channel=...]",
        ));
    }
    let resume = match last_event_id {
        Some(id) => event::parse_last_event_id(id, channels.len()).map_err(invalid)?,
        None => Vec::new(),
    };
    Ok(SseRequest {
        channels,
        from: from.unwrap_or_default(),
        resume,
    })
}

/// The `from` parameter: `latest`, `earliest`, `timestamp:<ms>`, `offsets:<p>=<o>,<p>=<o>` (the
/// next offset to read per partition), or the JSON forms of a `subscribe` frame's `from`.
pub fn parse_from(value: &str) -> Result<StartPosition, ProtocolError> {
    let value = value.trim();
    let bad = || {
        invalid(format!(
            "parameter \"from\" must be latest, earliest, timestamp:<ms>, offsets:<partition>=<offset>,... or a JSON start position; not {value:?}"
        ))
    };
    if value.starts_with(['{', '"']) {
        return super::json::decode_start_position(value)
            .map_err(|e| invalid(format!("parameter \"from\": {}", e.message)));
    }
    match value {
        "latest" => return Ok(StartPosition::Latest),
        "earliest" => return Ok(StartPosition::Earliest),
        _ => {}
    }
    if let Some(ms) = value.strip_prefix("timestamp:") {
        return ms
            .parse::<i64>()
            .ok()
            .filter(|t| *t >= 0)
            .map(StartPosition::Timestamp)
            .ok_or_else(bad);
    }
    if let Some(list) = value.strip_prefix("offsets:") {
        let mut offsets = Vec::new();
        for pair in list.split(',') {
            let (p, o) = pair.split_once('=').ok_or_else(bad)?;
            let p = p.trim().parse::<i32>().ok().filter(|p| *p >= 0);
            let o = o.trim().parse::<i64>().ok().filter(|o| *o >= 0);
            match (p, o) {
                (Some(p), Some(o)) if !offsets.iter().any(|(q, _)| *q == p) => offsets.push((p, o)),
                _ => return Err(bad()),
            }
        }
        offsets.sort_unstable();
        return Ok(StartPosition::Offsets(offsets));
    }
    Err(bad())
}

/// A subscribed stream, ready to be written.
pub struct SseStream {
    id: u64,
    outbox: Arc<Outbox>,
    subscriptions: Subscriptions,
    ids: EventIds,
    /// When the token expires (with the configured leeway).
    expiry: Option<Instant>,
}

/// Subscribes every channel of `request` for stream `id`, with the limits of a WebSocket
/// connection. On any refusal the subscriptions made so far are released and the error (with the
/// code that decides the HTTP status) is returned.
pub async fn open(
    request: SseRequest,
    id: u64,
    remote_address: SocketAddr,
    verified: Verified,
    cx: &SessionContext,
) -> Result<SseStream, ProtocolError> {
    let fail = |code, message: String| ProtocolError::new(None, code, message);
    let max = cx.config.max_subscriptions;
    if request.channels.len() > max {
        return Err(fail(
            "too_many_subscriptions",
            format!(
                "a stream may hold at most {max} subscriptions (server.max_subscriptions); it asks for {}",
                request.channels.len()
            ),
        ));
    }
    let starts: Vec<StartPosition> = (0..request.channels.len())
        .map(|index| {
            let mut resumed: Vec<(i32, i64)> = request
                .resume
                .iter()
                .filter(|r| r.channel == index)
                .map(|r| (r.partition, r.offset + 1))
                .collect();
            if resumed.is_empty() {
                request.from.clone()
            } else {
                resumed.sort_unstable();
                StartPosition::Offsets(resumed)
            }
        })
        .collect();
    let max_replays = cx.limits.max_replays_per_connection;
    let replays = starts
        .iter()
        .filter(|s| **s != StartPosition::Latest)
        .count();
    if max_replays != 0 && replays > max_replays {
        return Err(fail(
            "too_many_replays",
            format!(
                "a stream may hold at most {max_replays} replay subscriptions (limits.max_replays_per_connection); it asks for {replays}"
            ),
        ));
    }
    let limiter = RequestLimiter::new(&cx.limits, cx.config.max_message_size);
    let outbox = Arc::new(Outbox::new(cx.config.queue_capacity, cx.config.queue_bytes));
    let registration = cx.connections.register(NewConnection {
        id,
        remote_address,
        subject: verified.principal.subject.clone(),
        kind: ConnectionKind::Sse,
        outbox: outbox.clone(),
    });
    let mut subscriptions = Subscriptions::new(cx.hub.clone(), registration);
    for (channel, start) in request.channels.iter().zip(starts) {
        let result = async {
            limiter
                .check_subscribe()
                .map_err(|m| fail("rate_limited", m))?;
            let pattern = ChannelPattern::parse(channel)
                .map_err(|e| fail("invalid_channel", format!("{channel:?}: {e}")))?;
            if subscriptions.contains_key(channel) {
                return Err(fail(
                    "already_subscribed",
                    format!("channel {channel:?} is given twice"),
                ));
            }
            let member = Member::new(id, outbox.clone(), &SSE);
            cx.hub
                .subscribe(member, pattern, start, &verified.principal)
                .await
                .map_err(|e| fail(e.code, e.message))
        }
        .await;
        match result {
            Ok(handle) => {
                subscriptions.insert(channel.clone(), handle);
            }
            Err(e) => {
                subscriptions.release().await;
                return Err(e);
            }
        }
    }
    let expiry = verified
        .remaining(cx.auth.leeway())
        .map(|left| Instant::now() + left);
    Ok(SseStream {
        id,
        outbox,
        subscriptions,
        ids: EventIds::new(request.channels, &request.resume),
        expiry,
    })
}

/// The keepalive comment.
const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// Writes the stream into `body` until the client goes away, the token expires, the outbox
/// closes it (slow consumer) or the gateway shuts down; then releases its subscriptions. A client
/// that takes no data for `server.write_timeout` is cut off with `abort`, which drops its
/// connection (the HTTP server would otherwise wait on the stalled socket).
pub async fn run(
    mut stream: SseStream,
    body: mpsc::Sender<Bytes>,
    abort: CancellationToken,
    cx: SessionContext,
) {
    let outbox = stream.outbox.clone();
    let mut drained = Drained::default();
    let ping = cx.config.ping_interval;
    let mut keepalive = tokio::time::interval_at(Instant::now() + ping, ping);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far_future = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    let mut expiry = std::pin::pin!(sleep_until(stream.expiry.unwrap_or(far_future)));
    let mut draining = false;
    let mut drain = std::pin::pin!(sleep_until(far_future));
    let mut chunk: Vec<u8> = Vec::new();
    loop {
        let mut end: Option<&str> = None;
        let mut beat = false;
        tokio::select! {
            biased;
            _ = body.closed() => break,
            _ = cx.shutdown.cancelled(), if !draining => {
                let after = drain_delay(stream.id, cx.config.drain_window);
                outbox.push_control(SSE.status(&Status {
                    code: "shutting_down",
                    message: "the gateway is shutting down; the stream ends, reconnect (to another instance) after it".into(),
                    reconnect_after_ms: Some(u64::try_from(after.as_millis()).unwrap_or(u64::MAX)),
                    ..Status::default()
                }));
                draining = true;
                drain.as_mut().reset(Instant::now() + after);
            }
            _ = drain.as_mut(), if draining => end = Some("server shutting down"),
            _ = expiry.as_mut() => end = Some("token expired"),
            _ = outbox.ready() => {}
            _ = keepalive.tick() => beat = true,
            // Only a stream with messages held back by a route's `max_rate` has this timer.
            _ = drained.due() => {}
        }
        outbox.drain(&mut drained);
        let mut frames = drained.items.len() as u64;
        if beat {
            chunk.extend_from_slice(KEEPALIVE);
        }
        for status in drained.statuses() {
            chunk.extend_from_slice(SSE.status(&status).bytes());
            frames += 1;
        }
        for item in drained.items.drain(..) {
            match item {
                OutItem::Message(frame) => stream.ids.write_message(frame.bytes(), &mut chunk),
                OutItem::Control(frame) => chunk.extend_from_slice(frame.bytes()),
            }
        }
        let close = drained.close.take();
        let reason = close.as_ref().map(|c| c.reason.as_str()).or(end);
        if let Some(reason) = reason {
            // A comment: EventSource ignores it, people reading the stream see why it ended.
            chunk.extend_from_slice(format!(": stream closed: {reason}\n\n").as_bytes());
        }
        if !chunk.is_empty() {
            let bytes = Bytes::from(std::mem::take(&mut chunk));
            let len = bytes.len() as u64;
            match tokio::time::timeout(cx.config.write_timeout, body.send(bytes)).await {
                Ok(Ok(())) => {
                    let metrics = cx.hub.metrics();
                    metrics.frames_out.inc_by(frames);
                    metrics.bytes_out.inc_by(len);
                    if let Some(received) = drained.oldest.take() {
                        metrics
                            .delivery_latency
                            .observe(received.elapsed().as_secs_f64());
                    }
                }
                Ok(Err(_)) => break,
                Err(_) => {
                    abort.cancel();
                    cx.hub.metrics().write_timeouts.inc();
                    tracing::info!(id = stream.id, timeout = ?cx.config.write_timeout, "SSE client took no data within the write timeout; stream closed");
                    break;
                }
            }
        }
        if reason.is_some() {
            tracing::debug!(id = stream.id, reason, "SSE stream ended");
            break;
        }
    }
    stream.subscriptions.release().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        let r = parse_request(
            Some("channel=a%2F%2B&channel=b/%23&from=earliest&access_token=x"),
            None,
        )
        .unwrap();
        assert_eq!(r.channels, ["a/+", "b/#"]);
        assert_eq!(r.from, StartPosition::Earliest);
        assert!(r.resume.is_empty());
        let r = parse_request(Some("channel=a"), Some("0:4")).unwrap();
        assert_eq!(r.from, StartPosition::Latest);
        assert_eq!(r.resume.len(), 1);
        for (query, id) in [
            (None, None),
            (Some("from=earliest"), None),
            (Some("channel=a&from=yesterday"), None),
            (Some("channel=a&from=earliest&from=latest"), None),
            (Some("channel=a"), Some("1/0:4")),
        ] {
            let e = parse_request(query, id).unwrap_err();
            assert_eq!(e.code, "invalid_request", "{query:?} {id:?}: {e:?}");
        }
    }

    #[test]
    fn from_forms() {
        assert_eq!(parse_from("latest").unwrap(), StartPosition::Latest);
        assert_eq!(
            parse_from("timestamp:1700000000000").unwrap(),
            StartPosition::Timestamp(1_700_000_000_000)
        );
        assert_eq!(
            parse_from("offsets:2=7,0=5").unwrap(),
            StartPosition::Offsets(vec![(0, 5), (2, 7)])
        );
        assert_eq!(
            parse_from(r#"{"offsets":{"1":3}}"#).unwrap(),
            StartPosition::Offsets(vec![(1, 3)])
        );
        assert_eq!(
            parse_from(r#"{"timestamp":5}"#).unwrap(),
            StartPosition::Timestamp(5)
        );
        assert_eq!(
            parse_from(r#""earliest""#).unwrap(),
            StartPosition::Earliest
        );
        for bad in [
            "timestamp:-1",
            "timestamp:x",
            "offsets:",
            "offsets:1=2,1=3",
            "offsets:a=1",
            "{\"x\":1}",
            "soon",
        ] {
            assert!(parse_from(bad).is_err(), "{bad}");
        }
    }
}
