//! The `[server]` table: the listener, and the per-connection settings it hands to each session.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::proxy::ForwardedHeader;
use super::tls::TlsConfig;
use crate::config::ConfigProblem;

/// Largest `max_message_size` accepted.
const MAX_MESSAGE_SIZE_LIMIT: usize = 16 * 1024 * 1024;

/// The `[server]` table. Every key is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Address the WebSocket and HTTP listener binds to.
    pub listen: SocketAddr,
    /// Time a client has to send a complete HTTP upgrade request.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Interval of WebSocket pings sent to each client.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A connection that sends nothing (not even a pong) for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest WebSocket message accepted from a client, in bytes; larger closes with 1009.
    pub max_message_size: usize,
    /// Most subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Outgoing messages queued per connection before the route's `slow_consumer` policy applies.
    pub queue_capacity: usize,
    /// Outgoing message bytes queued per connection before the route's `slow_consumer` policy
    /// applies (a single larger message is still queued when the queue is empty).
    pub queue_bytes: usize,
    /// A connection whose socket takes no data for this long while the gateway writes to it is
    /// closed (a stalled client or a dead network path).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Most publishes per connection waiting for the broker's acknowledgement at once; further
    /// frames from that client are read only when one completes.
    pub max_inflight_publishes: usize,
    /// Longest wait for a backend to acknowledge a subscribe or publish before the client gets
    /// `backend_timeout`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// On SIGINT/SIGTERM, how long clients get to close after the 1001 close frame.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// On SIGINT/SIGTERM, the window over which the clients' 1001 closes are spread, so they do
    /// not all reconnect (to another instance) at once. `0s` closes every client at once.
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    /// Browser origins allowed to open WebSockets; absent means any origin.
    pub allowed_origins: Option<Vec<String>>,
    /// Serve TLS (`wss://`) with this certificate and key.
    pub tls: Option<TlsConfig>,
    /// Serve the built-in console page at `/console/` (and redirect `/` to it).
    pub console: bool,
    /// Peers whose connections come through a proxy or load balancer (CIDRs or single
    /// addresses). For them the client address is the one the proxy reports; everyone else's
    /// headers naming a client are ignored.
    pub trusted_proxies: Vec<String>,
    /// The header trusted proxies name the client in: `x-forwarded-for` or `forwarded`.
    pub forwarded_header: ForwardedHeader,
    /// Trusted proxies send a PROXY protocol v1/v2 header (required from them); otherwise they
    /// report the client in `Forwarded` / `X-Forwarded-For`.
    pub proxy_protocol: bool,
    /// Serve `GET /metrics` on this listener; `false` leaves it to the admin listener.
    pub public_metrics: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            max_message_size: 1024 * 1024,
            max_subscriptions: 100,
            queue_capacity: 1024,
            queue_bytes: 16 * 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            max_inflight_publishes: 64,
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            drain_window: Duration::ZERO,
            allowed_origins: None,
            tls: None,
            console: true,
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::default(),
            proxy_protocol: false,
            public_metrics: true,
        }
    }
}

impl ServerConfig {
    /// Records every problem of the table under `server.KEY`.
    pub fn validate(&self, problems: &mut Vec<ConfigProblem>) {
        let mut positive = |key: &str, ok: bool| {
            if !ok {
                problems.push(ConfigProblem::new(
                    format!("server.{key}"),
                    "must be greater than zero",
                ));
            }
        };
        positive("handshake_timeout", !self.handshake_timeout.is_zero());
        positive("ping_interval", !self.ping_interval.is_zero());
        positive("idle_timeout", !self.idle_timeout.is_zero());
        positive("max_message_size", self.max_message_size > 0);
        positive("max_subscriptions", self.max_subscriptions > 0);
        positive("queue_capacity", self.queue_capacity > 0);
        positive("queue_bytes", self.queue_bytes > 0);
        positive("write_timeout", !self.write_timeout.is_zero());
        positive("max_inflight_publishes", self.max_inflight_publishes > 0);
        positive("request_timeout", !self.request_timeout.is_zero());
        if self.max_message_size > MAX_MESSAGE_SIZE_LIMIT {
            problems.push(ConfigProblem::new(
                "server.max_message_size",
                format!(
                    "{} is above the limit of {MAX_MESSAGE_SIZE_LIMIT} bytes",
                    self.max_message_size
                ),
            ));
        }
        if let Some(tls) = &self.tls {
            tls.validate(problems);
        }
        for (i, origin) in self.allowed_origins.iter().flatten().enumerate() {
            let valid = (origin.starts_with("https://") || origin.starts_with("http://"))
                && !origin.ends_with('/')
                && !origin[origin.find("://").map_or(0, |p| p + 3)..].contains('/');
            if !valid {
                problems.push(ConfigProblem::new(
                    format!("server.allowed_origins[{i}]"),
                    format!(
                        "{origin:?} is not an origin; write scheme://host[:port] with no path, e.g. \"https://app.example.com\""
                    ),
                ));
            }
        }
        for (i, entry) in self.trusted_proxies.iter().enumerate() {
            if super::proxy::TrustedProxies::parse_entry(entry).is_none() {
                problems.push(ConfigProblem::new(
                    format!("server.trusted_proxies[{i}]"),
                    format!(
                        "invalid CIDR {entry:?}; write an address block such as \"10.0.0.0/8\" or \"fd00::/8\", or one address"
                    ),
                ));
            }
        }
        if self.proxy_protocol && self.trusted_proxies.is_empty() {
            problems.push(ConfigProblem::new(
                "server.proxy_protocol",
                "true needs server.trusted_proxies: only the proxies listed there may send a PROXY header",
            ));
        }
        if self.idle_timeout <= self.ping_interval {
            problems.push(ConfigProblem::new(
                "server.idle_timeout",
                format!(
                    "{} must be longer than server.ping_interval ({}), or every client times out",
                    humantime::format_duration(self.idle_timeout),
                    humantime::format_duration(self.ping_interval)
                ),
            ));
        }
    }
}
