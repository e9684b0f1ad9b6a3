//! HTTP endpoints: `/ws` (the upgrade), `/sse` (Server-Sent Events), `/publish` (HTTP publish),
//! `/routes`, the console (`/console/`, and `/` pointing to it), `/healthz`, `/readyz` and
//! `/metrics`, and one path per proxy route (`[[proxies]]`).
//!
//! The client endpoints (`/ws`, `/sse`, `/publish`, `/routes`) share the Origin check
//! (`server.allowed_origins`) and authentication; the JSON ones answer a refusal with
//! `{"code", "message"}` and the status [`edge::http_status`] gives its code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::ServerConfig;
use super::console;
use crate::auth::{SUBPROTOCOL_TOKEN_PREFIX, Verified};
use crate::config::Operation;
use crate::edge::ws::protocol::Protocol;
use crate::edge::ws::{self, SessionContext};
use crate::edge::ws_proxy::{self, ClientHandshake, Pair, ProxyRoute};
use crate::edge::{self, ProtocolError, http_publish, sse};
use crate::limits::{AddressPublishLimiter, ConnectionPermit};

/// Read buffer per connection. tungstenite's default (128 KiB, allocated up front) would make
/// every idle connection cost that much; larger messages still arrive, in more reads.
const READ_BUFFER_SIZE: usize = 4 * 1024;
/// Bytes buffered before tungstenite writes to the socket; the writer flushes each batch anyway.
const WRITE_BUFFER_SIZE: usize = 16 * 1024;

/// The client's address and its connection slot, set per TCP connection (per request on a
/// connection from a trusted proxy that reports clients in headers).
#[derive(Clone)]
pub struct Peer {
    /// The client's address: the TCP peer's, or the one a trusted proxy reports (port 0 when
    /// the proxy gives none).
    pub addr: SocketAddr,
    /// The TCP peer: the client itself, or the trusted proxy it came through.
    pub tcp_peer: SocketAddr,
    /// Held by the HTTP connection and by the WebSocket session it upgrades to; the slot is
    /// released when both are gone.
    pub _permit: Arc<ConnectionPermit>,
    /// Drops the TCP connection at once, whatever hyper is doing with it (a streamed response
    /// whose client takes no data).
    pub abort: CancellationToken,
}

#[derive(Clone)]
pub struct AppState {
    pub cx: SessionContext,
    /// The `[server]` table.
    pub server: Arc<ServerConfig>,
    /// Tracks upgraded sockets, which run outside the HTTP connection that carried them.
    pub tracker: TaskTracker,
    pub next_session: Arc<AtomicU64>,
    /// Publish rates per client address for `POST /publish`.
    pub publish_limiter: Arc<AddressPublishLimiter>,
    /// The proxy routes, each served at its path.
    pub proxies: Arc<Vec<Arc<ProxyRoute>>>,
}

pub fn app(state: AppState) -> axum::Router {
    let mut router = axum::Router::new();
    for route in state.proxies.iter() {
        let route = route.clone();
        let path = route.path().to_owned();
        router = router.route(
            &path,
            get(
                move |state: State<AppState>,
                      peer: Extension<Peer>,
                      headers: HeaderMap,
                      uri: Uri,
                      ws: WebSocketUpgrade| {
                    proxy_upgrade(route.clone(), state, peer, headers, uri, ws)
                },
            ),
        );
    }
    router
        .route("/ws", get(upgrade))
        .route("/sse", get(server_sent_events))
        .route("/publish", post(publish))
        .route("/routes", get(routes).options(routes_preflight))
        .route("/", get(root))
        .route("/console", get(console_redirect))
        .route("/console/", get(console_page))
        .route("/console/{*path}", get(console_asset))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// A refusal as `{"code", "message"}` with the code's HTTP status.
fn json_error(error: &ProtocolError) -> Response {
    let status =
        StatusCode::from_u16(edge::http_status(error.code)).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        http_publish::error_body(error),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        let challenge = format!(
            "Bearer error=\"invalid_token\", error_description=\"{}\"",
            error.message.replace('"', "'")
        );
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
    }
    response
}

