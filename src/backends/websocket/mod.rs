//! `type = "websocket"`: an upstream WebSocket service with one connection per topic.
//!
//! # How it works
//!
//! The backend's `url` has a `{topic}` placeholder; each topic is one upstream connection to that
//! URL with the topic percent-encoded into it. The core asks for one upstream subscription per
//! distinct (route, topic); the backend keeps one [`Link`] per topic on top of that, so the
//! upstream sees one connection however many clients (and routes) want the topic. The link's
//! task ([`connection::supervise`]) owns the socket: each text or binary message from the
//! upstream becomes a [`BrokerMessage`] on the topic, handed to every sink on it.
//!
//! A subscription opens the topic's connection if it is not open and resolves once it is (or
//! fails with `backend_unavailable` when the first attempt fails or `connect_timeout` passes).
//! The last unsubscribe closes it (close code 1001). A lost connection is reopened with
//! exponential backoff while subscribers remain.
//!
//! [`Backend::health`] is `Down` while any topic that has subscribers and has been connected is
//! not connected, with a reason naming the topics; `Up` otherwise (also with no topics at all:
//! nothing is opened before a client subscribes).
//!
//! A client publish is written on its topic's connection, as text when the route's format is
//! `json` or `text` and the payload is valid UTF-8, as binary otherwise, and resolves once the
//! frame is flushed to the socket: WebSocket has no acknowledgement. With no open connection
//! for the topic (nobody subscribed, or it is reconnecting) the publish fails with
//! `backend_unavailable`.

mod config;
mod connection;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::WebsocketConfig;

use super::adapter::{
    Backend, BackendError, BackendSettings, BuildContext, Capabilities, Health, Kind, Publish,
    PublishReceipt, Subscription, UpstreamId,
};
use crate::routing::TopicSyntax;
use connection::{Link, LinkState, Outgoing};

/// Topics of a WebSocket upstream: one opaque name per connection, no wildcards. A value may
/// hold any character but control characters: it is percent-encoded into the URL.
pub const WEBSOCKET_TOPIC: TopicSyntax = TopicSyntax {
    name: "WebSocket topic",
    separator: None,
    single_wildcard: None,
    multi_wildcard: None,
    max_len: 1024,
    value_char: |c| !c.is_control(),
};

/// `type = "websocket"`.
pub const KIND: Kind = Kind {
    name: "websocket",
    parse: |table, path, problems| {
        WebsocketConfig::parse(table, path, problems).map(|c| c as Box<dyn BackendSettings>)
    },
};

