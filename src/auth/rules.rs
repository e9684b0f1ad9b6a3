//! Route access rules: `subscribe_if` and `publish_if` expressions.
//!
//! A rule is a small boolean expression over the channel's placeholders and the token's claims:
//!
//! ```text
//! {device} in claims.devices or 'admin' in claims.roles
//! claims.tenant == {tenant} and not claims.suspended
//! ```
//!
//! - `{name}`: a placeholder of the route's channel template;
//! - `claims.a.b`: a claim (missing claims compare unequal to everything and are false);
//! - `'text'`: a string (`\'` and `\\` escape), integers, `true`, `false`;
//! - `==`, `!=`, `in` (membership in a claim array, or in a space-separated string such as an OAuth
//!   `scope`), `and`, `or`, `not`, parentheses; a claim on its own is true when it is `true`.
//!
//! Evaluation is three-valued so wildcards cannot escalate: when a client pattern has a wildcard
//! where the rule reads a placeholder (`devices/+/#` against `{device} in claims.devices`), the
//! placeholder is *unknown* and the rule must hold whatever its value. Only a rule that evaluates to
//! true allows the operation.

use std::fmt;

/// A parsed rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    source: String,
    expr: Expr,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Eq(Operand, Operand),
    Ne(Operand, Operand),
    In(Operand, Operand),
    Truthy(Operand),
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Var(String),
    Claim(String),
    Str(String),
    Int(i64),
    Bool(bool),
}

/// What a rule can read when it is evaluated.
pub trait RuleContext {
    /// The value bound to a channel placeholder; `None` when the pattern has a wildcard there.
    fn var(&self, name: &str) -> Option<&str>;
    /// A claim at a dotted path.
    fn claim(&self, path: &str) -> Option<&serde_json::Value>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Truth {
    True,
    False,
    Unknown,
}

impl Truth {
    fn from(b: bool) -> Self {
        if b { Truth::True } else { Truth::False }
    }
}

/// A value during evaluation.
enum Value<'a> {
    Scalar(String),
    List(&'a [serde_json::Value]),
    /// A JSON object or null claim: equal to nothing.
    Opaque,
    Missing,
    Unknown,
}

impl Rule {
    /// Parses a rule; the error says what is wrong and where.
    pub fn parse(source: &str) -> Result<Rule, String> {
        let tokens = tokenize(source)?;
        let mut parser = Parser { tokens, pos: 0 };
        let expr = parser.or()?;
        if let Some((token, at)) = parser.tokens.get(parser.pos) {
            return Err(format!("unexpected {token} at column {}", at + 1));
        }
        Ok(Rule {
            source: source.to_owned(),
            expr,
        })
    }

    /// Placeholder names the rule reads.
    pub fn vars(&self) -> Vec<&str> {
        let mut out = Vec::new();
        collect_vars(&self.expr, &mut out);
        out
    }

    /// Whether the rule certainly holds.
    pub fn allows(&self, cx: &dyn RuleContext) -> bool {
        eval(&self.expr, cx) == Truth::True
    }

