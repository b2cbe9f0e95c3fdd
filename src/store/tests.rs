//! Store tests on real SQLite files in a temporary directory.

use chrono::TimeZone;

use super::*;
use crate::event::{Change, DetectedBy, EnvelopeContext, EventType};
use crate::model::{Digest, ManifestEvidence, Observation, ObtainedBy};

fn resolution(c: char) -> Resolution {
    Resolution {
        time: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
        tag: Some(Observation::Present(ManifestEvidence {
            digest: Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 1,
            platforms: vec![],
            attestations: vec![],
            config: None,
            layers: vec![],
            annotations: Default::default(),
            artifact_type: None,
            subject: None,
            referrers: vec![],
            referrers_etag: None,
            attributes: None,
            obtained_by: ObtainedBy::Get,
        })),
        pinned: None,
    }
}

fn record(watch: &str, reference: &str, c: char, events: Vec<StoredEvent>) -> CheckRecord {
    CheckRecord {
        watch: watch.into(),
        reference: reference.into(),
        checked_at: Utc::now(),
        outcome: "ok",
        error: None,
        state: WatchState {
            last: Some(resolution(c)),
            consecutive_failures: 0,
            failing: false,
        },
        new_resolution: true,
        events,
    }
}

fn event(kind: EventType, sinks: &[&str]) -> StoredEvent {
    let labels = Default::default();
    let ctx = EnvelopeContext {
        source: "driftwatch://test",
        watch: "w",
        registry: "r.io",
        repository: "team/api",
        tag: Some("prod"),
        labels: &labels,
        detected_by: DetectedBy::Poll,
        time: Utc::now(),
    };
    StoredEvent {
        envelope: Envelope::new(Change::new(kind, "r.io/team/api:prod"), &ctx),
        baseline: false,
        sinks: sinks.iter().map(|s| s.to_string()).collect(),
        dedupe_key: None,
    }
}

#[tokio::test]
async fn committed_state_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let store = Store::open(&path).await.unwrap();
        let rec = record(
            "w",
            "r.io/team/api:prod",
            'a',
            vec![event(EventType::TagCreated, &["hook"])],
        );
        store.commit(vec![rec], 10).await.unwrap();
    }
    let store = Store::open(&path).await.unwrap();
    let states = store
        .load_states(vec![("w".into(), "r.io/team/api:prod".into())])
        .await
        .unwrap();
    assert_eq!(states["w"].last, Some(resolution('a')));
    let history = store.history(None, 10).await.unwrap();
    assert_eq!(history.len(), 2);
    match &history[0] {
        HistoryItem::Event { deliveries, .. } => {
            assert_eq!(deliveries.len(), 1);
            assert_eq!(deliveries[0].status, "pending");
        }
        other => panic!("expected the event first, got {other:?}"),
    }
}

#[tokio::test]
async fn a_changed_reference_starts_from_a_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).await.unwrap();
    store
        .commit(vec![record("w", "r.io/a:1", 'a', vec![])], 10)
        .await
        .unwrap();
    let states = store
        .load_states(vec![("w".into(), "r.io/a:2".into())])
        .await
        .unwrap();
    assert_eq!(states["w"], WatchState::default());
}

#[tokio::test]
async fn history_is_bounded_per_watch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).await.unwrap();
    for c in ['a', 'b', 'c', 'd'] {
        store
            .commit(vec![record("w", "r.io/a:1", c, vec![])], 2)
            .await
            .unwrap();
    }
    let history = store.history(Some("w".into()), 10).await.unwrap();
    assert_eq!(history.len(), 2);
    let states = store
        .load_states(vec![("w".into(), "r.io/a:1".into())])
        .await
        .unwrap();
    assert_eq!(states["w"].last, Some(resolution('d')));
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let garbage = b"this is not an sqlite database, and it must stay as it is".repeat(100);
    std::fs::write(&path, &garbage).unwrap();
    let err = Store::open(&path)
        .await
        .err()
        .expect("a garbage file must not open");
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
}

#[tokio::test]
async fn a_file_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let err = Store::open(&path)
        .await
        .err()
        .expect("a newer schema must not open");
    assert!(
        matches!(err, StoreError::TooNew { found: 99, .. }),
        "{err:?}"
    );
    let conn = Connection::open(&path).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 99);
}

#[tokio::test]
async fn a_failed_transaction_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).await.unwrap();
    let ev = event(EventType::TagMoved, &["hook"]);
    let dup = ev.clone();
    // The second record reuses the event id, so the commit fails half way; the first record
    // must not be visible afterwards.
    let result = store
        .commit(
            vec![
                record("a", "r.io/a:1", 'a', vec![ev]),
                record("b", "r.io/b:1", 'b', vec![dup]),
            ],
            10,
        )
        .await;
    assert!(result.is_err());
    assert!(store.history(None, 10).await.unwrap().is_empty());
    assert!(store.watch_rows().await.unwrap().is_empty());
}

#[test]
fn two_processes_opening_a_new_file_at_once_both_succeed() {
    // The daemon and a `check` may migrate the same new file at the same moment.
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || open_blocking(&p).map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join().unwrap().expect("a concurrent open must succeed");
        }
    }
}
