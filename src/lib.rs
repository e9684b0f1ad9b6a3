//! wsbridge: a WebSocket gateway to MQTT, AMQP 0-9-1 and Kafka brokers.
//!
//! # Layout
//!
//! Modules are layered; each imports only modules of lower layers (docs/ARCHITECTURE.md, checked
//! by `tests/layering.rs`). From the top:
//!
//! - [`gateway`]: the configuration file as a whole ([`Config`]) and [`Gateway::start`], the one
//!   place the runtime is assembled: backends, the hub, the listener.
//! - [`server`]: the listener. Accepts connections, checks connection limits, serves `/ws`,
//!   `/sse`, `/publish`, `/routes`, the embedded console, `/healthz`, `/readyz` and `/metrics`,
//!   tracks upgraded sockets and streams, and shuts down gracefully. The admin API
//!   ([`server::admin`]) has a listener of its own.
//! - [`edge`]: client edges. The WebSocket session ([`edge::ws`]) with its two client protocols,
//!   [`edge::json`] and [`edge::protobuf`]; Server-Sent Events ([`edge::sse`]) and HTTP publish
//!   ([`edge::http_publish`]); the registry of open connections ([`edge::connections`]); proxy
//!   routes ([`edge::ws_proxy`]), which relay a client's frames to an upstream WebSocket service.
//! - [`fanout`]: the core. One upstream subscription per distinct topic filter, shared by every
//!   socket on it; each broker message encoded once per edge [`fanout::Encoding`] and the frame
//!   shared; each client's bounded [`fanout::Outbox`] with its slow-consumer policy.
//! - [`auth`]: who a connection is, and [`auth::Policy`], the one authorisation point.
//! - [`backends`]: the adapter contract and one folder per broker (`memory`, `mqtt`, `amqp`,
//!   `kafka`, and `websocket` for upstream WebSocket feeds), registered in [`backends::KINDS`].
//! - [`routing`]: channel patterns, topic syntax, route templates and the ordered route table.
//! - [`transform`]: payload formats between broker bytes and client frames (JSON, text, binary,
//!   Protobuf from `.proto` files loaded at start-up) and JSON Schema checks.
//! - [`limits`]: the `[limits]` table: connection caps and per-connection publish rates.
//! - [`telemetry`]: the `[telemetry]` table: OpenTelemetry spans for publishes and deliveries,
//!   exported over OTLP/HTTP, and the W3C `traceparent` they carry.
//! - [`config`], [`metrics`] and [`contain`]: leaves. Config problems with their key paths,
//!   section parsing, `${VAR}` interpolation and the `[[routes]]` entries; per-instance
//!   Prometheus metrics; panic containment at task boundaries.
//!
//! A broker message travels backend → [`fanout::upstream::Fanout`] (map back to the client
//! channel, transform, encode once per encoding) → each subscriber's [`fanout::Outbox`] → that
//! connection's writer. A client publish travels session → [`fanout::Hub`] (route, authorise,
//! transform) → backend, and the client's `ok` waits for the broker's acknowledgement.

pub mod auth;
pub mod backends;
pub mod config;
pub mod contain;
pub mod edge;
pub mod fanout;
pub mod gateway;
pub mod limits;
pub mod metrics;
pub mod routing;
pub mod server;
pub mod telemetry;
pub mod transform;

pub use gateway::{Config, DEFAULT_CONFIG, Gateway, StartError};
