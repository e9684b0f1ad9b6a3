//! The librdkafka client context: log lines go to `tracing`, and the producer's client-wide
//! errors feed the backend's health.

use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::watch;

use crate::backends::Health;

/// Shared by every client of one backend.
#[derive(Clone)]
pub struct KafkaContext {
    backend: Arc<str>,
    /// Set on the producer's context only, so one client decides the backend's health.
    health: Option<Arc<watch::Sender<Health>>>,
}

impl KafkaContext {
    pub fn new(backend: &str) -> Self {
        KafkaContext {
            backend: backend.into(),
            health: None,
        }
    }

    pub fn with_health(mut self, health: Arc<watch::Sender<Health>>) -> Self {
        self.health = Some(health);
        self
    }
}

/// Sets the health, notifying watchers only when it changes.
pub fn set_health(health: &watch::Sender<Health>, new: Health) {
    health.send_if_modified(|current| {
        if *current == new {
            false
        } else {
            *current = new;
            true
        }
    });
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let backend = &*self.backend;
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(backend, fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(backend, fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(backend, fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(backend, fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let backend = &*self.backend;
        if let Some(health) = &self.health
            && error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown)
        {
            set_health(
                health,
                Health::Down {
                    reason: format!("no Kafka broker reachable ({reason})"),
                },
            );
        }
        tracing::warn!(backend, %error, "librdkafka: {reason}");
    }
}

impl ConsumerContext for KafkaContext {}
