//! The WebSocket edge: one client connection from upgrade to close.
//!
//! A session is a reader and a writer over the same WebSocket, speaking one of the
//! [`protocol::Protocol`]s. The reader decodes requests, runs subscribes and unsubscribes in
//! order, starts publishes (up to `server.max_inflight_publishes` at once, each answered when
//! its broker acknowledges it) and watches the idle timeout and the shutdown signal. The writer
//! drains the connection's [`Outbox`] in batches (many frames, one flush) and sends keepalive
//! pings. Both are written over `Sink + Stream`, so tests can drive a session without a network.

pub mod protocol;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message};
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::{Authenticator, Principal, Verified};
use crate::edge::connections::{ConnectionKind, Connections, NewConnection, Registration};
use crate::edge::{PositionJson, ProtocolError, Reply, Request};
use crate::fanout::outbox::{Drained, OutItem, Outbox};
use crate::fanout::upstream::Member;
use crate::fanout::{Hub, Status, SubscriptionHandle};
use crate::limits::{LimitsConfig, RequestLimiter};
use crate::metrics::Metrics;
use crate::routing::ChannelPattern;
use protocol::Protocol;

/// Close code sent when a client message exceeds `server.max_message_size`.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code sent on shutdown and idle timeout.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code sent when the connection's token expires without an in-band refresh.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;

/// How long a closing connection waits for the client's close reply.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The per-connection settings (from the `[server]` table).
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Interval of WebSocket pings.
    pub ping_interval: Duration,
    /// A connection that sends nothing for this long is closed with 1001.
    pub idle_timeout: Duration,
    /// Largest client message, in bytes.
    pub max_message_size: usize,
    /// Most subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Outgoing messages queued before the route's slow-consumer policy applies.
    pub queue_capacity: usize,
    /// Outgoing message bytes queued before the route's slow-consumer policy applies.
    pub queue_bytes: usize,
    /// Longest time one batch may take to reach the socket; a client that takes no data for
    /// this long is closed.
    pub write_timeout: Duration,
    /// Most publishes waiting for their broker acknowledgement at once.
    pub max_inflight_publishes: usize,
    /// On shutdown, how long the client gets to close after the 1001 close frame.
    pub shutdown_grace: Duration,
    /// On shutdown, the window over which connections' closes are spread.
    pub drain_window: Duration,
}

/// Everything a session needs from the gateway.
#[derive(Clone)]
pub struct SessionContext {
    pub hub: Arc<Hub>,
    pub config: Arc<SessionSettings>,
    pub limits: Arc<LimitsConfig>,
    pub auth: Arc<Authenticator>,
    /// Cancelled when the gateway shuts down.
    pub shutdown: CancellationToken,
    /// Every open connection, for the admin API.
    pub connections: Arc<Connections>,
}

/// Runs one client connection (from `remote_address`) to its end.
pub async fn run<S>(
    socket: S,
    id: u64,
    remote_address: SocketAddr,
    protocol: Protocol,
    verified: Verified,
    cx: SessionContext,
) where
    S: Stream<Item = Result<Message, axum::Error>>
        + Sink<Message, Error = axum::Error>
        + Send
        + 'static,
{
    let (sink, stream) = socket.split();
    let outbox = Arc::new(Outbox::new(cx.config.queue_capacity, cx.config.queue_bytes));
    let done = CancellationToken::new();
    // However this function ends (a panic included), the writer stops with it.
    let _stop_writer = done.clone().drop_guard();
    let close_sent = CancellationToken::new();
    let writer = tokio::spawn(
        write_loop(
            sink,
            outbox.clone(),
            protocol,
            WriterTimers {
                ping_interval: cx.config.ping_interval,
                write_timeout: cx.config.write_timeout,
            },
            WriterSignals {
                done: done.clone(),
                close_sent: close_sent.clone(),
                metrics: cx.hub.metrics().clone(),
            },
        )
        .instrument(tracing::Span::current()),
    );

    let registration = cx.connections.register(NewConnection {
        id,
        remote_address,
        subject: verified.principal.subject.clone(),
        kind: ConnectionKind::WebSocket(protocol),
        outbox: outbox.clone(),
    });
    let mut session = Session {
        id,
        protocol,
        expiry: expiry_instant(&verified, &cx),
        principal: verified.principal,
        outbox: outbox.clone(),
        subscriptions: Subscriptions::new(cx.hub.clone(), registration),
        limiter: RequestLimiter::new(&cx.limits, cx.config.max_message_size),
        cx,
    };
    session.read_loop(stream, &done, &close_sent).await;

    done.cancel();
    if let Err(e) = writer.await
        && e.is_panic()
    {
        session.cx.hub.metrics().panics("writer").inc();
        tracing::error!(id, error = %e, "panic in a connection's writer; connection closed");
    }
    session.subscriptions.release().await;
    tracing::debug!(id, "session ended");
}

