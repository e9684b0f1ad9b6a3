//! `type = "kafka"`: Kafka topics through librdkafka (rdkafka).
//!
//! A route's topic template renders one Kafka topic name (no wildcards: a client pattern that
//! would span topics is refused by the core with `unsupported_pattern`); a `key` template makes
//! publishes set that key and subscriptions deliver only that key.
//!
//! - **Live subscriptions** (`"from": "latest"`) of every socket share one consumer per gateway
//!   instance: the first upstream on a topic assigns all its partitions at their current end
//!   offsets, later ones (another key of a key-routed topic, another route) join the assigned
//!   topic, and the last one to leave unassigns it. See [`reader`].
//! - **Replays** (`earliest`, a timestamp, or offsets to resume from) get a consumer of their
//!   own for their whole life, positioned where they asked; a requested offset below the log
//!   start is reported as a gap before the first message.
//! - **Publishes** go through one idempotent producer; the client's `ok` carries the partition
//!   and offset from the delivery report.
//! - **Health** is Up while the broker answers metadata requests (probed every few seconds, and
//!   at once Down when librdkafka reports every broker down). librdkafka reconnects by itself
//!   and keeps every assignment, so subscriptions resume where they were.
//!
//! No consumer group is joined and no offset is committed: every gateway instance reads every
//! message of the topics its clients watch, and resuming is the client's business (it sends
//! back the offsets it saw). docs/backends/kafka.md is the user-facing description.

mod config;
mod context;
mod producer;
mod reader;

pub use config::{Acks, KAFKA_TOPIC, KafkaConfig};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::adapter::{
    Backend, BackendError, BackendSettings, BuildContext, Capabilities, Health, Kind, Position,
    Publish, PublishReceipt, StartPosition, Subscription, SubscriptionEvent, UpstreamId,
};
use crate::config::{ConfigProblem, RouteConfig, deserialize_section};
use crate::routing::TopicSyntax;
use context::{KafkaContext, set_health};
use producer::ProducerSlot;
use reader::{AddError, LOOKUP_TIMEOUT, Reader, Sub};

/// `type = "kafka"`.
pub const KIND: Kind = Kind {
    name: "kafka",
    parse: |table, path, problems| {
        deserialize_section::<KafkaConfig>(table, path, problems)
            .inspect(|c| c.validate(path, problems))
            .map(|c| Box::new(c) as Box<dyn BackendSettings>)
    },
};

impl BackendSettings for KafkaConfig {
    fn topic_syntax(&self) -> TopicSyntax {
        KAFKA_TOPIC
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            keys: true,
            replay: true,
            partitions: true,
            retained: false,
        }
    }

    fn check_route(&self, route: &RouteConfig, path: &str, problems: &mut Vec<ConfigProblem>) {
        config::check_route(route, path, problems);
    }

    fn build(&self, cx: BuildContext<'_>) -> Result<Arc<dyn Backend>, BackendError> {
        Ok(Arc::new(KafkaBackend::new(self, cx)?))
    }
}

/// How often the broker is probed while it answers, and while it does not.
const PROBE_UP: Duration = Duration::from_secs(2);
const PROBE_DOWN: Duration = Duration::from_millis(500);
/// How long a topic's partition count is trusted before it is looked up again.
const TOPIC_CACHE_TTL: Duration = Duration::from_secs(30);

/// Which consumer serves an upstream subscription.
enum Owner {
    /// The shared live consumer, on this topic.
    Live(String),
    Replay(Reader),
}

