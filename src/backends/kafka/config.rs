//! `[backends.NAME]` with `type = "kafka"`: options, their defaults and validation, and the
//! librdkafka settings derived from them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::Deserialize;

use crate::config::{ConfigProblem, RouteConfig};
use crate::routing::TopicSyntax;

/// Kafka topic names: one opaque name of letters, digits, `.`, `_` and `-`, at most 249 bytes.
pub const KAFKA_TOPIC: TopicSyntax = TopicSyntax {
    name: "Kafka topic",
    separator: None,
    single_wildcard: None,
    multi_wildcard: None,
    max_len: 249,
    value_char: is_topic_char,
};

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// librdkafka properties the adapter sets itself, with the option that controls each (if any).
const MANAGED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "use the `brokers` option"),
    ("metadata.broker.list", "use the `brokers` option"),
    ("client.id", "use the `client_id` option"),
    ("group.id", "use the `group_id` option"),
    ("acks", "use the `acks` option"),
    ("request.required.acks", "use the `acks` option"),
    ("enable.idempotence", "use the `idempotence` option"),
    ("message.timeout.ms", "use the `delivery_timeout` option"),
    ("delivery.timeout.ms", "use the `delivery_timeout` option"),
    (
        "enable.auto.commit",
        "the gateway assigns partitions itself and never commits offsets",
    ),
    (
        "enable.auto.offset.store",
        "the gateway assigns partitions itself and never commits offsets",
    ),
    (
        "auto.offset.reset",
        "the gateway chooses start offsets from each subscription's \"from\"",
    ),
    (
        "enable.partition.eof",
        "the gateway does not use end-of-partition events",
    ),
    (
        "allow.auto.create.topics",
        "the gateway never creates topics; create them with your Kafka tooling",
    ),
];

/// Words that mark a property value as a secret, hidden in `Debug` output and logs.
const SECRET_MARKERS: &[&str] = &["password", "secret", "jaas", "token", "key.pem", "private"];

/// Which acknowledgement a publish waits for before the client gets `ok`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Acks {
    /// Every in-sync replica has the message (`acks = "all"`).
    #[default]
    All,
    /// The partition leader has the message (`acks = 1`).
    Leader,
    /// Nothing: `ok` as soon as the message is sent, without a position (`acks = 0`).
    None,
}

impl Acks {
    fn as_property(self) -> &'static str {
        match self {
            Acks::All => "all",
            Acks::Leader => "1",
            Acks::None => "0",
        }
    }
}

impl<'de> Deserialize<'de> for Acks {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(i64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(s) if s == "all" || s == "-1" => Ok(Acks::All),
            Raw::Number(-1) => Ok(Acks::All),
            Raw::Number(1) => Ok(Acks::Leader),
            Raw::Text(s) if s == "1" => Ok(Acks::Leader),
            Raw::Number(0) => Ok(Acks::None),
            Raw::Text(s) if s == "0" => Ok(Acks::None),
            _ => Err(serde::de::Error::custom(
                "must be \"all\", 1 (leader only) or 0 (no acknowledgement)",
            )),
        }
    }
}

/// A librdkafka property value; TOML numbers and booleans are passed on as text.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum PropertyValue {
    Text(String),
    Integer(i64),
    Bool(bool),
}

impl PropertyValue {
    fn to_property(&self) -> String {
        match self {
            PropertyValue::Text(s) => s.clone(),
            PropertyValue::Integer(i) => i.to_string(),
            PropertyValue::Bool(b) => b.to_string(),
        }
    }
}

fn default_client_id() -> String {
    "wsbridge".into()
}

fn default_delivery_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_true() -> bool {
    true
}

/// `[backends.NAME]` with `type = "kafka"`.
#[derive(Clone, Deserialize)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`, comma-separated.
    pub brokers: String,
    /// Client id the broker sees (logs, quotas). Default "wsbridge".
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// How long a publish may take, retries included, before the client gets `backend_timeout`.
    /// Default 5 s; keep it below `server.request_timeout` so the adapter's answer arrives first.
    #[serde(default = "default_delivery_timeout", with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// Acknowledgement a publish waits for: "all" (default), 1 or 0.
    #[serde(default)]
    pub acks: Acks,
    /// Idempotent producer: broker-side deduplication of retries, in order per partition.
    /// Default true; needs `acks = "all"`.
    #[serde(default = "default_true")]
    pub idempotence: bool,
    /// Consumer group id the gateway's consumers report. Default: unique per gateway instance.
    /// The gateway never joins the group or commits offsets (it assigns partitions itself), so
    /// every instance reads every message whatever this is.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Extra librdkafka properties (SASL, SSL, tuning), passed through as given.
    #[serde(default)]
    properties: BTreeMap<String, PropertyValue>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, String> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret(k) {
                    "<redacted>".to_string()
                } else {
                    v.to_property()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("acks", &self.acks)
            .field("idempotence", &self.idempotence)
            .field("group_id", &self.group_id)
            .field("properties", &properties)
            .finish()
    }
}

fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_MARKERS.iter().any(|m| key.contains(m))
}