impl BackendSettings for WebsocketConfig {
    fn topic_syntax(&self) -> TopicSyntax {
        WEBSOCKET_TOPIC
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn build(&self, cx: BuildContext<'_>) -> Result<Arc<dyn Backend>, BackendError> {
        Ok(Arc::new(WebsocketBackend::start(self, cx)?))
    }
}

/// Publishes waiting to be written on one topic's connection.
const PUBLISH_QUEUE: usize = 256;
/// How long `close` waits for the connections to send their close frames.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// Topics named in a `Down` reason; the rest are counted.
const REASON_TOPICS: usize = 3;
/// Publish headers the gateway adds itself (trace context); WebSocket messages have no
/// headers, so these are left out rather than refused.
const DROPPED_HEADERS: &[&str] = &["traceparent", "tracestate"];

/// What the backend and every topic's task share.
pub struct Shared {
    config: WebsocketConfig,
    tls: Option<TlsConnector>,
    links: Mutex<Links>,
    health: watch::Sender<Health>,
    panics: prometheus::IntCounter,
}

#[derive(Default)]
struct Links {
    by_topic: HashMap<String, Arc<Link>>,
    topic_of: HashMap<UpstreamId, String>,
    closing: bool,
}

impl Shared {
    fn links(&self) -> MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Recomputes the backend's health from its links: `Down` while a topic with subscribers
    /// that has been connected is not connected now.
    fn refresh_health(&self) {
        let links: Vec<Arc<Link>> = self.links().by_topic.values().cloned().collect();
        let mut down: Vec<String> = links
            .iter()
            .filter(|link| link.sink_count() > 0)
            .filter_map(|link| match &*link.state.borrow() {
                LinkState::Connecting {
                    was_open: true,
                    reason,
                    ..
                } => Some(format!(
                    "topic {:?} ({}): {}",
                    link.topic,
                    link.url,
                    reason.as_deref().unwrap_or("reconnecting")
                )),
                _ => None,
            })
            .collect();
        down.sort();
        let health = match down.len() {
            0 => Health::Up,
            1 => Health::Down {
                reason: down.remove(0),
            },
            n => {
                let more = n.saturating_sub(REASON_TOPICS);
                down.truncate(REASON_TOPICS);
                let mut reason = format!("{n} topics are not connected: {}", down.join("; "));
                if more > 0 {
                    reason.push_str(&format!("; and {more} more"));
                }
                Health::Down { reason }
            }
        };
        self.health.send_if_modified(|now| {
            let changed = *now != health;
            *now = health;
            changed
        });
    }
}

/// An upstream WebSocket service: one connection per subscribed topic.
pub struct WebsocketBackend {
    shared: Arc<Shared>,
    /// Routes whose publishes go out as text when the payload is UTF-8 (format json or text).
    text_routes: HashSet<usize>,
    tasks: TaskTracker,
    stop: CancellationToken,
    span: tracing::Span,
    /// Stops every connection if the backend is dropped without `close`.
    _guard: DropGuard,
}

impl WebsocketBackend {
    /// Prepares the backend; no connection is opened before a client subscribes.
    pub fn start(config: &WebsocketConfig, cx: BuildContext<'_>) -> Result<Self, BackendError> {
        let text_routes = cx
            .routes
            .iter()
            .filter(|(_, route)| {
                matches!(route.format.as_deref(), None | Some("json") | Some("text"))
            })
            .map(|(index, _)| *index)
            .collect();
        let tls = if config.url.starts_with("wss://") {
            Some(tls_connector()?)
        } else {
            None
        };
        let stop = CancellationToken::new();
        Ok(WebsocketBackend {
            shared: Arc::new(Shared {
                config: config.clone(),
                tls,
                links: Mutex::new(Links::default()),
                health: watch::Sender::new(Health::Up),
                panics: cx.panics,
            }),
            text_routes,
            tasks: TaskTracker::new(),
            _guard: stop.clone().drop_guard(),
            stop,
            span: tracing::info_span!("websocket", backend = %cx.name),
        })
    }

    /// The topic's link, opening it if there is none; the subscription's sink joins it.
    fn join(&self, subscription: &Subscription) -> Result<Arc<Link>, BackendError> {
        let topic = &subscription.filter;
        let mut links = self.shared.links();
        if links.closing {
            return Err(BackendError::Unavailable("the backend is closing".into()));
        }
        let link = match links.by_topic.get(topic) {
            Some(link) => link.clone(),
            None => {
                let url = self.shared.config.topic_url(topic);
                let (link, outgoing) = Link::new(
                    topic.clone(),
                    url.clone(),
                    self.stop.child_token(),
                    PUBLISH_QUEUE,
                );
                let span =
                    tracing::info_span!(parent: &self.span, "upstream", topic = %topic, %url);
                self.tasks.spawn(
                    connection::supervise(self.shared.clone(), link.clone(), outgoing)
                        .instrument(span),
                );
                links.by_topic.insert(topic.clone(), link.clone());
                link
            }
        };
        link.add_sink(subscription.id, subscription.sink.clone());
        links.topic_of.insert(subscription.id, topic.clone());
        Ok(link)
    }

