//! The memory backend's message history: what a subscription with `from` replays.
//!
//! Every message published while history is on gets the next offset of one backend-wide
//! sequence, and is kept in its topic's ring (at most `history_size` messages, none older than
//! `history_ttl`). Offsets start at the gateway's start time in milliseconds times 1,000, so
//! they only grow across restarts and a position from an earlier run is older than anything
//! held: it gets a `gap`, not someone else's messages. That start value is the history's epoch.
//! Offsets stay below 2^53 (until the year 2255), so JavaScript numbers hold them exactly.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::backends::adapter::{BrokerMessage, Position, StartPosition, SubscriptionEvent};
use crate::routing::ChannelPattern;

/// Offsets per millisecond of uptime between two runs; a run would have to publish this many
/// messages per millisecond of its life (a million a second) to reach the next run's first
/// offset.
const OFFSETS_PER_MS: i64 = 1_000;

/// The one partition of the memory backend's log.
pub const PARTITION: i32 = 0;

struct TopicHistory {
    messages: VecDeque<BrokerMessage>,
    /// Highest offset this topic no longer holds (evicted by size or age).
    evicted_through: Option<i64>,
    /// Offset of the topic's newest message, for dropping the least recently used topic.
    last_offset: i64,
}

/// What a replay delivers: the held messages, and a gap when some requested ones are gone.
pub struct Replay {
    pub gap: Option<SubscriptionEvent>,
    pub messages: Vec<BrokerMessage>,
}

/// Kept messages per topic, with their offsets.
pub struct History {
    size: usize,
    ttl: Option<Duration>,
    max_topics: usize,
    topics: HashMap<String, TopicHistory>,
    /// The first offset of this run.
    epoch: i64,
    next_offset: i64,
    /// Highest offset of a topic dropped whole to stay within `max_topics`.
    forgotten_through: Option<i64>,
}

impl History {
    pub fn new(size: usize, ttl: Option<Duration>, max_topics: usize, now_ms: i64) -> Self {
        let epoch = now_ms.max(0).saturating_mul(OFFSETS_PER_MS);
        History {
            size,
            ttl,
            max_topics,
            topics: HashMap::new(),
            epoch,
            next_offset: epoch,
            forgotten_through: None,
        }
    }

    /// Gives `message` the next offset and keeps it; returns it with its position.
    pub fn record(&mut self, mut message: BrokerMessage, now_ms: i64) -> BrokerMessage {
        let offset = self.next_offset;
        self.next_offset += 1;
        message.position = Some(Position {
            partition: PARTITION,
            offset,
        });
        if !self.topics.contains_key(&message.topic) && self.topics.len() >= self.max_topics {
            self.forget_least_recent_topic();
        }
        let topic = self
            .topics
            .entry(message.topic.clone())
            .or_insert_with(|| TopicHistory {
                messages: VecDeque::new(),
                evicted_through: None,
                last_offset: offset,
            });
        topic.last_offset = offset;
        topic.messages.push_back(message.clone());
        while topic.messages.len() > self.size {
            if let Some(evicted) = topic.messages.pop_front() {
                topic.evicted_through = evicted.position.map(|p| p.offset);
            }
        }
        expire(topic, self.ttl, now_ms);
        message
    }

    /// The held messages a subscription to `filter` starting at `start` gets before live ones,
    /// in offset order.
    pub fn replay(
        &mut self,
        filter: &ChannelPattern,
        start: &StartPosition,
        now_ms: i64,
    ) -> Result<Replay, String> {
        let ttl = self.ttl;
        let mut evicted_through = None;
        let mut messages: Vec<BrokerMessage> = Vec::new();
        let from_offset = match start {
            StartPosition::Latest => {
                return Ok(Replay {
                    gap: None,
                    messages,
                });
            }
            StartPosition::Offsets(offsets) => match offsets.as_slice() {
                [(PARTITION, offset)] => Some(*offset),
                _ => {
                    return Err(format!(
                        "the memory backend's log has one partition, {PARTITION}; \"from\" named {:?}",
                        offsets.iter().map(|(p, _)| *p).collect::<Vec<_>>()
                    ));
                }
            },
            StartPosition::Earliest | StartPosition::Timestamp(_) => None,
        };
        for (name, topic) in self.topics.iter_mut() {
            if !filter.matches(name) {
                continue;
            }
            expire(topic, ttl, now_ms);
            evicted_through = evicted_through.max(topic.evicted_through);
            messages.extend(
                topic
                    .messages
                    .iter()
                    .filter(|m| match start {
                        StartPosition::Timestamp(ms) => m.timestamp.is_some_and(|t| t >= *ms),
                        _ => true,
                    })
                    .filter(|m| {
                        let offset = m.position.map_or(i64::MIN, |p| p.offset);
                        from_offset.is_none_or(|from| offset >= from)
                    })
                    .cloned(),
            );
        }
        messages.sort_by_key(|m| m.position.map(|p| p.offset));
        let gap = from_offset.and_then(|requested| {
            let lost = requested < self.epoch
                || evicted_through.is_some_and(|e| e >= requested)
                || self.forgotten_through.is_some_and(|f| f >= requested);
            lost.then(|| SubscriptionEvent::Gap {
                partition: PARTITION,
                requested,
                available: messages
                    .first()
                    .and_then(|m| m.position)
                    .map_or(self.next_offset, |p| p.offset),
            })
        });
        Ok(Replay { gap, messages })
    }

    fn forget_least_recent_topic(&mut self) {
        let Some(name) = self
            .topics
            .iter()
            .min_by_key(|(_, t)| t.last_offset)
            .map(|(name, _)| name.clone())
        else {
            return;
        };
        if let Some(topic) = self.topics.remove(&name) {
            self.forgotten_through = self.forgotten_through.max(Some(topic.last_offset));
        }
    }
}

