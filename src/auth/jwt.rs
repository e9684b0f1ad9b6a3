//! JWT verification: the `[auth]` table, keys, and what a valid token yields.
//!
//! The accepted algorithms come from the configured key, never from the token: a shared `secret`
//! allows only HS256/384/512, an RSA public key only RS*/PS*, an EC key ES256/ES384, an Ed25519 key
//! EdDSA, and a JWKS entry only its own family (or its `alg`). So `alg: none` and HS/RS confusion
//! (an HMAC token "signed" with the RSA public key) are refused before any signature is checked.

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;

use super::Principal;
use crate::config::ConfigProblem;

/// A string that never appears in logs or `Debug` output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

/// Whether connections must present a token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Anyone may connect; routes decide what they may do.
    #[default]
    None,
    /// Every connection needs a valid JWT.
    Jwt,
}

/// Where the gateway looks for a token in the upgrade request, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`
    Header,
    /// `?access_token=<token>`
    Query,
    /// The cookie named by `cookie_name`.
    Cookie,
    /// A `Sec-WebSocket-Protocol` entry `access_token.<token>`.
    Subprotocol,
}

/// The `[auth]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Shared secret for HS256/384/512 tokens.
    pub secret: Option<Secret>,
    /// PEM public key (RSA, EC P-256/P-384 or Ed25519).
    pub public_key_file: Option<PathBuf>,
    /// JSON Web Key Set file.
    pub jwks_file: Option<PathBuf>,
    /// JSON Web Key Set URL, fetched at start and every `jwks_refresh`.
    pub jwks_url: Option<String>,
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// Restricts the algorithms further (each must fit the key).
    pub algorithms: Vec<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's audiences), when set.
    pub audience: Option<String>,
    /// Clock skew allowed for `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Where to look for the token, in order.
    pub token_sources: Vec<TokenSource>,
    /// Cookie carrying the token when `cookie` is a source.
    pub cookie_name: String,
    /// Claim naming the subject (logged, and kept across in-band refreshes).
    pub subject_claim: String,
    /// Refuse tokens without `exp`.
    pub require_exp: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::None,
            secret: None,
            public_key_file: None,
            jwks_file: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            algorithms: Vec::new(),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            token_sources: vec![
                TokenSource::Header,
                TokenSource::Query,
                TokenSource::Cookie,
                TokenSource::Subprotocol,
            ],
            cookie_name: "wsbridge_token".into(),
            subject_claim: "sub".into(),
            require_exp: true,
        }
    }
}

impl AuthConfig {
    /// Checks the table without loading key files.
    pub fn validate(&self, problems: &mut Vec<ConfigProblem>) {
        let sources = [
            ("auth.secret", self.secret.is_some()),
            ("auth.public_key_file", self.public_key_file.is_some()),
            ("auth.jwks_file", self.jwks_file.is_some()),
            ("auth.jwks_url", self.jwks_url.is_some()),
        ];
        let set: Vec<&str> = sources
            .iter()
            .filter(|(_, s)| *s)
            .map(|(k, _)| *k)
            .collect();
        match self.mode {
            AuthMode::None => {
                for key in set {
                    problems.push(ConfigProblem::new(
                        key,
                        "is set but auth.mode is \"none\", so no token would be checked; set mode = \"jwt\" or remove it",
                    ));
                }
            }
            AuthMode::Jwt => {
                if set.len() != 1 {
                    problems.push(ConfigProblem::new(
                        "auth",
                        format!(
                            "mode \"jwt\" needs exactly one of secret, public_key_file, jwks_file, jwks_url (found {})",
                            if set.is_empty() { "none".to_string() } else { set.join(", ") }
                        ),
                    ));
                }
                if self.secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                    problems.push(ConfigProblem::new("auth.secret", "is empty"));
                }
                if self.token_sources.is_empty() {
                    problems.push(ConfigProblem::new(
                        "auth.token_sources",
                        "is empty; list at least one of header, query, cookie, subprotocol",
                    ));
                }
                if let Some(url) = &self.jwks_url
                    && !(url.starts_with("https://") || url.starts_with("http://"))
                {
                    problems.push(ConfigProblem::new(
                        "auth.jwks_url",
                        format!("{url:?} is not an http(s) URL"),
                    ));
                }
                if self.jwks_refresh < Duration::from_secs(1) {
                    problems.push(ConfigProblem::new(
                        "auth.jwks_refresh",
                        "must be at least 1s",
                    ));
                }
                for (i, name) in self.algorithms.iter().enumerate() {
                    if Algorithm::from_str(name).is_err() {
                        problems.push(ConfigProblem::new(
                            format!("auth.algorithms[{i}]"),
                            format!("unknown algorithm {name:?}"),
                        ));
                    }
                }
                if self.cookie_name.is_empty() || self.cookie_name.contains([';', '=', ' ']) {
                    problems.push(ConfigProblem::new(
                        "auth.cookie_name",
                        format!("{:?} is not a valid cookie name", self.cookie_name),
                    ));
                }
            }
        }
    }
}

