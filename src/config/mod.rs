//! Configuration in two phases: `load` reads and merges the raw documents (files, `conf.d`,
//! environment), then `validate` turns them into one immutable [`Config`] that everything
//! downstream takes. Every problem is collected, each naming its file and key.

mod load;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

use crate::event::Severity;
use crate::model::Reference;

pub use load::conf_d;
pub(crate) use validate::is_acr_host;

/// Where the config file is looked for when neither `--config` nor `$DRIFTWATCH_CONFIG` says.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/driftwatch/driftwatch.toml";
/// Default SQLite state file name, inside `$STATE_DIRECTORY` or the working directory.
pub const DEFAULT_STATE: &str = "driftwatch.db";
/// Default address of the daemon's HTTP endpoints.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
/// Default cron schedule: every five minutes, at second 0.
pub const DEFAULT_SCHEDULE: &str = "0 */5 * * * *";
/// Default number of in-flight requests per registry.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Default number of consecutive failed checks before `check.failing`.
pub const DEFAULT_FAILING_AFTER: u32 = 3;
/// Default number of stored resolutions kept per watch.
pub const DEFAULT_HISTORY_LIMIT: u32 = 100;
/// Default timeout of one registry request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default fraction of a schedule's interval over which its checks are spread.
pub const DEFAULT_JITTER: f64 = 0.5;
/// Default bound on how long shutdown waits for running checks.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default ACR soft-delete retention, used for purge-time estimates.
pub const DEFAULT_SOFT_DELETE_RETENTION_DAYS: u32 = 7;
/// Default interval at which a running daemon re-reads the attributes of the manifest under
/// an unchanged watched tag.
pub const DEFAULT_ATTRIBUTES_REFRESH: Duration = Duration::from_secs(3600);
/// Default lead time of the reminder before a soft-deleted digest's expected purge.
pub const DEFAULT_SOFT_DELETE_REMINDER: Duration = Duration::from_secs(24 * 3600);
/// Default window in which an email sink folds events into one mail.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_secs(30);
/// Default age after which an undeliverable alert is given up (marked dead).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Default cap on the wait between two delivery attempts.
pub const DEFAULT_RETRY_MAX_INTERVAL: Duration = Duration::from_secs(30);
/// Default timeout of one webhook request or SMTP session.
pub const DEFAULT_SINK_TIMEOUT: Duration = Duration::from_secs(10);

/// One problem with the configuration, printed as `FILE: KEY: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (or `environment VAR`) the key came from.
    pub file: String,
    /// The key, e.g. `watch[1].schedule`.
    pub key: String,
    /// What is wrong, with a correct example where one helps.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.message)
        }
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A config file or directory could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not valid TOML.
    #[error("{file}: line {line}, column {column}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The documents parsed but their contents are invalid.
    #[error("{} problem(s) in the configuration", .0.len())]
    Invalid(Vec<Problem>),
    /// The merged document could not be rebuilt; a bug rather than bad input.
    #[error("internal error while merging the configuration: {0}")]
    Internal(String),
}

impl ConfigError {
    /// One line per problem, as `config validate` prints them.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(problems) => problems.iter().map(ToString::to_string).collect(),
            ConfigError::Read { path, source } => {
                vec![format!("{}: cannot read: {source}", path.display())]
            }
            other => vec![other.to_string()],
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[daemon]`.
    pub daemon: Daemon,
    /// `[registries."HOST[:PORT]"]`, keyed as written in references.
    pub registries: BTreeMap<String, RegistrySettings>,
    /// `[[watch]]` entries, in file order (main file, then `conf.d` in name order).
    /// Shared, so that the scheduler's groups point at them instead of copying them.
    pub watches: Vec<std::sync::Arc<Watch>>,
    /// `[[sink]]` entries.
    pub sinks: Vec<Sink>,
    /// `[hooks.*]`.
    pub hooks: Hooks,
    /// `[otel]`.
    pub otel: Otel,
    /// Every file that was read, main file first.
    pub files: Vec<PathBuf>,
}

/// `[daemon]` settings.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Where state is kept. Default [`DEFAULT_STATE`].
    pub state: PathBuf,
    /// HTTP listen address. Default [`DEFAULT_LISTEN`].
    pub listen: SocketAddr,
    /// Default cron schedule (six fields, seconds first). Default [`DEFAULT_SCHEDULE`].
    pub schedule: String,
    /// In-flight requests per registry. Default [`DEFAULT_CONCURRENCY`].
    pub concurrency: usize,
    /// Whether first resolutions are routed to sinks. Default false.
    pub alert_on_baseline: bool,
    /// Consecutive failures before `check.failing`. Default [`DEFAULT_FAILING_AFTER`].
    pub failing_after: u32,
    /// Stored resolutions kept per watch. Default [`DEFAULT_HISTORY_LIMIT`].
    pub history_limit: u32,
    /// Timeout of one registry request. Default [`DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
    /// Fraction (0 to 1) of each schedule's interval over which its checks are spread, at a
    /// stable offset per reference. Default [`DEFAULT_JITTER`].
    pub jitter: f64,
    /// How long shutdown waits for running checks. Default [`DEFAULT_SHUTDOWN_TIMEOUT`].
    pub shutdown_timeout: Duration,
}

