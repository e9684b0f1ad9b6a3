//! One topic's upstream WebSocket: the [`Link`] the backend shares with the task that owns the
//! socket, and that task ([`supervise`]).
//!
//! The task connects (TCP, TLS for `wss://`, the handshake, all within `connect_timeout`), then
//! runs one `select!` over the upstream's messages, the publishes queued for it, pings and
//! cancellation. Each text or binary message is handed to every sink on the topic; sinks queue
//! per client and never block, so a slow client never slows the reader. When the connection
//! fails the task reports it in the link's [`LinkState`] and connects again with exponential
//! backoff, until the link is cancelled (its last subscriber left, or the backend closed).

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::config::WebsocketConfig;
use crate::backends::adapter::{
    BackendError, BrokerMessage, MessageSink, UpstreamId, backoff, contain,
};

/// How long closing a connection waits for the close frame to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Read buffer of each upstream socket; tungstenite's default is 128 KiB per socket.
const READ_BUFFER_SIZE: usize = 16 * 1024;

/// A byte stream a WebSocket runs over: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

type Upstream = WebSocketStream<Box<dyn Io>>;

/// Where a topic's connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected (yet, or again). `failures` counts failed attempts since the last open
    /// connection; `was_open` says whether this link has been connected before.
    Connecting {
        failures: u64,
        was_open: bool,
        reason: Option<String>,
    },
    Open,
    /// The task has stopped; the link is not used again.
    Closed,
}

/// A message to write on a topic's connection, with who waits for it to be flushed.
pub struct Outgoing {
    pub message: Message,
    pub done: oneshot::Sender<Result<(), BackendError>>,
}

/// One subscription's sink on a topic.
type Sinks = Arc<Vec<(UpstreamId, Arc<dyn MessageSink>)>>;

/// One topic's upstream connection, shared by the backend (which adds and removes sinks and
/// queues publishes) and the task that owns the socket.
pub struct Link {
    pub topic: String,
    /// The topic's upstream URL, for messages and logs.
    pub url: String,
    /// A snapshot replaced on each change, so a delivery holds no lock while it hands over.
    sinks: RwLock<Sinks>,
    pub state: watch::Sender<LinkState>,
    pub outgoing: mpsc::Sender<Outgoing>,
    pub cancel: CancellationToken,
}

impl Link {
    pub fn new(
        topic: String,
        url: String,
        cancel: CancellationToken,
        queue: usize,
    ) -> (Arc<Link>, mpsc::Receiver<Outgoing>) {
        let (outgoing, receiver) = mpsc::channel(queue);
        let link = Link {
            topic,
            url,
            sinks: RwLock::new(Arc::new(Vec::new())),
            state: watch::Sender::new(LinkState::Connecting {
                failures: 0,
                was_open: false,
                reason: None,
            }),
            outgoing,
            cancel,
        };
        (Arc::new(link), receiver)
    }

