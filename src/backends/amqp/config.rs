//! The `[backends.NAME]` table of an AMQP backend and the AMQP options of its routes.
//!
//! Connection-wide settings (URL, prefetch, confirm timeout, reconnect backoff, the default
//! `mandatory` flag and exchange declarations) live on the backend table; what differs per route
//! (the exchange, a work queue, `mandatory`) lives on the route. Both are validated when the
//! config is loaded, every problem reported with the path of its key.

use std::fmt;
use std::time::Duration;

use lapin::uri::AMQPUri;
use serde::Deserialize;

use crate::config::{ConfigProblem, Operation, RouteConfig, deserialize_section};

/// `[backends.NAME]` with `type = "amqp"`.
#[derive(Clone, Deserialize)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost` or `amqps://...`; the vhost `/` is written `%2f`.
    pub url: String,
    /// Unacknowledged deliveries the broker may send per consumer before waiting for acks.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Longest wait for the broker to confirm a publish.
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// First delay before reconnecting after the connection is lost; doubled per failed attempt.
    #[serde(default = "default_reconnect_initial", with = "humantime_serde")]
    pub reconnect_initial: Duration,
    /// Longest delay between reconnect attempts.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Default of the routes' `mandatory` flag: publishes no queue receives are refused.
    #[serde(default)]
    pub mandatory: bool,
    /// Exchanges declared on every (re)connect.
    #[serde(default)]
    pub exchanges: Vec<ExchangeConfig>,
}

fn default_prefetch() -> u16 {
    256
}

fn default_confirm_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_reconnect_initial() -> Duration {
    Duration::from_millis(100)
}

fn default_reconnect_max() -> Duration {
    Duration::from_secs(10)
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redacted_url(&self.url))
            .field("prefetch", &self.prefetch)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("reconnect_initial", &self.reconnect_initial)
            .field("reconnect_max", &self.reconnect_max)
            .field("mandatory", &self.mandatory)
            .field("exchanges", &self.exchanges)
            .finish()
    }
}

/// The URL with its password replaced, for logs and `Debug`.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<invalid url>".into();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// An exchange the backend declares on every (re)connect.
#[derive(Debug, Clone, Deserialize)]
pub struct ExchangeConfig {
    pub name: String,
    /// `topic` (default), `direct` or `fanout`.
    #[serde(rename = "type", default)]
    pub kind: ExchangeType,
    /// Survives a broker restart.
    #[serde(default = "yes")]
    pub durable: bool,
    /// Deleted by the broker when its last binding goes.
    #[serde(default)]
    pub auto_delete: bool,
}

fn yes() -> bool {
    true
}

/// The exchange types routes can use. Headers exchanges route on headers, not on the routing key
/// a channel maps to, so they are not offered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeType {
    #[default]
    Topic,
    Direct,
    Fanout,
}

impl ExchangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Topic => "topic",
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
        }
    }
}

impl AmqpConfig {
    /// Deserializes and validates a backend table, recording problems under `path`.
    pub fn from_section(
        table: toml::Value,
        path: &str,
        problems: &mut Vec<ConfigProblem>,
    ) -> Option<AmqpConfig> {
        let config: AmqpConfig = deserialize_section(table, path, problems)?;
        let before = problems.len();
        config.validate(path, problems);
        (problems.len() == before).then_some(config)
    }

    fn validate(&self, path: &str, problems: &mut Vec<ConfigProblem>) {
        let mut problem = |key: &str, message: String| {
            problems.push(ConfigProblem::new(format!("{path}.{key}"), message));
        };
        if let Err(message) = parse_url(&self.url) {
            problem("url", message);
        }
        if self.prefetch == 0 {
            problem(
                "prefetch",
                "must be at least 1 (0 would mean no limit at all)".into(),
            );
        }
        if self.confirm_timeout.is_zero() {
            problem("confirm_timeout", "must be longer than 0s".into());
        }
        if self.reconnect_initial.is_zero() {
            problem("reconnect_initial", "must be longer than 0s".into());
        }
        if self.reconnect_max < self.reconnect_initial {
            problem(
                "reconnect_max",
                format!(
                    "must not be shorter than reconnect_initial ({})",
                    humantime::format_duration(self.reconnect_initial)
                ),
            );
        }
        for (i, exchange) in self.exchanges.iter().enumerate() {
            if let Err(message) = check_name(&exchange.name, "exchange") {
                problem(&format!("exchanges[{i}].name"), message);
            }
            if self.exchanges[..i]
                .iter()
                .any(|other| other.name == exchange.name)
            {
                problem(
                    &format!("exchanges[{i}].name"),
                    format!("exchange {:?} is declared twice", exchange.name),
                );
            }
        }
    }

