//! A connection's bounded outgoing queue.
//!
//! The fan-out pushes shared, already encoded message frames; the connection's edge pushes its
//! control frames (replies and status events, encoded in the connection's format). The
//! connection's writer drains everything queued at once, writes it and flushes once. When
//! queued messages reach the capacity in count or in bytes, the route's [`SlowConsumerPolicy`]
//! decides: drop the oldest queued messages (counted, and reported to the client in a
//! `messages_dropped` status frame), close the connection with 1008, or (`latest_per_key`) put
//! the new message in the place of the newest queued one with the same [`ConflationKey`]
//! (counted, and reported in a `messages_conflated` status frame), dropping the oldest when
//! there is none. Pushing never blocks, so a stalled client can never hold up a broker's event
//! loop or another client.
//!
//! Replacing is O(1): queue places are numbered, and a map from key to the number of its newest
//! place finds it. The newer value takes the older one's place, so two values of one key never
//! change order; values of other keys are untouched. A message dropped from the middle of the
//! queue (behind a reply) is marked gone rather than removed, so numbers stay valid; the queue is
//! compacted once many are.
//!
//! A route's `max_rate` paces each channel: a message is queued at once when its channel's last
//! one went at least `1 / max_rate` seconds ago; otherwise it waits in the channel's pending
//! list, replacing a pending one of the same key. Each drain takes at most one pending message
//! per channel whose time has come and tells the writer when the next one is due
//! ([`Drained::next_due`]); only a connection with something pending needs that timer. Pending
//! messages count towards the capacity like queued ones.
//!
//! While a subscribe is in progress the connection [holds](Outbox::hold) its queue: what is
//! pushed meanwhile (a retained message, the first records of a replay) waits behind the place
//! where the subscribe's reply goes, so no message reaches the client before its `ok`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::encoding::Frame;
use super::status::Status;
use crate::config::SlowConsumerPolicy;

/// WebSocket close code for a slow consumer (policy violation).
pub const CLOSE_SLOW_CONSUMER: u16 = 1008;

/// Queued items marked gone (dropped in place) before the queue is compacted.
const GONE_BEFORE_COMPACTING: usize = 64;

/// Something waiting to be written to the client.
#[derive(Debug)]
pub enum OutItem {
    /// An encoded broker message, shared with other subscribers.
    Message(Frame),
    /// A reply or status event for this connection; never dropped.
    Control(Frame),
}

/// What a message is the latest value of: the subscription it was delivered for, its client
/// channel and its broker key. Made once per broker message and subscription group, and shared
/// by every subscriber's queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConflationKey {
    /// The client pattern the message was delivered for, so two subscriptions covering the same
    /// channel never replace each other's frames.
    pub subscription: Arc<str>,
    pub channel: Arc<str>,
    pub key: Option<Arc<str>>,
}

/// A broker message for [`Outbox::push`], with what its route says about queueing it.
#[derive(Debug)]
pub struct Queued {
    pub frame: Frame,
    /// Present when the route conflates (`latest_per_key` or `max_rate`).
    pub key: Option<Arc<ConflationKey>>,
    pub policy: SlowConsumerPolicy,
    /// The least time between two messages of one channel (the route's `max_rate`); needs `key`.
    pub min_interval: Option<Duration>,
    /// When the message was received from its broker.
    pub received: Instant,
}

/// What [`Outbox::push_message`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue was full and the oldest queued message was dropped to make room.
    DroppedOldest,
    /// An older queued or pending message of the same channel and key was replaced by this one.
    Conflated,
    /// The queue was full and the connection is being closed.
    Disconnected,
    /// The connection is already closing; the message was discarded.
    Closed,
    /// The subscription it was for has ended; the message was discarded.
    Unsubscribed,
}

/// A close the writer must send before ending the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: String,
}

/// A place in the queue. Places are numbered in push order (a sequence number), so a message can
/// be found again by its number in O(1) as long as nothing is removed from the middle: a message
/// dropped there is marked [`Slot::Gone`] instead, and the queue is compacted now and then.
#[derive(Debug)]
enum Slot {
    Message {
        frame: Frame,
        /// Set for messages of `latest_per_key` routes: indexed in [`State::latest`].
        key: Option<Arc<ConflationKey>>,
    },
    Control(Frame),
    /// Where a held reply goes (see [`Outbox::hold`]).
    Reply,
    Gone,
}

/// A message a route's `max_rate` holds back until its channel may have the next one.
#[derive(Debug)]
struct Pending {
    key: Arc<ConflationKey>,
    frame: Frame,
    /// The subscription's flag: a message whose subscription ended meanwhile is not sent.
    live: Arc<AtomicBool>,
}

