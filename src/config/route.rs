//! One `[[routes]]` entry as written in the config file.

use serde::Deserialize;

/// What a route lets clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Subscribe,
    Publish,
}

/// What happens when a client's outgoing queue is full and another message arrives for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumerPolicy {
    /// Drop the oldest queued message; the client later gets a `messages_dropped` status frame.
    #[default]
    DropOldest,
    /// Close the connection with code 1008.
    Disconnect,
}

/// A `[[routes]]` entry. Keys other than these are backend-specific route options, checked by the
/// backend the route names.
#[derive(Debug, Clone, Deserialize)]
pub struct RouteConfig {
    /// Client channel template: `/`-separated levels, `{name}` for one level, `#` last for the rest.
    pub channel: String,
    /// Name of a backend in `[backends]`.
    pub backend: String,
    /// Topic template in the backend's syntax, using the channel's placeholders.
    pub topic: String,
    /// Message key template for backends with keyed messages.
    #[serde(default)]
    pub key: Option<String>,
    /// Operations clients may perform on this route's channels.
    pub allow: Vec<Operation>,
    /// Policy when a subscriber's outgoing queue is full.
    #[serde(default)]
    pub slow_consumer: SlowConsumerPolicy,
    /// Broker-side payload encoding: `json` (default), `text`, `binary` or
    /// `protobuf:<full message name>`.
    #[serde(default)]
    pub format: Option<String>,
    /// JSON Schema (draft 2020-12) file that client publishes must match.
    #[serde(default)]
    pub json_schema: Option<std::path::PathBuf>,
    /// Rule that must hold for a subscribe (see docs/SECURITY.md).
    #[serde(default)]
    pub subscribe_if: Option<String>,
    /// Rule that must hold for a publish.
    #[serde(default)]
    pub publish_if: Option<String>,
    /// Backend-specific route options.
    #[serde(flatten)]
    pub options: toml::Table,
}
