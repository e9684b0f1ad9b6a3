//! `[backends.NAME]` with `type = "websocket"`: options, their defaults and validation, and the
//! upstream request made for one topic.
//!
//! Parsing goes through [`crate::config::deserialize_section`] (types and unknown keys), then
//! [`WebsocketConfig::validate`] checks what serde cannot (the URL template, header names and
//! values, subprotocol tokens, durations and sizes) and reports each problem under its key path,
//! e.g. `backends.ticker.url`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

use crate::config::{ConfigProblem, deserialize_section};

/// The placeholder in `url` that each topic replaces.
pub const TOPIC_PLACEHOLDER: &str = "{topic}";

/// Smallest `max_message_size` accepted.
const MIN_MESSAGE_SIZE: usize = 1024;
/// Largest `max_message_size` accepted (256 MiB).
const MAX_MESSAGE_SIZE: usize = 256 << 20;
/// A message up to this many times `max_message_size` is read whole and skipped; a larger one
/// breaks the connection (it is reopened), so one socket never buffers more than this.
pub const SKIP_FACTOR: usize = 16;

/// Request headers the WebSocket handshake sets itself.
const MANAGED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
];

/// A header value that may be a secret (an API key): shown as `"***"` in `Debug` output and
/// logs.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct HeaderSecret(pub String);

impl fmt::Debug for HeaderSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// `[backends.NAME]` with `type = "websocket"`. Only `url` is required.
#[derive(Debug, Clone, Deserialize)]
pub struct WebsocketConfig {
    /// Upstream address for one topic: `ws://` or `wss://` (TLS, checked against the system's
    /// trusted roots), with `{topic}` where the topic goes, e.g.
    /// `"ws://feed.local:9200/stream/{topic}"`. The topic is percent-encoded.
    pub url: String,
    /// Longest wait for TCP, TLS and the WebSocket handshake of one upstream connection.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// First delay before reopening a topic's lost connection; doubles on each failed attempt
    /// up to `reconnect_max_delay`.
    #[serde(default = "default_reconnect_min_delay", with = "humantime_serde")]
    pub reconnect_min_delay: Duration,
    /// Longest delay between attempts to reopen a topic's connection.
    #[serde(default = "default_reconnect_max_delay", with = "humantime_serde")]
    pub reconnect_max_delay: Duration,
    /// Largest upstream message delivered, in bytes. A larger one is skipped and logged; one
    /// larger than 16 times this closes the connection, which is then reopened.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// Static request headers sent with every upstream handshake (e.g. an API key). Values are
    /// never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderSecret>,
    /// Subprotocols offered to the upstream in `Sec-WebSocket-Protocol`, in order of
    /// preference. Default: none.
    #[serde(default)]
    pub subprotocols: Vec<String>,
    /// Interval of WebSocket pings on each upstream connection, to keep idle connections alive
    /// through proxies; a connection that sends nothing for two intervals is reopened. `0s`
    /// sends no pings.
    #[serde(default = "default_ping_interval", with = "humantime_serde")]
    pub ping_interval: Duration,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_reconnect_min_delay() -> Duration {
    Duration::from_millis(100)
}

fn default_reconnect_max_delay() -> Duration {
    Duration::from_secs(10)
}

fn default_max_message_size() -> usize {
    1024 * 1024
}

fn default_ping_interval() -> Duration {
    Duration::from_secs(30)
}

impl WebsocketConfig {
    /// Parses and validates a `[backends.NAME]` table (without its `type`). A table that
    /// deserializes is returned even when its values have problems (they are recorded, so the
    /// config is refused anyway), so that the routes naming it are still checked against it.
    pub fn parse(
        table: toml::Value,
        path: &str,
        problems: &mut Vec<ConfigProblem>,
    ) -> Option<Box<WebsocketConfig>> {
        let config = deserialize_section::<WebsocketConfig>(table, path, problems)?;
        config.validate(path, problems);
        Some(Box::new(config))
    }

