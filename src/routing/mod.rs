//! Routing: which backend and topic serve a client channel, and how topics map back.
//!
//! Routes are compiled once from the config. A client channel or pattern is matched against them
//! in order; the first route whose channel template covers it decides backend, topic and the
//! operations allowed. The reverse direction ([`Route::channel_for`]) turns a broker topic (and
//! key) into the client channel a subscriber sees.
//!
//! Routing knows backends only as [`BackendTarget`]s: a name, the topic syntax the backend
//! declares and whether its messages have keys. It never names a broker.

mod pattern;
mod template;

use std::sync::Arc;

pub use pattern::{ChannelError, ChannelPattern, MAX_CHANNEL_LEN, MAX_LEVELS, PatternLevel};
pub use template::{
    BindError, Bindings, Captures, ChannelTemplate, ClaimSource, NoClaims, Placeholder,
    RenderError, RenderedTopic, TopicSyntax, TopicTemplate,
};

use crate::config::{ConfigProblem, MaxRate, Operation, RouteConfig, SlowConsumerPolicy};
use crate::transform::{ClientPayload, JsonSchema, PayloadError, PayloadFormat, Schemas};

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    /// Position in the config's `routes` array.
    pub index: usize,
    pub channel: ChannelTemplate,
    pub topic: TopicTemplate,
    pub key: Option<TopicTemplate>,
    /// Position of the backend in the gateway's backend list.
    pub backend: usize,
    pub backend_name: String,
    pub allow_subscribe: bool,
    pub allow_publish: bool,
    pub slow_consumer: SlowConsumerPolicy,
    /// Most messages per second a client gets on one channel.
    pub max_rate: Option<MaxRate>,
    pub format: PayloadFormat,
    /// Schema client publishes must match (checked on their JSON form).
    pub json_schema: Option<JsonSchema>,
}

impl Route {
    /// Whether the route allows an operation.
    pub fn allows(&self, op: Operation) -> bool {
        match op {
            Operation::Subscribe => self.allow_subscribe,
            Operation::Publish => self.allow_publish,
        }
    }

    /// Checks a client payload against the route's JSON schema and encodes it for the broker.
    pub fn encode_publish(&self, payload: ClientPayload) -> Result<bytes::Bytes, PayloadError> {
        if let Some(schema) = &self.json_schema {
            let value = self.format.json_view(&payload)?;
            schema.check(&value).map_err(PayloadError)?;
        }
        self.format.to_broker(payload)
    }

    /// The client channel for a broker topic and key, if this route maps them to one.
    pub fn channel_for(&self, topic: &str, key: Option<&str>) -> Option<String> {
        let mut captures = Captures::default();
        if !self.topic.capture(topic, &mut captures) {
            return None;
        }
        if let Some(template) = &self.key
            && (!template.capture(key?, &mut captures) || !captures.is_consistent())
        {
            return None;
        }
        self.channel.render(&captures)
    }
}

/// A client channel or pattern resolved to a route.
#[derive(Debug)]
pub struct Resolved {
    pub route: Arc<Route>,
    pub topic: RenderedTopic,
    /// The rendered key, when the route has a key template and the pattern names one key.
    pub key: Option<String>,
    /// Channel placeholders with their values; `None` where the pattern has a wildcard.
    pub vars: Vec<(String, Option<String>)>,
}

/// Why a channel could not be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no route matches channel {0:?}")]
    NoRoute(String),
    /// A route matches only for other claim values than the connection's token carries.
    #[error("channel {0:?} is not allowed for this connection")]
    ClaimMismatch(String),
    #[error("channel {channel:?} cannot be mapped: {error}")]
    Render { channel: String, error: RenderError },
}

/// What routing needs to know of a backend to compile the routes that name it.
#[derive(Debug, Clone)]
pub struct BackendTarget {
    pub name: String,
    /// Its `type`, for messages.
    pub kind: &'static str,
    /// How it spells topics.
    pub syntax: TopicSyntax,
    /// Whether its messages have keys, so routes to it may have a `key` template.
    pub keys: bool,
}

/// The ordered list of compiled routes.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Arc<Route>>,
}

