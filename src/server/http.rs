//! HTTP endpoints: `/ws` (the upgrade), `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::ServerConfig;
use crate::auth::SUBPROTOCOL_TOKEN_PREFIX;
use crate::edge::ws::protocol::Protocol;
use crate::edge::ws::{self, SessionContext};
use crate::limits::ConnectionPermit;

/// Read buffer per connection. tungstenite's default (128 KiB, allocated up front) would make
/// every idle connection cost that much; larger messages still arrive, in more reads.
const READ_BUFFER_SIZE: usize = 4 * 1024;
/// Bytes buffered before tungstenite writes to the socket; the writer flushes each batch anyway.
const WRITE_BUFFER_SIZE: usize = 16 * 1024;

/// The client's address and its connection slot, set per TCP connection.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Held by the HTTP connection and by the WebSocket session it upgrades to; the slot is
    /// released when both are gone.
    pub _permit: Arc<ConnectionPermit>,
}

#[derive(Clone)]
pub struct AppState {
    pub cx: SessionContext,
    /// The `[server]` table.
    pub server: Arc<ServerConfig>,
    /// Tracks upgraded sockets, which run outside the HTTP connection that carried them.
    pub tracker: TaskTracker,
    pub next_session: Arc<AtomicU64>,
}

pub fn app(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/ws", get(upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn upgrade(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: Uri,
    ws: WebSocketUpgrade,
) -> Response {
    let cx = &state.cx;
    if cx.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if let Some(allowed) = &state.server.allowed_origins
        && let Some(origin) = headers.get(header::ORIGIN)
    {
        let origin = origin.to_str().unwrap_or_default();
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
            tracing::info!(peer = %peer.addr, origin, "refused: origin not allowed");
            return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
        }
    }

    // Entries carrying a token are not protocols; the client must still offer one we speak.
    let requested: Vec<String> = ws
        .requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .filter(|p| !p.starts_with(SUBPROTOCOL_TOKEN_PREFIX))
        .map(str::to_owned)
        .collect();
    let offered_token = ws.requested_protocols().any(|p| {
        p.as_bytes()
            .starts_with(SUBPROTOCOL_TOKEN_PREFIX.as_bytes())
    });
    let chosen = requested
        .iter()
        .find(|p| Protocol::from_subprotocol(Some(p)).is_some());
    let protocol = match (chosen, requested.is_empty() && !offered_token) {
        (Some(name), _) => Protocol::from_subprotocol(Some(name)),
        (None, true) => Some(Protocol::Json),
        (None, false) => None,
    };
    let Some(protocol) = protocol else {
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "unsupported WebSocket subprotocol; offer one of: {}\n",
                Protocol::SUBPROTOCOLS.join(", ")
            ),
        )
            .into_response();
    };

    let verified = match cx.auth.authenticate(&headers, &uri) {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(peer = %peer.addr, reason = %e, "refused: authentication failed");
            return (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    format!("Bearer error=\"invalid_token\", error_description=\"{e}\""),
                )],
                format!("{e}\n"),
            )
                .into_response();
        }
    };

    let ws = match chosen {
        Some(name) => ws.protocols([name.clone()]),
        None => ws,
    };
    let id = state.next_session.fetch_add(1, Ordering::Relaxed);
    let config = &state.server;
    let cx = cx.clone();
    let token = state.tracker.token();
    ws.read_buffer_size(READ_BUFFER_SIZE)
        .write_buffer_size(WRITE_BUFFER_SIZE)
        .max_message_size(config.max_message_size)
        .max_frame_size(config.max_message_size)
        .on_upgrade(move |socket| {
            let metrics = cx.hub.metrics().clone();
            metrics.connections.inc();
            metrics.connections_total.inc();
            let subject = verified.principal.display_name().to_owned();
            let span = tracing::debug_span!("session", id, peer = %peer.addr, %subject);
            async move {
                tracing::debug!("connected");
                if let Err(panic) =
                    crate::contain::future(ws::run(socket, id, protocol, verified, cx)).await
                {
                    metrics.panics("session").inc();
                    tracing::error!(%panic, "panic in a session; its connection was dropped");
                }
                metrics.connections.dec();
                drop(peer);
                drop(token);
            }
            .instrument(span)
        })
}

async fn readyz(State(state): State<AppState>) -> Response {
    let health = state.cx.hub.backend_health();
    let body: serde_json::Map<String, serde_json::Value> = health
        .iter()
        .map(|(name, h)| (name.clone(), (if h.is_up() { "up" } else { "down" }).into()))
        .collect();
    let status = if health.iter().all(|(_, h)| h.is_up()) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "ready": status == StatusCode::OK, "backends": body }).to_string(),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.cx.hub.metrics().render(),
    )
        .into_response()
}
