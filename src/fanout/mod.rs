//! The routing/fan-out core: shared upstream subscriptions and client publishes.
//!
//! The [`Hub`] keeps one upstream subscription per distinct (backend, route, topic filter, key),
//! reference-counted by the sockets on it: the first subscriber creates it at the backend, the
//! last one to leave releases it. Broker messages flow backend → [`upstream::Fanout`] → outboxes
//! without passing through the hub. Publishes are routed, authorised and transformed here, then
//! handed to the backend. The hub also turns backend health changes into [`Status`] events.
//!
//! The core never names a broker or a wire format: backends are [`Backend`]s with declared
//! [`Capabilities`], and every subscriber brings the [`Encoding`] of its edge.

pub mod encoding;
pub mod outbox;
pub mod status;
pub mod upstream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, Policy, Principal};
use crate::backends::{
    Backend, BackendError, Capabilities, Health, Publish, PublishReceipt, StartPosition,
    Subscription, UpstreamId,
};
use crate::config::Operation;
use crate::metrics::{BackendMetrics, Metrics};
use crate::routing::{ChannelPattern, Route, Router};
use crate::telemetry::Telemetry;
use crate::transform::ClientPayload;
pub use encoding::{Delivery, Encoding, Frame};
pub use outbox::Outbox;
pub use status::Status;
use upstream::{Fanout, Member};

/// A request the core refused or a backend failed, with its documented client error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RequestError {
    pub code: &'static str,
    pub message: String,
}

impl RequestError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        RequestError {
            code,
            message: message.into(),
        }
    }
}

impl From<auth::AccessError> for RequestError {
    fn from(e: auth::AccessError) -> Self {
        RequestError::new(e.code, e.message)
    }
}

impl From<crate::transform::PayloadError> for RequestError {
    fn from(e: crate::transform::PayloadError) -> Self {
        RequestError::new("invalid_payload", e.0)
    }
}

impl From<BackendError> for RequestError {
    fn from(e: BackendError) -> Self {
        RequestError::new(e.code(), e.to_string())
    }
}

/// A running backend as the hub knows it.
pub struct BackendHandle {
    /// Its name in the config.
    pub name: String,
    /// Its `type`, for messages.
    pub kind: &'static str,
    pub capabilities: Capabilities,
    pub backend: Arc<dyn Backend>,
}

struct BackendSlot {
    handle: BackendHandle,
    metrics: BackendMetrics,
}

impl std::ops::Deref for BackendSlot {
    type Target = BackendHandle;

    fn deref(&self) -> &BackendHandle {
        &self.handle
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct UpstreamKey {
    backend: usize,
    route: usize,
    filter: String,
    key: Option<String>,
    /// Non-zero for subscriptions with their own start position, which are never shared.
    private: u64,
}

struct Upstream {
    id: UpstreamId,
    key: UpstreamKey,
    start: StartPosition,
    fanout: Arc<Fanout>,
    /// Whether the backend holds this subscription; also serialises subscribe/unsubscribe.
    subscribed: tokio::sync::Mutex<bool>,
}

/// A client's membership in an upstream subscription.
pub struct SubscriptionHandle {
    upstream: Arc<Upstream>,
    route: Arc<Route>,
    pattern: ChannelPattern,
    member: Member,
}

impl SubscriptionHandle {
    pub fn pattern(&self) -> &ChannelPattern {
        &self.pattern
    }

    /// Whether it started elsewhere than at the latest message (a replay, never shared).
    pub fn is_replay(&self) -> bool {
        self.upstream.key.private != 0
    }
}

/// One upstream subscription as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamInfo {
    /// The backend's name.
    pub backend: String,
    /// The topic filter (or queue, or Kafka topic) subscribed at the broker.
    pub topic: String,
    /// The Kafka key the route filters on, if any.
    pub key: Option<String>,
    /// The route's channel template.
    pub channel: String,
    /// Client subscriptions sharing it.
    pub subscribers: usize,
    /// A replay with its own start position (never shared).
    pub replay: bool,
    /// Broker messages received on it.
    pub messages_in: u64,
    /// Message frames queued from it to clients.
    pub messages_out: u64,
}

/// A routed, authorised and transformed publish, ready for its backend.
pub struct PreparedPublish {
    backend: usize,
    publish: Publish,
    /// When tracing: when the gateway got the publish, and its route's channel template.
    traced: Option<(SystemTime, String)>,
}

/// The fan-out core shared by every connection.
pub struct Hub {
    router: Arc<Router>,
    policy: Arc<Policy>,
    backends: Vec<BackendSlot>,
    upstreams: Mutex<HashMap<UpstreamKey, Arc<Upstream>>>,
    next_id: AtomicU64,
    request_timeout: Duration,
    /// Most replay subscriptions (`from` other than latest) at once; 0 = no limit.
    max_replays: usize,
    replays: AtomicUsize,
    metrics: Arc<Metrics>,
    telemetry: Option<Arc<Telemetry>>,
}

/// The hub's own settings.
#[derive(Debug, Clone, Copy)]
pub struct HubSettings {
    /// Longest wait for a backend to answer a subscribe or publish.
    pub request_timeout: Duration,
    /// Most replay subscriptions in the whole gateway at once (0 = no limit).
    pub max_replays: usize,
}

impl Hub {
    /// A hub over built backends, given in the router's backend order.
    pub fn new(
        router: Arc<Router>,
        policy: Arc<Policy>,
        backends: Vec<BackendHandle>,
        settings: HubSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let backends = backends
            .into_iter()
            .map(|handle| BackendSlot {
                metrics: metrics.backend(&handle.name),
                handle,
            })
            .collect();
        Hub {
            router,
            policy,
            backends,
            upstreams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            request_timeout: settings.request_timeout,
            max_replays: settings.max_replays,
            replays: AtomicUsize::new(0),
            metrics,
            telemetry: None,
        }
    }