/// A connection's subscriptions by the channel it subscribed with, and its entry in the
/// connection registry (listed there with these channels while this lives). Whatever is still
/// held when this is dropped (the session ended by a panic, or its task was dropped) is released
/// in the background, so no upstream keeps a dead connection as a member.
pub(crate) struct Subscriptions {
    hub: Arc<Hub>,
    held: HashMap<String, SubscriptionHandle>,
    registration: Registration,
}

impl Subscriptions {
    pub(crate) fn new(hub: Arc<Hub>, registration: Registration) -> Self {
        Subscriptions {
            hub,
            held: HashMap::new(),
            registration,
        }
    }

    pub(crate) fn insert(&mut self, channel: String, handle: SubscriptionHandle) {
        self.registration.entry().subscribed(&channel);
        self.held.insert(channel, handle);
    }

    pub(crate) fn remove(&mut self, channel: &str) -> Option<SubscriptionHandle> {
        self.registration.entry().unsubscribed(channel);
        self.held.remove(channel)
    }

    /// Releases every subscription now.
    pub(crate) async fn release(&mut self) {
        for (channel, handle) in self.held.drain() {
            self.registration.entry().unsubscribed(&channel);
            self.hub.unsubscribe(handle).await;
        }
    }
}

impl std::ops::Deref for Subscriptions {
    type Target = HashMap<String, SubscriptionHandle>;

    fn deref(&self) -> &Self::Target {
        &self.held
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let handles: Vec<SubscriptionHandle> = self.held.drain().map(|(_, h)| h).collect();
        let hub = self.hub.clone();
        // Without a runtime the gateway, and every upstream with it, is gone already.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for handle in handles {
                    hub.unsubscribe(handle).await;
                }
            });
        }
    }
}

struct Session {
    id: u64,
    protocol: Protocol,
    principal: Principal,
    /// When the token expires (with the configured leeway); `None` without a token or `exp`.
    expiry: Option<Instant>,
    outbox: Arc<Outbox>,
    subscriptions: Subscriptions,
    limiter: RequestLimiter,
    cx: SessionContext,
}

/// A random point of the drain window: when a shutting-down connection is closed, so the closes
/// (and the reconnects they cause) are spread over the window rather than all at once.
pub(crate) fn drain_delay(id: u64, window: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    if window.is_zero() {
        return Duration::ZERO;
    }
    // Randomly keyed per call: a uniform draw without a random-number dependency.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(id);
    // 53 random bits: a fraction in [0, 1), so the point lies inside the window.
    window.mul_f64((hasher.finish() >> 11) as f64 / (1u64 << 53) as f64)
}

/// The instant a token with `exp` (seconds since the epoch) stops being accepted.
fn expiry_instant(verified: &Verified, cx: &SessionContext) -> Option<Instant> {
    verified
        .remaining(cx.auth_leeway())
        .map(|left| Instant::now() + left)
}

impl SessionContext {
    fn auth_leeway(&self) -> Duration {
        self.auth.leeway()
    }
}

type Inflight = FuturesUnordered<std::pin::Pin<Box<dyn Future<Output = Reply> + Send>>>;