/// One channel paced by `max_rate`.
#[derive(Debug)]
struct Paced {
    /// When the channel may send its next message.
    next: Instant,
    interval: Duration,
    /// At most one per key, oldest first.
    pending: VecDeque<Pending>,
}

#[derive(Debug, Default)]
struct Pacing {
    channels: HashMap<Arc<str>, Paced>,
    /// Channels with pending messages, by when the next may go.
    due: BTreeSet<(Instant, Arc<str>)>,
    /// The earliest due time the writer knows of (from its last drain or a wake-up since).
    announced: Option<Instant>,
    /// Channels after the last pruning of idle ones.
    pruned: usize,
    /// Messages pending in all channels.
    pending: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Slot>,
    /// The sequence number of `queue[0]`.
    front: u64,
    /// No message is queued before this sequence number (where a search for the oldest starts).
    scan_from: u64,
    /// `latest_per_key` messages by key: the sequence number of the newest queued one.
    latest: HashMap<Arc<ConflationKey>, u64>,
    /// `Slot::Gone` places in `queue`.
    gone: usize,
    /// Queued and pending messages.
    messages: usize,
    /// Bytes of the queued and pending messages.
    bytes: usize,
    replies: usize,
    /// The sequence number of the `Slot::Reply` a pending reply goes into: only what is queued
    /// before it may be drained.
    hold: Option<u64>,
    pacing: Pacing,
    dropped: u64,
    /// Messages dropped over the connection's life.
    dropped_total: u64,
    conflated: u64,
    /// When the earliest message queued since the last drain was received from its broker.
    oldest: Option<Instant>,
    close: Option<CloseRequest>,
}

impl State {
    fn end(&self) -> u64 {
        self.front + self.queue.len() as u64
    }

    fn slot_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        let at = usize::try_from(seq.checked_sub(self.front)?).ok()?;
        self.queue.get_mut(at)
    }

    /// Forgets `key`'s index entry if it points at `seq`.
    fn unindex(&mut self, key: Option<&Arc<ConflationKey>>, seq: u64) {
        if let Some(key) = key
            && self.latest.get(key) == Some(&seq)
        {
            self.latest.remove(key);
        }
    }

    fn pop_front(&mut self) -> Option<Slot> {
        let slot = self.queue.pop_front()?;
        let seq = self.front;
        self.front += 1;
        match &slot {
            Slot::Message { frame, key } => {
                self.messages -= 1;
                self.bytes -= frame.len();
                self.unindex(key.as_ref(), seq);
            }
            Slot::Control(_) => self.replies -= 1,
            Slot::Gone => self.gone -= 1,
            Slot::Reply => {}
        }
        Some(slot)
    }

    fn trim_gone(&mut self) {
        while matches!(self.queue.front(), Some(Slot::Gone)) {
            self.pop_front();
        }
    }

    /// Removes the oldest queued message (or, with none queued, the oldest pending one);
    /// returns whether there was one.
    fn drop_oldest(&mut self) -> bool {
        let start = self.scan_from.max(self.front);
        let found = (start..self.end()).find(|&seq| {
            matches!(
                self.queue.get((seq - self.front) as usize),
                Some(Slot::Message { .. })
            )
        });
        let dropped = match found {
            Some(seq) => {
                self.scan_from = seq + 1;
                let slot = self.slot_mut(seq).map(|s| std::mem::replace(s, Slot::Gone));
                if let Some(Slot::Message { frame, key }) = slot {
                    self.messages -= 1;
                    self.bytes -= frame.len();
                    self.unindex(key.as_ref(), seq);
                }
                self.gone += 1;
                self.trim_gone();
                true
            }
            None => self.drop_oldest_pending(),
        };
        if dropped {
            self.dropped += 1;
            self.dropped_total += 1;
        }
        dropped
    }

    fn drop_oldest_pending(&mut self) -> bool {
        let Some((due, channel)) = self.pacing.due.first().cloned() else {
            return false;
        };
        let Some(paced) = self.pacing.channels.get_mut(&channel) else {
            self.pacing.due.remove(&(due, channel));
            return false;
        };
        let Some(old) = paced.pending.pop_front() else {
            return false;
        };
        if paced.pending.is_empty() {
            self.pacing.due.remove(&(due, channel));
        }
        self.messages -= 1;
        self.pacing.pending -= 1;
        self.bytes -= old.frame.len();
        true
    }

    /// Replaces the newest queued message of `key` with `frame`; `false` when none is queued.
    fn replace_latest(&mut self, key: &Arc<ConflationKey>, frame: &Frame) -> bool {
        let Some(&seq) = self.latest.get(key) else {
            return false;
        };
        let Some(Slot::Message { frame: old, .. }) = self.slot_mut(seq) else {
            return false;
        };
        let old_len = std::mem::replace(old, frame.clone()).len();
        self.bytes = self.bytes - old_len + frame.len();
        self.conflated += 1;
        true
    }

    /// Drops the marked-gone places once there are many, renumbering what stays.
    fn compact(&mut self, capacity: usize) {
        if self.gone <= capacity.max(GONE_BEFORE_COMPACTING) {
            return;
        }
        let old = std::mem::take(&mut self.queue);
        let old_front = self.front;
        self.gone = 0;
        self.scan_from = self.front;
        for (i, slot) in old.into_iter().enumerate() {
            let old_seq = old_front + i as u64;
            let seq = self.end();
            match &slot {
                Slot::Gone => continue,
                Slot::Reply => self.hold = Some(seq),
                Slot::Message { key: Some(key), .. } => {
                    if let Some(at) = self.latest.get_mut(key)
                        && *at == old_seq
                    {
                        *at = seq;
                    }
                }
                Slot::Message { .. } | Slot::Control(_) => {}
            }
            self.queue.push_back(slot);
        }
    }
}