    /// Traces publishes and deliveries with `telemetry` (see [`crate::telemetry`]).
    pub fn with_telemetry(mut self, telemetry: Option<Arc<Telemetry>>) -> Self {
        self.telemetry = telemetry;
        self
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<UpstreamKey, Arc<Upstream>>> {
        self.upstreams.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether every backend is connected.
    pub fn is_ready(&self) -> bool {
        self.backends
            .iter()
            .all(|b| b.backend.health().borrow().is_up())
    }

    /// Each backend's name and health, in config order.
    pub fn backend_health(&self) -> Vec<(String, Health)> {
        self.backends
            .iter()
            .map(|b| (b.name.clone(), b.backend.health().borrow().clone()))
            .collect()
    }

    /// Subscribes a connection to a client pattern, sharing an upstream subscription with every
    /// other connection on the same filter.
    pub async fn subscribe(
        &self,
        member: Member,
        pattern: ChannelPattern,
        start: StartPosition,
        principal: &Principal,
    ) -> Result<SubscriptionHandle, RequestError> {
        let resolved =
            self.policy
                .authorize(&self.router, principal, Operation::Subscribe, &pattern)?;
        let route = resolved.route;
        let slot = &self.backends[route.backend];
        if start != StartPosition::Latest && !slot.capabilities.replay {
            return Err(RequestError::new(
                "unsupported",
                format!(
                    "{} backend {:?} keeps no message history; only \"from\": \"latest\" is possible",
                    slot.kind, slot.name
                ),
            ));
        }
        let private = match start {
            StartPosition::Latest => 0,
            _ => {
                // Released with the subscription's handle (see `release`).
                let held = self.replays.fetch_add(1, Ordering::Relaxed);
                if self.max_replays != 0 && held >= self.max_replays {
                    self.replays.fetch_sub(1, Ordering::Relaxed);
                    return Err(RequestError::new(
                        "too_many_replays",
                        format!(
                            "the gateway holds {} replay subscriptions (limits.max_replays); subscribe from \"latest\" or try again later",
                            self.max_replays
                        ),
                    ));
                }
                self.next_id.fetch_add(1, Ordering::Relaxed)
            }
        };
        let key = UpstreamKey {
            backend: route.backend,
            route: route.index,
            filter: resolved.topic.text,
            key: resolved.key,
            private,
        };
        let (upstream, shared) = {
            let mut table = self.table();
            let mut shared = true;
            let upstream = table.entry(key.clone()).or_insert_with(|| {
                shared = false;
                Arc::new(Upstream {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    key,
                    start,
                    fanout: Arc::new(
                        Fanout::new(slot.metrics.clone(), self.metrics.clone())
                            .traced(self.telemetry.clone(), &slot.name),
                    ),
                    subscribed: tokio::sync::Mutex::new(false),
                })
            });
            upstream.fanout.add(&route, &pattern, member.clone());
            (upstream.clone(), shared)
        };
        if shared && slot.capabilities.retained {
            // The broker sends nothing new for a client joining an existing upstream; the
            // backend hands it what the broker would have (MQTT retained messages).
            let sink = upstream.fanout.member_sink(&route, &pattern, &member);
            slot.backend.joined(upstream.id, sink);
        }
        let handle = SubscriptionHandle {
            upstream,
            route,
            pattern,
            member,
        };

        let upstream = handle.upstream.clone();
        let mut subscribed = upstream.subscribed.lock().await;
        if !*subscribed {
            let request = Subscription {
                id: upstream.id,
                route: upstream.key.route,
                filter: upstream.key.filter.clone(),
                key: upstream.key.key.clone(),
                start: upstream.start.clone(),
                sink: upstream.fanout.clone(),
            };
            let result =
                tokio::time::timeout(self.request_timeout, slot.backend.subscribe(request))
                    .await
                    .unwrap_or(Err(BackendError::Timeout(self.request_timeout)));
            match result {
                Ok(()) => {
                    *subscribed = true;
                    slot.metrics.upstreams.inc();
                }
                Err(e) => {
                    if matches!(e, BackendError::Timeout(_)) {
                        // The broker may still complete it; make sure it does not linger.
                        let _ = slot.backend.unsubscribe(upstream.id).await;
                    }
                    drop(subscribed);
                    self.release(&handle).await;
                    return Err(e.into());
                }
            }
        }
        drop(subscribed);
        Ok(handle)
    }

    /// The routes `principal` may use, with what it may do on each (`GET /routes`).
    pub fn usable_routes(&self, principal: &Principal) -> Vec<auth::UsableRoute> {
        self.policy.usable_routes(&self.router, principal)
    }

    /// Whether `principal` may still hold a subscription to `pattern` (after a token refresh).
    pub fn may_subscribe(&self, principal: &Principal, pattern: &ChannelPattern) -> bool {
        self.policy
            .authorize(&self.router, principal, Operation::Subscribe, pattern)
            .is_ok()
    }

    /// Ends a connection's membership; the upstream is released with its last member.
    pub async fn unsubscribe(&self, handle: SubscriptionHandle) {
        self.release(&handle).await;
    }

    async fn release(&self, handle: &SubscriptionHandle) {
        let upstream = &handle.upstream;
        if handle.is_replay() {
            self.replays.fetch_sub(1, Ordering::Relaxed);
        }
        if upstream
            .fanout
            .remove(&handle.route, &handle.pattern, &handle.member)
            > 0
        {
            return;
        }
        let slot = &self.backends[upstream.key.backend];
        let mut subscribed = upstream.subscribed.lock().await;
        if upstream.fanout.member_count() > 0 {
            return;
        }
        if *subscribed {
            let result =
                tokio::time::timeout(self.request_timeout, slot.backend.unsubscribe(upstream.id))
                    .await
                    .unwrap_or(Err(BackendError::Timeout(self.request_timeout)));
            if let Err(e) = result {
                tracing::warn!(backend = %slot.name, filter = %upstream.key.filter, error = %e, "upstream unsubscribe failed");
            }
            *subscribed = false;
            slot.metrics.upstreams.dec();
        }
        let mut table = self.table();
        let same = table
            .get(&upstream.key)
            .is_some_and(|u| Arc::ptr_eq(u, upstream));
        if same && upstream.fanout.member_count() == 0 {
            table.remove(&upstream.key);
        }
    }

    /// Routes, authorises and transforms a publish.
    pub fn prepare_publish(
        &self,
        principal: &Principal,
        channel: &ChannelPattern,
        payload: ClientPayload,
        key: Option<String>,
        headers: Vec<(String, String)>,
        partition: Option<i32>,
    ) -> Result<PreparedPublish, RequestError> {
        let resolved =
            self.policy
                .authorize(&self.router, principal, Operation::Publish, channel)?;
        let route = &resolved.route;
        let slot = &self.backends[route.backend];
        let unsupported = |what: &str| {
            RequestError::new(
                "unsupported",
                format!(
                    "{} backend {:?} has no {what}; leave {what:?} out",
                    slot.kind, slot.name
                ),
            )
        };
        if key.is_some() && !slot.capabilities.keys {
            return Err(unsupported("key"));
        }
        if partition.is_some() && !slot.capabilities.partitions {
            return Err(unsupported("partition"));
        }
        let key = match (resolved.key, key) {
            (Some(routed), Some(given)) if routed != given => {
                return Err(RequestError::new(
                    "invalid_frame",
                    format!(
                        "key {given:?} conflicts with the key {routed:?} this channel's route sets"
                    ),
                ));
            }
            (Some(routed), _) => Some(routed),
            (None, given) => given,
        };
        let traced = self
            .telemetry
            .as_ref()
            .map(|_| (SystemTime::now(), route.channel.as_str().to_owned()));
        Ok(PreparedPublish {
            backend: route.backend,
            traced,
            publish: Publish {
                route: route.index,
                topic: resolved.topic.text,
                key,
                payload: route.encode_publish(payload)?,
                headers,
                partition,
            },
        })
    }

    /// Hands a prepared publish to its backend and waits for the broker's acknowledgement.
    pub async fn publish(&self, prepared: PreparedPublish) -> Result<PublishReceipt, RequestError> {
        let slot = &self.backends[prepared.backend];
        let mut publish = prepared.publish;
        let span = match (&self.telemetry, prepared.traced) {
            (Some(telemetry), Some((started, channel))) => {
                let span = telemetry.publish(started, &publish.headers, &slot.name, &channel);
                span.carry(&mut publish.headers);
                Some(span)
            }
            _ => None,
        };
        let result = tokio::time::timeout(self.request_timeout, slot.backend.publish(publish))
            .await
            .unwrap_or(Err(BackendError::Timeout(self.request_timeout)));
        match &result {
            Ok(_) => slot.metrics.publishes_ok.inc(),
            Err(e) => slot.metrics.publish_failed(e.code()),
        }
        let result = result.map_err(RequestError::from);
        if let Some(span) = span {
            span.finish(match &result {
                Ok(_) => Ok(()),
                Err(e) => Err((e.code, &e.message)),
            });
        }
        result
    }

    /// Watches every backend's health until `shutdown`, sending `backend_down`/`backend_up`
    /// status frames to the connections subscribed through it.
    pub async fn watch_health(self: Arc<Self>, shutdown: CancellationToken) {
        let mut watchers = tokio::task::JoinSet::new();
        for index in 0..self.backends.len() {
            let hub = self.clone();
            let shutdown = shutdown.clone();
            watchers.spawn(async move {
                let mut health: watch::Receiver<Health> = hub.backends[index].backend.health();
                let mut was_up = health.borrow_and_update().is_up();
                // The first connection (a backend may start down) is not a reconnect.
                let mut ever_up = was_up;
                hub.backends[index].metrics.up.set(was_up as i64);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        changed = health.changed() => if changed.is_err() { return },
                    }
                    let now = health.borrow_and_update().clone();
                    if now.is_up() != was_up {
                        was_up = now.is_up();
                        if was_up && ever_up {
                            hub.backends[index].metrics.reconnects.inc();
                        }
                        ever_up |= was_up;
                        hub.backends[index].metrics.up.set(was_up as i64);
                        hub.announce_health(index, &now);
                    }
                }
            });
        }
        while watchers.join_next().await.is_some() {}
    }