    /// Checks what deserialization cannot, recording problems under `path`.
    pub fn validate(&self, path: &str, problems: &mut Vec<ConfigProblem>) {
        let mut problem = |key: &str, message: String| {
            problems.push(ConfigProblem::new(format!("{path}.{key}"), message));
        };

        if let Err(e) = check_url(&self.url) {
            problem("url", e);
        }

        let duration = |d: Duration| humantime::format_duration(d).to_string();
        if self.connect_timeout.is_zero() {
            problem("connect_timeout", "must be greater than zero".into());
        }
        if self.reconnect_min_delay.is_zero() {
            problem(
                "reconnect_min_delay",
                "must be greater than zero, or an upstream that refuses connections is hammered"
                    .into(),
            );
        }
        if self.reconnect_max_delay < self.reconnect_min_delay {
            problem(
                "reconnect_max_delay",
                format!(
                    "{} must not be shorter than reconnect_min_delay ({})",
                    duration(self.reconnect_max_delay),
                    duration(self.reconnect_min_delay)
                ),
            );
        }
        if !(MIN_MESSAGE_SIZE..=MAX_MESSAGE_SIZE).contains(&self.max_message_size) {
            problem(
                "max_message_size",
                format!(
                    "{} must be between {MIN_MESSAGE_SIZE} and {MAX_MESSAGE_SIZE} bytes",
                    self.max_message_size
                ),
            );
        }
        if !self.ping_interval.is_zero() && self.ping_interval < Duration::from_secs(1) {
            problem(
                "ping_interval",
                format!(
                    "{} must be at least 1s, or 0s for no pings",
                    duration(self.ping_interval)
                ),
            );
        }
        for (name, value) in &self.headers {
            let key = format!("headers.{}", quote_key(name));
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                problem(&key, format!("{name:?} is not a valid HTTP header name"));
            } else if MANAGED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                let hint = if name.eq_ignore_ascii_case("sec-websocket-protocol") {
                    "; use `subprotocols`"
                } else {
                    ""
                };
                problem(&key, format!("is set by the WebSocket handshake{hint}"));
            }
            // The value may be a secret: the message never repeats it.
            if HeaderValue::from_str(&value.0).is_err() {
                problem(
                    &key,
                    "the value must be visible ASCII (no control characters or line breaks)".into(),
                );
            }
        }
        for (i, protocol) in self.subprotocols.iter().enumerate() {
            let is_token = !protocol.is_empty()
                && protocol
                    .chars()
                    .all(|c| c.is_ascii_graphic() && !"()<>@,;:\\\"/[]?={}".contains(c));
            if !is_token {
                problem(
                    &format!("subprotocols[{i}]"),
                    format!("{protocol:?} is not a valid subprotocol name (an HTTP token)"),
                );
            }
        }
    }

    /// The upstream URL of a topic: `url` with `{topic}` replaced by the percent-encoded topic.
    pub fn topic_url(&self, topic: &str) -> String {
        self.url.replace(TOPIC_PLACEHOLDER, &percent_encode(topic))
    }

    /// The handshake request for a topic's upstream connection: its URL, the static headers
    /// and the offered subprotocols.
    pub fn request(&self, topic: &str) -> Result<Request, String> {
        let url = self.topic_url(topic);
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("{url:?} is not a valid WebSocket URL: {e}"))?;
        let headers = request.headers_mut();
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("header {name:?} is not a valid HTTP header name"))?;
            let value = HeaderValue::from_str(&value.0)
                .map_err(|_| format!("header {name} has an invalid value"))?;
            headers.insert(name, value);
        }
        if !self.subprotocols.is_empty() {
            let offered = HeaderValue::from_str(&self.subprotocols.join(", "))
                .map_err(|_| "the subprotocols are not valid header text".to_string())?;
            headers.insert("sec-websocket-protocol", offered);
        }
        Ok(request)
    }

    /// The message size at which a connection is closed instead of a message being skipped.
    pub fn hard_message_limit(&self) -> usize {
        self.max_message_size.saturating_mul(SKIP_FACTOR)
    }
}

