//! The configuration file as a whole: its sections, each handed to the component that owns it,
//! and the checks that span sections.
//!
//! Loading is two passes. The first deserializes each section on its own (the server table,
//! `[auth]`, `[limits]`, each backend, each route), so one mistake does not hide the next: unknown
//! keys and type errors are collected with the path of the key, and each owner validates its
//! values. The second compiles what spans sections: routes against the backends they name
//! (templates, placeholders, payload formats), each backend's route options, and the routes'
//! access rules. The compiled router, policy and authenticator are kept, so starting the gateway
//! builds nothing twice. Every problem found is returned together, each naming its key, e.g.
//! `routes[2].backend: unknown backend "plnat"`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::auth::{AuthConfig, Authenticator, Policy};
use crate::backends::BackendConfig;
use crate::config::{ConfigError, ConfigProblem, RouteConfig, deserialize_section, interpolate};
use crate::edge::ws_proxy::ProxyConfig;
use crate::limits::LimitsConfig;
use crate::routing::{BackendTarget, Router};
use crate::server::ServerConfig;
use crate::server::admin::AdminConfig;
use crate::telemetry::TelemetryConfig;
use crate::transform::Schemas;

/// The commented default configuration printed by `wsbridge print-config`; it is exactly what
/// `wsbridge run` uses without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.toml");

const TOP_LEVEL_KEYS: &[&str] = &[
    "server",
    "admin",
    "backends",
    "routes",
    "auth",
    "limits",
    "schemas",
    "telemetry",
    "proxies",
];

/// A validated configuration.
///
/// `server` and `limits` may be adjusted before the gateway starts (the command line and the
/// benchmark do); everything else was compiled while validating and is read-only.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// The `[admin]` table: the admin API's listener and token.
    pub admin: AdminConfig,
    pub limits: LimitsConfig,
    /// The `[telemetry]` table: OpenTelemetry traces, off without `otlp_endpoint`.
    pub telemetry: TelemetryConfig,
    auth: AuthConfig,
    /// Named backends, ordered by name.
    backends: BTreeMap<String, BackendConfig>,
    /// Routes, in the order they are tried.
    routes: Vec<RouteConfig>,
    /// `.proto` files and folders, as listed in `schemas`.
    schema_paths: Vec<PathBuf>,
    /// The `[[proxies]]` entries: public paths relayed to upstream WebSocket services.
    proxies: Vec<ProxyConfig>,
    compiled: Compiled,
}

/// What validation compiled, and the gateway runs.
#[derive(Clone)]
pub(crate) struct Compiled {
    pub router: Arc<Router>,
    pub policy: Arc<Policy>,
    pub authenticator: Arc<Authenticator>,
}

impl fmt::Debug for Compiled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compiled")
            .field("routes", &self.router.routes().len())
            .finish_non_exhaustive()
    }
}

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
        interpolate(&mut root, "", lookup, &mut problems);
        let toml::Value::Table(mut table) = root else {
            unreachable!("interpolation keeps the root a table")
        };
        for key in table.keys() {
            if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
                problems.push(ConfigProblem::new(key.clone(), "unknown key"));
            }
        }

        // First pass: each section on its own, validated by its owner.
        let server = section::<ServerConfig>(table.remove("server"), "server", &mut problems)
            .inspect(|s| s.validate(&mut problems));
        let admin = section::<AdminConfig>(table.remove("admin"), "admin", &mut problems)
            .inspect(|a| a.validate(&mut problems));
        let auth = section::<AuthConfig>(table.remove("auth"), "auth", &mut problems);
        let authenticator = auth
            .as_ref()
            .and_then(|a| Authenticator::from_config(a, &mut problems));
        let limits = section::<LimitsConfig>(table.remove("limits"), "limits", &mut problems)
            .inspect(|l| l.validate(&mut problems));
        let schema_paths: Vec<PathBuf> =
            section(table.remove("schemas"), "schemas", &mut problems).unwrap_or_default();
        let schemas = Schemas::load(&schema_paths, &mut problems);
        // A malformed table leaves a problem, so the default taken here is never used.
        let telemetry =
            section::<TelemetryConfig>(table.remove("telemetry"), "telemetry", &mut problems)
                .inspect(|t| t.validate(&mut problems))
                .unwrap_or_default();
        let backends = parse_backends(table.remove("backends"), &mut problems);
        let (routes, all_routes_parsed) = parse_routes(table.remove("routes"), &mut problems);
        let proxies = parse_proxies(table.remove("proxies"), &mut problems);

        // Second pass: what spans sections, on the routes that parsed, under their index.
        let targets: Vec<BackendTarget> = backends
            .iter()
            .map(|(name, backend)| BackendTarget {
                name: name.clone(),
                kind: backend.kind(),
                syntax: backend.topic_syntax(),
                keys: backend.capabilities().keys,
            })
            .collect();
        let indexed = || routes.iter().map(|(i, r)| (*i, r));
        let router = Router::compile(indexed(), &targets, &schemas, &mut problems);
        for (index, route) in indexed() {
            if let Some(backend) = backends.get(&route.backend) {
                backend.check_route(route, &format!("routes[{index}]"), &mut problems);
            }
        }
        let policy = Policy::compile(indexed(), &router, &mut problems);
        report_interpolation_once(&mut problems);

        match (server, admin, auth, authenticator, limits) {
            (Some(server), Some(admin), Some(auth), Some(authenticator), Some(limits))
                if problems.is_empty() && all_routes_parsed =>
            {
                Ok(Config {
                    server,
                    admin,
                    limits,
                    telemetry,
                    auth,
                    backends,
                    routes: routes.into_iter().map(|(_, r)| r).collect(),
                    schema_paths,
                    proxies,
                    compiled: Compiled {
                        router: Arc::new(router),
                        policy: Arc::new(policy),
                        authenticator: Arc::new(authenticator),
                    },
                })
            }
            _ => Err(ConfigError { problems }),
        }
    }

    /// The `[auth]` table.
    pub fn auth(&self) -> &AuthConfig {
        &self.auth
    }

    /// Named backends, ordered by name.
    pub fn backends(&self) -> &BTreeMap<String, BackendConfig> {
        &self.backends
    }

    /// Routes, in the order they are tried.
    pub fn routes(&self) -> &[RouteConfig] {
        &self.routes
    }

    /// `.proto` files and folders, as listed in `schemas`.
    pub fn schema_paths(&self) -> &[PathBuf] {
        &self.schema_paths
    }

    /// The `[[proxies]]` entries, in file order.
    pub fn proxies(&self) -> &[ProxyConfig] {
        &self.proxies
    }

    pub(crate) fn compiled(&self) -> &Compiled {
        &self.compiled
    }
}

