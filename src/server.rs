//! The daemon's HTTP endpoints: liveness, readiness (with the reasons when not ready), the
//! status of every watch, and the inbound registry hooks that ask for an early check.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest as _, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use chrono::{SecondsFormat, Utc};
use secrecy::ExposeSecret as _;
use serde_json::json;

use crate::config::Config;
use crate::hooks::{self, Delivery, Notice};
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
    /// Asks the scheduler to check watches now, for the inbound hooks.
    pub trigger: Trigger,
}

/// Asks the scheduler to check the named watches at once, without waiting; the daemon's
/// trigger queues a webhook-detected check on the dispatcher.
pub type Trigger = Arc<dyn Fn(Vec<String>) -> Result<(), TriggerError> + Send + Sync>;

/// Why a trigger could not be queued; the hook's sender is told to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    /// The scheduler's queue is full.
    #[error("the scheduler's queue is full")]
    Full,
    /// The scheduler has stopped (the daemon is shutting down).
    #[error("the scheduler has stopped")]
    Stopped,
}

/// The router.
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/watches", get(watches))
        .route("/v1/hooks/acr", post(acr_hook))
        .route(
            "/v1/hooks/eventgrid",
            post(eventgrid_hook).options(eventgrid_handshake),
        )
        // Only the hooks take bodies; a larger one is answered 413 without being read whole.
        .layer(DefaultBodyLimit::max(hooks::MAX_BODY))
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

/// The header Event Grid names its delivery kind in.
const AEG_EVENT_TYPE: &str = "aeg-event-type";