impl KafkaConfig {
    /// Checks what serde cannot, recording every problem under `path`.
    pub fn validate(&self, path: &str, problems: &mut Vec<ConfigProblem>) {
        let at = |key: &str| format!("{path}.{key}");

        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            problems.push(ConfigProblem::new(
                at("brokers"),
                "is empty; list bootstrap brokers as \"host:port,host:port\"",
            ));
        }
        for broker in self.brokers.split(',').map(str::trim) {
            if broker.is_empty() {
                continue;
            }
            let port = broker
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p > 0) {
                problems.push(ConfigProblem::new(
                    at("brokers"),
                    format!("{broker:?} is not host:port"),
                ));
            }
        }
        if self.client_id.trim().is_empty() {
            problems.push(ConfigProblem::new(at("client_id"), "must not be empty"));
        }
        if self
            .group_id
            .as_deref()
            .is_some_and(|g| g.trim().is_empty())
        {
            problems.push(ConfigProblem::new(at("group_id"), "must not be empty"));
        }
        let ms = self.delivery_timeout.as_millis();
        if ms == 0 || ms > i32::MAX as u128 {
            problems.push(ConfigProblem::new(
                at("delivery_timeout"),
                "must be between 1ms and 24 days",
            ));
        }
        if self.idempotence && self.acks != Acks::All {
            problems.push(ConfigProblem::new(
                at("idempotence"),
                "requires acks = \"all\"; set idempotence = false to use other acks",
            ));
        }
        for (key, value) in &self.properties {
            let key_path = format!("{path}.properties.{}", quote_key(key));
            if let Some((_, why)) = MANAGED_PROPERTIES.iter().find(|(k, _)| k == key) {
                problems.push(ConfigProblem::new(
                    key_path,
                    format!("is set by the gateway: {why}"),
                ));
                continue;
            }
            // librdkafka checks names and values when they are set, before any client exists.
            let mut probe = ClientConfig::new();
            probe.set(key, value.to_property());
            if let Err(e) = probe.create_native_config() {
                // The error's own text repeats the value, which may be a secret.
                let message = match e {
                    rdkafka::error::KafkaError::ClientConfig(_, description, ..) => description,
                    other => other.to_string(),
                };
                problems.push(ConfigProblem::new(key_path, message));
            }
        }
    }

    /// Settings shared by every client of this backend.
    fn common(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in &self.properties {
            config.set(key, value.to_property());
        }
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            .set("allow.auto.create.topics", "false");
        config
    }

    /// The producer's settings.
    pub fn producer(&self) -> ClientConfig {
        let mut config = self.common();
        config
            .set("acks", self.acks.as_property())
            .set("enable.idempotence", self.idempotence.to_string())
            .set(
                "message.timeout.ms",
                self.delivery_timeout.as_millis().to_string(),
            );
        // librdkafka's defaults batch for up to 5 ms; a web client waits for its `ok`, and
        // batching still happens under load because messages queue while a request is in flight.
        if !self.properties.contains_key("linger.ms")
            && !self.properties.contains_key("queue.buffering.max.ms")
        {
            config.set("linger.ms", "1");
        }
        config
    }

    /// A consumer's settings. Consumers are assigned partitions and offsets explicitly.
    pub fn consumer(&self, group_id: &str) -> ClientConfig {
        let mut config = self.common();
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // When a position falls out of the log (retention, a recreated topic), continue at
            // the oldest message still held; the reader reports the gap.
            .set("auto.offset.reset", "earliest");
        if !self.properties.contains_key("fetch.wait.max.ms") {
            config.set("fetch.wait.max.ms", "100");
        }
        config
    }

    /// A replay consumer's settings: a replay waits for its client, and while it waits
    /// librdkafka holds what it fetched ahead, so that is kept small (4 MiB unless configured).
    pub fn replay_consumer(&self, group_id: &str) -> ClientConfig {
        let mut config = self.consumer(group_id);
        if !self.properties.contains_key("queued.max.messages.kbytes") {
            config.set("queued.max.messages.kbytes", "4096");
        }
        config
    }
}

