//! Routing: which backend and topic serve a client channel, and how topics map back.
//!
//! Routes are compiled once from the config. A client channel or pattern is matched against them
//! in order; the first route whose channel template covers it decides backend, topic and
//! permissions. The reverse direction ([`Route::channel_for`]) turns a broker topic (and key) into
//! the client channel a subscriber sees.

mod pattern;
mod template;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use pattern::{ChannelError, ChannelPattern, MAX_CHANNEL_LEN, MAX_LEVELS, PatternLevel};
pub use template::{
    BindError, Bindings, Captures, ChannelTemplate, ClaimSource, NoClaims, Placeholder,
    RenderError, RenderedTopic, TopicSyntax, TopicTemplate,
};

use crate::auth::rules::Rule;
use crate::backends::BackendConfig;
use crate::config::{ConfigProblem, Operation, RouteConfig, SlowConsumerPolicy};
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
    pub format: PayloadFormat,
    /// Schema client publishes must match (checked on their JSON form).
    pub json_schema: Option<JsonSchema>,
    /// Extra condition for subscribing (see [`crate::auth::rules`]).
    pub subscribe_if: Option<Rule>,
    /// Extra condition for publishing.
    pub publish_if: Option<Rule>,
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

/// The ordered list of compiled routes.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Arc<Route>>,
}

impl Router {
    /// Compiles validated route configs; `backends` lists backend names in gateway order.
    pub fn build(
        routes: &[RouteConfig],
        backends: &BTreeMap<String, BackendConfig>,
        schemas: &Schemas,
    ) -> Result<Router, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let compiled = compile_all(routes.iter().enumerate(), backends, schemas, &mut problems);
        if problems.is_empty() {
            Ok(Router { routes: compiled })
        } else {
            Err(problems)
        }
    }

    /// Validates route configs against the backends, recording every problem.
    pub fn check<'r>(
        routes: impl Iterator<Item = (usize, &'r RouteConfig)>,
        backends: &BTreeMap<String, BackendConfig>,
        schemas: &Schemas,
        problems: &mut Vec<ConfigProblem>,
    ) {
        compile_all(routes, backends, schemas, problems);
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

fn compile_all<'r>(
    routes: impl Iterator<Item = (usize, &'r RouteConfig)>,
    backends: &BTreeMap<String, BackendConfig>,
    schemas: &Schemas,
    problems: &mut Vec<ConfigProblem>,
) -> Vec<Arc<Route>> {
    let mut compiled = Vec::new();
    for (index, config) in routes {
        let path = format!("routes[{index}]");
        if let Some(route) = compile(index, config, backends, schemas, &path, problems) {
            compiled.push(Arc::new(route));
        }
    }
    compiled
}

fn compile(
    index: usize,
    config: &RouteConfig,
    backends: &BTreeMap<String, BackendConfig>,
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

    let Some((backend_index, (_, backend))) = backends
        .iter()
        .enumerate()
        .find(|(_, (name, _))| **name == config.backend)
    else {
        let defined: Vec<&str> = backends.keys().map(String::as_str).collect();
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

    let topic = TopicTemplate::parse(&config.topic, backend.topic_syntax())
        .map_err(|e| problem(problems, "topic", format!("{e} (in {:?})", config.topic)))
        .ok();
    let key = match &config.key {
        None => None,
        Some(_) if !backend.supports_keys() => {
            let message = format!("{} backends have no message keys", backend.type_name());
            problem(problems, "key", message);
            None
        }
        Some(k) => TopicTemplate::parse(k, TopicSyntax::KEY)
            .map_err(|e| problem(problems, "key", format!("{e} (in {k:?})")))
            .ok(),
    };
    backend.check_route(config, path, problems);
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

    let mut rule = |key: &str, source: &Option<String>, op: Operation| -> Option<Rule> {
        let source = source.as_ref()?;
        if !config.allow.contains(&op) {
            problem(
                problems,
                key,
                format!("is set but allow does not include {op:?}").to_lowercase(),
            );
        }
        match Rule::parse(source) {
            Ok(rule) => Some(rule),
            Err(e) => {
                problem(problems, key, format!("{e} (in {source:?})"));
                None
            }
        }
    };
    let subscribe_if = rule("subscribe_if", &config.subscribe_if, Operation::Subscribe);
    let publish_if = rule("publish_if", &config.publish_if, Operation::Publish);

    let (channel, topic) = (channel?, topic?);
    for (key_name, message) in check_placeholders(&channel, &topic, key.as_ref()) {
        problem(problems, key_name, message);
    }
    let names: Vec<String> = channel
        .placeholders()
        .map(|p| p.key().into_owned())
        .collect();
    for (key_name, rule) in [("subscribe_if", &subscribe_if), ("publish_if", &publish_if)] {
        for var in rule.iter().flat_map(|r| r.vars()) {
            if !names.iter().any(|n| n == var) {
                problem(
                    problems,
                    key_name,
                    format!("{{{var}}} is not a placeholder of the channel template {channel}"),
                );
            }
        }
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
        format: format?,
        json_schema,
        subscribe_if,
        publish_if,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router(routes: &str) -> Router {
        let text = format!("[backends.local]\ntype = \"memory\"\n{routes}");
        let config = Config::from_toml_with_env(&text, &|_| None).unwrap();
        Router::build(&config.routes, &config.backends, &config.schemas).unwrap()
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
