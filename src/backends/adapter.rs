//! The adapter contract: what every backend implements, what it is given, and what it declares
//! about itself.
//!
//! The core hands a backend *upstream subscriptions* (one per distinct topic filter, shared by
//! every socket on it) and *publishes*; the backend delivers broker messages to each
//! subscription's [`MessageSink`] and reports its connection state through [`Backend::health`].
//! Before anything runs, a kind's [`BackendSettings`] (its parsed `[backends.NAME]` table) says how
//! it spells topics and what it [can do](Capabilities), checks the routes that name it, and builds
//! the running [`Backend`].

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use crate::config::{ConfigProblem, RouteConfig};
use crate::routing::TopicSyntax;

/// Panic containment for adapters' own tasks (see [`crate::contain`]).
pub use crate::contain;

/// Identifies one upstream subscription for the life of the process.
pub type UpstreamId = u64;

/// Position of a message in a partitioned log (Kafka).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// Where a subscription starts reading, for backends that keep a log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StartPosition {
    /// Only messages published from now on (the default, and the only choice without a log).
    #[default]
    Latest,
    Earliest,
    /// The first message at or after this time (ms since the Unix epoch).
    Timestamp(i64),
    /// The next offset to read, per partition.
    Offsets(Vec<(i32, i64)>),
}

/// A message received from a broker.
#[derive(Debug, Clone, Default)]
pub struct BrokerMessage {
    /// Topic in the backend's syntax (MQTT topic, AMQP routing key, Kafka topic).
    pub topic: String,
    pub payload: Bytes,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    pub position: Option<Position>,
}

/// Events a backend reports for one upstream subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionEvent {
    /// Messages between the requested start and what the broker still holds are gone.
    Gap {
        partition: i32,
        requested: i64,
        available: i64,
    },
}

/// Where a backend delivers messages for one upstream subscription. Delivery never blocks: the
/// fan-out behind it queues per client and applies the slow-consumer policy.
pub trait MessageSink: Send + Sync {
    fn deliver(&self, message: BrokerMessage);
    fn event(&self, event: SubscriptionEvent);

    /// Whether every subscriber behind the sink can take another message now without its
    /// slow-consumer policy dropping or disconnecting. A backend reading a replay (a log read
    /// from a past position) waits while this is false, so a replay goes at its client's pace.
    fn has_room(&self) -> bool {
        true
    }
}

/// An upstream subscription requested by the core.
#[derive(Clone)]
pub struct Subscription {
    pub id: UpstreamId,
    /// Index of the route (in config order) the subscription came through.
    pub route: usize,
    /// Topic filter in the backend's syntax.
    pub filter: String,
    /// Exact message key to deliver, when the route is key-routed and the pattern names one key.
    pub key: Option<String>,
    pub start: StartPosition,
    pub sink: Arc<dyn MessageSink>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("route", &self.route)
            .field("filter", &self.filter)
            .field("key", &self.key)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

/// A client publish, mapped to the backend's terms.
#[derive(Debug, Clone)]
pub struct Publish {
    pub route: usize,
    pub topic: String,
    pub key: Option<String>,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    pub partition: Option<i32>,
}

/// What the broker said about an accepted publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishReceipt {
    pub position: Option<Position>,
}

/// Connection state of a backend, as shown in `status` frames and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Up,
    Down { reason: String },
}

impl Health {
    pub fn is_up(&self) -> bool {
        matches!(self, Health::Up)
    }
}

/// Why a backend operation failed. Each kind maps to a documented client error code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// Not connected to the broker right now; retrying later may work.
    #[error("backend is unavailable: {0}")]
    Unavailable(String),
    /// The broker did not answer in time; the outcome is unknown.
    #[error("backend did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The broker refused this request (e.g. unroutable message, unknown topic).
    #[error("{message}")]
    Rejected { code: &'static str, message: String },
    /// The request uses something this backend cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// Any other broker or adapter failure.
    #[error("{0}")]
    Failed(String),
}

impl BackendError {
    /// The client error code for this failure (see docs/PROTOCOL.md).
    pub fn code(&self) -> &'static str {
        match self {
            BackendError::Unavailable(_) => "backend_unavailable",
            BackendError::Timeout(_) => "backend_timeout",
            BackendError::Rejected { code, .. } => code,
            BackendError::Unsupported(_) => "unsupported",
            BackendError::Failed(_) => "backend_error",
        }
    }
}

