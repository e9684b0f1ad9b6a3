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
    /// Replace the newest queued message of the same channel and key with the new one (the
    /// client later gets a `messages_conflated` status frame); without one, drop the oldest.
    LatestPerKey,
}

/// A route's `max_rate`: most messages per second one client gets on one channel. Deserializes
/// only from a positive, finite number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaxRate(f64);

impl MaxRate {
    /// `None` unless `per_second` is positive and finite.
    pub fn new(per_second: f64) -> Option<Self> {
        (per_second.is_finite() && per_second > 0.0).then_some(MaxRate(per_second))
    }

    pub fn per_second(self) -> f64 {
        self.0
    }

    /// The least time between two messages of one channel.
    pub fn interval(self) -> std::time::Duration {
        // A rate so low that its interval overflows is as good as never.
        std::time::Duration::try_from_secs_f64(1.0 / self.0)
            .unwrap_or(std::time::Duration::from_secs(u64::from(u32::MAX)))
    }
}

impl<'de> Deserialize<'de> for MaxRate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let per_second = f64::deserialize(deserializer)?;
        MaxRate::new(per_second).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "must be a positive, finite number of messages per second (got {per_second})"
            ))
        })
    }
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
    /// Most messages per second a client gets on one channel; what arrives in between replaces
    /// older pending messages of the same channel and key. No limit by default.
    #[serde(default)]
    pub max_rate: Option<MaxRate>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigProblem, deserialize_section};

    fn parse(extra: &str) -> (Option<RouteConfig>, Vec<ConfigProblem>) {
        let text = format!(
            "channel = \"a/#\"\nbackend = \"m\"\ntopic = \"a/#\"\nallow = [\"subscribe\"]\n{extra}"
        );
        let value: toml::Value = toml::from_str(&text).unwrap();
        let mut problems = Vec::new();
        let route = deserialize_section::<RouteConfig>(value, "routes[3]", &mut problems);
        (route, problems)
    }

    #[test]
    fn latest_per_key_and_max_rate() {
        let (route, problems) = parse("slow_consumer = \"latest_per_key\"\nmax_rate = 10");
        assert!(problems.is_empty(), "{problems:?}");
        let route = route.unwrap();
        assert_eq!(route.slow_consumer, SlowConsumerPolicy::LatestPerKey);
        let rate = route.max_rate.unwrap();
        assert_eq!(rate.per_second(), 10.0);
        assert_eq!(rate.interval(), std::time::Duration::from_millis(100));
        let (route, _) = parse("max_rate = 0.5");
        assert_eq!(
            route.unwrap().max_rate.unwrap().interval(),
            std::time::Duration::from_secs(2)
        );
        assert_eq!(parse("").0.unwrap().max_rate, None);
    }

    #[test]
    fn max_rate_must_be_positive_and_finite() {
        for bad in ["0", "-1", "nan", "inf", "\"fast\""] {
            let (route, problems) = parse(&format!("max_rate = {bad}"));
            assert!(route.is_none(), "{bad}");
            assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
            assert_eq!(problems[0].path, "routes[3].max_rate", "{bad}");
        }
        let (_, problems) = parse("max_rate = -1");
        assert!(
            problems[0].message.contains("positive, finite"),
            "{problems:?}"
        );
    }
}
