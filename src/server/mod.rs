//! The listener: accepts TCP connections, serves HTTP on them (`/ws` upgrades to sessions, `/sse`
//! streams, `/publish`, `/routes`, the console, and each proxy route's path, relayed upstream).
//!
//! The accept loop is our own (not `axum::serve`) so that it can check connection limits before
//! any HTTP is read, bound the time a client takes to send its request head, count and track
//! every upgraded socket, and shut down gracefully: stop accepting, send close 1001 to every
//! client, wait up to `server.shutdown_grace`, close the backends. It owns the `[server]` table
//! ([`ServerConfig`]) and TLS ([`tls`]).
//!
//! A connection from a trusted proxy ([`proxy`]) carries someone else's client: the accept loop
//! then reads the PROXY protocol header first, or leaves it to each request's forwarding header
//! to name the client, and checks the per-address limits for that client instead of the proxy.

pub mod admin;
pub mod config;
pub mod console;
mod http;
pub mod proxy;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::ServerConfig;

use crate::edge::ws::{SessionContext, SessionSettings};
use crate::edge::ws_proxy::ProxyRoute;
use crate::limits::{AddressPublishLimiter, ConnectionLimits, ConnectionPermit, Refusal};
use proxy::{ForwardedClients, TrustedProxies};

/// Who a connection's client is, once the accept loop knows what it can.
enum ClientSource {
    /// The TCP peer or the PROXY protocol header named the client, admitted by the limits.
    Known(SocketAddr, ConnectionPermit),
    /// A trusted proxy that names each request's client in its headers.
    Forwarded(Arc<TrustedProxies>, Arc<ConnectionLimits>),
}

impl ServerConfig {
    /// The settings each WebSocket session runs with.
    pub fn session_settings(&self) -> SessionSettings {
        SessionSettings {
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            max_message_size: self.max_message_size,
            max_subscriptions: self.max_subscriptions,
            queue_capacity: self.queue_capacity,
            queue_bytes: self.queue_bytes,
            write_timeout: self.write_timeout,
            max_inflight_publishes: self.max_inflight_publishes,
            shutdown_grace: self.shutdown_grace,
            drain_window: self.drain_window,
        }
    }
}

/// Serves connections from `listener` until `cx.shutdown` is cancelled, then closes every
/// client (1001, up to `shutdown_grace`) and the backends. `proxies` are the proxy routes; their
/// health checks run until shutdown.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    cx: SessionContext,
    limits: Arc<ConnectionLimits>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    proxies: Vec<Arc<ProxyRoute>>,
) {
    let tracker = TaskTracker::new();
    for proxy in &proxies {
        proxy.pool.spawn_health_checks(cx.shutdown.clone());
    }
    let state = http::AppState {
        cx: cx.clone(),
        server: config.clone(),
        tracker: tracker.clone(),
        next_session: Arc::new(AtomicU64::new(1)),
        publish_limiter: Arc::new(AddressPublishLimiter::new(
            &cx.limits,
            config.max_message_size,
        )),
        proxies: Arc::new(proxies),
    };
    let app = http::app(state);
    let proxies = Arc::new(TrustedProxies::new(
        &config.trusted_proxies,
        config.forwarded_header,
    ));
    let proxy_protocol = config.proxy_protocol;
    let mut accepted_count: u64 = 0;
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = cx.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        accepted_count += 1;
        if accepted_count.is_multiple_of(1024) {
            limits.forget_idle();
        }
        let trusted = proxies.contains(peer.ip());
        // A direct client is checked before anything is read; a proxied one once its proxy
        // has named it.
        let early_permit = if trusted {
            None
        } else {
            match limits.admit(peer.ip()) {
                Ok(permit) => Some(permit),
                Err(refusal) => {
                    tracing::debug!(%peer, ?refusal, "connection refused by limits");
                    cx.hub.metrics().upgrade_refused("limits");
                    tracker.spawn(refuse(stream, refusal));
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let cx = cx.clone();
        let tls = tls.clone();
        let timeout = config.handshake_timeout;
        let limits = limits.clone();
        let proxies = proxies.clone();
        tracker.spawn(async move {
            let mut client = peer;
            if proxy_protocol && trusted {
                match tokio::time::timeout(timeout, proxy::read_proxy_header(&mut stream)).await {
                    Ok(Ok(Some(named))) => client = named,
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "refused: PROXY protocol header");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "refused: no PROXY protocol header within server.handshake_timeout");
                        return;
                    }
                }
            } else if proxy_protocol
                && tokio::time::timeout(timeout, proxy::sends_proxy_header(&stream))
                    .await
                    .unwrap_or(false)
            {
                tracing::info!(%peer, "refused: PROXY protocol header from a peer not in server.trusted_proxies");
                return;
            }
            let source = match early_permit {
                Some(permit) => ClientSource::Known(client, permit),
                None if proxy_protocol => match limits.admit(client.ip()) {
                    Ok(permit) => ClientSource::Known(client, permit),
                    Err(refusal) => {
                        tracing::debug!(%client, %peer, ?refusal, "connection refused by limits");
                        cx.hub.metrics().upgrade_refused("limits");
                        return refuse(stream, refusal).await;
                    }
                },
                None => ClientSource::Forwarded(proxies, limits),
            };
            match tls {
                None => serve_connection(stream, peer, source, app, cx, timeout).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(timeout, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, source, app, cx, timeout).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    let grace = config.drain_window + config.shutdown_grace + std::time::Duration::from_millis(500);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            remaining = tracker.len(),
            "shutdown grace period over; dropping remaining connections"
        );
    }
    cx.hub.close().await;
    tracing::info!("wsbridge stopped");
}

/// Sends a refused connection its short HTTP answer, then closes it.
async fn refuse(mut stream: tokio::net::TcpStream, refusal: Refusal) {
    let response = refusal.response();
    let write = stream.write_all(response.as_bytes());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
}

/// Serves HTTP on one connection; a permit lives as long as the connection (or, for a trusted
/// proxy's, the request) or the WebSocket it upgrades to.
async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    source: ClientSource,
    app: axum::Router,
    cx: SessionContext,
    handshake_timeout: std::time::Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let abort = CancellationToken::new();
    let app = match source {
        ClientSource::Known(addr, permit) => app.layer(axum::Extension(http::Peer {
            addr,
            tcp_peer: peer,
            _permit: Arc::new(permit),
            abort: abort.clone(),
        })),
        ClientSource::Forwarded(proxies, limits) => {
            let clients = ForwardedClients {
                proxies,
                limits,
                tcp_peer: peer,
                abort: abort.clone(),
                metrics: cx.hub.metrics().clone(),
            };
            app.layer(axum::middleware::from_fn(move |request, next| {
                clients.clone().admit(request, next)
            }))
        }
    };
    let service = TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout);
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        }
        _ = abort.cancelled() => tracing::debug!(%peer, "HTTP connection dropped"),
        _ = cx.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                _ = connection => {}
                _ = abort.cancelled() => tracing::debug!(%peer, "HTTP connection dropped"),
            }
        }
    }
}
