//! Client channels and channel patterns.
//!
//! A channel is a `/`-separated list of non-empty levels, e.g. `site/berlin/temp`. A pattern may
//! also use `+` for exactly one level and `#` as the last level for "zero or more further levels"
//! (MQTT semantics: `site/#` matches `site` and `site/a/b`). Everything a client sends is parsed
//! here before it reaches the router, so the rest of the gateway only sees valid channels.

use std::fmt;

/// Longest channel or pattern accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 1024;
/// Most levels a channel or pattern may have.
pub const MAX_LEVELS: usize = 32;

/// Why a client channel was refused. The text is sent to the client in an `invalid_channel` error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel is empty")]
    Empty,
    #[error("channel is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    #[error("channel has more than {MAX_LEVELS} levels")]
    TooManyLevels,
    #[error("channel has an empty level at position {0} (no leading, trailing or double '/')")]
    EmptyLevel(usize),
    #[error("'#' may only be the whole last level")]
    MisplacedMulti,
    #[error("'+' may only be a whole level")]
    MisplacedSingle,
    #[error("channel contains a control character")]
    ControlCharacter,
    #[error("wildcards ('+', '#') are not allowed here; publish needs a concrete channel")]
    WildcardNotAllowed,
}

/// One level of a channel pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PatternLevel {
    Literal(String),
    /// `+`: exactly one level.
    Single,
    /// `#`: zero or more levels; always last.
    Multi,
}

impl PatternLevel {
    pub fn as_str(&self) -> &str {
        match self {
            PatternLevel::Literal(s) => s,
            PatternLevel::Single => "+",
            PatternLevel::Multi => "#",
        }
    }
}

/// A validated client channel pattern (a concrete channel is a pattern without wildcards).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelPattern {
    raw: String,
    levels: Vec<PatternLevel>,
}

impl ChannelPattern {
    /// Parses a pattern that may contain `+` and a trailing `#`.
    pub fn parse(raw: &str) -> Result<Self, ChannelError> {
        if raw.is_empty() {
            return Err(ChannelError::Empty);
        }
        if raw.len() > MAX_CHANNEL_LEN {
            return Err(ChannelError::TooLong);
        }
        if raw.chars().any(char::is_control) {
            return Err(ChannelError::ControlCharacter);
        }
        let parts: Vec<&str> = raw.split('/').collect();
        if parts.len() > MAX_LEVELS {
            return Err(ChannelError::TooManyLevels);
        }
        let last = parts.len() - 1;
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "" => return Err(ChannelError::EmptyLevel(i)),
                "+" => PatternLevel::Single,
                "#" if i == last => PatternLevel::Multi,
                "#" => return Err(ChannelError::MisplacedMulti),
                p if p.contains('#') => return Err(ChannelError::MisplacedMulti),
                p if p.contains('+') => return Err(ChannelError::MisplacedSingle),
                p => PatternLevel::Literal(p.to_owned()),
            };
            levels.push(level);
        }
        Ok(ChannelPattern {
            raw: raw.to_owned(),
            levels,
        })
    }

    /// Parses a concrete channel (no wildcards), as needed for `publish`.
    pub fn parse_concrete(raw: &str) -> Result<Self, ChannelError> {
        let pattern = Self::parse(raw)?;
        if pattern.is_concrete() {
            Ok(pattern)
        } else {
            Err(ChannelError::WildcardNotAllowed)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn levels(&self) -> &[PatternLevel] {
        &self.levels
    }

    pub fn is_concrete(&self) -> bool {
        self.levels
            .iter()
            .all(|l| matches!(l, PatternLevel::Literal(_)))
    }

    /// Whether the concrete `channel` is matched by this pattern.
    pub fn matches(&self, channel: &str) -> bool {
        let mut parts = channel.split('/');
        for level in &self.levels {
            match level {
                PatternLevel::Multi => return true,
                PatternLevel::Single => {
                    if parts.next().is_none_or(str::is_empty) {
                        return false;
                    }
                }
                PatternLevel::Literal(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// Whether every channel matched by `other` is also matched by `self`.
    pub fn covers(&self, other: &ChannelPattern) -> bool {
        let mut theirs = other.levels.iter();
        for level in &self.levels {
            match level {
                PatternLevel::Multi => return true,
                PatternLevel::Single => match theirs.next() {
                    Some(PatternLevel::Literal(_)) | Some(PatternLevel::Single) => {}
                    _ => return false,
                },
                PatternLevel::Literal(l) => match theirs.next() {
                    Some(PatternLevel::Literal(o)) if o == l => {}
                    _ => return false,
                },
            }
        }
        theirs.next().is_none()
    }
}

impl fmt::Display for ChannelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ChannelPattern {
        ChannelPattern::parse(s).unwrap()
    }

    #[test]
    fn parses_valid_patterns() {
        assert_eq!(p("a/b").levels().len(), 2);
        assert!(p("a/b").is_concrete());
        assert!(!p("a/+/c").is_concrete());
        assert!(!p("#").is_concrete());
        assert_eq!(p("a/+/#").levels()[2], PatternLevel::Multi);
    }

    #[test]
    fn rejects_invalid_patterns() {
        use ChannelError::*;
        let cases = [
            ("", Empty),
            ("/a", EmptyLevel(0)),
            ("a/", EmptyLevel(1)),
            ("a//b", EmptyLevel(1)),
            ("a/#/b", MisplacedMulti),
            ("a/b#", MisplacedMulti),
            ("a/b+", MisplacedSingle),
            ("a/\u{0}", ControlCharacter),
            ("a\nb", ControlCharacter),
        ];
        for (raw, err) in cases {
            assert_eq!(ChannelPattern::parse(raw), Err(err), "{raw:?}");
        }
        assert_eq!(
            ChannelPattern::parse(&"a".repeat(MAX_CHANNEL_LEN + 1)),
            Err(TooLong)
        );
        assert_eq!(
            ChannelPattern::parse(&vec!["a"; MAX_LEVELS + 1].join("/")),
            Err(TooManyLevels)
        );
        assert_eq!(
            ChannelPattern::parse_concrete("a/+"),
            Err(WildcardNotAllowed)
        );
    }

    #[test]
    fn matching_follows_mqtt_semantics() {
        assert!(p("a/b").matches("a/b"));
        assert!(!p("a/b").matches("a/b/c"));
        assert!(!p("a/b").matches("a"));
        assert!(p("a/+").matches("a/x"));
        assert!(!p("a/+").matches("a"));
        assert!(!p("a/+").matches("a/x/y"));
        assert!(p("a/#").matches("a"));
        assert!(p("a/#").matches("a/x/y"));
        assert!(!p("a/#").matches("b/x"));
        assert!(p("#").matches("anything/at/all"));
        assert!(p("+/b/#").matches("x/b"));
        assert!(!p("+/b/#").matches("x/c"));
    }

    #[test]
    fn coverage_is_containment() {
        assert!(p("#").covers(&p("a/+/#")));
        assert!(p("a/#").covers(&p("a/b/+")));
        assert!(p("a/+").covers(&p("a/b")));
        assert!(p("a/+").covers(&p("a/+")));
        assert!(!p("a/b").covers(&p("a/+")));
        assert!(!p("a/+").covers(&p("a/#")));
        assert!(!p("a/+/c").covers(&p("a/+/+")));
        assert!(!p("a/b").covers(&p("a/b/c")));
    }
}
