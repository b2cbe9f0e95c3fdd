//! Alerts: routing events to sinks, and delivering them from the durable outbox. A row is
//! marked delivered only after its sink accepted it; failures are retried with backoff
//! until the sink's `max_age`, after which the row is dead (logged, counted, and shown by
//! `history`). Events of one watch reach one sink in detection order.

pub mod email;
pub mod format;
pub mod webhook;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Sink, SinkKind};
use crate::event::{Envelope, EventType, glob_match};
use crate::store::{OutboxRow, Store, StoreError};
use crate::telemetry::{self, DeliveryOutcome};

/// How many pending rows one delivery round looks at.
const ROUND_LIMIT: usize = 5000;
/// Events folded into one digest mail or one summary delivery, at most.
const BATCH_LIMIT: usize = 200;
/// First backoff step between attempts; doubled per attempt up to the sink's cap.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The delivery loop looks again at least this often, whatever it expects.
const MAX_IDLE: Duration = Duration::from_secs(5);

/// Why a delivery failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    /// Worth trying again later.
    #[error("{reason}")]
    Retry {
        /// What happened.
        reason: String,
        /// How long the receiver asked us to wait.
        retry_after: Option<Duration>,
    },
    /// Trying again will not help (410 Gone, a refused address, a bad secret).
    #[error("{0}")]
    Permanent(String),
}

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

/// The key under which a change reaches a sink at most once: watch, type, and the digests
/// before and after. A tag flapping between two digests is so reported once per direction.
/// For the other changes the digests do not tell occurrences apart (a lock removed twice, a
/// digest soft-deleted, restored and soft-deleted again), so the key also holds `after`, the
/// time of the stored resolution the change was found against: two processes finding the
/// same change against the same stored state still fold into one delivery, and a later
/// recurrence is sent again. Health events (`check.*`) carry no digests and are never folded.
pub fn dedupe_key(envelope: &Envelope, after: Option<DateTime<Utc>>) -> Option<String> {
    let d = &envelope.data;
    if d.previous.is_none() && d.current.is_none() {
        return None;
    }
    let digest = |s: &Option<crate::event::StateSummary>| {
        s.as_ref()
            .map_or_else(String::new, |s| s.digest.to_string())
    };
    let mut key = format!(
        "{}|{}|{}|{}",
        d.watch,
        envelope.kind,
        digest(&d.previous),
        digest(&d.current)
    );
    let transition = matches!(
        EventType::parse(&envelope.kind),
        Some(EventType::TagMoved | EventType::TagDiverged | EventType::PlatformsChanged)
    );
    if !transition && let Some(after) = after {
        key.push('|');
        key.push_str(&after.to_rfc3339());
    }
    Some(key)
}

/// Sends `events` through `sink` once, now.
pub async fn send(
    http: &reqwest::Client,
    sink: &Sink,
    events: &[Envelope],
) -> Result<(), DeliveryError> {
    match &sink.kind {
        SinkKind::Webhook {
            url,
            secret,
            format,
            headers,
        } => {
            let hook = webhook::Webhook {
                url,
                secret: secret.as_ref(),
                format: *format,
                headers,
                timeout: sink.delivery.timeout,
            };
            hook.post(http, events).await
        }
        SinkKind::Email {
            smtp,
            from,
            to,
            starttls_required,
            credentials,
            subject_prefix,
            ..
        } => {
            let mail = email::Email {
                smtp,
                from,
                to,
                starttls_required: *starttls_required,
                credentials: credentials.as_ref(),
                subject_prefix: subject_prefix.as_deref(),
                timeout: sink.delivery.timeout,
            };
            mail.send(events).await
        }
    }
}

