//! Event types, severities, and the CloudEvents 1.0 envelope that is printed, stored and
//! delivered unchanged.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{Digest, ManifestEvidence, Platform, Referrer};

/// The prefix of every event type.
pub const TYPE_PREFIX: &str = "driftwatch.";

/// How urgent an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth recording; nothing to act on.
    Info,
    /// Somebody should look.
    Warning,
    /// Something deployed is at risk.
    Critical,
}

impl FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "info" => Ok(Severity::Info),
            "warning" => Ok(Severity::Warning),
            "critical" => Ok(Severity::Critical),
            other => Err(format!(
                "unknown severity {other:?} (expected info, warning or critical)"
            )),
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        })
    }
}

macro_rules! event_types {
    ($($variant:ident => $name:literal, $severity:ident, $doc:literal;)*) => {
        /// Every event driftwatch emits.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventType {
            $(#[doc = $doc] $variant,)*
        }

        impl EventType {
            /// All event types, in contract order.
            pub const ALL: &'static [EventType] = &[$(EventType::$variant,)*];

            /// The type without its prefix, e.g. `tag.moved`.
            pub fn short(self) -> &'static str {
                match self { $(EventType::$variant => $name,)* }
            }

            /// The usual severity of this type.
            pub fn default_severity(self) -> Severity {
                match self { $(EventType::$variant => Severity::$severity,)* }
            }
        }
    };
}

event_types! {
    TagCreated => "tag.created", Info, "First resolution of a tag watch.";
    TagMoved => "tag.moved", Warning, "The tag now resolves to another digest.";
    TagDeleted => "tag.deleted", Warning, "The tag no longer exists.";
    TagRestored => "tag.restored", Info, "A deleted tag exists again.";
    TagDiverged => "tag.diverged", Warning, "The tag no longer points at the pinned digest.";
    PlatformsChanged => "platforms.changed", Warning, "An index gained or lost platforms.";
    DigestDeleted => "digest.deleted", Critical, "A watched digest is gone.";
    DigestSoftDeleted => "digest.soft_deleted", Critical, "Gone, but restorable (ACR).";
    DigestRestored => "digest.restored", Info, "A deleted digest is back.";
    ReferrersLost => "referrers.lost", Warning, "Referrers of the digest disappeared.";
    ReferrersAdded => "referrers.added", Info, "New referrers appeared.";
    ReferrersMissing => "referrers.missing", Warning, "A required referrer type is missing.";
    AttributesChanged => "attributes.changed", Info, "Registry-side attributes changed.";
    CheckFailing => "check.failing", Warning, "The watch could not be checked repeatedly.";
    CheckRecovered => "check.recovered", Info, "The watch can be checked again.";
}

impl EventType {
    /// The full CloudEvents type, e.g. `driftwatch.tag.moved`.
    pub fn full(self) -> String {
        format!("{TYPE_PREFIX}{}", self.short())
    }

    /// Parses a full or short type name.
    pub fn parse(s: &str) -> Option<EventType> {
        let short = s.strip_prefix(TYPE_PREFIX).unwrap_or(s);
        EventType::ALL.iter().copied().find(|t| t.short() == short)
    }

    /// Whether this type reports drift of the watched artifact, rather than the baseline or
    /// the health of the check itself (what `check --fail-on-drift` fails on).
    pub fn is_drift(self) -> bool {
        !matches!(
            self,
            EventType::TagCreated | EventType::CheckFailing | EventType::CheckRecovered
        )
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

/// The state an event compares: `previous` and `current` in the envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSummary {
    /// Manifest digest.
    pub digest: Digest,
    /// Manifest media type.
    pub media_type: String,
    /// Platforms, for an index.
    pub platforms: Vec<Platform>,
    /// Referrers, when tracked.
    pub referrers: Vec<Referrer>,
}

impl From<&ManifestEvidence> for StateSummary {
    fn from(e: &ManifestEvidence) -> Self {
        StateSummary {
            digest: e.digest.clone(),
            media_type: e.media_type.clone(),
            platforms: e.platforms.clone(),
            referrers: e.referrers.clone(),
        }
    }
}

/// One change found by the differ, before it gets an id and a time.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// What happened.
    pub kind: EventType,
    /// How urgent.
    pub severity: Severity,
    /// The reference the event is about (the tag, or the pinned digest).
    pub subject: String,
    /// The state before, where there was one.
    pub previous: Option<StateSummary>,
    /// The state now, where there is one.
    pub current: Option<StateSummary>,
    /// Type-specific detail.
    pub detail: serde_json::Value,
}

