//! `type = "memory"`: an in-process broker with MQTT wildcard semantics.
//!
//! It is the embedded default and the backend of the core's tests. Topics are `/`-separated;
//! filters use `+` and a trailing `#`. A publish is delivered synchronously to every matching
//! upstream subscription, so it is acknowledged once every subscriber's queue has it. Nothing is
//! retained or persisted.

use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::watch;

use super::adapter::{
    Backend, BackendError, BackendSettings, BrokerMessage, BuildContext, Capabilities, Health,
    Kind, MessageSink, Publish, PublishReceipt, Subscription, UpstreamId,
};
use crate::config::deserialize_section;
use crate::routing::{ChannelPattern, TopicSyntax};

/// `type = "memory"`.
pub const KIND: Kind = Kind {
    name: "memory",
    parse: |table, path, problems| {
        deserialize_section::<MemoryConfig>(table, path, problems)
            .map(|c| Box::new(c) as Box<dyn BackendSettings>)
    },
};

/// `[backends.NAME]` with `type = "memory"`; it has no other keys.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MemoryConfig {}

impl BackendSettings for MemoryConfig {
    fn topic_syntax(&self) -> TopicSyntax {
        TopicSyntax::SLASH
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
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
    health: watch::Sender<Health>,
}

impl MemoryBackend {
    pub fn new(_config: &MemoryConfig, _cx: BuildContext<'_>) -> Self {
        MemoryBackend {
            subscriptions: RwLock::new(Vec::new()),
            health: watch::Sender::new(Health::Up),
        }
    }
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
        self.subscriptions
            .write()
            .expect("memory subscriptions lock")
            .push(Entry {
                id: subscription.id,
                filter,
                sink: subscription.sink,
            });
        Ok(())
    }

    async fn unsubscribe(&self, id: UpstreamId) -> Result<(), BackendError> {
        self.subscriptions
            .write()
            .expect("memory subscriptions lock")
            .retain(|e| e.id != id);
        Ok(())
    }

    async fn publish(&self, publish: Publish) -> Result<PublishReceipt, BackendError> {
        let message = BrokerMessage {
            topic: publish.topic,
            payload: publish.payload,
            key: publish.key,
            headers: publish.headers,
            timestamp: Some(now_ms()),
            ..BrokerMessage::default()
        };
        let subscriptions = self
            .subscriptions
            .read()
            .expect("memory subscriptions lock");
        for entry in subscriptions.iter() {
            if entry.filter.matches(&message.topic) {
                entry.sink.deliver(message.clone());
            }
        }
        Ok(PublishReceipt::default())
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    fn upstream_count(&self) -> usize {
        self.subscriptions
            .read()
            .expect("memory subscriptions lock")
            .len()
    }

    async fn close(&self) {
        self.subscriptions
            .write()
            .expect("memory subscriptions lock")
            .clear();
    }
}
