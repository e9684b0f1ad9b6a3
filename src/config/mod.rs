//! Configuration: the TOML file, its defaults, `${VAR}` interpolation and validation.
//!
//! Loading is two passes. The first deserializes each section on its own (the server table, each
//! backend, each route), so one mistake does not hide the next: unknown keys and type errors are
//! collected with the path of the key. The second checks what only makes sense across sections:
//! routes naming backends, templates, placeholders and backend-specific route options. Every
//! problem found is returned together, each naming its key, e.g.
//! `routes[2].backend: unknown backend "plnat"`.

mod env;
mod route;
mod server;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::auth::AuthConfig;
use crate::backends::BackendConfig;
use crate::routing::Router;
use crate::server::limits::LimitsConfig;
use crate::transform::Schemas;

pub use route::{Operation, RouteConfig, SlowConsumerPolicy};
pub use server::ServerConfig;

/// The commented default configuration printed by `wsbridge print-config`; it is exactly what
/// `wsbridge run` uses without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.toml");

/// One thing wrong with a config file, at the path of the offending key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub path: String,
    pub message: String,
}

impl ConfigProblem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigProblem {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// Named backends, ordered by name.
    pub backends: BTreeMap<String, BackendConfig>,
    /// Routes, in the order they are tried.
    pub routes: Vec<RouteConfig>,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    /// `.proto` files and folders, as listed in `schemas`.
    pub schema_paths: Vec<std::path::PathBuf>,
    /// The message types compiled from them.
    pub schemas: Schemas,
}

const TOP_LEVEL_KEYS: &[&str] = &["server", "backends", "routes", "auth", "limits", "schemas"];

impl Config {
    /// The embedded default: one `memory` backend, every channel routed to it.
    pub fn embedded_default() -> Config {
        Config::from_toml_with_env(DEFAULT_CONFIG, &|_| None)
            .expect("the embedded default configuration is valid")
    }

    /// Reads and validates a config file, interpolating `${VAR}` from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![ConfigProblem::new(
                "",
                format!("cannot read {}: {e}", path.display()),
            )],
        })?;
        Config::from_toml(&text)
    }

    /// Parses and validates config text, interpolating `${VAR}` from the process environment.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(text, &|name| std::env::var(name).ok())
    }

    /// Parses and validates config text with a custom environment lookup.
    pub fn from_toml_with_env(
        text: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![ConfigProblem::new(
                "",
                format!("invalid TOML: {}", e.to_string().trim_end()),
            )],
        })?;
        let mut root = toml::Value::Table(table);
        env::interpolate(&mut root, "", lookup, &mut problems);
        let toml::Value::Table(mut table) = root else {
            unreachable!("interpolation keeps the root a table")
        };

        for key in table.keys() {
            if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
                problems.push(ConfigProblem::new(key.clone(), "unknown key"));
            }
        }

        let server = match table.remove("server") {
            Some(v) => deserialize_section::<ServerConfig>(v, "server", &mut problems),
            None => Some(ServerConfig::default()),
        };
        let auth = match table.remove("auth") {
            Some(v) => deserialize_section::<AuthConfig>(v, "auth", &mut problems),
            None => Some(AuthConfig::default()),
        };
        let schema_paths: Vec<std::path::PathBuf> = match table.remove("schemas") {
            Some(v) => deserialize_section(v, "schemas", &mut problems).unwrap_or_default(),
            None => Vec::new(),
        };
        let schemas = Schemas::load(&schema_paths, &mut problems);
        let limits = match table.remove("limits") {
            Some(v) => deserialize_section::<LimitsConfig>(v, "limits", &mut problems),
            None => Some(LimitsConfig::default()),
        };

        let mut backends = BTreeMap::new();
        match table.remove("backends") {
            None => problems.push(ConfigProblem::new(
                "backends",
                "missing: define at least one backend, e.g. [backends.local] type = \"memory\"",
            )),
            Some(toml::Value::Table(entries)) => {
                for (name, value) in entries {
                    let path = format!("backends.{name}");
                    if !valid_backend_name(&name) {
                        problems.push(ConfigProblem::new(
                            &path,
                            "backend names may contain only letters, digits, '_' and '-'",
                        ));
                    }
                    if let Some(backend) = BackendConfig::from_toml(value, &path, &mut problems) {
                        backends.insert(name, backend);
                    }
                }
            }
            Some(_) => problems.push(ConfigProblem::new(
                "backends",
                "must be a table of named backends",
            )),
        }

        let mut routes = Vec::new();
        let mut route_count = 0;
        match table.remove("routes") {
            None => problems.push(ConfigProblem::new(
                "routes",
                "missing: define at least one [[routes]] entry",
            )),
            Some(toml::Value::Array(entries)) => {
                if entries.is_empty() {
                    problems.push(ConfigProblem::new(
                        "routes",
                        "is empty: define at least one [[routes]] entry",
                    ));
                }
                route_count = entries.len();
                for (i, value) in entries.into_iter().enumerate() {
                    let path = format!("routes[{i}]");
                    if let Some(route) =
                        deserialize_section::<RouteConfig>(value, &path, &mut problems)
                    {
                        routes.push((i, route));
                    }
                }
            }
            Some(_) => problems.push(ConfigProblem::new(
                "routes",
                "must be an array of tables ([[routes]])",
            )),
        }

        if let Some(server) = &server {
            server.validate(&mut problems);
        }
        if let Some(limits) = &limits {
            limits.validate(&mut problems);
        }
        if let Some(auth) = &auth {
            let before = problems.len();
            auth.validate(&mut problems);
            // Load the key material now, so a missing or unreadable key is a config problem.
            if problems.len() == before
                && let Err(e) = crate::auth::Authenticator::new(auth)
            {
                let (path, message) = e.split_once(": ").unwrap_or(("auth", &e));
                problems.push(ConfigProblem::new(path, message));
            }
        }

        // Cross-section checks run on the routes that parsed, under their original index.
        Router::check(
            routes.iter().map(|(i, r)| (*i, r)),
            &backends,
            &schemas,
            &mut problems,
        );
        let all_routes_parsed = routes.len() == route_count;
        let routes: Vec<RouteConfig> = routes.into_iter().map(|(_, r)| r).collect();
        // A value that failed interpolation also fails later checks; report it once.
        let mut seen_interpolation = std::collections::HashSet::new();
        problems.retain(|p| {
            if p.message.starts_with("environment variable ")
                || p.message.starts_with("unclosed '${'")
            {
                seen_interpolation.insert(p.path.clone());
                true
            } else {
                !seen_interpolation.contains(&p.path)
            }
        });

        match (server, auth, limits) {
            (Some(server), Some(auth), Some(limits))
                if problems.is_empty() && all_routes_parsed =>
            {
                Ok(Config {
                    server,
                    backends,
                    routes,
                    auth,
                    limits,
                    schema_paths,
                    schemas,
                })
            }
            _ => Err(ConfigError { problems }),
        }
    }
}

