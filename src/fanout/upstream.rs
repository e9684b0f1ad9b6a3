//! One upstream subscription and the sockets sharing it.
//!
//! A [`Fanout`] is the [`MessageSink`] a backend delivers to. Its subscribers are grouped by
//! (route, client pattern); for each group a broker message is mapped back to a client channel,
//! filtered against the pattern, transformed once and encoded once per [`Encoding`], and the
//! encoded frame is pushed to every member's outbox. Pushing never blocks.
//!
//! Delivery never makes a subscribe, unsubscribe or disconnect wait. The list of groups is an
//! immutable snapshot that a delivery clones (a reference count) and a change of groups replaces.
//! A group's members are locked only by whoever walks them (a delivery, a status broadcast);
//! joining and leaving queue a change instead, which the walker applies before its next walk, or
//! the changer itself when no walk is under way. Each member slot is removed in O(1) (swapped
//! with the last one). A member's `live` flag is cleared the moment it leaves, and its outbox
//! checks the flag under its own lock, so a walk already under way never queues a message after
//! the unsubscribe's reply.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Instant;

use super::encoding::{Delivery, Encoding, Frame, same_encoding};
use super::outbox::{ConflationKey, Outbox, Pushed, Queued};
use super::status::Status;
use crate::backends::{BrokerMessage, MessageSink, SubscriptionEvent};
use crate::config::{MaxRate, SlowConsumerPolicy};
use crate::metrics::{BackendMetrics, Metrics};
use crate::routing::{ChannelPattern, Route};
use crate::telemetry::Telemetry;
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
    /// True until the membership ends.
    live: Arc<AtomicBool>,
}

impl Member {
    pub fn new(session: u64, outbox: Arc<Outbox>, encoding: &'static dyn Encoding) -> Self {
        Member {
            session,
            outbox,
            encoding,
            live: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Queues a status event for this connection, in its encoding.
    pub fn send_status(&self, status: &Status) {
        self.outbox.push_control(self.encoding.status(status));
    }
}

/// A queued change to a group's members.
enum Change {
    Join(Member),
    Leave(u64),
}

#[derive(Default)]
struct Members {
    list: Vec<Member>,
    /// Session → its slot in `list` (a session holds at most one membership per group).
    slots: HashMap<u64, usize>,
}

impl Members {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Join(member) => match self.slots.get(&member.session) {
                Some(&slot) => self.list[slot] = member,
                None => {
                    self.slots.insert(member.session, self.list.len());
                    self.list.push(member);
                }
            },
            Change::Leave(session) => {
                if let Some(slot) = self.slots.remove(&session) {
                    self.list.swap_remove(slot);
                    if let Some(moved) = self.list.get(slot) {
                        self.slots.insert(moved.session, slot);
                    }
                }
            }
        }
    }
}

struct Group {
    route: Arc<Route>,
    pattern: ChannelPattern,
    /// Members as of the last applied change; locked only to walk them.
    members: Mutex<Members>,
    /// Changes not applied yet, in order.
    pending: Mutex<Vec<Change>>,
    /// Whether `pending` may hold something.
    dirty: AtomicBool,
    /// Members once every queued change is applied; changed only under [`Fanout::groups`].
    count: AtomicUsize,
}

impl Group {
    fn new(route: &Arc<Route>, pattern: &ChannelPattern) -> Self {
        Group {
            route: route.clone(),
            pattern: pattern.clone(),
            members: Mutex::new(Members::default()),
            pending: Mutex::new(Vec::new()),
            dirty: AtomicBool::new(false),
            count: AtomicUsize::new(0),
        }
    }

    fn is(&self, route: &Arc<Route>, pattern: &ChannelPattern) -> bool {
        Arc::ptr_eq(&self.route, route) && self.pattern == *pattern
    }

    fn apply_pending(&self, members: &mut Members) {
        self.dirty.store(false, Ordering::SeqCst);
        let changes =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        for change in changes {
            members.apply(change);
        }
    }