/// How to talk to one registry.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Plain HTTP instead of verified HTTPS. Default false.
    pub insecure: bool,
    /// Extra PEM trust anchors.
    pub ca_file: Option<PathBuf>,
    /// ACR soft-delete retention in days. Default [`DEFAULT_SOFT_DELETE_RETENTION_DAYS`].
    pub soft_delete_retention_days: u32,
    /// How long before the expected purge of a soft-deleted digest a reminder is raised;
    /// `None` raises none. Default [`DEFAULT_SOFT_DELETE_REMINDER`].
    pub soft_delete_reminder: Option<Duration>,
    /// ACR: how often a tag watch reads the attributes of the manifest under an unchanged
    /// tag (they are always read when the tag moves); `None` for never. Default
    /// [`DEFAULT_ATTRIBUTES_REFRESH`].
    pub attributes_refresh: Option<Duration>,
    /// Whether the registry is an Azure Container Registry: the `/acr/v1` metadata API and
    /// the soft-delete listings are used. From the `acr` key, else a `*.azurecr.*` host or
    /// an Entra auth method.
    pub acr: bool,
    /// Credentials.
    pub auth: Auth,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            insecure: false,
            ca_file: None,
            soft_delete_retention_days: DEFAULT_SOFT_DELETE_RETENTION_DAYS,
            soft_delete_reminder: Some(DEFAULT_SOFT_DELETE_REMINDER),
            attributes_refresh: Some(DEFAULT_ATTRIBUTES_REFRESH),
            acr: false,
            auth: Auth::Anonymous,
        }
    }
}

/// Registry credentials, already read from their environment variable or file.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No credentials; bearer challenges are answered with anonymous tokens.
    Anonymous,
    /// A username and password (from `basic`, or an entry of a docker `config.json`).
    Basic {
        /// The username.
        username: String,
        /// The password or token; never printed.
        password: SecretString,
    },
    /// A Microsoft Entra identity, traded for ACR tokens through `/oauth2/exchange`.
    Entra(EntraCredential),
}

/// The Entra audience ACR accepts whatever its ARM-audience policy says.
pub const ACR_AUDIENCE: &str = "https://containerregistry.azure.net";
/// The public cloud's Entra authority.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com/";
/// The Azure Instance Metadata Service.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// How an Entra access token for ACR is obtained.
#[derive(Debug, Clone)]
pub enum EntraCredential {
    /// `acr-aad` with a client secret: the client-credentials grant.
    ClientSecret {
        /// Authority host with a trailing slash.
        authority_host: String,
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The secret; never printed.
        secret: SecretString,
    },
    /// `acr-aad` with a certificate: a signed client assertion.
    ClientCertificate {
        /// Authority host with a trailing slash.
        authority_host: String,
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// PEM file with the certificate and its RSA private key; read at every refresh so
        /// that a renewed certificate is picked up.
        certificate_file: PathBuf,
    },
    /// `azure-managed-identity`: IMDS, or the App Service / Container Apps endpoint.
    ManagedIdentity {
        /// A user-assigned identity's client id; `None` for the system-assigned one.
        client_id: Option<String>,
        /// IMDS base URL.
        imds_endpoint: String,
        /// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`, when the environment provides them.
        app_service: Option<(String, SecretString)>,
    },
    /// `azure-workload-identity`: a federated token file traded at the authority.
    WorkloadIdentity {
        /// Authority host with a trailing slash.
        authority_host: String,
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The projected service account token; re-read at every refresh (it rotates).
        token_file: PathBuf,
    },
}

