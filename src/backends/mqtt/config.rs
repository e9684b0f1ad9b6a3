//! `[backends.NAME]` with `type = "mqtt"`, and the MQTT options of the routes that use it.
//!
//! Parsing goes through [`crate::config::deserialize_section`] (types and unknown keys), then
//! [`MqttConfig::validate`] checks what serde cannot (URL, ranges, TLS files) and reports each
//! problem under its key path, e.g. `backends.plant.keep_alive`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::config::{ConfigProblem, RouteConfig, deserialize_section};

/// Largest packet MQTT can describe (the remaining-length field tops out at 256 MiB).
pub const MQTT_MAX_PACKET_SIZE: u32 = 268_435_455;
/// Smallest `max_packet_size` accepted: room for a topic and a few bytes of payload.
const MIN_PACKET_SIZE: u32 = 1024;
/// Longest `client_id_prefix`; the generated suffix adds 13 characters.
const MAX_CLIENT_ID_PREFIX: usize = 32;

/// The MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ProtocolVersion {
    /// MQTT 5: subscription identifiers, user properties, content type, reason codes.
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1, for brokers without MQTT 5.
    #[serde(rename = "3.1.1")]
    V311,
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProtocolVersion::V5 => "5",
            ProtocolVersion::V311 => "3.1.1",
        })
    }
}

/// A secret string: shown as `"***"` in `Debug` output and logs.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Password(pub String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// `[backends.NAME]` with `type = "mqtt"`. Only `url` is required.
#[derive(Debug, Clone, Deserialize)]
pub struct MqttConfig {
    /// Broker address: `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` for TLS
    /// (default port 8883).
    pub url: String,
    /// MQTT protocol version: `"5"` (default) or `"3.1.1"`.
    #[serde(default = "default_protocol")]
    pub protocol: ProtocolVersion,
    /// Client identifier prefix; each gateway instance appends `-` and 12 random hex digits, so
    /// instances sharing a config never take over each other's session.
    #[serde(default = "default_client_id_prefix")]
    pub client_id_prefix: String,
    /// User name for the broker (e.g. `"${MQTT_USERNAME}"`).
    #[serde(default)]
    pub username: Option<String>,
    /// Password for the broker (e.g. `"${MQTT_PASSWORD}"`); needs `username`. Never logged.
    #[serde(default)]
    pub password: Option<Password>,
    /// Interval of MQTT keep-alive pings; a broker that answers none for one interval is
    /// considered gone. Between 5s and 65535s.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Longest wait for the TCP/TLS connection and the broker's CONNACK (whole seconds, >= 1s).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// First delay before reconnecting after the connection fails; doubles on each failed
    /// attempt up to `reconnect_max_delay`.
    #[serde(default = "default_reconnect_min_delay", with = "humantime_serde")]
    pub reconnect_min_delay: Duration,
    /// Longest delay between reconnection attempts.
    #[serde(default = "default_reconnect_max_delay", with = "humantime_serde")]
    pub reconnect_max_delay: Duration,
    /// How long a publish or subscribe made while the broker is unreachable waits for the
    /// connection to come back before failing with `backend_unavailable`. `0s` fails at once.
    #[serde(default, with = "humantime_serde")]
    pub unavailable_wait: Duration,
    /// Largest MQTT message sent or delivered, in bytes. A larger client publish fails with
    /// `message_too_large`; a larger broker message is not delivered (MQTT 5 tells the broker,
    /// which then does not send it; with 3.1.1 the gateway skips it on arrival).
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: u32,
    /// Most retained messages kept per MQTT subscription for clients that join it later.
    #[serde(default = "default_retained_cache_size")]
    pub retained_cache_size: usize,
    /// Keeps the broker session across lost connections (MQTT 5 only): after the first
    /// connection of the process, the gateway reconnects with clean start off under the same
    /// client id, so messages of QoS 1 and 2 subscriptions that the broker queued while the
    /// connection was down are delivered once it is back. The first connection always starts
    /// clean: nobody is subscribed yet after a start, so nothing queued for an earlier process
    /// could reach a client.
    #[serde(default)]
    pub persistent_session: bool,
    /// How long the broker keeps a persistent session after the connection is lost (the MQTT 5
    /// session expiry interval); messages published later than this after a disconnection
    /// are not kept. Used with `persistent_session`; at most 136 years (u32 seconds).
    #[serde(default = "default_session_expiry", with = "humantime_serde")]
    pub session_expiry: Duration,
    /// PEM file with the CA certificates that sign the broker's certificate (`mqtts://` only;
    /// default: the system's trusted roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file with the client certificate chain for mutual TLS (with `key_file`).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file with the client's private key (with `cert_file`).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

fn default_protocol() -> ProtocolVersion {
    ProtocolVersion::V5
}

fn default_client_id_prefix() -> String {
    "wsbridge".to_owned()
}

fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
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

fn default_session_expiry() -> Duration {
    Duration::from_secs(300)
}

fn default_retained_cache_size() -> usize {
    10_000
}

fn default_max_packet_size() -> u32 {
    1024 * 1024
}

/// Where the broker listens, from `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// Parses `mqtt://host[:port]` or `mqtts://host[:port]`.
pub fn parse_url(url: &str) -> Result<BrokerAddress, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else {
        return Err(format!("{url:?} must start with mqtt:// or mqtts:// (TLS)"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('@') {
        return Err("put credentials in `username` and `password`, not in the URL".into());
    }
    if rest.contains(['/', '?', '#']) {
        return Err(format!("{url:?} must be only scheme, host and port"));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?} has an unclosed '[' in the host"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("{url:?}: expected ':port' after the IPv6 address"))?,
            ),
        };
        (format!("[{addr}]"), port)
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (rest.to_owned(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(format!("{url:?} has no host"));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{url:?}: the host contains whitespace"));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => {
                return Err(format!(
                    "{url:?}: port {p:?} must be a number from 1 to 65535"
                ));
            }
        },
    };
    Ok(BrokerAddress { host, port, tls })
}

