//! The outbox side of the store: pending deliveries in detection order, and recording what
//! each attempt did. Rows are never deleted; `history` shows their final state.

use chrono::{DateTime, Utc};
use rusqlite::params;

use super::{Store, StoreError, rfc3339};
use crate::event::Envelope;

/// One pending delivery.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Row id.
    pub id: i64,
    /// The sink.
    pub sink: String,
    /// The watch of the event.
    pub watch: String,
    /// Detection order of the event.
    pub seq: i64,
    /// Attempts so far.
    pub attempts: i64,
    /// When the next attempt is due.
    pub next_attempt_at: DateTime<Utc>,
    /// When the row was stored.
    pub created_at: DateTime<Utc>,
    /// The event.
    pub envelope: Envelope,
}

/// Outbox totals, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxCounts {
    /// Not yet delivered and not dead.
    pub pending: i64,
    /// Given up.
    pub dead: i64,
}

fn parse_time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}

impl Store {
    /// Undelivered rows, by sink, then watch, then detection order; at most `limit`.
    pub async fn pending_outbox(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT o.id, o.sink, e.watch, e.seq, o.attempts, o.next_attempt_at,
                        COALESCE(o.created_at, o.next_attempt_at), e.envelope
                 FROM outbox o JOIN events e ON e.id = o.event_id
                 WHERE o.delivered_at IS NULL AND o.dead_at IS NULL
                 ORDER BY o.sink, e.watch, e.seq
                 LIMIT ?1",
            )?;
            let rows = stmt
                .query_map([limit as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, String>(7)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(
                    |(id, sink, watch, seq, attempts, next, created, envelope)| {
                        Ok(OutboxRow {
                            id,
                            sink,
                            watch,
                            seq,
                            attempts,
                            next_attempt_at: parse_time(&next),
                            created_at: parse_time(&created),
                            envelope: serde_json::from_str(&envelope)?,
                        })
                    },
                )
                .collect()
        })
        .await
    }

    /// Marks rows delivered.
    pub async fn outbox_delivered(
        &self,
        ids: Vec<i64>,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction()?;
            for id in &ids {
                tx.prepare_cached(
                    "UPDATE outbox SET delivered_at = ?2, attempts = attempts + 1,
                                       last_error = NULL
                     WHERE id = ?1",
                )?
                .execute(params![id, rfc3339(&at)])?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Records a failed attempt: the next one is due at `next`, or the rows are dead.
    pub async fn outbox_failed(
        &self,
        ids: Vec<i64>,
        error: String,
        next: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction()?;
            for id in &ids {
                match next {
                    Some(next) => tx
                        .prepare_cached(
                            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2,
                                               next_attempt_at = ?3
                             WHERE id = ?1",
                        )?
                        .execute(params![id, error, rfc3339(&next)])?,
                    None => tx
                        .prepare_cached(
                            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2,
                                               dead_at = ?3
                             WHERE id = ?1",
                        )?
                        .execute(params![id, error, rfc3339(&at)])?,
                };
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Pending and dead row counts.
    pub async fn outbox_counts(&self) -> Result<OutboxCounts, StoreError> {
        self.with(|conn| {
            let (pending, dead) = conn.query_row(
                "SELECT COALESCE(SUM(delivered_at IS NULL AND dead_at IS NULL), 0),
                        COALESCE(SUM(dead_at IS NOT NULL), 0)
                 FROM outbox",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok(OutboxCounts { pending, dead })
        })
        .await
    }
}
