//! One upstream subscription and the sockets sharing it.
//!
//! A [`Fanout`] is the [`MessageSink`] a backend delivers to. Its subscribers are grouped by
//! (route, client pattern); for each group a broker message is mapped back to a client channel,
//! filtered against the pattern, transformed once and encoded once per [`Encoding`], and the
//! encoded frame is pushed to every member's outbox. Pushing never blocks.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use super::encoding::{Delivery, Encoding, Frame, same_encoding};
use super::outbox::{Outbox, Pushed};
use super::status::Status;
use crate::backends::{BrokerMessage, MessageSink, SubscriptionEvent};
use crate::metrics::{BackendMetrics, Metrics};
use crate::routing::{ChannelPattern, Route};
use crate::transform::{DecodeError, PayloadView};

/// The `decode_error` status a subscriber gets instead of a message it cannot be shown.
fn decode_error_status(channel: &str, subscription: &str, error: &DecodeError) -> Status {
    Status {
        code: "decode_error",
        message: format!("a message on {channel:?} was skipped: {error}"),
        subscriptions: vec![subscription.to_owned()],
        ..Status::default()
    }
}

/// A connection subscribed through an upstream.
#[derive(Clone)]
pub struct Member {
    pub session: u64,
    pub outbox: Arc<Outbox>,
    /// How the connection's edge encodes what it receives.
    pub encoding: &'static dyn Encoding,
}

impl Member {
    /// Queues a status event for this connection, in its encoding.
    pub fn send_status(&self, status: &Status) {
        self.outbox.push_control(self.encoding.status(status));
    }
}

struct Group {
    route: Arc<Route>,
    pattern: ChannelPattern,
    members: Vec<Member>,
}

/// The subscribers of one upstream subscription.
pub struct Fanout {
    groups: RwLock<Vec<Group>>,
    metrics: BackendMetrics,
    global: Arc<Metrics>,
}

