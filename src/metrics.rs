//! Counters and gauges, served in the Prometheus text format at `GET /metrics`.
//!
//! Each gateway instance has its own registry (several gateways can run in one process, as the
//! tests do). Labels are low-cardinality: the backend name and a result. Per-backend handles are
//! resolved once, so the hot path only increments atomics.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    pub slow_consumer_disconnects: IntCounter,
    pub write_timeouts: IntCounter,
    broker_messages: IntCounterVec,
    deliveries: IntCounterVec,
    dropped: IntCounterVec,
    unmapped: IntCounterVec,
    decode_errors: IntCounterVec,
    publishes: IntCounterVec,
    upstreams: IntGaugeVec,
    backend_up: IntGaugeVec,
    panics: IntCounterVec,
}

/// Metric handles for one backend.
#[derive(Clone)]
pub struct BackendMetrics {
    /// Messages received from the broker (once per upstream subscription).
    pub broker_messages: IntCounter,
    /// Message frames queued to clients.
    pub deliveries: IntCounter,
    /// Messages dropped by the `drop_oldest` policy.
    pub dropped: IntCounter,
    /// Broker messages whose topic did not map back to a client channel.
    pub unmapped: IntCounter,
    /// Broker messages that did not decode as their route's payload type.
    pub decode_errors: IntCounter,
    pub publishes_ok: IntCounter,
    pub publishes_failed: IntCounter,
    /// Upstream subscriptions currently held.
    pub upstreams: IntGauge,
    /// 1 when the backend is connected.
    pub up: IntGauge,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let connections =
            IntGauge::new("wsbridge_connections", "Open WebSocket connections").expect("valid");
        let connections_total = IntCounter::new(
            "wsbridge_connections_total",
            "WebSocket connections accepted",
        )
        .expect("valid");
        let slow_consumer_disconnects = IntCounter::new(
            "wsbridge_slow_consumer_disconnects_total",
            "Connections closed because their outgoing queue was full",
        )
        .expect("valid");
        let write_timeouts = IntCounter::new(
            "wsbridge_write_timeouts_total",
            "Connections closed because their socket took no data within server.write_timeout",
        )
        .expect("valid");
        registry
            .register(Box::new(connections.clone()))
            .expect("registered once");
        for m in [
            &connections_total,
            &slow_consumer_disconnects,
            &write_timeouts,
        ] {
            registry
                .register(Box::new(m.clone()))
                .expect("registered once");
        }
        let b = &["backend"];
        Metrics {
            broker_messages: counter_vec(
                &registry,
                "wsbridge_broker_messages_total",
                "Messages received from brokers, once per upstream subscription",
                b,
            ),
            deliveries: counter_vec(
                &registry,
                "wsbridge_deliveries_total",
                "Message frames queued to clients",
                b,
            ),
            dropped: counter_vec(
                &registry,
                "wsbridge_dropped_total",
                "Messages dropped for slow consumers",
                b,
            ),
            unmapped: counter_vec(
                &registry,
                "wsbridge_unmapped_messages_total",
                "Broker messages whose topic maps to no client channel",
                b,
            ),
            decode_errors: counter_vec(
                &registry,
                "wsbridge_decode_errors_total",
                "Broker messages that did not decode as their route's payload format (skipped)",
                b,
            ),
            publishes: counter_vec(
                &registry,
                "wsbridge_publishes_total",
                "Client publishes by outcome",
                &["backend", "result"],
            ),
            upstreams: gauge_vec(
                &registry,
                "wsbridge_upstream_subscriptions",
                "Upstream subscriptions the gateway holds, one per route and topic filter, shared by all sockets on it",
                b,
            ),
            backend_up: gauge_vec(
                &registry,
                "wsbridge_backend_up",
                "1 when the backend is connected",
                b,
            ),
            panics: counter_vec(
                &registry,
                "wsbridge_panics_total",
                "Panics caught at a task boundary, by component; each one is logged and the rest of the gateway carries on",
                &["component"],
            ),
            registry,
            connections,
            connections_total,
            slow_consumer_disconnects,
            write_timeouts,
        }
    }

    /// Handles for one backend's series.
    pub fn backend(&self, name: &str) -> BackendMetrics {
        BackendMetrics {
            broker_messages: self.broker_messages.with_label_values(&[name]),
            deliveries: self.deliveries.with_label_values(&[name]),
            dropped: self.dropped.with_label_values(&[name]),
            unmapped: self.unmapped.with_label_values(&[name]),
            decode_errors: self.decode_errors.with_label_values(&[name]),
            publishes_ok: self.publishes.with_label_values(&[name, "ok"]),
            publishes_failed: self.publishes.with_label_values(&[name, "error"]),
            upstreams: self.upstreams.with_label_values(&[name]),
            up: self.backend_up.with_label_values(&[name]),
        }
    }

    /// The panic counter of one component (`session`, `writer`, `delivery`, `backend:<name>`).
    pub fn panics(&self, component: &str) -> IntCounter {
        self.panics.with_label_values(&[component])
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