fn valid_backend_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Deserializes one section, recording unknown keys and the first type error with their paths.
pub fn deserialize_section<T: DeserializeOwned>(
    value: toml::Value,
    path: &str,
    problems: &mut Vec<ConfigProblem>,
) -> Option<T> {
    let original = value.clone();
    let mut unknown = Vec::new();
    let mut record = |p: serde_ignored::Path<'_>| unknown.push(p.to_string());
    let result: Result<T, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut record));
    for key in unknown {
        problems.push(ConfigProblem::new(join_path(path, &key), "unknown key"));
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let offending = value_at(&original, e.path());
            let at = e.path().to_string();
            let at = if at == "." { String::new() } else { at };
            let message = e.into_inner().to_string();
            // toml appends "in `key`" lines; the path already says where.
            let mut message = message.lines().next().unwrap_or_default().to_owned();
            if let Some(v) = offending.filter(|v| !v.is_table() && !v.is_array()) {
                let shown = v.to_string();
                if !message.contains(&shown) {
                    message = format!("{message} (got {shown})");
                }
            }
            problems.push(ConfigProblem::new(join_path(path, &at), message));
            None
        }
    }
}

fn value_at<'v>(
    root: &'v toml::Value,
    path: &serde_path_to_error::Path,
) -> Option<&'v toml::Value> {
    use serde_path_to_error::Segment;
    let mut value = root;
    for segment in path.iter() {
        value = match segment {
            Segment::Seq { index } => value.get(*index)?,
            Segment::Map { key } => value.get(key.as_str())?,
            Segment::Enum { .. } | Segment::Unknown => return None,
        };
    }
    Some(value)
}