impl Change {
    /// A change with the type's default severity and empty detail.
    pub fn new(kind: EventType, subject: impl Into<String>) -> Self {
        Change {
            kind,
            severity: kind.default_severity(),
            subject: subject.into(),
            previous: None,
            current: None,
            detail: serde_json::json!({}),
        }
    }
}

/// How a check was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectedBy {
    /// A scheduled or one-shot poll.
    Poll,
    /// A registry webhook asked for a re-check.
    Webhook,
}

/// The `data` member of the envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventData {
    /// The watch's name.
    pub watch: String,
    /// How urgent.
    pub severity: Severity,
    /// `HOST[:PORT]`.
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// The tag; null for a digest-only watch.
    pub tag: Option<String>,
    /// State before.
    pub previous: Option<StateSummary>,
    /// State now.
    pub current: Option<StateSummary>,
    /// Type-specific detail.
    pub detail: serde_json::Value,
    /// Poll or webhook.
    pub detected_by: DetectedBy,
    /// The watch's labels.
    pub labels: BTreeMap<String, String>,
}

/// A CloudEvents 1.0 JSON event, exactly as printed, stored and delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always `1.0`.
    pub specversion: String,
    /// UUIDv7, stable across retries and restarts.
    pub id: String,
    /// `driftwatch://HOSTNAME`.
    pub source: String,
    /// `driftwatch.<type>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The reference the event is about.
    pub subject: String,
    /// RFC 3339 time of detection.
    pub time: String,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// The payload.
    pub data: EventData,
}

/// What the envelope needs besides the change: who, where, when and how.
pub struct EnvelopeContext<'a> {
    /// `driftwatch://HOSTNAME`.
    pub source: &'a str,
    /// The watch's name.
    pub watch: &'a str,
    /// Registry of the watch.
    pub registry: &'a str,
    /// Repository of the watch.
    pub repository: &'a str,
    /// Tag of the watch.
    pub tag: Option<&'a str>,
    /// The watch's labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Poll or webhook.
    pub detected_by: DetectedBy,
    /// Detection time.
    pub time: DateTime<Utc>,
}

impl Envelope {
    /// Wraps a change with a fresh UUIDv7 id.
    pub fn new(change: Change, ctx: &EnvelopeContext<'_>) -> Envelope {
        Envelope {
            specversion: "1.0".to_string(),
            id: Uuid::now_v7().to_string(),
            source: ctx.source.to_string(),
            kind: change.kind.full(),
            subject: change.subject,
            time: ctx.time.to_rfc3339_opts(SecondsFormat::Millis, true),
            datacontenttype: "application/json".to_string(),
            data: EventData {
                watch: ctx.watch.to_string(),
                severity: change.severity,
                registry: ctx.registry.to_string(),
                repository: ctx.repository.to_string(),
                tag: ctx.tag.map(str::to_string),
                previous: change.previous,
                current: change.current,
                detail: change.detail,
                detected_by: ctx.detected_by,
                labels: ctx.labels.clone(),
            },
        }
    }

    /// The parsed event type.
    pub fn event_type(&self) -> Option<EventType> {
        EventType::parse(&self.kind)
    }
}

/// The `source` attribute for this host, looked up once: every check cycle needs it.
pub fn source_for_host() -> &'static str {
    static SOURCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SOURCE.get_or_init(|| {
        format!(
            "driftwatch://{}",
            gethostname::gethostname().to_string_lossy()
        )
    })
}

/// Matches `pattern` (with `*` wildcards) against `text`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_round_trip_through_their_names() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(&t.full()), Some(*t));
            assert_eq!(EventType::parse(t.short()), Some(*t));
        }
        assert_eq!(EventType::parse("tag.nope"), None);
    }

    #[test]
    fn globs_match_like_shell_patterns() {
        assert!(glob_match("tag.*", "tag.moved"));
        assert!(glob_match("*", "digest.deleted"));
        assert!(glob_match("*.deleted", "digest.deleted"));
        assert!(!glob_match("tag.*", "digest.deleted"));
        assert!(glob_match("digest.deleted", "digest.deleted"));
        assert!(!glob_match("digest.deleted", "digest.deleted2"));
    }

    #[test]
    fn severities_order_from_info_to_critical() {
        assert!(Severity::Info < Severity::Warning && Severity::Warning < Severity::Critical);
        assert_eq!("warning".parse::<Severity>(), Ok(Severity::Warning));
        assert!("loud".parse::<Severity>().is_err());
    }
}