/// Checks a `url` template: a ws:// or wss:// URL with a host and `{topic}` in it.
fn check_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("ws://") || url.starts_with("wss://")) {
        return Err(format!("{url:?} must start with ws:// or wss:// (TLS)"));
    }
    if !url.contains(TOPIC_PLACEHOLDER) {
        return Err(format!(
            "{url:?} has no {TOPIC_PLACEHOLDER}; each topic is its own upstream connection, e.g. \"ws://host:9200/stream/{TOPIC_PLACEHOLDER}\""
        ));
    }
    let others = url.replace(TOPIC_PLACEHOLDER, "");
    if others.contains(['{', '}']) {
        return Err(format!(
            "{url:?} has a placeholder other than {TOPIC_PLACEHOLDER}"
        ));
    }
    let authority = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .and_then(|rest| rest.split(['/', '?', '#']).next())
        .unwrap_or_default();
    if authority.contains(TOPIC_PLACEHOLDER) {
        return Err(format!(
            "{url:?}: {TOPIC_PLACEHOLDER} must be in the path or query, not the host"
        ));
    }
    if authority.contains('@') {
        return Err(format!(
            "{url:?}: put credentials in `headers`, not in the URL"
        ));
    }
    if url.contains('#') {
        return Err(format!(
            "{url:?} has a fragment ('#'), which is never sent to a server"
        ));
    }
    let sample = url.replace(TOPIC_PLACEHOLDER, "t");
    let uri = sample
        .as_str()
        .into_client_request()
        .map_err(|e| format!("{url:?} is not a valid WebSocket URL: {e}"))?;
    if uri.uri().host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so a topic is always one