/// The outgoing queue of one connection.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer.
    ready: Notify,
    /// Wakes a reader waiting for room for replies.
    space: Notify,
    capacity: usize,
    max_bytes: usize,
}

/// Everything taken from the queue by one [`Outbox::drain`].
#[derive(Debug, Default)]
pub struct Drained {
    pub items: Vec<OutItem>,
    /// Messages dropped since the previous drain.
    pub dropped: u64,
    /// Messages replaced by newer ones of the same channel and key since the previous drain.
    pub conflated: u64,
    /// When the earliest message taken was received from its broker (`None` without messages):
    /// the writer measures the batch's delivery latency from it.
    pub oldest: Option<Instant>,
    /// When a message held back by a route's `max_rate` may go: the writer drains again then.
    /// `None` when nothing is held back (or the queue is held for a reply, whose release wakes
    /// the writer anyway).
    pub next_due: Option<Instant>,
    pub close: Option<CloseRequest>,
}

impl Drained {
    /// Resolves when [`Drained::next_due`] comes, and never without one. It makes no timer until
    /// polled, so a writer can select on it every round at no cost.
    pub fn due(&self) -> impl Future<Output = ()> + use<> {
        let at = self.next_due;
        async move {
            match at {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        }
    }

    /// The status events this drain owes the client: `messages_dropped` and
    /// `messages_conflated`, each with its count, when there is something to report.
    pub fn statuses(&self) -> impl Iterator<Item = Status> + use<> {
        let dropped = (self.dropped > 0).then(|| Status {
            code: "messages_dropped",
            message: format!(
                "{} messages were dropped because this connection did not read fast enough",
                self.dropped
            ),
            count: Some(self.dropped),
            ..Status::default()
        });
        let conflated = (self.conflated > 0).then(|| Status {
            code: "messages_conflated",
            message: format!(
                "{} messages were replaced by newer ones of the same channel and key",
                self.conflated
            ),
            count: Some(self.conflated),
            ..Status::default()
        });
        dropped.into_iter().chain(conflated)
    }
}

impl Outbox {
    /// An outbox holding up to `capacity` messages of at most `max_bytes` in all (and as many
    /// replies as messages). One message larger than `max_bytes` is queued when nothing else is.
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            space: Notify::new(),
            capacity,
            max_bytes,
        }
    }

    fn is_full(&self, state: &State, adding: usize) -> bool {
        state.messages >= self.capacity
            || (state.messages > 0 && state.bytes.saturating_add(adding) > self.max_bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a broker message for a subscription that is live while `live` is true, applying
    /// `policy` when the queue is full. The flag is read under the queue's lock, so once it is
    /// cleared no message for that subscription can be queued behind a reply pushed afterwards
    /// (an unsubscribe's `ok`).
    pub fn push_message(
        &self,
        frame: Frame,
        policy: SlowConsumerPolicy,
        live: &AtomicBool,
    ) -> Pushed {
        let queued = Queued {
            frame,
            key: None,
            policy,
            min_interval: None,
            received: Instant::now(),
        };
        self.push_inner(queued, live, None)
    }

    /// Queues a broker message with its conflation key and pacing (see [`Queued`]), for a
    /// subscription that is live while `live` is true (see [`Outbox::push_message`]). A message
    /// held back by `max_rate` is sent only if the subscription is still live when it is due.
    pub fn push(&self, queued: Queued, live: &Arc<AtomicBool>) -> Pushed {
        self.push_inner(queued, live, Some(live))
    }

    fn push_inner(
        &self,
        queued: Queued,
        live: &AtomicBool,
        keep: Option<&Arc<AtomicBool>>,
    ) -> Pushed {
        let mut state = self.lock();
        if state.close.is_some() {
            return Pushed::Closed;
        }
        if !live.load(Ordering::Acquire) {
            return Pushed::Unsubscribed;
        }
        let Queued {
            frame,
            key,
            policy,
            min_interval,
            received,
        } = queued;
        if let (Some(key), Some(interval), Some(keep)) = (&key, min_interval, keep) {
            let now = Instant::now();
            let paced = state
                .pacing
                .channels
                .entry(key.channel.clone())
                .or_insert_with(|| Paced {
                    next: now,
                    interval,
                    pending: VecDeque::new(),
                });
            paced.interval = interval;
            if paced.pending.is_empty() && paced.next <= now {
                paced.next = now + interval;
            } else {
                return self.push_pending(state, key, frame, keep, policy);
            }
        }
        let mut outcome = Pushed::Queued;
        if self.is_full(&state, frame.len()) {
            let replaced = policy == SlowConsumerPolicy::LatestPerKey
                && key
                    .as_ref()
                    .is_some_and(|key| state.replace_latest(key, &frame));
            if replaced {
                // A larger frame may have taken a smaller one's place.
                while state.messages > 1 && state.bytes > self.max_bytes && state.drop_oldest() {}
                state.compact(self.capacity);
                drop(state);
                self.ready.notify_one();
                return Pushed::Conflated;
            }
            match policy {
                SlowConsumerPolicy::DropOldest | SlowConsumerPolicy::LatestPerKey => {
                    while self.is_full(&state, frame.len()) && state.drop_oldest() {}
                    state.compact(self.capacity);
                    outcome = Pushed::DroppedOldest;
                }
                SlowConsumerPolicy::Disconnect => return self.disconnect(state),
            }
        }
        state.bytes += frame.len();
        state.oldest = Some(state.oldest.map_or(received, |t| t.min(received)));
        let seq = state.end();
        let key = key.filter(|_| policy == SlowConsumerPolicy::LatestPerKey);
        if let Some(key) = &key {
            state.latest.insert(key.clone(), seq);
        }
        state.queue.push_back(Slot::Message { frame, key });
        state.messages += 1;
        let wake = state.queue.len() == 1 && state.hold.is_none();
        drop(state);
        if wake || outcome != Pushed::Queued {
            self.ready.notify_one();
        }
        outcome
    }

    fn disconnect(&self, mut state: std::sync::MutexGuard<'_, State>) -> Pushed {
        state.close = Some(CloseRequest {
            code: CLOSE_SLOW_CONSUMER,
            reason: "slow consumer: outgoing queue full".into(),
        });
        drop(state);
        self.ready.notify_one();
        Pushed::Disconnected
    }

    /// Holds a message back until its channel's `max_rate` lets it go, replacing a pending one of
    /// the same key.
    fn push_pending(
        &self,
        mut state: std::sync::MutexGuard<'_, State>,
        key: &Arc<ConflationKey>,
        frame: Frame,
        live: &Arc<AtomicBool>,
        policy: SlowConsumerPolicy,
    ) -> Pushed {
        let state_ref = &mut *state;
        let Some(paced) = state_ref.pacing.channels.get_mut(&key.channel) else {
            return Pushed::Closed;
        };
        if let Some(old) = paced.pending.iter_mut().find(|p| p.key == *key) {
            let old_len = std::mem::replace(&mut old.frame, frame.clone()).len();
            old.live = live.clone();
            state_ref.bytes = state_ref.bytes - old_len + frame.len();
            state_ref.conflated += 1;
            return Pushed::Conflated;
        }
        let mut outcome = Pushed::Queued;
        if self.is_full(state_ref, frame.len()) {
            if policy == SlowConsumerPolicy::Disconnect {
                return self.disconnect(state);
            }
            while self.is_full(state_ref, frame.len()) && state_ref.drop_oldest() {}
            state_ref.compact(self.capacity);
            outcome = Pushed::DroppedOldest;
        }
        // Dropping may have emptied this channel's pending list; look it up again.
        let Some(paced) = state_ref.pacing.channels.get_mut(&key.channel) else {
            return Pushed::Closed;
        };
        let was_idle = paced.pending.is_empty();
        let due = paced.next;
        state_ref.bytes += frame.len();
        state_ref.messages += 1;
        state_ref.pacing.pending += 1;
        paced.pending.push_back(Pending {
            key: key.clone(),
            frame,
            live: live.clone(),
        });
        let mut wake = outcome != Pushed::Queued;
        if was_idle {
            state_ref.pacing.due.insert((due, key.channel.clone()));
            // The writer learns of a due time earlier than any it knows by draining.
            if state_ref.pacing.announced.is_none_or(|at| due < at) {
                state_ref.pacing.announced = Some(due);
                wake = true;
            }
        }
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        outcome
    }

    /// Whether one more message fits without the slow-consumer policy acting (a closing
    /// connection discards what it is given, so it never makes anyone wait).
    pub fn has_room(&self) -> bool {
        let state = self.lock();
        state.close.is_some() || !self.is_full(&state, 0)
    }

    /// Queues a reply or status frame. Control frames are never dropped; a client that lets them
    /// pile up to the capacity (by not reading) is disconnected as a slow consumer.
    pub fn push_control(&self, frame: Frame) {
        let mut state = self.lock();
        if state.close.is_some() {
            return;
        }
        if state.replies >= self.capacity {
            state.close = Some(CloseRequest {
                code: CLOSE_SLOW_CONSUMER,
                reason: "slow consumer: replies are not being read".into(),
            });
        } else {
            state.queue.push_back(Slot::Control(frame));
            state.replies += 1;
        }
        drop(state);
        self.ready.notify_one();
    }

    /// Holds the queue at its current end for a reply not made yet: what is pushed from now on
    /// is written only after [`Outbox::release`] puts the reply in this place.
    pub fn hold(&self) {
        let mut state = self.lock();
        if state.hold.is_none() {
            state.hold = Some(state.end());
            state.queue.push_back(Slot::Reply);
        }
    }

    /// Puts `reply` where [`Outbox::hold`] was called and lets everything after it go.
    pub fn release(&self, reply: Frame) {
        let mut state = self.lock();
        let closing = state.close.is_some();
        match state.hold.take() {
            Some(seq) => {
                let (slot, replies) = if closing {
                    (Slot::Gone, 0)
                } else {
                    (Slot::Control(reply), 1)
                };
                if let Some(place) = state.slot_mut(seq) {
                    *place = slot;
                    state.replies += replies;
                    state.gone += 1 - replies;
                }
                state.trim_gone();
            }
            None if !closing => {
                state.queue.push_back(Slot::Control(reply));
                state.replies += 1;
            }
            None => {}
        }
        drop(state);
        self.ready.notify_one();
    }

    /// Whether replies have reached the capacity; the reader stops taking requests until not.
    pub fn replies_full(&self) -> bool {
        self.lock().replies >= self.capacity
    }

    /// Resolves when a drain may have made room for replies.
    pub async fn space(&self) {
        self.space.notified().await
    }

    /// Asks the writer to close the connection; the first close requested wins.
    pub fn close(&self, code: u16, reason: impl Into<String>) {
        let mut state = self.lock();
        if state.close.is_none() {
            state.close = Some(CloseRequest {
                code,
                reason: reason.into(),
            });
        }
        drop(state);
        self.ready.notify_one();
    }

    /// Messages queued now, and messages dropped by the slow-consumer policy over the
    /// connection's life (for introspection; takes the queue's lock once).
    pub fn counts(&self) -> (usize, u64) {
        let state = self.lock();
        (state.messages, state.dropped_total)
    }

    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    /// Resolves when there may be something to drain.
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Takes everything queued (up to a [hold](Outbox::hold)) and the messages held back by
    /// `max_rate` whose time has come (one per channel). `items` is reused between calls to avoid
    /// allocating.
    pub fn drain(&self, drained: &mut Drained) {
        let mut state = self.lock();
        while state.hold != Some(state.front) {
            match state.pop_front() {
                None => break,
                Some(Slot::Message { frame, .. }) => drained.items.push(OutItem::Message(frame)),
                Some(Slot::Control(frame)) => drained.items.push(OutItem::Control(frame)),
                Some(Slot::Gone | Slot::Reply) => {}
            }
        }
        drained.next_due = if state.hold.is_none() {
            release_due(&mut state, &mut drained.items)
        } else {
            None
        };
        state.pacing.announced = drained.next_due;
        drained.dropped = std::mem::take(&mut state.dropped);
        drained.conflated = std::mem::take(&mut state.conflated);
        // Messages left behind a hold keep the stamp (an upper bound for their latency). Those a
        // route's `max_rate` holds back are late on purpose and carry none.
        drained.oldest = if state.messages == state.pacing.pending {
            state.oldest.take()
        } else {
            state.oldest
        };
        drained.close = state.close.clone();
        drop(state);
        self.space.notify_one();
    }

    /// Messages currently queued.
    pub fn queued_messages(&self) -> usize {
        self.lock().messages
    }
}

/// Moves the first pending message of every channel that is due into `items`; returns when the
/// next channel is due.
fn release_due(state: &mut State, items: &mut Vec<OutItem>) -> Option<Instant> {
    let now = Instant::now();
    let pacing = &mut state.pacing;
    while let Some((due, channel)) = pacing.due.first().cloned() {
        if due > now {
            break;
        }
        pacing.due.pop_first();
        let Some(paced) = pacing.channels.get_mut(&channel) else {
            continue;
        };
        // Messages of subscriptions that ended while they waited are discarded.
        while let Some(pending) = paced.pending.pop_front() {
            state.messages -= 1;
            pacing.pending -= 1;
            state.bytes -= pending.frame.len();
            if pending.live.load(Ordering::Acquire) {
                items.push(OutItem::Message(pending.frame));
                paced.next = now + paced.interval;
                break;
            }
        }
        if !paced.pending.is_empty() {
            pacing.due.insert((paced.next, channel));
        }
    }
    // Forget channels that could send right away again, once there are many of them.
    if pacing.channels.len() > pacing.pruned.saturating_mul(2).max(GONE_BEFORE_COMPACTING) {
        pacing
            .channels
            .retain(|_, paced| !paced.pending.is_empty() || paced.next > now);
        pacing.pruned = pacing.channels.len();
    }
    pacing.due.first().map(|(due, _)| *due)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscription that never ends.
    static LIVE: AtomicBool = AtomicBool::new(true);

    fn msg(n: u32) -> Frame {
        Frame::new(n.to_string())
    }

    fn reply(n: u32) -> Frame {
        Frame::new(format!("reply {n}"))
    }

    fn texts(d: &Drained) -> Vec<String> {
        d.items
            .iter()
            .map(|i| match i {
                OutItem::Message(m) => String::from_utf8_lossy(m.bytes()).into_owned(),
                OutItem::Control(_) => "reply".into(),
            })
            .collect()
    }

    #[test]
    fn drop_oldest_keeps_the_newest_and_counts() {
        let outbox = Outbox::new(3, usize::MAX);
        outbox.push_control(reply(1));
        for n in 0..5 {
            let pushed = outbox.push_message(msg(n), SlowConsumerPolicy::DropOldest, &LIVE);
            assert_eq!(pushed == Pushed::Queued, n < 3, "message {n}");
        }
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert_eq!(texts(&d), ["reply", "2", "3", "4"]);
        assert_eq!(d.dropped, 2);
        assert_eq!(d.close, None);
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert_eq!(d.dropped, 0, "the count is reported once");
    }

    #[test]
    fn the_byte_bound_applies_the_policy_too() {
        let outbox = Outbox::new(100, 10);
        for n in [1000, 1001, 1002] {
            outbox.push_message(msg(n), SlowConsumerPolicy::DropOldest, &LIVE);
        }
        // 4 bytes each: two fit in 10 bytes, the first was dropped for the third.
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert_eq!(texts(&d), ["1001", "1002"]);
        assert_eq!(d.dropped, 1);
        // A message larger than the bound still goes through an empty queue.
        let big = Frame::new(vec![b'x'; 64]);
        assert_eq!(
            outbox.push_message(big.clone(), SlowConsumerPolicy::Disconnect, &LIVE),
            Pushed::Queued
        );
        assert_eq!(
            outbox.push_message(msg(1), SlowConsumerPolicy::Disconnect, &LIVE),
            Pushed::Disconnected
        );
    }

    #[test]
    fn a_held_reply_goes_out_before_what_was_queued_after_it() {
        let outbox = Outbox::new(10, usize::MAX);
        outbox.push_message(msg(1), SlowConsumerPolicy::DropOldest, &LIVE);
        outbox.hold();
        outbox.push_message(msg(2), SlowConsumerPolicy::DropOldest, &LIVE);
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert_eq!(texts(&d), ["1"], "nothing after the hold is written yet");
        d.items.clear();
        outbox.push_message(msg(3), SlowConsumerPolicy::DropOldest, &LIVE);
        outbox.release(reply(9));
        outbox.drain(&mut d);
        assert_eq!(texts(&d), ["reply", "2", "3"]);
    }

    #[test]
    fn dropping_before_a_hold_keeps_its_place() {
        let outbox = Outbox::new(2, usize::MAX);
        outbox.push_message(msg(1), SlowConsumerPolicy::DropOldest, &LIVE);
        outbox.hold();
        outbox.push_message(msg(2), SlowConsumerPolicy::DropOldest, &LIVE);
        outbox.push_message(msg(3), SlowConsumerPolicy::DropOldest, &LIVE);
        outbox.release(reply(0));
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert_eq!(texts(&d), ["reply", "2", "3"]);
        assert_eq!(d.dropped, 1);
    }

    #[test]
    fn disconnect_policy_closes_with_1008() {
        let outbox = Outbox::new(2, usize::MAX);
        outbox.push_message(msg(0), SlowConsumerPolicy::Disconnect, &LIVE);
        outbox.push_message(msg(1), SlowConsumerPolicy::Disconnect, &LIVE);
        assert_eq!(
            outbox.push_message(msg(2), SlowConsumerPolicy::Disconnect, &LIVE),
            Pushed::Disconnected
        );
        assert_eq!(
            outbox.push_message(msg(3), SlowConsumerPolicy::Disconnect, &LIVE),
            Pushed::Closed
        );
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert_eq!(d.close.unwrap().code, CLOSE_SLOW_CONSUMER);
    }

    #[test]
    fn unread_replies_close_instead_of_growing() {
        let outbox = Outbox::new(2, usize::MAX);
        for n in 0..3 {
            outbox.push_control(reply(n));
        }
        assert!(outbox.is_closing());
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert_eq!(d.items.len(), 2);
    }

    #[test]
    fn first_close_wins() {
        let outbox = Outbox::new(2, usize::MAX);
        outbox.close(1009, "too big");
        outbox.close(1001, "shutdown");
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert_eq!(d.close.unwrap().code, 1009);
    }

    #[test]
    fn a_message_for_an_ended_subscription_is_not_queued() {
        let outbox = Outbox::new(4, usize::MAX);
        let live = AtomicBool::new(true);
        let policy = SlowConsumerPolicy::DropOldest;
        assert_eq!(outbox.push_message(msg(1), policy, &live), Pushed::Queued);
        live.store(false, Ordering::Release);
        assert_eq!(
            outbox.push_message(msg(2), policy, &live),
            Pushed::Unsubscribed
        );
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert_eq!(texts(&d), ["1"]);
    }

    fn key(channel: &str) -> Arc<ConflationKey> {
        Arc::new(ConflationKey {
            subscription: Arc::from("#"),
            channel: Arc::from(channel),
            key: None,
        })
    }

    /// Pushes `text` on `channel` of a `latest_per_key` route paced at `min_interval`.
    fn keyed(
        outbox: &Outbox,
        channel: &str,
        text: &str,
        min_interval: Option<Duration>,
        live: &Arc<AtomicBool>,
    ) -> Pushed {
        let queued = Queued {
            frame: Frame::new(text.to_owned()),
            key: Some(key(channel)),
            policy: SlowConsumerPolicy::LatestPerKey,
            min_interval,
            received: Instant::now(),
        };
        outbox.push(queued, live)
    }

    fn drained(outbox: &Outbox) -> Drained {
        let mut d = Drained::default();
        outbox.drain(&mut d);
        d
    }

    #[test]
    fn latest_per_key_replaces_the_newest_of_the_same_key_when_full() {
        let outbox = Outbox::new(4, usize::MAX);
        let live = Arc::new(AtomicBool::new(true));
        for (channel, text) in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1")] {
            assert_eq!(keyed(&outbox, channel, text, None, &live), Pushed::Queued);
        }
        // Full: a newer value takes the place of its key's newest queued one.
        assert_eq!(keyed(&outbox, "a", "a3", None, &live), Pushed::Conflated);
        assert_eq!(keyed(&outbox, "b", "b2", None, &live), Pushed::Conflated);
        assert_eq!(outbox.queued_messages(), 4);
        let d = drained(&outbox);
        // Other keys untouched, and a1 still comes before a3.
        assert_eq!(texts(&d), ["a1", "b2", "a3", "c1"]);
        assert_eq!((d.conflated, d.dropped), (2, 0));
        let codes: Vec<_> = d.statuses().map(|s| (s.code, s.count)).collect();
        assert_eq!(codes, [("messages_conflated", Some(2))]);
        assert_eq!(drained(&outbox).conflated, 0, "the count is reported once");
    }

    #[test]
    fn latest_per_key_keeps_every_value_while_there_is_room() {
        let outbox = Outbox::new(4, usize::MAX);
        let live = Arc::new(AtomicBool::new(true));
        for text in ["a1", "a2", "a3"] {
            assert_eq!(keyed(&outbox, "a", text, None, &live), Pushed::Queued);
        }
        let d = drained(&outbox);
        assert_eq!(texts(&d), ["a1", "a2", "a3"]);
        assert_eq!(d.conflated, 0);
    }

    #[test]
    fn latest_per_key_without_an_older_value_drops_the_oldest() {
        let outbox = Outbox::new(2, usize::MAX);
        let live = Arc::new(AtomicBool::new(true));
        keyed(&outbox, "a", "a1", None, &live);
        keyed(&outbox, "b", "b1", None, &live);
        assert_eq!(
            keyed(&outbox, "c", "c1", None, &live),
            Pushed::DroppedOldest
        );
        // a1 is gone, so a new value of a finds nothing to replace either.
        assert_eq!(
            keyed(&outbox, "a", "a2", None, &live),
            Pushed::DroppedOldest
        );
        assert_eq!(keyed(&outbox, "a", "a3", None, &live), Pushed::Conflated);
        let d = drained(&outbox);
        assert_eq!(texts(&d), ["c1", "a3"]);
        assert_eq!((d.dropped, d.conflated), (2, 1));
        let codes: Vec<_> = d.statuses().map(|s| s.code).collect();
        assert_eq!(codes, ["messages_dropped", "messages_conflated"]);
    }

    #[test]
    fn the_key_index_survives_drops_behind_a_reply_and_compaction() {
        // A reply at the front keeps dropped messages in place behind it until the queue is
        // compacted; replacing must still find the right place.
        let outbox = Outbox::new(2, usize::MAX);
        let live = Arc::new(AtomicBool::new(true));
        outbox.push_control(reply(0));
        outbox.hold();
        for n in 0..500 {
            keyed(&outbox, &format!("k{n}"), &format!("v{n}"), None, &live);
        }
        assert_eq!(
            keyed(&outbox, "k498", "new", None, &live),
            Pushed::Conflated
        );
        {
            let state = outbox.lock();
            assert!(
                state.queue.len() < 2 + 2 + 2 * GONE_BEFORE_COMPACTING,
                "compacted"
            );
        }
        outbox.release(reply(1));
        let d = drained(&outbox);
        assert_eq!(texts(&d), ["reply", "reply", "new", "v499"]);
        assert_eq!((d.dropped, d.conflated), (498, 1));
    }

    #[test]
    fn max_rate_holds_back_the_latest_value_of_a_busy_channel() {
        let outbox = Outbox::new(100, usize::MAX);
        let live = Arc::new(AtomicBool::new(true));
        let pace = Some(Duration::from_millis(100));
        assert_eq!(keyed(&outbox, "a", "a1", pace, &live), Pushed::Queued);
        assert_eq!(keyed(&outbox, "a", "a2", pace, &live), Pushed::Queued);
        assert_eq!(keyed(&outbox, "a", "a3", pace, &live), Pushed::Conflated);
        assert_eq!(keyed(&outbox, "b", "b1", pace, &live), Pushed::Queued);
        // Drain whenever the outbox says something is due, until nothing is held back.
        let (mut sent, mut conflated) = (Vec::new(), 0);
        loop {
            let d = drained(&outbox);
            sent.extend(texts(&d));
            conflated += d.conflated;
            let Some(due) = d.next_due else { break };
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        assert_eq!(
            sent,
            ["a1", "b1", "a3"],
            "the last value arrives when the rate allows"
        );
        assert_eq!(conflated, 1);
        assert_eq!(outbox.queued_messages(), 0);
    }

    #[test]
    fn a_held_back_message_of_an_ended_subscription_is_not_sent() {
        let outbox = Outbox::new(100, usize::MAX);
        let live = Arc::new(AtomicBool::new(true));
        let pace = Some(Duration::from_millis(20));
        keyed(&outbox, "a", "a1", pace, &live);
        keyed(&outbox, "a", "a2", pace, &live);
        live.store(false, Ordering::Release);
        let mut sent = Vec::new();
        loop {
            let d = drained(&outbox);
            sent.extend(texts(&d));
            let Some(due) = d.next_due else { break };
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        assert_eq!(sent, ["a1"]);
        assert_eq!(outbox.queued_messages(), 0);
    }

    #[test]
    fn a_hold_keeps_held_back_messages_and_their_timer() {
        let outbox = Outbox::new(100, usize::MAX);
        let live = Arc::new(AtomicBool::new(true));
        let pace = Some(Duration::from_millis(1));
        keyed(&outbox, "a", "a1", pace, &live);
        keyed(&outbox, "a", "a2", pace, &live);
        outbox.hold();
        let d = drained(&outbox);
        assert_eq!(texts(&d), ["a1"]);
        assert_eq!(d.next_due, None, "the release wakes the writer");
        std::thread::sleep(Duration::from_millis(2));
        outbox.release(reply(1));
        let d = drained(&outbox);
        assert_eq!(texts(&d), ["reply", "a2"]);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_pending_message_when_nothing_else_is_queued() {
        let outbox = Outbox::new(2, usize::MAX);
        let live = Arc::new(AtomicBool::new(true));
        let pace = Some(Duration::from_secs(3600));
        for channel in ["a", "b"] {
            keyed(&outbox, channel, &format!("{channel}1"), pace, &live);
        }
        assert_eq!(texts(&drained(&outbox)), ["a1", "b1"]);
        keyed(&outbox, "a", "a2", pace, &live);
        keyed(&outbox, "b", "b2", pace, &live);
        // Full of held-back messages: a new channel's first message takes the oldest's room.
        assert_eq!(
            keyed(&outbox, "c", "c1", pace, &live),
            Pushed::DroppedOldest
        );
        let d = drained(&outbox);
        assert_eq!(texts(&d), ["c1"]);
        assert_eq!(d.dropped, 1);
        assert_eq!(outbox.queued_messages(), 1, "b2 still waits for its time");
    }
}
