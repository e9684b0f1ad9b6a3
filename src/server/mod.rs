//! The listener: accepts TCP connections, serves HTTP on them and upgrades `/ws` to sessions.
//!
//! The accept loop is our own (not `axum::serve`) so that it can bound the time a client takes to
//! send its request head, count and track every upgraded socket, and shut down gracefully:
//! stop accepting, send close 1001 to every client, wait up to `server.shutdown_grace`, close the
//! backends.

mod http;
pub mod limits;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::backends::BuildContext;
use crate::config::Config;
use crate::fanout::Hub;
use crate::metrics::Metrics;
use crate::routing::Router;
use crate::session::SessionContext;
use limits::ConnectionLimits;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("backend {name}: {source}")]
    Backend {
        name: String,
        source: crate::backends::BackendError,
    },
    #[error("{0}")]
    Auth(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started gateway.
pub struct Gateway {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    hub: Arc<Hub>,
    task: JoinHandle<()>,
}

impl Gateway {
    /// Builds the backends, binds the listener and starts serving.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        // Brokers' TLS clients and our listener may pull in different rustls providers; pick one
        // for the whole process so no rustls user panics for want of a default.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let authenticator = Arc::new(Authenticator::new(&config.auth).map_err(StartError::Auth)?);
        let tls = config
            .server
            .tls
            .as_ref()
            .map(|t| t.acceptor())
            .transpose()
            .map_err(StartError::Tls)?;
        let router = Router::build(&config.routes, &config.backends, &config.schemas)
            .map_err(|problems| StartError::Config(crate::config::ConfigError { problems }))?;
        let mut backends = Vec::with_capacity(config.backends.len());
        for (name, backend_config) in &config.backends {
            let routes = config
                .routes
                .iter()
                .enumerate()
                .filter(|(_, r)| r.backend == *name)
                .collect();
            let backend = backend_config
                .build(BuildContext { name, routes })
                .await
                .map_err(|source| StartError::Backend {
                    name: name.clone(),
                    source,
                })?;
            backends.push((name.clone(), backend));
        }
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(
            router,
            backends,
            config.server.request_timeout,
            metrics,
        ));

        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;

        let shutdown = CancellationToken::new();
        tokio::spawn(hub.clone().watch_health(shutdown.clone()));
        authenticator.spawn_jwks_refresh(shutdown.clone());
        if !authenticator.is_enabled() && !local_addr.ip().is_loopback() {
            tracing::warn!(
                %local_addr,
                "listening on a non-loopback address without authentication (auth.mode = \"none\"): anyone who can reach it may use every route"
            );
        }
        let cx = SessionContext {
            hub: hub.clone(),
            config: Arc::new(config.server.clone()),
            limits: Arc::new(config.limits.clone()),
            auth: authenticator,
            shutdown: shutdown.clone(),
        };
        let limits = Arc::new(ConnectionLimits::new(&config.limits));
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let task = tokio::spawn(serve(listener, cx, limits, tls));
        tracing::info!(%local_addr, "wsbridge listening; WebSocket endpoint at {scheme}://{local_addr}/ws");
        Ok(Gateway {
            local_addr,
            shutdown,
            hub,
            task,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Shuts down gracefully: clients get close 1001 and up to `server.shutdown_grace` to go.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

async fn serve(
    listener: TcpListener,
    cx: SessionContext,
    limits: Arc<ConnectionLimits>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let tracker = TaskTracker::new();
    let state = http::AppState {
        cx: cx.clone(),
        tracker: tracker.clone(),
        next_session: Arc::new(AtomicU64::new(1)),
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
        tracker.spawn(async move {
            match tls {
                None => serve_connection(stream, peer, permit, app, cx).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(cx.config.handshake_timeout, acceptor.accept(stream))
                            .await;
                    match handshake {
                        Ok(Ok(stream)) => serve_connection(stream, peer, permit, app, cx).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    let grace = cx.config.shutdown_grace + std::time::Duration::from_millis(500);
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
    permit: limits::ConnectionPermit,
    app: axum::Router,
    cx: SessionContext,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer_info = http::Peer {
        addr: peer,
        _permit: Arc::new(permit),
    };
    let service = TowerToHyperService::new(app.layer(axum::Extension(peer_info)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cx.config.handshake_timeout);
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
        _ = cx.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
