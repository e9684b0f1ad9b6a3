//! `type = "memory"`: an in-process broker with MQTT wildcard semantics.
//!
//! It is the embedded default and the backend of the core's tests. Topics are `/`-separated;
//! filters use `+` and a trailing `#`. A publish is delivered synchronously to every matching
//! upstream subscription, so it is acknowledged once every subscriber's queue has it. Nothing is
//! persisted. With `history_size` above 0 it keeps recent messages per topic ([`history`]):
//! every message then carries a position, and a subscription may start from one (`from`).

mod history;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::watch;

use super::adapter::{
    Backend, BackendError, BackendSettings, BrokerMessage, BuildContext, Capabilities, Health,
    Kind, MessageSink, Publish, PublishReceipt, StartPosition, Subscription, UpstreamId,
};
use crate::config::{ConfigProblem, deserialize_section};
use crate::routing::{ChannelPattern, TopicSyntax};
use history::History;

/// Largest `history_size`.
const MAX_HISTORY_SIZE: usize = 1_000_000;

/// `type = "memory"`.
pub const KIND: Kind = Kind {
    name: "memory",
    parse: |table, path, problems| {
        let config = deserialize_section::<MemoryConfig>(table, path, problems)?;
        config.validate(path, problems);
        Some(Box::new(config) as Box<dyn BackendSettings>)
    },
};

/// `[backends.NAME]` with `type = "memory"`. Every key is optional.
#[derive(Debug, Clone, Deserialize)]
pub struct MemoryConfig {
    /// Messages kept per topic for subscriptions that start from a position (`from`); 0 (the
    /// default) keeps none, and then only `"from": "latest"` is possible.
    #[serde(default)]
    pub history_size: usize,
    /// Longest a kept message stays; by default only `history_size` bounds the history.
    #[serde(default, with = "humantime_serde")]
    pub history_ttl: Option<Duration>,
    /// Most topics with a history; beyond it the least recently published topic's history is
    /// dropped whole.
    #[serde(default = "default_history_topics")]
    pub history_topics: usize,
}

fn default_history_topics() -> usize {
    10_000
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            history_size: 0,
            history_ttl: None,
            history_topics: default_history_topics(),
        }
    }
}

impl MemoryConfig {
    fn validate(&self, path: &str, problems: &mut Vec<ConfigProblem>) {
        if self.history_size > MAX_HISTORY_SIZE {
            problems.push(ConfigProblem::new(
                format!("{path}.history_size"),
                format!("{} must be at most {MAX_HISTORY_SIZE}", self.history_size),
            ));
        }
        if self.history_ttl.is_some_and(|ttl| ttl.is_zero()) {
            problems.push(ConfigProblem::new(
                format!("{path}.history_ttl"),
                "must be longer than 0s (leave it out to bound the history by size only)",
            ));
        }
        if self.history_topics == 0 {
            problems.push(ConfigProblem::new(
                format!("{path}.history_topics"),
                "must be at least 1",
            ));
        }
    }
}

impl BackendSettings for MemoryConfig {
    fn topic_syntax(&self) -> TopicSyntax {
        TopicSyntax::SLASH
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            replay: self.history_size > 0,
            ..Capabilities::default()
        }
    }

    fn build(&self, cx: BuildContext<'_>) -> Result<Arc<dyn Backend>, BackendError> {
        Ok(Arc::new(MemoryBackend::new(self, cx)))
    }
}

struct Entry {
    id: UpstreamId,
    filter: ChannelPattern,
    sink: Arc<dyn MessageSink>,
}

/// The in-process broker.
pub struct MemoryBackend {
    subscriptions: RwLock<Vec<Entry>>,
    /// Present when `history_size` > 0. Lock order: `subscriptions`, then `history`.
    history: Option<Mutex<History>>,
    health: watch::Sender<Health>,
}

impl MemoryBackend {
    pub fn new(config: &MemoryConfig, _cx: BuildContext<'_>) -> Self {
        MemoryBackend {
            subscriptions: RwLock::new(Vec::new()),
            history: (config.history_size > 0).then(|| {
                Mutex::new(History::new(
                    config.history_size,
                    config.history_ttl,
                    config.history_topics,
                    epoch_ms(),
                ))
            }),
            health: watch::Sender::new(Health::Up),
        }
    }

    // A panic while a lock is held leaves the data consistent (every update is one step), so a
    // poisoned lock is used as it is rather than stopping the backend.
    fn read(&self) -> RwLockReadGuard<'_, Vec<Entry>> {
        self.subscriptions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<Entry>> {
        self.subscriptions
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn history(history: &Mutex<History>) -> MutexGuard<'_, History> {
        history.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The start of a new history: now, and later than any earlier history of this process (two
/// backends built in the same millisecond must not share offsets).
fn epoch_ms() -> i64 {
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = now_ms();
    let previous = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or(now);
    now.max(previous + 1)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn subscribe(&self, subscription: Subscription) -> Result<(), BackendError> {
        let filter = ChannelPattern::parse(&subscription.filter)
            .map_err(|e| BackendError::Failed(format!("invalid topic filter: {e}")))?;
        // Publishes wait while the subscription is added, so every message is either in the
        // replay or delivered live, never both and never neither.
        let mut subscriptions = self.write();
        if subscription.start != StartPosition::Latest {
            let Some(history) = &self.history else {
                return Err(BackendError::Unsupported(
                    "this memory backend keeps no history (history_size = 0)".into(),
                ));
            };
            let replay = Self::history(history)
                .replay(&filter, &subscription.start, now_ms())
                .map_err(|message| BackendError::Rejected {
                    code: "invalid_partition",
                    message,
                })?;
            if let Some(gap) = replay.gap {
                subscription.sink.event(gap);
            }
            for message in replay.messages {
                subscription.sink.deliver(message);
            }
        }
        subscriptions.push(Entry {
            id: subscription.id,
            filter,
            sink: subscription.sink,
        });
        Ok(())
    }

    async fn unsubscribe(&self, id: UpstreamId) -> Result<(), BackendError> {
        self.write().retain(|e| e.id != id);
        Ok(())
    }

    async fn publish(&self, publish: Publish) -> Result<PublishReceipt, BackendError> {
        let now = now_ms();
        let message = BrokerMessage {
            topic: publish.topic,
            payload: publish.payload,
            key: publish.key,
            headers: publish.headers,
            timestamp: Some(now),
            ..BrokerMessage::default()
        };
        let subscriptions = self.read();
        // With a history, publishes are delivered one at a time under its lock, so each
        // subscriber sees offsets in increasing order.
        let mut history = self.history.as_ref().map(Self::history);
        let message = match history.as_mut() {
            Some(history) => history.record(message, now),
            None => message,
        };
        for entry in subscriptions.iter() {
            if entry.filter.matches(&message.topic) {
                entry.sink.deliver(message.clone());
            }
        }
        Ok(PublishReceipt {
            position: message.position,
        })
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    fn upstream_count(&self) -> usize {
        self.read().len()
    }

    async fn close(&self) {
        self.write().clear();
    }
}