impl MqttConfig {
    /// Parses and validates a `[backends.NAME]` table (without its `type`). A table that
    /// deserializes is returned even when its values have problems (they are recorded, so the
    /// config is refused anyway), so that the routes naming it are still checked against it.
    pub fn parse(
        table: toml::Value,
        path: &str,
        problems: &mut Vec<ConfigProblem>,
    ) -> Option<Box<MqttConfig>> {
        let config = deserialize_section::<MqttConfig>(table, path, problems)?;
        config.validate(path, problems);
        Some(Box::new(config))
    }

    /// Checks what deserialization cannot, recording problems under `path`.
    pub fn validate(&self, path: &str, problems: &mut Vec<ConfigProblem>) {
        let mut problem = |key: &str, message: String| {
            problems.push(ConfigProblem::new(format!("{path}.{key}"), message));
        };

        let address = match parse_url(&self.url) {
            Ok(address) => Some(address),
            Err(e) => {
                problem("url", e);
                None
            }
        };

        let prefix = &self.client_id_prefix;
        if prefix.is_empty()
            || prefix.len() > MAX_CLIENT_ID_PREFIX
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            problem(
                "client_id_prefix",
                format!(
                    "{prefix:?} must be 1 to {MAX_CLIENT_ID_PREFIX} letters, digits, '-', '_' or '.'"
                ),
            );
        }
        if self.password.is_some() && self.username.is_none() {
            problem(
                "password",
                "is set without `username`; MQTT needs a user name to send a password".into(),
            );
        }

