//! Alert routing: which sinks an event goes to. Delivery from the outbox builds on this.

use crate::config::{Config, Sink};
use crate::event::{Envelope, EventType, glob_match};

/// The sinks `envelope` is routed to, by each sink's `events` globs, `min_severity` and label
/// matches. Baseline events reach sinks only with `alert_on_baseline`.
pub fn route(config: &Config, envelope: &Envelope, baseline: bool) -> Vec<String> {
    if baseline && !config.daemon.alert_on_baseline {
        return Vec::new();
    }
    let Some(kind) = envelope.event_type() else {
        return Vec::new();
    };
    config
        .sinks
        .iter()
        .filter(|s| accepts(s, envelope, kind, config.daemon.alert_on_baseline))
        .map(|s| s.name.clone())
        .collect()
}

/// Without `events`, a sink takes every type but `tag.created`, which it takes only when
/// baselines are alerted at all.
fn accepts(sink: &Sink, envelope: &Envelope, kind: EventType, baselines: bool) -> bool {
    let type_ok = match &sink.events {
        Some(globs) => globs.iter().any(|g| glob_match(g, kind.short())),
        None => kind != EventType::TagCreated || baselines,
    };
    let labels_ok = sink
        .labels
        .iter()
        .all(|(k, v)| envelope.data.labels.get(k) == Some(v));
    type_ok && labels_ok && envelope.data.severity >= sink.min_severity
}
