//! Who a connection is, and the one place that decides what it may do.
//!
//! Every subscribe and publish goes through [`authorize`] after routing; nothing else in the
//! gateway grants or refuses access to a channel.

use std::borrow::Cow;

use crate::config::Operation;
use crate::routing::{ChannelPattern, ClaimSource, Route};

/// The identity behind a connection.
#[derive(Debug, Clone, Default)]
pub struct Principal {
    /// The token's subject; `None` for anonymous connections.
    pub subject: Option<String>,
    /// The token's claims (a JSON object), empty for anonymous connections.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl Principal {
    pub fn anonymous() -> Self {
        Principal::default()
    }

    /// How the principal is named in logs.
    pub fn display_name(&self) -> &str {
        self.subject.as_deref().unwrap_or("anonymous")
    }
}

impl ClaimSource for Principal {
    fn claim(&self, path: &str) -> Option<Cow<'_, str>> {
        let mut parts = path.split('.');
        let mut value = self.claims.get(parts.next()?)?;
        for part in parts {
            value = value.get(part)?;
        }
        match value {
            serde_json::Value::String(s) => Some(Cow::Borrowed(s)),
            serde_json::Value::Number(n) => Some(Cow::Owned(n.to_string())),
            serde_json::Value::Bool(b) => Some(Cow::Owned(b.to_string())),
            _ => None,
        }
    }
}

/// A refused operation; the message is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// Decides whether `principal` may perform `op` on `channel` through `route`.
pub fn authorize(
    principal: &Principal,
    op: Operation,
    route: &Route,
    channel: &ChannelPattern,
) -> Result<(), Denied> {
    if route.allows(op) {
        return Ok(());
    }
    let verb = match op {
        Operation::Subscribe => "subscribe to",
        Operation::Publish => "publish on",
    };
    tracing::info!(
        subject = principal.display_name(),
        channel = %channel,
        route = route.index,
        "denied: route does not allow {verb}"
    );
    Err(Denied(format!(
        "route for {channel:?} does not allow clients to {verb} it"
    )))
}
