//! Who a connection is, and the one place that decides what it may do.
//!
//! Authentication happens once at the upgrade ([`Authenticator::authenticate`]) and again on an
//! in-band `auth` refresh. Authorisation happens in [`Policy::authorize`] for every subscribe and
//! publish: it routes the channel (claim placeholders in the route's templates must equal the
//! token's claims), checks the route's `allow` list and its `subscribe_if`/`publish_if` rule, and
//! logs every denial with the subject (never the token). Nothing else in the gateway grants or
//! refuses access. The `[auth]` table ([`AuthConfig`]) and the routes' rule keys are validated here.

pub mod jwt;
mod policy;
pub mod rules;

use std::borrow::Cow;
use std::sync::Arc;

use axum::http::{HeaderMap, Uri, header};
use tokio_util::sync::CancellationToken;

pub use jwt::{AuthConfig, AuthMode, Secret, TokenError, TokenSource, Verified};
pub use policy::{AccessError, Policy, UsableRoute};

use crate::config::ConfigProblem;
use crate::routing::ClaimSource;
use jwt::JwtVerifier;

/// Prefix of a `Sec-WebSocket-Protocol` entry carrying a token.
pub const SUBPROTOCOL_TOKEN_PREFIX: &str = "access_token.";

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

    fn claim_value(&self, path: &str) -> Option<&serde_json::Value> {
        let mut parts = path.split('.');
        let mut value = self.claims.get(parts.next()?)?;
        for part in parts {
            value = value.get(part)?;
        }
        Some(value)
    }
}

impl ClaimSource for Principal {
    fn claim(&self, path: &str) -> Option<Cow<'_, str>> {
        match self.claim_value(path)? {
            serde_json::Value::String(s) => Some(Cow::Borrowed(s)),
            serde_json::Value::Number(n) => Some(Cow::Owned(n.to_string())),
            serde_json::Value::Bool(b) => Some(Cow::Owned(b.to_string())),
            _ => None,
        }
    }
}

/// Verifies the tokens connections present (or admits everyone with `mode = "none"`).
pub struct Authenticator {
    config: AuthConfig,
    verifier: Option<JwtVerifier>,
}

impl Authenticator {
    /// Loads the key material named by the config.
    pub fn new(config: &AuthConfig) -> Result<Self, String> {
        let verifier = match config.mode {
            AuthMode::None => None,
            AuthMode::Jwt => Some(JwtVerifier::new(config)?),
        };
        Ok(Authenticator {
            config: config.clone(),
            verifier,
        })
    }

    /// Validates the `[auth]` table and loads its key material, recording every problem (a
    /// missing or unreadable key file is a config problem too).
    pub fn from_config(config: &AuthConfig, problems: &mut Vec<ConfigProblem>) -> Option<Self> {
        let before = problems.len();
        config.validate(problems);
        if problems.len() != before {
            return None;
        }
        match Authenticator::new(config) {
            Ok(authenticator) => Some(authenticator),
            Err(e) => {
                let (path, message) = e.split_once(": ").unwrap_or(("auth", &e));
                problems.push(ConfigProblem::new(path, message));
                None
            }
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.verifier.is_some()
    }

    /// Clock skew allowed around `exp` and `nbf`.
    pub fn leeway(&self) -> std::time::Duration {
        self.config.leeway
    }

    /// Fetches the JWKS URL now and then every `jwks_refresh`, until `shutdown`.
    pub fn spawn_jwks_refresh(self: &Arc<Self>, shutdown: CancellationToken) {
        let Some(url) = self.config.jwks_url.clone() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let client = match reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the JWKS HTTP client");
                    return;
                }
            };
            let mut interval = tokio::time::interval(this.config.jwks_refresh);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = interval.tick() => {}
                }
                let Some(verifier) = &this.verifier else {
                    return;
                };
                match verifier.refresh_from(&client, &url).await {
                    Ok(n) => tracing::debug!(%url, keys = n, "JWKS refreshed"),
                    Err(e) => {
                        tracing::warn!(error = %e, "JWKS refresh failed; keeping the previous keys")
                    }
                }
            }
        });
    }

    /// Authenticates an upgrade request from its headers and URI.
    pub fn authenticate(&self, headers: &HeaderMap, uri: &Uri) -> Result<Verified, TokenError> {
        let Some(verifier) = &self.verifier else {
            return Ok(Verified {
                principal: Principal::anonymous(),
                expires_at: None,
            });
        };
        let token = find_token(
            headers,
            uri,
            &self.config.token_sources,
            &self.config.cookie_name,
        )
        .ok_or(TokenError::Missing)?;
        verifier.verify(&token)
    }

    /// Verifies a token sent in an `auth` frame.
    pub fn verify(&self, token: &str) -> Option<Result<Verified, TokenError>> {
        self.verifier.as_ref().map(|v| v.verify(token))
    }
}

/// Finds the token in the first configured place that has one.
pub fn find_token(
    headers: &HeaderMap,
    uri: &Uri,
    sources: &[TokenSource],
    cookie_name: &str,
) -> Option<String> {
    sources
        .iter()
        .find_map(|source| match source {
            TokenSource::Header => headers
                .get(header::AUTHORIZATION)?
                .to_str()
                .ok()?
                .strip_prefix("Bearer ")
                .map(|t| t.trim().to_owned()),
            TokenSource::Query => form_urlencoded::parse(uri.query()?.as_bytes())
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v.into_owned()),
            TokenSource::Cookie => headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(k, _)| *k == cookie_name)
                .map(|(_, v)| v.to_owned()),
            TokenSource::Subprotocol => headers
                .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .find_map(|p| p.trim().strip_prefix(SUBPROTOCOL_TOKEN_PREFIX))
                .map(str::to_owned),
        })
        .filter(|t| !t.is_empty())
}
