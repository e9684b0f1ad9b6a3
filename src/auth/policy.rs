//! The authorisation point: routes a channel and decides whether a principal may use it.
//!
//! A [`Policy`] holds each route's `subscribe_if` / `publish_if` rule, compiled from the route
//! configs next to the [`Router`] the rules refer to.

use crate::config::{ConfigProblem, Operation, RouteConfig};
use std::sync::Arc;

use crate::routing::{ChannelPattern, RenderError, Resolved, Route, RouteError, Router};

use super::Principal;
use super::rules::{Rule, RuleContext};

/// A refused subscribe or publish, with its client error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessError {
    pub code: &'static str,
    pub message: String,
}

/// A route a principal may use for at least one operation (`GET /routes`).
#[derive(Debug, Clone)]
pub struct UsableRoute {
    pub route: Arc<Route>,
    /// The widest pattern of the route for this principal: its channel template with each
    /// `{name}` as `+` and each `{claims.x}` as the principal's value.
    pub pattern: String,
    /// What the principal may do there, on at least some channels.
    pub operations: Vec<Operation>,
}

/// The rules of one route.
#[derive(Debug, Default)]
struct RouteRules {
    subscribe_if: Option<Rule>,
    publish_if: Option<Rule>,
}

/// Every route's access rules, by route index.
#[derive(Debug, Default)]
pub struct Policy {
    routes: Vec<RouteRules>,
}

impl Policy {
    /// Compiles the `subscribe_if` and `publish_if` keys of routes (each with its index in
    /// config order), recording problems under `routes[i].KEY`. Placeholders a rule reads are
    /// checked against the channel template of the route as `router` compiled it.
    pub fn compile<'r>(
        routes: impl Iterator<Item = (usize, &'r RouteConfig)>,
        router: &Router,
        problems: &mut Vec<ConfigProblem>,
    ) -> Policy {
        let mut compiled: Vec<RouteRules> = Vec::new();
        for (index, config) in routes {
            let path = format!("routes[{index}]");
            let mut rule = |key: &str, source: &Option<String>, op: Operation| -> Option<Rule> {
                let source = source.as_ref()?;
                if !config.allow.contains(&op) {
                    problems.push(ConfigProblem::new(
                        format!("{path}.{key}"),
                        format!("is set but allow does not include {op:?}").to_lowercase(),
                    ));
                }
                match Rule::parse(source) {
                    Ok(rule) => Some(rule),
                    Err(e) => {
                        problems.push(ConfigProblem::new(
                            format!("{path}.{key}"),
                            format!("{e} (in {source:?})"),
                        ));
                        None
                    }
                }
            };
            let rules = RouteRules {
                subscribe_if: rule("subscribe_if", &config.subscribe_if, Operation::Subscribe),
                publish_if: rule("publish_if", &config.publish_if, Operation::Publish),
            };
            if let Some(route) = router.routes().iter().find(|r| r.index == index) {
                let names: Vec<String> = route
                    .channel
                    .placeholders()
                    .map(|p| p.key().into_owned())
                    .collect();
                for (key, rule) in [
                    ("subscribe_if", &rules.subscribe_if),
                    ("publish_if", &rules.publish_if),
                ] {
                    for var in rule.iter().flat_map(|r| r.vars()) {
                        if !names.iter().any(|n| n == var) {
                            problems.push(ConfigProblem::new(
                                format!("{path}.{key}"),
                                format!(
                                    "{{{var}}} is not a placeholder of the channel template {}",
                                    route.channel
                                ),
                            ));
                        }
                    }
                }
            }
            if compiled.len() <= index {
                compiled.resize_with(index + 1, RouteRules::default);
            }
            compiled[index] = rules;
        }
        Policy { routes: compiled }
    }

    /// The routes on which `principal` may do at least one operation on some channel, in
    /// config order: the route allows it, the route's claim placeholders can be filled from the
    /// principal's claims, and the operation's rule is not false whatever the channel's
    /// placeholders hold.
    pub fn usable_routes(&self, router: &Router, principal: &Principal) -> Vec<UsableRoute> {
        let mut usable = Vec::new();
        for route in router.routes() {
            let Some(pattern) = route.channel.pattern_for(principal) else {
                continue;
            };
            let rules = self.routes.get(route.index);
            let open_vars: Vec<(String, Option<String>)> = route
                .channel
                .placeholders()
                .map(|p| (p.key().into_owned(), None))
                .collect();
            let input = RuleInput {
                vars: &open_vars,
                principal,
            };
            let operations: Vec<Operation> = [Operation::Subscribe, Operation::Publish]
                .into_iter()
                .filter(|op| route.allows(*op))
                .filter(|op| {
                    let rule = match op {
                        Operation::Subscribe => rules.and_then(|r| r.subscribe_if.as_ref()),
                        Operation::Publish => rules.and_then(|r| r.publish_if.as_ref()),
                    };
                    rule.is_none_or(|rule| rule.may_allow(&input))
                })
                .collect();
            if !operations.is_empty() {
                usable.push(UsableRoute {
                    route: route.clone(),
                    pattern,
                    operations,
                });
            }
        }
        usable
    }

    /// Routes `pattern` and decides whether `principal` may `op` it.
    pub fn authorize(
        &self,
        router: &Router,
        principal: &Principal,
        op: Operation,
        pattern: &ChannelPattern,
    ) -> Result<Resolved, AccessError> {
        let verb = match op {
            Operation::Subscribe => "subscribe",
            Operation::Publish => "publish",
        };
        let deny = |reason: String| {
            tracing::info!(
                subject = principal.display_name(),
                operation = verb,
                channel = %pattern,
                %reason,
                "access denied"
            );
            AccessError {
                code: "forbidden",
                message: format!("not allowed to {verb} {:?}", pattern.as_str()),
            }
        };
        let resolved = match router.resolve(pattern, principal) {
            Ok(r) => r,
            Err(RouteError::NoRoute(channel)) => {
                return Err(AccessError {
                    code: "no_route",
                    message: format!("no route matches channel {channel:?}"),
                });
            }
            Err(RouteError::ClaimMismatch(_)) => {
                return Err(deny("channel is bound to other claim values".into()));
            }
            Err(RouteError::Render {
                error: RenderError::MissingClaim(claim),
                ..
            }) => return Err(deny(format!("token lacks {claim}"))),
            Err(e @ RouteError::Render { .. }) => {
                let code = match &e {
                    RouteError::Render {
                        error: RenderError::WildcardUnsupported { .. },
                        ..
                    } => "unsupported_pattern",
                    _ => "invalid_channel",
                };
                return Err(AccessError {
                    code,
                    message: e.to_string(),
                });
            }
        };
        let route = &resolved.route;
        if !route.allows(op) {
            return Err(deny(format!("route {} does not allow {verb}", route.index)));
        }
        let rules = self.routes.get(route.index);
        let rule = match op {
            Operation::Subscribe => rules.and_then(|r| r.subscribe_if.as_ref()),
            Operation::Publish => rules.and_then(|r| r.publish_if.as_ref()),
        };
        if let Some(rule) = rule {
            let input = RuleInput {
                vars: &resolved.vars,
                principal,
            };
            if !rule.allows(&input) {
                return Err(deny(format!("rule `{rule}` does not hold")));
            }
        }
        Ok(resolved)
    }
}

struct RuleInput<'a> {
    vars: &'a [(String, Option<String>)],
    principal: &'a Principal,
}

impl RuleContext for RuleInput<'_> {
    fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn claim(&self, path: &str) -> Option<&serde_json::Value> {
        self.principal.claim_value(path)
    }
}