/// An optional section: its defaults when absent.
fn section<T: DeserializeOwned + Default>(
    value: Option<toml::Value>,
    path: &str,
    problems: &mut Vec<ConfigProblem>,
) -> Option<T> {
    match value {
        Some(v) => deserialize_section(v, path, problems),
        None => Some(T::default()),
    }
}

fn parse_backends(
    value: Option<toml::Value>,
    problems: &mut Vec<ConfigProblem>,
) -> BTreeMap<String, BackendConfig> {
    let mut backends = BTreeMap::new();
    match value {
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
                if let Some(backend) = BackendConfig::parse(value, &path, problems) {
                    backends.insert(name, backend);
                }
            }
        }
        Some(_) => problems.push(ConfigProblem::new(
            "backends",
            "must be a table of named backends",
        )),
    }
    backends
}

/// The routes that deserialized, with their index, and whether all of them did.
fn parse_routes(
    value: Option<toml::Value>,
    problems: &mut Vec<ConfigProblem>,
) -> (Vec<(usize, RouteConfig)>, bool) {
    let entries = match value {
        None => {
            problems.push(ConfigProblem::new(
                "routes",
                "missing: define at least one [[routes]] entry",
            ));
            return (Vec::new(), true);
        }
        Some(toml::Value::Array(entries)) => entries,
        Some(_) => {
            problems.push(ConfigProblem::new(
                "routes",
                "must be an array of tables ([[routes]])",
            ));
            return (Vec::new(), true);
        }
    };
    if entries.is_empty() {
        problems.push(ConfigProblem::new(
            "routes",
            "is empty: define at least one [[routes]] entry",
        ));
    }
    let count = entries.len();
    let routes: Vec<(usize, RouteConfig)> = entries
        .into_iter()
        .enumerate()
        .filter_map(|(i, value)| {
            deserialize_section::<RouteConfig>(value, &format!("routes[{i}]"), problems)
                .map(|r| (i, r))
        })
        .collect();
    let all = routes.len() == count;
    (routes, all)
}

/// The `[[proxies]]` entries (none when absent), each validated under `proxies[i]`.
fn parse_proxies(
    value: Option<toml::Value>,
    problems: &mut Vec<ConfigProblem>,
) -> Vec<ProxyConfig> {
    let entries = match value {
        None => return Vec::new(),
        Some(toml::Value::Array(entries)) => entries,
        Some(_) => {
            problems.push(ConfigProblem::new(
                "proxies",
                "must be an array of tables ([[proxies]])",
            ));
            return Vec::new();
        }
    };
    let mut proxies: Vec<ProxyConfig> = Vec::with_capacity(entries.len());
    for (i, value) in entries.into_iter().enumerate() {
        let at = format!("proxies[{i}]");
        if let Some(proxy) = deserialize_section::<ProxyConfig>(value, &at, problems) {
            let others: Vec<&str> = proxies.iter().map(|p| p.path.as_str()).collect();
            proxy.validate(&at, &others, problems);
            proxies.push(proxy);
        }
    }
    proxies
}

/// A value that failed interpolation also fails later checks; report it once.
fn report_interpolation_once(problems: &mut Vec<ConfigProblem>) {
    let mut seen = HashSet::new();
    problems.retain(|p| {
        if p.message.starts_with("environment variable ") || p.message.starts_with("unclosed '${'")
        {
            seen.insert(p.path.clone());
            true
        } else {
            !seen.contains(&p.path)
        }
    });
}

fn valid_backend_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
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
        assert_eq!(config.routes().len(), 1);
        assert!(config.backends().contains_key("local"));
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
    fn proxies_are_parsed_and_checked_with_their_index() {
        let ok = format!(
            "{BASE}\n[[proxies]]\npath = \"/chat\"\nupstreams = [\"ws://127.0.0.1:9101/chat\"]"
        );
        let config = Config::from_toml_with_env(&ok, &|_| None).unwrap();
        assert_eq!(config.proxies()[0].path, "/chat");
        let bad = format!(
            "{ok}\n[[proxies]]\npath = \"/chat\"\nupstreams = [\"ws://a:1/\", \"tcp://b\"]"
        );
        let p = problems(&bad);
        assert!(
            p.iter().any(|l| l.starts_with("proxies[1].path: ")),
            "{p:#?}"
        );
        assert!(
            p.iter().any(|l| l.starts_with("proxies[1].upstreams[1]: ")),
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
        assert_eq!(config.routes()[0].backend, "local");
        let p = problems(&text);
        assert_eq!(
            p,
            vec!["routes[0].backend: environment variable BACKEND is not set"]
        );
    }
}