/// path segment or query value whatever it contains.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A TOML key as it would be written in a path: quoted unless it is a bare key.
fn quote_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::Config;

    fn problems(backend: &str) -> Vec<String> {
        let text = format!(
            "[backends.ticker]\ntype = \"websocket\"\n{backend}\n[[routes]]\nchannel = \"prices/{{symbol}}\"\nbackend = \"ticker\"\ntopic = \"{{symbol}}\"\nallow = [\"subscribe\", \"publish\"]\n"
        );
        match Config::from_toml_with_env(&text, &|_| None) {
            Ok(_) => vec![],
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn a_minimal_backend_is_valid_with_documented_defaults() {
        assert_eq!(
            problems("url = \"ws://127.0.0.1:9200/stream/{topic}\""),
            Vec::<String>::new()
        );
        let text = "[backends.ticker]\ntype = \"websocket\"\nurl = \"wss://feed.example/v1?symbol={topic}\"\n[[routes]]\nchannel = \"p/{s}\"\nbackend = \"ticker\"\ntopic = \"{s}\"\nallow = [\"subscribe\"]\n";
        let config = Config::from_toml_with_env(text, &|_| None).unwrap();
        let c = config.backends()["ticker"]
            .settings::<WebsocketConfig>()
            .expect("not a websocket backend");
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.reconnect_min_delay, Duration::from_millis(100));
        assert_eq!(c.reconnect_max_delay, Duration::from_secs(10));
        assert_eq!(c.max_message_size, 1024 * 1024);
        assert_eq!(c.ping_interval, Duration::from_secs(30));
        assert!(c.headers.is_empty() && c.subprotocols.is_empty());
    }

    #[test]
    fn urls_need_a_websocket_scheme_and_the_topic_placeholder() {
        for bad in [
            "http://127.0.0.1/{topic}",
            "ws://127.0.0.1/stream",
            "ws:///{topic}",
            "ws://127.0.0.1/{topic}/{other}",
            "ws://user:pw@127.0.0.1/{topic}",
            "ws://{topic}/x",
            "ws://h/x#{topic}",
        ] {
            let p = problems(&format!("url = {bad:?}"));
            assert_eq!(p.len(), 1, "{bad}: {p:#?}");
            assert!(p[0].starts_with("backends.ticker.url: "), "{bad}: {p:#?}");
        }
        for good in [
            "ws://127.0.0.1:9200/stream/{topic}",
            "wss://feed.example/v1?symbol={topic}&depth=1",
            "ws://[::1]:9200/{topic}",
        ] {
            assert_eq!(
                problems(&format!("url = {good:?}")),
                Vec::<String>::new(),
                "{good}"
            );
        }
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let p = problems(
            r#"url = "ws://h/{topic}"
connect_timeout = "0s"
reconnect_min_delay = "0s"
reconnect_max_delay = "0s"
max_message_size = 10
ping_interval = "10ms"
subprotocols = ["ok.v1", "bad one"]
colour = "red"
[backends.ticker.headers]
"x-api-key" = "hunter2"
"bad header" = "v"
"Sec-WebSocket-Protocol" = "p"
"x-line" = "a\nb-hunter3"
"#,
        );
        let has = |needle: &str| p.iter().any(|l| l.starts_with(needle));
        assert!(has("backends.ticker.colour: unknown key"), "{p:#?}");
        // A type error or unknown key stops nothing else: values are still checked.
        assert!(
            has("backends.ticker.connect_timeout: must be greater than zero"),
            "{p:#?}"
        );
        assert!(has("backends.ticker.reconnect_min_delay: "), "{p:#?}");
        assert!(
            has("backends.ticker.max_message_size: 10 must be between"),
            "{p:#?}"
        );
        assert!(has("backends.ticker.ping_interval: 10ms must be"), "{p:#?}");
        assert!(has("backends.ticker.subprotocols[1]: "), "{p:#?}");
        assert!(
            has("backends.ticker.headers.\"bad header\": \"bad header\" is not a valid"),
            "{p:#?}"
        );
        assert!(
            has(
                "backends.ticker.headers.Sec-WebSocket-Protocol: is set by the WebSocket handshake; use `subprotocols`"
            ),
            "{p:#?}"
        );
        assert!(has("backends.ticker.headers.x-line: the value"), "{p:#?}");
        assert!(!has("backends.ticker.headers.x-api-key"), "{p:#?}");
        assert!(
            !p.iter().any(|l| l.contains("hunter")),
            "header values never appear in messages: {p:#?}"
        );
    }

    #[test]
    fn header_values_are_redacted_in_debug_output() {
        let text = "[backends.ticker]\ntype = \"websocket\"\nurl = \"ws://h/{topic}\"\nheaders = { \"x-api-key\" = \"hunter2\" }\n[[routes]]\nchannel = \"p/{s}\"\nbackend = \"ticker\"\ntopic = \"{s}\"\nallow = [\"subscribe\"]\n";
        let config = Config::from_toml_with_env(text, &|_| None).unwrap();
        let shown = format!("{:?}", config.backends()["ticker"]);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("x-api-key"), "{shown}");
    }

    #[test]
    fn topics_are_percent_encoded_into_the_url() {
        assert_eq!(percent_encode("BTC-USD_1.x~"), "BTC-USD_1.x~");
        assert_eq!(percent_encode("a b/c?d&e%"), "a%20b%2Fc%3Fd%26e%25");
        assert_eq!(percent_encode("é"), "%C3%A9");
        let text = "[backends.ticker]\ntype = \"websocket\"\nurl = \"ws://h:1/s/{topic}?depth=1\"\nheaders = { \"x-api-key\" = \"k\" }\nsubprotocols = [\"feed.v2\", \"feed.v1\"]\n[[routes]]\nchannel = \"p/{s}\"\nbackend = \"ticker\"\ntopic = \"{s}\"\nallow = [\"subscribe\"]\n";
        let config = Config::from_toml_with_env(text, &|_| None).unwrap();
        let c = config.backends()["ticker"]
            .settings::<WebsocketConfig>()
            .unwrap();
        let request = c.request("a b/c").unwrap();
        assert_eq!(request.uri().path(), "/s/a%20b%2Fc");
        assert_eq!(request.uri().query(), Some("depth=1"));
        assert_eq!(request.headers()["x-api-key"], "k");
        assert_eq!(
            request.headers()["sec-websocket-protocol"],
            "feed.v2, feed.v1"
        );
    }

    #[test]
    fn wildcard_routes_are_refused_naming_the_key() {
        let text = "[backends.ticker]\ntype = \"websocket\"\nurl = \"ws://h/{topic}\"\n[[routes]]\nchannel = \"prices/#\"\nbackend = \"ticker\"\ntopic = \"#\"\nallow = [\"subscribe\"]\n";
        let e = Config::from_toml_with_env(text, &|_| None).unwrap_err();
        let p: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            p.iter().all(|l| l.starts_with("routes[0].topic: ")),
            "{p:#?}"
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../../config/websocket.toml");
        let config = Config::from_toml_with_env(text, &|_| None).expect("valid example");
        assert!(config.backends().values().any(|b| b.kind() == "websocket"));
    }
}
