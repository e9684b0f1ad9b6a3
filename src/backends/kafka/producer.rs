//! The backend's producer, replaced when it can no longer deliver.
//!
//! An idempotent producer keeps a producer id and per-partition sequence numbers that the broker
//! must remember. A broker that comes back without that state (a restarted in-memory broker, or
//! producer state expired by the broker) refuses every further batch with "unknown producer id",
//! and librdkafka's fatal idempotence errors leave a producer unusable for good. So when the
//! broker returns after being unreachable, or librdkafka reports a fatal error, the producer is
//! replaced by a fresh one; the old one finishes its in-flight deliveries in the background.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, Producer};

use super::context::KafkaContext;

pub struct ProducerSlot {
    config: ClientConfig,
    context: KafkaContext,
    current: RwLock<FutureProducer<KafkaContext>>,
    /// Set by the context when librdkafka reports a fatal error.
    fatal: Arc<AtomicBool>,
    flush_timeout: Duration,
}

impl ProducerSlot {
    /// `context` must report fatal errors into `fatal`.
    pub fn new(
        config: ClientConfig,
        context: KafkaContext,
        fatal: Arc<AtomicBool>,
        flush_timeout: Duration,
    ) -> Result<Self, String> {
        let producer = create(&config, &context)?;
        Ok(ProducerSlot {
            config,
            context,
            current: RwLock::new(producer),
            fatal,
            flush_timeout,
        })
    }

    /// The producer to use now (a cheap handle).
    pub fn get(&self) -> FutureProducer<KafkaContext> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether librdkafka declared the current producer unusable.
    pub fn is_broken(&self) -> bool {
        self.fatal.load(Ordering::Relaxed)
    }

    /// Swaps in a fresh producer; the old one delivers what it holds, then closes.
    pub fn replace(&self, why: &str) {
        let fresh = match create(&self.config, &self.context) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot replace the Kafka producer");
                return;
            }
        };
        self.fatal.store(false, Ordering::Relaxed);
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            fresh,
        );
        tracing::info!(reason = why, "replaced the Kafka producer");
        let timeout = self.flush_timeout;
        tokio::task::spawn_blocking(move || {
            let _ = old.flush(timeout);
        });
    }

    /// Waits for every queued message of the current producer.
    pub async fn flush(&self) {
        let producer = self.get();
        let timeout = self.flush_timeout;
        let _ = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
    }
}

fn create(
    config: &ClientConfig,
    context: &KafkaContext,
) -> Result<FutureProducer<KafkaContext>, String> {
    config
        .create_with_context(context.clone())
        .map_err(|e| format!("cannot create a Kafka producer: {e}"))
}