    fn announce_health(&self, index: usize, health: &Health) {
        let name = &self.backends[index].name;
        let (code, message) = match health {
            Health::Up => ("backend_up", format!("backend {name} is connected again")),
            Health::Down { reason } => (
                "backend_down",
                format!("backend {name} is unavailable: {reason}"),
            ),
        };
        match health {
            Health::Up => tracing::info!(backend = %name, "backend up"),
            Health::Down { reason } => tracing::warn!(backend = %name, %reason, "backend down"),
        }
        let upstreams: Vec<Arc<Upstream>> = self
            .table()
            .values()
            .filter(|u| u.key.backend == index)
            .cloned()
            .collect();
        let mut sessions: HashMap<u64, (Member, Vec<String>)> = HashMap::new();
        for upstream in upstreams {
            for (member, pattern) in upstream.fanout.memberships() {
                sessions
                    .entry(member.session)
                    .or_insert_with(|| (member, Vec::new()))
                    .1
                    .push(pattern);
            }
        }
        for (member, mut patterns) in sessions.into_values() {
            patterns.sort();
            patterns.dedup();
            member.send_status(&Status {
                code,
                message: message.clone(),
                backend: Some(name.clone()),
                subscriptions: patterns,
                ..Status::default()
            });
        }
    }

    /// Closes every backend.
    pub async fn close(&self) {
        for slot in &self.backends {
            slot.backend.close().await;
        }
    }

