//! A Kafka consumer on its own thread and the upstream subscriptions it serves.
//!
//! A [`Reader`] owns one librdkafka consumer. Partitions are assigned explicitly (no group
//! membership, no commits) at offsets the caller chose, so no message published after a
//! subscription was acknowledged can be missed. The thread polls in batches and hands each
//! message to every subscription on its topic whose key matches; `MessageSink::deliver` never
//! blocks, so a slow client never holds up the consumer. Subscribe and unsubscribe are commands
//! the thread applies between batches: the dispatch table is the thread's own, without locks,
//! and once an unsubscribe is acknowledged nothing more reaches that sink.
//!
//! The thread tracks the next expected offset of every partition. When a message arrives past
//! it (the position fell out of the log and librdkafka reset it to the earliest offset, or the
//! log has transaction markers or compacted records), a second thread asks the broker for the
//! log start, so the delivery loop never waits on a network round trip; if the expected offset
//! is below it, the messages in between were deleted and every subscription on the topic gets
//! a gap event (shortly after the first message past the gap).
//!
//! A paced reader (a replay's) takes a message only while its subscribers have room
//! ([`MessageSink::has_room`]): a client that reads slowly slows its replay down instead of
//! losing messages to its slow-consumer policy.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::oneshot;

use super::context::KafkaContext;
use crate::backends::adapter::{
    BrokerMessage, MessageSink, Position, SubscriptionEvent, UpstreamId, contain,
};

/// How long one poll waits for a message; also the longest a command waits to be applied.
const POLL: Duration = Duration::from_millis(50);
/// Most messages handled between two looks at the command queue.
const BATCH: usize = 1024;
/// How long a paced reader waits before looking again whether its subscribers have room.
const PACE: Duration = Duration::from_millis(5);
/// Longest wait for the broker in a lookup (offsets, metadata).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// One upstream subscription served by a reader.
#[derive(Clone)]
pub struct Sub {
    pub id: UpstreamId,
    /// Deliver only messages with this key.
    pub key: Option<String>,
    pub sink: Arc<dyn MessageSink>,
}

/// Why a reader did not take a subscription.
#[derive(Debug)]
pub enum AddError {
    /// The topic is not assigned yet and no start offsets were given.
    NeedStart,
    /// librdkafka refused the assignment, or the reader has stopped.
    Failed(String),
}

enum Command {
    Add {
        topic: String,
        sub: Sub,
        /// Start offset per partition, used when the topic is not assigned yet.
        start: Option<Vec<(i32, i64)>>,
        done: oneshot::Sender<Result<(), AddError>>,
    },
    Remove {
        id: UpstreamId,
        /// Whether the subscription's topic was released with it.
        done: oneshot::Sender<bool>,
    },
    Stop,
}

struct TopicState {
    subs: Vec<Sub>,
    /// Next expected offset per assigned partition.
    next: HashMap<i32, i64>,
}