    /// Whether the rule may hold for some values of the placeholders the context leaves open
    /// (it is not certainly false).
    pub fn may_allow(&self, cx: &dyn RuleContext) -> bool {
        eval(&self.expr, cx) != Truth::False
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn collect_vars<'a>(expr: &'a Expr, out: &mut Vec<&'a str>) {
    let operand = |o: &'a Operand, out: &mut Vec<&'a str>| {
        if let Operand::Var(v) = o {
            out.push(v);
        }
    };
    match expr {
        Expr::Or(a, b) | Expr::And(a, b) => {
            collect_vars(a, out);
            collect_vars(b, out);
        }
        Expr::Not(a) => collect_vars(a, out),
        Expr::Eq(a, b) | Expr::Ne(a, b) | Expr::In(a, b) => {
            operand(a, out);
            operand(b, out);
        }
        Expr::Truthy(a) => operand(a, out),
    }
}

fn value<'a>(operand: &'a Operand, cx: &'a dyn RuleContext) -> Value<'a> {
    let scalar = |v: &'a serde_json::Value| match v {
        serde_json::Value::String(s) => Value::Scalar(s.clone()),
        serde_json::Value::Number(n) => Value::Scalar(n.to_string()),
        serde_json::Value::Bool(b) => Value::Scalar(b.to_string()),
        serde_json::Value::Array(items) => Value::List(items),
        serde_json::Value::Null | serde_json::Value::Object(_) => Value::Opaque,
    };
    match operand {
        Operand::Var(name) => match cx.var(name) {
            Some(v) => Value::Scalar(v.to_owned()),
            None => Value::Unknown,
        },
        Operand::Claim(path) => cx.claim(path).map(scalar).unwrap_or(Value::Missing),
        Operand::Str(s) => Value::Scalar(s.clone()),
        Operand::Int(i) => Value::Scalar(i.to_string()),
        Operand::Bool(b) => Value::Scalar(b.to_string()),
    }
}

fn equal(a: &Value<'_>, b: &Value<'_>) -> Truth {
    match (a, b) {
        (Value::Unknown, _) | (_, Value::Unknown) => Truth::Unknown,
        (Value::Scalar(x), Value::Scalar(y)) => Truth::from(x == y),
        _ => Truth::False,
    }
}

fn member(item: &Value<'_>, set: &Value<'_>) -> Truth {
    match (item, set) {
        (_, Value::Unknown) => Truth::Unknown,
        (_, Value::List([])) => Truth::False,
        (Value::Unknown, _) => Truth::Unknown,
        (Value::Scalar(x), Value::List(items)) => Truth::from(items.iter().any(|i| match i {
            serde_json::Value::String(s) => s == x,
            serde_json::Value::Number(n) => n.to_string() == *x,
            serde_json::Value::Bool(b) => b.to_string() == *x,
            _ => false,
        })),
        (Value::Scalar(x), Value::Scalar(words)) => {
            Truth::from(words.split_ascii_whitespace().any(|w| w == x))
        }
        _ => Truth::False,
    }
}

fn eval(expr: &Expr, cx: &dyn RuleContext) -> Truth {
    use Truth::*;
    match expr {
        Expr::Or(a, b) => match (eval(a, cx), eval(b, cx)) {
            (True, _) | (_, True) => True,
            (False, False) => False,
            _ => Unknown,
        },
        Expr::And(a, b) => match (eval(a, cx), eval(b, cx)) {
            (False, _) | (_, False) => False,
            (True, True) => True,
            _ => Unknown,
        },
        Expr::Not(a) => match eval(a, cx) {
            True => False,
            False => True,
            Unknown => Unknown,
        },
        Expr::Eq(a, b) => equal(&value(a, cx), &value(b, cx)),
        Expr::Ne(a, b) => match equal(&value(a, cx), &value(b, cx)) {
            True => False,
            False => True,
            Unknown => Unknown,
        },
        Expr::In(a, b) => member(&value(a, cx), &value(b, cx)),
        Expr::Truthy(a) => match value(a, cx) {
            Value::Unknown => Unknown,
            Value::Scalar(s) => Truth::from(s == "true"),
            _ => False,
        },
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    LParen,
    RParen,
    Eq,
    Ne,
    Word(String),
    Var(String),
    Str(String),
    Int(i64),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::LParen => f.write_str("'('"),
            Token::RParen => f.write_str("')'"),
            Token::Eq => f.write_str("'=='"),
            Token::Ne => f.write_str("'!='"),
            Token::Word(w) => write!(f, "{w:?}"),
            Token::Var(v) => write!(f, "{{{v}}}"),
            Token::Str(s) => write!(f, "'{s}'"),
            Token::Int(i) => write!(f, "{i}"),
        }
    }
}

