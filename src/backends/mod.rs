//! Backend adapters: what the gateway core talks to, without ever naming a broker.
//!
//! - [`adapter`]: the contract. The [`Backend`] trait the core calls, the [`MessageSink`] a
//!   backend delivers to, the message and error types, and [`BackendSettings`]: what a kind
//!   declares about itself (topic syntax, [`Capabilities`]) and how it is built.
//! - one folder per broker: [`memory`], [`mqtt`], [`amqp`], [`kafka`], [`websocket`]. Each
//!   holds its config table, its route options, its `KIND` and its [`Backend`], and imports only
//!   the contract (never another adapter).
//! - this file: the registered kinds ([`KINDS`]) and [`BackendConfig`], a parsed
//!   `[backends.NAME]` table of any of them.
//!
//! Adding a broker is its folder plus its name in the `kinds!` line below. The registry is a
//! list rather than an enum of configs: each kind answers for itself through
//! [`BackendSettings`], so there is no match over kinds anywhere to extend.

pub mod adapter;

use std::any::Any;
use std::fmt;
use std::sync::Arc;

pub use adapter::{
    Backend, BackendError, BackendSettings, BrokerMessage, BuildContext, Capabilities, Health,
    Kind, MessageSink, Position, Publish, PublishReceipt, StartPosition, Subscription,
    SubscriptionEvent, UpstreamId,
};

use crate::config::{ConfigProblem, RouteConfig};
use crate::routing::TopicSyntax;

/// Declares each kind's folder as a module and lists its `KIND` in [`KINDS`].
macro_rules! kinds {
    ($($kind:ident),+ $(,)?) => {
        $(pub mod $kind;)+

        /// Every backend kind, in the order `type` values are listed in messages.
        pub const KINDS: &[Kind] = &[$($kind::KIND),+];
    };
}

kinds!(memory, mqtt, amqp, kafka, websocket);

/// A validated `[backends.NAME]` table: its kind and that kind's settings.
#[derive(Clone)]
pub struct BackendConfig {
    kind: &'static str,
    settings: Arc<dyn BackendSettings>,
}

impl fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.settings, f)
    }
}

impl BackendConfig {
    /// Parses a backend table, selecting the kind by its `type` key; problems are recorded
    /// under `path` (`backends.NAME`).
    pub fn parse(
        value: toml::Value,
        path: &str,
        problems: &mut Vec<ConfigProblem>,
    ) -> Option<Self> {
        let names = || KINDS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ");
        let toml::Value::Table(mut table) = value else {
            problems.push(ConfigProblem::new(
                path,
                "must be a table with a `type` key",
            ));
            return None;
        };
        let name = match table.remove("type") {
            Some(toml::Value::String(name)) => name,
            Some(_) => {
                problems.push(ConfigProblem::new(
                    format!("{path}.type"),
                    "must be a string",
                ));
                return None;
            }
            None => {
                problems.push(ConfigProblem::new(
                    format!("{path}.type"),
                    format!("missing; one of: {}", names()),
                ));
                return None;
            }
        };
        let Some(kind) = KINDS.iter().find(|k| k.name == name) else {
            problems.push(ConfigProblem::new(
                format!("{path}.type"),
                format!("unknown backend type {name:?}; one of: {}", names()),
            ));
            return None;
        };
        let settings = (kind.parse)(toml::Value::Table(table), path, problems)?;
        Some(BackendConfig {
            kind: kind.name,
            settings: Arc::from(settings),
        })
    }

    /// The `type` value.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    pub fn topic_syntax(&self) -> TopicSyntax {
        self.settings.topic_syntax()
    }

    pub fn capabilities(&self) -> Capabilities {
        self.settings.capabilities()
    }

    /// Checks the backend-specific options of a route naming this backend.
    pub fn check_route(&self, route: &RouteConfig, path: &str, problems: &mut Vec<ConfigProblem>) {
        self.settings.check_route(route, path, problems);
    }

    /// Starts the adapter.
    pub fn build(&self, cx: BuildContext<'_>) -> Result<Arc<dyn Backend>, BackendError> {
        self.settings.build(cx)
    }

    /// The kind's own settings type, e.g. `settings::<KafkaConfig>()`.
    pub fn settings<T: BackendSettings>(&self) -> Option<&T> {
        (self.settings.as_ref() as &dyn Any).downcast_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Option<BackendConfig>, Vec<String>) {
        let value: toml::Value = toml::from_str(text).unwrap();
        let mut problems = Vec::new();
        let config = BackendConfig::parse(value, "backends.b", &mut problems);
        (config, problems.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn every_kind_is_selected_by_its_type() {
        for (text, kind) in [
            ("type = \"memory\"", "memory"),
            ("type = \"mqtt\"\nurl = \"mqtt://127.0.0.1\"", "mqtt"),
            ("type = \"amqp\"\nurl = \"amqp://127.0.0.1\"", "amqp"),
            ("type = \"kafka\"\nbrokers = \"127.0.0.1:9092\"", "kafka"),
            (
                "type = \"websocket\"\nurl = \"ws://127.0.0.1/{topic}\"",
                "websocket",
            ),
        ] {
            let (config, problems) = parse(text);
            assert_eq!(problems, Vec::<String>::new(), "{text}");
            assert_eq!(config.expect(text).kind(), kind);
        }
    }

    #[test]
    fn a_missing_or_unknown_type_lists_the_kinds() {
        let (_, problems) = parse("url = \"x\"");
        assert_eq!(
            problems,
            ["backends.b.type: missing; one of: memory, mqtt, amqp, kafka, websocket"]
        );
        let (_, problems) = parse("type = \"plasma\"");
        assert_eq!(
            problems,
            [
                "backends.b.type: unknown backend type \"plasma\"; one of: memory, mqtt, amqp, kafka, websocket"
            ]
        );
        let (_, problems) = parse("type = 3");
        assert_eq!(problems, ["backends.b.type: must be a string"]);
    }

    #[test]
    fn capabilities_are_declared_by_each_kind() {
        let caps = |text: &str| parse(text).0.unwrap().capabilities();
        assert!(!caps("type = \"memory\"").replay);
        assert!(caps("type = \"mqtt\"\nurl = \"mqtt://127.0.0.1\"").retained);
        let kafka = caps("type = \"kafka\"\nbrokers = \"127.0.0.1:9092\"");
        assert!(kafka.keys && kafka.replay && kafka.partitions && !kafka.retained);
        let websocket = caps("type = \"websocket\"\nurl = \"ws://127.0.0.1/{topic}\"");
        assert_eq!(websocket, Capabilities::default());
    }
}