    /// The declared exchange of this name, if any.
    pub fn exchange(&self, name: &str) -> Option<&ExchangeConfig> {
        self.exchanges.iter().find(|e| e.name == name)
    }
}

/// Parses the broker URL; the message explains what is wrong.
pub fn parse_url(url: &str) -> Result<AMQPUri, String> {
    let parsed: AMQPUri = url
        .parse()
        .map_err(|e| format!("is not an amqp:// or amqps:// URL: {e}"))?;
    if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
        return Err("must start with amqp:// or amqps://".into());
    }
    // The client library reads an IPv6 literal as "localhost"; refuse it rather than connect
    // somewhere else.
    if url
        .split('/')
        .nth(2)
        .is_some_and(|authority| authority.contains('['))
    {
        return Err("IPv6 address literals are not supported; use a host name".into());
    }
    if parsed.vhost.is_empty() {
        return Err(
            "names the empty vhost (a trailing '/' means vhost \"\"); write %2f for the default vhost \"/\" or leave the path out"
                .into(),
        );
    }
    Ok(parsed)
}

/// Checks an exchange or queue name: the broker's own limits, and no `amq.` prefix, which the
/// broker reserves for its predeclared exchanges.
fn check_name(name: &str, what: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("the {what} name is empty"));
    }
    if name.len() > 255 {
        return Err(format!("the {what} name is longer than 255 bytes"));
    }
    if name.starts_with("amq.") {
        return Err(format!(
            "{what} names starting with \"amq.\" are reserved by the broker"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(format!(
            "the {what} name {name:?} may contain only letters, digits, '-', '_', '.' and ':'"
        ));
    }
    Ok(())
}

/// Problems with the queue or stream a route reads: its name (`what` names it in messages), and
/// for `direct_exchange`, a binding key the exchange would take literally (`label` says what is
/// bound).
fn log_problems(name: &str, what: &str, label: &str, direct_exchange: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(message) = check_name(name, what) {
        problems.push(message);
    }
    if let Some(exchange) = direct_exchange {
        problems.push(format!(
            "a {label} on the direct exchange {exchange:?} is bound with the route's topic, which must then have no placeholders or '#'"
        ));
    }
    problems
}

/// The AMQP keys of a `[[routes]]` entry.
#[derive(Debug, Clone, Deserialize)]
pub struct RouteOptions {
    /// Exchange to publish to and bind from; `""` is the default exchange.
    pub exchange: String,
    /// Type of an exchange that is not declared in the backend's `exchanges`.
    #[serde(default)]
    pub exchange_type: Option<ExchangeType>,
    /// Consume this durable queue (shared with other consumers) instead of a private binding.
    #[serde(default)]
    pub queue: Option<String>,
    /// Read this RabbitMQ stream (an append-only log bound to the route's exchange) instead of a
    /// private binding: subscriptions may start from a past position and messages carry their
    /// offset.
    #[serde(default)]
    pub stream: Option<String>,
    /// Refuse publishes that no queue receives; defaults to the backend's `mandatory`.
    #[serde(default)]
    pub mandatory: Option<bool>,
}

/// What the backend needs to know about one of its routes.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub exchange: String,
    pub kind: ExchangeType,
    pub queue: Option<String>,
    pub stream: Option<String>,
    pub mandatory: bool,
    /// The widest binding key of the route's topic template: every placeholder level a `*`.
    pub binding_key: String,
}

impl RouteOptions {
    fn parse(
        route: &RouteConfig,
        path: &str,
        problems: &mut Vec<ConfigProblem>,
    ) -> Option<RouteOptions> {
        if !route.options.contains_key("exchange") {
            problems.push(ConfigProblem::new(
                format!("{path}.exchange"),
                "missing: AMQP routes name the exchange to publish to and bind from, e.g. exchange = \"amq.topic\" (\"\" is the default exchange)",
            ));
            return None;
        }
        deserialize_section(toml::Value::Table(route.options.clone()), path, problems)
    }
}