fn current_config(s: &ServerState) -> Arc<Config> {
    s.config.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn authorized(headers: &HeaderMap, secret: &secrecy::SecretString) -> bool {
    let value = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    hooks::bearer_matches(value, secret.expose_secret())
}

/// An unconfigured hook is answered as if the route did not exist. Not a warning: scanners
/// probing the port would fill the log.
fn not_configured(hook: &'static str) -> Response {
    tracing::debug!(hook, "inbound hook not configured");
    let error = format!("no [hooks.{hook}] secret is configured");
    (StatusCode::NOT_FOUND, Json(json!({ "error": error }))).into_response()
}

/// Refuses a delivery; nothing is triggered. `why` must never contain a secret.
fn reject(hook: &'static str, status: StatusCode, why: String) -> Response {
    tracing::warn!(hook, status = status.as_u16(), reason = %why, "inbound hook rejected");
    let mut response = (status, Json(json!({ "error": why }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn unauthorized(hook: &'static str) -> Response {
    let why = "missing or wrong secret in `Authorization: Bearer <secret>`".to_string();
    reject(hook, StatusCode::UNAUTHORIZED, why)
}

fn body_too_large(hook: &'static str) -> Response {
    let why = format!("the body is larger than {} bytes", hooks::MAX_BODY);
    reject(hook, StatusCode::PAYLOAD_TOO_LARGE, why)
}

/// Reads a hook's body. An announced length over the cap is refused before anything is read;
/// a body without one is cut off at the cap by the router's limit.
async fn read_body(hook: &'static str, request: Request) -> Result<Bytes, Response> {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > hooks::MAX_BODY as u64) {
        return Err(body_too_large(hook));
    }
    Bytes::from_request(request, &()).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            body_too_large(hook)
        } else {
            let why = format!("the body could not be read: {}", r.body_text());
            reject(hook, r.status(), why)
        }
    })
}

/// Triggers the watches the notices concern and answers 202 with their names.
fn accept(s: &ServerState, config: &Config, hook: &'static str, notices: &[Notice]) -> Response {
    for n in notices {
        tracing::debug!(
            hook,
            action = n.action.as_str(),
            host = n.host.as_deref().or(n.registry_name.as_deref()).unwrap_or(""),
            repository = %n.repository,
            tag = n.tag.as_deref().unwrap_or(""),
            "registry notice"
        );
    }
    let names = hooks::matching_watches(config, notices);
    if !names.is_empty()
        && let Err(e) = (s.trigger)(names.clone())
    {
        // 503 rather than 202: the sender retries, and the change is not missed.
        tracing::warn!(hook, cause = %e, "inbound hook not queued; asking the sender to retry");
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": e.to_string() })),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    tracing::info!(
        hook,
        notices = notices.len(),
        triggered = names.len(),
        "inbound hook accepted"
    );
    (StatusCode::ACCEPTED, Json(json!({ "triggered": names }))).into_response()
}

/// `POST /v1/hooks/acr`: an ACR webhook.
async fn acr_hook(State(s): State<ServerState>, request: Request) -> Response {
    const HOOK: &str = "acr";
    // The config in force now, so that a reload changes the secret for the next request.
    let config = current_config(&s);
    let Some(secret) = &config.hooks.acr else {
        return not_configured(HOOK);
    };
    // The secret first: the body of an unauthenticated sender is never read.
    if !authorized(request.headers(), secret) {
        return unauthorized(HOOK);
    }
    let body = match read_body(HOOK, request).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    match hooks::parse_acr(&body) {
        Ok(notices) => accept(&s, &config, HOOK, &notices),
        Err(e) => reject(HOOK, StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// `POST /v1/hooks/eventgrid`: Event Grid deliveries in either schema, and the subscription
/// validation handshake.
async fn eventgrid_hook(State(s): State<ServerState>, request: Request) -> Response {
    const HOOK: &str = "eventgrid";
    let config = current_config(&s);
    let Some(secret) = &config.hooks.eventgrid else {
        return not_configured(HOOK);
    };
    let headers = request.headers().clone();
    let announced = headers
        .get(AEG_EVENT_TYPE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"SubscriptionValidation"));
    // Only the announced handshake is read without the secret; anything else from a sender
    // without it is refused before its body is parsed.
    let authorized = authorized(&headers, secret);
    if !announced && !authorized {
        return unauthorized(HOOK);
    }
    let body = match read_body(HOOK, request).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };

    // The handshake is answered without the secret: it only echoes the code back and
    // triggers nothing.
    let parsed = match hooks::parse_eventgrid(&body) {
        Ok(Delivery::Validation(code)) => {
            tracing::info!(hook = HOOK, "Event Grid subscription validation answered");
            return (StatusCode::OK, Json(json!({ "validationResponse": code }))).into_response();
        }
        Ok(Delivery::Notices(notices)) => Ok(notices),
        Err(e) => Err(e),
    };
    if announced {
        let why = match parsed {
            Err(e) => e.to_string(),
            Ok(_) => format!(
                "{AEG_EVENT_TYPE} is SubscriptionValidation but the body holds no {}",
                hooks::SUBSCRIPTION_VALIDATION_EVENT
            ),
        };
        return reject(HOOK, StatusCode::BAD_REQUEST, why);
    }

    if !authorized {
        return unauthorized(HOOK);
    }
    match parsed {
        Ok(notices) => accept(&s, &config, HOOK, &notices),
        Err(e) => reject(HOOK, StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// `OPTIONS /v1/hooks/eventgrid`: the CloudEvents abuse-protection handshake. Any origin is
/// allowed, since deliveries still need the secret; a requested rate is not limited.
async fn eventgrid_handshake(State(s): State<ServerState>, headers: HeaderMap) -> Response {
    const HOOK: &str = "eventgrid";
    if current_config(&s).hooks.eventgrid.is_none() {
        return not_configured(HOOK);
    }
    let Some(origin) = headers
        .get("webhook-request-origin")
        .filter(|v| !v.is_empty())
    else {
        let why = "an OPTIONS request needs a WebHook-Request-Origin header".to_string();
        return reject(HOOK, StatusCode::BAD_REQUEST, why);
    };
    let mut response = StatusCode::OK.into_response();
    let h = response.headers_mut();
    h.insert("webhook-allowed-origin", origin.clone());
    if headers.contains_key("webhook-request-rate") {
        h.insert("webhook-allowed-rate", HeaderValue::from_static("*"));
    }
    h.insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
    tracing::info!(hook = HOOK, "CloudEvents webhook handshake answered");
    response
}