/// What one delivery round did.
#[derive(Debug, Default, Clone)]
pub struct Round {
    /// Rows delivered.
    pub delivered: usize,
    /// Rows that failed and will be retried.
    pub retried: usize,
    /// Rows given up.
    pub dead: usize,
    /// Rows left waiting (backoff, batch window, rate limit, order).
    pub waiting: usize,
    /// The earliest time a waiting row becomes due.
    pub next_due: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct SinkState {
    /// Delivery times in the last minute, for `max_per_minute`.
    sent: VecDeque<Instant>,
    /// When the last folded summary went out.
    last_summary: Option<Instant>,
    /// After a failure the whole sink waits: its receiver is likely down for every watch.
    paused_until: Option<DateTime<Utc>>,
}

/// Delivers outbox rows to their sinks.
pub struct Deliverer {
    config: std::sync::RwLock<Arc<Config>>,
    store: Store,
    http: reqwest::Client,
    state: Mutex<HashMap<String, SinkState>>,
}

impl Deliverer {
    /// A deliverer for `config`'s sinks.
    pub fn new(config: Arc<Config>, store: Store) -> Deliverer {
        let http = reqwest::Client::builder()
            .user_agent(concat!("driftwatch/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Deliverer {
            config: std::sync::RwLock::new(config),
            store,
            http,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Delivers with a reloaded config's sinks from now on.
    pub fn replace_config(&self, config: Arc<Config>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    /// Delivers what is due. `flush` sends email batches without waiting out their window
    /// (a one-shot `check` sends its events as one mail per sink).
    pub async fn round(&self, flush: bool) -> Result<Round, StoreError> {
        let now = Utc::now();
        let rows = self.store.pending_outbox(ROUND_LIMIT).await?;
        let mut by_sink: BTreeMap<String, Vec<OutboxRow>> = BTreeMap::new();
        for row in rows {
            by_sink.entry(row.sink.clone()).or_default().push(row);
        }
        let config = self
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut round = Round::default();
        for (name, rows) in by_sink {
            // A sink that left the config keeps its rows for when it comes back.
            let Some(sink) = config.sinks.iter().find(|s| s.name == name) else {
                round.waiting += rows.len();
                continue;
            };
            let paused = self.with_state(&name, |s| s.paused_until.filter(|p| *p > now));
            if let Some(until) = paused {
                round.waiting += rows.len();
                note_due(&mut round, until);
                continue;
            }
            match &sink.kind {
                SinkKind::Email { batch_window, .. } => {
                    self.email_round(sink, rows, *batch_window, flush, now, &mut round)
                        .await?
                }
                SinkKind::Webhook { .. } => self.webhook_round(sink, rows, now, &mut round).await?,
            }
        }
        Ok(round)
    }

    fn with_state<T>(&self, sink: &str, f: impl FnOnce(&mut SinkState) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(state.entry(sink.to_string()).or_default())
    }

    async fn email_round(
        &self,
        sink: &Sink,
        rows: Vec<OutboxRow>,
        window: Duration,
        flush: bool,
        now: DateTime<Utc>,
        round: &mut Round,
    ) -> Result<(), StoreError> {
        let (due, later): (Vec<OutboxRow>, Vec<OutboxRow>) =
            rows.into_iter().partition(|r| r.next_attempt_at <= now);
        round.waiting += later.len();
        if let Some(first) = later.iter().map(|r| r.next_attempt_at).min() {
            note_due(round, first);
        }
        let Some(oldest) = due.iter().map(|r| r.created_at).min() else {
            return Ok(());
        };
        // Wait out the window after the first event, so a burst becomes one mail.
        let send_at = oldest + chrono::Duration::from_std(window).unwrap_or_default();
        if !flush && send_at > now {
            round.waiting += due.len();
            note_due(round, send_at);
            return Ok(());
        }
        let mut due = due;
        due.sort_by_key(|r| r.seq);
        for chunk in due.chunks(BATCH_LIMIT) {
            self.attempt(sink, chunk, now, round).await?;
        }
        Ok(())
    }

    async fn webhook_round(
        &self,
        sink: &Sink,
        rows: Vec<OutboxRow>,
        now: DateTime<Utc>,
        round: &mut Round,
    ) -> Result<(), StoreError> {
        // Rows come sorted by watch then detection order: each watch is a chain that is
        // delivered in order, and stops at its first row that is not due or fails.
        let mut chains: Vec<Vec<OutboxRow>> = Vec::new();
        for row in rows {
            match chains.last_mut() {
                Some(chain) if chain[0].watch == row.watch => chain.push(row),
                _ => chains.push(vec![row]),
            }
        }
        let mut overflow: Vec<OutboxRow> = Vec::new();
        for chain in chains {
            let mut rows = chain.into_iter();
            while let Some(row) = rows.next() {
                if row.next_attempt_at > now {
                    note_due(round, row.next_attempt_at);
                    round.waiting += 1 + rows.len();
                    break;
                }
                if !self.take_budget(sink) {
                    overflow.push(row);
                    overflow.extend(rows.by_ref().filter(|r| r.next_attempt_at <= now));
                    break;
                }
                if !self
                    .attempt(sink, std::slice::from_ref(&row), now, round)
                    .await?
                {
                    round.waiting += rows.len();
                    // The receiver is failing; the sink's other watches wait too.
                    return Ok(());
                }
            }
        }
        if !overflow.is_empty() {
            self.summary(sink, overflow, now, round).await?;
        }
        Ok(())
    }

    /// Past `max_per_minute`, the rest is folded into one delivery, at most once a minute.
    async fn summary(
        &self,
        sink: &Sink,
        mut rows: Vec<OutboxRow>,
        now: DateTime<Utc>,
        round: &mut Round,
    ) -> Result<(), StoreError> {
        let allowed = self.with_state(&sink.name, |s| {
            s.last_summary
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        });
        if !allowed {
            round.waiting += rows.len();
            note_due(round, now + chrono::Duration::seconds(60));
            return Ok(());
        }
        rows.sort_by_key(|r| r.seq);
        rows.truncate(BATCH_LIMIT);
        tracing::warn!(
            sink = %sink.name,
            events = rows.len(),
            "rate limit reached; folding alerts into one delivery"
        );
        self.with_state(&sink.name, |s| s.last_summary = Some(Instant::now()));
        self.attempt(sink, &rows, now, round).await?;
        Ok(())
    }

    fn take_budget(&self, sink: &Sink) -> bool {
        let Some(limit) = sink.delivery.max_per_minute else {
            return true;
        };
        self.with_state(&sink.name, |s| {
            while s
                .sent
                .front()
                .is_some_and(|t| t.elapsed() >= Duration::from_secs(60))
            {
                s.sent.pop_front();
            }
            if s.sent.len() < limit as usize {
                s.sent.push_back(Instant::now());
                true
            } else {
                false
            }
        })
    }

    /// One delivery of `rows` (one event, or a batch). Returns whether it succeeded.
    async fn attempt(
        &self,
        sink: &Sink,
        rows: &[OutboxRow],
        now: DateTime<Utc>,
        round: &mut Round,
    ) -> Result<bool, StoreError> {
        let events: Vec<Envelope> = rows.iter().map(|r| r.envelope.clone()).collect();
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let result = send(&self.http, sink, &events).await;
        let done = Utc::now();
        match result {
            Ok(()) => {
                self.store.outbox_delivered(ids, done).await?;
                round.delivered += rows.len();
                telemetry::metrics().delivery(&sink.name, DeliveryOutcome::Delivered);
                tracing::debug!(sink = %sink.name, events = rows.len(), "delivered");
                Ok(true)
            }
            Err(e) => {
                let attempts = rows.iter().map(|r| r.attempts).max().unwrap_or(0) + 1;
                let oldest = rows.iter().map(|r| r.created_at).min().unwrap_or(now);
                let max_age = chrono::Duration::from_std(sink.delivery.max_age).unwrap_or_default();
                let next = match &e {
                    DeliveryError::Permanent(_) => None,
                    DeliveryError::Retry { .. } if done - oldest >= max_age => None,
                    DeliveryError::Retry { retry_after, .. } => {
                        let wait = backoff(attempts, sink.delivery.retry_max_interval)
                            .max(retry_after.unwrap_or_default());
                        Some(done + chrono::Duration::from_std(wait).unwrap_or_default())
                    }
                };
                let reason = e.to_string();
                match next {
                    Some(at) => {
                        tracing::warn!(
                            sink = %sink.name,
                            events = rows.len(),
                            attempts,
                            cause = %reason,
                            "delivery failed; will retry"
                        );
                        self.with_state(&sink.name, |s| s.paused_until = Some(at));
                        note_due(round, at);
                        round.retried += rows.len();
                        telemetry::metrics().delivery(&sink.name, DeliveryOutcome::Retry);
                    }
                    None => {
                        for r in rows {
                            tracing::error!(
                                sink = %sink.name,
                                event.id = %r.envelope.id,
                                attempts,
                                cause = %reason,
                                "alert undeliverable; marked dead"
                            );
                        }
                        round.dead += rows.len();
                        telemetry::metrics().delivery(&sink.name, DeliveryOutcome::Dead);
                    }
                }
                self.store.outbox_failed(ids, reason, next, done).await?;
                Ok(false)
            }
        }
    }

    /// Delivers until nothing is due now or `limit` has passed; what is left stays in the
    /// outbox for the next run.
    pub async fn drain(&self, limit: Duration) -> Result<Round, StoreError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut total = Round::default();
        loop {
            let round = tokio::time::timeout_at(deadline, self.round(true)).await;
            let Ok(round) = round else { break };
            let round = round?;
            total.delivered += round.delivered;
            total.retried += round.retried;
            total.dead += round.dead;
            total.waiting = round.waiting;
            total.next_due = round.next_due;
            // A round that delivered something may have unblocked the next row of a chain.
            if round.delivered == 0 {
                break;
            }
        }
        Ok(total)
    }

    /// Delivers continuously until `stop`: at once when `wake` is notified (new rows), and
    /// when the next row becomes due.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, wake: Arc<Notify>) {
        loop {
            let wait = match self.round(false).await {
                Ok(r) if r.delivered > 0 => Duration::ZERO,
                Ok(r) => r
                    .next_due
                    .and_then(|t| (t - Utc::now()).to_std().ok())
                    .unwrap_or(MAX_IDLE)
                    .min(MAX_IDLE),
                Err(e) => {
                    let cause = crate::cycle::error_chain(&e);
                    tracing::error!(cause = %cause, "reading the outbox failed");
                    MAX_IDLE
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn note_due(round: &mut Round, at: DateTime<Utc>) {
    round.next_due = Some(round.next_due.map_or(at, |d| d.min(at)));
}

/// 1 s, 2 s, 4 s, … up to `cap`, each with up to 20 % jitter so that retries of many rows
/// do not arrive together.
fn backoff(attempts: i64, cap: Duration) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempts.clamp(1, 20).saturating_sub(1) as u32);
    exp.min(cap)
        .mul_f64(1.0 + fastrand::f64() * 0.2)
        .min(cap.max(BACKOFF_BASE))
}

/// A clearly labelled event for `alert test`.
pub fn test_event(sink: &Sink) -> Envelope {
    let labels = BTreeMap::new();
    let ctx = crate::event::EnvelopeContext {
        source: crate::event::source_for_host(),
        watch: "driftwatch-test",
        registry: "driftwatch.invalid",
        repository: "driftwatch/test",
        tag: Some("test"),
        labels: &labels,
        detected_by: crate::event::DetectedBy::Poll,
        time: Utc::now(),
    };
    let mut change = crate::event::Change::new(
        EventType::TagMoved,
        "driftwatch.invalid/driftwatch/test:test",
    );
    change.severity = crate::event::Severity::Info;
    change.detail = serde_json::json!({
        "test": true,
        "message": format!(
            "a test alert sent by `driftwatch alert test --sink {}`; ignore it",
            sink.name
        ),
    });
    let mut e = Envelope::new(change, &ctx);
    e.kind = "driftwatch.test".to_string();
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(kind: EventType) -> Envelope {
        let digest = crate::model::Digest::sha256_of(b"a");
        let mut change = crate::event::Change::new(kind, "r.io/team/api:prod");
        change.previous = Some(crate::event::StateSummary {
            digest,
            media_type: String::new(),
            platforms: vec![],
            referrers: vec![],
        });
        let labels = BTreeMap::new();
        let ctx = crate::event::EnvelopeContext {
            source: "driftwatch://test",
            watch: "api",
            registry: "r.io",
            repository: "team/api",
            tag: Some("prod"),
            labels: &labels,
            detected_by: crate::event::DetectedBy::Poll,
            time: Utc::now(),
        };
        Envelope::new(change, &ctx)
    }

    #[test]
    fn recurrences_of_a_change_get_their_own_dedupe_key_but_tag_flaps_do_not() {
        let (t1, t2) = (Utc::now(), Utc::now() + chrono::Duration::seconds(60));
        let lock = envelope(EventType::AttributesChanged);
        assert_eq!(dedupe_key(&lock, Some(t1)), dedupe_key(&lock, Some(t1)));
        assert_ne!(dedupe_key(&lock, Some(t1)), dedupe_key(&lock, Some(t2)));
        let moved = envelope(EventType::TagMoved);
        assert_eq!(dedupe_key(&moved, Some(t1)), dedupe_key(&moved, Some(t2)));
        let health = envelope(EventType::CheckFailing);
        let mut health = health;
        health.data.previous = None;
        assert_eq!(dedupe_key(&health, Some(t1)), None);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let cap = Duration::from_secs(30);
        let b1 = backoff(1, cap);
        assert!(
            b1 >= Duration::from_secs(1) && b1 <= Duration::from_millis(1200),
            "{b1:?}"
        );
        let b3 = backoff(3, cap);
        assert!(
            b3 >= Duration::from_secs(4) && b3 <= Duration::from_millis(4800),
            "{b3:?}"
        );
        assert!(backoff(12, cap) <= cap);
    }
}