impl Router {
    /// Compiles route configs (each with its index in config order) against the backends they
    /// name, recording every problem under `routes[i].KEY`. Routes with problems are left out, so
    /// a router is only used when `problems` stayed empty.
    pub fn compile<'r>(
        routes: impl Iterator<Item = (usize, &'r RouteConfig)>,
        backends: &[BackendTarget],
        schemas: &Schemas,
        problems: &mut Vec<ConfigProblem>,
    ) -> Router {
        let mut compiled = Vec::new();
        for (index, config) in routes {
            let path = format!("routes[{index}]");
            if let Some(route) = compile(index, config, backends, schemas, &path, problems) {
                compiled.push(Arc::new(route));
            }
        }
        Router { routes: compiled }
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Finds the first route serving `pattern` and renders its topic (and key).
    pub fn resolve(
        &self,
        pattern: &ChannelPattern,
        claims: &dyn ClaimSource,
    ) -> Result<Resolved, RouteError> {
        let mut claim_mismatch = false;
        for route in &self.routes {
            let bindings = match route.channel.bind(pattern, claims) {
                Ok(b) => b,
                Err(BindError::NoMatch) => continue,
                Err(BindError::ClaimMismatch) => {
                    claim_mismatch = true;
                    continue;
                }
            };
            let render_error = |error| RouteError::Render {
                channel: pattern.to_string(),
                error,
            };
            let topic = route
                .topic
                .render(&bindings, claims)
                .map_err(render_error)?;
            let key = match &route.key {
                None => None,
                Some(template) => match template.render(&bindings, claims) {
                    Ok(k) if !k.is_filter && !k.widened => Some(k.text),
                    Ok(_) | Err(RenderError::WildcardUnsupported { .. }) => None,
                    Err(e) => return Err(render_error(e)),
                },
            };
            return Ok(Resolved {
                route: route.clone(),
                topic,
                key,
                vars: bindings.to_vars(),
            });
        }
        if claim_mismatch {
            Err(RouteError::ClaimMismatch(pattern.to_string()))
        } else {
            Err(RouteError::NoRoute(pattern.to_string()))
        }
    }
}

fn compile(
    index: usize,
    config: &RouteConfig,
    backends: &[BackendTarget],
    schemas: &Schemas,
    path: &str,
    problems: &mut Vec<ConfigProblem>,
) -> Option<Route> {
    let before = problems.len();
    let problem = |problems: &mut Vec<ConfigProblem>, key: &str, message: String| {
        problems.push(ConfigProblem::new(format!("{path}.{key}"), message));
    };

    let channel = ChannelTemplate::parse(&config.channel)
        .map_err(|e| {
            problem(
                problems,
                "channel",
                format!("{e} (in {:?})", config.channel),
            )
        })
        .ok();

    if config.allow.is_empty() {
        problem(
            problems,
            "allow",
            "is empty; list what clients may do, e.g. [\"subscribe\", \"publish\"]".into(),
        );
    }

    let Some((backend_index, backend)) = backends
        .iter()
        .enumerate()
        .find(|(_, b)| b.name == config.backend)
    else {
        let defined: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
        let defined = if defined.is_empty() {
            "none".to_string()
        } else {
            defined.join(", ")
        };
        problem(
            problems,
            "backend",
            format!("unknown backend {:?} (defined: {defined})", config.backend),
        );
        return None;
    };

    let topic = TopicTemplate::parse(&config.topic, backend.syntax)
        .map_err(|e| problem(problems, "topic", format!("{e} (in {:?})", config.topic)))
        .ok();
    let key = match &config.key {
        None => None,
        Some(_) if !backend.keys => {
            let message = format!("{} backends have no message keys", backend.kind);
            problem(problems, "key", message);
            None
        }
        Some(k) => TopicTemplate::parse(k, TopicSyntax::KEY)
            .map_err(|e| problem(problems, "key", format!("{e} (in {k:?})")))
            .ok(),
    };
    let format = match &config.format {
        None => Some(PayloadFormat::Json),
        Some(text) => PayloadFormat::parse(text, schemas)
            .map_err(|e| problem(problems, "format", e))
            .ok(),
    };
    let json_schema = match &config.json_schema {
        None => None,
        Some(file) => match JsonSchema::load(file) {
            Ok(schema) => Some(schema),
            Err(e) => {
                problem(problems, "json_schema", e);
                None
            }
        },
    };
    if json_schema.is_some() && !config.allow.contains(&Operation::Publish) {
        problem(
            problems,
            "json_schema",
            "is set but allow does not include publish; it only checks publishes".into(),
        );
    }

    let (channel, topic) = (channel?, topic?);
    for (key_name, message) in check_placeholders(&channel, &topic, key.as_ref()) {
        problem(problems, key_name, message);
    }
    if problems.len() != before {
        return None;
    }

    Some(Route {
        index,
        channel,
        topic,
        key,
        backend: backend_index,
        backend_name: config.backend.clone(),
        allow_subscribe: config.allow.contains(&Operation::Subscribe),
        allow_publish: config.allow.contains(&Operation::Publish),
        slow_consumer: config.slow_consumer,
        max_rate: config.max_rate,
        format: format?,
        json_schema,
    })
}

/// Placeholders must connect the templates: everything the topic or key uses comes from the
/// channel (or the token's claims), and every channel placeholder can be recovered from a broker
/// topic or key so messages map back to client channels.
fn check_placeholders(
    channel: &ChannelTemplate,
    topic: &TopicTemplate,
    key: Option<&TopicTemplate>,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let in_channel: Vec<&Placeholder> = channel.placeholders().collect();
    let targets = [("topic", Some(topic)), ("key", key)];
    for (name, template) in targets {
        let Some(template) = template else { continue };
        for p in template.placeholders() {
            if matches!(p, Placeholder::Var(_)) && !in_channel.contains(&p) {
                problems.push((
                    name,
                    format!("placeholder {p} is not bound in the channel template {channel}"),
                ));
            }
        }
    }
    for p in &in_channel {
        let used = topic.placeholders().any(|t| t == *p)
            || key.is_some_and(|k| k.placeholders().any(|t| t == *p));
        if !used {
            problems.push((
                "topic",
                format!(
                    "placeholder {p} of the channel appears in neither topic nor key, so messages could not be mapped back to a channel"
                ),
            ));
        }
    }
    match (channel.has_multi(), topic.has_multi()) {
        (true, false) => problems.push((
            "topic",
            match topic.syntax().multi_wildcard {
                Some(w) => format!("the channel ends in '#', so the topic must end in '{w}'"),
                None => format!(
                    "the channel ends in '#', but a {} has no multi-level wildcard",
                    topic.syntax().name
                ),
            },
        )),
        (false, true) => problems.push((
            "topic",
            "the topic ends in a multi-level wildcard, so the channel must end in '#'".into(),
        )),
        _ => {}
    }
    problems
}

/// A router over `[[routes]]` TOML for one memory backend named `local`, for unit tests here
/// and in the layers above.
#[cfg(test)]
pub(crate) fn test_router(routes: &str) -> Router {
    #[derive(serde::Deserialize)]
    struct File {
        routes: Vec<RouteConfig>,
    }
    let file: File = toml::from_str(routes).expect("routes TOML");
    let local = BackendTarget {
        name: "local".into(),
        kind: "memory",
        syntax: TopicSyntax::SLASH,
        keys: false,
    };
    let mut problems = Vec::new();
    let router = Router::compile(
        file.routes.iter().enumerate(),
        &[local],
        &Schemas::empty(),
        &mut problems,
    );
    assert_eq!(problems, vec![]);
    router
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &str) -> Router {
        test_router(routes)
    }

