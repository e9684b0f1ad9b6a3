//! A connection's bounded outgoing queue.
//!
//! The fan-out pushes shared, already encoded message frames; the connection's edge pushes its
//! control frames (replies and status events, encoded in the connection's format). The
//! connection's writer drains everything queued at once, writes it and flushes once. When
//! queued messages reach the capacity in count or in bytes, the route's [`SlowConsumerPolicy`]
//! decides: drop the oldest queued messages (counted, and reported to the client in a
//! `messages_dropped` status frame) or close the connection with 1008. Pushing never blocks, so
//! a stalled client can never hold up a broker's event loop or another client.
//!
//! While a subscribe is in progress the connection [holds](Outbox::hold) its queue: what is
//! pushed meanwhile (a retained message, the first records of a replay) waits behind the place
//! where the subscribe's reply goes, so no message reaches the client before its `ok`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::Notify;

use super::encoding::Frame;
use crate::config::SlowConsumerPolicy;

/// WebSocket close code for a slow consumer (policy violation).
pub const CLOSE_SLOW_CONSUMER: u16 = 1008;

/// Something waiting to be written to the client.
#[derive(Debug)]
pub enum OutItem {
    /// An encoded broker message, shared with other subscribers.
    Message(Frame),
    /// A reply or status event for this connection; never dropped.
    Control(Frame),
}

/// What [`Outbox::push_message`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue was full and the oldest queued message was dropped to make room.
    DroppedOldest,
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

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<OutItem>,
    messages: usize,
    /// Bytes of the queued messages.
    bytes: usize,
    replies: usize,
    /// Where a pending reply goes: only what is queued before it may be drained.
    hold: Option<usize>,
    dropped: u64,
    /// Messages dropped over the connection's life.
    dropped_total: u64,
    /// When the earliest message queued since the last drain was received from its broker.
    oldest: Option<Instant>,
    close: Option<CloseRequest>,
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
    /// When the earliest message taken was received from its broker (`None` without messages):
    /// the writer measures the batch's delivery latency from it.
    pub oldest: Option<Instant>,
    pub close: Option<CloseRequest>,
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
        self.push_received(frame, policy, live, Instant::now())
    }

    /// [`Outbox::push_message`] for a message received from its broker at `received`.
    pub fn push_received(
        &self,
        frame: Frame,
        policy: SlowConsumerPolicy,
        live: &AtomicBool,
        received: Instant,
    ) -> Pushed {
        let mut state = self.lock();
        if state.close.is_some() {
            return Pushed::Closed;
        }
        if !live.load(Ordering::Acquire) {
            return Pushed::Unsubscribed;
        }
        let mut outcome = Pushed::Queued;
        if self.is_full(&state, frame.len()) {
            match policy {
                SlowConsumerPolicy::DropOldest => {
                    while self.is_full(&state, frame.len()) {
                        let oldest = state
                            .queue
                            .iter()
                            .position(|item| matches!(item, OutItem::Message(_)));
                        let Some(pos) = oldest else { break };
                        if let Some(OutItem::Message(old)) = state.queue.remove(pos) {
                            state.bytes -= old.len();
                        }
                        if let Some(hold) = &mut state.hold
                            && pos < *hold
                        {
                            *hold -= 1;
                        }
                        state.messages -= 1;
                        state.dropped += 1;
                        state.dropped_total += 1;
                    }
                    outcome = Pushed::DroppedOldest;
                }
                SlowConsumerPolicy::Disconnect => {
                    state.close = Some(CloseRequest {
                        code: CLOSE_SLOW_CONSUMER,
                        reason: "slow consumer: outgoing queue full".into(),
                    });
                    drop(state);
                    self.ready.notify_one();
                    return Pushed::Disconnected;
                }
            }
        }
        state.bytes += frame.len();
        state.oldest = Some(state.oldest.map_or(received, |t| t.min(received)));
        state.queue.push_back(OutItem::Message(frame));
        state.messages += 1;
        let wake = state.queue.len() == 1 && state.hold.is_none();
        drop(state);
        if wake || outcome != Pushed::Queued {
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
            state.queue.push_back(OutItem::Control(frame));
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
            state.hold = Some(state.queue.len());
        }
    }

    /// Puts `reply` where [`Outbox::hold`] was called and lets everything after it go.
    pub fn release(&self, reply: Frame) {
        let mut state = self.lock();
        let at = state
            .hold
            .take()
            .unwrap_or(state.queue.len())
            .min(state.queue.len());
        if state.close.is_none() {
            state.queue.insert(at, OutItem::Control(reply));
            state.replies += 1;
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

    /// Takes everything queued (up to a [hold](Outbox::hold)). `items` is reused between calls
    /// to avoid allocating.
    pub fn drain(&self, drained: &mut Drained) {
        let mut state = self.lock();
        match state.hold {
            None => {
                drained.items.extend(state.queue.drain(..));
                state.messages = 0;
                state.bytes = 0;
                state.replies = 0;
            }
            Some(at) => {
                drained.items.extend(state.queue.drain(..at));
                state.hold = Some(0);
                let (mut messages, mut bytes, mut replies) = (0, 0, 0);
                for item in &state.queue {
                    match item {
                        OutItem::Message(frame) => {
                            messages += 1;
                            bytes += frame.len();
                        }
                        OutItem::Control(_) => replies += 1,
                    }
                }
                (state.messages, state.bytes, state.replies) = (messages, bytes, replies);
            }
        }
        drained.dropped = std::mem::take(&mut state.dropped);
        // Messages left behind a hold keep the stamp (an upper bound for their latency).
        drained.oldest = if state.messages == 0 {
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
}
