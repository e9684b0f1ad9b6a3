//! The gateway as a whole: the configuration file ([`Config`]) and the one place the runtime is
//! assembled from it.
//!
//! [`Gateway::start`] takes a validated [`Config`] (whose router, access policy and authenticator
//! were compiled while validating), builds each backend, the [`Hub`] over them, binds the
//! listener and starts serving. Nothing else in the crate builds these.

mod config;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{Config, DEFAULT_CONFIG};

use crate::backends::{BackendError, BuildContext};
use crate::edge::connections::Connections;
use crate::edge::ws::SessionContext;
use crate::edge::ws_proxy::ProxyRoute;
use crate::fanout::{BackendHandle, Hub, HubSettings};
use crate::limits::ConnectionLimits;
use crate::metrics::Metrics;
use crate::telemetry::{Telemetry, TelemetryError};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("backend {name}: {source}")]
    Backend { name: String, source: BackendError },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("telemetry: {0}")]
    Telemetry(#[from] TelemetryError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started gateway.
pub struct Gateway {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    hub: Arc<Hub>,
    task: JoinHandle<()>,
    telemetry: Option<Arc<Telemetry>>,
}

impl Gateway {
    /// Builds the backends, binds the listener and starts serving.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        // Brokers' TLS clients and our listener may pull in different rustls providers; pick one
        // for the whole process so no rustls user panics for want of a default.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let compiled = config.compiled().clone();
        let tls = config
            .server
            .tls
            .as_ref()
            .map(|t| t.acceptor())
            .transpose()
            .map_err(StartError::Tls)?;
        let metrics = Arc::new(Metrics::new());
        let telemetry = Telemetry::start(&config.telemetry)?;
        let mut backends = Vec::with_capacity(config.backends().len());
        for (name, backend_config) in config.backends() {
            let routes = config
                .routes()
                .iter()
                .enumerate()
                .filter(|(_, r)| r.backend == *name)
                .collect();
            let backend = backend_config
                .build(BuildContext {
                    name,
                    routes,
                    panics: metrics.panics(&format!("backend:{name}")),
                })
                .map_err(|source| StartError::Backend {
                    name: name.clone(),
                    source,
                })?;
            backends.push(BackendHandle {
                name: name.clone(),
                kind: backend_config.kind(),
                capabilities: backend_config.capabilities(),
                backend,
            });
        }
        let hub = Hub::new(
            compiled.router,
            compiled.policy,
            backends,
            HubSettings {
                request_timeout: config.server.request_timeout,
                max_replays: config.limits.max_replays,
            },
            metrics,
        );
        let hub = Arc::new(hub.with_telemetry(telemetry.clone()));

        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;

        let connections = Arc::new(Connections::new());
        let admin = match (config.admin.listen, &config.admin.token) {
            (Some(addr), Some(token)) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?;
                Some((listener, bound, token.clone()))
            }
            _ => None,
        };

        let shutdown = CancellationToken::new();
        let admin_addr = admin.map(|(listener, bound, token)| {
            tokio::spawn(crate::server::admin::serve(
                listener,
                token,
                connections.clone(),
                hub.clone(),
                shutdown.clone(),
            ));
            tracing::info!(admin = %bound, "admin API listening");
            bound
        });
        tokio::spawn(hub.clone().watch_health(shutdown.clone()));
        let authenticator = compiled.authenticator;
        authenticator.spawn_jwks_refresh(shutdown.clone());
        if !authenticator.is_enabled() && !local_addr.ip().is_loopback() {
            tracing::warn!(
                %local_addr,
                "listening on a non-loopback address without authentication (auth.mode = \"none\"): anyone who can reach it may use every route"
            );
        }
        let cx = SessionContext {
            hub: hub.clone(),
            config: Arc::new(config.server.session_settings()),
            limits: Arc::new(config.limits.clone()),
            auth: authenticator,
            shutdown: shutdown.clone(),
            connections,
        };
        let limits = Arc::new(ConnectionLimits::new(&config.limits));
        let proxies: Vec<Arc<ProxyRoute>> = config
            .proxies()
            .iter()
            .map(|p| {
                Arc::new(ProxyRoute::new(
                    p.clone(),
                    hub.metrics(),
                    config.server.max_message_size,
                ))
            })
            .collect();
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let task = tokio::spawn(crate::server::serve(
            listener,
            Arc::new(config.server.clone()),
            cx,
            limits,
            tls,
            proxies,
        ));
        tracing::info!(%local_addr, "wsbridge listening; WebSocket endpoint at {scheme}://{local_addr}/ws");
        Ok(Gateway {
            local_addr,
            admin_addr,
            shutdown,
            hub,
            task,
            telemetry,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's bound address, when `admin.listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Shuts down gracefully: clients get close 1001 and up to `server.shutdown_grace` to go.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
        if let Some(telemetry) = self.telemetry {
            // Sending the last spans blocks on the exporter's thread.
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        }
    }
}