/// The Kafka adapter.
pub struct KafkaBackend {
    name: String,
    config: KafkaConfig,
    group_id: String,
    context: KafkaContext,
    producer: Arc<ProducerSlot>,
    /// The consumer shared by every live subscription.
    live: Reader,
    /// Topics the live consumer has assigned, as far as this side knows.
    live_topics: Mutex<HashSet<String>>,
    owners: Mutex<HashMap<UpstreamId, Owner>>,
    /// Partition counts of topics published to recently.
    topic_cache: Mutex<HashMap<String, (usize, Instant)>>,
    health: Arc<watch::Sender<Health>>,
    shutdown: CancellationToken,
    /// Panics caught on the consumer threads.
    panics: prometheus::IntCounter,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A consumer group id no other gateway instance uses.
fn instance_group_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("wsbridge-{}-{:x}", std::process::id(), nanos)
}

impl KafkaBackend {
    /// Creates the clients and starts the live consumer and the health probe. Connecting happens
    /// in the background; the backend reports Down until the broker answers.
    pub fn new(config: &KafkaConfig, cx: BuildContext<'_>) -> Result<Self, BackendError> {
        let group_id = config.group_id.clone().unwrap_or_else(instance_group_id);
        let health = Arc::new(watch::Sender::new(Health::Down {
            reason: format!("connecting to {}", config.brokers),
        }));
        let context = KafkaContext::new(cx.name);
        let fatal = Arc::new(AtomicBool::new(false));
        let producer = ProducerSlot::new(
            config.producer(),
            context.for_producer(health.clone(), fatal.clone()),
            fatal,
            config.delivery_timeout,
        )
        .map(Arc::new)
        .map_err(BackendError::Failed)?;
        let live = Reader::start(
            &config.consumer(&group_id),
            context.clone(),
            format!("{}-live", cx.name),
            false,
            cx.panics.clone(),
        )
        .map_err(BackendError::Failed)?;
        let shutdown = CancellationToken::new();
        tokio::spawn(probe_health(
            producer.clone(),
            health.clone(),
            shutdown.clone(),
        ));
        Ok(KafkaBackend {
            name: cx.name.to_owned(),
            config: config.clone(),
            group_id,
            context,
            producer,
            live,
            live_topics: Mutex::new(HashSet::new()),
            owners: Mutex::new(HashMap::new()),
            topic_cache: Mutex::new(HashMap::new()),
            health,
            shutdown,
            panics: cx.panics,
        })
    }

    /// The partitions of a topic, from the broker.
    async fn partitions(&self, topic: &str) -> Result<Vec<i32>, BackendError> {
        self.partitions_within(topic, LOOKUP_TIMEOUT).await
    }