fn tokenize(source: &str) -> Result<Vec<(Token, usize)>, String> {
    let chars: Vec<(usize, char)> = source.char_indices().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        let col = source[..at].chars().count();
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                tokens.push((Token::LParen, col));
                i += 1;
            }
            ')' => {
                tokens.push((Token::RParen, col));
                i += 1;
            }
            '=' | '!' => {
                if chars.get(i + 1).map(|(_, c)| *c) != Some('=') {
                    return Err(format!("expected '{c}=' at column {}", col + 1));
                }
                tokens.push((if c == '=' { Token::Eq } else { Token::Ne }, col));
                i += 2;
            }
            '{' => {
                let end = chars[i..]
                    .iter()
                    .position(|(_, c)| *c == '}')
                    .map(|p| p + i)
                    .ok_or_else(|| format!("unclosed '{{' at column {}", col + 1))?;
                let name: String = chars[i + 1..end].iter().map(|(_, c)| c).collect();
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "invalid placeholder {{{name}}} at column {}",
                        col + 1
                    ));
                }
                tokens.push((Token::Var(name), col));
                i = end + 1;
            }
            '\'' => {
                let mut text = String::new();
                let mut j = i + 1;
                loop {
                    match chars.get(j).map(|(_, c)| *c) {
                        None => return Err(format!("unclosed string at column {}", col + 1)),
                        Some('\\') => {
                            match chars.get(j + 1).map(|(_, c)| *c) {
                                Some(e @ ('\'' | '\\')) => text.push(e),
                                _ => {
                                    return Err(format!(
                                        "unknown escape in string at column {}",
                                        col + 1
                                    ));
                                }
                            }
                            j += 2;
                        }
                        Some('\'') => break,
                        Some(c) => {
                            text.push(c);
                            j += 1;
                        }
                    }
                }
                tokens.push((Token::Str(text), col));
                i = j + 1;
            }
            c if c.is_ascii_digit() || c == '-' => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|(_, c)| !c.is_ascii_digit())
                    .map(|p| p + i + 1)
                    .unwrap_or(chars.len());
                let text: String = chars[i..end].iter().map(|(_, c)| c).collect();
                let n = text
                    .parse()
                    .map_err(|_| format!("invalid number {text:?} at column {}", col + 1))?;
                tokens.push((Token::Int(n), col));
                i = end;
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let end = chars[i..]
                    .iter()
                    .position(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '.'))
                    .map(|p| p + i)
                    .unwrap_or(chars.len());
                let word: String = chars[i..end].iter().map(|(_, c)| c).collect();
                tokens.push((Token::Word(word), col));
                i = end;
            }
            other => {
                return Err(format!(
                    "unexpected character {other:?} at column {}",
                    col + 1
                ));
            }
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<(Token, usize)>,
    pos: usize,
}

impl Parser {
    fn peek_word(&self, word: &str) -> bool {
        matches!(self.tokens.get(self.pos), Some((Token::Word(w), _)) if w == word)
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.pos += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.pos += 1;
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek_word("not") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if let Some((Token::LParen, at)) = self.tokens.get(self.pos) {
            let at = *at;
            self.pos += 1;
            let inner = self.or()?;
            match self.tokens.get(self.pos) {
                Some((Token::RParen, _)) => {
                    self.pos += 1;
                    return Ok(inner);
                }
                _ => return Err(format!("unclosed '(' at column {}", at + 1)),
            }
        }
        let left = self.operand()?;
        match self.tokens.get(self.pos) {
            Some((Token::Eq, _)) => {
                self.pos += 1;
                Ok(Expr::Eq(left, self.operand()?))
            }
            Some((Token::Ne, _)) => {
                self.pos += 1;
                Ok(Expr::Ne(left, self.operand()?))
            }
            Some((Token::Word(w), _)) if w == "in" => {
                self.pos += 1;
                Ok(Expr::In(left, self.operand()?))
            }
            _ => match left {
                Operand::Claim(_) | Operand::Bool(_) => Ok(Expr::Truthy(left)),
                other => Err(format!(
                    "{} on its own is not a condition; compare it with ==, != or in",
                    describe(&other)
                )),
            },
        }
    }

    fn operand(&mut self) -> Result<Operand, String> {
        let Some((token, at)) = self.tokens.get(self.pos).cloned() else {
            return Err("the rule ends where a value was expected".into());
        };
        self.pos += 1;
        match token {
            Token::Var(v) => Ok(Operand::Var(v)),
            Token::Str(s) => Ok(Operand::Str(s)),
            Token::Int(i) => Ok(Operand::Int(i)),
            Token::Word(w) if w == "true" => Ok(Operand::Bool(true)),
            Token::Word(w) if w == "false" => Ok(Operand::Bool(false)),
            Token::Word(w) => match w.strip_prefix("claims.") {
                Some(path) if !path.is_empty() && path.split('.').all(|p| !p.is_empty()) => {
                    Ok(Operand::Claim(path.to_owned()))
                }
                _ => Err(format!(
                    "unknown name {w:?} at column {}; use claims.NAME, {{placeholder}} or a 'string'",
                    at + 1
                )),
            },
            other => Err(format!(
                "expected a value at column {}, found {other}",
                at + 1
            )),
        }
    }
}