/// Why a token was refused. The display text is the short reason given to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm not allowed")]
    Algorithm,
    #[error("invalid token signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("invalid token issuer")]
    Issuer,
    #[error("invalid token audience")]
    Audience,
    #[error("token lacks the {0} claim")]
    MissingClaim(String),
    #[error("unknown token key")]
    UnknownKey,
}

impl TokenError {
    /// A short, fixed name for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::Malformed => "malformed",
            TokenError::Algorithm => "algorithm",
            TokenError::Signature => "signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::Issuer => "issuer",
            TokenError::Audience => "audience",
            TokenError::MissingClaim(_) => "missing_claim",
            TokenError::UnknownKey => "unknown_key",
        }
    }
}

/// A verified token.
#[derive(Debug, Clone)]
pub struct Verified {
    pub principal: Principal,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

impl Verified {
    /// How long until the token stops verifying (`exp` plus `leeway`), to the millisecond;
    /// `None` for a token without expiry. Verification refuses a token with no time left, so a
    /// connection it opens always has some.
    pub fn remaining(&self, leeway: std::time::Duration) -> Option<std::time::Duration> {
        let exp = self.expires_at?;
        let deadline = std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp) + leeway;
        Some(
            deadline
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default(),
        )
    }
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Checks tokens against the configured key material.
pub struct JwtVerifier {
    keys: Arc<RwLock<Vec<Key>>>,
    validation: Validation,
    restrict: Vec<Algorithm>,
    subject_claim: String,
}

fn family_of(key: &DecodingKey) -> AlgorithmFamily {
    key.family()
}

impl JwtVerifier {
    /// Loads key material (files are read now; a JWKS URL is fetched by [`Self::refresh_from`]).
    pub fn new(config: &AuthConfig) -> Result<Self, String> {
        let restrict: Vec<Algorithm> = config
            .algorithms
            .iter()
            .filter_map(|a| Algorithm::from_str(a).ok())
            .collect();
        let mut keys = Vec::new();
        if let Some(secret) = &config.secret {
            let key = DecodingKey::from_secret(secret.expose().as_bytes())
                .map_err(|e| format!("auth.secret: {e}"))?;
            keys.push(Key {
                kid: None,
                algorithms: AlgorithmFamily::Hmac.algorithms().to_vec(),
                key,
            });
        }
        if let Some(path) = &config.public_key_file {
            let pem = std::fs::read(path).map_err(|e| {
                format!("auth.public_key_file: cannot read {}: {e}", path.display())
            })?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .or_else(|_| DecodingKey::from_ec_pem(&pem))
                .or_else(|_| DecodingKey::from_ed_pem(&pem))
                .map_err(|_| {
                    format!(
                        "auth.public_key_file: {} is not a PEM RSA, EC or Ed25519 public key",
                        path.display()
                    )
                })?;
            keys.push(Key {
                kid: None,
                algorithms: family_of(&key).algorithms().to_vec(),
                key,
            });
        }
        if let Some(path) = &config.jwks_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("auth.jwks_file: cannot read {}: {e}", path.display()))?;
            keys = parse_jwks(&text).map_err(|e| format!("auth.jwks_file: {e}"))?;
        }
        if !restrict.is_empty() {
            for key in &mut keys {
                key.algorithms.retain(|a| restrict.contains(a));
            }
            if keys.iter().all(|k| k.algorithms.is_empty()) && config.jwks_url.is_none() {
                return Err("auth.algorithms: none of them fits the configured key".into());
            }
        }

        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_exp = true;
        let mut required: HashSet<String> = HashSet::new();
        if config.require_exp {
            required.insert("exp".into());
        }
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.insert("iss".into());
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        validation.required_spec_claims = required;

