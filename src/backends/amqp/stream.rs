//! Stream routes: a RabbitMQ stream (an append-only log) read from a position.
//!
//! Every upstream on a stream route is a consumer of its own on the stream, on a channel of its
//! own, opened with `x-stream-offset` from the subscription's start. Reading a stream takes
//! nothing away from it, so each consumer reads the log independently: the core shares a live
//! (`latest`) upstream between its sockets as usual and gives each replay its own.
//!
//! Each delivery carries its offset in the `x-stream-offset` header, which becomes the message's
//! `position` (partition 0: a stream is one log). The [`StreamReader`] remembers the next offset
//! it wants. Messages below it are skipped (the broker starts reading at the beginning of the
//! chunk that holds the requested offset); a first delivery above it means the broker no longer
//! holds the messages in between, reported as a `gap` event; and after a lost connection the
//! consumer is opened again at it, so subscribers neither miss nor repeat messages.
//!
//! Deliveries whose routing key the upstream's filter does not match are skipped. Every delivery
//! is acknowledged once handled, which gives the broker credit for more. A replay's reader takes
//! a message only while its subscribers have room ([`MessageSink::has_room`]), so a client that
//! reads slowly slows its replay down, and at most `prefetch` messages wait unacknowledged.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::types::{AMQPValue, LongString};
use lapin::{Channel, Consumer};
use tokio_util::sync::CancellationToken;

use super::registry::topic_matches;
use super::{Shared, ack, describe, message};
use crate::backends::adapter::{
    BackendError, MessageSink, Position, StartPosition, Subscription, SubscriptionEvent,
    UpstreamId, contain,
};

/// A stream is one log: all its positions are in this partition.
pub const PARTITION: i32 = 0;

/// How long a paced reader waits before looking again whether its subscribers have room.
const PACE: Duration = Duration::from_millis(5);

/// One upstream subscription on a stream route, across the connections that serve it.
pub struct StreamReader {
    pub id: UpstreamId,
    /// The stream (queue) name.
    pub stream: String,
    /// Topic filter in AMQP syntax, matched against each delivery's routing key.
    filter: String,
    sink: Arc<dyn MessageSink>,
    start: StartPosition,
    /// A replay: takes messages only while its subscribers have room.
    paced: bool,
    progress: Mutex<Progress>,
    /// Cancelled when the upstream is unsubscribed.
    stopped: CancellationToken,
}

#[derive(Debug, Default)]
struct Progress {
    /// The next offset wanted; `None` until a message was read, unless the start named one.
    next: Option<i64>,
    /// The first delivery at or after `next` is still to come: one above it is a gap.
    check_gap: bool,
    /// Counts consumers opened; only the newest one delivers.
    generation: u64,
}

