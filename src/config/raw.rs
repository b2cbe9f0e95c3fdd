//! The config file's schema as written: every field optional, nothing checked yet. Unknown keys
//! are collected separately (see `load`), so that every one of them is reported, not the first.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawConfig {
    pub daemon: RawDaemon,
    pub registries: BTreeMap<String, RawRegistry>,
    pub watch: Vec<RawWatch>,
    pub sink: Vec<RawSink>,
    pub hooks: RawHooks,
    pub otel: RawOtel,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawDaemon {
    pub state: Option<String>,
    pub listen: Option<String>,
    pub schedule: Option<String>,
    pub concurrency: Option<i64>,
    pub alert_on_baseline: Option<bool>,
    pub failing_after: Option<i64>,
    pub history_limit: Option<i64>,
    pub request_timeout: Option<String>,
    pub jitter: Option<f64>,
    pub shutdown_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawRegistry {
    pub insecure: Option<bool>,
    pub ca_file: Option<String>,
    pub soft_delete_retention_days: Option<i64>,
    pub soft_delete_reminder: Option<String>,
    pub attributes_refresh: Option<String>,
    pub acr: Option<bool>,
    pub auth: Option<RawAuth>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawAuth {
    pub method: Option<String>,
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
    pub config_file: Option<String>,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_env: Option<String>,
    pub client_secret_file: Option<String>,
    pub client_certificate_file: Option<String>,
    pub authority_host: Option<String>,
    pub imds_endpoint: Option<String>,
    pub federated_token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawWatch {
    pub name: Option<String>,
    pub image: Option<String>,
    pub schedule: Option<String>,
    pub platforms: Option<Vec<String>>,
    pub referrers: Option<bool>,
    pub require_referrers: Option<Vec<String>>,
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawSink {
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub events: Option<Vec<String>>,
    pub min_severity: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    // webhook
    pub url: Option<String>,
    pub secret_env: Option<String>,
    pub secret_file: Option<String>,
    // email
    pub smtp: Option<String>,
    pub from: Option<String>,
    pub to: Option<Vec<String>>,
    pub batch_window: Option<String>,
    pub starttls: Option<String>,
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
    pub subject_prefix: Option<String>,
    // webhook
    pub format: Option<String>,
    pub headers: Option<BTreeMap<String, RawHeaderValue>>,
    pub timeout: Option<String>,
    // delivery
    pub max_age: Option<String>,
    pub retry_max_interval: Option<String>,
    pub max_per_minute: Option<i64>,
}

/// A header value: written out, or read from an environment variable or a file.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawHeaderValue {
    Plain(String),
    Env { env: String },
    File { file: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawHooks {
    pub acr: Option<RawHook>,
    pub eventgrid: Option<RawHook>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawHook {
    pub secret_env: Option<String>,
    pub secret_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawOtel {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
}
