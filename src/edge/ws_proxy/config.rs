//! One `[[proxies]]` entry: a public path relayed to a set of upstream WebSocket services.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::HeaderName;
use serde::Deserialize;

use crate::config::ConfigProblem;

/// Paths the gateway serves itself; a proxy may not take them (nor anything under them).
pub const RESERVED_PATHS: &[&str] = &[
    "/ws", "/sse", "/publish", "/routes", "/console", "/healthz", "/readyz", "/metrics",
];

/// Request headers the gateway writes itself on the upstream handshake; a forwarding header may
/// not be one of them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "x-forwarded-for",
    "authorization",
    "cookie",
];

/// How a new client connection picks its upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The upstream with the fewest open proxied connections (ties taken in turn).
    #[default]
    LeastConnections,
    /// Each upstream in turn.
    RoundRobin,
}

/// The `health_check` table of a proxy: a WebSocket handshake to each upstream, then a close.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HealthCheck {
    /// Time between two probes of one upstream.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Longest a probe may take (TCP connect, TLS and the WebSocket handshake).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
        }
    }
}

/// One `[[proxies]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ProxyConfig {
    /// The public path clients connect to, e.g. `/chat`. Matched exactly.
    pub path: String,
    /// The upstream WebSocket services (`ws://` or `wss://` URLs); each client connection is
    /// paired with one of them for its whole life.
    pub upstreams: Vec<String>,
    /// How a new connection picks its upstream.
    pub balance: Balance,
    /// Probes each upstream periodically; absent means upstreams are judged by real connects
    /// only (and a tripped one is retried after `cooldown`).
    #[serde(deserialize_with = "present")]
    pub health_check: Option<HealthCheck>,
    /// Longest an upstream connect may take (TCP, TLS and the WebSocket handshake) before the
    /// next upstream is tried.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Consecutive failed connects (or failed health probes) that take an upstream out.
    pub max_failures: u32,
    /// Without a health check: how long an upstream stays out before one trial connect.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Largest message a client may send, in bytes; larger closes with 1009. Absent means
    /// `server.max_message_size`.
    pub max_message_size: Option<usize>,
    /// Most messages per second a client may send (with a burst of as many); more closes with
    /// 1008. Absent means no limit.
    pub max_messages_per_second: Option<u32>,
    /// Request header the verified subject is sent upstream in, e.g. `"x-user"`.
    pub forward_subject: Option<String>,
    /// Request headers carrying claims of the verified token, header name to claim name, e.g.
    /// `{ "x-tenant" = "tenant" }`.
    pub forward_claims: BTreeMap<String, String>,
    /// Pass the client's token upstream as it came (Authorization header, cookie, the
    /// `access_token` query parameter, the `access_token.<jwt>` subprotocol entry).
    pub forward_token: bool,
}

/// A table that is there: deserialized as itself, so an unknown key in it is reported at its
/// own path (`health_check.KEY`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            path: String::new(),
            upstreams: Vec::new(),
            balance: Balance::default(),
            health_check: None,
            connect_timeout: Duration::from_secs(5),
            max_failures: 3,
            cooldown: Duration::from_secs(10),
            max_message_size: None,
            max_messages_per_second: None,
            forward_subject: None,
            forward_claims: BTreeMap::new(),
            forward_token: false,
        }
    }
}