/// A TOML key as it would be written in a path: quoted when it contains dots.
fn quote_key(key: &str) -> String {
    if key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// Checks a route's Kafka-specific parts: the literal text of the topic template must be valid
/// in a topic name, and Kafka routes have no other options.
pub fn check_route(route: &RouteConfig, path: &str, problems: &mut Vec<ConfigProblem>) {
    let mut literal = String::new();
    let mut depth = 0usize;
    for c in route.topic.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            c if depth == 0 => literal.push(c),
            _ => {}
        }
    }
    let bad: Vec<char> = literal.chars().filter(|c| !is_topic_char(*c)).collect();
    if !bad.is_empty() {
        problems.push(ConfigProblem::new(
            format!("{path}.topic"),
            format!(
                "{:?} is not a valid Kafka topic name: {:?} not allowed (letters, digits, '.', '_' and '-' only)",
                route.topic,
                bad.iter().collect::<String>()
            ),
        ));
    }
    for key in route.options.keys() {
        problems.push(ConfigProblem::new(
            format!("{path}.{key}"),
            "unknown key (kafka routes take channel, backend, topic, key, allow, slow_consumer)",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::KafkaConfig;
    use crate::gateway::Config;

    fn problems(backend: &str, route_extra: &str) -> Vec<String> {
        let text = format!(
            "[backends.events]\ntype = \"kafka\"\n{backend}\n[[routes]]\nchannel = \"events/{{name}}\"\nbackend = \"events\"\ntopic = \"app-{{name}}\"\nallow = [\"subscribe\", \"publish\"]\n{route_extra}\n"
        );
        match Config::from_toml_with_env(&text, &|_| None) {
            Ok(_) => vec![],
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn minimal_config_is_valid_with_documented_defaults() {
        assert_eq!(
            problems("brokers = \"127.0.0.1:9092\"", ""),
            Vec::<String>::new()
        );
        let text = "[backends.events]\ntype = \"kafka\"\nbrokers = \"k:9092\"\n[[routes]]\nchannel = \"a/{x}\"\nbackend = \"events\"\ntopic = \"a.{x}\"\nkey = \"{x}\"\nallow = [\"publish\"]\n";
        let config = Config::from_toml_with_env(text, &|_| None).unwrap();
        let k = config.backends()["events"]
            .settings::<KafkaConfig>()
            .expect("not kafka");
        assert_eq!(k.client_id, "wsbridge");
        assert_eq!(k.delivery_timeout, std::time::Duration::from_secs(5));
        assert_eq!(k.acks, super::Acks::All);
        assert!(k.idempotence);
        assert_eq!(k.group_id, None);
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let p = problems(
            r#"brokers = "localhost, :9092,nohost"
client_id = ""
delivery_timeout = "0s"
acks = 1
colour = "red"
[backends.events.properties]
"sasl.password" = "hunter2"
"group.id" = "mine"
"no.such.thing" = "x"
"socket.timeout.ms" = "soon"
"#,
            "partitions = 3",
        );
        let has = |needle: &str| p.iter().any(|l| l.contains(needle));
        assert!(
            has("backends.events.brokers: \"localhost\" is not host:port"),
            "{p:#?}"
        );
        assert!(
            has("backends.events.brokers: \":9092\" is not host:port"),
            "{p:#?}"
        );
        assert!(
            has("backends.events.client_id: must not be empty"),
            "{p:#?}"
        );
        assert!(
            has("backends.events.delivery_timeout: must be between"),
            "{p:#?}"
        );
        assert!(
            has("backends.events.idempotence: requires acks = \"all\""),
            "{p:#?}"
        );
        assert!(has("backends.events.colour: unknown key"), "{p:#?}");
        assert!(
            has(
                "backends.events.properties.\"group.id\": is set by the gateway: use the `group_id` option"
            ),
            "{p:#?}"
        );
        assert!(
            has("backends.events.properties.\"no.such.thing\": "),
            "{p:#?}"
        );
        assert!(
            has("backends.events.properties.\"socket.timeout.ms\": "),
            "{p:#?}"
        );
        assert!(!has("sasl.password"), "a valid secret is fine: {p:#?}");
        assert!(has("routes[0].partitions: unknown key"), "{p:#?}");
    }

    #[test]
    fn acks_accepts_kafka_spellings_only() {
        for ok in ["\"all\"", "-1", "1", "0"] {
            let idem = if ok.contains("all") || ok == "-1" {
                ""
            } else {
                "idempotence = false"
            };
            assert_eq!(
                problems(&format!("brokers = \"k:1\"\nacks = {ok}\n{idem}"), ""),
                Vec::<String>::new(),
                "{ok}"
            );
        }
        let p = problems("brokers = \"k:1\"\nacks = \"most\"", "");
        assert!(
            p.iter()
                .any(|l| l.starts_with("backends.events.acks: must be")),
            "{p:#?}"
        );
    }

    #[test]
    fn topic_templates_must_be_valid_topic_names() {
        let text = "[backends.events]\ntype = \"kafka\"\nbrokers = \"k:9092\"\n[[routes]]\nchannel = \"a/{x}\"\nbackend = \"events\"\ntopic = \"bad topic/{x}\"\nallow = [\"publish\"]\n";
        let e = Config::from_toml_with_env(text, &|_| None).unwrap_err();
        let p: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            p.iter().any(|l| l
                .starts_with("routes[0].topic: \"bad topic/{x}\" is not a valid Kafka topic name")),
            "{p:#?}"
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../../config/kafka-dashboard.toml");
        let config = Config::from_toml_with_env(text, &|_| None).expect("valid example");
        assert_eq!(config.backends()["events"].kind(), "kafka");
        assert_eq!(config.routes().len(), 2);
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let text = "[backends.events]\ntype = \"kafka\"\nbrokers = \"k:9092\"\n[backends.events.properties]\n\"sasl.password\" = \"hunter2\"\n\"sasl.username\" = \"alice\"\n[[routes]]\nchannel = \"a/{x}\"\nbackend = \"events\"\ntopic = \"a.{x}\"\nallow = [\"publish\"]\n";
        let config = Config::from_toml_with_env(text, &|_| None).unwrap();
        let shown = format!("{:?}", config.backends()["events"]);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"), "{shown}");
    }
}