fn join_path(base: &str, rest: &str) -> String {
    match (base.is_empty(), rest.is_empty()) {
        (_, true) => base.to_owned(),
        (true, false) => rest.to_owned(),
        (false, false) if rest.starts_with('[') => format!("{base}{rest}"),
        (false, false) => format!("{base}.{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match Config::from_toml_with_env(text, &|_| None) {
            Ok(_) => vec![],
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    const BASE: &str = r##"
        [backends.local]
        type = "memory"
        [[routes]]
        channel = "#"
        backend = "local"
        topic = "#"
        allow = ["subscribe", "publish"]
    "##;

    #[test]
    fn default_config_is_valid_and_documented() {
        let config = Config::embedded_default();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.routes.len(), 1);
        assert!(config.backends.contains_key("local"));
        assert!(
            DEFAULT_CONFIG
                .lines()
                .filter(|l| l.trim_start().starts_with('#'))
                .count()
                > 10
        );
    }

    #[test]
    fn minimal_config_is_valid() {
        assert_eq!(problems(BASE), Vec::<String>::new());
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let text = r#"
            colour = "blue"
            [server]
            listen = "nowhere"
            [backends.local]
            type = "memory"
            flavour = 1
            [backends.other]
            type = "plasma"
            [[routes]]
            channel = "a/#"
            backend = "local"
            topic = "a/#"
            allow = ["subscribe"]
            [[routes]]
            channel = "b/{x}/#/c"
            backend = "local"
            topic = "b/{y}"
            allow = ["subscribe"]
            [[routes]]
            channel = "c/{site}"
            backend = "plnat"
            topic = "c/{site}"
            allow = ["subscribe", "dance"]
            [[routes]]
            channel = "d/{site}"
            backend = "local"
            topic = "d/{other}"
            allow = ["publish"]
            speed = 3
        "#;
        let p = problems(text);
        let has = |needle: &str| p.iter().any(|l| l.contains(needle));
        assert!(has("colour: unknown key"), "{p:#?}");
        assert!(has("server.listen: "), "{p:#?}");
        assert!(has("backends.local.flavour: unknown key"), "{p:#?}");
        assert!(
            has("backends.other.type: unknown backend type \"plasma\""),
            "{p:#?}"
        );
        assert!(
            has("routes[1].channel: '#' must be the last level"),
            "{p:#?}"
        );
        assert!(has("routes[2].allow[1]: unknown variant `dance`"), "{p:#?}");
        assert!(
            has("routes[3].topic: placeholder {other} is not bound"),
            "{p:#?}"
        );
        assert!(
            has("server.listen: invalid socket address syntax (got \"nowhere\")"),
            "{p:#?}"
        );
        assert!(has("routes[3].speed: unknown key"), "{p:#?}");
    }

    #[test]
    fn rejects_unknown_backend_and_unmapped_placeholders() {
        let text = r#"
            [backends.local]
            type = "memory"
            [[routes]]
            channel = "a"
            backend = "local"
            topic = "a"
            allow = ["subscribe"]
            [[routes]]
            channel = "c/{site}"
            backend = "plnat"
            topic = "c/{site}"
            allow = ["subscribe"]
            [[routes]]
            channel = "e/{site}/{id}"
            backend = "local"
            topic = "e/{site}"
            allow = ["subscribe"]
            [[routes]]
            channel = "f/#"
            backend = "local"
            topic = "f"
            allow = []
        "#;
        let p = problems(text);
        assert!(
            p.contains(
                &"routes[1].backend: unknown backend \"plnat\" (defined: local)".to_string()
            ),
            "{p:#?}"
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("routes[2].topic: placeholder {id} of the channel")),
            "{p:#?}"
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("routes[3].topic: the channel ends in '#'")),
            "{p:#?}"
        );
        assert!(
            p.iter().any(|l| l.starts_with("routes[3].allow: is empty")),
            "{p:#?}"
        );
    }

    #[test]
    fn duplicate_backend_names_are_a_toml_error() {
        let text = "[backends.a]\ntype = \"memory\"\n[backends.a]\ntype = \"memory\"\n";
        let p = problems(text);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("invalid TOML") && p[0].contains("duplicate"),
            "{p:?}"
        );
    }

    #[test]
    fn interpolates_environment_variables() {
        let text = BASE.replace("\"local\"\n        topic", "\"${BACKEND}\"\n        topic");
        let config =
            Config::from_toml_with_env(&text, &|n| (n == "BACKEND").then(|| "local".into()))
                .unwrap();
        assert_eq!(config.routes[0].backend, "local");
        let p = problems(&text);
        assert_eq!(
            p,
            vec!["routes[0].backend: environment variable BACKEND is not set"]
        );
    }
}