    fn sinks(&self) -> Sinks {
        self.sinks.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn add_sink(&self, id: UpstreamId, sink: Arc<dyn MessageSink>) {
        let mut sinks = self.sinks.write().unwrap_or_else(|e| e.into_inner());
        let mut next = Vec::with_capacity(sinks.len() + 1);
        next.extend(sinks.iter().cloned());
        next.push((id, sink));
        *sinks = Arc::new(next);
    }

    /// Removes a sink; returns how many are left.
    pub fn remove_sink(&self, id: UpstreamId) -> usize {
        let mut sinks = self.sinks.write().unwrap_or_else(|e| e.into_inner());
        let next: Vec<_> = sinks.iter().filter(|(i, _)| *i != id).cloned().collect();
        *sinks = Arc::new(next);
        sinks.len()
    }

    pub fn sink_count(&self) -> usize {
        self.sinks.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_open(&self) -> bool {
        matches!(*self.state.borrow(), LinkState::Open)
    }

    fn deliver(&self, payload: Bytes) {
        let message = BrokerMessage {
            topic: self.topic.clone(),
            payload,
            timestamp: Some(now_ms()),
            ..BrokerMessage::default()
        };
        for (_, sink) in self.sinks().iter() {
            sink.deliver(message.clone());
        }
    }

    fn set_state(&self, shared: &Shared, state: LinkState) {
        self.state.send_replace(state);
        shared.refresh_health();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Runs a topic's connection until its link is cancelled, starting it again after a panic
/// (counted in `panics`): the socket is dropped and the link reconnects as after any failure.
pub async fn supervise(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut outgoing: mpsc::Receiver<Outgoing>,
) {
    loop {
        let result = contain::future(run(&shared, &link, &mut outgoing)).await;
        let Err(panic) = result else { break };
        shared.panics.inc();
        tracing::error!(topic = %link.topic, %panic, "the WebSocket upstream task panicked; reconnecting");
        link.set_state(
            &shared,
            LinkState::Connecting {
                failures: 1,
                was_open: true,
                reason: Some(format!(
                    "the connection task failed ({panic}); reconnecting"
                )),
            },
        );
        tokio::select! {
            _ = link.cancel.cancelled() => break,
            _ = tokio::time::sleep(shared.config.reconnect_min_delay) => {}
        }
    }
    outgoing.close();
    while let Ok(queued) = outgoing.try_recv() {
        let _ = queued.done.send(Err(closed_error(&link)));
    }
    link.set_state(&shared, LinkState::Closed);
}

fn closed_error(link: &Link) -> BackendError {
    BackendError::Unavailable(format!(
        "the upstream connection of topic {:?} is closed",
        link.topic
    ))
}

/// Why a connection ended.
enum Ended {
    /// The link was cancelled; the close frame has been sent.
    Cancelled,
    /// The connection failed or the upstream closed it.
    Lost(String),
}

/// Connects, serves and reconnects until the link is cancelled.
async fn run(shared: &Shared, link: &Link, outgoing: &mut mpsc::Receiver<Outgoing>) {
    let config = &shared.config;
    let mut failures: u64 = 0;
    let mut was_open = matches!(
        *link.state.borrow(),
        LinkState::Connecting { was_open: true, .. }
    );
    loop {
        let attempt = tokio::select! {
            _ = link.cancel.cancelled() => return,
            attempt = tokio::time::timeout(config.connect_timeout, connect(config, shared.tls.as_ref(), &link.topic)) => attempt,
        };
        let reason = match attempt {
            Ok(Ok(upstream)) => {
                failures = 0;
                was_open = true;
                link.set_state(shared, LinkState::Open);
                tracing::info!(topic = %link.topic, url = %link.url, "connected to the WebSocket upstream");
                match serve(config, link, upstream, outgoing).await {
                    Ended::Cancelled => return,
                    Ended::Lost(reason) => {
                        tracing::warn!(topic = %link.topic, url = %link.url, %reason, "lost the WebSocket upstream");
                        reason
                    }
                }
            }
            Ok(Err(reason)) => {
                tracing::debug!(topic = %link.topic, url = %link.url, %reason, failures, "cannot connect to the WebSocket upstream");
                reason
            }
            Err(_) => format!(
                "no connection within connect_timeout ({})",
                humantime::format_duration(config.connect_timeout)
            ),
        };
        failures += 1;
        link.set_state(
            shared,
            LinkState::Connecting {
                failures,
                was_open,
                reason: Some(reason),
            },
        );
        let delay = backoff(
            u32::try_from(failures.saturating_sub(1)).unwrap_or(u32::MAX),
            config.reconnect_min_delay,
            config.reconnect_max_delay,
        );
        let wake = tokio::time::sleep(delay);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = link.cancel.cancelled() => return,
                _ = &mut wake => break,
                queued = outgoing.recv() => match queued {
                    Some(queued) => {
                        let _ = queued.done.send(Err(BackendError::Unavailable(format!(
                            "the upstream connection of topic {:?} was lost; reconnecting",
                            link.topic
                        ))));
                    }
                    None => return,
                },
            }
        }
    }
}

/// Opens a topic's upstream connection: TCP, TLS for `wss://`, then the handshake.
async fn connect(
    config: &WebsocketConfig,
    tls: Option<&TlsConnector>,
    topic: &str,
) -> Result<Upstream, String> {
    let request = config.request(topic)?;
    let uri = request.uri();
    let secure = uri.scheme_str() == Some("wss");
    let host = uri
        .host()
        .ok_or_else(|| "the URL has no host".to_string())?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = if secure {
        let connector = tls.ok_or_else(|| "TLS is not set up for this backend".to_string())?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))?;
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host}:{port} failed: {e}"))?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let limit = config.hard_message_limit();
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_SIZE)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let (upstream, _response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config))
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(response) => format!(
                    "the upstream refused the WebSocket handshake with HTTP {}",
                    response.status()
                ),
                other => format!("WebSocket handshake failed: {other}"),
            })?;
    Ok(upstream)
}