    async fn partitions_within(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Vec<i32>, BackendError> {
        let producer = self.producer.get();
        let name = topic.to_owned();
        let metadata = blocking(move || producer.client().fetch_metadata(Some(&name), timeout))
            .await?
            .map_err(lookup_error)?;
        let unknown = || BackendError::Rejected {
            code: "unknown_topic",
            message: format!("Kafka topic {topic:?} does not exist"),
        };
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(unknown)?;
        match found.error() {
            None => {}
            Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => {
                return Err(unknown());
            }
            Some(e) => {
                return Err(BackendError::Rejected {
                    code: "backend_rejected",
                    message: format!(
                        "Kafka refused metadata for topic {topic:?}: {}",
                        RDKafkaErrorCode::from(e)
                    ),
                });
            }
        }
        let mut partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
        if partitions.is_empty() {
            return Err(unknown());
        }
        partitions.sort_unstable();
        lock(&self.topic_cache).insert(topic.to_owned(), (partitions.len(), Instant::now()));
        Ok(partitions)
    }

    /// A topic's partition count, cached for publishes; a lookup stays within the delivery
    /// timeout so a publish is answered within it.
    async fn partition_count(&self, topic: &str) -> Result<usize, BackendError> {
        if let Some((count, at)) = lock(&self.topic_cache).get(topic)
            && at.elapsed() < TOPIC_CACHE_TTL
        {
            return Ok(*count);
        }
        let timeout = self.config.delivery_timeout.min(LOOKUP_TIMEOUT);
        Ok(self.partitions_within(topic, timeout).await?.len())
    }

    /// Publishes one record; [`Backend::publish`] bounds it by the delivery timeout.
    async fn publish_now(&self, publish: Publish) -> Result<PublishReceipt, BackendError> {
        let partitions = self.partition_count(&publish.topic).await?;
        if let Some(p) = publish.partition
            && p as usize >= partitions
        {
            return Err(BackendError::Rejected {
                code: "invalid_partition",
                message: format!(
                    "Kafka topic {:?} has no partition {p} (it has {partitions})",
                    publish.topic
                ),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&publish.topic).payload(&publish.payload);
        if let Some(key) = &publish.key {
            record = record.key(key.as_bytes());
        }
        if let Some(partition) = publish.partition {
            record = record.partition(partition);
        }
        if !publish.headers.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(publish.headers.len());
            for (key, value) in &publish.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            record = record.headers(headers);
        }
        let timeout = self.config.delivery_timeout;
        let delivery = self
            .producer
            .get()
            .send_result(record)
            .map_err(|(e, _)| publish_error(&e, timeout))?;
        match delivery.await {
            Ok(Ok(delivery)) => Ok(PublishReceipt {
                position: (delivery.offset >= 0).then_some(Position {
                    partition: delivery.partition,
                    offset: delivery.offset,
                }),
            }),
            Ok(Err((e, _))) => {
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition) {
                    lock(&self.topic_cache).remove(&publish.topic);
                }
                Err(publish_error(&e, timeout))
            }
            Err(_) => Err(BackendError::Unavailable(
                "the Kafka producer has shut down".into(),
            )),
        }
    }

    async fn subscribe_live(&self, topic: String, sub: Sub) -> Result<(), BackendError> {
        let known = lock(&self.live_topics).contains(&topic);
        let start = if known {
            None
        } else {
            Some(self.end_offsets(&topic).await?)
        };
        let result = match self.live.add(&topic, sub.clone(), start).await {
            Err(AddError::NeedStart) => {
                let start = self.end_offsets(&topic).await?;
                self.live.add(&topic, sub.clone(), Some(start)).await
            }
            other => other,
        };
        match result {
            Ok(()) => {
                lock(&self.live_topics).insert(topic.clone());
                lock(&self.owners).insert(sub.id, Owner::Live(topic));
                Ok(())
            }
            Err(AddError::NeedStart) => Err(BackendError::Failed(
                "the live consumer did not take the topic's start offsets".into(),
            )),
            Err(AddError::Failed(message)) => Err(BackendError::Failed(message)),
        }
    }

    /// The current end offset of every partition: where a live subscription starts.
    async fn end_offsets(&self, topic: &str) -> Result<Vec<(i32, i64)>, BackendError> {
        let partitions = self.partitions(topic).await?;
        let consumer = self.live.consumer().clone();
        let topic = topic.to_owned();
        blocking(move || list_offsets(&consumer, &topic, &partitions, Offset::End)).await?
    }

    async fn subscribe_replay(
        &self,
        topic: String,
        sub: Sub,
        start: StartPosition,
    ) -> Result<(), BackendError> {
        let partitions = self.partitions(&topic).await?;
        if let StartPosition::Offsets(offsets) = &start
            && let Some((p, _)) = offsets.iter().find(|(p, _)| !partitions.contains(p))
        {
            return Err(BackendError::Rejected {
                code: "invalid_partition",
                message: format!(
                    "Kafka topic {topic:?} has no partition {p} (it has {})",
                    partitions.len()
                ),
            });
        }
        let reader = Reader::start(
            &self.config.replay_consumer(&self.group_id),
            self.context.clone(),
            format!("{}-replay-{}", self.name, sub.id),
            true,
            self.panics.clone(),
        )
        .map_err(BackendError::Failed)?;
        let consumer = reader.consumer().clone();
        let (starts, gaps) = {
            let topic = topic.clone();
            blocking(move || replay_offsets(&consumer, &topic, &partitions, &start)).await??
        };
        // The gap is reported before any message of the subscription can be delivered.
        for gap in gaps {
            sub.sink.event(gap);
        }
        let id = sub.id;
        match reader.add(&topic, sub, Some(starts)).await {
            Ok(()) => {
                lock(&self.owners).insert(id, Owner::Replay(reader));
                Ok(())
            }
            Err(e) => {
                reader.stop().await;
                Err(BackendError::Failed(match e {
                    AddError::Failed(message) => message,
                    AddError::NeedStart => "the replay consumer did not start".into(),
                }))
            }
        }
    }
}

impl Drop for KafkaBackend {
    fn drop(&mut self) {
        // Without `close` (e.g. the gateway failed to start), the probe must still end.
        self.shutdown.cancel();
    }
}

/// Runs a blocking librdkafka call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Failed(format!("Kafka lookup failed: {e}")))
}

