//! Versioned schema migrations, applied in order at open. `PRAGMA user_version` records the
//! version a file is at; a file from a newer build is refused rather than touched.

/// Each entry migrates from version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: watches, resolutions, events, outbox.
    r#"
    CREATE TABLE watches (
        name                 TEXT PRIMARY KEY,
        reference            TEXT NOT NULL,
        last_resolution      INTEGER,
        checked_at           TEXT,
        outcome              TEXT,
        last_error           TEXT,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        failing              INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE resolutions (
        id       INTEGER PRIMARY KEY,
        watch    TEXT NOT NULL,
        time     TEXT NOT NULL,
        digest   TEXT,
        evidence TEXT NOT NULL
    );
    CREATE INDEX resolutions_by_watch ON resolutions (watch, id);
    CREATE TABLE events (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        id       TEXT NOT NULL UNIQUE,
        watch    TEXT NOT NULL,
        type     TEXT NOT NULL,
        time     TEXT NOT NULL,
        baseline INTEGER NOT NULL,
        envelope TEXT NOT NULL
    );
    CREATE INDEX events_by_watch ON events (watch, seq);
    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY,
        event_id        TEXT NOT NULL,
        sink            TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        last_error      TEXT,
        delivered_at    TEXT,
        dead_at         TEXT,
        claimed_until   TEXT,
        UNIQUE (event_id, sink)
    );
    CREATE INDEX outbox_pending ON outbox (sink, delivered_at, dead_at, next_attempt_at);
    "#,
    // 2: when a row was stored (for its maximum age), and a key that keeps the same change
    // from reaching a sink twice.
    r#"
    ALTER TABLE outbox ADD COLUMN created_at TEXT;
    UPDATE outbox SET created_at = next_attempt_at WHERE created_at IS NULL;
    ALTER TABLE outbox ADD COLUMN dedupe_key TEXT;
    CREATE UNIQUE INDEX outbox_dedupe ON outbox (sink, dedupe_key);
    CREATE INDEX outbox_undelivered ON outbox (delivered_at, dead_at);
    "#,
];
