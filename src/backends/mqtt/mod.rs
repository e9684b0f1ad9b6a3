//! `type = "mqtt"`: an MQTT 5 or 3.1.1 broker through rumqttc.
//!
//! # How it works
//!
//! One MQTT connection per backend, owned by the [`driver`] task, which polls rumqttc's event
//! loop without pause: incoming messages go straight to the upstreams' sinks, which queue per
//! client and never block, so a slow browser cannot stall the connection.
//!
//! The core asks for one upstream per distinct (route, filter); the [`table`] keeps one MQTT
//! subscription per distinct filter on top of that, so the broker sees each filter once. With
//! MQTT 5 every subscription carries its own subscription identifier and the broker stamps each
//! message copy with the identifiers it matched, so overlapping filters (`a/#` and `a/+`) never
//! deliver a message twice to the same subscription. MQTT 3.1.1 has no identifiers: messages
//! are matched against the filters locally (Mosquitto sends a 3.1.1 client one copy however
//! many of its subscriptions match).
//!
//! A client publish goes out with its route's QoS and retain flag; the backend answers once
//! the broker has acknowledged it (PUBACK for QoS 1, PUBCOMP for QoS 2, written to the socket
//! for QoS 0), or with the broker's refusal. Requests made while the broker is unreachable fail
//! with `backend_unavailable` at once, or after `unavailable_wait` if the link is not back by
//! then.
//!
//! After a lost connection the driver reconnects with exponential backoff, makes every wanted
//! subscription again and reports `Up`; in between [`Backend::health`] says `Down`, which the
//! core turns into `status` frames and `/readyz`. Sessions are clean unless
//! `persistent_session` is on: then every connection after the process's first resumes the
//! broker session, and the messages of QoS 1 and 2 subscriptions the broker queued meanwhile
//! arrive after the reconnection. Publishes in flight are never resent by the gateway either
//! way: their clients were told `backend_unavailable`.

mod client;
mod config;
mod driver;
mod table;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

pub use config::{MqttConfig, ProtocolVersion, Qos, RouteOptions};

use super::adapter::{
    Backend, BackendError, BackendSettings, BuildContext, Capabilities, Health, Kind, MessageSink,
    Publish, PublishReceipt, Subscription, UpstreamId,
};
use crate::config::{ConfigProblem, RouteConfig};
use crate::routing::TopicSyntax;
use client::{Client, OutgoingPublish};
use driver::{Backoff, Expect, Shared};
use table::{Added, EntryState};

/// MQTT topics: `/`-separated levels, `+` for one level, `#` last for the rest.
pub const MQTT_TOPIC: TopicSyntax = TopicSyntax {
    name: "MQTT topic",
    ..TopicSyntax::SLASH
};

/// `type = "mqtt"`.
pub const KIND: Kind = Kind {
    name: "mqtt",
    parse: |table, path, problems| {
        MqttConfig::parse(table, path, problems).map(|c| c as Box<dyn BackendSettings>)
    },
};

impl BackendSettings for MqttConfig {
    fn topic_syntax(&self) -> TopicSyntax {
        MQTT_TOPIC
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            retained: true,
            ..Capabilities::default()
        }
    }

    fn check_route(&self, route: &RouteConfig, path: &str, problems: &mut Vec<ConfigProblem>) {
        RouteOptions::parse(route, self.protocol, path, problems);
    }

    fn build(&self, cx: BuildContext<'_>) -> Result<Arc<dyn Backend>, BackendError> {
        Ok(Arc::new(MqttBackend::start(self, cx)?))
    }
}

/// How long `close` waits for the DISCONNECT to go out before dropping the connection.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A connection to one MQTT broker.
pub struct MqttBackend {
    shared: Arc<Shared>,
    /// Publish settings per route index.
    routes: HashMap<usize, RouteOptions>,
    max_packet_size: u32,
    unavailable_wait: Duration,
    driver: Mutex<Option<JoinHandle<()>>>,
    stop: CancellationToken,
    /// Stops the driver if the backend is dropped without `close`.
    _guard: DropGuard,
}