        let duration = |d: Duration| humantime::format_duration(d).to_string();
        if self.keep_alive < Duration::from_secs(5) || self.keep_alive.as_secs() > 65_535 {
            problem(
                "keep_alive",
                format!(
                    "{} must be between 5s and 65535s",
                    duration(self.keep_alive)
                ),
            );
        }
        if self.connect_timeout < Duration::from_secs(1) {
            problem(
                "connect_timeout",
                format!(
                    "{} must be at least 1s (whole seconds)",
                    duration(self.connect_timeout)
                ),
            );
        }
        if self.reconnect_min_delay.is_zero() {
            problem(
                "reconnect_min_delay",
                "must be greater than zero, or a broker that refuses connections is hammered"
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
        if !(MIN_PACKET_SIZE..=MQTT_MAX_PACKET_SIZE).contains(&self.max_packet_size) {
            problem(
                "max_packet_size",
                format!(
                    "{} must be between {MIN_PACKET_SIZE} and {MQTT_MAX_PACKET_SIZE} bytes",
                    self.max_packet_size
                ),
            );
        }

        if self.persistent_session && self.protocol != ProtocolVersion::V5 {
            problem(
                "persistent_session",
                "needs protocol \"5\": MQTT 3.1.1 cannot give a session an expiry, so the broker \
                 would keep the sessions of stopped instances forever"
                    .into(),
            );
        }
        if self.persistent_session
            && (self.session_expiry < Duration::from_secs(1)
                || self.session_expiry.as_secs() > u64::from(u32::MAX))
        {
            problem(
                "session_expiry",
                format!(
                    "{} must be between 1s and {}s",
                    duration(self.session_expiry),
                    u32::MAX
                ),
            );
        }

        let uses_tls_files =
            self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some();
        if uses_tls_files && address.as_ref().is_some_and(|a| !a.tls) {
            let key = if self.ca_file.is_some() {
                "ca_file"
            } else if self.cert_file.is_some() {
                "cert_file"
            } else {
                "key_file"
            };
            problem(
                key,
                "TLS files need a mqtts:// url; the connection would not use them".into(),
            );
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => problem("key_file", "is missing; cert_file needs it".into()),
            (None, Some(_)) => problem("cert_file", "is missing; key_file needs it".into()),
            _ => {}
        }
        if let Some(file) = &self.ca_file
            && let Err(e) = load_certificates(file)
        {
            problem("ca_file", e);
        }
        if let Some(file) = &self.cert_file
            && let Err(e) = load_certificates(file)
        {
            problem("cert_file", e);
        }
        if let Some(file) = &self.key_file
            && let Err(e) = load_private_key(file)
        {
            problem("key_file", e);
        }
    }

    /// The broker address; only valid on a validated config.
    pub fn address(&self) -> Result<BrokerAddress, String> {
        parse_url(&self.url)
    }
}

/// Reads every certificate in a PEM file; at least one must be there.
pub fn load_certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = file.display();
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| format!("cannot read {shown}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{shown} contains no PEM certificate"));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_private_key(file: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(file).map_err(|e| {
        format!(
            "{} does not hold a readable PEM private key: {e}",
            file.display()
        )
    })
}

/// Quality of service of a route's publishes and subscriptions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "i64")]
pub enum Qos {
    AtMostOnce,
    #[default]
    AtLeastOnce,
    ExactlyOnce,
}

impl Qos {
    pub fn level(self) -> u8 {
        self as u8
    }
}

impl TryFrom<i64> for Qos {
    type Error = &'static str;

    fn try_from(value: i64) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(Qos::AtMostOnce),
            1 => Ok(Qos::AtLeastOnce),
            2 => Ok(Qos::ExactlyOnce),
            _ => Err("must be 0, 1 or 2"),
        }
    }
}

/// The MQTT keys of a `[[routes]]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RouteOptions {
    /// QoS of client publishes on this route, and the QoS its subscriptions ask the broker for.
    #[serde(default)]
    pub qos: Qos,
    /// Whether client publishes are retained by the broker.
    #[serde(default)]
    pub retain: bool,
    /// MQTT 5 content type set on client publishes.
    #[serde(default)]
    pub content_type: Option<String>,
}