/// Serves one open connection until it fails or the link is cancelled.
async fn serve(
    config: &WebsocketConfig,
    link: &Link,
    mut upstream: Upstream,
    outgoing: &mut mpsc::Receiver<Outgoing>,
) -> Ended {
    let ping_every = config.ping_interval;
    let mut ping = tokio::time::interval_at(
        Instant::now() + ping_every.max(Duration::from_secs(1)),
        ping_every.max(Duration::from_secs(1)),
    );
    let mut last_heard = Instant::now();
    let mut closed_with: Option<String> = None;
    let mut skipped: u64 = 0;
    // Writes are bounded so an upstream that stops reading cannot hold the reader forever.
    let write_wait = config.connect_timeout;
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Unbiased: a flood from the upstream must not starve the publishes waiting to go out.
    loop {
        tokio::select! {
            _ = link.cancel.cancelled() => {
                let goodbye = CloseFrame { code: CloseCode::Away, reason: "".into() };
                let _ = tokio::time::timeout(CLOSE_WAIT, upstream.close(Some(goodbye))).await;
                return Ended::Cancelled;
            }
            received = upstream.next() => {
                let message = match received {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => return Ended::Lost(read_error(e, config)),
                    None => {
                        return Ended::Lost(closed_with.unwrap_or_else(|| {
                            "the upstream closed the connection".to_string()
                        }));
                    }
                };
                last_heard = Instant::now();
                let payload = match message {
                    Message::Text(text) => Bytes::from(text),
                    Message::Binary(bytes) => bytes,
                    Message::Close(frame) => {
                        // tungstenite answers the close; the stream ends after that.
                        closed_with = Some(match frame {
                            Some(f) => format!(
                                "the upstream closed the connection ({} {})",
                                u16::from(f.code),
                                f.reason
                            ),
                            None => "the upstream closed the connection".to_string(),
                        });
                        continue;
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                };
                if payload.len() > config.max_message_size {
                    skipped += 1;
                    tracing::warn!(
                        topic = %link.topic,
                        size = payload.len(),
                        limit = config.max_message_size,
                        skipped,
                        "skipped an upstream message larger than max_message_size"
                    );
                    continue;
                }
                link.deliver(payload);
            }
            queued = outgoing.recv() => {
                let Some(queued) = queued else { return Ended::Cancelled };
                match tokio::time::timeout(write_wait, upstream.send(queued.message)).await {
                    Ok(Ok(())) => {
                        let _ = queued.done.send(Ok(()));
                    }
                    Ok(Err(e)) => {
                        let reason = format!("writing to the upstream failed: {e}");
                        let _ = queued.done.send(Err(BackendError::Unavailable(reason.clone())));
                        return Ended::Lost(reason);
                    }
                    Err(_) => {
                        let reason = format!(
                            "the upstream did not take a message within {}",
                            humantime::format_duration(write_wait)
                        );
                        let _ = queued.done.send(Err(BackendError::Timeout(write_wait)));
                        return Ended::Lost(reason);
                    }
                }
            }
            _ = ping.tick(), if !ping_every.is_zero() => {
                if last_heard.elapsed() > ping_every * 2 {
                    return Ended::Lost(format!(
                        "the upstream sent nothing for {}, not even a pong",
                        humantime::format_duration(ping_every * 2)
                    ));
                }
                let sent = tokio::time::timeout(write_wait, upstream.send(Message::Ping(Bytes::new()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    return Ended::Lost("could not send a ping to the upstream".into());
                }
            }
        }
    }
}

fn read_error(error: tungstenite::Error, config: &WebsocketConfig) -> String {
    match error {
        tungstenite::Error::Capacity(e) => format!(
            "the upstream sent a message beyond {} bytes (16 × max_message_size): {e}",
            config.hard_message_limit()
        ),
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => "the connection dropped without a close frame".to_string(),
        tungstenite::Error::Protocol(e) => {
            format!("the upstream broke the WebSocket protocol: {e}")
        }
        other => format!("the connection failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter(std::sync::Mutex<Vec<Bytes>>);

    impl MessageSink for Counter {
        fn deliver(&self, message: BrokerMessage) {
            self.0.lock().unwrap().push(message.payload);
        }
        fn event(&self, _: crate::backends::adapter::SubscriptionEvent) {}
    }

    #[test]
    fn a_link_delivers_to_every_sink_it_holds() {
        let (link, _rx) = Link::new("t".into(), "ws://h/t".into(), CancellationToken::new(), 4);
        let a = Arc::new(Counter(Default::default()));
        let b = Arc::new(Counter(Default::default()));
        link.add_sink(1, a.clone());
        link.add_sink(2, b.clone());
        link.deliver(Bytes::from_static(b"x"));
        assert_eq!(link.remove_sink(1), 1);
        link.deliver(Bytes::from_static(b"y"));
        assert_eq!(a.0.lock().unwrap().len(), 1);
        assert_eq!(b.0.lock().unwrap().len(), 2);
        assert_eq!(link.sink_count(), 1);
    }
}