/// Asks the broker for one offset per partition: `End`, `Beginning` or a timestamp.
fn list_offsets(
    consumer: &BaseConsumer<KafkaContext>,
    topic: &str,
    partitions: &[i32],
    at: Offset,
) -> Result<Vec<(i32, i64)>, BackendError> {
    let mut query = TopicPartitionList::new();
    for p in partitions {
        query
            .add_partition_offset(topic, *p, at)
            .map_err(|e| BackendError::Failed(e.to_string()))?;
    }
    let answer = consumer
        .offsets_for_times(query, LOOKUP_TIMEOUT)
        .map_err(lookup_error)?;
    let mut offsets = Vec::with_capacity(partitions.len());
    for element in answer.elements_for_topic(topic) {
        element.error().map_err(lookup_error)?;
        offsets.push((element.partition(), element.offset()));
    }
    let mut resolved = Vec::with_capacity(offsets.len());
    for (partition, offset) in offsets {
        let offset = match offset {
            Offset::Offset(o) => o,
            // No message at or after the timestamp: start at the end.
            Offset::End => {
                consumer
                    .fetch_watermarks(topic, partition, LOOKUP_TIMEOUT)
                    .map_err(lookup_error)?
                    .1
            }
            other => {
                return Err(BackendError::Failed(format!(
                    "Kafka answered {other:?} for partition {partition} of {topic:?}"
                )));
            }
        };
        resolved.push((partition, offset));
    }
    Ok(resolved)
}

/// An offset per partition.
type Offsets = Vec<(i32, i64)>;

/// Where a replay starts on each partition, and the gaps between what the client asked for
/// and what the log still holds.
fn replay_offsets(
    consumer: &BaseConsumer<KafkaContext>,
    topic: &str,
    partitions: &[i32],
    start: &StartPosition,
) -> Result<(Offsets, Vec<SubscriptionEvent>), BackendError> {
    match start {
        StartPosition::Latest => Ok((
            list_offsets(consumer, topic, partitions, Offset::End)?,
            vec![],
        )),
        StartPosition::Earliest => Ok((
            list_offsets(consumer, topic, partitions, Offset::Beginning)?,
            vec![],
        )),
        StartPosition::Timestamp(ms) => Ok((
            list_offsets(consumer, topic, partitions, Offset::Offset(*ms))?,
            vec![],
        )),
        StartPosition::Offsets(requested) => {
            // Partitions the client names resume where it says; the others are read from the
            // start, since the client has seen nothing of them.
            let log_start = list_offsets(consumer, topic, partitions, Offset::Beginning)?;
            let mut gaps = Vec::new();
            let starts = log_start
                .into_iter()
                .map(
                    |(partition, low)| match requested.iter().find(|(p, _)| *p == partition) {
                        Some(&(_, wanted)) if wanted < low => {
                            gaps.push(SubscriptionEvent::Gap {
                                partition,
                                requested: wanted,
                                available: low,
                            });
                            (partition, low)
                        }
                        Some(&(_, wanted)) => (partition, wanted),
                        None => (partition, low),
                    },
                )
                .collect();
            Ok((starts, gaps))
        }
    }
}

