//! The active upstream subscriptions of an AMQP backend and what the broker must hold for them.
//!
//! Every upstream is either a *binding* of the gateway's private queue (exchange + binding key)
//! or a consumer of a shared *work queue*. Bindings and work-queue consumers are
//! reference-counted: two upstreams that need the same binding share it, and it is removed with
//! the last of them. A delivery arrives once per queue however many bindings match it, so it is
//! dispatched to every upstream whose filter matches its routing key, once each.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backends::adapter::{MessageSink, UpstreamId};

/// Where an upstream's messages come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// The gateway's private queue, bound to `exchange` with `key`.
    Binding { exchange: String, key: String },
    /// A shared durable queue consumed with competing consumers.
    WorkQueue(String),
}

struct Entry {
    source: Source,
    /// Topic filter in AMQP syntax, matched against each delivery's routing key.
    filter: String,
    sink: Arc<dyn MessageSink>,
}

/// Upstreams by id, with the reference counts of what they share.
#[derive(Default)]
pub struct Registry {
    upstreams: HashMap<UpstreamId, Entry>,
    sources: HashMap<Source, usize>,
}

impl Registry {
    /// How many upstreams use `source` now.
    pub fn users(&self, source: &Source) -> usize {
        self.sources.get(source).copied().unwrap_or(0)
    }

    pub fn insert(
        &mut self,
        id: UpstreamId,
        source: Source,
        filter: String,
        sink: Arc<dyn MessageSink>,
    ) {
        *self.sources.entry(source.clone()).or_default() += 1;
        if let Some(old) = self.upstreams.insert(
            id,
            Entry {
                source,
                filter,
                sink,
            },
        ) {
            self.release(&old.source);
        }
    }

    /// Removes an upstream; returns its source and how many upstreams still use it.
    pub fn remove(&mut self, id: UpstreamId) -> Option<(Source, usize)> {
        let entry = self.upstreams.remove(&id)?;
        let left = self.release(&entry.source);
        Some((entry.source, left))
    }

    fn release(&mut self, source: &Source) -> usize {
        match self.sources.get_mut(source) {
            Some(n) if *n > 1 => {
                *n -= 1;
                *n
            }
            Some(_) => {
                self.sources.remove(source);
                0
            }
            None => 0,
        }
    }

    /// Every binding and work queue in use, to re-establish after a reconnect.
    pub fn sources(&self) -> Vec<Source> {
        self.sources.keys().cloned().collect()
    }

    /// Distinct bindings and work-queue consumers the broker holds for these upstreams.
    pub fn source_count(&self) -> usize {
        self.sources.len()
    }

    /// The sinks a delivery goes to: upstreams fed by where it arrived whose filter matches
    /// its routing key. `exchange` is the delivery's exchange; `queue` the work queue it came
    /// from, or `None` for the private queue.
    pub fn for_each_match(
        &self,
        queue: Option<&str>,
        exchange: &str,
        routing_key: &str,
        mut deliver: impl FnMut(&Arc<dyn MessageSink>),
    ) -> usize {
        let mut matched = 0;
        for entry in self.upstreams.values() {
            let from_here = match (&entry.source, queue) {
                (Source::Binding { exchange: e, .. }, None) => e == exchange,
                (Source::WorkQueue(q), Some(queue)) => q == queue,
                _ => false,
            };
            if from_here && topic_matches(&entry.filter, routing_key) {
                matched += 1;
                deliver(&entry.sink);
            }
        }
        matched
    }
}

/// AMQP topic matching: words separated by `.`, `*` matches exactly one word, `#` zero or more.
pub fn topic_matches(filter: &str, routing_key: &str) -> bool {
    fn words(s: &str) -> Vec<&str> {
        if s.is_empty() {
            Vec::new()
        } else {
            s.split('.').collect()
        }
    }
    fn go(filter: &[&str], key: &[&str]) -> bool {
        match filter.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => {
                // Consecutive `#`s match what one does; skip them to keep this linear.
                let rest = match rest.iter().position(|w| *w != "#") {
                    Some(i) => &rest[i..],
                    None => return true,
                };
                (0..=key.len()).any(|skip| go(rest, &key[skip..]))
            }
            Some((&"*", rest)) => !key.is_empty() && go(rest, &key[1..]),
            Some((word, rest)) => key.first() == Some(word) && go(rest, &key[1..]),
        }
    }
    go(&words(filter), &words(routing_key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::adapter::{BrokerMessage, SubscriptionEvent};

    #[test]
    fn topic_matching_follows_rabbitmq() {
        let cases = [
            ("orders.eu.#", "orders.eu", true),
            ("orders.eu.#", "orders.eu.1.2", true),
            ("orders.eu.#", "orders.us.1", false),
            ("orders.*.new", "orders.eu.new", true),
            ("orders.*.new", "orders.new", false),
            ("orders.*.new", "orders.eu.x.new", false),
            ("#", "", true),
            ("#", "a.b", true),
            ("*", "a", true),
            ("*", "a.b", false),
            ("a.#.z", "a.z", true),
            ("a.#.z", "a.b.c.z", true),
            ("a.#.z", "a.b.c", false),
            ("a.b", "a.b", true),
            ("a.b", "a.bb", false),
            ("#.#", "a.b", true),
        ];
        for (filter, key, expected) in cases {
            assert_eq!(topic_matches(filter, key), expected, "{filter} ~ {key}");
        }
    }

    struct Count(std::sync::atomic::AtomicUsize);
    impl MessageSink for Count {
        fn deliver(&self, _: BrokerMessage) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        fn event(&self, _: SubscriptionEvent) {}
    }

    #[test]
    fn shared_sources_are_counted_and_each_upstream_gets_a_delivery_once() {
        let mut r = Registry::default();
        let sink: Arc<dyn MessageSink> = Arc::new(Count(Default::default()));
        let bind = |key: &str| Source::Binding {
            exchange: "x".into(),
            key: key.into(),
        };
        r.insert(1, bind("a.*"), "a.*".into(), sink.clone());
        r.insert(2, bind("a.#"), "a.#".into(), sink.clone());
        r.insert(3, bind("a.*"), "a.*".into(), sink.clone());
        r.insert(4, Source::WorkQueue("q".into()), "a.#".into(), sink.clone());
        assert_eq!(r.users(&bind("a.*")), 2);
        assert_eq!(r.source_count(), 3);

        assert_eq!(r.for_each_match(None, "x", "a.b", |_| {}), 3);
        assert_eq!(r.for_each_match(None, "x", "a.b.c", |_| {}), 1);
        assert_eq!(r.for_each_match(None, "other", "a.b", |_| {}), 0);
        assert_eq!(r.for_each_match(Some("q"), "", "a.b", |_| {}), 1);

        assert_eq!(r.remove(1), Some((bind("a.*"), 1)));
        assert_eq!(r.remove(3), Some((bind("a.*"), 0)));
        assert_eq!(r.remove(3), None);
        assert_eq!(r.users(&bind("a.*")), 0);
        assert_eq!(r.source_count(), 2);
    }
}