impl RouteOptions {
    /// Parses and checks a route's MQTT keys, recording problems under `path` (the route's path).
    pub fn parse(
        route: &RouteConfig,
        protocol: ProtocolVersion,
        path: &str,
        problems: &mut Vec<ConfigProblem>,
    ) -> Option<RouteOptions> {
        let table = toml::Value::Table(route.options.clone());
        let options: RouteOptions = deserialize_section(table, path, problems)?;
        if let Some(content_type) = &options.content_type {
            if protocol == ProtocolVersion::V311 {
                problems.push(ConfigProblem::new(
                    format!("{path}.content_type"),
                    "needs protocol \"5\"; MQTT 3.1.1 messages have no content type",
                ));
                return None;
            }
            if content_type.is_empty() || content_type.chars().any(char::is_control) {
                problems.push(ConfigProblem::new(
                    format!("{path}.content_type"),
                    "must be a non-empty media type without control characters",
                ));
                return None;
            }
        }
        Some(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::Config;

    #[test]
    fn parses_broker_urls() {
        let ok = |url: &str, host: &str, port: u16, tls: bool| {
            assert_eq!(
                parse_url(url),
                Ok(BrokerAddress {
                    host: host.into(),
                    port,
                    tls
                }),
                "{url}"
            );
        };
        ok("mqtt://127.0.0.1:1883", "127.0.0.1", 1883, false);
        ok("mqtt://broker.local", "broker.local", 1883, false);
        ok("mqtts://broker.local", "broker.local", 8883, true);
        ok("mqtts://broker.local:9000/", "broker.local", 9000, true);
        ok("mqtt://[::1]:1884", "[::1]", 1884, false);
        for bad in [
            "tcp://x:1883",
            "127.0.0.1:1883",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://x:0",
            "mqtt://x:70000",
            "mqtt://x:port",
            "mqtt://user:pw@x",
            "mqtt://x/path",
            "mqtt://[::1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} should be refused");
        }
    }

    fn problems(backend: &str, route_options: &str) -> Vec<String> {
        let text = format!(
            "[backends.plant]\ntype = \"mqtt\"\n{backend}\n[[routes]]\nchannel = \"a/{{x}}\"\nbackend = \"plant\"\ntopic = \"a/{{x}}\"\nallow = [\"publish\"]\n{route_options}\n"
        );
        match Config::from_toml_with_env(&text, &|_| None) {
            Ok(_) => vec![],
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn a_minimal_backend_is_valid_and_defaults_are_documented_values() {
        assert_eq!(
            problems("url = \"mqtt://127.0.0.1:1883\"", ""),
            Vec::<String>::new()
        );
        let text = "[backends.plant]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1\"\n[[routes]]\nchannel = \"#\"\nbackend = \"plant\"\ntopic = \"#\"\nallow = [\"subscribe\"]\n";
        let config = Config::from_toml_with_env(text, &|_| None).unwrap();
        let c = config.backends()["plant"]
            .settings::<MqttConfig>()
            .expect("not an MQTT backend");
        assert_eq!(c.protocol, ProtocolVersion::V5);
        assert_eq!(c.keep_alive, Duration::from_secs(30));
        assert_eq!(c.unavailable_wait, Duration::ZERO);
        assert_eq!(c.max_packet_size, 1024 * 1024);
    }

    #[test]
    fn reports_backend_problems_with_their_key_path() {
        let p = problems(
            r#"url = "http://x"
            protocol = "4"
            keep_alive = "1s"
            connect_timeout = "100ms"
            reconnect_min_delay = "0s"
            max_packet_size = 10
            password = "secret"
            client_id_prefix = "has space"
            colour = "red""#,
            "",
        );
        let has = |needle: &str| p.iter().any(|l| l.starts_with(needle));
        // A type error stops deserialization, so the rest is checked without it.
        assert!(
            has("backends.plant.protocol: unknown variant `4`"),
            "{p:#?}"
        );
        assert!(has("backends.plant.colour: unknown key"), "{p:#?}");

        let p = problems(
            r#"url = "http://x"
            keep_alive = "1s"
            connect_timeout = "100ms"
            reconnect_min_delay = "0s"
            max_packet_size = 10
            password = "secret"
            client_id_prefix = "has space""#,
            "",
        );
        let has = |needle: &str| p.iter().any(|l| l.starts_with(needle));
        assert!(
            has("backends.plant.url: \"http://x\" must start with"),
            "{p:#?}"
        );
        assert!(
            has("backends.plant.keep_alive: 1s must be between"),
            "{p:#?}"
        );
        assert!(has("backends.plant.connect_timeout: "), "{p:#?}");
        assert!(has("backends.plant.reconnect_min_delay: "), "{p:#?}");
        assert!(has("backends.plant.max_packet_size: 10 must be"), "{p:#?}");
        assert!(has("backends.plant.password: is set without"), "{p:#?}");
        assert!(has("backends.plant.client_id_prefix: "), "{p:#?}");
        assert!(
            !p.iter().any(|l| l.contains("secret")),
            "the password never appears in messages: {p:#?}"
        );

        // A backend with bad values still has its routes checked, not called unknown.
        let p = problems("url = \"mqtt://x\"\nkeep_alive = \"1s\"", "qos = 3");
        assert_eq!(
            p,
            vec![
                "backends.plant.keep_alive: 1s must be between 5s and 65535s",
                "routes[0].qos: must be 0, 1 or 2 (got 3)"
            ]
        );
    }

    #[test]
    fn persistent_sessions_need_mqtt_5_and_a_session_expiry_mqtt_can_express() {
        assert_eq!(
            problems("url = \"mqtt://x\"\npersistent_session = true", ""),
            Vec::<String>::new()
        );
        assert_eq!(
            problems(
                "url = \"mqtt://x\"\nprotocol = \"3.1.1\"\npersistent_session = true",
                ""
            ),
            vec![
                "backends.plant.persistent_session: needs protocol \"5\": MQTT 3.1.1 cannot give a \
                 session an expiry, so the broker would keep the sessions of stopped instances forever"
            ]
        );
        assert_eq!(
            problems(
                "url = \"mqtt://x\"\npersistent_session = true\nsession_expiry = \"200years\"",
                ""
            ),
            vec!["backends.plant.session_expiry: 200years must be between 1s and 4294967295s"]
        );
    }

    #[test]
    fn tls_files_are_checked_when_the_config_is_loaded() {
        let p = problems(
            "url = \"mqtt://x\"\nca_file = \"/nonexistent/ca.pem\"\ncert_file = \"/nonexistent/c.pem\"",
            "",
        );
        let has = |needle: &str| p.iter().any(|l| l.starts_with(needle));
        assert!(
            has("backends.plant.ca_file: TLS files need a mqtts:// url"),
            "{p:#?}"
        );
        assert!(has("backends.plant.key_file: is missing"), "{p:#?}");
        assert!(
            has("backends.plant.ca_file: cannot read /nonexistent/ca.pem"),
            "{p:#?}"
        );
    }

    #[test]
    fn route_options_are_checked_with_the_route_path() {
        let p = problems("url = \"mqtt://x\"", "qos = 3\nretain = \"yes\"");
        assert!(
            p.iter()
                .any(|l| l.starts_with("routes[0].qos: must be 0, 1 or 2 (got 3)")),
            "{p:#?}"
        );
        let p = problems("url = \"mqtt://x\"", "retain = \"yes\"");
        assert!(
            p.iter()
                .any(|l| l.starts_with("routes[0].retain: invalid type")),
            "{p:#?}"
        );
        let p = problems("url = \"mqtt://x\"", "speed = 3");
        assert_eq!(p, vec!["routes[0].speed: unknown key"]);
        let p = problems(
            "url = \"mqtt://x\"\nprotocol = \"3.1.1\"",
            "content_type = \"application/json\"",
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("routes[0].content_type: needs protocol \"5\"")),
            "{p:#?}"
        );
        assert_eq!(
            problems(
                "url = \"mqtt://x\"",
                "qos = 2\nretain = true\ncontent_type = \"text/plain\""
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn passwords_are_redacted() {
        let shown = format!("{:?}", Password("hunter2".into()));
        assert!(!shown.contains("hunter2"));
    }
}