impl MqttBackend {
    /// Starts the connection task; connecting happens in the background.
    pub fn start(config: &MqttConfig, cx: BuildContext<'_>) -> Result<Self, BackendError> {
        let mut problems: Vec<ConfigProblem> = Vec::new();
        let mut routes = HashMap::new();
        for (index, route) in &cx.routes {
            let path = format!("routes[{index}]");
            if let Some(options) = RouteOptions::parse(route, config.protocol, &path, &mut problems)
            {
                routes.insert(*index, options);
            }
        }
        if !problems.is_empty() {
            let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return Err(BackendError::Failed(problems.join("; ")));
        }

        let address = config.address().map_err(BackendError::Failed)?;
        let client_id = client::client_id(&config.client_id_prefix);
        let (mqtt_client, eventloop) = client::build(config, client_id.clone())?;
        let shared = Arc::new(Shared::new(
            address.to_string(),
            config.protocol,
            config.max_packet_size,
            config.retained_cache_size,
            config.persistent_session,
            mqtt_client,
        ));
        let stop = CancellationToken::new();
        let span = tracing::info_span!("mqtt", backend = %cx.name, %client_id);
        let backoff = Backoff {
            min: config.reconnect_min_delay,
            max: config.reconnect_max_delay,
        };
        let driver = tokio::spawn(
            driver::supervise(shared.clone(), eventloop, backoff, stop.clone(), cx.panics)
                .instrument(span),
        );
        Ok(MqttBackend {
            shared,
            routes,
            max_packet_size: config.max_packet_size,
            unavailable_wait: config.unavailable_wait,
            driver: Mutex::new(Some(driver)),
            _guard: stop.clone().drop_guard(),
            stop,
        })
    }

    fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Waits up to `unavailable_wait` for the connection; the caller checks the outcome under
    /// the link lock.
    async fn wait_for_connection(&self) {
        if self.unavailable_wait.is_zero() || self.shared.health.borrow().is_up() {
            return;
        }
        let mut health = self.shared.health.subscribe();
        let _ = tokio::time::timeout(self.unavailable_wait, health.wait_for(Health::is_up)).await;
    }

    fn queue_full() -> BackendError {
        BackendError::Unavailable(
            "too many requests are waiting for the MQTT connection; try again shortly".into(),
        )
    }
}

#[async_trait]
impl Backend for MqttBackend {
    async fn subscribe(&self, subscription: Subscription) -> Result<(), BackendError> {
        let qos = self
            .routes
            .get(&subscription.route)
            .map(|r| r.qos)
            .unwrap_or_default();
        self.wait_for_connection().await;

        let (tx, rx) = oneshot::channel();
        {
            let mut table = self.shared.table_mut();
            let mut link = self.shared.link();
            if link.closing {
                return Err(BackendError::Unavailable("the backend is closing".into()));
            }
            if !link.connected {
                return Err(self.shared.unavailable());
            }
            let filter = subscription.filter.as_str();
            let sink = subscription.sink.clone();
            match table.add(subscription.id, filter, qos, subscription.sink, tx) {
                Added::Active => {
                    // Shares a subscription another route made: no retained messages come from
                    // the broker for it, so hand over the ones kept.
                    if let Some(entry) = table.entry_of(subscription.id) {
                        entry.replay_retained(sink.as_ref());
                    }
                    return Ok(());
                }
                Added::Waiting => {}
                Added::New { id, qos } => {
                    let ids = link.use_ids.then_some(id);
                    if self.client().try_subscribe(filter, qos, ids).is_err() {
                        if table.remove(subscription.id).is_none()
                            && let Some(entry) = table.get_mut(filter, id)
                        {
                            entry.state = EntryState::Refused;
                        }
                        return Err(Self::queue_full());
                    }
                    link.expected.push_back(Expect::Subscribe {
                        filter: filter.to_owned(),
                        id,
                    });
                }
            }
        }
        rx.await.unwrap_or_else(|_| {
            Err(BackendError::Failed(
                "the MQTT connection task stopped before the broker answered".into(),
            ))
        })
    }