fn refuse(code: &'static str, message: impl Into<String>) -> Response {
    json_error(&ProtocolError::new(None, code, message))
}

/// Whether the request's `Origin` (when it has one) is allowed by `server.allowed_origins`.
fn origin_allowed(state: &AppState, headers: &HeaderMap, peer: &Peer) -> bool {
    let (Some(allowed), Some(origin)) =
        (&state.server.allowed_origins, headers.get(header::ORIGIN))
    else {
        return true;
    };
    let origin = origin.to_str().unwrap_or_default();
    let ok = allowed.iter().any(|a| a.eq_ignore_ascii_case(origin));
    if !ok {
        tracing::info!(peer = %peer.addr, origin, "refused: origin not allowed");
    }
    ok
}

/// The shared checks of the JSON client endpoints: not shutting down, the Origin, the token.
fn admit_json(
    state: &AppState,
    peer: &Peer,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<Verified, ProtocolError> {
    let refusal = |code, message: String| ProtocolError::new(None, code, message);
    if state.cx.shutdown.is_cancelled() {
        return Err(refusal(
            "shutting_down",
            "the gateway is shutting down".into(),
        ));
    }
    if !origin_allowed(state, headers, peer) {
        return Err(refusal("forbidden", "origin not allowed".into()));
    }
    state.cx.auth.authenticate(headers, uri).map_err(|e| {
        state.cx.hub.metrics().auth_failure(e.reason());
        tracing::info!(peer = %peer.addr, reason = %e, path = uri.path(), "refused: authentication failed");
        refusal("invalid_token", e.to_string())
    })
}

/// `GET /sse?channel=...`: subscribes, then streams events until the client goes away.
async fn server_sent_events(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let verified = match admit_json(&state, &peer, &headers, &uri) {
        Ok(v) => v,
        Err(e) => {
            state.cx.hub.metrics().upgrade_refused(match e.code {
                "shutting_down" => "shutting_down",
                "forbidden" => "origin",
                _ => "auth",
            });
            return json_error(&e);
        }
    };
    let last_event_id = match headers.get("last-event-id").map(|v| v.to_str()) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => return refuse("invalid_request", "Last-Event-ID is not ASCII text"),
    };
    let request = match sse::parse_request(uri.query(), last_event_id) {
        Ok(r) => r,
        Err(e) => return json_error(&e),
    };
    let id = state.next_session.fetch_add(1, Ordering::Relaxed);
    let subject = verified.principal.display_name().to_owned();
    let stream = match sse::open(request, id, peer.addr, verified, &state.cx).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(peer = %peer.addr, code = e.code, message = %e.message, "SSE stream refused");
            return json_error(&e);
        }
    };
    // One chunk in flight: a client that stops reading stops the writer at `write_timeout`.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let cx = state.cx.clone();
    let metrics = cx.hub.metrics().clone();
    let span = connection_span(id, "sse", &peer, &subject);
    state.tracker.spawn(
        async move {
            tracing::info!("connected");
            metrics.connections.inc();
            metrics.connections_total.inc();
            let abort = peer.abort.clone();
            if let Err(panic) = crate::contain::future(sse::run(stream, tx, abort, cx)).await {
                metrics.panics("session").inc();
                tracing::error!(%panic, "panic in an SSE stream; it was ended");
            }
            tracing::info!("closed");
            metrics.connections.dec();
            drop(peer);
        }
        .instrument(span),
    );
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .map(Ok::<Bytes, std::convert::Infallible>);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// `POST /publish`: one publish, answered once the broker has acknowledged it.
async fn publish(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    let verified = match admit_json(&state, &peer, &headers, &uri) {
        Ok(v) => v,
        Err(e) => return json_error(&e),
    };
    // A JSON content type cannot be sent cross-site without a CORS preflight, which this gateway
    // never grants: a page elsewhere cannot publish with a visitor's cookie.
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return refuse(
            "unsupported_media_type",
            "the body must be JSON with Content-Type: application/json",
        );
    }
    let limit = state.server.max_message_size;
    let too_big = || {
        refuse(
            "message_too_big",
            format!("the body is larger than {limit} bytes (server.max_message_size)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_big();
    }
    let read = http_body_util::Limited::new(body, limit).collect();
    let bytes = match tokio::time::timeout(state.server.handshake_timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_big(),
        Ok(Err(e)) => {
            return refuse(
                "invalid_request",
                format!("the body could not be read: {e}"),
            );
        }
        Err(_) => {
            return refuse(
                "invalid_request",
                "the body did not arrive within server.handshake_timeout",
            );
        }
    };
    let hub = &state.cx.hub;
    match http_publish::publish(
        &bytes,
        &verified.principal,
        peer.addr.ip(),
        hub,
        &state.publish_limiter,
    )
    .await
    {
        Ok(position) => (
            [(header::CONTENT_TYPE, "application/json")],
            http_publish::ok_body(position),
        )
            .into_response(),
        Err(e) => {
            tracing::debug!(peer = %peer.addr, code = e.code, message = %e.message, "HTTP publish refused");
            json_error(&e)
        }
    }
}

/// Lets a page on another allowed origin read `/routes` (its answer, and above all its 401,
/// which is how a client tells a refused token from a gateway that is down). Only a bearer
/// token works across origins: without `Access-Control-Allow-Credentials` the browser sends no
/// cookie, so another site cannot read what a visitor's cookie may use.
fn allow_cross_origin(state: &AppState, headers: &HeaderMap, peer: &Peer, response: &mut Response) {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return;
    };
    if origin_allowed(state, headers, peer) {
        let response_headers = response.headers_mut();
        response_headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        response_headers.insert(header::VARY, header::HeaderValue::from_static("Origin"));
    }
}