impl Fanout {
    pub fn new(metrics: BackendMetrics, global: Arc<Metrics>) -> Self {
        Fanout {
            groups: RwLock::new(Vec::new()),
            metrics,
            global,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Group>> {
        self.groups.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Group>> {
        self.groups.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a member under (route, pattern); returns the member count afterwards.
    pub fn add(&self, route: &Arc<Route>, pattern: &ChannelPattern, member: Member) -> usize {
        let mut groups = self.write();
        match groups
            .iter_mut()
            .find(|g| Arc::ptr_eq(&g.route, route) && g.pattern == *pattern)
        {
            Some(group) => group.members.push(member),
            None => groups.push(Group {
                route: route.clone(),
                pattern: pattern.clone(),
                members: vec![member],
            }),
        }
        groups.iter().map(|g| g.members.len()).sum()
    }

    /// Removes a session's membership under (route, pattern); returns the member count afterwards.
    pub fn remove(&self, route: &Arc<Route>, pattern: &ChannelPattern, session: u64) -> usize {
        let mut groups = self.write();
        if let Some(pos) = groups
            .iter()
            .position(|g| Arc::ptr_eq(&g.route, route) && g.pattern == *pattern)
        {
            groups[pos].members.retain(|m| m.session != session);
            if groups[pos].members.is_empty() {
                groups.swap_remove(pos);
            }
        }
        groups.iter().map(|g| g.members.len()).sum()
    }

    pub fn member_count(&self) -> usize {
        self.read().iter().map(|g| g.members.len()).sum()
    }

    /// Sends a status frame to every member, once per session, naming its patterns here.
    pub fn notify(&self, status: &Status, seen: &mut HashSet<u64>) {
        for group in self.read().iter() {
            for member in &group.members {
                if seen.insert(member.session) {
                    let mut status = status.clone();
                    status.subscriptions = vec![group.pattern.to_string()];
                    member.send_status(&status);
                }
            }
        }
    }

    /// The (session, pattern) pairs subscribed here.
    pub fn memberships(&self) -> Vec<(Member, String)> {
        self.read()
            .iter()
            .flat_map(|g| {
                g.members
                    .iter()
                    .map(move |m| (m.clone(), g.pattern.to_string()))
            })
            .collect()
    }
}

impl Fanout {
    /// Delivers to one group, or to one session in it; returns whether the topic maps to the
    /// group's route.
    fn deliver_group(&self, group: &Group, message: &BrokerMessage, only: Option<u64>) -> bool {
        let Some(channel) = group
            .route
            .channel_for(&message.topic, message.key.as_deref())
        else {
            return false;
        };
        if !group.pattern.matches(&channel) {
            return true;
        }
        let delivery = Delivery {
            channel: &channel,
            subscription: group.pattern.as_str(),
            message,
        };
        // The client-side view (a Protobuf decode, for example) is computed at most once per
        // group and only when a member's encoding wants it; frames once per encoding.
        let mut view: Option<Result<PayloadView, DecodeError>> = None;
        let mut encoded = FrameCache::default();
        for member in &group.members {
            if only.is_some_and(|session| session != member.session) {
                continue;
            }
            let frame = match encoded.get(member.encoding) {
                Some(frame) => frame,
                None => {
                    let frame = if member.encoding.wants_payload_view() {
                        let view = view
                            .get_or_insert_with(|| group.route.format.to_client(&message.payload));
                        match view {
                            Ok(v) => Some(member.encoding.delivery(&delivery, Some(&*v))),
                            Err(_) => None,
                        }
                    } else {
                        Some(member.encoding.delivery(&delivery, None))
                    };
                    encoded.insert(member.encoding, frame.clone());
                    frame
                }
            };
            let Some(frame) = frame else {
                if let Some(Err(e)) = &view {
                    member.send_status(&decode_error_status(&channel, group.pattern.as_str(), e));
                }
                continue;
            };
            match member.outbox.push_message(frame, group.route.slow_consumer) {
                Pushed::Queued => self.metrics.deliveries.inc(),
                Pushed::DroppedOldest => {
                    self.metrics.deliveries.inc();
                    self.metrics.dropped.inc();
                }
                Pushed::Disconnected => self.global.slow_consumer_disconnects.inc(),
                Pushed::Closed => {}
            }
        }
        if let Some(Err(e)) = &view {
            self.metrics.decode_errors.inc();
            tracing::debug!(topic = %message.topic, error = %e, "undecodable broker message skipped");
        }
        true
    }

    /// [`Fanout::deliver_group`] behind a panic boundary: a bug that one message triggers skips
    /// that message for that group and is counted, and the backend's delivery loop goes on.
    fn deliver_contained(&self, group: &Group, message: &BrokerMessage, only: Option<u64>) -> bool {
        match crate::contain::call(|| self.deliver_group(group, message, only)) {
            Ok(mapped) => mapped,
            Err(panic) => {
                self.global.panics("delivery").inc();
                tracing::error!(
                    topic = %message.topic,
                    subscription = group.pattern.as_str(),
                    %panic,
                    "panic while delivering a broker message; it was skipped for this subscription"
                );
                true
            }
        }
    }

    /// A sink reaching only `session`'s membership under (route, pattern), for messages meant
    /// for a client that joined late (see [`crate::backends::Backend::joined`]).
    pub fn member_sink(
        self: &Arc<Self>,
        route: &Arc<Route>,
        pattern: &ChannelPattern,
        session: u64,
    ) -> Arc<dyn MessageSink> {
        Arc::new(MemberSink {
            fanout: self.clone(),
            route: route.clone(),
            pattern: pattern.clone(),
            session,
        })
    }
}

impl MessageSink for Fanout {
    fn deliver(&self, message: BrokerMessage) {
        self.metrics.broker_messages.inc();
        let groups = self.read();
        let mut mapped = false;
        for group in groups.iter() {
            mapped |= self.deliver_contained(group, &message, None);
        }
        if !mapped && !groups.is_empty() {
            self.metrics.unmapped.inc();
            tracing::debug!(topic = %message.topic, "broker message maps to no client channel");
        }
    }

    fn event(&self, event: SubscriptionEvent) {
        let status = match event {
            SubscriptionEvent::Gap {
                partition,
                requested,
                available,
            } => Status {
                code: "gap",
                message: format!(
                    "messages from offset {requested} to {} of partition {partition} are no longer held by the broker; continuing at {available}",
                    available - 1
                ),
                partition: Some(partition),
                requested_offset: Some(requested),
                available_offset: Some(available),
                ..Status::default()
            },
        };
        let mut seen = HashSet::new();
        self.notify(&status, &mut seen);
    }
}

/// The frames made for one group and one message, by encoding (`None`: not deliverable in it).
/// Few encodings exist, so the first ones are held inline without allocating.
#[derive(Default)]
struct FrameCache {
    inline: [Option<(&'static dyn Encoding, Option<Frame>)>; 4],
    more: Vec<(&'static dyn Encoding, Option<Frame>)>,
}

impl FrameCache {
    fn get(&self, encoding: &'static dyn Encoding) -> Option<Option<Frame>> {
        self.inline
            .iter()
            .map_while(Option::as_ref)
            .chain(self.more.iter())
            .find(|(e, _)| same_encoding(*e, encoding))
            .map(|(_, frame)| frame.clone())
    }

    fn insert(&mut self, encoding: &'static dyn Encoding, frame: Option<Frame>) {
        match self.inline.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => *slot = Some((encoding, frame)),
            None => self.more.push((encoding, frame)),
        }
    }
}

/// One session's membership in a [`Fanout`].
struct MemberSink {
    fanout: Arc<Fanout>,
    route: Arc<Route>,
    pattern: ChannelPattern,
    session: u64,
}

impl MessageSink for MemberSink {
    fn deliver(&self, message: BrokerMessage) {
        let groups = self.fanout.read();
        if let Some(group) = groups
            .iter()
            .find(|g| Arc::ptr_eq(&g.route, &self.route) && g.pattern == self.pattern)
        {
            self.fanout
                .deliver_contained(group, &message, Some(self.session));
        }
    }

    fn event(&self, _event: SubscriptionEvent) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::outbox::{Drained, OutItem};
    use crate::routing::test_router;

    /// An encoding with a bug that one payload triggers.
    struct Fragile;

    impl Encoding for Fragile {
        fn name(&self) -> &'static str {
            "fragile"
        }
        fn wants_payload_view(&self) -> bool {
            false
        }
        fn delivery(&self, delivery: &Delivery<'_>, _: Option<&PayloadView>) -> Frame {
            assert!(
                &delivery.message.payload[..] != b"boom",
                "cannot encode boom"
            );
            Frame::new(delivery.message.payload.clone())
        }
        fn status(&self, status: &Status) -> Frame {
            Frame::new(status.code.as_bytes().to_vec())
        }
    }
    static FRAGILE: Fragile = Fragile;

    fn route() -> Arc<Route> {
        let router = test_router(
            "[[routes]]\nchannel = \"a/#\"\nbackend = \"local\"\ntopic = \"a/#\"\nallow = [\"subscribe\"]\n",
        );
        router.routes()[0].clone()
    }

    fn message(payload: &'static [u8]) -> BrokerMessage {
        BrokerMessage {
            topic: "a/b".into(),
            payload: bytes::Bytes::from_static(payload),
            key: None,
            headers: Vec::new(),
            content_type: None,
            message_id: None,
            correlation_id: None,
            timestamp: None,
            position: None,
        }
    }

    fn frames(outbox: &Outbox) -> Vec<Vec<u8>> {
        let mut drained = Drained::default();
        outbox.drain(&mut drained);
        drained
            .items
            .into_iter()
            .map(|item| {
                let (OutItem::Message(f) | OutItem::Control(f)) = item;
                f.bytes().to_vec()
            })
            .collect()
    }

    #[test]
    fn a_panic_while_encoding_skips_that_message_and_delivery_goes_on() {
        let metrics = Arc::new(Metrics::new());
        let fanout = Fanout::new(metrics.backend("local"), metrics.clone());
        let route = route();
        let outboxes: Vec<Arc<Outbox>> = (0..2)
            .map(|_| Arc::new(Outbox::new(16, usize::MAX)))
            .collect();
        for (session, pattern) in [(1, "a/#"), (2, "a/b")] {
            let member = Member {
                session,
                outbox: outboxes[session as usize - 1].clone(),
                encoding: &FRAGILE,
            };
            fanout.add(&route, &ChannelPattern::parse(pattern).unwrap(), member);
        }
        fanout.deliver(message(b"first"));
        fanout.deliver(message(b"boom"));
        fanout.deliver(message(b"after"));
        for outbox in &outboxes {
            assert_eq!(frames(outbox), vec![b"first".to_vec(), b"after".to_vec()]);
        }
        assert_eq!(metrics.panics("delivery").get(), 2);
    }
}