    /// Removes a subscription's sink; the topic's connection closes with its last sink.
    fn leave(&self, id: UpstreamId) {
        let emptied = {
            let mut links = self.shared.links();
            let Some(topic) = links.topic_of.remove(&id) else {
                return;
            };
            match links.by_topic.get(&topic) {
                Some(link) if link.remove_sink(id) == 0 => links.by_topic.remove(&topic),
                _ => None,
            }
        };
        if let Some(link) = emptied {
            link.cancel.cancel();
        }
        self.shared.refresh_health();
    }

    /// Waits until `link` is open; fails when an attempt made after the call fails, or after
    /// `connect_timeout` and a little more (an attempt in progress has that long to finish).
    async fn wait_open(&self, link: &Link) -> Result<(), String> {
        let mut state = link.state.subscribe();
        let failures_before = match &*state.borrow() {
            LinkState::Connecting { failures, .. } => *failures,
            _ => 0,
        };
        let wait = self.shared.config.connect_timeout + Duration::from_millis(500);
        let outcome = tokio::time::timeout(wait, async {
            loop {
                match &*state.borrow_and_update() {
                    LinkState::Open => return Ok(()),
                    LinkState::Closed => return Err("the connection was closed".to_string()),
                    LinkState::Connecting {
                        failures, reason, ..
                    } if *failures > failures_before => {
                        return Err(reason.clone().unwrap_or_else(|| "not connected".into()));
                    }
                    LinkState::Connecting { .. } => {}
                }
                if state.changed().await.is_err() {
                    return Err("the connection was closed".to_string());
                }
            }
        })
        .await;
        outcome.unwrap_or_else(|_| {
            Err(format!(
                "not connected within {}",
                humantime::format_duration(wait)
            ))
        })
    }
}

/// TLS for `wss://` upstreams, with the ring provider chosen explicitly (so it works whatever
/// other crates in the binary enable in rustls) and the system's trusted roots.
fn tls_connector() -> Result<TlsConnector, BackendError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A malformed system certificate must not keep the gateway from starting.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(BackendError::Failed(
            "no trusted CA certificates found on this system for wss:// upstreams".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BackendError::Failed(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[async_trait]
impl Backend for WebsocketBackend {
    async fn subscribe(&self, subscription: Subscription) -> Result<(), BackendError> {
        let link = self.join(&subscription)?;
        match self.wait_open(&link).await {
            Ok(()) => Ok(()),
            Err(reason) => {
                self.leave(subscription.id);
                Err(BackendError::Unavailable(format!(
                    "WebSocket upstream {} for topic {:?} is unreachable: {reason}",
                    link.url, link.topic
                )))
            }
        }
    }

    async fn unsubscribe(&self, id: UpstreamId) -> Result<(), BackendError> {
        self.leave(id);
        Ok(())
    }

    async fn publish(&self, publish: Publish) -> Result<PublishReceipt, BackendError> {
        if let Some((name, _)) = publish
            .headers
            .iter()
            .find(|(name, _)| !DROPPED_HEADERS.contains(&name.to_ascii_lowercase().as_str()))
        {
            return Err(BackendError::Unsupported(format!(
                "WebSocket messages have no headers; leave {name:?} out"
            )));
        }
        let link = self.shared.links().by_topic.get(&publish.topic).cloned();
        let Some(link) = link.filter(|link| link.is_open()) else {
            return Err(BackendError::Unavailable(format!(
                "no open upstream connection for topic {:?}: a topic's connection is open while a client is subscribed to it",
                publish.topic
            )));
        };
        let message = if self.text_routes.contains(&publish.route) {
            match Utf8Bytes::try_from(publish.payload.clone()) {
                Ok(text) => Message::Text(text),
                Err(_) => Message::Binary(publish.payload),
            }
        } else {
            Message::Binary(publish.payload)
        };
        let (done, written) = oneshot::channel();
        link.outgoing
            .try_send(Outgoing { message, done })
            .map_err(|e| {
                BackendError::Unavailable(match e {
                    tokio::sync::mpsc::error::TrySendError::Full(_) => format!(
                        "too many publishes are waiting for the upstream connection of topic {:?}; try again shortly",
                        link.topic
                    ),
                    tokio::sync::mpsc::error::TrySendError::Closed(_) => format!(
                        "the upstream connection of topic {:?} is closed",
                        link.topic
                    ),
                })
            })?;
        match written.await {
            Ok(result) => result.map(|()| PublishReceipt::default()),
            Err(_) => Err(BackendError::Unavailable(format!(
                "the upstream connection of topic {:?} closed before the message was written",
                link.topic
            ))),
        }
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.shared.health.subscribe()
    }

    fn upstream_count(&self) -> usize {
        self.shared
            .links()
            .by_topic
            .values()
            .filter(|link| link.is_open())
            .count()
    }

    async fn close(&self) {
        let links: Vec<Arc<Link>> = {
            let mut links = self.shared.links();
            links.closing = true;
            links.topic_of.clear();
            links.by_topic.drain().map(|(_, link)| link).collect()
        };
        for link in &links {
            link.cancel.cancel();
        }
        self.tasks.close();
        if tokio::time::timeout(CLOSE_WAIT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "some WebSocket upstream connections did not close in time; dropping them"
            );
        }
        self.stop.cancel();
        self.shared.refresh_health();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::adapter::{BrokerMessage, MessageSink, SubscriptionEvent};

    struct Nowhere;

    impl MessageSink for Nowhere {
        fn deliver(&self, _: BrokerMessage) {}
        fn event(&self, _: SubscriptionEvent) {}
    }

    fn shared() -> Shared {
        let table = toml::toml! { url = "ws://h:1/s/{topic}" };
        let mut problems = Vec::new();
        let config = WebsocketConfig::parse(toml::Value::Table(table), "b", &mut problems)
            .expect("valid settings");
        Shared {
            config: *config,
            tls: None,
            links: Mutex::new(Links::default()),
            health: watch::Sender::new(Health::Up),
            panics: prometheus::IntCounter::new("p", "p").unwrap(),
        }
    }

    fn link(shared: &Shared, topic: &str, id: UpstreamId, state: LinkState) -> Arc<Link> {
        let url = shared.config.topic_url(topic);
        let (link, _) = Link::new(topic.into(), url, CancellationToken::new(), 1);
        link.add_sink(id, Arc::new(Nowhere));
        link.state.send_replace(state);
        shared
            .links()
            .by_topic
            .insert(topic.to_owned(), link.clone());
        link
    }

    fn lost(reason: &str) -> LinkState {
        LinkState::Connecting {
            failures: 1,
            was_open: true,
            reason: Some(reason.into()),
        }
    }

    #[test]
    fn health_is_down_while_a_connected_topic_with_subscribers_is_not() {
        let shared = shared();
        link(&shared, "a", 1, LinkState::Open);
        let first = LinkState::Connecting {
            failures: 3,
            was_open: false,
            reason: Some("refused".into()),
        };
        let b = link(&shared, "b", 2, first);
        shared.refresh_health();
        assert!(
            shared.health.borrow().is_up(),
            "a first connection that fails is not an outage"
        );

        b.state.send_replace(lost("dropped"));
        shared.refresh_health();
        assert_eq!(
            *shared.health.borrow(),
            Health::Down {
                reason: "topic \"b\" (ws://h:1/s/b): dropped".into()
            }
        );

        for (topic, id) in [("c", 3), ("d", 4), ("e", 5)] {
            link(&shared, topic, id, lost("refused"));
        }
        shared.refresh_health();
        let Health::Down { reason } = shared.health.borrow().clone() else {
            panic!("down")
        };
        assert!(
            reason.starts_with("4 topics are not connected: topic \"b\"")
                && reason.ends_with("; and 1 more"),
            "{reason}"
        );

        // Topics nobody is subscribed to any more do not count.
        for (topic, id) in [("b", 2), ("c", 3), ("d", 4), ("e", 5)] {
            shared.links().by_topic[topic].remove_sink(id);
        }
        shared.refresh_health();
        assert!(shared.health.borrow().is_up());
    }
}