/// `OPTIONS /routes`: the CORS preflight of a cross-origin `GET /routes` with a bearer token.
async fn routes_preflight(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    if headers.contains_key(header::ORIGIN) && !origin_allowed(&state, &headers, &peer) {
        return refuse("forbidden", "origin not allowed");
    }
    let mut response = (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_METHODS, "GET"),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, "authorization"),
            (header::ACCESS_CONTROL_MAX_AGE, "600"),
        ],
    )
        .into_response();
    allow_cross_origin(&state, &headers, &peer, &mut response);
    response
}

/// `GET /routes`: the routes this token may use, and for what.
async fn routes(
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let mut response = usable_routes(&state, &peer, &headers, &uri);
    allow_cross_origin(&state, &headers, &peer, &mut response);
    response
}

fn usable_routes(state: &AppState, peer: &Peer, headers: &HeaderMap, uri: &Uri) -> Response {
    let verified = match admit_json(state, peer, headers, uri) {
        Ok(v) => v,
        Err(e) => return json_error(&e),
    };
    let routes: Vec<serde_json::Value> = state
        .cx
        .hub
        .usable_routes(&verified.principal)
        .into_iter()
        .map(|usable| {
            let operations: Vec<&str> = usable
                .operations
                .iter()
                .map(|op| match op {
                    Operation::Subscribe => "subscribe",
                    Operation::Publish => "publish",
                })
                .collect();
            serde_json::json!({
                "channel": usable.route.channel.as_str(),
                "pattern": usable.pattern,
                "backend": usable.route.backend_name,
                "operations": operations,
            })
        })
        .collect();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        serde_json::json!({ "routes": routes }).to_string(),
    )
        .into_response()
}

