//! Proxy routes (`[[proxies]]`): a public path whose WebSocket connections are relayed to
//! upstream WebSocket services, each client paired with one upstream connection for its life.
//!
//! The server checks a client like any other (Origin, token, connection limits), then
//! [`ProxyRoute::connect`] picks an upstream from the route's [`pool::UpstreamPool`] and opens
//! it with the client's offered subprotocols and the configured forwarding headers, before the
//! client's upgrade is answered; the upstream's subprotocol choice is the client's answer.
//! [`run`] then relays the pair: two read-one/send-one loops, one per direction, so a slow side
//! slows only its own pair and nothing is buffered beyond one message each way. The pair ends
//! when either side closes or fails, on shutdown or by the admin API; each side then gets the
//! close that tells it why (docs/PROXY.md).

pub mod config;
pub mod connect;
pub mod pool;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame as ClientCloseFrame, Message as ClientMessage};
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use bytes::Bytes;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as UpstreamCloseFrame;
use tokio_tungstenite::tungstenite::{Message as UpstreamMessage, Utf8Bytes};

pub use config::ProxyConfig;
use connect::UpstreamUrl;
use pool::{Connected, NoUpstream, UpstreamPool};

use crate::auth::{SUBPROTOCOL_TOKEN_PREFIX, Verified};
use crate::edge::connections::{ConnectionKind, NewConnection, ProxiedTo};
use crate::edge::ws::{SessionContext, drain_delay};
use crate::fanout::outbox::{Drained, Outbox};
use crate::metrics::{Metrics, ProxyMetrics};

/// Close code a client gets when its upstream drops the connection without a close frame
/// (IANA: "Bad Gateway").
pub const CLOSE_BAD_GATEWAY: u16 = 1014;
/// Close code of a client that sends messages faster than `max_messages_per_second`.
pub const CLOSE_POLICY: u16 = 1008;
/// Close code of a client message over `max_message_size`.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code on shutdown, and for a side whose peer left or was closed for a limit.
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// How long a closing pair waits for each side's close reply.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// One `[[proxies]]` entry, ready to serve.
pub struct ProxyRoute {
    pub config: ProxyConfig,
    pub pool: Arc<UpstreamPool>,
    /// Largest client message (`max_message_size`, or `server.max_message_size`).
    pub max_message_size: usize,
}

/// What the upstream handshake is built from: the client's upgrade request, as checked.
pub struct ClientHandshake<'a> {
    pub headers: &'a HeaderMap,
    pub uri: &'a Uri,
    pub verified: &'a Verified,
    /// The client's address (as reported by a trusted proxy, if any).
    pub client_ip: IpAddr,
}

impl ProxyRoute {
    /// The route of a validated entry; `server_max_message_size` is the default message limit.
    pub fn new(config: ProxyConfig, metrics: &Metrics, server_max_message_size: usize) -> Self {
        ProxyRoute {
            pool: Arc::new(UpstreamPool::new(&config, metrics)),
            max_message_size: config.max_message_size.unwrap_or(server_max_message_size),
            config,
        }
    }

    /// The public path.
    pub fn path(&self) -> &str {
        &self.config.path
    }

    /// Opens an upstream for this client, trying each upstream that is not taken out.
    pub async fn connect(&self, client: &ClientHandshake<'_>) -> Result<Connected, NoUpstream> {
        self.pool
            .connect(|url| self.upstream_request(url, client))
            .await
    }

    /// The client's subprotocol offers, without token entries unless the token is forwarded.
    fn offered_subprotocols(&self, headers: &HeaderMap) -> Vec<String> {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .filter(|p| self.config.forward_token || !p.starts_with(SUBPROTOCOL_TOKEN_PREFIX))
            .map(str::to_owned)
            .collect()
    }

