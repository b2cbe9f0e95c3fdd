//! The state store: the latest resolution and bounded history per watch, events, and the
//! outbox of deliveries, in an embedded SQLite file. A check's resolution, events and outbox
//! rows commit in one transaction. Calls run on the blocking pool, never on async workers.

mod outbox;
mod schema;

pub use outbox::{OutboxCounts, OutboxRow};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::diff::WatchState;
use crate::event::Envelope;
use crate::model::Resolution;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened or is not a usable SQLite database.
    #[error("cannot open state file {}", path.display())]
    Open {
        /// The state file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The file was written by a newer driftwatch.
    #[error(
        "state file {} has schema version {found}, newer than this build knows ({known}); \
         refusing to touch it: run a newer driftwatch or point daemon.state elsewhere",
        path.display()
    )]
    TooNew {
        /// The state file.
        path: PathBuf,
        /// Version in the file.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
    /// A query failed.
    #[error("state store query failed")]
    Query(#[from] rusqlite::Error),
    /// A stored document could not be read or written.
    #[error("stored JSON is unreadable")]
    Json(#[from] serde_json::Error),
    /// The blocking task died.
    #[error("state store task failed: {0}")]
    Task(String),
}

/// The embedded SQLite store.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

/// One event to store, with the sinks it is routed to.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// The envelope, exactly as delivered.
    pub envelope: Envelope,
    /// Whether it came from a watch's first resolution.
    pub baseline: bool,
    /// Sinks that get an outbox row.
    pub sinks: Vec<String>,
    /// Rows whose sink already has this key are not added: the same change is never sent
    /// to a sink twice.
    pub dedupe_key: Option<String>,
}

/// Everything one check writes, committed together.
#[derive(Debug, Clone)]
pub struct CheckRecord {
    /// The watch.
    pub watch: String,
    /// Its reference as configured now.
    pub reference: String,
    /// When the check ran.
    pub checked_at: DateTime<Utc>,
    /// `ok` or `failed`.
    pub outcome: &'static str,
    /// Why it failed.
    pub error: Option<String>,
    /// The state after the check.
    pub state: WatchState,
    /// Whether to write a history row for `state.last`.
    pub new_resolution: bool,
    /// Events of this check.
    pub events: Vec<StoredEvent>,
}

/// A delivery's state, for `history`.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    /// The sink.
    pub sink: String,
    /// `pending`, `delivered` or `dead`.
    pub status: String,
    /// Attempts so far.
    pub attempts: i64,
    /// The last error.
    pub last_error: Option<String>,
}

/// One item of `history`, newest first.
#[derive(Debug, Clone)]
pub enum HistoryItem {
    /// A stored event and its deliveries.
    Event {
        /// Detection time.
        time: String,
        /// The envelope.
        envelope: Box<Envelope>,
        /// Outbox rows.
        deliveries: Vec<Delivery>,
    },
    /// A stored resolution.
    Resolution {
        /// The watch.
        watch: String,
        /// When.
        time: String,
        /// The digest it stands for.
        digest: Option<String>,
        /// The evidence.
        evidence: Box<Resolution>,
    },
}

impl HistoryItem {
    fn time(&self) -> &str {
        match self {
            HistoryItem::Event { time, .. } | HistoryItem::Resolution { time, .. } => time,
        }
    }
}

/// Status of one watch, for status output.
#[derive(Debug, Clone, Serialize)]
pub struct WatchRow {
    /// The watch.
    pub name: String,
    /// Its reference.
    pub reference: String,
    /// The digest of its latest resolution.
    pub digest: Option<String>,
    /// When it was last checked.
    pub checked_at: Option<String>,
    /// `ok` or `failed`.
    pub outcome: Option<String>,
    /// Why the last check failed.
    pub last_error: Option<String>,
    /// Failures since the last success.
    pub consecutive_failures: i64,
}

fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Store {
    /// Opens (creating if needed) the state file and migrates it to the current schema.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        let path = path.to_path_buf();
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || open_blocking(&p))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// The stored state of each watch. A watch whose stored reference differs from the one
    /// given (its config changed) starts again from a baseline.
    pub async fn load_states(
        &self,
        watches: Vec<(String, String)>,
    ) -> Result<HashMap<String, WatchState>, StoreError> {
        self.with(move |conn| {
            // One read transaction for all of them, rather than a lock round trip per watch.
            let tx = conn.transaction()?;
            let mut stmt = tx.prepare_cached(
                "SELECT w.reference, w.consecutive_failures, w.failing, r.evidence
                 FROM watches w LEFT JOIN resolutions r ON r.id = w.last_resolution
                 WHERE w.name = ?1",
            )?;
            let mut out = HashMap::with_capacity(watches.len());
            for (name, reference) in watches {
                let row = stmt
                    .query_row([&name], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, bool>(2)?,
                            r.get::<_, Option<String>>(3)?,
                        ))
                    })
                    .optional()?;
                let state = match row {
                    Some((stored_ref, failures, failing, evidence)) if stored_ref == reference => {
                        WatchState {
                            last: evidence.map(|e| serde_json::from_str(&e)).transpose()?,
                            consecutive_failures: failures.max(0) as u32,
                            failing,
                        }
                    }
                    _ => WatchState::default(),
                };
                out.insert(name, state);
            }
            drop(stmt);
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// Commits the checks: each one's resolution, events and outbox rows, all in one
    /// transaction. Keeps at most `history_limit` resolutions per watch.
    pub async fn commit(
        &self,
        records: Vec<CheckRecord>,
        history_limit: u32,
    ) -> Result<(), StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction()?;
            for rec in &records {
                commit_one(&tx, rec, history_limit)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Stored events and resolutions, newest first.
    pub async fn history(
        &self,
        watch: Option<String>,
        limit: usize,
    ) -> Result<Vec<HistoryItem>, StoreError> {
        self.with(move |conn| history_blocking(conn, watch.as_deref(), limit))
            .await
    }

    /// Every watch row, by name.
    pub async fn watch_rows(&self) -> Result<Vec<WatchRow>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT w.name, w.reference, r.digest, w.checked_at, w.outcome, w.last_error,
                        w.consecutive_failures
                 FROM watches w LEFT JOIN resolutions r ON r.id = w.last_resolution
                 ORDER BY w.name",
            )?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(WatchRow {
                        name: r.get(0)?,
                        reference: r.get(1)?,
                        digest: r.get(2)?,
                        checked_at: r.get(3)?,
                        outcome: r.get(4)?,
                        last_error: r.get(5)?,
                        consecutive_failures: r.get(6)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }
}

/// How long a statement waits for another process's lock before giving up.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn open_blocking(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
    )
    .map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    // Reading the version first fails on a file that is not a database, before anything is
    // written to it.
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(open_err)?;
    let known = schema::MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known,
        });
    }
    // Switching a new file to WAL takes an exclusive lock, and SQLite reports a concurrent
    // switch as busy without waiting on the busy handler; so wait here.
    let started = std::time::Instant::now();
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Ok(()) => break,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && started.elapsed() < BUSY_TIMEOUT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(open_err(e)),
        }
    }
    // FULL makes every commit durable before it is acknowledged, so a delivered alert can
    // always be matched to its stored event, even after a power loss.
    // The page cache is per connection; the working set (latest rows per watch) is small.
    conn.pragma_update(None, "cache_size", -1024)
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;

    // Each step re-reads the version under the write lock: another process (a `check` next
    // to the daemon) may be migrating the same file at the same moment.
    loop {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(open_err)?;
        let current: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(open_err)?;
        if current > known {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: current,
                known,
            });
        }
        if current == known {
            break;
        }
        tx.execute_batch(schema::MIGRATIONS[current as usize])
            .map_err(open_err)?;
        tx.pragma_update(None, "user_version", current + 1)
            .map_err(open_err)?;
        tx.commit().map_err(open_err)?;
    }
    Ok(conn)
}

