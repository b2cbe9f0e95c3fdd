//! The daemon's HTTP endpoints: liveness, readiness (with the reasons when not ready), and
//! the status of every watch.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use chrono::{SecondsFormat, Utc};
use serde_json::json;

use crate::config::Config;
use crate::schedule::View;
use crate::store::Store;

/// Whether the daemon is ready, and if not, why.
#[derive(Debug, Default, Clone)]
pub struct Health {
    /// Config and state are loaded and the last reload succeeded.
    pub ready: bool,
    /// `file: key: message` lines explaining why not.
    pub problems: Vec<String>,
}

/// What the handlers read.
#[derive(Clone)]
pub struct ServerState {
    /// Readiness.
    pub health: Arc<RwLock<Health>>,
    /// The config in force.
    pub config: Arc<RwLock<Arc<Config>>>,
    /// The scheduler's view.
    pub view: Arc<View>,
    /// The state store.
    pub store: Store,
}

/// The router.
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/watches", get(watches))
        .with_state(state)
}

async fn readyz(State(s): State<ServerState>) -> impl IntoResponse {
    let h = s.health.read().unwrap_or_else(|e| e.into_inner()).clone();
    let status = if h.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"ready": h.ready, "problems": h.problems})),
    )
}

async fn watches(State(s): State<ServerState>) -> axum::response::Response {
    let rows = match s.store.watch_rows().await {
        Ok(rows) => rows,
        Err(e) => {
            let msg = crate::cycle::error_chain(&e);
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": msg})),
            )
                .into_response();
        }
    };
    let mut rows: HashMap<String, crate::store::WatchRow> =
        rows.into_iter().map(|r| (r.name.clone(), r)).collect();
    let config = s.config.read().unwrap_or_else(|e| e.into_inner()).clone();
    let plan = s
        .view
        .plan
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let now = Utc::now();
    // Typed and borrowed: ten thousand watches would be tens of megabytes as JSON values.
    let list: Vec<WatchStatus<'_>> = config
        .watches
        .iter()
        .map(|w| {
            // A row whose reference differs belongs to the watch's previous image.
            let row = rows
                .remove(&w.name)
                .filter(|r| r.reference == w.reference.to_string());
            WatchStatus {
                name: &w.name,
                image: w.reference.to_string(),
                schedule: &w.schedule,
                labels: &w.labels,
                digest: row.as_ref().and_then(|r| r.digest.clone()),
                checked_at: row.as_ref().and_then(|r| r.checked_at.clone()),
                outcome: row.as_ref().and_then(|r| r.outcome.clone()),
                last_error: row.as_ref().and_then(|r| r.last_error.clone()),
                consecutive_failures: row.as_ref().map_or(0, |r| r.consecutive_failures),
                next_due: plan
                    .next_due(&w.name, now)
                    .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true)),
            }
        })
        .collect();
    let body = match serde_json::to_vec(&Watches { watches: list }) {
        Ok(b) => b,
        Err(e) => {
            let msg = e.to_string();
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": msg})),
            )
                .into_response();
        }
    };
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

#[derive(serde::Serialize)]
struct Watches<'a> {
    watches: Vec<WatchStatus<'a>>,
}

/// One watch in `/v1/watches`.
#[derive(serde::Serialize)]
struct WatchStatus<'a> {
    name: &'a str,
    image: String,
    schedule: &'a str,
    labels: &'a std::collections::BTreeMap<String, String>,
    digest: Option<String>,
    checked_at: Option<String>,
    outcome: Option<String>,
    last_error: Option<String>,
    consecutive_failures: i64,
    next_due: Option<String>,
}