    /// The client's query string, without `access_token` unless the token is forwarded.
    fn forwarded_query(&self, uri: &Uri) -> Option<String> {
        let query = uri.query()?;
        if self.config.forward_token {
            return Some(query.to_owned());
        }
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| pair.split('=').next() != Some("access_token"))
            .collect();
        Some(kept.join("&"))
    }

    /// The handshake request to `url` for `client`.
    fn upstream_request(&self, url: &UpstreamUrl, client: &ClientHandshake<'_>) -> Option<Request> {
        let target = url.with_query(self.forwarded_query(client.uri).as_deref());
        let mut request = target.into_client_request().ok()?;
        let headers = request.headers_mut();
        let offered = self.offered_subprotocols(client.headers);
        if !offered.is_empty()
            && let Ok(value) = HeaderValue::from_str(&offered.join(", "))
        {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, value);
        }
        if let Ok(value) = HeaderValue::from_str(&client.client_ip.to_string()) {
            headers.insert("x-forwarded-for", value);
        }
        let principal = &client.verified.principal;
        if let (Some(name), Some(subject)) = (&self.config.forward_subject, &principal.subject)
            && let (Ok(name), Ok(value)) = (
                header::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(subject),
            )
        {
            headers.insert(name, value);
        }
        for (name, claim) in &self.config.forward_claims {
            let Some(value) = principal.claims.get(claim) else {
                continue;
            };
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if let (Ok(name), Ok(value)) = (
                header::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&text),
            ) {
                headers.insert(name, value);
            }
        }
        if self.config.forward_token {
            for name in [header::AUTHORIZATION, header::COOKIE] {
                for value in client.headers.get_all(&name) {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        Some(request)
    }
}

/// A client and its upstream, ready to relay.
pub struct Pair {
    pub id: u64,
    pub remote_address: SocketAddr,
    pub subject: Option<String>,
    pub route: Arc<ProxyRoute>,
    pub upstream: Connected,
}

/// Why a pair ends.
#[derive(Debug)]
enum End {
    /// The client sent a close frame (passed on as it came).
    ClientClosed(Option<ClientCloseFrame>),
    /// The client went away without a close frame.
    ClientGone,
    ClientTooBig,
    ClientTooFast,
    /// The client took no data for `server.write_timeout`.
    ClientStalled,
    UpstreamClosed(Option<UpstreamCloseFrame>),
    /// The upstream went away without a close frame, or took no data for `write_timeout`.
    UpstreamGone,
    Shutdown,
    Administrator(u16, String),
}

/// A per-connection message budget: `per_second` messages a second, bursts of as many.
struct MessageRate {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl MessageRate {
    fn new(per_second: u32) -> Self {
        MessageRate {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            last: Instant::now(),
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn is_capacity_error(e: &axum::Error) -> bool {
    use std::error::Error as _;
    use tokio_tungstenite::tungstenite::Error;
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(error) = source {
        if matches!(error.downcast_ref::<Error>(), Some(Error::Capacity(_))) {
            return true;
        }
        source = error.source();
    }
    false
}

fn client_close(code: u16, reason: &str) -> Option<ClientCloseFrame> {
    Some(ClientCloseFrame {
        code,
        reason: reason.into(),
    })
}

fn upstream_close(code: u16, reason: &str) -> Option<UpstreamCloseFrame> {
    Some(UpstreamCloseFrame {
        code: code.into(),
        reason: reason.into(),
    })
}

/// The upstream's view of a client message (text is re-checked as UTF-8, not copied).
fn to_upstream(message: ClientMessage) -> Option<UpstreamMessage> {
    Some(match message {
        ClientMessage::Text(text) => {
            UpstreamMessage::Text(Utf8Bytes::try_from(Bytes::from(text)).ok()?)
        }
        ClientMessage::Binary(data) => UpstreamMessage::Binary(data),
        ClientMessage::Ping(data) => UpstreamMessage::Ping(data),
        ClientMessage::Pong(data) => UpstreamMessage::Pong(data),
        ClientMessage::Close(_) => return None,
    })
}

/// The client's view of an upstream message.
fn to_client(message: UpstreamMessage) -> Option<ClientMessage> {
    Some(match message {
        UpstreamMessage::Text(text) => ClientMessage::Text(Bytes::from(text).try_into().ok()?),
        UpstreamMessage::Binary(data) => ClientMessage::Binary(data),
        UpstreamMessage::Ping(data) => ClientMessage::Ping(data),
        UpstreamMessage::Pong(data) => ClientMessage::Pong(data),
        UpstreamMessage::Close(_) | UpstreamMessage::Frame(_) => return None,
    })
}

fn payload_len(message: &UpstreamMessage) -> u64 {
    message.len() as u64
}

/// Relays one pair until either side ends it, then closes both (docs/PROXY.md, close codes).
pub async fn run<S>(client: S, pair: Pair, cx: SessionContext)
where
    S: Stream<Item = Result<ClientMessage, axum::Error>>
        + Sink<ClientMessage, Error = axum::Error>
        + Send
        + 'static,
{
    let Pair {
        id,
        remote_address,
        subject,
        route,
        upstream,
    } = pair;
    let Connected {
        socket,
        subprotocol,
        lease,
    } = upstream;
    let metrics = lease.upstream().metrics.clone();
    // The admin API closes a connection through its outbox; a pair queues nothing in it.
    let outbox = Arc::new(Outbox::new(1, 1));
    let _registration = cx.connections.register_proxied(
        NewConnection {
            id,
            remote_address,
            subject,
            kind: ConnectionKind::Proxy,
            outbox: outbox.clone(),
        },
        ProxiedTo {
            proxy: route.config.path.clone(),
            upstream: lease.upstream().url.url.clone(),
            subprotocol,
        },
    );
    let (mut client_tx, mut client_rx) = client.split();
    let (mut upstream_tx, mut upstream_rx) = socket.split();
    let write_timeout = cx.config.write_timeout;

    let end = {
        let to_upstream = relay_to_upstream(
            &mut client_rx,
            &mut upstream_tx,
            route.config.max_messages_per_second.map(MessageRate::new),
            &metrics,
            write_timeout,
        );
        let to_client = relay_to_client(&mut upstream_rx, &mut client_tx, &metrics, write_timeout);
        let shutdown = async {
            cx.shutdown.cancelled().await;
            tokio::time::sleep(drain_delay(id, cx.config.drain_window)).await;
        };
        let administrator = async {
            loop {
                outbox.ready().await;
                if outbox.is_closing() {
                    let mut drained = Drained::default();
                    outbox.drain(&mut drained);
                    return drained.close;
                }
            }
        };
        tokio::select! {
            end = to_upstream => end,
            end = to_client => end,
            _ = shutdown => End::Shutdown,
            Some(close) = administrator => End::Administrator(close.code, close.reason),
        }
    };
    tracing::debug!(?end, "proxied connection ending");

    let limit = route.max_message_size;
    let (for_client, for_upstream) = match end {
        End::ClientClosed(frame) => (
            None,
            Some(frame.map(|f| UpstreamCloseFrame {
                code: f.code.into(),
                reason: Utf8Bytes::from(f.reason.as_str()),
            })),
        ),
        End::ClientGone => (
            None,
            Some(upstream_close(CLOSE_GOING_AWAY, "client went away")),
        ),
        End::ClientTooBig => (
            Some(client_close(
                CLOSE_TOO_BIG,
                &format!("message too big (limit {limit} bytes)"),
            )),
            Some(upstream_close(
                CLOSE_GOING_AWAY,
                "client sent a message over the size limit",
            )),
        ),
        End::ClientTooFast => (
            Some(client_close(CLOSE_POLICY, "message rate limit exceeded")),
            Some(upstream_close(
                CLOSE_GOING_AWAY,
                "client exceeded the message rate limit",
            )),
        ),
        End::ClientStalled => (
            None,
            Some(upstream_close(CLOSE_GOING_AWAY, "client stopped reading")),
        ),
        End::UpstreamClosed(frame) => (
            Some(frame.map(|f| ClientCloseFrame {
                code: f.code.into(),
                reason: f.reason.as_str().into(),
            })),
            None,
        ),
        End::UpstreamGone => (
            Some(client_close(CLOSE_BAD_GATEWAY, "upstream connection lost")),
            None,
        ),
        End::Shutdown => (
            Some(client_close(CLOSE_GOING_AWAY, "server shutting down")),
            Some(upstream_close(CLOSE_GOING_AWAY, "server shutting down")),
        ),
        End::Administrator(code, reason) => (
            Some(client_close(code, &reason)),
            Some(upstream_close(CLOSE_GOING_AWAY, &reason)),
        ),
    };
    let wait = if cx.shutdown.is_cancelled() {
        cx.config.shutdown_grace.min(CLOSE_WAIT)
    } else {
        CLOSE_WAIT
    };
    let close_client = async {
        if let Some(frame) = for_client {
            let _ = client_tx.send(ClientMessage::Close(frame)).await;
        }
        // Reading on sends tungstenite's reply to a close and ends when the peer hangs up.
        while let Some(Ok(_)) = client_rx.next().await {}
    };
    let close_upstream = async {
        if let Some(frame) = for_upstream {
            let _ = upstream_tx.send(UpstreamMessage::Close(frame)).await;
        }
        while let Some(Ok(_)) = upstream_rx.next().await {}
    };
    let _ = tokio::time::timeout(
        wait,
        futures_util::future::join(close_client, close_upstream),
    )
    .await;
    drop(lease);
}

/// Most messages written before one flush: what a side sent in a burst goes out in one write.
const MAX_BATCH: usize = 64;

/// What the next already-arrived message of a stream is, without waiting for one.
enum Ready<M> {
    Message(M),
    Nothing,
    End(End),
}

async fn relay_to_upstream<R, W>(
    client: &mut R,
    upstream: &mut W,
    mut rate: Option<MessageRate>,
    metrics: &ProxyMetrics,
    write_timeout: Duration,
) -> End
where
    R: Stream<Item = Result<ClientMessage, axum::Error>> + Unpin,
    W: Sink<UpstreamMessage> + Unpin,
{
    let classify = |item: Option<Result<ClientMessage, axum::Error>>| match item {
        None => Ready::End(End::ClientGone),
        Some(Err(e)) if is_capacity_error(&e) => Ready::End(End::ClientTooBig),
        Some(Err(_)) => Ready::End(End::ClientGone),
        Some(Ok(ClientMessage::Close(frame))) => Ready::End(End::ClientClosed(frame)),
        Some(Ok(message)) => Ready::Message(message),
    };
    loop {
        let first = match classify(client.next().await) {
            Ready::Message(message) => message,
            Ready::End(end) => return end,
            Ready::Nothing => continue,
        };
        // Everything the client has already sent goes out with one flush, under one timeout.
        let mut ended = None;
        let batch = async {
            let mut next = Some(first);
            let mut count = 0;
            while let Some(message) = next.take() {
                let data = matches!(message, ClientMessage::Text(_) | ClientMessage::Binary(_));
                if data && rate.as_mut().is_some_and(|r| !r.allow(Instant::now())) {
                    ended = Some(End::ClientTooFast);
                    break;
                }
                if let Some(message) = to_upstream(message) {
                    metrics.frames_to_upstream.inc();
                    metrics.bytes_to_upstream.inc_by(payload_len(&message));
                    upstream.feed(message).await?;
                }
                count += 1;
                if count == MAX_BATCH {
                    break;
                }
                match client
                    .next()
                    .now_or_never()
                    .map_or(Ready::Nothing, classify)
                {
                    Ready::Message(message) => next = Some(message),
                    Ready::Nothing => {}
                    Ready::End(end) => ended = Some(end),
                }
            }
            upstream.flush().await
        };
        match tokio::time::timeout(write_timeout, batch).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return End::UpstreamGone,
        }
        if let Some(end) = ended {
            return end;
        }
    }
}

async fn relay_to_client<R, W>(
    upstream: &mut R,
    client: &mut W,
    metrics: &ProxyMetrics,
    write_timeout: Duration,
) -> End
where
    R: Stream<Item = Result<UpstreamMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
    W: Sink<ClientMessage> + Unpin,
{
    let classify = |item: Option<Result<UpstreamMessage, _>>| match item {
        None | Some(Err(_)) => Ready::End(End::UpstreamGone),
        Some(Ok(UpstreamMessage::Close(frame))) => Ready::End(End::UpstreamClosed(frame)),
        Some(Ok(message)) => Ready::Message(message),
    };
    loop {
        let first = match classify(upstream.next().await) {
            Ready::Message(message) => message,
            Ready::End(end) => return end,
            Ready::Nothing => continue,
        };
        // Everything the upstream has already sent goes out with one flush, under one timeout.
        let mut ended = None;
        let batch = async {
            let mut next = Some(first);
            let mut count = 0;
            while let Some(message) = next.take() {
                let bytes = payload_len(&message);
                if let Some(message) = to_client(message) {
                    metrics.frames_to_client.inc();
                    metrics.bytes_to_client.inc_by(bytes);
                    client.feed(message).await?;
                }
                count += 1;
                if count == MAX_BATCH {
                    break;
                }
                match upstream
                    .next()
                    .now_or_never()
                    .map_or(Ready::Nothing, classify)
                {
                    Ready::Message(message) => next = Some(message),
                    Ready::Nothing => {}
                    Ready::End(end) => ended = Some(end),
                }
            }
            client.flush().await
        };
        match tokio::time::timeout(write_timeout, batch).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return End::ClientGone,
            Err(_) => return End::ClientStalled,
        }
        if let Some(end) = ended {
            return end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_rate_allows_a_burst_then_refills() {
        let mut rate = MessageRate::new(5);
        let now = rate.last;
        assert!((0..5).all(|_| rate.allow(now)));
        assert!(!rate.allow(now));
        let later = now + Duration::from_millis(400);
        assert!(rate.allow(later) && rate.allow(later));
        assert!(!rate.allow(later));
    }

    #[test]
    fn messages_keep_their_kind_and_bytes() {
        let text = to_upstream(ClientMessage::Text("héllo".into())).unwrap();
        assert_eq!(text, UpstreamMessage::Text("héllo".into()));
        let back = to_client(text).unwrap();
        assert_eq!(back, ClientMessage::Text("héllo".into()));
        let data = Bytes::from_static(&[0, 255, 7]);
        assert_eq!(
            to_upstream(ClientMessage::Ping(data.clone())),
            Some(UpstreamMessage::Ping(data.clone()))
        );
        assert_eq!(
            to_client(UpstreamMessage::Binary(data.clone())),
            Some(ClientMessage::Binary(data))
        );
    }
}