fn commit_one(
    tx: &rusqlite::Transaction<'_>,
    rec: &CheckRecord,
    history_limit: u32,
) -> Result<(), StoreError> {
    let checked_at = rfc3339(&rec.checked_at);
    let mut new_id: Option<i64> = None;
    if rec.new_resolution
        && let Some(res) = &rec.state.last
    {
        let evidence = serde_json::to_string(res)?;
        tx.prepare_cached(
            "INSERT INTO resolutions (watch, time, digest, evidence) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![
            rec.watch,
            rfc3339(&res.time),
            res.digest().map(|d| d.to_string()),
            evidence
        ])?;
        new_id = Some(tx.last_insert_rowid());
        tx.prepare_cached(
            "DELETE FROM resolutions WHERE watch = ?1 AND id <= (
                     SELECT id FROM resolutions WHERE watch = ?1
                     ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        )?
        .execute(params![rec.watch, history_limit as i64])?;
    }
    tx.prepare_cached(
        "INSERT INTO watches (name, reference, last_resolution, checked_at, outcome, last_error,
                              consecutive_failures, failing)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (name) DO UPDATE SET
             last_resolution = CASE
                 WHEN excluded.last_resolution IS NOT NULL THEN excluded.last_resolution
                 WHEN watches.reference != excluded.reference THEN NULL
                 ELSE watches.last_resolution END,
             reference = excluded.reference,
             checked_at = excluded.checked_at,
             outcome = excluded.outcome,
             last_error = excluded.last_error,
             consecutive_failures = excluded.consecutive_failures,
             failing = excluded.failing",
    )?
    .execute(params![
        rec.watch,
        rec.reference,
        new_id,
        checked_at,
        rec.outcome,
        rec.error,
        rec.state.consecutive_failures as i64,
        rec.state.failing
    ])?;
    for ev in &rec.events {
        let envelope = serde_json::to_string(&ev.envelope)?;
        tx.prepare_cached(
            "INSERT INTO events (id, watch, type, time, baseline, envelope)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            ev.envelope.id,
            rec.watch,
            ev.envelope.kind,
            ev.envelope.time,
            ev.baseline,
            envelope
        ])?;
        for sink in &ev.sinks {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO outbox (event_id, sink, next_attempt_at, created_at,
                                               dedupe_key)
                 VALUES (?1, ?2, ?3, ?3, ?4)",
            )?
            .execute(params![ev.envelope.id, sink, checked_at, ev.dedupe_key])?;
        }
    }
    Ok(())
}

fn history_blocking(
    conn: &Connection,
    watch: Option<&str>,
    limit: usize,
) -> Result<Vec<HistoryItem>, StoreError> {
    let limit_sql = limit as i64;
    let mut items = Vec::new();

    let mut events = conn.prepare(
        "SELECT id, time, envelope FROM events WHERE (?1 IS NULL OR watch = ?1)
         ORDER BY seq DESC LIMIT ?2",
    )?;
    let mut deliveries = conn.prepare_cached(
        "SELECT sink, attempts, last_error, delivered_at, dead_at FROM outbox
         WHERE event_id = ?1 ORDER BY sink",
    )?;
    let rows = events
        .query_map(params![watch, limit_sql], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (id, time, envelope) in rows {
        let d = deliveries
            .query_map([&id], |r| {
                let delivered: Option<String> = r.get(3)?;
                let dead: Option<String> = r.get(4)?;
                let status = match (delivered, dead) {
                    (Some(_), _) => "delivered",
                    (None, Some(_)) => "dead",
                    (None, None) => "pending",
                };
                Ok(Delivery {
                    sink: r.get(0)?,
                    status: status.to_string(),
                    attempts: r.get(1)?,
                    last_error: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        items.push(HistoryItem::Event {
            time,
            envelope: Box::new(serde_json::from_str(&envelope)?),
            deliveries: d,
        });
    }

    let mut res = conn.prepare(
        "SELECT watch, time, digest, evidence FROM resolutions WHERE (?1 IS NULL OR watch = ?1)
         ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = res
        .query_map(params![watch, limit_sql], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (watch, time, digest, evidence) in rows {
        items.push(HistoryItem::Resolution {
            watch,
            time,
            digest,
            evidence: Box::new(serde_json::from_str(&evidence)?),
        });
    }

    // Both lists are newest first; RFC 3339 times in UTC sort as strings. At equal times the
    // events (already first in the vector) stay ahead of their resolution.
    items.sort_by(|a, b| b.time().cmp(a.time()));
    items.truncate(limit);
    Ok(items)
}

#[cfg(test)]
mod tests;