    fn resolve(router: &Router, pattern: &str) -> Result<(usize, String), RouteError> {
        let p = ChannelPattern::parse(pattern).unwrap();
        router
            .resolve(&p, &NoClaims)
            .map(|r| (r.route.index, r.topic.text))
    }

    #[test]
    fn first_matching_route_wins() {
        let r = router(
            r#"
            [[routes]]
            channel = "site/{site}/#"
            backend = "local"
            topic = "plant/{site}/#"
            allow = ["subscribe"]
            [[routes]]
            channel = "site/special"
            backend = "local"
            topic = "never"
            allow = ["subscribe"]
            [[routes]]
            channel = "other/{x}"
            backend = "local"
            topic = "o/{x}"
            allow = ["publish"]
            "#,
        );
        assert_eq!(resolve(&r, "site/a/b").unwrap(), (0, "plant/a/b".into()));
        assert_eq!(
            resolve(&r, "site/special").unwrap(),
            (0, "plant/special".into())
        );
        assert_eq!(resolve(&r, "other/1").unwrap(), (2, "o/1".into()));
        assert_eq!(
            resolve(&r, "nothing/here"),
            Err(RouteError::NoRoute("nothing/here".into()))
        );
        assert!(matches!(resolve(&r, "#"), Err(RouteError::NoRoute(_))));
    }

    #[test]
    fn maps_topics_back_to_channels() {
        let r = router(
            r#"
            [[routes]]
            channel = "site/{site}/#"
            backend = "local"
            topic = "plant/{site}/data/#"
            allow = ["subscribe"]
            "#,
        );
        let route = &r.routes()[0];
        assert_eq!(
            route.channel_for("plant/berlin/data/temp", None).as_deref(),
            Some("site/berlin/temp")
        );
        assert_eq!(route.channel_for("plant/berlin/other", None), None);
    }
}