/// One `[[watch]]`.
#[derive(Debug, Clone)]
pub struct Watch {
    /// Unique name; defaults to the canonical reference.
    pub name: String,
    /// The parsed reference.
    pub reference: Reference,
    /// The cron schedule (the watch's own, else the daemon's).
    pub schedule: String,
    /// Platforms (`os/arch[/variant]`) the watch is limited to; empty means all.
    pub platforms: Vec<String>,
    /// Whether referrers of the resolved digest are tracked.
    pub referrers: bool,
    /// Artifact types (or aliases) that must have a referrer.
    pub require_referrers: Vec<String>,
    /// Labels copied into every event of this watch.
    pub labels: BTreeMap<String, String>,
}

/// One `[[sink]]`.
#[derive(Debug, Clone)]
pub struct Sink {
    /// Unique name.
    pub name: String,
    /// Where and how events are delivered.
    pub kind: SinkKind,
    /// Globs over the event type without its `driftwatch.` prefix; `None` means every type
    /// but `tag.created`.
    pub events: Option<Vec<String>>,
    /// Events below this severity are not routed here. Default info.
    pub min_severity: Severity,
    /// Only events of watches carrying all these labels are routed here.
    pub labels: BTreeMap<String, String>,
    /// Retry and storm-control settings.
    pub delivery: DeliveryPolicy,
}

/// How a sink retries and how much it may send.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// An alert still undelivered this long after it was stored is dead. Default
    /// [`DEFAULT_MAX_AGE`].
    pub max_age: Duration,
    /// Cap on the backoff between attempts (a longer `Retry-After` is still honoured).
    /// Default [`DEFAULT_RETRY_MAX_INTERVAL`].
    pub retry_max_interval: Duration,
    /// Deliveries per minute before further alerts are folded into one summary delivery.
    /// Default: no limit.
    pub max_per_minute: Option<u32>,
    /// Timeout of one request or SMTP session. Default [`DEFAULT_SINK_TIMEOUT`].
    pub timeout: Duration,
}

/// The body a webhook sink posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    /// The CloudEvents envelope, `application/cloudevents+json`.
    CloudEvents,
    /// A Slack incoming-webhook message.
    Slack,
    /// A Microsoft Teams message card.
    Teams,
}

/// The delivery channel of a sink.
#[derive(Debug, Clone)]
pub enum SinkKind {
    /// HTTP POST of the CloudEvents envelope.
    Webhook {
        /// The receiver.
        url: url::Url,
        /// Standard Webhooks secret (`whsec_…`).
        secret: Option<SecretString>,
        /// Body format.
        format: WebhookFormat,
        /// Extra headers; values may be credentials, so they never print.
        headers: Vec<(String, SecretString)>,
    },
    /// Mail through an SMTP relay.
    Email {
        /// `smtp://` or `smtps://` relay URL.
        smtp: url::Url,
        /// Sender address.
        from: String,
        /// Recipients.
        to: Vec<String>,
        /// Events due within this window are folded into one mail.
        batch_window: Duration,
        /// For `smtp://`: refuse to send unless STARTTLS succeeds.
        starttls_required: bool,
        /// SMTP AUTH credentials.
        credentials: Option<(String, SecretString)>,
        /// Prefix for every subject, e.g. `[prod]`.
        subject_prefix: Option<String>,
    },
}

/// `[hooks.*]`: inbound registry webhooks, each off unless it has a secret.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// The bearer secret for `POST /v1/hooks/acr`.
    pub acr: Option<SecretString>,
    /// The bearer secret for `POST /v1/hooks/eventgrid`.
    pub eventgrid: Option<SecretString>,
}

/// `[otel]`.
#[derive(Debug, Clone, Default)]
pub struct Otel {
    /// OTLP base URL; none means nothing is exported.
    pub endpoint: Option<String>,
    /// `http/protobuf` or `grpc`.
    pub protocol: Option<String>,
}

impl Config {
    /// Loads and validates the config at `path` with the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::load_with_env(path, &env)
    }

    /// Loads and validates with an explicit environment (for tests and reloads).
    pub fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let loaded = load::load(path, env)?;
        validate::validate(loaded, env)
    }

    /// Every default, as if from an empty file and no environment.
    pub fn defaults() -> Config {
        let loaded = load::Loaded::empty();
        validate::validate(loaded, &[]).expect("the defaults are valid")
    }

    /// The settings for a registry, or the defaults (verified HTTPS, anonymous).
    pub fn registry(&self, host: &str) -> RegistrySettings {
        self.registries.get(host).cloned().unwrap_or_default()
    }
}

/// The config path: `--config`, else `$DRIFTWATCH_CONFIG`, else [`DEFAULT_CONFIG_PATH`].
pub fn config_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("DRIFTWATCH_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

#[cfg(test)]
mod tests;
