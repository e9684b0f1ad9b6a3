//! Counters and gauges, served in the Prometheus text format at `GET /metrics`.
//!
//! Each gateway instance has its own registry (several gateways can run in one process, as the
//! tests do). Labels are low-cardinality: the backend name, a result (an error code from a
//! documented set) or a reason. Per-backend handles are resolved once, so the hot path only
//! increments atomics; a connection's writer adds its frames, bytes and latency once per
//! written batch. docs/OPERATIONS.md lists every metric.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Buckets of the delivery latency histogram, in seconds: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    pub slow_consumer_disconnects: IntCounter,
    pub write_timeouts: IntCounter,
    /// Seconds from a broker message's receipt to the write of the batch carrying it, observed
    /// once per written batch (for the oldest message in it).
    pub delivery_latency: Histogram,
    /// Messages queued for all connections, set when scraped.
    pub queued_messages: IntGauge,
    /// Frames written to clients (WebSocket messages, SSE events), added per batch.
    pub frames_out: IntCounter,
    /// Bytes of those frames, added per batch.
    pub bytes_out: IntCounter,
    upgrades_refused: IntCounterVec,
    auth_failures: IntCounterVec,
    backend_reconnects: IntCounterVec,
    broker_messages: IntCounterVec,
    deliveries: IntCounterVec,
    dropped: IntCounterVec,
    unmapped: IntCounterVec,
    decode_errors: IntCounterVec,
    publishes: IntCounterVec,
    upstreams: IntGaugeVec,
    backend_up: IntGaugeVec,
    panics: IntCounterVec,
    proxy_connections: IntGaugeVec,
    proxy_frames: IntCounterVec,
    proxy_bytes: IntCounterVec,
    proxy_connect_failures: IntCounterVec,
    proxy_upstream_up: IntGaugeVec,
}

/// Metric handles for one upstream of one proxy route (labels `proxy` = the public path,
/// `upstream` = the configured URL).
#[derive(Clone)]
pub struct ProxyMetrics {
    /// Proxied connections open to this upstream.
    pub connections: IntGauge,
    /// Messages relayed from clients to the upstream (pings and pongs included).
    pub frames_to_upstream: IntCounter,
    /// Messages relayed from the upstream to clients.
    pub frames_to_client: IntCounter,
    /// Payload bytes of those messages.
    pub bytes_to_upstream: IntCounter,
    pub bytes_to_client: IntCounter,
    /// Failed connects (refused, timed out, handshake refused), health probes excluded.
    pub connect_failures: IntCounter,
    /// 1 while the upstream takes new connections (its circuit is closed).
    pub up: IntGauge,
}

