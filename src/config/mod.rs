//! Configuration plumbing shared by every layer: problems with their key paths, section parsing
//! and `${VAR}` interpolation, and the `[[routes]]` entries several layers read.
//!
//! Nothing here imports the rest of the crate. Each component owns and validates its own section
//! (the listener `[server]`, `[auth]`, `[limits]`, each backend kind its `[backends.NAME]` table and
//! route options); [`crate::gateway::Config`] parses the file and hands each section to its owner.
//! Every problem names its key, e.g. `routes[2].backend: unknown backend "plnat"`.

mod env;
mod route;

use std::fmt;

use serde::de::DeserializeOwned;

pub use env::interpolate;
pub use route::{MaxRate, Operation, RouteConfig, SlowConsumerPolicy};

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
