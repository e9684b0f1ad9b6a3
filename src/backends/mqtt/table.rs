//! The MQTT subscriptions this backend wants the broker to hold, and message routing to them.
//!
//! One [`Entry`] per distinct topic filter: the broker never sees the same filter twice, even
//! when several upstreams (routes) render to it. Each entry has a subscription identifier unique
//! for the life of the backend; with MQTT 5 the broker stamps every message copy with the
//! identifiers of the subscriptions it matched, so a message reaches exactly the entries it was
//! sent for, even when filters overlap. Without identifiers (MQTT 3.1.1) messages are matched
//! against the filters here ([`Table::matching`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::config::Qos;
use crate::backends::adapter::{BackendError, BrokerMessage, MessageSink, UpstreamId};

/// Largest MQTT 5 subscription identifier (a variable byte integer).
const MAX_SUBSCRIPTION_ID: u32 = 268_435_455;

/// Resolved with the SUBACK outcome for one upstream.
pub type SubscribeWaiter = oneshot::Sender<Result<(), BackendError>>;

/// Where an entry stands with the broker.
pub enum EntryState {
    /// Not held by the broker: the connection is down; it is subscribed again on reconnect.
    Idle,
    /// SUBSCRIBE queued or sent; these upstreams wait for the SUBACK.
    Subscribing(Vec<(UpstreamId, SubscribeWaiter)>),
    /// The broker acknowledged it on the current connection.
    Active,
    /// The broker refused it when it was made again after a reconnect; retried on the next one.
    Refused,
}

/// One MQTT subscription and the upstream sinks fed by it.
pub struct Entry {
    pub filter: String,
    /// MQTT 5 subscription identifier; also tells apart entries that reuse a filter.
    pub id: u32,
    pub qos: Qos,
    pub sinks: Vec<(UpstreamId, Arc<dyn MessageSink>)>,
    pub state: EntryState,
    /// The broker's retained messages under this filter, by topic, for clients that join
    /// after the subscription was made (kept only when messages say whether they are retained,
    /// i.e. with MQTT 5 subscription identifiers).
    retained: Mutex<BTreeMap<String, BrokerMessage>>,
    retained_limit: usize,
    /// Set once the cache was full: logged once per entry.
    retained_overflow: std::sync::atomic::AtomicBool,
}

