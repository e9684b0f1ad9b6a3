//! Route templates: how a client channel maps to a backend topic (and key) and back.
//!
//! A route's `channel` template names levels (`site/{site}/#`); its `topic` template reuses the
//! names in the backend's own syntax (`plant.{site}.#` for AMQP). Going forward, a client pattern is
//! *bound* against the channel template and the bindings are *rendered* into the topic; going
//! back, a broker topic is *captured* against the topic template and the captures rendered into a
//! client channel. Values substituted into a topic are checked against the backend's syntax, so a
//! channel level can never inject a separator or a wildcard into a topic.

use std::borrow::Cow;
use std::fmt;

use super::pattern::{ChannelPattern, PatternLevel};

/// How a backend spells topics: its level separator, wildcards and which characters a substituted
/// value may contain.
#[derive(Clone, Copy)]
pub struct TopicSyntax {
    /// What the topic is called in messages, e.g. "MQTT topic".
    pub name: &'static str,
    /// Level separator; `None` means the topic is a single opaque name.
    pub separator: Option<char>,
    pub single_wildcard: Option<&'static str>,
    pub multi_wildcard: Option<&'static str>,
    /// Longest topic in bytes.
    pub max_len: usize,
    /// Whether a character may appear in a value substituted into a topic.
    pub value_char: fn(char) -> bool,
}

impl fmt::Debug for TopicSyntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl TopicSyntax {
    /// `/`-separated levels with `+` and `#`: MQTT and the in-memory broker.
    pub const SLASH: TopicSyntax = TopicSyntax {
        name: "topic",
        separator: Some('/'),
        single_wildcard: Some("+"),
        multi_wildcard: Some("#"),
        max_len: 65_535,
        value_char: |c| !matches!(c, '/' | '+' | '#') && !c.is_control(),
    };

    /// Syntax of message keys: one opaque level, no wildcards.
    pub const KEY: TopicSyntax = TopicSyntax {
        name: "key",
        separator: None,
        single_wildcard: None,
        multi_wildcard: None,
        max_len: 65_535,
        value_char: |c| !c.is_control(),
    };

    fn is_wildcard(&self, s: &str) -> bool {
        Some(s) == self.single_wildcard || Some(s) == self.multi_wildcard
    }

    fn split<'t>(&self, topic: &'t str) -> Vec<&'t str> {
        match self.separator {
            Some(sep) => topic.split(sep).collect(),
            None => vec![topic],
        }
    }
}

/// Supplies claim values for `{claims.NAME}` placeholders (the connection's principal).
pub trait ClaimSource {
    /// The claim at a dotted path, as a string, if present and a scalar.
    fn claim(&self, path: &str) -> Option<Cow<'_, str>>;
}

/// A principal without claims.
pub struct NoClaims;

impl ClaimSource for NoClaims {
    fn claim(&self, _path: &str) -> Option<Cow<'_, str>> {
        None
    }
}

/// A `{...}` placeholder: a variable bound from the channel, or a claim of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    Var(String),
    /// `{claims.a.b}`, stored as the path after `claims.`.
    Claim(String),
}

impl Placeholder {
    fn parse(inner: &str) -> Result<Self, String> {
        let valid_ident = |s: &str| {
            let mut chars = s.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        if let Some(path) = inner.strip_prefix("claims.") {
            if !path.is_empty() && path.split('.').all(valid_ident) {
                return Ok(Placeholder::Claim(path.to_owned()));
            }
        } else if valid_ident(inner) {
            return Ok(Placeholder::Var(inner.to_owned()));
        }
        Err(format!(
            "invalid placeholder {{{inner}}}: use {{name}} or {{claims.name}} with letters, digits and '_'"
        ))
    }

    /// The name used to carry the value from one template to the other.
    pub fn key(&self) -> Cow<'_, str> {
        match self {
            Placeholder::Var(v) => Cow::Borrowed(v),
            Placeholder::Claim(c) => Cow::Owned(format!("claims.{c}")),
        }
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}", self.key())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ChannelLevel {
    Literal(String),
    Placeholder(Placeholder),
    Multi,
}

/// The `channel` template of a route: literal levels, whole-level placeholders and a final `#`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelTemplate {
    raw: String,
    levels: Vec<ChannelLevel>,
}

