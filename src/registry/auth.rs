//! Registry authentication: parsing `WWW-Authenticate` challenges, token answers, and the
//! per-scope token cache. The HTTP exchanges themselves live in the client.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use secrecy::SecretString;
use serde::Deserialize;

/// Longest lifetime a token is kept for, whatever its answer says.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Lifetime assumed for a token whose answer states none (the token spec's default).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// What a registry asked for in its 401 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm=…`: send the credentials on every request.
    Basic,
    /// `Bearer realm=…,service=…,scope=…`: fetch a token from the realm.
    Bearer {
        /// The token endpoint.
        realm: String,
        /// The service to name in the token request.
        service: Option<String>,
        /// The scope the registry said it wants, if any.
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header value. Unknown schemes give `None`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header
        .split_once(char::is_whitespace)
        .unwrap_or((header, ""));
    let params = parse_params(params);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        }),
        _ => None,
    }
}

/// `key="quoted, value",key2=token` into a map with lowercase keys.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
            value = value.trim().to_string();
        }
        out.insert(key.trim().to_ascii_lowercase(), value);
    }
    out
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    /// ACR's `/oauth2/exchange` answers with this alone.
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
}

/// A bearer token and when to stop using it.
#[derive(Clone)]
pub struct Token {
    /// The token; never printed.
    pub value: SecretString,
    /// When it should be refreshed: shortly before it expires.
    pub refresh_at: Instant,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("refresh_at", &self.refresh_at)
            .finish_non_exhaustive()
    }
}

/// Reads a token endpoint's JSON answer: `token` or `access_token`, and a lifetime from
/// `expires_in`, else the JWT `exp` claim, else [`DEFAULT_TOKEN_LIFETIME`].
pub fn parse_token_answer(body: &[u8], now: Instant) -> Result<Token, String> {
    let answer: TokenAnswer =
        serde_json::from_slice(body).map_err(|e| format!("not a token answer: {e}"))?;
    let value = answer
        .token
        .or(answer.access_token)
        .or(answer.refresh_token)
        .filter(|t| !t.is_empty())
        .ok_or("the answer has no token, access_token or refresh_token")?;
    let lifetime = match answer.expires_in {
        Some(secs) if secs > 0 => Duration::from_secs(secs as u64),
        _ => jwt_lifetime(&value).unwrap_or(DEFAULT_TOKEN_LIFETIME),
    };
    Ok(token_for(value, lifetime, now))
}

/// A token valid for `lifetime` from `now`, to be refreshed a little before it expires so
/// that a request never leaves with a token about to expire.
pub fn token_for(value: String, lifetime: Duration, now: Instant) -> Token {
    // A token service that claims a lifetime beyond a day is not believed.
    let lifetime = lifetime.min(MAX_TOKEN_LIFETIME);
    let margin = (lifetime / 10).min(Duration::from_secs(30));
    Token {
        value: SecretString::from(value),
        refresh_at: now + lifetime - margin,
    }
}

/// The remaining lifetime of a JWT from its `exp` claim, read without verifying it: the
/// issuer's audience verifies; we only need to know when to ask again.
pub fn jwt_lifetime(token: &str) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = Duration::from_secs(u64::try_from(claims.get("exp")?.as_i64()?).ok()?);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    // Whole seconds on our side would overstate the lifetime by up to a second.
    exp.checked_sub(now).filter(|left| !left.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_keep_quoted_commas() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
        assert_eq!(parse_challenge("Basic realm=\"x\""), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
    }

    #[test]
    fn token_lifetime_comes_from_expires_in_or_defaults() {
        let now = Instant::now();
        let t = parse_token_answer(br#"{"token": "abc", "expires_in": 300}"#, now).unwrap();
        assert_eq!(t.refresh_at, now + Duration::from_secs(270));
        let t = parse_token_answer(br#"{"access_token": "abc"}"#, now).unwrap();
        assert_eq!(t.refresh_at, now + Duration::from_secs(54));
        assert!(parse_token_answer(br#"{"token": ""}"#, now).is_err());
        assert!(parse_token_answer(b"<html>", now).is_err());
    }

    #[test]
    fn a_jwt_without_expires_in_uses_its_exp_claim() {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let claims =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{{\"exp\": {exp}}}"));
        let jwt = format!("eyJhbGciOiJub25lIn0.{claims}.sig");
        let now = Instant::now();
        let t =
            parse_token_answer(format!("{{\"access_token\": \"{jwt}\"}}").as_bytes(), now).unwrap();
        let left = t.refresh_at - now;
        assert!(
            left > Duration::from_secs(3500) && left <= Duration::from_secs(3570),
            "{left:?}"
        );
    }
}
