//! A connection's bounded outgoing queue.
//!
//! The fan-out pushes shared, already encoded message frames; the connection's edge pushes its
//! control frames (replies and status events, encoded in the connection's format). The
//! connection's writer drains everything queued at once, writes it and flushes once. When messages reach the capacity, the route's [`SlowConsumerPolicy`] decides: drop the
//! oldest queued message (counted, and reported to the client in a `messages_dropped` status
//! frame) or close the connection with 1008. Pushing never blocks, so a stalled client can never
//! hold up a broker's event loop or another client.

use std::collections::VecDeque;
use std::sync::Mutex;

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
    replies: usize,
    dropped: u64,
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
}

/// Everything taken from the queue by one [`Outbox::drain`].
#[derive(Debug, Default)]
pub struct Drained {
    pub items: Vec<OutItem>,
    /// Messages dropped since the previous drain.
    pub dropped: u64,
    pub close: Option<CloseRequest>,
}

impl Outbox {
    /// An outbox holding up to `capacity` messages (and as many replies).
    pub fn new(capacity: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            space: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a broker message, applying `policy` when the queue is full.
    pub fn push_message(&self, frame: Frame, policy: SlowConsumerPolicy) -> Pushed {
        let mut state = self.lock();
        if state.close.is_some() {
            return Pushed::Closed;
        }
        let mut outcome = Pushed::Queued;
        if state.messages >= self.capacity {
            match policy {
                SlowConsumerPolicy::DropOldest => {
                    let oldest = state
                        .queue
                        .iter()
                        .position(|item| matches!(item, OutItem::Message(_)));
                    if let Some(pos) = oldest {
                        state.queue.remove(pos);
                        state.messages -= 1;
                        state.dropped += 1;
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
        state.queue.push_back(OutItem::Message(frame));
        state.messages += 1;
        let wake = state.queue.len() == 1;
        drop(state);
        if wake || outcome != Pushed::Queued {
            self.ready.notify_one();
        }
        outcome
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

    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    /// Resolves when there may be something to drain.
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Takes everything queued. `items` is reused between calls to avoid allocating.
    pub fn drain(&self, drained: &mut Drained) {
        let mut state = self.lock();
        drained.items.extend(state.queue.drain(..));
        drained.dropped = std::mem::take(&mut state.dropped);
        drained.close = state.close.clone();
        state.messages = 0;
        state.replies = 0;
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
        let outbox = Outbox::new(3);
        outbox.push_control(reply(1));
        for n in 0..5 {
            let pushed = outbox.push_message(msg(n), SlowConsumerPolicy::DropOldest);
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
    fn disconnect_policy_closes_with_1008() {
        let outbox = Outbox::new(2);
        outbox.push_message(msg(0), SlowConsumerPolicy::Disconnect);
        outbox.push_message(msg(1), SlowConsumerPolicy::Disconnect);
        assert_eq!(
            outbox.push_message(msg(2), SlowConsumerPolicy::Disconnect),
            Pushed::Disconnected
        );
        assert_eq!(
            outbox.push_message(msg(3), SlowConsumerPolicy::Disconnect),
            Pushed::Closed
        );
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert_eq!(d.close.unwrap().code, CLOSE_SLOW_CONSUMER);
    }

    #[test]
    fn unread_replies_close_instead_of_growing() {
        let outbox = Outbox::new(2);
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
        let outbox = Outbox::new(2);
        outbox.close(1009, "too big");
        outbox.close(1001, "shutdown");
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert_eq!(d.close.unwrap().code, 1009);
    }
}