    /// The members, up to date, locked for a walk. Call [`Group::settle`] after unlocking.
    fn walk(&self) -> MutexGuard<'_, Members> {
        // A panic during a walk (in an encoding) leaves the members themselves intact.
        let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        // A change queued after this look is applied by the `settle` that follows the walk.
        if self.dirty.load(Ordering::SeqCst) {
            self.apply_pending(&mut members);
        }
        members
    }

    /// Queues a change and applies it now unless a walk is under way (which then applies it).
    fn change(&self, change: Change) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(change);
        self.dirty.store(true, Ordering::SeqCst);
        self.settle();
    }

    /// Applies queued changes if no walk holds the members. Whoever releases the members calls
    /// this, so a change queued during a walk is applied when that walk ends.
    fn settle(&self) {
        loop {
            // Pairs with the fence in every other settle: either this call sees the other
            // side's `dirty`, or the other side's `try_lock` sees this side's unlock.
            fence(Ordering::SeqCst);
            if !self.dirty.load(Ordering::SeqCst) {
                return;
            }
            match self.members.try_lock() {
                Ok(mut members) => self.apply_pending(&mut members),
                Err(TryLockError::Poisoned(members)) => {
                    self.apply_pending(&mut members.into_inner())
                }
                Err(TryLockError::WouldBlock) => return,
            }
        }
    }
}

/// A fanout's groups: replaced as a whole (copy on write) when a group comes or goes.
type Groups = Arc<Vec<Arc<Group>>>;

/// Members of all the groups once every queued change is applied.
fn total(groups: &Groups) -> usize {
    groups.iter().map(|g| g.count.load(Ordering::Relaxed)).sum()
}

/// The subscribers of one upstream subscription.
pub struct Fanout {
    groups: Mutex<Groups>,
    metrics: BackendMetrics,
    global: Arc<Metrics>,
    /// Broker messages received on this upstream subscription.
    messages_in: AtomicU64,
    /// Message frames queued to its subscribers.
    messages_out: AtomicU64,
    /// When tracing: the exporter and the backend's name, for a span per delivery.
    telemetry: Option<(Arc<Telemetry>, Arc<str>)>,
}

impl Fanout {
    pub fn new(metrics: BackendMetrics, global: Arc<Metrics>) -> Self {
        Fanout {
            groups: Mutex::new(Arc::new(Vec::new())),
            metrics,
            global,
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            telemetry: None,
        }
    }

    /// Traces each delivery with `telemetry`, naming `backend` (see [`crate::telemetry`]).
    pub fn traced(mut self, telemetry: Option<Arc<Telemetry>>, backend: &str) -> Self {
        self.telemetry = telemetry.map(|t| (t, Arc::from(backend)));
        self
    }

    /// Broker messages received here, and message frames queued to subscribers, so far.
    pub fn message_counts(&self) -> (u64, u64) {
        (
            self.messages_in.load(Ordering::Relaxed),
            self.messages_out.load(Ordering::Relaxed),
        )
    }

    fn groups(&self) -> MutexGuard<'_, Groups> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current groups, for a walk that holds no lock of the fanout's.
    fn snapshot(&self) -> Groups {
        self.groups().clone()
    }

    /// Adds a member under (route, pattern); returns the member count afterwards.
    pub fn add(&self, route: &Arc<Route>, pattern: &ChannelPattern, member: Member) -> usize {
        let (group, total) = {
            let mut groups = self.groups();
            let group = match groups.iter().find(|g| g.is(route, pattern)) {
                Some(group) => group.clone(),
                None => {
                    let group = Arc::new(Group::new(route, pattern));
                    Arc::make_mut(&mut groups).push(group.clone());
                    group
                }
            };
            group.count.fetch_add(1, Ordering::Relaxed);
            (group, total(&groups))
        };
        group.change(Change::Join(member));
        total
    }

    /// Ends `member`'s membership under (route, pattern); returns the member count afterwards.
    /// From the moment this is called no message for it is queued.
    pub fn remove(&self, route: &Arc<Route>, pattern: &ChannelPattern, member: &Member) -> usize {
        member.live.store(false, Ordering::Release);
        let (group, total) = {
            let mut groups = self.groups();
            let Some(pos) = groups.iter().position(|g| g.is(route, pattern)) else {
                return total(&groups);
            };
            let group = groups[pos].clone();
            if group.count.fetch_sub(1, Ordering::Relaxed) == 1 {
                Arc::make_mut(&mut groups).swap_remove(pos);
            }
            (group, total(&groups))
        };
        group.change(Change::Leave(member.session));
        total
    }