impl Entry {
    /// Records a message that arrived with the retain flag: an empty one deletes the topic's
    /// retained message at the broker, any other replaces it.
    pub fn keep_retained(&self, message: &BrokerMessage) {
        let mut retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        if message.payload.is_empty() {
            retained.remove(&message.topic);
        } else if retained.len() < self.retained_limit || retained.contains_key(&message.topic) {
            retained.insert(message.topic.clone(), message.clone());
        } else if !self
            .retained_overflow
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                filter = %self.filter,
                limit = self.retained_limit,
                "retained cache full: clients joining this subscription later get only the retained messages kept (retained_cache_size)"
            );
        }
    }

    /// Hands the retained messages to a sink, in topic order.
    pub fn replay_retained(&self, sink: &dyn MessageSink) {
        let retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        for message in retained.values() {
            sink.deliver(message.clone());
        }
    }

    /// Forgets the retained messages; the broker sends them again on the next subscription.
    pub fn forget_retained(&self) {
        self.retained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Every wanted subscription, indexed by filter, identifier and upstream.
#[derive(Default)]
pub struct Table {
    entries: HashMap<String, Entry>,
    by_id: HashMap<u32, String>,
    by_upstream: HashMap<UpstreamId, String>,
    last_id: u32,
    /// Most retained messages each entry keeps.
    retained_limit: usize,
}

/// What [`Table::add`] did.
pub enum Added {
    /// A new entry (or one the broker does not hold): the caller must queue its SUBSCRIBE.
    New { id: u32, qos: Qos },
    /// Joined an entry the broker already holds.
    Active,
    /// Joined an entry whose SUBACK is still outstanding; the waiter was queued with it.
    Waiting,
}

impl Table {
    /// An empty table whose entries keep up to `retained_limit` retained messages each.
    pub fn new(retained_limit: usize) -> Self {
        Table {
            retained_limit,
            ..Table::default()
        }
    }

    #[cfg(test)]
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn entries_mut(&mut self) -> impl Iterator<Item = &mut Entry> {
        self.entries.values_mut()
    }

    /// Entries the broker holds right now.
    pub fn active_count(&self) -> usize {
        self.entries
            .values()
            .filter(|e| matches!(e.state, EntryState::Active))
            .count()
    }

    /// Adds an upstream's sink under `filter`, creating the entry if needed. `waiter` is resolved
    /// with the SUBACK outcome unless the broker already holds the filter ([`Added::Active`]).
    pub fn add(
        &mut self,
        upstream: UpstreamId,
        filter: &str,
        qos: Qos,
        sink: Arc<dyn MessageSink>,
        waiter: SubscribeWaiter,
    ) -> Added {
        self.by_upstream.insert(upstream, filter.to_owned());
        if let Some(entry) = self.entries.get_mut(filter) {
            entry.sinks.push((upstream, sink));
            return match &mut entry.state {
                EntryState::Subscribing(waiters) => {
                    waiters.push((upstream, waiter));
                    Added::Waiting
                }
                EntryState::Active => Added::Active,
                // The broker does not hold it (refused after a reconnect): ask again.
                EntryState::Idle | EntryState::Refused => {
                    entry.state = EntryState::Subscribing(vec![(upstream, waiter)]);
                    Added::New {
                        id: entry.id,
                        qos: entry.qos,
                    }
                }
            };
        }
        let id = self.next_id();
        self.by_id.insert(id, filter.to_owned());
        self.entries.insert(
            filter.to_owned(),
            Entry {
                filter: filter.to_owned(),
                id,
                qos,
                sinks: vec![(upstream, sink)],
                state: EntryState::Subscribing(vec![(upstream, waiter)]),
                retained: Mutex::new(BTreeMap::new()),
                retained_limit: self.retained_limit,
                retained_overflow: std::sync::atomic::AtomicBool::new(false),
            },
        );
        Added::New { id, qos }
    }

    fn next_id(&mut self) -> u32 {
        loop {
            self.last_id = if self.last_id >= MAX_SUBSCRIPTION_ID {
                1
            } else {
                self.last_id + 1
            };
            if !self.by_id.contains_key(&self.last_id) {
                return self.last_id;
            }
        }
    }

    /// Removes an upstream's sink. Returns the removed entry when it was the last sink on it.
    pub fn remove(&mut self, upstream: UpstreamId) -> Option<Entry> {
        let filter = self.by_upstream.remove(&upstream)?;
        let entry = self.entries.get_mut(&filter)?;
        entry.sinks.retain(|(id, _)| *id != upstream);
        if !entry.sinks.is_empty() {
            return None;
        }
        let entry = self.entries.remove(&filter)?;
        self.by_id.remove(&entry.id);
        Some(entry)
    }

    /// The entry for `filter` if it is still the one with identifier `id`.
    pub fn get_mut(&mut self, filter: &str, id: u32) -> Option<&mut Entry> {
        self.entries.get_mut(filter).filter(|e| e.id == id)
    }

    /// Takes the given upstreams off `filter` after the broker refused the subscription they
    /// waited for; the entry goes when no other upstream is left on it.
    pub fn refuse(&mut self, filter: &str, upstreams: &[UpstreamId]) {
        for upstream in upstreams {
            self.by_upstream.remove(upstream);
        }
        let Some(entry) = self.entries.get_mut(filter) else {
            return;
        };
        entry.sinks.retain(|(id, _)| !upstreams.contains(id));
        entry.state = EntryState::Refused;
        if entry.sinks.is_empty() {
            let id = entry.id;
            self.entries.remove(filter);
            self.by_id.remove(&id);
        }
    }

    /// The entry an upstream is on.
    pub fn entry_of(&self, upstream: UpstreamId) -> Option<&Entry> {
        self.entries.get(self.by_upstream.get(&upstream)?)
    }

    pub fn by_id(&self, id: usize) -> Option<&Entry> {
        let id = u32::try_from(id).ok()?;
        self.entries.get(self.by_id.get(&id)?)
    }

    /// Entries whose filter matches `topic`.
    pub fn matching<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .values()
            .filter(move |e| filter_matches(&e.filter, topic))
    }
}