/// A value bound to a placeholder by a client pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound<'a> {
    Exact(Cow<'a, str>),
    /// The pattern has a wildcard at this level.
    Any,
}

/// The result of matching a client pattern against a channel template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bindings<'a> {
    values: Vec<(Cow<'a, str>, Bound<'a>)>,
    /// The pattern levels matched by the template's trailing `#`.
    tail: &'a [PatternLevel],
}

impl<'a> Bindings<'a> {
    fn get(&self, key: &str) -> Option<&Bound<'a>> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Every bound placeholder with its value; `None` where the pattern has a wildcard.
    pub fn to_vars(&self) -> Vec<(String, Option<String>)> {
        self.values
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Bound::Exact(s) => Some(s.to_string()),
                    Bound::Any => None,
                };
                (k.to_string(), value)
            })
            .collect()
    }
}

/// Why a pattern does not bind to a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindError {
    /// The template does not match (or the pattern reaches beyond it).
    NoMatch,
    /// The template matches only with other claim values than the connection has.
    ClaimMismatch,
}

impl ChannelTemplate {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("is empty".into());
        }
        let parts: Vec<&str> = raw.split('/').collect();
        let last = parts.len() - 1;
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "" => return Err(format!("empty level at position {i}")),
                "#" if i == last => ChannelLevel::Multi,
                "#" => return Err("'#' must be the last level".into()),
                "+" => {
                    return Err(
                        "'+' is not allowed in a channel template; name the level, e.g. {id}"
                            .into(),
                    );
                }
                p if p.starts_with('{') && p.ends_with('}') => {
                    ChannelLevel::Placeholder(Placeholder::parse(&p[1..p.len() - 1])?)
                }
                p if p.contains(['{', '}']) => {
                    return Err(format!(
                        "level {p:?}: a placeholder must be a whole channel level"
                    ));
                }
                p if p.contains(['+', '#']) || p.chars().any(char::is_control) => {
                    return Err(format!(
                        "level {p:?} contains a wildcard or control character"
                    ));
                }
                p => ChannelLevel::Literal(p.to_owned()),
            };
            levels.push(level);
        }
        let mut seen = Vec::new();
        for level in &levels {
            if let ChannelLevel::Placeholder(p) = level {
                if seen.contains(&p) {
                    return Err(format!("placeholder {p} appears twice"));
                }
                seen.push(p);
            }
        }
        Ok(ChannelTemplate {
            raw: raw.to_owned(),
            levels,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn has_multi(&self) -> bool {
        self.levels.last() == Some(&ChannelLevel::Multi)
    }

    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.levels.iter().filter_map(|l| match l {
            ChannelLevel::Placeholder(p) => Some(p),
            _ => None,
        })
    }

    /// The widest client pattern this template serves for a connection: each `{name}` as `+`,
    /// each `{claims.x}` as the connection's claim value, and the final `#` kept. `None` when a
    /// claim it binds is missing or could not be a channel level.
    pub fn pattern_for(&self, claims: &dyn ClaimSource) -> Option<String> {
        let mut levels: Vec<Cow<'_, str>> = Vec::with_capacity(self.levels.len());
        for level in &self.levels {
            levels.push(match level {
                ChannelLevel::Literal(l) => Cow::Borrowed(l.as_str()),
                ChannelLevel::Placeholder(Placeholder::Var(_)) => Cow::Borrowed("+"),
                ChannelLevel::Placeholder(Placeholder::Claim(path)) => {
                    let value = claims.claim(path)?;
                    let valid = !value.is_empty()
                        && !value.contains(['/', '+', '#'])
                        && !value.chars().any(char::is_control);
                    if !valid {
                        return None;
                    }
                    Cow::Owned(value.into_owned())
                }
                ChannelLevel::Multi => Cow::Borrowed("#"),
            });
        }
        Some(levels.join("/"))
    }

    /// Matches a client pattern against this template. Succeeds only when every channel the
    /// pattern can match is served by this template (a `#` in the pattern may stand for
    /// placeholders followed by the template's own `#`).
    pub fn bind<'a>(
        &'a self,
        pattern: &'a ChannelPattern,
        claims: &'a dyn ClaimSource,
    ) -> Result<Bindings<'a>, BindError> {
        let theirs = pattern.levels();
        let mut values = Vec::new();
        let mut claim_mismatch = false;
        for (i, level) in self.levels.iter().enumerate() {
            let their = theirs.get(i);
            match (level, their) {
                (ChannelLevel::Multi, _) => {
                    let tail = theirs.get(i..).unwrap_or(&[]);
                    if claim_mismatch {
                        return Err(BindError::ClaimMismatch);
                    }
                    return Ok(Bindings { values, tail });
                }
                (_, None) => {
                    // The pattern is shorter: only a template ending in `#` right here matches.
                    return Err(BindError::NoMatch);
                }
                (ChannelLevel::Literal(l), Some(PatternLevel::Literal(t))) if l == t => {}
                (ChannelLevel::Literal(_), _) => return Err(BindError::NoMatch),
                (ChannelLevel::Placeholder(Placeholder::Claim(path)), Some(their)) => {
                    match their {
                        PatternLevel::Literal(t) => match claims.claim(path) {
                            Some(c) if *t == *c => {
                                values.push((Cow::Owned(format!("claims.{path}")), Bound::Exact(c)))
                            }
                            _ => claim_mismatch = true,
                        },
                        // A wildcard over a claim level would reach other principals' channels.
                        _ => return Err(BindError::ClaimMismatch),
                    }
                }
                (ChannelLevel::Placeholder(Placeholder::Var(name)), Some(their)) => match their {
                    PatternLevel::Literal(t) => {
                        values.push((Cow::Borrowed(name.as_str()), Bound::Exact(Cow::Borrowed(t))))
                    }
                    PatternLevel::Single => values.push((Cow::Borrowed(name.as_str()), Bound::Any)),
                    PatternLevel::Multi => {
                        // `#` in the pattern covers the rest of the template only when the rest is
                        // placeholders followed by `#`.
                        let rest = &self.levels[i..];
                        let (last, middle) = rest.split_last().expect("rest holds this level");
                        if *last != ChannelLevel::Multi {
                            return Err(BindError::NoMatch);
                        }
                        for level in middle {
                            match level {
                                ChannelLevel::Placeholder(Placeholder::Var(n)) => {
                                    values.push((Cow::Borrowed(n.as_str()), Bound::Any))
                                }
                                ChannelLevel::Placeholder(Placeholder::Claim(_)) => {
                                    return Err(BindError::ClaimMismatch);
                                }
                                _ => return Err(BindError::NoMatch),
                            }
                        }
                        if claim_mismatch {
                            return Err(BindError::ClaimMismatch);
                        }
                        return Ok(Bindings {
                            values,
                            tail: &theirs[i..],
                        });
                    }
                },
            }
        }
        if theirs.len() > self.levels.len() {
            return Err(BindError::NoMatch);
        }
        if claim_mismatch {
            return Err(BindError::ClaimMismatch);
        }
        Ok(Bindings { values, tail: &[] })
    }

    /// Builds the client channel for captured topic values; `None` when a captured value cannot
    /// be a channel level (it would contain `/`, a wildcard or be empty).
    pub fn render(&self, captures: &Captures) -> Option<String> {
        let mut out = String::with_capacity(self.raw.len() + 16);
        let push = |out: &mut String, level: &str| {
            if level.is_empty()
                || level.contains(['/', '+', '#'])
                || level.chars().any(char::is_control)
            {
                return false;
            }
            if !out.is_empty() {
                out.push('/');
            }
            out.push_str(level);
            true
        };
        for level in &self.levels {
            let ok = match level {
                ChannelLevel::Literal(l) => push(&mut out, l),
                ChannelLevel::Placeholder(p) => push(&mut out, captures.get(&p.key())?),
                ChannelLevel::Multi => captures.tail.iter().all(|t| push(&mut out, t)),
            };
            if !ok {
                return None;
            }
        }
        Some(out)
    }
}