        Ok(JwtVerifier {
            keys: Arc::new(RwLock::new(keys)),
            validation,
            restrict,
            subject_claim: config.subject_claim.clone(),
        })
    }

    /// Replaces the keys with a JWKS document fetched from `url`.
    pub async fn refresh_from(&self, client: &reqwest::Client, url: &str) -> Result<usize, String> {
        let response = client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("fetching {url}: {e}"))?;
        let text = response
            .text()
            .await
            .map_err(|e| format!("reading {url}: {e}"))?;
        let mut keys = parse_jwks(&text).map_err(|e| format!("{url}: {e}"))?;
        if !self.restrict.is_empty() {
            for key in &mut keys {
                key.algorithms.retain(|a| self.restrict.contains(a));
            }
        }
        let count = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(count)
    }

    /// Verifies a token and returns its principal.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                TokenError::Algorithm
            }
            // `alg: none` and other unknown algorithms fail header parsing; say so.
            _ if header_names_an_algorithm(token) => TokenError::Algorithm,
            _ => TokenError::Malformed,
        })?;
        let key = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            let candidates: Vec<&Key> = match &header.kid {
                Some(kid) if keys.iter().any(|k| k.kid.is_some()) => keys
                    .iter()
                    .filter(|k| k.kid.as_ref() == Some(kid))
                    .collect(),
                _ => keys.iter().collect(),
            };
            if candidates.is_empty() {
                return Err(TokenError::UnknownKey);
            }
            candidates
                .into_iter()
                .find(|k| k.algorithms.contains(&header.alg))
                .cloned()
                .ok_or(TokenError::Algorithm)?
        };
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.key,
            &validation,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidSignature => TokenError::Signature,
            ErrorKind::InvalidIssuer => TokenError::Issuer,
            ErrorKind::InvalidAudience => TokenError::Audience,
            ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => TokenError::Algorithm,
            ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
            _ => TokenError::Malformed,
        })?;
        let claims = data.claims;
        let subject = match claims.get(&self.subject_claim) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(TokenError::MissingClaim(self.subject_claim.clone())),
        };
        let expires_at = claims.get("exp").and_then(serde_json::Value::as_u64);
        // `exp` is the time on or after which the token must not be accepted (RFC 7519 4.1.4);
        // the library still accepts a token during its `exp` second, which a session would then
        // close at once with 4001. Refuse it here so the upgrade and the expiry agree.
        if let Some(exp) = expires_at
            && exp.saturating_add(self.validation.leeway) <= unix_now_secs()
        {
            return Err(TokenError::Expired);
        }
        Ok(Verified {
            principal: Principal {
                subject: Some(subject),
                claims,
            },
            expires_at,
        })
    }
}

fn unix_now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether the token's header is JSON with a string `alg` (that could not be used).
fn header_names_an_algorithm(token: &str) -> bool {
    use base64::Engine;
    let Some(segment) = token.split('.').next() else {
        return false;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .is_some_and(|header| header.get("alg").is_some_and(serde_json::Value::is_string))
}

fn parse_jwks(text: &str) -> Result<Vec<Key>, String> {
    let set: JwkSet =
        serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let key = match DecodingKey::from_jwk(jwk) {
            Ok(key) => key,
            Err(e) => {
                tracing::warn!(index = i, error = %e, "skipping an unusable JWKS key");
                continue;
            }
        };
        let algorithms = match (&jwk.common.key_algorithm, &jwk.algorithm) {
            (Some(alg), _) => match Algorithm::try_from(*alg) {
                Ok(alg) => vec![alg],
                Err(_) => continue,
            },
            (None, AlgorithmParameters::EllipticCurve(ec)) => match ec.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => continue,
            },
            (None, _) => family_of(&key).algorithms().to_vec(),
        };
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            key,
            algorithms,
        });
    }
    if keys.is_empty() {
        return Err("contains no usable key".into());
    }
    Ok(keys)
}
