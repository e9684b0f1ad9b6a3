//! The librdkafka client context: log lines go to `tracing`, and the producer's client-wide
//! errors feed the backend's health.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::watch;

use crate::backends::adapter::Health;

/// Shared by every client of one backend.
#[derive(Clone)]
pub struct KafkaContext {
    backend: Arc<str>,
    /// Set on the producer's context only, so one client decides the backend's health.
    health: Option<Arc<watch::Sender<Health>>>,
    /// Raised when librdkafka reports a fatal error (producer's context only).
    fatal: Option<Arc<AtomicBool>>,
}

impl KafkaContext {
    pub fn new(backend: &str) -> Self {
        KafkaContext {
            backend: backend.into(),
            health: None,
            fatal: None,
        }
    }

    /// The producer's context: it reports health and fatal errors.
    pub fn for_producer(&self, health: Arc<watch::Sender<Health>>, fatal: Arc<AtomicBool>) -> Self {
        KafkaContext {
            backend: self.backend.clone(),
            health: Some(health),
            fatal: Some(fatal),
        }
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
        if let Some(fatal) = &self.fatal
            && error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
        {
            fatal.store(true, Ordering::Relaxed);
        }
        tracing::warn!(backend, %error, "librdkafka: {reason}");
    }
}

impl ConsumerContext for KafkaContext {}