    /// Distinct upstream subscriptions held per backend, by name (for introspection).
    pub fn upstream_counts(&self) -> Vec<(String, usize)> {
        self.backends
            .iter()
            .map(|b| (b.name.clone(), b.backend.upstream_count()))
            .collect()
    }

    /// Every upstream subscription, by backend and topic.
    pub fn upstreams(&self) -> Vec<UpstreamInfo> {
        let upstreams: Vec<Arc<Upstream>> = self.table().values().cloned().collect();
        let routes = self.router.routes();
        let mut all: Vec<UpstreamInfo> = upstreams
            .iter()
            .map(|u| {
                let (messages_in, messages_out) = u.fanout.message_counts();
                UpstreamInfo {
                    backend: self.backends[u.key.backend].name.clone(),
                    topic: u.key.filter.clone(),
                    key: u.key.key.clone(),
                    channel: routes
                        .get(u.key.route)
                        .map(|r| r.channel.as_str().to_owned())
                        .unwrap_or_default(),
                    subscribers: u.fanout.member_count(),
                    replay: u.key.private != 0,
                    messages_in,
                    messages_out,
                }
            })
            .collect();
        all.sort_by(|a, b| (&a.backend, &a.topic, &a.key).cmp(&(&b.backend, &b.topic, &b.key)));
        all
    }

    /// Sessions subscribed per upstream (for tests and introspection).
    pub fn sessions_per_upstream(&self) -> Vec<usize> {
        self.table()
            .values()
            .map(|u| u.fanout.member_count())
            .collect()
    }
}