impl Session {
    async fn read_loop<R>(
        &mut self,
        stream: R,
        done: &CancellationToken,
        close_sent: &CancellationToken,
    ) where
        R: Stream<Item = Result<Message, axum::Error>> + Send,
    {
        let mut stream = pin!(stream);
        let mut inflight: Inflight = FuturesUnordered::new();
        let idle_timeout = self.cx.config.idle_timeout;
        let mut deadline = pin!(sleep_until(Instant::now() + idle_timeout));
        let far_future = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let mut expiry = pin!(sleep_until(self.expiry.unwrap_or(far_future)));
        let mut closing = false;
        // Shutting down: the connection is closed when `drain` fires.
        let mut draining = false;
        let mut drain = pin!(sleep_until(far_future));
        // After an oversized frame the stream cannot be read safely (the rest of the frame would
        // be buffered); the connection only waits for its close frame to go out.
        let mut stop_reading = false;

        loop {
            let can_read = !stop_reading
                && inflight.len() < self.cx.config.max_inflight_publishes
                && !self.outbox.replies_full();
            tokio::select! {
                biased;
                _ = done.cancelled() => break,
                // The writer sent a close this loop did not ask for (e.g. slow consumer).
                _ = close_sent.cancelled(), if !closing => {
                    closing = true;
                    deadline.as_mut().reset(Instant::now() + CLOSE_WAIT);
                }
                _ = self.cx.shutdown.cancelled(), if !closing && !draining => {
                    // Each connection is closed at its own point of the drain window, and is
                    // told when, so clients do not all reconnect elsewhere at once.
                    let after = drain_delay(self.id, self.cx.config.drain_window);
                    self.outbox.push_control(self.protocol.status(&Status {
                        code: "shutting_down",
                        message: "the gateway is shutting down; reconnect (to another instance) after the close".into(),
                        reconnect_after_ms: Some(u64::try_from(after.as_millis()).unwrap_or(u64::MAX)),
                        ..Status::default()
                    }));
                    draining = true;
                    drain.as_mut().reset(Instant::now() + after);
                }
                _ = drain.as_mut(), if draining && !closing => {
                    self.outbox.close(CLOSE_GOING_AWAY, "server shutting down");
                    closing = true;
                    deadline.as_mut().reset(Instant::now() + self.cx.config.shutdown_grace);
                }
                Some(reply) = inflight.next(), if !inflight.is_empty() => {
                    self.reply(&reply);
                }
                _ = expiry.as_mut(), if !closing => {
                    // A refresh may have moved the deadline since this timer was set.
                    match self.expiry {
                        Some(at) if at > Instant::now() => expiry.as_mut().reset(at),
                        _ => {
                            tracing::info!(id = self.id, subject = self.principal.display_name(), "token expired");
                            self.outbox.close(CLOSE_TOKEN_EXPIRED, "token expired");
                            closing = true;
                            deadline.as_mut().reset(Instant::now() + CLOSE_WAIT);
                        }
                    }
                }
                _ = self.outbox.space(), if !can_read && !stop_reading => {}
                _ = deadline.as_mut() => {
                    if closing {
                        break;
                    }
                    tracing::debug!(id = self.id, "idle timeout");
                    self.outbox.close(CLOSE_GOING_AWAY, "idle timeout");
                    closing = true;
                    deadline.as_mut().reset(Instant::now() + CLOSE_WAIT);
                }
                frame = stream.next(), if can_read => {
                    let frame = match frame {
                        None => break,
                        Some(Ok(frame)) => frame,
                        Some(Err(e)) => {
                            if closing {
                                break;
                            }
                            if is_capacity_error(e) {
                                let limit = self.cx.config.max_message_size;
                                self.outbox.close(
                                    CLOSE_TOO_BIG,
                                    format!("message too big (limit {limit} bytes)"),
                                );
                                closing = true;
                                stop_reading = true;
                                deadline.as_mut().reset(Instant::now() + CLOSE_WAIT);
                                continue;
                            }
                            break;
                        }
                    };
                    if !closing {
                        deadline.as_mut().reset(Instant::now() + idle_timeout);
                    }
                    if self.outbox.is_closing() && !closing {
                        closing = true;
                        deadline.as_mut().reset(Instant::now() + CLOSE_WAIT);
                    }
                    match frame {
                        Message::Text(_) | Message::Binary(_) if !closing => {
                            self.handle_frame(&frame, &mut inflight).await;
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn reply(&self, reply: &Reply) {
        self.outbox.push_control(self.protocol.reply(reply));
    }

    async fn handle_frame(&mut self, frame: &Message, inflight: &mut Inflight) {
        let request = match self.protocol.decode(frame) {
            Ok(request) => request,
            Err(e) => {
                self.reply(&e.into_reply());
                return;
            }
        };
        match request {
            Request::Ping { id } => self.reply(&Reply::Pong { id }),
            Request::Auth { id, token } => {
                let reply = match self.refresh(&token).await {
                    Ok(()) => Reply::ok(id),
                    Err(e) => Reply::error(id, e.code, e.message),
                };
                self.reply(&reply);
            }
            Request::Subscribe { id, channel, from } => {
                if let Err(message) = self.limiter.check_subscribe() {
                    self.reply(&Reply::error(id, "rate_limited", message));
                    return;
                }
                // Whatever the subscription brings before its reply (retained messages, the
                // first records of a replay) is written after the reply.
                self.outbox.hold();
                let reply = match self.subscribe(&channel, from).await {
                    Ok(()) => Reply::ok(id),
                    Err(e) => Reply::error(id, e.code, e.message),
                };
                self.outbox.release(self.protocol.reply(&reply));
            }
            Request::Unsubscribe { id, channel } => {
                if let Err(message) = self.limiter.check_subscribe() {
                    self.reply(&Reply::error(id, "rate_limited", message));
                    return;
                }
                let reply = match self.subscriptions.remove(&channel) {
                    Some(handle) => {
                        self.cx.hub.unsubscribe(handle).await;
                        Reply::ok(id)
                    }
                    None => Reply::error(
                        id,
                        "not_subscribed",
                        format!("no subscription to {channel:?} on this connection"),
                    ),
                };
                self.reply(&reply);
            }
            Request::Publish {
                id,
                channel,
                payload,
                key,
                headers,
                partition,
            } => {
                let channel = match ChannelPattern::parse_concrete(&channel) {
                    Ok(c) => c,
                    Err(e) => {
                        self.reply(&Reply::error(id, "invalid_channel", e.to_string()));
                        return;
                    }
                };
                if let Err(message) = self.limiter.check_publish(payload.len()) {
                    self.reply(&Reply::error(id, "rate_limited", message));
                    return;
                }
                let prepared = self.cx.hub.prepare_publish(
                    &self.principal,
                    &channel,
                    payload,
                    key,
                    headers,
                    partition,
                );
                match prepared {
                    Err(e) => self.reply(&Reply::error(id, e.code, e.message)),
                    Ok(prepared) => {
                        let hub = self.cx.hub.clone();
                        inflight.push(Box::pin(async move {
                            match hub.publish(prepared).await {
                                Ok(receipt) => Reply::Ok {
                                    id,
                                    position: receipt.position.map(PositionJson::from),
                                },
                                Err(e) => Reply::error(id, e.code, e.message),
                            }
                        }));
                    }
                }
            }
        }
    }

    /// Replaces the connection's token with a fresh one for the same subject. Subscriptions the
    /// new claims no longer allow are ended, each with a `subscription_revoked` status.
    async fn refresh(&mut self, token: &str) -> Result<(), ProtocolError> {
        let fail = |code, message: String| ProtocolError::new(None, code, message);
        let verified = match self.cx.auth.verify(token) {
            None => {
                return Err(fail(
                    "unsupported",
                    "authentication is not enabled on this gateway".into(),
                ));
            }
            Some(Err(e)) => {
                self.cx.hub.metrics().auth_failure(e.reason());
                return Err(fail("invalid_token", e.to_string()));
            }
            Some(Ok(v)) => v,
        };
        if verified.principal.subject != self.principal.subject {
            tracing::info!(
                id = self.id,
                subject = self.principal.display_name(),
                offered = verified.principal.display_name(),
                "refused token refresh for another subject"
            );
            return Err(fail(
                "forbidden",
                "the new token is for another subject; reconnect to change identity".into(),
            ));
        }
        self.expiry = expiry_instant(&verified, &self.cx);
        self.principal = verified.principal;
        let revoked: Vec<String> = self
            .subscriptions
            .values()
            .filter(|h| !self.cx.hub.may_subscribe(&self.principal, h.pattern()))
            .map(|h| h.pattern().to_string())
            .collect();
        for pattern in &revoked {
            if let Some(handle) = self.subscriptions.remove(pattern) {
                self.cx.hub.unsubscribe(handle).await;
            }
        }
        if !revoked.is_empty() {
            self.outbox.push_control(self.protocol.status(&Status {
                code: "subscription_revoked",
                message: "the refreshed token no longer allows these subscriptions".into(),
                subscriptions: revoked,
                ..Status::default()
            }));
        }
        Ok(())
    }

    async fn subscribe(
        &mut self,
        channel: &str,
        from: crate::backends::StartPosition,
    ) -> Result<(), ProtocolError> {
        let fail = |code, message: String| ProtocolError::new(None, code, message);
        let pattern =
            ChannelPattern::parse(channel).map_err(|e| fail("invalid_channel", e.to_string()))?;
        if self.subscriptions.contains_key(channel) {
            return Err(fail(
                "already_subscribed",
                format!("this connection is already subscribed to {channel:?}"),
            ));
        }
        let max = self.cx.config.max_subscriptions;
        if self.subscriptions.len() >= max {
            return Err(fail(
                "too_many_subscriptions",
                format!("a connection may hold at most {max} subscriptions"),
            ));
        }
        let max_replays = self.cx.limits.max_replays_per_connection;
        if from != crate::backends::StartPosition::Latest
            && max_replays != 0
            && self
                .subscriptions
                .values()
                .filter(|h| h.is_replay())
                .count()
                >= max_replays
        {
            return Err(fail(
                "too_many_replays",
                format!(
                    "a connection may hold at most {max_replays} replay subscriptions (limits.max_replays_per_connection)"
                ),
            ));
        }
        let member = Member::new(self.id, self.outbox.clone(), self.protocol.encoding());
        let handle = self
            .cx
            .hub
            .subscribe(member, pattern, from, &self.principal)
            .await
            .map_err(|e| fail(e.code, e.message))?;
        self.subscriptions.insert(channel.to_owned(), handle);
        Ok(())
    }
}

fn is_capacity_error(e: axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    let inner = e.into_inner();
    matches!(inner.downcast_ref::<Error>(), Some(Error::Capacity(_)))
}

/// The writer's clocks.
struct WriterTimers {
    ping_interval: Duration,
    write_timeout: Duration,
}

/// How the writer and reader tell each other about the end of the connection.
struct WriterSignals {
    /// Either side ends the connection; both stop.
    done: CancellationToken,
    /// The writer has sent a close frame.
    close_sent: CancellationToken,
    /// Where the writer counts write timeouts, frames, bytes and latency.
    metrics: Arc<Metrics>,
}

async fn write_loop<W>(
    mut sink: W,
    outbox: Arc<Outbox>,
    protocol: Protocol,
    timers: WriterTimers,
    signals: WriterSignals,
) where
    W: Sink<Message, Error = axum::Error> + Unpin,
{
    let done = signals.done.clone();
    // However the writer ends (a panic included), the reader stops with it.
    let _stop_reader = done.clone().drop_guard();
    let mut drained = Drained::default();
    let ping_interval = timers.ping_interval;
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut send_ping = false;
        tokio::select! {
            _ = done.cancelled() => return,
            _ = outbox.ready() => {}
            _ = ping.tick() => send_ping = true,
            // Only a connection with messages held back by a route's `max_rate` has this timer.
            _ = drained.due() => {}
        }
        outbox.drain(&mut drained);
        let close = drained.close.take();
        let (mut frames, mut bytes) = (0u64, 0u64);
        let write = async {
            if send_ping {
                sink.feed(Message::Ping(Bytes::new())).await?;
            }
            for status in drained.statuses() {
                let status = protocol.status(&status);
                let len = status.len() as u64;
                if let Some(message) = protocol.message(status) {
                    (frames, bytes) = (frames + 1, bytes + len);
                    sink.feed(message).await?;
                }
            }
            for item in drained.items.drain(..) {
                let (OutItem::Message(frame) | OutItem::Control(frame)) = item;
                let len = frame.len() as u64;
                match protocol.message(frame) {
                    Some(message) => {
                        (frames, bytes) = (frames + 1, bytes + len);
                        sink.feed(message).await?
                    }
                    None => tracing::error!(
                        protocol = ?protocol,
                        "dropped a frame that is not valid for this protocol"
                    ),
                }
            }
            if let Some(close) = &close {
                sink.feed(Message::Close(Some(CloseFrame {
                    code: close.code,
                    reason: close.reason.as_str().into(),
                })))
                .await?;
            }
            sink.flush().await
        };
        let result = match &close {
            // A closing connection gets a bounded time to take the close frame.
            Some(_) => tokio::time::timeout(CLOSE_WAIT, write)
                .await
                .unwrap_or(Ok(())),
            // However long the batch, it must reach the socket within the write timeout.
            None => tokio::select! {
                result = tokio::time::timeout(timers.write_timeout, write) => match result {
                    Ok(result) => result,
                    Err(_) => {
                        signals.metrics.write_timeouts.inc();
                        tracing::info!(timeout = ?timers.write_timeout, "client took no data within the write timeout; connection closed");
                        done.cancel();
                        return;
                    }
                },
                _ = done.cancelled() => return,
            },
        };
        drained.items.clear();
        if result.is_err() {
            done.cancel();
            return;
        }
        signals.metrics.frames_out.inc_by(frames);
        signals.metrics.bytes_out.inc_by(bytes);
        if let Some(received) = drained.oldest.take() {
            signals
                .metrics
                .delivery_latency
                .observe(received.elapsed().as_secs_f64());
        }
        if close.is_some() {
            // The close frame is out; the reader waits (boundedly) for the client's reply.
            signals.close_sent.cancel();
            done.cancelled().await;
            return;
        }
    }
}
