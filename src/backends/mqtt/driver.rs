//! The task that owns the MQTT connection: polls rumqttc's event loop without pause, routes
//! incoming messages, matches acknowledgements to waiting requests and reconnects.
//!
//! rumqttc reports a queued request only when it writes it (`Outgoing::Publish(pkid)` etc.), in
//! the order the requests were queued. Every request is queued together with an [`Expect`] under
//! the [`Link`] lock, so the n-th "sent" event belongs to the n-th expectation; from then on
//! its packet id finds it when the PUBACK, PUBCOMP or SUBACK arrives. When the connection fails,
//! everything not yet sent is thrown away (never resent, even on a resumed session) and every
//! waiter is answered with `backend_unavailable`; after the next CONNACK each wanted
//! subscription is made again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::client::{self, Client, EventLoop, Granted, Incoming, LinkEvent};
use super::config::{ProtocolVersion, Qos};
use super::table::{EntryState, Table, filter_matches};
use crate::backends::adapter::{BackendError, Health, contain};

/// Resolved with the broker's answer to one publish.
pub type PublishWaiter = oneshot::Sender<Result<(), BackendError>>;

/// A queued request whose "sent" event has not arrived yet.
pub enum Expect {
    Publish(PublishWaiter),
    Subscribe { filter: String, id: u32 },
    Unsubscribe,
}

/// The connection's request bookkeeping, shared by callers and the driver.
pub struct Link {
    pub connected: bool,
    /// `close` was called: no new requests.
    pub closing: bool,
    /// What the broker granted on the current connection.
    pub granted: Granted,
    /// Whether subscriptions carry MQTT 5 subscription identifiers on this connection.
    pub use_ids: bool,
    pub expected: VecDeque<Expect>,
    /// Publishes sent and not yet acknowledged, by packet id.
    publishes: HashMap<u16, PublishWaiter>,
    /// A publish rumqttc holds back until its packet id is free.
    parked: Option<(u16, PublishWaiter)>,
    /// SUBSCRIBEs sent and not yet acknowledged: packet id → (filter, entry id).
    subscribes: HashMap<u16, (String, u32)>,
    /// Entries subscribed again after the last CONNACK whose SUBACK is outstanding; the link is
    /// reported up when none is left.
    restoring: HashSet<u32>,
}

impl Link {
    fn new() -> Self {
        Link {
            connected: false,
            closing: false,
            granted: Granted {
                max_packet_size: None,
                max_qos: Qos::ExactlyOnce,
                retain_available: true,
                subscription_ids_available: false,
            },
            use_ids: false,
            expected: VecDeque::new(),
            publishes: HashMap::new(),
            parked: None,
            subscribes: HashMap::new(),
            restoring: HashSet::new(),
        }
    }
}

/// State shared by the backend (callers) and the driver task. Lock order: `table`, then `link`.
pub struct Shared {
    /// Largest message accepted from the broker (`max_packet_size`).
    pub max_packet_size: usize,
    /// The broker URL, for messages.
    pub url: String,
    pub protocol: ProtocolVersion,
    pub client: Client,
    pub table: RwLock<Table>,
    pub link: Mutex<Link>,
    pub health: watch::Sender<Health>,
    /// `persistent_session`: reconnections resume the broker session.
    pub persistent_session: bool,
}

impl Shared {
    pub fn new(
        url: String,
        protocol: ProtocolVersion,
        max_packet_size: u32,
        retained_cache_size: usize,
        persistent_session: bool,
        client: Client,
    ) -> Self {
        let health = watch::Sender::new(Health::Down {
            reason: format!("connecting to {url}"),
        });
        Shared {
            max_packet_size: max_packet_size as usize,
            url,
            protocol,
            client,
            table: RwLock::new(Table::new(retained_cache_size)),
            link: Mutex::new(Link::new()),
            health,
            persistent_session,
        }
    }