impl StreamReader {
    /// The reader for an upstream subscription on `stream`; refuses offsets of a partition a
    /// stream does not have.
    pub fn new(stream: &str, subscription: Subscription) -> Result<StreamReader, BackendError> {
        let next = match &subscription.start {
            StartPosition::Offsets(offsets) => match offsets.as_slice() {
                [(PARTITION, offset)] => Some((*offset).max(0)),
                _ => {
                    return Err(BackendError::Rejected {
                        code: "invalid_partition",
                        message: format!(
                            "stream {stream:?} is one log, partition {PARTITION}; \"from\" named {:?}",
                            offsets.iter().map(|(p, _)| *p).collect::<Vec<_>>()
                        ),
                    });
                }
            },
            _ => None,
        };
        Ok(StreamReader {
            id: subscription.id,
            stream: stream.to_owned(),
            filter: subscription.filter,
            sink: subscription.sink,
            paced: subscription.start != StartPosition::Latest,
            start: subscription.start,
            progress: Mutex::new(Progress {
                next,
                ..Progress::default()
            }),
            stopped: CancellationToken::new(),
        })
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a new consumer generation (older consumers stop delivering) and returns it with
    /// its `x-stream-offset` argument: the next offset wanted if one is known, else the start.
    pub fn reopen(&self) -> (u64, AMQPValue) {
        let mut progress = self.progress();
        progress.generation += 1;
        progress.check_gap = progress.next.is_some();
        let named = |spec: &str| AMQPValue::LongString(LongString::from(spec));
        let offset = match (progress.next, &self.start) {
            (Some(next), _) => AMQPValue::LongLongInt(next),
            (None, StartPosition::Latest) => named("next"),
            (None, StartPosition::Earliest | StartPosition::Offsets(_)) => named("first"),
            // Stream timestamps are in whole seconds: start at the second the instant is in.
            (None, StartPosition::Timestamp(ms)) => {
                AMQPValue::Timestamp(u64::try_from(ms.div_euclid(1000)).unwrap_or(0))
            }
        };
        (progress.generation, offset)
    }

    /// Whether the consumer of `generation` is the one that should be reading.
    pub fn is_current(&self, generation: u64) -> bool {
        !self.stopped.is_cancelled() && self.progress().generation == generation
    }

    /// The upstream was unsubscribed: its consumer stops at once, even while waiting for room.
    pub fn stop(&self) {
        self.stopped.cancel();
    }

    /// Hands a delivery to the sink if it is new and matches; `false` when `generation` is no
    /// longer the current consumer (nothing is delivered then).
    fn handle(&self, generation: u64, delivery: Delivery) -> bool {
        let offset = message::stream_offset(&delivery.properties);
        // Held while delivering, so that two consumers (one of a connection being replaced)
        // never deliver out of order.
        let mut progress = self.progress();
        if progress.generation != generation {
            return false;
        }
        let mut gap = None;
        if let Some(offset) = offset {
            if let Some(next) = progress.next {
                if offset < next {
                    return true;
                }
                if progress.check_gap && offset > next {
                    gap = Some(SubscriptionEvent::Gap {
                        partition: PARTITION,
                        requested: next,
                        available: offset,
                    });
                }
            }
            progress.check_gap = false;
            progress.next = Some(offset.saturating_add(1));
        }
        if let Some(gap) = gap {
            self.sink.event(gap);
        }
        let Delivery {
            routing_key,
            properties,
            data,
            ..
        } = delivery;
        if !topic_matches(&self.filter, routing_key.as_str()) {
            return true;
        }
        let mut message = message::to_broker_message(routing_key.as_str(), data, &properties);
        message
            .headers
            .retain(|(name, _)| name != message::STREAM_OFFSET);
        message.position = offset.map(|offset| Position {
            partition: PARTITION,
            offset,
        });
        self.sink.deliver(message);
        true
    }
}

impl Shared {
    /// Reads one consumer of `reader`'s stream until it ends; returns why.
    pub(super) async fn read_stream(
        &self,
        reader: &StreamReader,
        generation: u64,
        channel: &Channel,
        mut consumer: Consumer,
    ) -> String {
        // As for queues: acks go out in runs, at most half the prefetch outstanding.
        let batch = (usize::from(self.config.prefetch) / 2).max(1);
        let mut unacked: Option<u64> = None;
        let mut pending = 0;
        let stopped = "unsubscribed".to_owned();
        loop {
            let next = match consumer.next().now_or_never() {
                Some(next) => next,
                None => {
                    if let Some(tag) = unacked.take() {
                        pending = 0;
                        if let Err(e) = ack(channel, tag).await {
                            return describe(&e);
                        }
                    }
                    tokio::select! {
                        _ = reader.stopped.cancelled() => return stopped,
                        next = consumer.next() => next,
                    }
                }
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => return describe(&e),
                None => {
                    if let Some(tag) = unacked.take() {
                        let _ = ack(channel, tag).await;
                    }
                    return "the consumer was cancelled".into();
                }
            };
            if reader.paced && !reader.sink.has_room() {
                // What was handed over is acknowledged; what the broker sends meanwhile waits
                // in the prefetch window.
                if let Some(tag) = unacked.take() {
                    pending = 0;
                    if let Err(e) = ack(channel, tag).await {
                        return describe(&e);
                    }
                }
                while !reader.sink.has_room() {
                    if !channel.status().connected() {
                        return "the channel was closed".into();
                    }
                    tokio::select! {
                        _ = reader.stopped.cancelled() => return stopped,
                        _ = tokio::time::sleep(PACE) => {}
                    }
                }
            }
            let tag = delivery.delivery_tag;
            let routing_key = delivery.routing_key.clone();
            match contain::call(|| reader.handle(generation, delivery)) {
                Ok(true) => {}
                Ok(false) => return "a newer consumer took over".into(),
                Err(panic) => {
                    // Acknowledged like a delivered message: the reader has moved past it.
                    self.panics.inc();
                    tracing::error!(backend = %self.name, stream = %reader.stream, routing_key = %routing_key, %panic, "panic while dispatching a stream message; it was skipped");
                }
            }
            unacked = Some(tag);
            pending += 1;
            if pending >= batch {
                pending = 0;
                unacked = None;
                if let Err(e) = ack(channel, tag).await {
                    return describe(&e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::adapter::BrokerMessage;
    use lapin::BasicProperties;
    use lapin::types::{FieldTable, ShortString};

    #[derive(Default)]
    struct Collect {
        messages: Mutex<Vec<BrokerMessage>>,
        events: Mutex<Vec<SubscriptionEvent>>,
    }
    impl MessageSink for Collect {
        fn deliver(&self, message: BrokerMessage) {
            self.messages.lock().unwrap().push(message);
        }
        fn event(&self, event: SubscriptionEvent) {
            self.events.lock().unwrap().push(event);
        }
    }

    fn reader(start: StartPosition, filter: &str) -> (StreamReader, Arc<Collect>) {
        let sink = Arc::new(Collect::default());
        let subscription = Subscription {
            id: 1,
            route: 0,
            filter: filter.into(),
            key: None,
            start,
            sink: sink.clone(),
        };
        (StreamReader::new("log", subscription).unwrap(), sink)
    }

    fn delivery(offset: i64, routing_key: &str) -> Delivery {
        let mut headers = FieldTable::default();
        headers.insert(
            message::STREAM_OFFSET.into(),
            AMQPValue::LongLongInt(offset),
        );
        headers.insert("trace".into(), AMQPValue::LongString("t".into()));
        let mut delivery = Delivery::mock(
            1,
            ShortString::from("x"),
            ShortString::from(routing_key),
            false,
            offset.to_string().into_bytes(),
        );
        delivery.properties = BasicProperties::default().with_headers(headers);
        delivery
    }

    fn offsets(sink: &Collect) -> Vec<i64> {
        let messages = sink.messages.lock().unwrap();
        messages
            .iter()
            .map(|m| m.position.expect("a position").offset)
            .collect()
    }

    #[test]
    fn the_start_becomes_the_offset_argument() {
        let named = |s: &str| AMQPValue::LongString(s.into());
        assert_eq!(
            reader(StartPosition::Latest, "#").0.reopen().1,
            named("next")
        );
        assert_eq!(
            reader(StartPosition::Earliest, "#").0.reopen().1,
            named("first")
        );
        assert_eq!(
            reader(StartPosition::Timestamp(1_700_000_000_999), "#")
                .0
                .reopen()
                .1,
            AMQPValue::Timestamp(1_700_000_000)
        );
        let (r, _) = reader(StartPosition::Offsets(vec![(0, 7)]), "#");
        assert_eq!(r.reopen(), (1, AMQPValue::LongLongInt(7)));
        let sink: Arc<dyn MessageSink> = Arc::new(Collect::default());
        let other = Subscription {
            id: 2,
            route: 0,
            filter: "#".into(),
            key: None,
            start: StartPosition::Offsets(vec![(1, 7)]),
            sink,
        };
        let error = StreamReader::new("log", other).err().unwrap();
        assert_eq!(error.code(), "invalid_partition");
    }

    #[test]
    fn messages_carry_their_offset_and_skip_what_was_not_asked_for() {
        let (r, sink) = reader(StartPosition::Offsets(vec![(0, 5)]), "a.*");
        let (generation, _) = r.reopen();
        for (offset, key) in [(4, "a.b"), (5, "a.b"), (6, "z.b"), (7, "a.c")] {
            assert!(r.handle(generation, delivery(offset, key)));
        }
        assert_eq!(offsets(&sink), vec![5, 7]);
        let headers = sink.messages.lock().unwrap()[0].headers.clone();
        assert_eq!(headers, vec![("trace".to_owned(), "t".to_owned())]);
        assert!(sink.events.lock().unwrap().is_empty());

        // A new consumer resumes after the last offset read; the old one delivers nothing more.
        let (newer, offset) = r.reopen();
        assert_eq!(offset, AMQPValue::LongLongInt(8));
        assert!(!r.handle(generation, delivery(8, "a.b")));
        assert!(r.handle(newer, delivery(8, "a.b")));
        assert_eq!(offsets(&sink), vec![5, 7, 8]);
    }

    #[test]
    fn a_first_delivery_past_the_requested_offset_is_a_gap() {
        let (r, sink) = reader(StartPosition::Offsets(vec![(0, 3)]), "#");
        let (generation, _) = r.reopen();
        assert!(r.handle(generation, delivery(10, "a")));
        assert!(r.handle(generation, delivery(12, "a")));
        assert_eq!(
            *sink.events.lock().unwrap(),
            vec![SubscriptionEvent::Gap {
                partition: 0,
                requested: 3,
                available: 10
            }]
        );
        assert_eq!(offsets(&sink), vec![10, 12]);

        let (r, sink) = reader(StartPosition::Earliest, "#");
        let (generation, _) = r.reopen();
        assert!(r.handle(generation, delivery(10, "a")));
        assert!(sink.events.lock().unwrap().is_empty());
    }
}