impl fmt::Display for ChannelTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TopicLevel {
    /// Literal text around at most one placeholder.
    Text {
        prefix: String,
        placeholder: Option<Placeholder>,
        suffix: String,
    },
    Multi,
}

/// A `topic` (or `key`) template in a backend's syntax.
#[derive(Debug, Clone)]
pub struct TopicTemplate {
    raw: String,
    syntax: TopicSyntax,
    levels: Vec<TopicLevel>,
}

/// A topic rendered from a client pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedTopic {
    pub text: String,
    /// Contains wildcards (the topic is a filter).
    pub is_filter: bool,
    /// Matches more than the client pattern; the gateway filters messages itself.
    pub widened: bool,
}

/// Why a topic could not be rendered for a client pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("value {value:?} for {placeholder} cannot be used in a {syntax}")]
    InvalidValue {
        placeholder: String,
        value: String,
        syntax: &'static str,
    },
    #[error("the pattern would span several {syntax}s, which this backend cannot subscribe to")]
    WildcardUnsupported { syntax: &'static str },
    #[error("the {syntax} would be longer than {max} bytes")]
    TooLong { syntax: &'static str, max: usize },
    #[error("claim {0} is missing")]
    MissingClaim(String),
}

impl TopicTemplate {
    pub fn parse(raw: &str, syntax: TopicSyntax) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("is empty".into());
        }
        let parts = syntax.split(raw);
        let last = parts.len() - 1;
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            if syntax.multi_wildcard == Some(*part) {
                if i != last {
                    return Err(format!("'{part}' must be the last level"));
                }
                levels.push(TopicLevel::Multi);
                continue;
            }
            if part.is_empty() {
                return Err(format!("empty level at position {i}"));
            }
            if syntax.is_wildcard(part) {
                return Err(format!(
                    "wildcard '{part}' is not allowed; name the level with a placeholder bound in the channel"
                ));
            }
            levels.push(Self::parse_level(part, &syntax)?);
        }
        Ok(TopicTemplate {
            raw: raw.to_owned(),
            syntax,
            levels,
        })
    }

    fn parse_level(part: &str, syntax: &TopicSyntax) -> Result<TopicLevel, String> {
        let Some(open) = part.find('{') else {
            if part.contains('}') {
                return Err(format!("level {part:?} has an unmatched '}}'"));
            }
            Self::check_literal(part, syntax)?;
            return Ok(TopicLevel::Text {
                prefix: part.to_owned(),
                placeholder: None,
                suffix: String::new(),
            });
        };
        let close = part[open..]
            .find('}')
            .map(|c| c + open)
            .ok_or_else(|| format!("level {part:?} has an unclosed '{{'"))?;
        let (prefix, suffix) = (&part[..open], &part[close + 1..]);
        if suffix.contains(['{', '}']) || prefix.contains('}') {
            return Err(format!(
                "level {part:?} has more than one placeholder; use at most one per level"
            ));
        }
        Self::check_literal(prefix, syntax)?;
        Self::check_literal(suffix, syntax)?;
        Ok(TopicLevel::Text {
            prefix: prefix.to_owned(),
            placeholder: Some(Placeholder::parse(&part[open + 1..close])?),
            suffix: suffix.to_owned(),
        })
    }

    fn check_literal(text: &str, syntax: &TopicSyntax) -> Result<(), String> {
        let wildcard = [syntax.single_wildcard, syntax.multi_wildcard]
            .into_iter()
            .flatten()
            .find(|w| text.contains(w));
        match wildcard {
            Some(w) => Err(format!("{text:?} contains the wildcard '{w}'")),
            None if text.chars().any(char::is_control) => {
                Err(format!("{text:?} contains a control character"))
            }
            None => Ok(()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn syntax(&self) -> &TopicSyntax {
        &self.syntax
    }

    pub fn has_multi(&self) -> bool {
        self.levels.last() == Some(&TopicLevel::Multi)
    }

    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.levels.iter().filter_map(|l| match l {
            TopicLevel::Text {
                placeholder: Some(p),
                ..
            } => Some(p),
            _ => None,
        })
    }

    /// Renders the topic for bound values. Wildcards in the bindings become the syntax's
    /// wildcards; a wildcard inside a partly literal level widens that level to a full wildcard.
    pub fn render(
        &self,
        bindings: &Bindings<'_>,
        claims: &dyn ClaimSource,
    ) -> Result<RenderedTopic, RenderError> {
        let syntax = &self.syntax;
        let unsupported = || RenderError::WildcardUnsupported {
            syntax: syntax.name,
        };
        let mut rendered: Vec<Cow<'_, str>> = Vec::with_capacity(self.levels.len() + 4);
        let mut is_filter = false;
        let mut widened = false;
        for level in &self.levels {
            match level {
                TopicLevel::Text {
                    prefix,
                    placeholder: None,
                    ..
                } => rendered.push(Cow::Borrowed(prefix)),
                TopicLevel::Text {
                    prefix,
                    placeholder: Some(p),
                    suffix,
                } => {
                    let value = match bindings.get(&p.key()) {
                        Some(Bound::Exact(v)) => Some(v.clone()),
                        Some(Bound::Any) => None,
                        None => match p {
                            Placeholder::Claim(path) => Some(
                                claims
                                    .claim(path)
                                    .ok_or_else(|| RenderError::MissingClaim(p.key().into()))?,
                            ),
                            // Validation guarantees every topic variable is bound by the channel.
                            Placeholder::Var(_) => None,
                        },
                    };
                    match value {
                        Some(v) => {
                            self.check_value(p, &v)?;
                            rendered.push(Cow::Owned(format!("{prefix}{v}{suffix}")));
                        }
                        None => {
                            let w = syntax.single_wildcard.ok_or_else(unsupported)?;
                            widened |= !prefix.is_empty() || !suffix.is_empty();
                            is_filter = true;
                            rendered.push(Cow::Borrowed(w));
                        }
                    }
                }
                TopicLevel::Multi => {
                    for t in bindings.tail {
                        match t {
                            PatternLevel::Literal(v) => {
                                self.check_value_named("#", v)?;
                                rendered.push(Cow::Borrowed(v));
                            }
                            PatternLevel::Single => {
                                is_filter = true;
                                rendered.push(Cow::Borrowed(
                                    syntax.single_wildcard.ok_or_else(unsupported)?,
                                ));
                            }
                            PatternLevel::Multi => {
                                is_filter = true;
                                rendered.push(Cow::Borrowed(
                                    syntax.multi_wildcard.ok_or_else(unsupported)?,
                                ));
                            }
                        }
                    }
                }
            }
        }
        let text = match syntax.separator {
            Some(sep) => rendered.join(sep.encode_utf8(&mut [0; 4])),
            None => rendered.concat(),
        };
        if text.len() > syntax.max_len {
            return Err(RenderError::TooLong {
                syntax: syntax.name,
                max: syntax.max_len,
            });
        }
        Ok(RenderedTopic {
            text,
            is_filter,
            widened,
        })
    }

    fn check_value(&self, p: &Placeholder, value: &str) -> Result<(), RenderError> {
        self.check_value_named(&p.to_string(), value)
    }

    fn check_value_named(&self, name: &str, value: &str) -> Result<(), RenderError> {
        if value.is_empty() || !value.chars().all(self.syntax.value_char) {
            return Err(RenderError::InvalidValue {
                placeholder: name.to_owned(),
                value: value.to_owned(),
                syntax: self.syntax.name,
            });
        }
        Ok(())
    }

    /// Matches a concrete broker topic against this template and returns the captured values.
    pub fn capture<'t>(&self, topic: &'t str, into: &mut Captures<'t>) -> bool {
        let parts = self.syntax.split(topic);
        for (i, level) in self.levels.iter().enumerate() {
            match level {
                TopicLevel::Multi => {
                    into.tail = parts[i..].to_vec();
                    return true;
                }
                TopicLevel::Text {
                    prefix,
                    placeholder,
                    suffix,
                } => {
                    let Some(part) = parts.get(i) else {
                        return false;
                    };
                    match placeholder {
                        None if part == prefix => {}
                        None => return false,
                        Some(p) => {
                            let value = part
                                .strip_prefix(prefix.as_str())
                                .and_then(|r| r.strip_suffix(suffix.as_str()));
                            match value {
                                Some(v) if !v.is_empty() => into.values.push((p.key().into(), v)),
                                _ => return false,
                            }
                        }
                    }
                }
            }
        }
        parts.len() == self.levels.len()
    }
}