    pub fn table(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn table_mut(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The error for a request made while not connected.
    pub fn unavailable(&self) -> BackendError {
        let reason = match &*self.health.borrow() {
            Health::Down { reason } => reason.clone(),
            Health::Up => "not connected".into(),
        };
        BackendError::Unavailable(format!("MQTT broker {} is unreachable: {reason}", self.url))
    }
}

/// The subscription the broker acknowledged last on this connection.
#[derive(Default)]
struct LastSubscribed(Option<u32>);

/// Reconnection delays.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

/// Runs [`run`] and starts it again after a panic: the connection is dropped and made again,
/// every waiting request is answered, and the backend is `Down` until it has subscribed again.
pub async fn supervise(
    shared: Arc<Shared>,
    mut eventloop: EventLoop,
    backoff: Backoff,
    stop: CancellationToken,
    panics: prometheus::IntCounter,
) {
    loop {
        let result = contain::future(run(&shared, &mut eventloop, backoff, &stop)).await;
        let Err(panic) = result else { return };
        panics.inc();
        tracing::error!(%panic, "the MQTT delivery loop panicked; reconnecting");
        let reason = format!("the delivery loop failed ({panic}); reconnecting");
        let _ = contain::call(|| {
            shared.connection_lost(&mut eventloop, &reason, &LastSubscribed::default())
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.min) => {}
        }
    }
}

/// Polls the event loop until `stop` is cancelled or the backend's DISCONNECT has gone out.
async fn run(shared: &Shared, eventloop: &mut EventLoop, backoff: Backoff, stop: &CancellationToken) {
    let eventloop = &mut *eventloop;
    let mut attempt: u32 = 0;
    let mut last = LastSubscribed::default();
    loop {
        let result = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            result = eventloop.poll() => result,
        };
        match result {
            Ok(LinkEvent::Disconnecting) => break,
            Ok(LinkEvent::Connected(granted)) => {
                attempt = 0;
                last = LastSubscribed::default();
                shared.connected(granted, eventloop);
            }
            Ok(event) => shared.handle(event, &mut last),
            Err(reason) => {
                let was_connected = shared.connection_lost(eventloop, &reason, &last);
                if was_connected {
                    tracing::warn!(%reason, "lost the connection to the MQTT broker");
                } else {
                    tracing::debug!(%reason, attempt, "cannot connect to the MQTT broker");
                }
                if shared.link().closing {
                    break;
                }
                let delay = client::backoff(attempt, backoff.min, backoff.max);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    shared.connection_lost(eventloop, "the backend is closed", &last);
}

impl Shared {
    /// After CONNACK: accepts requests again and makes every wanted subscription again. The
    /// backend reports `Up` once the broker has answered all of them, so a client told the
    /// backend is back receives messages again.
    fn connected(&self, granted: Granted, eventloop: &mut EventLoop) {
        let mut table = self.table_mut();
        let mut link = self.link();
        link.connected = true;
        link.granted = granted;
        link.use_ids = self.protocol == ProtocolVersion::V5 && granted.subscription_ids_available;
        let use_ids = link.use_ids;
        if self.persistent_session {
            // The first connection started clean; from now on the broker keeps what it queues
            // for this session while the connection is down, and resends it on resumption.
            eventloop.resume_sessions();
        }
        // Subscriptions are made again even when the session was resumed: the broker may have
        // expired it, and subscribing again to a held filter only replaces it.
        let mut count = 0;
        for entry in table.entries_mut() {
            eventloop.queue_subscribe(&entry.filter, entry.qos, use_ids.then_some(entry.id));
            link.expected.push_back(Expect::Subscribe {
                filter: entry.filter.clone(),
                id: entry.id,
            });
            entry.state = EntryState::Subscribing(Vec::new());
            link.restoring.insert(entry.id);
            count += 1;
        }
        drop(link);
        drop(table);
        tracing::info!(url = %self.url, resubscribing = count, "connected to the MQTT broker");
        if count == 0 {
            self.health.send_replace(Health::Up);
        } else {
            self.health.send_replace(Health::Down {
                reason: format!("connected; making {count} subscriptions again"),
            });
        }
    }

    /// Fails everything in flight and marks every subscription as not held. Returns whether
    /// the link was up.
    fn connection_lost(
        &self,
        eventloop: &mut EventLoop,
        reason: &str,
        last: &LastSubscribed,
    ) -> bool {
        let mut table = self.table_mut();
        let mut link = self.link();
        let was_connected = link.connected;
        link.connected = false;
        // Requests that raced the failure into rumqttc's queue are dropped with the rest.
        let received = eventloop.forget_requests();

        let not_sent = || {
            BackendError::Unavailable(format!(
                "the connection to the MQTT broker was lost before the request was sent: {reason}"
            ))
        };
        let unknown = || {
            BackendError::Unavailable(format!(
                "the connection to the MQTT broker was lost before it acknowledged the publish, which may or may not have been delivered: {reason}"
            ))
        };
        for expected in link.expected.drain(..) {
            if let Expect::Publish(waiter) = expected {
                let _ = waiter.send(Err(not_sent()));
            }
        }
        for (_, waiter) in link.publishes.drain() {
            let _ = waiter.send(Err(unknown()));
        }
        if let Some((_, waiter)) = link.parked.take() {
            let _ = waiter.send(Err(not_sent()));
        }
        link.subscribes.clear();
        link.restoring.clear();
        for entry in table.entries_mut() {
            entry.forget_retained();
            if let EntryState::Subscribing(waiters) =
                std::mem::replace(&mut entry.state, EntryState::Idle)
            {
                for (_, waiter) in waiters {
                    let _ = waiter.send(Err(BackendError::Unavailable(format!(
                        "the connection to the MQTT broker was lost before it confirmed the subscription: {reason}"
                    ))));
                }
            }
        }
        drop(link);
        drop(table);
        for incoming in received {
            self.dispatch(incoming, last);
        }
        self.health.send_if_modified(|health| {
            let down = Health::Down {
                reason: reason.to_owned(),
            };
            let changed = *health != down;
            *health = down;
            changed
        });
        was_connected
    }

    fn handle(&self, event: LinkEvent, last: &mut LastSubscribed) {
        match event {
            LinkEvent::Message(incoming) => self.dispatch(*incoming, last),
            LinkEvent::PublishSent(pkid) => {
                let mut link = self.link();
                if let Some((parked, _)) = &link.parked
                    && *parked == pkid
                {
                    if let Some((_, waiter)) = link.parked.take() {
                        link.publishes.insert(pkid, waiter);
                    }
                    return;
                }
                match link.expected.pop_front() {
                    Some(Expect::Publish(waiter)) if pkid == 0 => {
                        // QoS 0: written to the connection is all the broker ever confirms.
                        let _ = waiter.send(Ok(()));
                    }
                    Some(Expect::Publish(waiter)) => {
                        link.publishes.insert(pkid, waiter);
                    }
                    other => out_of_step("PUBLISH", other),
                }
            }
            LinkEvent::PublishParked(pkid) => {
                let mut link = self.link();
                match link.expected.pop_front() {
                    Some(Expect::Publish(waiter)) => link.parked = Some((pkid, waiter)),
                    other => out_of_step("PUBLISH", other),
                }
            }
            LinkEvent::SubscribeSent(pkid) => {
                let mut link = self.link();
                match link.expected.pop_front() {
                    Some(Expect::Subscribe { filter, id }) => {
                        link.subscribes.insert(pkid, (filter, id));
                    }
                    other => out_of_step("SUBSCRIBE", other),
                }
            }
            LinkEvent::UnsubscribeSent => {
                let mut link = self.link();
                match link.expected.pop_front() {
                    Some(Expect::Unsubscribe) => {}
                    other => out_of_step("UNSUBSCRIBE", other),
                }
            }
            LinkEvent::PublishDone { pkid, refused } => {
                if let Some(waiter) = self.link().publishes.remove(&pkid) {
                    let _ = waiter.send(refused.map_or(Ok(()), Err));
                }
            }
            LinkEvent::SubscribeDone { pkid, refused } => {
                if let Some(id) = self.subscribed(pkid, refused) {
                    last.0 = Some(id);
                }
            }
            LinkEvent::Connected(_) | LinkEvent::Disconnecting | LinkEvent::Other => {}
        }
    }

    /// Handles a SUBACK; returns the entry the broker now holds, if it accepted.
    fn subscribed(&self, pkid: u16, refused: Option<BackendError>) -> Option<u32> {
        let mut table = self.table_mut();
        let (filter, id, restored) = {
            let mut link = self.link();
            let (filter, id) = link.subscribes.remove(&pkid)?;
            let restored = link.restoring.remove(&id) && link.restoring.is_empty();
            (filter, id, restored)
        };
        let accepted = Self::settle(&mut table, &filter, id, refused);
        drop(table);
        if restored {
            tracing::info!("every subscription is made again");
            self.health.send_replace(Health::Up);
        }
        accepted
    }

    /// Answers the upstreams waiting for a subscription and records the broker's answer.
    fn settle(
        table: &mut Table,
        filter: &str,
        id: u32,
        refused: Option<BackendError>,
    ) -> Option<u32> {
        // None: unsubscribed while the SUBSCRIBE was in flight.
        let entry = table.get_mut(filter, id)?;
        let waiters = match std::mem::replace(&mut entry.state, EntryState::Active) {
            EntryState::Subscribing(waiters) => waiters,
            _ => Vec::new(),
        };
        match refused {
            None => {
                for (_, waiter) in waiters {
                    let _ = waiter.send(Ok(()));
                }
                Some(id)
            }
            Some(error) => {
                tracing::warn!(%filter, %error, "the MQTT broker refused a subscription");
                let upstreams: Vec<_> = waiters.iter().map(|(upstream, _)| *upstream).collect();
                table.refuse(filter, &upstreams);
                for (_, waiter) in waiters {
                    let _ = waiter.send(Err(error.clone()));
                }
                None
            }
        }
    }

    /// Hands a message to the sinks of the subscriptions it was sent for. Never blocks: sinks
    /// queue per client.
    fn dispatch(&self, incoming: Incoming, last: &LastSubscribed) {
        let table = self.table();
        let Incoming {
            message,
            retain,
            subscription_ids,
        } = incoming;
        if message.topic.len() + message.payload.len() > self.max_packet_size {
            // Only a broker that cannot be told the limit (MQTT 3.1.1) sends these.
            tracing::debug!(topic = %message.topic, size = message.payload.len(), "skipping an MQTT message above max_packet_size");
            return;
        }
        let mut delivered = false;
        if !subscription_ids.is_empty() {
            for id in subscription_ids {
                if let Some(entry) = table.by_id(id) {
                    if retain {
                        entry.keep_retained(&message);
                    }
                    for (_, sink) in &entry.sinks {
                        sink.deliver(message.clone());
                        delivered = true;
                    }
                }
            }
        } else {
            // Without identifiers (MQTT 3.1.1) a message says nothing about which subscription
            // it is for. A live one goes to every matching subscription: Mosquitto sends one
            // copy however many of them match. A retained one was sent for the subscription
            // just acknowledged (MQTT 3.1.1 §3.3.1.3), and only its clients get it.
            let fresh = last
                .0
                .filter(|_| retain)
                .and_then(|id| table.by_id(id as usize))
                .filter(|entry| filter_matches(&entry.filter, &message.topic));
            let targets: Vec<_> = match fresh {
                Some(entry) => vec![entry],
                None => table.matching(&message.topic).collect(),
            };
            for entry in targets {
                for (_, sink) in &entry.sinks {
                    sink.deliver(message.clone());
                    delivered = true;
                }
            }
        }
        if !delivered {
            tracing::debug!(topic = %message.topic, "MQTT message for no current subscription");
        }
    }
}

/// rumqttc reported a request other than the one expected next. This cannot happen while every
/// request is queued with its expectation; if it does, the affected waiter is answered when the
/// connection is next reset or by the core's request timeout.
fn out_of_step(sent: &str, expected: Option<Expect>) {
    let expected = match expected {
        None => "nothing",
        Some(Expect::Publish(_)) => "a PUBLISH",
        Some(Expect::Subscribe { .. }) => "a SUBSCRIBE",
        Some(Expect::Unsubscribe) => "an UNSUBSCRIBE",
    };
    tracing::error!(sent, expected, "MQTT request bookkeeping out of step");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::adapter::{BrokerMessage, MessageSink, SubscriptionEvent};
    use crate::backends::mqtt::config::MqttConfig;

    fn shared(protocol: &str) -> (Shared, EventLoop) {
        let config: MqttConfig = toml::from_str(&format!(
            "url = \"mqtt://127.0.0.1:1\"\nprotocol = \"{protocol}\""
        ))
        .unwrap();
        let (client, eventloop) = client::build(&config, "test".into()).unwrap();
        let shared = Shared::new(
            "mqtt://127.0.0.1:1".into(),
            config.protocol,
            config.max_packet_size,
            config.retained_cache_size,
            false,
            client,
        );
        shared.link().connected = true;
        (shared, eventloop)
    }

    fn publish(shared: &Shared) -> oneshot::Receiver<Result<(), BackendError>> {
        let (tx, rx) = oneshot::channel();
        shared.link().expected.push_back(Expect::Publish(tx));
        rx
    }

    struct Nothing;
    impl MessageSink for Nothing {
        fn deliver(&self, _: BrokerMessage) {}
        fn event(&self, _: SubscriptionEvent) {}
    }

    #[test]
    fn acknowledgements_find_their_request_by_send_order_then_packet_id() {
        let (shared, _eventloop) = shared("5");
        let mut last = LastSubscribed::default();
        let mut first = publish(&shared);
        shared.link().expected.push_back(Expect::Unsubscribe);
        let mut qos0 = publish(&shared);
        let mut parked = publish(&shared);

        shared.handle(LinkEvent::PublishSent(7), &mut last);
        shared.handle(LinkEvent::UnsubscribeSent, &mut last);
        shared.handle(LinkEvent::PublishSent(0), &mut last);
        assert!(
            matches!(qos0.try_recv(), Ok(Ok(()))),
            "QoS 0 is done once written"
        );
        assert!(first.try_recv().is_err(), "QoS 1 waits for its PUBACK");

        // rumqttc holds a publish back while its packet id is still in use, then sends it.
        shared.handle(LinkEvent::PublishParked(3), &mut last);
        shared.handle(
            LinkEvent::PublishDone {
                pkid: 7,
                refused: None,
            },
            &mut last,
        );
        assert!(matches!(first.try_recv(), Ok(Ok(()))));
        shared.handle(LinkEvent::PublishSent(3), &mut last);
        shared.handle(
            LinkEvent::PublishDone {
                pkid: 3,
                refused: Some(BackendError::Rejected {
                    code: "forbidden",
                    message: "no".into(),
                }),
            },
            &mut last,
        );
        assert!(matches!(
            parked.try_recv(),
            Ok(Err(BackendError::Rejected {
                code: "forbidden",
                ..
            }))
        ));
        assert!(shared.link().expected.is_empty());
    }

    #[test]
    fn a_lost_connection_answers_every_waiting_request() {
        let (shared, mut eventloop) = shared("5");
        let mut last = LastSubscribed::default();
        let mut sent = publish(&shared);
        shared.handle(LinkEvent::PublishSent(1), &mut last);
        let mut queued = publish(&shared);
        let (tx, mut subscribing) = oneshot::channel();
        shared
            .table_mut()
            .add(9, "a/#", Qos::AtLeastOnce, Arc::new(Nothing), tx);

        assert!(shared.connection_lost(&mut eventloop, "broker gone", &last));
        let message = |rx: &mut oneshot::Receiver<Result<(), BackendError>>| match rx.try_recv() {
            Ok(Err(BackendError::Unavailable(m))) => m,
            other => panic!("expected backend_unavailable, got {other:?}"),
        };
        assert!(message(&mut sent).contains("may or may not have been delivered"));
        assert!(message(&mut queued).contains("before the request was sent"));
        assert!(message(&mut subscribing).contains("broker gone"));
        assert_eq!(
            *shared.health.borrow(),
            Health::Down {
                reason: "broker gone".into()
            }
        );

        // The wanted subscription is made again on the next connection.
        shared.connected(
            Granted {
                max_packet_size: None,
                max_qos: Qos::ExactlyOnce,
                retain_available: true,
                subscription_ids_available: true,
            },
            &mut eventloop,
        );
        assert!(
            !shared.health.borrow().is_up(),
            "up once the subscription is made again"
        );
        assert!(matches!(
            shared.link().expected.front(),
            Some(Expect::Subscribe { filter, .. }) if filter == "a/#"
        ));
        shared.handle(LinkEvent::SubscribeSent(4), &mut last);
        assert_eq!(shared.table().active_count(), 0);
        shared.handle(
            LinkEvent::SubscribeDone {
                pkid: 4,
                refused: None,
            },
            &mut last,
        );
        assert_eq!(shared.table().active_count(), 1);
        assert!(shared.health.borrow().is_up());
    }

    #[test]
    fn a_refused_subscription_is_answered_and_forgotten() {
        let (shared, _eventloop) = shared("3.1.1");
        let mut last = LastSubscribed::default();
        let (tx, mut rx) = oneshot::channel();
        let added = shared
            .table_mut()
            .add(1, "secret/#", Qos::AtLeastOnce, Arc::new(Nothing), tx);
        let crate::backends::mqtt::table::Added::New { id, .. } = added else {
            panic!("a new entry")
        };
        shared.link().expected.push_back(Expect::Subscribe {
            filter: "secret/#".into(),
            id,
        });
        shared.handle(LinkEvent::SubscribeSent(2), &mut last);
        shared.handle(
            LinkEvent::SubscribeDone {
                pkid: 2,
                refused: Some(BackendError::Rejected {
                    code: "forbidden",
                    message: "not authorized".into(),
                }),
            },
            &mut last,
        );
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(BackendError::Rejected {
                code: "forbidden",
                ..
            }))
        ));
        assert_eq!(shared.table().entries().count(), 0);
        assert!(last.0.is_none());
    }
}