impl ProxyConfig {
    /// Records every problem of the entry under `at` (e.g. `proxies[0]`). `others` are the paths
    /// of the entries before this one.
    pub fn validate(&self, at: &str, others: &[&str], problems: &mut Vec<ConfigProblem>) {
        let mut problem = |key: &str, message: String| {
            problems.push(ConfigProblem::new(format!("{at}.{key}"), message));
        };
        let path = self.path.as_str();
        if !path.starts_with('/') {
            problem(
                "path",
                format!("{path:?} must start with '/', e.g. \"/chat\""),
            );
        } else if let Some(taken) = RESERVED_PATHS
            .iter()
            .find(|r| path == **r || path.starts_with(&format!("{r}/")))
        {
            problem(
                "path",
                format!("{path:?} collides with the gateway's own endpoint {taken}"),
            );
        } else if path == "/" {
            problem(
                "path",
                "\"/\" is the gateway's own (it points to the console)".into(),
            );
        } else if path.contains(['?', '#', '{', '}', '*']) || path.contains("//") {
            problem(
                "path",
                format!(
                    "{path:?} must be a plain path: no query, fragment, '//', '{{', '}}' or '*'"
                ),
            );
        } else if others.contains(&path) {
            problem(
                "path",
                format!("{path:?} is already the path of another proxy"),
            );
        }
        if self.upstreams.is_empty() {
            problem(
                "upstreams",
                "is empty: list at least one upstream, e.g. [\"ws://127.0.0.1:9101/chat\"]".into(),
            );
        }
        for (i, url) in self.upstreams.iter().enumerate() {
            if let Err(why) = super::connect::UpstreamUrl::parse(url) {
                problem(&format!("upstreams[{i}]"), why);
            } else if self.upstreams[..i].contains(url) {
                problem(
                    &format!("upstreams[{i}]"),
                    format!("{url:?} is listed twice"),
                );
            }
        }
        let mut positive = |key: &str, ok: bool| {
            if !ok {
                problem(key, "must be greater than zero".into());
            }
        };
        positive("connect_timeout", !self.connect_timeout.is_zero());
        positive("max_failures", self.max_failures > 0);
        positive("cooldown", !self.cooldown.is_zero());
        positive("max_message_size", self.max_message_size != Some(0));
        positive(
            "max_messages_per_second",
            self.max_messages_per_second != Some(0),
        );
        if let Some(check) = &self.health_check {
            positive("health_check.interval", !check.interval.is_zero());
            positive("health_check.timeout", !check.timeout.is_zero());
        }
        let mut header = |key: String, name: &str| {
            let lower = name.to_ascii_lowercase();
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                problem(&key, format!("{name:?} is not a valid HTTP header name"));
            } else if RESERVED_HEADERS.contains(&lower.as_str()) {
                problem(
                    &key,
                    format!("{name:?} is written by the gateway itself; choose another header"),
                );
            }
        };
        if let Some(name) = &self.forward_subject {
            header("forward_subject".into(), name);
        }
        for name in self.forward_claims.keys() {
            header(format!("forward_claims.{name}"), name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str, others: &[&str]) -> Vec<String> {
        let mut problems = Vec::new();
        let value: toml::Value = toml::from_str(text).unwrap();
        let config: ProxyConfig =
            crate::config::deserialize_section(value, "proxies[0]", &mut problems).unwrap();
        config.validate("proxies[0]", others, &mut problems);
        problems.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_minimal_entry_is_valid_with_defaults() {
        let text = "path = \"/chat\"\nupstreams = [\"ws://127.0.0.1:9101/chat\"]";
        assert_eq!(problems(text, &[]), Vec::<String>::new());
        let config: ProxyConfig = toml::from_str(text).unwrap();
        assert_eq!(config.balance, Balance::LeastConnections);
        assert_eq!(config.max_failures, 3);
        assert!(!config.forward_token);
    }

    #[test]
    fn every_problem_names_its_key() {
        let text = r#"
            path = "/ws"
            upstreams = ["http://a/", "ws://b:1/x", "ws://b:1/x", "ws://"]
            max_failures = 0
            forward_subject = "host"
            forward_claims = { "bad header" = "tenant" }
        "#;
        let p = problems(text, &[]);
        let has = |needle: &str| p.iter().any(|l| l.starts_with(needle));
        assert!(has("proxies[0].path: \"/ws\" collides"), "{p:#?}");
        assert!(has("proxies[0].upstreams[0]: "), "{p:#?}");
        assert!(
            has("proxies[0].upstreams[2]: \"ws://b:1/x\" is listed twice"),
            "{p:#?}"
        );
        assert!(has("proxies[0].upstreams[3]: "), "{p:#?}");
        assert!(!has("proxies[0].upstreams[1]"), "{p:#?}");
        assert!(has("proxies[0].max_failures: must be greater"), "{p:#?}");
        assert!(has("proxies[0].forward_subject: "), "{p:#?}");
        assert!(has("proxies[0].forward_claims.bad header: "), "{p:#?}");
    }

    #[test]
    fn paths_must_be_distinct_and_absolute() {
        let text = "path = \"/chat\"\nupstreams = [\"ws://127.0.0.1:9101/\"]";
        assert!(problems(text, &["/chat"])[0].contains("another proxy"));
        let text = "path = \"chat\"\nupstreams = [\"ws://127.0.0.1:9101/\"]";
        assert!(problems(text, &[])[0].contains("must start with '/'"));
        let text = "path = \"/metrics/x\"\nupstreams = [\"ws://127.0.0.1:9101/\"]";
        assert!(problems(text, &[])[0].contains("collides"));
        let text = "path = \"/chat\"\nupstreams = []";
        assert!(problems(text, &[])[0].starts_with("proxies[0].upstreams: is empty"));
    }

    #[test]
    fn unknown_keys_are_reported() {
        let text = "path = \"/chat\"\nupstreams = [\"ws://127.0.0.1:9101/\"]\nspeed = 1\nhealth_check = { interval = \"1s\", colour = 1 }";
        let p = problems(text, &[]);
        assert!(
            p.iter().any(|l| l == "proxies[0].speed: unknown key"),
            "{p:#?}"
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("proxies[0].health_check.colour: unknown key")),
            "{p:#?}"
        );
    }
}