    pub fn member_count(&self) -> usize {
        total(&self.groups())
    }

    /// Sends a status frame to every member, once per session, naming its patterns here.
    pub fn notify(&self, status: &Status, seen: &mut HashSet<u64>) {
        for group in self.snapshot().iter() {
            {
                let members = group.walk();
                for member in &members.list {
                    if seen.insert(member.session) {
                        let mut status = status.clone();
                        status.subscriptions = vec![group.pattern.to_string()];
                        member.send_status(&status);
                    }
                }
            }
            group.settle();
        }
    }

    /// The (session, pattern) pairs subscribed here.
    pub fn memberships(&self) -> Vec<(Member, String)> {
        let mut all = Vec::new();
        for group in self.snapshot().iter() {
            {
                let members = group.walk();
                let pattern = group.pattern.to_string();
                all.extend(members.list.iter().map(|m| (m.clone(), pattern.clone())));
            }
            group.settle();
        }
        all
    }
}

impl Fanout {
    /// Delivers to `members` of the (route, pattern) group; returns whether the topic maps to
    /// the route.
    fn deliver_to(
        &self,
        route: &Route,
        pattern: &ChannelPattern,
        members: &[Member],
        message: &BrokerMessage,
        received: Instant,
    ) -> bool {
        let Some(channel) = route.channel_for(&message.topic, message.key.as_deref()) else {
            return false;
        };
        if !pattern.matches(&channel) {
            return true;
        }
        let delivery = Delivery {
            channel: &channel,
            subscription: pattern.as_str(),
            message,
        };
        // The client-side view (a Protobuf decode, for example) is computed at most once per
        // group and only when a member's encoding wants it; frames once per encoding.
        let mut view: Option<Result<PayloadView, DecodeError>> = None;
        let mut encoded = FrameCache::default();
        let mut queued = 0;
        // Routes that conflate give each message its key, made once and shared by the queues.
        let key = (route.slow_consumer == SlowConsumerPolicy::LatestPerKey
            || route.max_rate.is_some())
        .then(|| {
            Arc::new(ConflationKey {
                subscription: Arc::from(pattern.as_str()),
                channel: Arc::from(channel.as_str()),
                key: message.key.as_deref().map(Arc::from),
            })
        });
        let min_interval = route.max_rate.map(MaxRate::interval);
        for member in members {
            let frame = match encoded.get(member.encoding) {
                Some(frame) => frame,
                None => {
                    let frame = if member.encoding.wants_payload_view() {
                        let view =
                            view.get_or_insert_with(|| route.format.to_client(&message.payload));
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
                if let Some(Err(e)) = &view
                    && member.live.load(Ordering::Acquire)
                {
                    member.send_status(&decode_error_status(&channel, pattern.as_str(), e));
                }
                continue;
            };
            let message = Queued {
                frame,
                key: key.clone(),
                policy: route.slow_consumer,
                min_interval,
                received,
            };
            match member.outbox.push(message, &member.live) {
                Pushed::Queued | Pushed::Conflated => queued += 1,
                Pushed::DroppedOldest => {
                    queued += 1;
                    self.metrics.dropped.inc();
                }
                Pushed::Disconnected => self.global.slow_consumer_disconnects.inc(),
                Pushed::Closed | Pushed::Unsubscribed => {}
            }
        }
        if queued > 0 {
            self.metrics.deliveries.inc_by(queued);
            self.messages_out.fetch_add(queued, Ordering::Relaxed);
        }
        if let Some(Err(e)) = &view {
            self.metrics.decode_errors.inc();
            tracing::debug!(topic = %message.topic, error = %e, "undecodable broker message skipped");
        }
        true
    }

    /// [`Fanout::deliver_to`] behind a panic boundary: a bug that one message triggers skips
    /// that message for that group and is counted, and the backend's delivery loop goes on.
    fn deliver_contained<'a>(
        &self,
        route: &Route,
        pattern: &ChannelPattern,
        members: impl FnOnce() -> MemberList<'a>,
        message: &BrokerMessage,
        received: Instant,
    ) -> bool {
        match crate::contain::call(|| {
            let members = members();
            self.deliver_to(route, pattern, members.as_slice(), message, received)
        }) {
            Ok(mapped) => mapped,
            Err(panic) => {
                self.global.panics("delivery").inc();
                tracing::error!(
                    topic = %message.topic,
                    subscription = pattern.as_str(),
                    %panic,
                    "panic while delivering a broker message; it was skipped for this subscription"
                );
                true
            }
        }
    }

    /// A sink reaching only `member` under (route, pattern), for messages meant for a client
    /// that joined late (see [`crate::backends::Backend::joined`]).
    pub fn member_sink(
        self: &Arc<Self>,
        route: &Arc<Route>,
        pattern: &ChannelPattern,
        member: &Member,
    ) -> Arc<dyn MessageSink> {
        Arc::new(MemberSink {
            fanout: self.clone(),
            route: route.clone(),
            pattern: pattern.clone(),
            member: member.clone(),
        })
    }
}

/// Members for one delivery: a group's, locked, or a single one.
enum MemberList<'a> {
    Group(MutexGuard<'a, Members>),
    One(&'a Member),
}

impl MemberList<'_> {
    fn as_slice(&self) -> &[Member] {
        match self {
            MemberList::Group(members) => &members.list,
            MemberList::One(member) => std::slice::from_ref(*member),
        }
    }
}

impl MessageSink for Fanout {
    fn deliver(&self, message: BrokerMessage) {
        // When the adapter handed the message over: the start of its delivery latency.
        let received = Instant::now();
        // Ended when dropped, after the message was queued to every subscriber.
        let _span = self.telemetry.as_ref().map(|(telemetry, backend)| {
            telemetry.delivery(&message.headers, backend, &message.topic)
        });
        self.metrics.broker_messages.inc();
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        let groups = self.snapshot();
        let mut mapped = false;
        for group in groups.iter() {
            mapped |= self.deliver_contained(
                &group.route,
                &group.pattern,
                || MemberList::Group(group.walk()),
                &message,
                received,
            );
            group.settle();
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

    fn has_room(&self) -> bool {
        self.snapshot().iter().all(|group| {
            let room = group.walk().list.iter().all(|m| m.outbox.has_room());
            group.settle();
            room
        })
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
    member: Member,
}

impl MessageSink for MemberSink {
    fn deliver(&self, message: BrokerMessage) {
        self.fanout.deliver_contained(
            &self.route,
            &self.pattern,
            || MemberList::One(&self.member),
            &message,
            Instant::now(),
        );
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
            let member = Member::new(session, outboxes[session as usize - 1].clone(), &FRAGILE);
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

    /// An encoding that stops inside `delivery` for a payload of `wait` until released, so a
    /// test can act while a delivery is under way.
    struct Stalling {
        state: std::sync::Mutex<(bool, bool)>,
        changed: std::sync::Condvar,
    }

    impl Stalling {
        /// Waits (bounded) until `pred` holds on (entered, released).
        fn wait_until(&self, pred: impl Fn(&(bool, bool)) -> bool) -> bool {
            let guard = self.state.lock().unwrap();
            let (guard, timeout) = self
                .changed
                .wait_timeout_while(guard, std::time::Duration::from_secs(30), |s| !pred(s))
                .unwrap();
            drop(guard);
            !timeout.timed_out()
        }

        fn set(&self, f: impl FnOnce(&mut (bool, bool))) {
            f(&mut self.state.lock().unwrap());
            self.changed.notify_all();
        }
    }

    impl Encoding for Stalling {
        fn name(&self) -> &'static str {
            "stalling"
        }
        fn wants_payload_view(&self) -> bool {
            false
        }
        fn delivery(&self, delivery: &Delivery<'_>, _: Option<&PayloadView>) -> Frame {
            if &delivery.message.payload[..] == b"wait" {
                self.set(|s| s.0 = true);
                self.wait_until(|s| s.1);
            }
            Frame::new(delivery.message.payload.clone())
        }
        fn status(&self, status: &Status) -> Frame {
            Frame::new(status.code.as_bytes().to_vec())
        }
    }
    static STALLING: Stalling = Stalling {
        state: std::sync::Mutex::new((false, false)),
        changed: std::sync::Condvar::new(),
    };

    #[test]
    fn joining_and_leaving_do_not_wait_for_a_delivery_under_way() {
        let metrics = Arc::new(Metrics::new());
        let fanout = Arc::new(Fanout::new(metrics.backend("local"), metrics.clone()));
        let route = route();
        let pattern = ChannelPattern::parse("a/#").unwrap();
        let outbox = |_| Arc::new(Outbox::new(16, usize::MAX));
        let outboxes: Vec<Arc<Outbox>> = (0..3).map(outbox).collect();
        let members: Vec<Member> = (0..3)
            .map(|i| Member::new(i as u64 + 1, outboxes[i].clone(), &STALLING))
            .collect();
        fanout.add(&route, &pattern, members[0].clone());
        fanout.add(&route, &pattern, members[1].clone());

        let delivering = {
            let fanout = fanout.clone();
            std::thread::spawn(move || fanout.deliver(message(b"wait")))
        };
        assert!(STALLING.wait_until(|s| s.0), "the delivery never started");

        // While the delivery is stalled with the members in hand, one member leaves and
        // another joins; both calls return without waiting for it.
        let (done, finished) = std::sync::mpsc::channel();
        {
            let (fanout, route, pattern, members) = (
                fanout.clone(),
                route.clone(),
                pattern.clone(),
                members.clone(),
            );
            std::thread::spawn(move || {
                let left = fanout.remove(&route, &pattern, &members[1]);
                let joined = fanout.add(&route, &pattern, members[2].clone());
                let _ = done.send((left, joined));
            });
        }
        let counts = finished.recv_timeout(std::time::Duration::from_secs(30));
        STALLING.set(|s| s.1 = true);
        delivering.join().unwrap();
        assert_eq!(
            counts.expect("remove/add waited for the delivery under way"),
            (1, 2)
        );
        assert_eq!(fanout.member_count(), 2);

        // The member that left got nothing queued after it left (the stalled message reached
        // it only if pushed before); the one that joined gets what comes next.
        fanout.deliver(message(b"next"));
        assert_eq!(
            frames(&outboxes[0]),
            vec![b"wait".to_vec(), b"next".to_vec()]
        );
        assert_eq!(frames(&outboxes[1]), Vec::<Vec<u8>>::new());
        assert_eq!(frames(&outboxes[2]), vec![b"next".to_vec()]);
    }

    #[test]
    fn leaving_an_idle_topic_lets_go_of_the_member_at_once() {
        let metrics = Arc::new(Metrics::new());
        let fanout = Fanout::new(metrics.backend("local"), metrics.clone());
        let route = route();
        let (a, b) = (
            ChannelPattern::parse("a/#").unwrap(),
            ChannelPattern::parse("a/b").unwrap(),
        );
        let outboxes: Vec<Arc<Outbox>> = (0..100)
            .map(|_| Arc::new(Outbox::new(16, usize::MAX)))
            .collect();
        let members: Vec<Member> = outboxes
            .iter()
            .enumerate()
            .map(|(i, o)| Member::new(i as u64, o.clone(), &FRAGILE))
            .collect();
        for (i, member) in members.iter().enumerate() {
            let pattern = if i % 2 == 0 { &a } else { &b };
            assert_eq!(fanout.add(&route, pattern, member.clone()), i + 1);
        }
        // Leave in an order that moves members around inside their groups.
        let order: Vec<usize> = (0..100).map(|i| (i * 37) % 100).collect();
        for (n, &i) in order.iter().enumerate() {
            let pattern = if i % 2 == 0 { &a } else { &b };
            assert_eq!(fanout.remove(&route, pattern, &members[i]), 99 - n);
            if n == 49 {
                // Half have left: exactly the others still get messages.
                fanout.deliver(message(b"half"));
                for (j, outbox) in outboxes.iter().enumerate() {
                    let expect: Vec<Vec<u8>> = if order[..50].contains(&j) {
                        vec![]
                    } else {
                        vec![b"half".to_vec()]
                    };
                    assert_eq!(frames(outbox), expect, "member {j}");
                }
            }
        }
        drop(members);
        for outbox in &outboxes {
            assert_eq!(
                Arc::strong_count(outbox),
                1,
                "a member that left is still held"
            );
        }
        assert_eq!(fanout.member_count(), 0);
        assert!(fanout.memberships().is_empty());
    }
}
