//! rumqttc behind one interface for MQTT 5 and 3.1.1.
//!
//! rumqttc has a separate client, event loop and packet types per protocol version. This module
//! builds them from an [`MqttConfig`] and translates their events into [`LinkEvent`]s, so the
//! driver and the backend are written once. Requests go into rumqttc's bounded request channel
//! with `try_*` calls (never awaiting), which keeps their order equal to the order the caller
//! records them in; resubscriptions after a reconnect go into the event loop's own `pending`
//! queue, which rumqttc always serves first.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5 as packet5;
use rumqttc::{TlsConfiguration, Transport};

use super::config::{MqttConfig, ProtocolVersion, Qos, load_certificates, load_private_key};
pub use crate::backends::adapter::backoff;
use crate::backends::adapter::{BackendError, BrokerMessage, random_fraction};

/// Requests queued for the event loop at most; beyond this, requests fail with
/// `backend_unavailable` instead of waiting. The queue grows only as far as it is used.
const REQUEST_QUEUE: usize = 16 * 1024;

/// A publish as handed to rumqttc.
pub struct OutgoingPublish<'a> {
    pub topic: &'a str,
    pub qos: Qos,
    pub retain: bool,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    pub content_type: Option<String>,
}

/// The request side of the connection; cheap to clone.
#[derive(Clone)]
pub enum Client {
    V5(v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

/// The connection itself; must be polled continuously by one task.
pub enum EventLoop {
    V5(Box<v5::EventLoop>),
    V311(Box<rumqttc::EventLoop>),
}

/// A message received from the broker, with what the driver needs to route it.
#[derive(Debug)]
pub struct Incoming {
    pub message: BrokerMessage,
    /// Set on messages sent because a subscription was just made.
    pub retain: bool,
    /// MQTT 5 subscription identifiers: which of our subscriptions this copy is for.
    pub subscription_ids: Vec<usize>,
}

/// What the broker granted in its CONNACK.
#[derive(Debug, Clone, Copy)]
pub struct Granted {
    pub max_packet_size: Option<u32>,
    pub max_qos: Qos,
    pub retain_available: bool,
    pub subscription_ids_available: bool,
}

/// The events the driver acts on; everything else is [`LinkEvent::Other`].
#[derive(Debug)]
pub enum LinkEvent {
    Connected(Granted),
    Message(Box<Incoming>),
    /// A queued publish was written; `pkid` 0 for QoS 0.
    PublishSent(u16),
    /// A queued publish waits for a packet id to be acknowledged before it can go out.
    PublishParked(u16),
    SubscribeSent(u16),
    UnsubscribeSent,
    /// The broker finished a publish (PUBACK for QoS 1, PUBCOMP for QoS 2, or a refusing
    /// PUBREC), with its refusal if any.
    PublishDone {
        pkid: u16,
        refused: Option<BackendError>,
    },
    SubscribeDone {
        pkid: u16,
        refused: Option<BackendError>,
    },
    /// Our DISCONNECT went out: the connection is being closed on purpose.
    Disconnecting,
    Other,
}

/// Builds the client and its event loop; nothing connects until the event loop is polled.
pub fn build(config: &MqttConfig, client_id: String) -> Result<(Client, EventLoop), BackendError> {
    let address = config.address().map_err(BackendError::Failed)?;
    let transport = if address.tls {
        Transport::tls_with_config(tls_config(config)?)
    } else {
        Transport::tcp()
    };
    let connect_timeout = config.connect_timeout.as_secs().max(1);
    let credentials = config.username.as_ref().map(|user| {
        let password = config.password.as_ref().map(|p| p.0.clone());
        (user.clone(), password.unwrap_or_default())
    });
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(connect_timeout);

    Ok(match config.protocol {
        ProtocolVersion::V5 => {
            let mut options = v5::MqttOptions::new(client_id, address.host, address.port);
            options
                .set_keep_alive(config.keep_alive)
                .set_clean_start(true)
                .set_connection_timeout(connect_timeout)
                .set_max_packet_size(Some(config.max_packet_size))
                .set_transport(transport)
                .set_network_options(network);
            if config.persistent_session {
                // Validated to fit in u32 seconds.
                let expiry = u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX);
                options.set_session_expiry_interval(Some(expiry));
            }
            if let Some((user, password)) = credentials {
                options.set_credentials(user, password);
            }
            let (client, eventloop) = v5::AsyncClient::new(options, REQUEST_QUEUE);
            (Client::V5(client), EventLoop::V5(Box::new(eventloop)))
        }
        ProtocolVersion::V311 => {
            let mut options = rumqttc::MqttOptions::new(client_id, address.host, address.port);
            // A 3.1.1 broker cannot be told the limit; rumqttc would drop the connection on a
            // larger message (and a retained one would do it on every reconnect), so incoming
            // packets may have any size MQTT allows and the driver skips the large ones.
            options
                .set_keep_alive(config.keep_alive)
                .set_clean_session(true)
                .set_max_packet_size(
                    super::config::MQTT_MAX_PACKET_SIZE as usize,
                    config.max_packet_size as usize,
                )
                .set_transport(transport);
            if let Some((user, password)) = credentials {
                options.set_credentials(user, password);
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, REQUEST_QUEUE);
            eventloop.set_network_options(network);
            (Client::V311(client), EventLoop::V311(Box::new(eventloop)))
        }
    })
}

/// TLS with the ring provider chosen explicitly, so it works whatever other crates in the
/// binary enable in rustls.
fn tls_config(config: &MqttConfig) -> Result<TlsConfiguration, BackendError> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(file) => {
            for cert in load_certificates(file).map_err(BackendError::Failed)? {
                roots
                    .add(cert)
                    .map_err(|e| BackendError::Failed(format!("{}: {e}", file.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                // A malformed system certificate must not keep the gateway from starting.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(BackendError::Failed(
                    "no trusted CA certificates found on this system; set ca_file".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BackendError::Failed(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let tls = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            let chain = load_certificates(cert).map_err(BackendError::Failed)?;
            let key = load_private_key(key).map_err(BackendError::Failed)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| BackendError::Failed(format!("client certificate: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(TlsConfiguration::Rustls(Arc::new(tls)))
}

fn qos5(qos: Qos) -> QoS5 {
    match qos {
        Qos::AtMostOnce => QoS5::AtMostOnce,
        Qos::AtLeastOnce => QoS5::AtLeastOnce,
        Qos::ExactlyOnce => QoS5::ExactlyOnce,
    }
}

fn qos4(qos: Qos) -> rumqttc::QoS {
    match qos {
        Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
        Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        Qos::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

/// An MQTT 5 subscription that keeps the retain flag of live messages (Retain As Published).
fn filter5(filter: &str, qos: Qos) -> packet5::Filter {
    let mut filter = packet5::Filter::new(filter, qos5(qos));
    filter.preserve_retain = true;
    filter
}

fn properties5(id: u32) -> packet5::SubscribeProperties {
    packet5::SubscribeProperties {
        id: Some(id as usize),
        user_properties: Vec::new(),
    }
}

fn from_qos5(qos: u8) -> Qos {
    match qos {
        0 => Qos::AtMostOnce,
        1 => Qos::AtLeastOnce,
        _ => Qos::ExactlyOnce,
    }
}

/// Why a request could not be queued: the queue is full or the event loop is gone.
#[derive(Debug)]
pub struct NotQueued;

impl Client {
    fn properties(publish: &OutgoingPublish<'_>) -> Option<packet5::PublishProperties> {
        if publish.headers.is_empty() && publish.content_type.is_none() {
            return None;
        }
        Some(packet5::PublishProperties {
            user_properties: publish.headers.clone(),
            content_type: publish.content_type.clone(),
            ..Default::default()
        })
    }

    /// Size of the PUBLISH packet on the wire, including its packet id.
    pub fn packet_size(&self, publish: &OutgoingPublish<'_>) -> usize {
        let pkid = if publish.qos == Qos::AtMostOnce { 0 } else { 2 };
        let size = match self {
            Client::V5(_) => packet5::Publish::new(
                publish.topic,
                qos5(publish.qos),
                publish.payload.clone(),
                Self::properties(publish),
            )
            .size(),
            Client::V311(_) => {
                // Fixed header (at most 5 bytes), topic length prefix, topic, payload.
                5 + 2 + publish.topic.len() + publish.payload.len()
            }
        };
        size + pkid
    }

    pub fn try_publish(&self, publish: OutgoingPublish<'_>) -> Result<(), NotQueued> {
        match self {
            Client::V5(client) => {
                let properties = Self::properties(&publish);
                let (topic, qos, retain) = (publish.topic, qos5(publish.qos), publish.retain);
                match properties {
                    Some(p) => {
                        client.try_publish_with_properties(topic, qos, retain, publish.payload, p)
                    }
                    None => client.try_publish(topic, qos, retain, publish.payload),
                }
                .map_err(|_| NotQueued)
            }
            Client::V311(client) => client
                .try_publish(
                    publish.topic,
                    qos4(publish.qos),
                    publish.retain,
                    publish.payload.to_vec(),
                )
                .map_err(|_| NotQueued),
        }
    }

    /// Queues a SUBSCRIBE. `id` is the MQTT 5 subscription identifier (ignored for 3.1.1);
    /// with one, the subscription also asks for Retain As Published, so retained messages keep
    /// their flag after the subscription was made and the backend can keep the last ones.
    pub fn try_subscribe(&self, filter: &str, qos: Qos, id: Option<u32>) -> Result<(), NotQueued> {
        match self {
            Client::V5(client) => match id {
                Some(id) => client
                    .try_subscribe_many_with_properties([filter5(filter, qos)], properties5(id)),
                None => client.try_subscribe(filter, qos5(qos)),
            }
            .map_err(|_| NotQueued),
            Client::V311(client) => client
                .try_subscribe(filter, qos4(qos))
                .map_err(|_| NotQueued),
        }
    }

    pub fn try_unsubscribe(&self, filter: &str) -> Result<(), NotQueued> {
        match self {
            Client::V5(client) => client.try_unsubscribe(filter).map_err(|_| NotQueued),
            Client::V311(client) => client.try_unsubscribe(filter).map_err(|_| NotQueued),
        }
    }

    pub fn try_disconnect(&self) -> Result<(), NotQueued> {
        match self {
            Client::V5(client) => client.try_disconnect().map_err(|_| NotQueued),
            Client::V311(client) => client.try_disconnect().map_err(|_| NotQueued),
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The client error code and message for a broker's refusal, by MQTT 5 reason.
fn refusal(what: &str, reason: &str) -> BackendError {
    let code = if reason == "NotAuthorized" {
        "forbidden"
    } else {
        "rejected"
    };
    BackendError::Rejected {
        code,
        message: format!("the MQTT broker refused the {what}: {reason}"),
    }
}

impl EventLoop {
    /// Waits for the next event. Must not be cancelled except to shut down: rumqttc may be
    /// in the middle of writing a packet.
    pub async fn poll(&mut self) -> Result<LinkEvent, String> {
        match self {
            EventLoop::V5(eventloop) => eventloop
                .poll()
                .await
                .map(translate5)
                .map_err(|e| describe5(&e)),
            EventLoop::V311(eventloop) => eventloop
                .poll()
                .await
                .map(translate4)
                .map_err(|e| describe4(&e)),
        }
    }

    /// Forgets every request not yet sent and everything in flight, after the connection failed.
    /// Nothing the gateway sent on the old connection is ever resent (even when the session is
    /// resumed); the backend fails or repeats those requests itself. Returns the messages that were received but not yet
    /// handed out when the connection failed; other leftover events are dropped so that none
    /// of them is mistaken for an event of the next connection.
    pub fn forget_requests(&mut self) -> Vec<Incoming> {
        let leftovers: Vec<LinkEvent> = match self {
            EventLoop::V5(eventloop) => {
                eventloop.clean();
                eventloop.pending.clear();
                eventloop.state.collision = None;
                eventloop.state.events.drain(..).map(translate5).collect()
            }
            EventLoop::V311(eventloop) => {
                eventloop.clean();
                eventloop.pending.clear();
                eventloop.state.collision = None;
                eventloop.state.events.drain(..).map(translate4).collect()
            }
        };
        leftovers
            .into_iter()
            .filter_map(|event| match event {
                LinkEvent::Message(incoming) => Some(*incoming),
                _ => None,
            })
            .collect()
    }

    /// Makes every later connection resume the broker session (clean start off) instead of
    /// starting a new one. MQTT 5 only; the configuration refuses persistent sessions on 3.1.1.
    pub fn resume_sessions(&mut self) {
        if let EventLoop::V5(eventloop) = self {
            eventloop.options.set_clean_start(false);
        }
    }

    /// Queues a SUBSCRIBE ahead of every request in the channel (used right after CONNACK).
    pub fn queue_subscribe(&mut self, filter: &str, qos: Qos, id: Option<u32>) {
        match self {
            EventLoop::V5(eventloop) => {
                let subscribe = match id {
                    Some(id) => {
                        packet5::Subscribe::new(filter5(filter, qos), Some(properties5(id)))
                    }
                    None => packet5::Subscribe::new(packet5::Filter::new(filter, qos5(qos)), None),
                };
                eventloop
                    .pending
                    .push_back(v5::Request::Subscribe(subscribe));
            }
            EventLoop::V311(eventloop) => {
                let subscribe = rumqttc::Subscribe::new(filter, qos4(qos));
                eventloop
                    .pending
                    .push_back(rumqttc::Request::Subscribe(subscribe));
            }
        }
    }
}

fn describe5(e: &v5::ConnectionError) -> String {
    match e {
        v5::ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection: {code:?}")
        }
        v5::ConnectionError::Timeout(_) => "no answer from the broker in time".into(),
        other => other.to_string(),
    }
}

fn describe4(e: &rumqttc::ConnectionError) -> String {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection: {code:?}")
        }
        rumqttc::ConnectionError::NetworkTimeout => "no answer from the broker in time".into(),
        other => other.to_string(),
    }
}

fn translate5(event: v5::Event) -> LinkEvent {
    use packet5::{PubAckReason, PubCompReason, PubRecReason, SubscribeReasonCode};
    match event {
        v5::Event::Incoming(packet) => match packet {
            packet5::Packet::ConnAck(connack) => {
                let p = connack.properties.as_ref();
                LinkEvent::Connected(Granted {
                    max_packet_size: p.and_then(|p| p.max_packet_size),
                    max_qos: from_qos5(p.and_then(|p| p.max_qos).unwrap_or(2)),
                    retain_available: p.and_then(|p| p.retain_available) != Some(0),
                    subscription_ids_available: p
                        .and_then(|p| p.subscription_identifiers_available)
                        != Some(0),
                })
            }
            packet5::Packet::Publish(publish) => {
                let Ok(topic) = String::from_utf8(publish.topic.to_vec()) else {
                    tracing::warn!("dropping an MQTT message whose topic is not UTF-8");
                    return LinkEvent::Other;
                };
                let properties = publish.properties.unwrap_or_default();
                let correlation_id = properties
                    .correlation_data
                    .and_then(|data| String::from_utf8(data.to_vec()).ok());
                LinkEvent::Message(Box::new(Incoming {
                    message: BrokerMessage {
                        topic,
                        payload: publish.payload,
                        headers: properties.user_properties,
                        content_type: properties.content_type,
                        correlation_id,
                        timestamp: Some(now_ms()),
                        ..BrokerMessage::default()
                    },
                    retain: publish.retain,
                    subscription_ids: properties.subscription_identifiers,
                }))
            }
            packet5::Packet::PubAck(ack) => LinkEvent::PublishDone {
                pkid: ack.pkid,
                refused: match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                    other => Some(refusal("publish", &format!("{other:?}"))),
                },
            },
            packet5::Packet::PubRec(rec) => match rec.reason {
                PubRecReason::Success | PubRecReason::NoMatchingSubscribers => LinkEvent::Other,
                other => LinkEvent::PublishDone {
                    pkid: rec.pkid,
                    refused: Some(refusal("publish", &format!("{other:?}"))),
                },
            },
            packet5::Packet::PubComp(comp) => LinkEvent::PublishDone {
                pkid: comp.pkid,
                refused: match comp.reason {
                    PubCompReason::Success => None,
                    other => Some(refusal("publish", &format!("{other:?}"))),
                },
            },
            packet5::Packet::SubAck(ack) => LinkEvent::SubscribeDone {
                pkid: ack.pkid,
                refused: ack.return_codes.iter().find_map(|code| match code {
                    SubscribeReasonCode::Success(_) => None,
                    other => Some(refusal("subscription", &format!("{other:?}"))),
                }),
            },
            _ => LinkEvent::Other,
        },
        v5::Event::Outgoing(outgoing) => translate_outgoing(outgoing),
    }
}

fn translate4(event: rumqttc::Event) -> LinkEvent {
    use rumqttc::{Packet, SubscribeReasonCode};
    match event {
        rumqttc::Event::Incoming(packet) => match packet {
            Packet::ConnAck(_) => LinkEvent::Connected(Granted {
                max_packet_size: None,
                max_qos: Qos::ExactlyOnce,
                retain_available: true,
                subscription_ids_available: false,
            }),
            Packet::Publish(publish) => LinkEvent::Message(Box::new(Incoming {
                message: BrokerMessage {
                    topic: publish.topic,
                    payload: publish.payload,
                    timestamp: Some(now_ms()),
                    ..BrokerMessage::default()
                },
                retain: publish.retain,
                subscription_ids: Vec::new(),
            })),
            Packet::PubAck(ack) => LinkEvent::PublishDone {
                pkid: ack.pkid,
                refused: None,
            },
            Packet::PubComp(comp) => LinkEvent::PublishDone {
                pkid: comp.pkid,
                refused: None,
            },
            Packet::SubAck(ack) => LinkEvent::SubscribeDone {
                pkid: ack.pkid,
                refused: ack
                    .return_codes
                    .contains(&SubscribeReasonCode::Failure)
                    .then(|| refusal("subscription", "Failure")),
            },
            _ => LinkEvent::Other,
        },
        rumqttc::Event::Outgoing(outgoing) => translate_outgoing(outgoing),
    }
}

fn translate_outgoing(outgoing: rumqttc::Outgoing) -> LinkEvent {
    use rumqttc::Outgoing;
    match outgoing {
        Outgoing::Publish(pkid) => LinkEvent::PublishSent(pkid),
        Outgoing::AwaitAck(pkid) => LinkEvent::PublishParked(pkid),
        Outgoing::Subscribe(pkid) => LinkEvent::SubscribeSent(pkid),
        Outgoing::Unsubscribe(_) => LinkEvent::UnsubscribeSent,
        Outgoing::Disconnect => LinkEvent::Disconnecting,
        _ => LinkEvent::Other,
    }
}

/// A client id unique to this gateway instance: `{prefix}-{12 hex digits}`.
pub fn client_id(prefix: &str) -> String {
    let random = (random_fraction() * (1u64 << 48) as f64) as u64;
    format!("{prefix}-{random:012x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_unique_and_prefixed() {
        let a = client_id("wsbridge");
        let b = client_id("wsbridge");
        assert!(
            a.starts_with("wsbridge-") && a.len() == "wsbridge-".len() + 12,
            "{a}"
        );
        assert_ne!(a, b);
    }
}