impl BackendMetrics {
    /// Counts a failed publish under its error code (`backend_timeout`, `backend_unavailable`,
    /// a broker refusal code ...: a documented, fixed set).
    pub fn publish_failed(&self, code: &str) {
        self.publishes
            .with_label_values(&[self.backend.as_str(), code])
            .inc();
    }
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
    /// Failed publishes are counted by error code, resolved when one happens.
    publishes: IntCounterVec,
    backend: String,
    /// Times the backend came back up after being down.
    pub reconnects: IntCounter,
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
        let delivery_latency = Histogram::with_opts(
            HistogramOpts::new(
                "wsbridge_delivery_latency_seconds",
                "Seconds from a broker message's receipt to the write of the batch carrying it to a client, once per batch (its oldest message)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid");
        let queued_messages = IntGauge::new(
            "wsbridge_queued_messages",
            "Messages waiting in the outgoing queues of all connections",
        )
        .expect("valid");
        let frames_out = IntCounter::new(
            "wsbridge_frames_out_total",
            "Frames written to clients: WebSocket messages and SSE events, replies and statuses included",
        )
        .expect("valid");
        let bytes_out = IntCounter::new(
            "wsbridge_bytes_out_total",
            "Bytes of the frames written to clients (payload bytes of WebSocket messages, SSE event bytes)",
        )
        .expect("valid");
        registry
            .register(Box::new(delivery_latency.clone()))
            .expect("registered once");
        for m in [&connections, &queued_messages] {
            registry
                .register(Box::new(m.clone()))
                .expect("registered once");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("registered once");
        for m in [
            &connections_total,
            &slow_consumer_disconnects,
            &write_timeouts,
            &frames_out,
            &bytes_out,
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
            upgrades_refused: counter_vec(
                &registry,
                "wsbridge_upgrades_refused_total",
                "WebSocket upgrades and SSE streams refused, by reason: origin, auth, subprotocol, limits (connections refused by [limits] before any HTTP), shutting_down",
                &["reason"],
            ),
            auth_failures: counter_vec(
                &registry,
                "wsbridge_auth_failures_total",
                "Tokens refused (at connect, on HTTP publish and /routes, and on in-band refresh), by reason",
                &["reason"],
            ),
            backend_reconnects: counter_vec(
                &registry,
                "wsbridge_backend_reconnects_total",
                "Times a backend came back up after losing its broker",
                b,
            ),
            proxy_connections: gauge_vec(
                &registry,
                "wsbridge_proxy_connections",
                "Open proxied connections, by proxy path and upstream",
                &["proxy", "upstream"],
            ),
            proxy_frames: counter_vec(
                &registry,
                "wsbridge_proxy_frames_total",
                "WebSocket messages relayed by proxy routes, by direction (to_upstream, to_client)",
                &["proxy", "upstream", "direction"],
            ),
            proxy_bytes: counter_vec(
                &registry,
                "wsbridge_proxy_bytes_total",
                "Payload bytes of the messages relayed by proxy routes, by direction (to_upstream, to_client)",
                &["proxy", "upstream", "direction"],
            ),
            proxy_connect_failures: counter_vec(
                &registry,
                "wsbridge_proxy_connect_failures_total",
                "Failed connects to an upstream of a proxy route (refused, timed out, handshake refused)",
                &["proxy", "upstream"],
            ),
            proxy_upstream_up: gauge_vec(
                &registry,
                "wsbridge_proxy_upstream_up",
                "1 while an upstream of a proxy route takes new connections, 0 while it is taken out",
                &["proxy", "upstream"],
            ),
            registry,
            connections,
            connections_total,
            slow_consumer_disconnects,
            write_timeouts,
            delivery_latency,
            queued_messages,
            frames_out,
            bytes_out,
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
            publishes: self.publishes.clone(),
            backend: name.to_owned(),
            reconnects: self.backend_reconnects.with_label_values(&[name]),
            upstreams: self.upstreams.with_label_values(&[name]),
            up: self.backend_up.with_label_values(&[name]),
        }
    }

    /// Handles for one upstream of one proxy route.
    pub fn proxy_upstream(&self, proxy: &str, upstream: &str) -> ProxyMetrics {
        let both = &[proxy, upstream];
        let to_upstream = &[proxy, upstream, "to_upstream"];
        let to_client = &[proxy, upstream, "to_client"];
        ProxyMetrics {
            connections: self.proxy_connections.with_label_values(both),
            frames_to_upstream: self.proxy_frames.with_label_values(to_upstream),
            frames_to_client: self.proxy_frames.with_label_values(to_client),
            bytes_to_upstream: self.proxy_bytes.with_label_values(to_upstream),
            bytes_to_client: self.proxy_bytes.with_label_values(to_client),
            connect_failures: self.proxy_connect_failures.with_label_values(both),
            up: self.proxy_upstream_up.with_label_values(both),
        }
    }

    /// Counts a refused WebSocket upgrade or SSE stream: `reason` is one of `origin`, `auth`,
    /// `subprotocol`, `limits`, `shutting_down`.
    pub fn upgrade_refused(&self, reason: &'static str) {
        self.upgrades_refused.with_label_values(&[reason]).inc();
    }

    /// The counter of upgrades refused for `reason` (for a caller that counts many).
    pub fn upgrades_refused(&self, reason: &'static str) -> IntCounter {
        self.upgrades_refused.with_label_values(&[reason])
    }

    /// Counts a refused token; `reason` comes from a fixed set (`missing`, `expired`, ...).
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.with_label_values(&[reason]).inc();
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