fn describe(operand: &Operand) -> String {
    match operand {
        Operand::Var(v) => format!("{{{v}}}"),
        Operand::Claim(c) => format!("claims.{c}"),
        Operand::Str(s) => format!("'{s}'"),
        Operand::Int(i) => i.to_string(),
        Operand::Bool(b) => b.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Cx {
        vars: Vec<(&'static str, Option<&'static str>)>,
        claims: serde_json::Value,
    }

    impl RuleContext for Cx {
        fn var(&self, name: &str) -> Option<&str> {
            self.vars
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| *v)
        }
        fn claim(&self, path: &str) -> Option<&serde_json::Value> {
            path.split('.').try_fold(&self.claims, |v, p| v.get(p))
        }
    }

    fn allows(
        rule: &str,
        vars: Vec<(&'static str, Option<&'static str>)>,
        claims: serde_json::Value,
    ) -> bool {
        Rule::parse(rule).unwrap().allows(&Cx { vars, claims })
    }

    #[test]
    fn membership_and_roles() {
        let rule = "{device} in claims.devices or 'admin' in claims.roles";
        let user = json!({"devices": ["d1", "d2"], "roles": ["viewer"]});
        let admin = json!({"roles": ["admin"]});
        assert!(allows(rule, vec![("device", Some("d1"))], user.clone()));
        assert!(!allows(rule, vec![("device", Some("d3"))], user.clone()));
        // A wildcard at {device} would reach devices outside the claim.
        assert!(!allows(rule, vec![("device", None)], user.clone()));
        // ...unless the rule holds whatever the device is.
        assert!(allows(rule, vec![("device", None)], admin.clone()));
        assert!(!allows(rule, vec![("device", Some("d1"))], json!({})));
    }

    #[test]
    fn comparisons_scopes_and_negation() {
        let claims = json!({"tenant": "acme", "scope": "read write", "level": 3, "suspended": false, "ok": true});
        assert!(allows(
            "claims.tenant == {t}",
            vec![("t", Some("acme"))],
            claims.clone()
        ));
        assert!(!allows(
            "claims.tenant != {t}",
            vec![("t", Some("acme"))],
            claims.clone()
        ));
        assert!(allows("'write' in claims.scope", vec![], claims.clone()));
        assert!(!allows("'admin' in claims.scope", vec![], claims.clone()));
        assert!(allows("claims.level == 3", vec![], claims.clone()));
        assert!(allows(
            "not claims.suspended and claims.ok",
            vec![],
            claims.clone()
        ));
        assert!(allows(
            "(claims.missing == 'x' or claims.ok) and true",
            vec![],
            claims.clone()
        ));
        assert!(!allows("claims.missing", vec![], claims.clone()));
        assert!(!allows(
            "not claims.tenant != {t}",
            vec![("t", None)],
            claims.clone()
        ));
        assert!(allows(
            "claims.tenant == 'it\\'s'",
            vec![],
            json!({"tenant": "it's"})
        ));
    }

    #[test]
    fn parse_errors_point_at_the_problem() {
        let err = |s: &str| Rule::parse(s).unwrap_err();
        assert!(err("{device} in").contains("ends where a value"));
        assert!(err("{device}").contains("not a condition"));
        assert!(err("roles in claims.roles").contains("unknown name \"roles\""));
        assert!(err("(claims.a").contains("unclosed '('"));
        assert!(err("claims.a = 'x'").contains("'=='"));
        assert!(err("'open").contains("unclosed string"));
        assert!(err("claims.a == 'x' 'y'").contains("unexpected"));
        assert!(err("{a-b} == 'x'").contains("invalid placeholder"));
        assert_eq!(
            Rule::parse("{a} == {b} or {a} in claims.x").unwrap().vars(),
            ["a", "b", "a"]
        );
    }
}
