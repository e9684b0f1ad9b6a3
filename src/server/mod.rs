//! The listener: accepts TCP connections, serves HTTP on them (`/ws` upgrades to sessions, `/sse`
//! streams, `/publish`, `/routes`, the console).
//!
//! The accept loop is our own (not `axum::serve`) so that it can check connection limits before
//! any HTTP is read, bound the time a client takes to send its request head, count and track
//! every upgraded socket, and shut down gracefully: stop accepting, send close 1001 to every
//! client, wait up to `server.shutdown_grace`, close the backends. It owns the `[server]` table
//! ([`ServerConfig`]) and TLS ([`tls`]).

pub mod admin;
pub mod config;
pub mod console;
mod http;
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
use crate::limits::{AddressPublishLimiter, ConnectionLimits, ConnectionPermit};

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
/// client (1001, up to `shutdown_grace`) and the backends.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    cx: SessionContext,
    limits: Arc<ConnectionLimits>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let tracker = TaskTracker::new();
    let state = http::AppState {
        cx: cx.clone(),
        server: config.clone(),
        tracker: tracker.clone(),
        next_session: Arc::new(AtomicU64::new(1)),
        publish_limiter: Arc::new(AddressPublishLimiter::new(
            &cx.limits,
            config.max_message_size,
        )),
    };
    let app = http::app(state);
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
        let permit = match limits.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                tracing::debug!(%peer, ?refusal, "connection refused by limits");
                tracker.spawn(async move {
                    let response = refusal.response();
                    let write = stream.write_all(response.as_bytes());
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
                });
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let cx = cx.clone();
        let tls = tls.clone();
        let timeout = config.handshake_timeout;
        tracker.spawn(async move {
            match tls {
                None => serve_connection(stream, peer, permit, app, cx, timeout).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(timeout, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, permit, app, cx, timeout).await
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

/// Serves HTTP on one connection; the permit lives as long as the connection or its WebSocket.
async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    permit: ConnectionPermit,
    app: axum::Router,
    cx: SessionContext,
    handshake_timeout: std::time::Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let abort = CancellationToken::new();
    let peer_info = http::Peer {
        addr: peer,
        _permit: Arc::new(permit),
        abort: abort.clone(),
    };
    let service = TowerToHyperService::new(app.layer(axum::Extension(peer_info)));
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