/// Drops a topic's messages older than `ttl`.
fn expire(topic: &mut TopicHistory, ttl: Option<Duration>, now_ms: i64) {
    let Some(ttl) = ttl else { return };
    let oldest = now_ms.saturating_sub(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
    while let Some(first) = topic.messages.front() {
        if first.timestamp.is_some_and(|t| t >= oldest) {
            break;
        }
        topic.evicted_through = first.position.map(|p| p.offset);
        topic.messages.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START_MS: i64 = 1_800_000_000_000;

    fn message(topic: &str, payload: &str, at: i64) -> BrokerMessage {
        BrokerMessage {
            topic: topic.into(),
            payload: payload.to_owned().into(),
            timestamp: Some(at),
            ..BrokerMessage::default()
        }
    }

    fn payloads(replay: &Replay) -> Vec<String> {
        replay
            .messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }

    fn filter(text: &str) -> ChannelPattern {
        ChannelPattern::parse(text).unwrap()
    }

    fn offsets(offset: i64) -> StartPosition {
        StartPosition::Offsets(vec![(PARTITION, offset)])
    }

    #[test]
    fn offsets_start_at_the_epoch_and_grow_across_topics() {
        let mut history = History::new(10, None, 100, START_MS);
        let a = history.record(message("a/1", "x", START_MS), START_MS);
        let b = history.record(message("b/1", "y", START_MS), START_MS);
        let epoch = START_MS * OFFSETS_PER_MS;
        assert_eq!(a.position.map(|p| p.offset), Some(epoch));
        assert_eq!(b.position.map(|p| p.offset), Some(epoch + 1));
        // A later run's first offset is above everything this one gave out.
        let later = History::new(10, None, 100, START_MS + 1);
        assert!(later.next_offset > b.position.unwrap().offset);
        // Browsers read offsets as doubles: exact up to 2^53, which is 230 years away.
        let in_2250 = History::new(10, None, 100, 8_835_000_000_000);
        assert!(in_2250.next_offset < 1 << 53);
    }

    #[test]
    fn a_wildcard_replay_merges_matching_topics_in_offset_order() {
        let mut history = History::new(10, None, 100, START_MS);
        for (topic, payload) in [("a/1", "1"), ("b/1", "x"), ("a/2", "2"), ("a/1", "3")] {
            history.record(message(topic, payload, START_MS), START_MS);
        }
        let replay = history
            .replay(&filter("a/+"), &StartPosition::Earliest, START_MS)
            .unwrap();
        assert_eq!(payloads(&replay), ["1", "2", "3"]);
        assert!(replay.gap.is_none());
        let second = replay.messages[1].position.unwrap().offset;
        let from_second = history
            .replay(&filter("a/+"), &offsets(second), START_MS)
            .unwrap();
        assert_eq!(payloads(&from_second), ["2", "3"]);
        assert!(from_second.gap.is_none());
    }

    #[test]
    fn a_position_the_history_no_longer_holds_gives_a_gap_then_what_is_held() {
        let mut history = History::new(2, None, 100, START_MS);
        let first = history.record(message("t", "1", START_MS), START_MS);
        for payload in ["2", "3"] {
            history.record(message("t", payload, START_MS), START_MS);
        }
        let requested = first.position.unwrap().offset;
        let replay = history
            .replay(&filter("t"), &offsets(requested), START_MS)
            .unwrap();
        assert_eq!(payloads(&replay), ["2", "3"]);
        assert_eq!(
            replay.gap,
            Some(SubscriptionEvent::Gap {
                partition: PARTITION,
                requested,
                available: requested + 1,
            })
        );
        // A position from an earlier run (a restart) is a gap too.
        let replay = history
            .replay(&filter("t"), &offsets(requested - 5), START_MS)
            .unwrap();
        assert!(replay.gap.is_some());
    }

    #[test]
    fn messages_older_than_the_ttl_are_gone() {
        let mut history = History::new(10, Some(Duration::from_secs(1)), 100, START_MS);
        history.record(message("t", "old", START_MS), START_MS);
        history.record(message("t", "new", START_MS + 1500), START_MS + 1500);
        let replay = history
            .replay(&filter("t"), &StartPosition::Earliest, START_MS + 1600)
            .unwrap();
        assert_eq!(payloads(&replay), ["new"]);
        let replay = history
            .replay(
                &filter("t"),
                &StartPosition::Timestamp(START_MS + 1000),
                START_MS + 1600,
            )
            .unwrap();
        assert_eq!(payloads(&replay), ["new"]);
    }

    #[test]
    fn the_least_recently_published_topic_is_dropped_beyond_max_topics() {
        let mut history = History::new(10, None, 2, START_MS);
        let a = history.record(message("a", "1", START_MS), START_MS);
        history.record(message("b", "2", START_MS), START_MS);
        history.record(message("c", "3", START_MS), START_MS);
        let replay = history
            .replay(&filter("#"), &StartPosition::Earliest, START_MS)
            .unwrap();
        assert_eq!(payloads(&replay), ["2", "3"]);
        let replay = history
            .replay(&filter("a"), &offsets(a.position.unwrap().offset), START_MS)
            .unwrap();
        assert!(replay.gap.is_some(), "what was dropped is reported");
    }

    #[test]
    fn a_partition_other_than_zero_is_refused() {
        let mut history = History::new(10, None, 100, START_MS);
        let error = history
            .replay(
                &filter("t"),
                &StartPosition::Offsets(vec![(1, 5)]),
                START_MS,
            )
            .err()
            .unwrap();
        assert!(error.contains("one partition, 0"), "{error}");
    }
}