/// A consumer thread and the handle to command it.
pub struct Reader {
    consumer: Arc<BaseConsumer<KafkaContext>>,
    commands: mpsc::Sender<Command>,
    topics: Arc<AtomicUsize>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Reader {
    /// Creates the consumer and starts its thread. `name` labels the thread and logs.
    pub fn start(
        config: &ClientConfig,
        context: KafkaContext,
        name: String,
        paced: bool,
        panics: prometheus::IntCounter,
    ) -> Result<Reader, String> {
        let consumer: BaseConsumer<KafkaContext> = config
            .create_with_context(context)
            .map_err(|e| format!("cannot create a Kafka consumer: {e}"))?;
        let consumer = Arc::new(consumer);
        let (commands, receiver) = mpsc::channel();
        let (gaps, gap_checks) = mpsc::channel::<GapCheck>();
        let topics = Arc::new(AtomicUsize::new(0));
        // Ends when the delivery loop drops its sender.
        std::thread::Builder::new()
            .name(format!("kafka-{name}-gaps"))
            .spawn({
                let consumer = consumer.clone();
                move || {
                    for check in gap_checks {
                        check.run(&consumer);
                    }
                }
            })
            .map_err(|e| format!("cannot start a consumer thread: {e}"))?;
        let thread = std::thread::Builder::new()
            .name(format!("kafka-{name}"))
            .spawn({
                let consumer = consumer.clone();
                let topics = topics.clone();
                move || Loop::new(consumer, receiver, topics, gaps, paced, panics).run()
            })
            .map_err(|e| format!("cannot start a consumer thread: {e}"))?;
        Ok(Reader {
            consumer,
            commands,
            topics,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// The consumer, for offset lookups from other threads (librdkafka handles are thread-safe).
    pub fn consumer(&self) -> &Arc<BaseConsumer<KafkaContext>> {
        &self.consumer
    }

    /// Topics currently assigned.
    pub fn topic_count(&self) -> usize {
        self.topics.load(Ordering::Relaxed)
    }

    /// Adds a subscription; resolves once messages for it are being dispatched.
    pub async fn add(
        &self,
        topic: &str,
        sub: Sub,
        start: Option<Vec<(i32, i64)>>,
    ) -> Result<(), AddError> {
        let (done, result) = oneshot::channel();
        let command = Command::Add {
            topic: topic.to_owned(),
            sub,
            start,
            done,
        };
        let stopped = || AddError::Failed("the Kafka consumer has stopped".into());
        self.commands.send(command).map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }

    /// Removes a subscription; returns whether its topic was released. Once this returns,
    /// nothing more is delivered to the subscription's sink.
    pub async fn remove(&self, id: UpstreamId) -> bool {
        let (done, result) = oneshot::channel();
        if self.commands.send(Command::Remove { id, done }).is_err() {
            return false;
        }
        result.await.unwrap_or(false)
    }

    /// Stops the thread and waits for it (the consumer is closed on that thread).
    pub async fn stop(&self) {
        let _ = self.commands.send(Command::Stop);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
    }
}

/// The consumer thread's state.
struct Loop {
    consumer: Arc<BaseConsumer<KafkaContext>>,
    commands: mpsc::Receiver<Command>,
    topic_count: Arc<AtomicUsize>,
    topics: HashMap<String, TopicState>,
    last_error: Option<String>,
    /// Offset jumps for the gap-checking thread.
    gaps: mpsc::Sender<GapCheck>,
    /// Whether to take messages only while every subscriber has room.
    paced: bool,
    panics: prometheus::IntCounter,
}

impl Loop {
    fn new(
        consumer: Arc<BaseConsumer<KafkaContext>>,
        commands: mpsc::Receiver<Command>,
        topic_count: Arc<AtomicUsize>,
        gaps: mpsc::Sender<GapCheck>,
        paced: bool,
        panics: prometheus::IntCounter,
    ) -> Self {
        Loop {
            consumer,
            commands,
            topic_count,
            topics: HashMap::new(),
            last_error: None,
            gaps,
            paced,
            panics,
        }
    }

    /// Whether the next message may be taken: always, unless paced and a subscriber is full.
    /// (Without group membership, not polling for a while is harmless: librdkafka stops
    /// fetching once its local queue is full.)
    fn may_take(&self) -> bool {
        !self.paced
            || self
                .topics
                .values()
                .all(|state| state.subs.iter().all(|sub| sub.sink.has_room()))
    }

    /// Counts and logs a panic caught on this thread; the thread goes on with the next step.
    fn contained(&self, what: &str, panic: contain::Panicked) {
        self.panics.inc();
        tracing::error!(%panic, "panic on the Kafka consumer thread while {what}; it was skipped");
    }

    fn run(mut self) {
        loop {
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Stop) | Err(mpsc::TryRecvError::Disconnected) => return,
                    Ok(command) => {
                        // A panicking command drops its reply channel: the caller is answered
                        // that the consumer failed, and the thread serves the others.
                        if let Err(panic) = contain::call(|| self.apply(command)) {
                            self.contained("applying a command", panic);
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            if !self.may_take() {
                std::thread::sleep(PACE);
                continue;
            }
            let consumer = self.consumer.clone();
            let mut next = consumer.poll(POLL);
            let mut handled = 0;
            while let Some(result) = next {
                match result {
                    Ok(message) => {
                        self.last_error = None;
                        if let Err(panic) = contain::call(|| self.dispatch(&message)) {
                            self.contained("dispatching a message", panic);
                        }
                    }
                    Err(e) => self.consumer_error(e.to_string()),
                }
                handled += 1;
                if handled == BATCH || !self.may_take() {
                    break;
                }
                next = consumer.poll(Duration::ZERO);
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Add {
                topic,
                sub,
                start,
                done,
            } => {
                let result = self.add(topic, sub, start);
                let _ = done.send(result);
            }
            Command::Remove { id, done } => {
                let _ = done.send(self.remove(id));
            }
            Command::Stop => {}
        }
        self.topic_count.store(self.topics.len(), Ordering::Relaxed);
    }

    fn add(
        &mut self,
        topic: String,
        sub: Sub,
        start: Option<Vec<(i32, i64)>>,
    ) -> Result<(), AddError> {
        let state = match self.topics.entry(topic) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let start = start.ok_or(AddError::NeedStart)?;
                let mut assignment = TopicPartitionList::new();
                for (partition, offset) in &start {
                    assignment
                        .add_partition_offset(entry.key(), *partition, Offset::Offset(*offset))
                        .map_err(|e| AddError::Failed(e.to_string()))?;
                }
                self.consumer
                    .incremental_assign(&assignment)
                    .map_err(|e| AddError::Failed(format!("cannot assign partitions: {e}")))?;
                entry.insert(TopicState {
                    subs: Vec::new(),
                    next: start.into_iter().collect(),
                })
            }
        };
        state.subs.push(sub);
        Ok(())
    }

    fn remove(&mut self, id: UpstreamId) -> bool {
        let Some(topic) = self
            .topics
            .iter()
            .find(|(_, state)| state.subs.iter().any(|s| s.id == id))
            .map(|(topic, _)| topic.clone())
        else {
            return false;
        };
        let state = self.topics.get_mut(&topic).expect("found above");
        state.subs.retain(|s| s.id != id);
        if !state.subs.is_empty() {
            return false;
        }
        let state = self.topics.remove(&topic).expect("found above");
        let mut assignment = TopicPartitionList::new();
        for partition in state.next.keys() {
            assignment.add_partition(&topic, *partition);
        }
        if let Err(e) = self.consumer.incremental_unassign(&assignment) {
            tracing::warn!(%topic, error = %e, "cannot unassign Kafka partitions");
        }
        true
    }

    fn consumer_error(&mut self, error: String) {
        // librdkafka repeats errors while a condition lasts (e.g. a topic that vanished).
        if self.last_error.as_deref() != Some(error.as_str()) {
            tracing::warn!(%error, "Kafka consumer error");
            self.last_error = Some(error);
        }
    }

    fn dispatch(&mut self, message: &BorrowedMessage<'_>) {
        let topic = message.topic();
        let Some(state) = self.topics.get_mut(topic) else {
            return;
        };
        let partition = message.partition();
        let offset = message.offset();
        if let Some(&expected) = state.next.get(&partition) {
            if offset > expected {
                let _ = self.gaps.send(GapCheck {
                    topic: topic.to_owned(),
                    partition,
                    expected,
                    sinks: state.subs.iter().map(|s| s.sink.clone()).collect(),
                });
            } else if offset < expected {
                tracing::warn!(
                    %topic, partition, offset, expected,
                    "the partition's log restarted below the read position (topic recreated?); reading on from its start"
                );
            }
        }
        state.next.insert(partition, offset + 1);

        let key = message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned());
        let wants = |sub: &Sub| sub.key.is_none() || sub.key == key;
        let Some(last) = state.subs.iter().rposition(wants) else {
            return;
        };
        let subs = &state.subs[..=last];
        let broker_message = BrokerMessage {
            topic: topic.to_owned(),
            payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
            key: key.clone(),
            headers: message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| {
                            let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                            (h.key.to_owned(), value.into_owned())
                        })
                        .collect()
                })
                .unwrap_or_default(),
            timestamp: message.timestamp().to_millis(),
            position: Some(Position { partition, offset }),
            ..BrokerMessage::default()
        };
        let (last, others) = subs
            .split_last()
            .expect("holds at least the last wanted one");
        for sub in others.iter().filter(|s| wants(s)) {
            sub.sink.deliver(broker_message.clone());
        }
        last.sink.deliver(broker_message);
    }
}

/// An offset jump to look into: was the log start moved past `expected`?
struct GapCheck {
    topic: String,
    partition: i32,
    expected: i64,
    sinks: Vec<Arc<dyn MessageSink>>,
}

impl GapCheck {
    /// Reports a gap when the log no longer starts at or before `expected`.
    fn run(self, consumer: &BaseConsumer<KafkaContext>) {
        let GapCheck {
            topic,
            partition,
            expected,
            sinks,
        } = self;
        match consumer.fetch_watermarks(&topic, partition, LOOKUP_TIMEOUT) {
            Ok((low, _)) if expected < low => {
                tracing::warn!(%topic, partition, requested = expected, available = low, "messages were deleted before they were read");
                for sink in sinks {
                    sink.event(SubscriptionEvent::Gap {
                        partition,
                        requested: expected,
                        available: low,
                    });
                }
            }
            // Transaction markers or compacted records: nothing was lost.
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%topic, partition, error = %e, "cannot check the log start after an offset jump");
            }
        }
    }
}