/// Values captured from a broker topic (and key) by [`TopicTemplate::capture`].
#[derive(Debug, Default)]
pub struct Captures<'t> {
    values: Vec<(String, &'t str)>,
    tail: Vec<&'t str>,
}

impl<'t> Captures<'t> {
    fn get(&self, key: &str) -> Option<&'t str> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// Whether the same placeholder was captured with two different values (topic vs key).
    pub fn is_consistent(&self) -> bool {
        self.values.iter().enumerate().all(|(i, (k, v))| {
            self.values[i + 1..]
                .iter()
                .all(|(k2, v2)| k2 != k || v2 == v)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AMQP routing keys, the syntax with a `.` separator and `*` wildcard.
    const DOT: TopicSyntax = crate::backends::amqp::ROUTING_KEY;
    const NAME: TopicSyntax = TopicSyntax {
        name: "name",
        separator: None,
        single_wildcard: None,
        multi_wildcard: None,
        max_len: 249,
        value_char: |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
    };

    struct Sub(&'static str);
    impl ClaimSource for Sub {
        fn claim(&self, path: &str) -> Option<Cow<'_, str>> {
            (path == "sub").then_some(Cow::Borrowed(self.0))
        }
    }

    fn forward(
        channel: &str,
        topic: &str,
        syntax: TopicSyntax,
        pattern: &str,
    ) -> Result<RenderedTopic, String> {
        let c = ChannelTemplate::parse(channel).unwrap();
        let t = TopicTemplate::parse(topic, syntax).unwrap();
        let p = ChannelPattern::parse(pattern).unwrap();
        let b = c.bind(&p, &NoClaims).map_err(|e| format!("{e:?}"))?;
        t.render(&b, &NoClaims).map_err(|e| e.to_string())
    }

    fn text(r: Result<RenderedTopic, String>) -> String {
        r.map(|r| r.text).unwrap_or_else(|e| e)
    }

    #[test]
    fn maps_patterns_to_slash_topics() {
        let s = TopicSyntax::SLASH;
        assert_eq!(
            text(forward("site/{site}/#", "plant/{site}/#", s, "site/a/temp")),
            "plant/a/temp"
        );
        assert_eq!(
            text(forward("site/{site}/#", "plant/{site}/#", s, "site/a")),
            "plant/a"
        );
        assert_eq!(
            text(forward("site/{site}/#", "plant/{site}/#", s, "site/+/x/#")),
            "plant/+/x/#"
        );
        assert_eq!(
            text(forward("site/{site}/#", "plant/{site}/#", s, "site/#")),
            "plant/+/#"
        );
        assert_eq!(text(forward("#", "#", s, "#")), "#");
        assert_eq!(text(forward("#", "prefix/#", s, "a/+/c")), "prefix/a/+/c");
        assert_eq!(text(forward("a/{x}/b", "t/{x}", s, "a/1/b")), "t/1");
        assert!(forward("a/{x}/b", "t/{x}", s, "a/1/c").is_err());
        assert!(
            forward("a/{x}/b", "t/{x}", s, "a/#").is_err(),
            "pattern reaches beyond template"
        );
        assert!(forward("a/{x}", "t/{x}", s, "a/1/2").is_err());
        assert!(
            forward("a/b", "t", s, "a/+").is_err(),
            "pattern wider than literal level"
        );
    }

    #[test]
    fn maps_patterns_to_routing_keys() {
        assert_eq!(
            text(forward(
                "orders/{region}/#",
                "orders.{region}.#",
                DOT,
                "orders/eu/+/x"
            )),
            "orders.eu.*.x"
        );
        assert_eq!(
            text(forward(
                "orders/{region}/#",
                "orders.{region}.#",
                DOT,
                "orders/#"
            )),
            "orders.*.#"
        );
        let err = text(forward(
            "orders/{region}/#",
            "orders.{region}.#",
            DOT,
            "orders/eu.west/x",
        ));
        assert!(err.contains("cannot be used in a routing key"), "{err}");
        assert!(
            text(forward(
                "orders/{r}/#",
                "orders.{r}.#",
                DOT,
                "orders/eu/a*b"
            ))
            .contains("cannot be used")
        );
        assert!(
            text(forward(
                "orders/{r}/#",
                "orders.{r}.#",
                DOT,
                "orders/eu/a.b"
            ))
            .contains("cannot be used")
        );
    }

    #[test]
    fn partial_levels_widen_or_fail() {
        let r = forward("dev/{id}", "devices/dev-{id}", TopicSyntax::SLASH, "dev/+").unwrap();
        assert_eq!(r.text, "devices/+");
        assert!(r.widened && r.is_filter);
        assert_eq!(
            text(forward("events/{name}", "app-{name}", NAME, "events/x")),
            "app-x"
        );
        assert!(
            text(forward("events/{name}", "app-{name}", NAME, "events/+")).contains("span several")
        );
        assert!(
            text(forward("events/{name}", "app-{name}", NAME, "events/a b"))
                .contains("cannot be used")
        );
    }

    #[test]
    fn claims_bind_only_to_the_principal() {
        let c = ChannelTemplate::parse("users/{claims.sub}/#").unwrap();
        let t = TopicTemplate::parse("u/{claims.sub}/#", TopicSyntax::SLASH).unwrap();
        let alice = Sub("alice");
        let own = ChannelPattern::parse("users/alice/#").unwrap();
        let b = c.bind(&own, &alice).unwrap();
        assert_eq!(t.render(&b, &alice).unwrap().text, "u/alice/#");
        for other in ["users/bob/x", "users/+/x", "users/#", "#"] {
            let p = ChannelPattern::parse(other).unwrap();
            assert!(c.bind(&p, &alice).is_err(), "{other}");
        }
        assert_eq!(c.bind(&own, &NoClaims), Err(BindError::ClaimMismatch));
    }

    #[test]
    fn captures_map_back_to_channels() {
        let c = ChannelTemplate::parse("site/{site}/#").unwrap();
        let t = TopicTemplate::parse("plant.{site}.#", DOT).unwrap();
        let mut caps = Captures::default();
        assert!(t.capture("plant.berlin.temp.1", &mut caps));
        assert_eq!(c.render(&caps).unwrap(), "site/berlin/temp/1");
        let mut caps = Captures::default();
        assert!(t.capture("plant.berlin", &mut caps));
        assert_eq!(c.render(&caps).unwrap(), "site/berlin");
        assert!(!t.capture("other.berlin", &mut Captures::default()));
        let mut caps = Captures::default();
        assert!(t.capture("plant.a/b.x", &mut caps));
        assert_eq!(
            c.render(&caps),
            None,
            "a '/' inside a level cannot become a channel level"
        );

        let t = TopicTemplate::parse("app-{name}", NAME).unwrap();
        let c = ChannelTemplate::parse("events/{name}").unwrap();
        let mut caps = Captures::default();
        assert!(t.capture("app-x", &mut caps));
        assert_eq!(c.render(&caps).unwrap(), "events/x");
        assert!(!t.capture("app-", &mut Captures::default()));
        assert!(!t.capture("other", &mut Captures::default()));
    }

    #[test]
    fn template_parse_errors_are_explained() {
        assert!(
            ChannelTemplate::parse("a/#/b")
                .unwrap_err()
                .contains("last")
        );
        assert!(
            ChannelTemplate::parse("a/{x}/{x}")
                .unwrap_err()
                .contains("twice")
        );
        assert!(
            ChannelTemplate::parse("a/x{y}")
                .unwrap_err()
                .contains("whole")
        );
        assert!(ChannelTemplate::parse("a/+").unwrap_err().contains("'+'"));
        assert!(
            ChannelTemplate::parse("a/{1x}")
                .unwrap_err()
                .contains("invalid placeholder")
        );
        assert!(
            TopicTemplate::parse("a/{x}{y}", TopicSyntax::SLASH)
                .unwrap_err()
                .contains("more than one")
        );
        assert!(
            TopicTemplate::parse("a/+/b", TopicSyntax::SLASH)
                .unwrap_err()
                .contains("wildcard")
        );
        assert!(
            TopicTemplate::parse("a/#/b", TopicSyntax::SLASH)
                .unwrap_err()
                .contains("last")
        );
        assert!(
            TopicTemplate::parse("a.{x", DOT)
                .unwrap_err()
                .contains("unclosed")
        );
    }
}