/// A failed metadata or offset lookup.
fn lookup_error(e: KafkaError) -> BackendError {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::RequestTimedOut,
        ) => BackendError::Unavailable(format!("Kafka did not answer: {e}")),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            BackendError::Rejected {
                code: "unknown_topic",
                message: format!("Kafka: {e}"),
            }
        }
        _ => BackendError::Failed(format!("Kafka lookup failed: {e}")),
    }
}

/// A failed publish, by what the client can do about it.
fn publish_error(e: &KafkaError, delivery_timeout: Duration) -> BackendError {
    let rejected = |code, message: String| BackendError::Rejected { code, message };
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => BackendError::Timeout(delivery_timeout),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            rejected("unknown_topic", format!("Kafka: {e}"))
        }
        Some(RDKafkaErrorCode::UnknownPartition) => {
            rejected("invalid_partition", format!("Kafka: {e}"))
        }
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
            rejected("message_too_large", format!("Kafka: {e}"))
        }
        Some(RDKafkaErrorCode::QueueFull) => {
            BackendError::Unavailable("the Kafka producer's queue is full; retry later".into())
        }
        Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure) => {
            BackendError::Unavailable(format!("Kafka: {e}"))
        }
        // Positive codes are the broker's own refusals; negative ones are local to librdkafka.
        Some(code) if (code as i32) > 0 => rejected(
            "backend_rejected",
            format!("Kafka refused the message: {e}"),
        ),
        _ => BackendError::Failed(format!("Kafka: {e}")),
    }
}

