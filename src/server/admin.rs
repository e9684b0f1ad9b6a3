//! The admin API: the `[admin]` table and its own listener (plain HTTP, off unless
//! `admin.listen` is set), protected by a bearer token.
//!
//! `GET /admin/connections` lists every client connection from the connection registry (a
//! proxied pair with its proxy path and upstream URL),
//! `GET|DELETE /admin/connections/{id}` shows or closes one, `GET /admin/channels` lists the
//! upstream subscriptions with their subscriber counts and message counters, and `GET /metrics`
//! serves the same Prometheus text as the public port. Every answer is JSON except `/metrics`;
//! docs/OPERATIONS.md shows each one. The listener stops when the gateway shuts down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Secret;
use crate::config::ConfigProblem;
use crate::edge::connections::{Connection, Connections};
use crate::fanout::Hub;

/// The `[admin]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AdminConfig {
    /// Address of the admin listener; absent (the default) means no admin listener.
    pub listen: Option<SocketAddr>,
    /// The bearer token every admin request must carry (`Authorization: Bearer <token>`);
    /// required when `listen` is set.
    pub token: Option<Secret>,
}

impl AdminConfig {
    /// Records every problem of the table under `admin.KEY`.
    pub fn validate(&self, problems: &mut Vec<ConfigProblem>) {
        if self.listen.is_none() {
            return;
        }
        match &self.token {
            None => problems.push(ConfigProblem::new(
                "admin.token",
                "missing: an admin listener needs a bearer token, e.g. token = \"${WSBRIDGE_ADMIN_TOKEN}\"",
            )),
            Some(token) if token.expose().trim().len() < 16 => problems.push(ConfigProblem::new(
                "admin.token",
                "must be at least 16 characters (not counting surrounding spaces)",
            )),
            Some(_) => {}
        }
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
struct AdminState {
    token: Arc<Secret>,
    connections: Arc<Connections>,
    hub: Arc<Hub>,
}

/// Serves the admin API on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    token: Secret,
    connections: Arc<Connections>,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) {
    let state = AdminState {
        token: Arc::new(token),
        connections,
        hub,
    };
    let app = axum::Router::new()
        .route("/admin/connections", get(list_connections))
        .route(
            "/admin/connections/{id}",
            get(show_connection).delete(close_connection),
        )
        .route("/admin/channels", get(channels))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state);
    let stopped = async move { shutdown.cancelled().await };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "code": code, "message": message }).to_string(),
    )
        .into_response()
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// Lets a request through only with `Authorization: Bearer <admin.token>`, compared in
/// constant time (only the length of the token can be told from the timing).
async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let offered = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let expected = state.token.expose().trim().as_bytes();
    let ok = offered.is_some_and(|token| bool::from(token.as_bytes().ct_eq(expected)));
    if !ok {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin API needs Authorization: Bearer <admin.token>",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"wsbridge-admin\""),
        );
        return response;
    }
    next.run(request).await
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-12-03T15:04:05.123Z`.
fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn connection_json(connection: &Connection) -> Value {
    let (queued, dropped) = connection.queue_counts();
    let mut entry = json!({
        "id": connection.id,
        "remote_address": connection.remote_address.to_string(),
        "subject": connection.subject,
        "edge": connection.kind.edge(),
        "protocol": connection.kind.protocol(),
        "connected_since": rfc3339(connection.connected_since),
        "subscriptions": connection.subscriptions(),
        "queued_messages": queued,
        "dropped_messages": dropped,
    });
    if let Some(to) = &connection.proxied {
        entry["protocol"] = json!(to.subprotocol);
        entry["proxy"] = json!(to.proxy);
        entry["upstream"] = json!(to.upstream);
    }
    entry
}

async fn list_connections(State(state): State<AdminState>) -> Response {
    let connections: Vec<Value> = state
        .connections
        .list()
        .iter()
        .map(|c| connection_json(c))
        .collect();
    json_response(StatusCode::OK, json!({ "connections": connections }))
}

/// The open connection `id` names, if any.
fn find(state: &AdminState, id: &str) -> Option<Arc<Connection>> {
    id.parse::<u64>()
        .ok()
        .and_then(|id| state.connections.get(id))
}

fn unknown_connection(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no open connection with id {id:?}"),
    )
}

async fn show_connection(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match find(&state, &id) {
        Some(connection) => json_response(StatusCode::OK, connection_json(&connection)),
        None => unknown_connection(&id),
    }
}

async fn close_connection(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    let Some(connection) = find(&state, &id) else {
        return unknown_connection(&id);
    };
    tracing::info!(
        id = connection.id,
        subject = connection.subject.as_deref().unwrap_or("anonymous"),
        peer = %connection.remote_address,
        "connection closed by administrator"
    );
    connection.close_by_administrator();
    json_response(
        StatusCode::OK,
        json!({ "closed": connection.id, "edge": connection.kind.edge() }),
    )
}

async fn channels(State(state): State<AdminState>) -> Response {
    let channels: Vec<Value> = state
        .hub
        .upstreams()
        .into_iter()
        .map(|u| {
            json!({
                "backend": u.backend,
                "topic": u.topic,
                "key": u.key,
                "channel": u.channel,
                "subscribers": u.subscribers,
                "replay": u.replay,
                "messages_in": u.messages_in,
                "messages_out": u.messages_out,
            })
        })
        .collect();
    json_response(StatusCode::OK, json!({ "channels": channels }))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        scrape(&state.hub, &state.connections),
    )
        .into_response()
}

/// The Prometheus text, with the gauges computed at scrape time brought up to date.
pub(crate) fn scrape(hub: &Hub, connections: &Connections) -> String {
    let metrics = hub.metrics();
    let queued = i64::try_from(connections.queued_messages()).unwrap_or(i64::MAX);
    metrics.queued_messages.set(queued);
    metrics.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Vec<ConfigProblem> {
        let admin: AdminConfig = toml::from_str(text).unwrap();
        let mut problems = Vec::new();
        admin.validate(&mut problems);
        problems
    }

    #[test]
    fn a_listener_needs_a_long_enough_token() {
        assert!(config("").is_empty());
        assert!(config("listen = \"127.0.0.1:9090\"\ntoken = \"0123456789abcdef\"").is_empty());
        let missing = config("listen = \"127.0.0.1:9090\"");
        assert_eq!(
            missing[0].to_string().split(':').next(),
            Some("admin.token")
        );
        let short = config("listen = \"127.0.0.1:9090\"\ntoken = \"short\"");
        assert!(short[0].to_string().starts_with("admin.token"), "{short:?}");
    }

    #[test]
    fn the_token_is_redacted() {
        let admin: AdminConfig = toml::from_str("token = \"s3cret-s3cret-s3cret\"").unwrap();
        assert!(!format!("{admin:?}").contains("s3cret"));
    }
}