/// Whether an MQTT topic filter matches a topic name (MQTT 3.1.1 §4.7 / 5.0 §4.7): `+` is one
/// level, a final `#` is the parent level and any number below it, and wildcards in the first
/// level do not match topics starting with `$`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for part in filter.split('/') {
        match part {
            "#" => return true,
            "+" => {
                if levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::SubscriptionEvent;

    #[test]
    fn filters_match_like_an_mqtt_broker() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/+", "a/", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "ab", false),
            ("#", "a/b", true),
            ("+/+", "/x", true),
            ("#", "$SYS/broker", false),
            ("+/broker", "$SYS/broker", false),
            ("$SYS/#", "$SYS/broker", true),
            ("a/+/c/#", "a/b/c", true),
            ("a/+/c/#", "a/b/d", false),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(
                filter_matches(filter, topic),
                expected,
                "{filter} vs {topic}"
            );
        }
    }

    struct Nothing;
    impl MessageSink for Nothing {
        fn deliver(&self, _: BrokerMessage) {}
        fn event(&self, _: SubscriptionEvent) {}
    }

    #[test]
    fn one_entry_per_filter_shared_by_upstreams() {
        let mut table = Table::new(10_000);
        let sink: Arc<dyn MessageSink> = Arc::new(Nothing);
        let (tx, _rx) = oneshot::channel();
        let added = table.add(1, "a/#", Qos::AtLeastOnce, sink.clone(), tx);
        let Added::New { id, .. } = added else {
            panic!("first add creates the entry")
        };
        let (tx, _rx) = oneshot::channel();
        assert!(matches!(
            table.add(2, "a/#", Qos::AtLeastOnce, sink.clone(), tx),
            Added::Waiting
        ));
        assert_eq!(table.entries().count(), 1);
        assert_eq!(table.by_id(id as usize).map(|e| e.sinks.len()), Some(2));
        assert!(table.remove(1).is_none(), "another upstream still uses it");
        let removed = table
            .remove(2)
            .expect("the last upstream removes the entry");
        assert_eq!(removed.filter, "a/#");
        assert!(table.by_id(id as usize).is_none());

        let (tx, _rx) = oneshot::channel();
        let Added::New { id: next, .. } = table.add(3, "a/#", Qos::AtLeastOnce, sink, tx) else {
            panic!("a new entry after the old one is gone")
        };
        assert_ne!(next, id, "identifiers are never reused while in use");
    }

    #[test]
    fn the_retained_cache_keeps_at_most_its_limit() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl MessageSink for Count {
            fn deliver(&self, _: BrokerMessage) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            fn event(&self, _: SubscriptionEvent) {}
        }
        let mut table = Table::new(2);
        let (tx, _rx) = oneshot::channel();
        let sink: Arc<dyn MessageSink> = Arc::new(Nothing);
        table.add(1, "a/#", Qos::AtLeastOnce, sink, tx);
        let entry = table.entries().next().expect("the entry");
        let retained = |topic: &str, payload: &'static [u8]| BrokerMessage {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(payload),
            ..BrokerMessage::default()
        };
        for topic in ["a/1", "a/2", "a/3"] {
            entry.keep_retained(&retained(topic, b"v"));
        }
        // A topic already kept is still updated; an empty message still deletes.
        entry.keep_retained(&retained("a/1", b"w"));
        entry.keep_retained(&retained("a/2", b""));
        entry.keep_retained(&retained("a/4", b"v"));
        let count = Count(std::sync::atomic::AtomicUsize::new(0));
        entry.replay_retained(&count);
        assert_eq!(count.0.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