/// A running backend adapter.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Starts delivering messages matching `subscription.filter` to its sink. Called once per
    /// distinct upstream; the core shares it between sockets.
    async fn subscribe(&self, subscription: Subscription) -> Result<(), BackendError>;

    /// Stops an upstream subscription; no message is delivered to its sink afterwards.
    async fn unsubscribe(&self, id: UpstreamId) -> Result<(), BackendError>;

    /// Another client joined upstream `id`, which the core already shares. A backend whose
    /// broker keeps last values (MQTT retained messages) delivers them to `sink`, which reaches
    /// only that client, as the broker would on a subscription of the client's own. Must not
    /// block. By default nothing happens.
    fn joined(&self, id: UpstreamId, sink: Arc<dyn MessageSink>) {
        let _ = (id, sink);
    }

    /// Publishes one message; resolves when the broker has accepted it (as far as the backend's
    /// delivery settings promise).
    async fn publish(&self, publish: Publish) -> Result<PublishReceipt, BackendError>;

    /// Connection state, updated as it changes.
    fn health(&self) -> watch::Receiver<Health>;

    /// Number of upstream subscriptions the broker currently holds for this backend.
    fn upstream_count(&self) -> usize;

    /// Closes broker connections; called once on shutdown.
    async fn close(&self);
}

/// What a backend gets when it is built.
pub struct BuildContext<'a> {
    /// The backend's name in the config.
    pub name: &'a str,
    /// The routes that name this backend, with their index in config order.
    pub routes: Vec<(usize, &'a RouteConfig)>,
    /// Counts panics the backend's own tasks catch (`wsbridge_panics_total{component=
    /// "backend:<name>"}`). A delivery loop that panics is restarted, and the backend reports
    /// `Down` until it delivers again.
    pub panics: prometheus::IntCounter,
}

/// What a backend kind can do. The core asks these instead of matching on kinds: a request
/// that needs a capability the backend lacks is answered `unsupported` before it reaches it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Messages carry keys: routes may have a `key` template and publishes may set one.
    pub keys: bool,
    /// The broker keeps a log with positions: a subscription may start elsewhere than at the
    /// latest message (`from`), and messages carry their position.
    pub replay: bool,
    /// The broker keeps last values (MQTT retained messages) that a new subscriber gets first.
    pub retained: bool,
    /// Topics have partitions that a publish may name.
    pub partitions: bool,
}

/// A kind's validated `[backends.NAME]` table.
pub trait BackendSettings: fmt::Debug + Send + Sync + Any {
    /// How this backend spells topics, for route templates.
    fn topic_syntax(&self) -> TopicSyntax;

    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// Checks the backend-specific options of a route that names this backend (`path` is the
    /// route's path, e.g. `routes[3]`). By default a route takes no options.
    fn check_route(&self, route: &RouteConfig, path: &str, problems: &mut Vec<ConfigProblem>) {
        for key in route.options.keys() {
            problems.push(ConfigProblem::new(
                format!("{path}.{key}"),
                "unknown key (routes to this backend take no backend options)",
            ));
        }
    }

    /// Starts the adapter. Connecting happens in the background: a broker that is down at start
    /// makes the backend report `Down` and retry; it does not stop the gateway.
    fn build(&self, cx: BuildContext<'_>) -> Result<Arc<dyn Backend>, BackendError>;
}

/// Parses a kind's table (without its `type` key), recording problems under `path`. A table that
/// deserializes may be returned even when its values have problems (they are recorded, so the
/// config is refused anyway), so that the routes naming it can still be checked against it.
pub type ParseSettings =
    fn(toml::Value, &str, &mut Vec<ConfigProblem>) -> Option<Box<dyn BackendSettings>>;

/// A backend kind: the `type` value that selects it and how to parse its table. Each adapter
/// defines one next to its code; [`super::KINDS`] lists them.
#[derive(Clone, Copy)]
pub struct Kind {
    pub name: &'static str,
    pub parse: ParseSettings,
}

/// Delay before reconnection attempt `attempt` (0-based): `min` doubling up to `max`, with up to
/// a quarter taken off at random, so many connections lost at once (a fleet of gateways, the
/// topics of one feed) do not reconnect in lockstep. For adapters' reconnect loops.
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let base = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    let jitter = base.mul_f64(random_fraction() * 0.25);
    base.saturating_sub(jitter).max(min.min(base))
}

/// A number in [0, 1) from the standard library's per-process random hash keys: enough for
/// jitter and generated names, not for secrets.
pub fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(backoff(0, min, max), min, "the first delay is the minimum");
        for attempt in 0..40 {
            let d = backoff(attempt, min, max);
            let base = min.saturating_mul(1 << attempt.min(16)).min(max);
            assert!(d <= base && d >= base.mul_f64(0.75), "{attempt}: {d:?}");
        }
        assert!(backoff(u32::MAX, min, max) <= max);
    }

    #[test]
    fn random_fractions_are_in_range() {
        assert!(
            (0..1000)
                .map(|_| random_fraction())
                .all(|f| (0.0..1.0).contains(&f))
        );
    }
}
