//! What can go wrong talking to a registry. None of these is ever read as "deleted": only an
//! authoritative not-found (see `ManifestLookup::NotFound`) may change stored state.

use std::time::Duration;

/// A failed registry request.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Connection, DNS, TLS or timeout trouble.
    #[error("cannot reach registry {registry}")]
    Transport {
        /// `HOST[:PORT]`.
        registry: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The registry rejected our credentials, or demanded some we do not have.
    #[error("registry {registry} refused authorization for {what}: {detail}")]
    Unauthorized {
        /// `HOST[:PORT]`.
        registry: String,
        /// The request.
        what: String,
        /// Why, as far as we know.
        detail: String,
    },
    /// The registry answered 403.
    #[error("registry {registry} denied access to {what} (403)")]
    Denied {
        /// `HOST[:PORT]`.
        registry: String,
        /// The request.
        what: String,
    },
    /// 429 past our retry budget.
    #[error("registry {registry} is rate limiting requests (429){}", retry_hint(.retry_after))]
    RateLimited {
        /// `HOST[:PORT]`.
        registry: String,
        /// What the registry asked us to wait.
        retry_after: Option<Duration>,
    },
    /// An unexpected status (5xx after retries, or a 4xx that says nothing about existence).
    #[error("registry {registry} answered {status} for {what}{}", code_hint(.code))]
    Status {
        /// `HOST[:PORT]`.
        registry: String,
        /// The request.
        what: String,
        /// HTTP status.
        status: u16,
        /// The registry's error code, when the body had one.
        code: Option<String>,
    },
    /// The body does not hash to the digest it was claimed or requested under.
    #[error(
        "manifest {what} from {registry} fails digest verification: \
         expected {expected}, got {actual}"
    )]
    DigestMismatch {
        /// `HOST[:PORT]`.
        registry: String,
        /// The request.
        what: String,
        /// The digest claimed or requested.
        expected: String,
        /// The digest of the bytes received.
        actual: String,
    },
    /// The body exceeds the manifest size cap.
    #[error("manifest {what} from {registry} is larger than the {limit}-byte limit")]
    TooLarge {
        /// `HOST[:PORT]`.
        registry: String,
        /// The request.
        what: String,
        /// The cap.
        limit: usize,
    },
    /// Headers or body that break the protocol (bad digest header, unparsable JSON, …).
    #[error("registry {registry} sent a malformed answer for {what}: {reason}")]
    Malformed {
        /// `HOST[:PORT]`.
        registry: String,
        /// The request.
        what: String,
        /// What was wrong.
        reason: String,
    },
    /// Two of the registry's own APIs disagree, so neither answer is authoritative.
    #[error("registry {registry} contradicts itself about {what}: {reason}")]
    Inconsistent {
        /// `HOST[:PORT]`.
        registry: String,
        /// The item.
        what: String,
        /// How.
        reason: String,
    },
    /// The token endpoint failed.
    #[error("token request to {realm} failed: {reason}")]
    Token {
        /// The realm URL.
        realm: String,
        /// What was wrong.
        reason: String,
    },
    /// The registry's settings cannot be used (bad CA file, bad host).
    #[error("cannot set up a client for registry {registry}: {reason}")]
    Setup {
        /// `HOST[:PORT]`.
        registry: String,
        /// What was wrong.
        reason: String,
    },
}

fn retry_hint(d: &Option<Duration>) -> String {
    d.map(|d| format!(", retry after {}s", d.as_secs()))
        .unwrap_or_default()
}

fn code_hint(c: &Option<String>) -> String {
    c.as_ref().map(|c| format!(" ({c})")).unwrap_or_default()
}

impl RegistryError {
    /// Whether trying again later may succeed without anyone changing anything.
    pub fn is_retriable(&self) -> bool {
        match self {
            RegistryError::Transport { .. } | RegistryError::RateLimited { .. } => true,
            RegistryError::Status { status, .. } => *status >= 500 || *status == 408,
            RegistryError::Token { .. } | RegistryError::Inconsistent { .. } => true,
            RegistryError::Unauthorized { .. }
            | RegistryError::Denied { .. }
            | RegistryError::DigestMismatch { .. }
            | RegistryError::TooLarge { .. }
            | RegistryError::Malformed { .. }
            | RegistryError::Setup { .. } => false,
        }
    }

    /// A short class name for status output and metrics (bounded cardinality).
    pub fn class(&self) -> &'static str {
        match self {
            RegistryError::Transport { .. } => "transport",
            RegistryError::Unauthorized { .. } => "unauthorized",
            RegistryError::Denied { .. } => "denied",
            RegistryError::RateLimited { .. } => "rate_limited",
            RegistryError::Status { .. } => "status",
            RegistryError::DigestMismatch { .. } => "digest_mismatch",
            RegistryError::TooLarge { .. } => "too_large",
            RegistryError::Malformed { .. } => "malformed",
            RegistryError::Token { .. } => "token",
            RegistryError::Inconsistent { .. } => "inconsistent",
            RegistryError::Setup { .. } => "setup",
        }
    }
}