    async fn unsubscribe(&self, id: UpstreamId) -> Result<(), BackendError> {
        let mut table = self.shared.table_mut();
        let Some(entry) = table.remove(id) else {
            return Ok(());
        };
        let held = matches!(entry.state, EntryState::Active | EntryState::Subscribing(_));
        let mut link = self.shared.link();
        if held && link.connected {
            if self.client().try_unsubscribe(&entry.filter).is_err() {
                // Its messages find no entry and are dropped; the next reconnect clears it.
                tracing::warn!(filter = %entry.filter, "could not queue an MQTT UNSUBSCRIBE");
            } else {
                link.expected.push_back(Expect::Unsubscribe);
            }
        }
        Ok(())
    }

    async fn publish(&self, publish: Publish) -> Result<PublishReceipt, BackendError> {
        if self.shared.protocol == ProtocolVersion::V311 && !publish.headers.is_empty() {
            return Err(BackendError::Unsupported(
                "headers need MQTT 5 user properties, and this backend speaks MQTT 3.1.1".into(),
            ));
        }
        let route = self.routes.get(&publish.route).cloned().unwrap_or_default();
        let outgoing = OutgoingPublish {
            topic: &publish.topic,
            qos: route.qos,
            retain: route.retain,
            payload: publish.payload,
            headers: publish.headers,
            content_type: route.content_type,
        };
        let size = self.client().packet_size(&outgoing);
        self.wait_for_connection().await;

        let (tx, rx) = oneshot::channel();
        {
            let mut link = self.shared.link();
            if link.closing {
                return Err(BackendError::Unavailable("the backend is closing".into()));
            }
            if !link.connected {
                return Err(self.shared.unavailable());
            }
            let granted = link.granted;
            let limit = granted
                .max_packet_size
                .map_or(self.max_packet_size, |broker| {
                    broker.min(self.max_packet_size)
                });
            if size > limit as usize {
                return Err(BackendError::Rejected {
                    code: "message_too_large",
                    message: format!(
                        "the MQTT message would be {size} bytes; the limit is {limit} bytes"
                    ),
                });
            }
            if outgoing.qos > granted.max_qos {
                return Err(BackendError::Rejected {
                    code: "rejected",
                    message: format!(
                        "the MQTT broker accepts QoS up to {}; this route publishes with QoS {}",
                        granted.max_qos.level(),
                        outgoing.qos.level()
                    ),
                });
            }
            if outgoing.retain && !granted.retain_available {
                return Err(BackendError::Rejected {
                    code: "rejected",
                    message: "the MQTT broker does not keep retained messages".into(),
                });
            }
            self.client()
                .try_publish(outgoing)
                .map_err(|_| Self::queue_full())?;
            link.expected.push_back(Expect::Publish(tx));
        }
        match rx.await {
            Ok(result) => result.map(|()| PublishReceipt::default()),
            Err(_) => Err(BackendError::Failed(
                "the MQTT connection task stopped before the broker answered".into(),
            )),
        }
    }

    fn joined(&self, id: UpstreamId, sink: Arc<dyn MessageSink>) {
        // While the subscription is still being made, the broker's retained messages are yet to
        // come and reach every client on it, the new one included.
        let table = self.shared.table();
        if let Some(entry) = table.entry_of(id)
            && matches!(entry.state, EntryState::Active)
        {
            entry.replay_retained(sink.as_ref());
        }
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.shared.health.subscribe()
    }

    fn upstream_count(&self) -> usize {
        self.shared.table().active_count()
    }

    async fn close(&self) {
        let connected = {
            let mut link = self.shared.link();
            link.closing = true;
            link.connected
        };
        let driver = self.driver.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut driver) = driver else {
            return;
        };
        // Say goodbye to the broker (the driver stops once the DISCONNECT is out); without a
        // connection, or if that takes too long, just stop.
        let goodbye = connected && self.client().try_disconnect().is_ok();
        if !goodbye || tokio::time::timeout(CLOSE_WAIT, &mut driver).await.is_err() {
            self.stop.cancel();
            let _ = driver.await;
        }
    }
}