/// Keeps `health` Up exactly while the broker answers metadata requests, and replaces the
/// producer when the broker comes back after an outage or librdkafka declares it broken.
async fn probe_health(
    producer: Arc<ProducerSlot>,
    health: Arc<watch::Sender<Health>>,
    shutdown: CancellationToken,
) {
    let mut has_been_up = false;
    loop {
        let client = producer.get();
        let answer =
            tokio::task::spawn_blocking(move || client.client().fetch_metadata(None, PROBE_UP))
                .await;
        // Down may also have been set by librdkafka's error callback between two probes.
        let was_up = health.borrow().is_up();
        let up = match answer {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                set_health(
                    &health,
                    Health::Down {
                        reason: format!("Kafka does not answer: {e}"),
                    },
                );
                false
            }
            Err(_) => return,
        };
        if producer.is_broken() {
            producer.replace("librdkafka reported a fatal producer error");
        } else if up && !was_up && has_been_up {
            // The broker may have lost the producer's idempotence state while it was away.
            producer.replace("the broker is reachable again");
        }
        if up {
            set_health(&health, Health::Up);
            has_been_up = true;
        }
        let wait = if up { PROBE_UP } else { PROBE_DOWN };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[async_trait]
impl Backend for KafkaBackend {
    async fn subscribe(&self, subscription: Subscription) -> Result<(), BackendError> {
        let sub = Sub {
            id: subscription.id,
            key: subscription.key,
            sink: subscription.sink,
        };
        match subscription.start {
            StartPosition::Latest => self.subscribe_live(subscription.filter, sub).await,
            start => self.subscribe_replay(subscription.filter, sub, start).await,
        }
    }

    async fn unsubscribe(&self, id: UpstreamId) -> Result<(), BackendError> {
        let owner = lock(&self.owners).remove(&id);
        match owner {
            // When the consumer releases the topic, the next subscriber pins fresh offsets.
            Some(Owner::Live(topic)) if self.live.remove(id).await => {
                lock(&self.live_topics).remove(&topic);
            }
            Some(Owner::Live(_)) => {}
            Some(Owner::Replay(reader)) => {
                reader.remove(id).await;
                reader.stop().await;
            }
            None => {}
        }
        Ok(())
    }

    async fn publish(&self, publish: Publish) -> Result<PublishReceipt, BackendError> {
        // The whole publish, lookups included, is answered within the delivery timeout:
        // librdkafka reports expired messages late while the broker is unreachable.
        let timeout = self.config.delivery_timeout;
        tokio::time::timeout(timeout, self.publish_now(publish))
            .await
            .unwrap_or(Err(BackendError::Timeout(timeout)))
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    fn upstream_count(&self) -> usize {
        let replays = lock(&self.owners)
            .values()
            .filter(|o| matches!(o, Owner::Replay(_)))
            .count();
        self.live.topic_count() + replays
    }

    async fn close(&self) {
        self.shutdown.cancel();
        let owners: Vec<Owner> = lock(&self.owners).drain().map(|(_, o)| o).collect();
        for owner in owners {
            if let Owner::Replay(reader) = owner {
                reader.stop().await;
            }
        }
        self.live.stop().await;
        self.producer.flush().await;
    }
}

/// Fast checks against librdkafka's in-process mock cluster, for what the test broker cannot
/// show (Tansu never truncates a log) or shows only slowly. tests/kafka.rs covers the rest
/// against a real broker.
#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use rdkafka::mocking::MockCluster;

    use super::*;
    use crate::backends::{BrokerMessage, MessageSink};

    #[derive(Debug, PartialEq)]
    enum Seen {
        Message(i64),
        Gap(SubscriptionEvent),
    }

    /// Records what it is given; while `hold` is set, `deliver` waits (a stalled reader).
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Seen>>, Mutex<bool>, std::sync::Condvar);

    impl Recorder {
        fn hold(&self, on: bool) {
            *self.1.lock().unwrap() = on;
            self.2.notify_all();
        }
    }

    impl MessageSink for Recorder {
        fn deliver(&self, message: BrokerMessage) {
            let offset = message.position.map_or(-1, |p| p.offset);
            self.0.lock().unwrap().push(Seen::Message(offset));
            let mut held = self.1.lock().unwrap();
            while *held {
                held = self.2.wait(held).unwrap();
            }
        }
        fn event(&self, event: SubscriptionEvent) {
            self.0.lock().unwrap().push(Seen::Gap(event));
        }
    }

    fn backend(brokers: &str) -> KafkaBackend {
        backend_with(brokers, "")
    }

    fn backend_with(brokers: &str, extra: &str) -> KafkaBackend {
        let text = format!(
            "[backends.mock]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\n{extra}\n[[routes]]\nchannel = \"t/{{n}}\"\nbackend = \"mock\"\ntopic = \"{{n}}\"\nallow = [\"subscribe\"]\n"
        );
        let config =
            crate::gateway::Config::from_toml_with_env(&text, &|_| None).expect("valid config");
        let kafka = config.backends()["mock"]
            .settings::<KafkaConfig>()
            .expect("a kafka backend");
        KafkaBackend::new(
            kafka,
            BuildContext {
                name: "mock",
                routes: vec![],
                panics: prometheus::IntCounter::new("panics", "test").expect("valid"),
            },
        )
        .expect("backend builds")
    }

    async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn resuming_below_the_log_start_reports_the_gap_before_the_messages() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("retained", 1, 1).expect("topic");
        let backend = backend(&mock.bootstrap_servers());
        // The mock broker keeps at most 5 MB per partition: older batches are deleted.
        for _ in 0..12 {
            backend.publish(big("retained")).await.expect("publish");
        }
        let recorder = Arc::new(Recorder::default());
        backend
            .subscribe(Subscription {
                id: 1,
                route: 0,
                filter: "retained".into(),
                key: None,
                start: StartPosition::Offsets(vec![(0, 1)]),
                sink: recorder.clone(),
            })
            .await
            .expect("subscribe");
        wait_for("the last message", || {
            recorder.0.lock().unwrap().last() == Some(&Seen::Message(11))
        })
        .await;
        let seen = std::mem::take(&mut *recorder.0.lock().unwrap());
        let Seen::Gap(SubscriptionEvent::Gap {
            partition: 0,
            requested: 1,
            available,
        }) = seen[0]
        else {
            panic!("the gap comes first: {seen:?}")
        };
        assert!(available > 1, "{seen:?}");
        let offsets: Vec<&Seen> = seen[1..].iter().collect();
        let expected: Vec<Seen> = (available..12).map(Seen::Message).collect();
        assert_eq!(offsets, expected.iter().collect::<Vec<_>>());
        backend.unsubscribe(1).await.unwrap();
        assert_eq!(backend.upstream_count(), 0);
        backend.close().await;
    }

    fn big(topic: &str) -> Publish {
        Publish {
            route: 0,
            topic: topic.into(),
            key: None,
            payload: Bytes::from(vec![b'x'; 600_000]),
            headers: vec![],
            partition: Some(0),
        }
    }

    #[tokio::test]
    async fn a_reader_overtaken_by_retention_reports_the_gap_and_skips_nothing_else() {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic("overtaken", 1, 1).expect("topic");
        // Small fetches and a small local queue, so the stalled reader holds little.
        let backend = backend_with(
            &mock.bootstrap_servers(),
            "[backends.mock.properties]\n\"queued.max.messages.kbytes\" = 1000\n\"fetch.max.bytes\" = 1000000\n\"max.partition.fetch.bytes\" = 600000",
        );
        let recorder = Arc::new(Recorder::default());
        backend
            .subscribe(Subscription {
                id: 1,
                route: 0,
                filter: "overtaken".into(),
                key: None,
                start: StartPosition::Latest,
                sink: recorder.clone(),
            })
            .await
            .expect("subscribe");
        recorder.hold(true);
        backend.publish(big("overtaken")).await.expect("publish");
        wait_for("the reader stalls on the first message", || {
            !recorder.0.lock().unwrap().is_empty()
        })
        .await;
        for _ in 1..20 {
            backend.publish(big("overtaken")).await.expect("publish");
        }
        recorder.hold(false);
        wait_for("the last message", || {
            recorder.0.lock().unwrap().last() == Some(&Seen::Message(19))
        })
        .await;
        let seen = std::mem::take(&mut *recorder.0.lock().unwrap());
        let gap = seen
            .iter()
            .position(|s| matches!(s, Seen::Gap(_)))
            .unwrap_or_else(|| panic!("a gap is reported: {seen:?}"));
        let Seen::Gap(SubscriptionEvent::Gap {
            partition: 0,
            requested,
            available,
        }) = seen[gap]
        else {
            panic!("{seen:?}")
        };
        // The gap is looked up beside the delivery loop, so it may follow the first messages
        // past it; the messages themselves are exactly those before and those still held.
        assert!(gap > 0, "the gap follows the message before it: {seen:?}");
        let messages: Vec<&Seen> = seen.iter().filter(|s| matches!(s, Seen::Message(_))).collect();
        let expected: Vec<Seen> = (0..requested)
            .chain(available..20)
            .map(Seen::Message)
            .collect();
        assert_eq!(messages, expected.iter().collect::<Vec<_>>(), "{seen:?}");
        let gaps = seen.iter().filter(|s| matches!(s, Seen::Gap(_))).count();
        assert_eq!(gaps, 1, "{seen:?}");
        assert!(available > requested, "{seen:?}");
        backend.close().await;
    }

    #[tokio::test]
    async fn health_follows_the_broker() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let backend = backend(&mock.bootstrap_servers());
        let mut health = backend.health();
        let mut wait = async |up: bool| {
            tokio::time::timeout(
                Duration::from_secs(20),
                health.wait_for(|h| h.is_up() == up),
            )
            .await
            .expect("health changes in time")
            .expect("backend alive");
        };
        wait(true).await;
        mock.broker_down(1).expect("broker down");
        wait(false).await;
        mock.broker_up(1).expect("broker up");
        wait(true).await;
        backend.close().await;
    }
}