/// The exchange type a route uses: its declaration, else the route's `exchange_type`, else what
/// the broker's predeclared exchanges are, else `topic`.
fn exchange_kind(config: &AmqpConfig, options: &RouteOptions) -> ExchangeType {
    if let Some(declared) = config.exchange(&options.exchange) {
        return declared.kind;
    }
    if let Some(kind) = options.exchange_type {
        return kind;
    }
    match options.exchange.as_str() {
        "" | "amq.direct" => ExchangeType::Direct,
        "amq.fanout" => ExchangeType::Fanout,
        _ => ExchangeType::Topic,
    }
}

/// The routing key a route's topic template covers as a whole: each level with a placeholder
/// becomes `*`, a final `#` stays.
fn widest_binding_key(topic: &str) -> String {
    topic
        .split('.')
        .map(|level| if level.contains('{') { "*" } else { level })
        .collect::<Vec<_>>()
        .join(".")
}

impl AmqpConfig {
    /// The validated spec of a route, or `None` after recording its problems.
    pub fn route_spec(
        &self,
        route: &RouteConfig,
        path: &str,
        problems: &mut Vec<ConfigProblem>,
    ) -> Option<RouteSpec> {
        let options = RouteOptions::parse(route, path, problems)?;
        let before = problems.len();
        let mut problem = |key: &str, message: String| {
            problems.push(ConfigProblem::new(format!("{path}.{key}"), message));
        };
        let kind = exchange_kind(self, &options);
        if options.exchange.len() > 255 {
            problem(
                "exchange",
                "the exchange name is longer than 255 bytes".into(),
            );
        } else if !options.exchange.is_empty()
            && !options.exchange.starts_with("amq.")
            && let Err(message) = check_name(&options.exchange, "exchange")
        {
            problem("exchange", message);
        }
        if let (Some(declared), Some(given)) =
            (self.exchange(&options.exchange), options.exchange_type)
            && declared.kind != given
        {
            problem(
                "exchange_type",
                format!(
                    "is {:?}, but the backend declares exchange {:?} as {:?}",
                    given.as_str(),
                    options.exchange,
                    declared.kind.as_str()
                ),
            );
        }
        let subscribes = route.allow.contains(&Operation::Subscribe);
        let binding_key = widest_binding_key(&route.topic);
        if binding_key.len() > 255 {
            problem(
                "topic",
                "a routing key is at most 255 bytes; this template is longer".into(),
            );
        }
        let placeholders = binding_key.split('.').any(|l| l == "*" || l == "#");
        // A work queue or stream is bound with the route's widest key, which a direct exchange
        // takes literally.
        let literal_binding =
            (kind == ExchangeType::Direct && !options.exchange.is_empty() && placeholders)
                .then_some(options.exchange.as_str());
        match (&options.queue, &options.stream) {
            (Some(_), Some(_)) => problem(
                "stream",
                "a route reads either a work queue (queue) or a stream (stream), not both".into(),
            ),
            (Some(queue), None) => {
                for message in log_problems(queue, "queue", "work queue", literal_binding) {
                    problem("queue", message);
                }
            }
            (None, Some(stream)) => {
                for message in log_problems(stream, "stream", "stream", literal_binding) {
                    problem("stream", message);
                }
                if options.exchange.is_empty() {
                    problem(
                        "exchange",
                        "a stream route publishes to its exchange, to which the stream is bound; the default exchange \"\" cannot be bound to: name one, e.g. exchange = \"amq.topic\"".into(),
                    );
                }
            }
            (None, None) if options.exchange.is_empty() && subscribes => problem(
                "exchange",
                "the default exchange \"\" cannot be bound to; subscribe through a named exchange or set queue = \"...\"".into(),
            ),
            (None, None) => {}
        }
        (problems.len() == before).then(|| RouteSpec {
            mandatory: options.mandatory.unwrap_or(self.mandatory),
            exchange: options.exchange,
            kind,
            queue: options.queue,
            stream: options.stream,
            binding_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::gateway::Config;

    fn problems(text: &str) -> Vec<String> {
        match Config::from_toml_with_env(text, &|_| None) {
            Ok(_) => vec![],
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    const ROUTE: &str = r##"
        [[routes]]
        channel = "orders/{region}/#"
        backend = "rabbit"
        exchange = "amq.topic"
        topic = "orders.{region}.#"
        allow = ["subscribe", "publish"]
    "##;

    #[test]
    fn the_documented_example_is_valid() {
        let text = format!(
            "[backends.rabbit]\ntype = \"amqp\"\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n{ROUTE}"
        );
        assert_eq!(problems(&text), Vec::<String>::new());
        let config = Config::from_toml_with_env(&text, &|_| None).unwrap();
        let rendered = format!("{:?}", config.backends()["rabbit"]);
        assert!(rendered.contains("guest:***@127.0.0.1"), "{rendered}");
        assert!(!rendered.contains("guest:guest"), "{rendered}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../../config/amqp.toml");
        let config = Config::from_toml_with_env(text, &|_| None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.routes().len(), 5);
    }

    #[test]
    fn backend_table_problems_name_their_key() {
        let text = format!(
            r#"
            [backends.rabbit]
            type = "amqp"
            url = "amqp://guest:guest@127.0.0.1:5672/"
            prefetch = 0
            confirm_timeout = "0s"
            reconnect_initial = "5s"
            reconnect_max = "1s"
            colour = "red"
            [[backends.rabbit.exchanges]]
            name = "amq.mine"
            [[backends.rabbit.exchanges]]
            name = "x"
            [[backends.rabbit.exchanges]]
            name = "x"
            type = "fanout"
            {ROUTE}
            "#
        );
        let p = problems(&text);
        let has = |needle: &str| p.iter().any(|l| l.contains(needle));
        assert!(has("backends.rabbit.url: names the empty vhost"), "{p:#?}");
        assert!(
            has("backends.rabbit.prefetch: must be at least 1"),
            "{p:#?}"
        );
        assert!(
            has("backends.rabbit.confirm_timeout: must be longer"),
            "{p:#?}"
        );
        assert!(
            has("backends.rabbit.reconnect_max: must not be shorter"),
            "{p:#?}"
        );
        assert!(has("backends.rabbit.colour: unknown key"), "{p:#?}");
        assert!(
            has("backends.rabbit.exchanges[0].name: exchange names starting with \"amq.\""),
            "{p:#?}"
        );
        assert!(
            has("backends.rabbit.exchanges[2].name: exchange \"x\" is declared twice"),
            "{p:#?}"
        );

        let p = problems(&text.replace("prefetch = 0", "prefetch = 70000"));
        assert!(
            p.iter()
                .any(|l| l.starts_with("backends.rabbit.prefetch: ")),
            "{p:#?}"
        );
        let p = problems(&text.replace("amqp://guest:guest@127.0.0.1:5672/\"", "http://x\""));
        assert!(
            p.iter().any(|l| l.starts_with("backends.rabbit.url: ")),
            "{p:#?}"
        );
    }

    #[test]
    fn route_problems_name_their_key() {
        let text = r##"
            [backends.rabbit]
            type = "amqp"
            url = "amqp://127.0.0.1"
            [[backends.rabbit.exchanges]]
            name = "events"
            type = "fanout"
            [[routes]]
            channel = "a/{x}"
            backend = "rabbit"
            topic = "a.{x}"
            allow = ["subscribe"]
            [[routes]]
            channel = "b/{x}"
            backend = "rabbit"
            exchange = ""
            topic = "b.{x}"
            allow = ["subscribe"]
            [[routes]]
            channel = "c/{x}"
            backend = "rabbit"
            exchange = "events"
            exchange_type = "topic"
            topic = "c.{x}"
            allow = ["publish"]
            speed = 3
            [[routes]]
            channel = "d/{x}"
            backend = "rabbit"
            exchange = "amq.direct"
            queue = "work"
            topic = "d.{x}"
            allow = ["subscribe"]
            [[routes]]
            channel = "e/{x}"
            backend = "rabbit"
            exchange = "amq.headers"
            exchange_type = "headers"
            topic = "e.{x}"
            key = "{x}"
            allow = ["subscribe"]
            [[routes]]
            channel = "f/{x}"
            backend = "rabbit"
            exchange = "amq.topic"
            topic = "f.{x}.*"
            allow = ["subscribe"]
        "##;
        let p = problems(text);
        let has = |needle: &str| p.iter().any(|l| l.contains(needle));
        assert!(has("routes[0].exchange: missing"), "{p:#?}");
        assert!(has("routes[1].exchange: the default exchange"), "{p:#?}");
        assert!(
            has("routes[2].exchange_type: is \"topic\", but the backend declares"),
            "{p:#?}"
        );
        assert!(has("routes[2].speed: unknown key"), "{p:#?}");
        assert!(
            has("routes[3].queue: a work queue on the direct exchange"),
            "{p:#?}"
        );
        assert!(
            has("routes[4].exchange_type: unknown variant `headers`"),
            "{p:#?}"
        );
        assert!(
            has("routes[4].key: amqp backends have no message keys"),
            "{p:#?}"
        );
        assert!(
            has("routes[5].topic: wildcard '*' is not allowed"),
            "{p:#?}"
        );
    }

    #[test]
    fn stream_route_problems_name_their_key() {
        let text = r##"
            [backends.rabbit]
            type = "amqp"
            url = "amqp://127.0.0.1"
            [[routes]]
            channel = "a/{x}"
            backend = "rabbit"
            exchange = "amq.topic"
            stream = "log"
            queue = "jobs"
            topic = "a.{x}"
            allow = ["subscribe"]
            [[routes]]
            channel = "b/{x}"
            backend = "rabbit"
            exchange = ""
            stream = "log"
            topic = "b.{x}"
            allow = ["subscribe"]
            [[routes]]
            channel = "c/{x}"
            backend = "rabbit"
            exchange = "amq.topic"
            stream = "a log"
            topic = "c.{x}"
            allow = ["subscribe"]
            [[routes]]
            channel = "d/{x}"
            backend = "rabbit"
            exchange = "amq.direct"
            stream = "log"
            topic = "d.{x}"
            allow = ["subscribe"]
        "##;
        let p = problems(text);
        let has = |needle: &str| p.iter().any(|l| l.contains(needle));
        assert!(
            has("routes[0].stream: a route reads either a work queue (queue) or a stream"),
            "{p:#?}"
        );
        assert!(
            has("routes[1].exchange: a stream route publishes"),
            "{p:#?}"
        );
        assert!(
            has("routes[2].stream: the stream name \"a log\" may contain only"),
            "{p:#?}"
        );
        assert!(
            has("routes[3].stream: a stream on the direct exchange"),
            "{p:#?}"
        );
        assert_eq!(p.len(), 4, "{p:#?}");

        let valid = text.replace("queue = \"jobs\"\n", "");
        let valid = &valid[..valid.find("[[routes]]\n            channel = \"b").unwrap()];
        assert_eq!(problems(valid), Vec::<String>::new());
    }

    #[test]
    fn names_and_keys_longer_than_amqp_allows_are_refused() {
        let long = "x".repeat(300);
        let text = format!(
            r#"
            [backends.rabbit]
            type = "amqp"
            url = "amqp://127.0.0.1"
            [[routes]]
            channel = "a/{{x}}"
            backend = "rabbit"
            exchange = "amq.{long}"
            topic = "{long}.{{x}}"
            allow = ["publish"]
            "#
        );
        let p = problems(&text);
        assert!(
            p.iter()
                .any(|l| l.starts_with("routes[0].exchange: the exchange name is longer")),
            "{p:#?}"
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("routes[0].topic: a routing key is at most 255 bytes")),
            "{p:#?}"
        );
    }

    #[test]
    fn widest_binding_key_covers_the_whole_route() {
        assert_eq!(super::widest_binding_key("orders.{region}.#"), "orders.*.#");
        assert_eq!(super::widest_binding_key("plant-{site}.data"), "*.data");
        assert_eq!(super::widest_binding_key("fixed"), "fixed");
    }

    #[test]
    fn urls_name_the_host_and_vhost_they_say() {
        let parsed = super::parse_url("amqp://u:p@10.1.2.3:5673").unwrap();
        assert_eq!(parsed.authority.host, "10.1.2.3");
        assert_eq!(parsed.authority.port, 5673);
        assert_eq!(parsed.vhost, "/");
        assert_eq!(super::parse_url("amqps://h/prod").unwrap().vhost, "prod");
        assert!(
            super::parse_url("amqp://[::1]:5672/%2f")
                .unwrap_err()
                .contains("IPv6")
        );
        assert!(
            super::parse_url("amqp://h/")
                .unwrap_err()
                .contains("empty vhost")
        );
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            super::redacted_url("amqps://user:s3cret@host:5671/%2f?heartbeat=5"),
            "amqps://user:***@host:5671/%2f?heartbeat=5"
        );
        assert_eq!(super::redacted_url("amqp://host"), "amqp://host");
    }
}