/// `GET /`: to the console when it is on.
async fn root(State(state): State<AppState>) -> Response {
    if state.server.console {
        Redirect::temporary("/console/").into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn console_redirect(State(state): State<AppState>) -> Response {
    if state.server.console {
        Redirect::temporary("/console/").into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn console_page(State(state): State<AppState>) -> Response {
    serve_asset(&state, "")
}

async fn console_asset(State(state): State<AppState>, Path(path): Path<String>) -> Response {
    serve_asset(&state, &path)
}

fn serve_asset(state: &AppState, path: &str) -> Response {
    match console::asset(path).filter(|_| state.server.console) {
        Some(asset) => (
            [
                (header::CONTENT_TYPE, asset.content_type),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            asset.bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
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
        cx.hub.metrics().upgrade_refused("shutting_down");
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if !origin_allowed(&state, &headers, &peer) {
        cx.hub.metrics().upgrade_refused("origin");
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
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
        cx.hub.metrics().upgrade_refused("subprotocol");
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
            cx.hub.metrics().upgrade_refused("auth");
            cx.hub.metrics().auth_failure(e.reason());
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
            let span = connection_span(id, "ws", &peer, &subject);
            async move {
                tracing::info!(tcp_peer = %peer.tcp_peer, "connected");
                if let Err(panic) =
                    crate::contain::future(ws::run(socket, id, peer.addr, protocol, verified, cx))
                        .await
                {
                    metrics.panics("session").inc();
                    tracing::error!(%panic, "panic in a session; its connection was dropped");
                }
                tracing::info!("closed");
                metrics.connections.dec();
                drop(peer);
                drop(token);
            }
            .instrument(span)
        })
}

/// The upgrade of a proxy route: the shared checks, then an upstream, then the client's answer
/// with the upstream's subprotocol (502 `bad_gateway` when no upstream can be reached).
async fn proxy_upgrade(
    route: Arc<ProxyRoute>,
    State(state): State<AppState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    uri: Uri,
    ws: WebSocketUpgrade,
) -> Response {
    let metrics = state.cx.hub.metrics().clone();
    let verified = match admit_json(&state, &peer, &headers, &uri) {
        Ok(v) => v,
        Err(e) => {
            metrics.upgrade_refused(match e.code {
                "shutting_down" => "shutting_down",
                "forbidden" => "origin",
                _ => "auth",
            });
            return json_error(&e);
        }
    };
    let handshake = ClientHandshake {
        headers: &headers,
        uri: &uri,
        verified: &verified,
        client_ip: peer.addr.ip(),
    };
    let upstream = match route.connect(&handshake).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::info!(peer = %peer.addr, proxy = route.path(), error = %e, "refused: no upstream");
            return refuse(
                "bad_gateway",
                format!("no upstream of {} could be reached", route.path()),
            );
        }
    };
    let ws = match &upstream.subprotocol {
        Some(name) => ws.protocols([name.clone()]),
        None => ws,
    };
    let id = state.next_session.fetch_add(1, Ordering::Relaxed);
    let cx = state.cx.clone();
    let token = state.tracker.token();
    let limit = route.max_message_size;
    ws.read_buffer_size(READ_BUFFER_SIZE)
        .write_buffer_size(WRITE_BUFFER_SIZE)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| {
            metrics.connections.inc();
            metrics.connections_total.inc();
            let subject = verified.principal.display_name().to_owned();
            let span = connection_span(id, "proxy", &peer, &subject);
            let pair = Pair {
                id,
                remote_address: peer.addr,
                subject: verified.principal.subject.clone(),
                route,
                upstream,
            };
            async move {
                tracing::info!(tcp_peer = %peer.tcp_peer, upstream = %pair.upstream.lease.upstream().url.url, "connected");
                if let Err(panic) = crate::contain::future(ws_proxy::run(socket, pair, cx)).await {
                    metrics.panics("session").inc();
                    tracing::error!(%panic, "panic in a proxied connection; it was dropped");
                }
                tracing::info!("closed");
                metrics.connections.dec();
                drop(peer);
                drop(token);
            }
            .instrument(span)
        })
}

/// The span every event of one client connection is logged in: its id, edge, client address
/// and subject, so that JSON logs carry them on each line (docs/OPERATIONS.md).
fn connection_span(id: u64, edge: &'static str, peer: &Peer, subject: &str) -> tracing::Span {
    tracing::info_span!("connection", id, edge, peer = %peer.addr, subject)
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
    if !state.server.public_metrics {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        super::admin::scrape(&state.cx.hub, &state.cx.connections),
    )
        .into_response()
}
