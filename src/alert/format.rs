//! Human-readable renderings of events: one-line summaries, and the Slack, Teams and email
//! bodies built from them.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::event::{Envelope, Severity, StateSummary, TYPE_PREFIX};

/// `tag.moved 127.0.0.1:5000/team/api:prod sha256:aaaa… → sha256:bbbb… (warning)`.
pub fn summary(e: &Envelope) -> String {
    let short = e.kind.strip_prefix(TYPE_PREFIX).unwrap_or(&e.kind);
    let digests = match (&e.data.previous, &e.data.current) {
        (Some(p), Some(c)) => format!(" {} → {}", p.digest.short(), c.digest.short()),
        (Some(p), None) => format!(" was {}", p.digest.short()),
        (None, Some(c)) => format!(" now {}", c.digest.short()),
        (None, None) => String::new(),
    };
    format!("{short} {}{digests} ({})", e.subject, e.data.severity)
}

fn digest(s: &Option<StateSummary>) -> String {
    s.as_ref()
        .map_or_else(|| "-".to_string(), |s| s.digest.to_string())
}

fn platforms(s: Option<&StateSummary>) -> String {
    match s {
        Some(s) if !s.platforms.is_empty() => s
            .platforms
            .iter()
            .map(|p| p.key())
            .collect::<Vec<_>>()
            .join(", "),
        _ => "-".to_string(),
    }
}

fn labels(e: &Envelope) -> String {
    if e.data.labels.is_empty() {
        return "-".to_string();
    }
    e.data
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The evidence of one event as `name: value` pairs, for every human-facing format.
pub fn facts(e: &Envelope) -> Vec<(&'static str, String)> {
    vec![
        ("Reference", e.subject.clone()),
        ("Watch", e.data.watch.clone()),
        ("Severity", e.data.severity.to_string()),
        ("Previous digest", digest(&e.data.previous)),
        ("Current digest", digest(&e.data.current)),
        (
            "Platforms",
            platforms(e.data.current.as_ref().or(e.data.previous.as_ref())),
        ),
        (
            "Detected",
            format!("{} by {:?}", e.time, e.data.detected_by).to_lowercase(),
        ),
        ("Labels", labels(e)),
        ("Event id", e.id.clone()),
    ]
}

/// A Slack incoming-webhook payload for one or more events.
pub fn slack(events: &[Envelope]) -> Value {
    let mut text = String::new();
    if events.len() > 1 {
        let _ = writeln!(text, "*driftwatch: {} events*", events.len());
    }
    for e in events {
        let _ = writeln!(text, "*{}*", summary(e));
        if events.len() == 1 {
            for (k, v) in facts(e) {
                let _ = writeln!(text, "• {k}: `{v}`");
            }
        }
    }
    json!({ "text": text.trim_end() })
}

/// A Microsoft Teams message card for one or more events.
pub fn teams(events: &[Envelope]) -> Value {
    let worst = events
        .iter()
        .map(|e| e.data.severity)
        .max()
        .unwrap_or(Severity::Info);
    let color = match worst {
        Severity::Info => "2E7D32",
        Severity::Warning => "F9A825",
        Severity::Critical => "C62828",
    };
    let title = match events {
        [one] => format!("driftwatch: {}", summary(one)),
        many => format!("driftwatch: {} events", many.len()),
    };
    let sections: Vec<Value> = events
        .iter()
        .map(|e| {
            let facts: Vec<Value> = facts(e)
                .into_iter()
                .map(|(k, v)| json!({"name": k, "value": v}))
                .collect();
            json!({"activityTitle": summary(e), "facts": facts})
        })
        .collect();
    json!({
        "@type": "MessageCard",
        "@context": "https://schema.org/extensions",
        "summary": title,
        "themeColor": color,
        "title": title,
        "sections": sections,
    })
}

/// The subject line of a mail carrying `events`.
pub fn mail_subject(events: &[Envelope], prefix: Option<&str>) -> String {
    let body = match events {
        [one] => format!("driftwatch: {}", summary(one)),
        many => {
            let worst = many
                .iter()
                .map(|e| e.data.severity)
                .max()
                .unwrap_or(Severity::Info);
            format!("driftwatch: {} events ({worst} at most)", many.len())
        }
    };
    match prefix {
        Some(p) => format!("{p} {body}"),
        None => body,
    }
}

/// The plain-text part of a mail.
pub fn mail_text(events: &[Envelope]) -> String {
    let mut s = String::new();
    for e in events {
        let _ = writeln!(s, "{}\n", summary(e));
        for (k, v) in facts(e) {
            let _ = writeln!(s, "  {k:<16} {v}");
        }
        s.push('\n');
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The HTML part of a mail.
pub fn mail_html(events: &[Envelope]) -> String {
    let mut s = String::from("<!DOCTYPE html><html><body style=\"font-family:sans-serif\">");
    for e in events {
        let _ = write!(s, "<h3>{}</h3><table>", escape(&summary(e)));
        for (k, v) in facts(e) {
            let _ = write!(
                s,
                "<tr><th align=\"left\">{k}</th><td><code>{}</code></td></tr>",
                escape(&v)
            );
        }
        s.push_str("</table>");
    }
    s.push_str("</body></html>");
    s
}
