//! wsbridge: a WebSocket gateway to MQTT, AMQP 0-9-1 and Kafka brokers.
//!
//! # Layout
//!
//! - [`server`]: the listener. Accepts connections, serves `/ws`, `/healthz`, `/readyz` and
//!   `/metrics`, tracks upgraded sockets and shuts down gracefully.
//! - [`session`]: the socket side. One client connection: decoding requests, the outgoing queue
//!   with its slow-consumer policy, batched writes, keepalive.
//! - [`fanout`]: the core. One upstream subscription per distinct topic filter, shared by every
//!   socket on it; each broker message encoded once and the frame shared by its receivers.
//! - [`routing`]: channel patterns, route templates and the ordered route table.
//! - [`backends`]: the adapter trait and one folder per broker (`memory`, `mqtt`, `amqp`, `kafka`).
//! - [`transform`]: payload encodings between broker bytes and client frames (JSON, text,
//!   binary, Protobuf from `.proto` files loaded at start-up) and JSON Schema checks.
//! - [`auth`]: the connection's principal and the one authorisation point.
//! - [`config`]: the TOML configuration, its defaults and validation.
//! - [`metrics`]: per-instance Prometheus metrics.
//!
//! A broker message travels backend → [`fanout::upstream::Fanout`] (map back to the client
//! channel, transform, encode once) → each subscriber's [`session::outbox::Outbox`] → that
//! connection's writer. A client publish travels session → [`fanout::Hub`] (route, authorise,
//! transform) → backend, and the client's `ok` waits for the broker's acknowledgement.

pub mod auth;
pub mod backends;
pub mod config;
pub mod fanout;
pub mod metrics;
pub mod routing;
pub mod server;
pub mod session;
pub mod transform;

pub use config::Config;
pub use server::{Gateway, StartError};
