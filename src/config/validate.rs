//! The second phase: checks the merged raw config and builds the immutable [`Config`]. Every
//! problem is collected with its file and key; nothing stops at the first.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use secrecy::SecretString;

use super::load::{KeyPath, Loaded, Provenance};
use super::raw::{RawAuth, RawConfig, RawHeaderValue, RawHook, RawRegistry, RawSink, RawWatch};
use super::*;
use crate::event::{EventType, Severity, glob_match};

/// Referrer aliases accepted in `require_referrers` besides plain artifact types.
pub const REFERRER_ALIASES: [&str; 3] = ["signature", "sbom", "provenance"];

struct Ctx<'a> {
    prov: &'a Provenance,
    env: HashMap<&'a str, &'a str>,
    problems: Vec<Problem>,
    base_dir: PathBuf,
}

impl Ctx<'_> {
    fn problem(&mut self, path: &KeyPath, message: impl Into<String>) {
        let p = self.prov.problem(path, message);
        self.problems.push(p);
    }

    /// Reads a secret from `<name>_env` or `<name>_file`; never from the config file itself.
    fn secret(
        &mut self,
        at: &KeyPath,
        name: &str,
        env_key: &Option<String>,
        file_key: &Option<String>,
    ) -> Option<SecretString> {
        match (env_key, file_key) {
            (Some(_), Some(_)) => {
                self.problem(
                    &at.clone().key(&format!("{name}_env")),
                    format!("set only one of {name}_env and {name}_file"),
                );
                None
            }
            (Some(var), None) => match self.env.get(var.as_str()) {
                Some(v) if !v.is_empty() => Some(SecretString::from(v.to_string())),
                _ => {
                    self.problem(
                        &at.clone().key(&format!("{name}_env")),
                        format!("environment variable {var} is not set or empty"),
                    );
                    None
                }
            },
            (None, Some(file)) => {
                let path = self.resolve(file);
                match std::fs::read_to_string(&path) {
                    Ok(s) if !s.trim().is_empty() => Some(SecretString::from(
                        s.trim_end_matches(['\n', '\r']).to_string(),
                    )),
                    Ok(_) => {
                        self.problem(
                            &at.clone().key(&format!("{name}_file")),
                            format!("{} is empty", path.display()),
                        );
                        None
                    }
                    Err(e) => {
                        self.problem(
                            &at.clone().key(&format!("{name}_file")),
                            format!("cannot read {}: {e}", path.display()),
                        );
                        None
                    }
                }
            }
            (None, None) => None,
        }
    }

    /// Relative paths in the config are relative to the config file's directory.
    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

pub(crate) fn validate(loaded: Loaded, env: &[(String, String)]) -> Result<Config, ConfigError> {
    let Loaded {
        raw,
        provenance,
        files,
        problems,
    } = loaded;
    let base_dir = files
        .first()
        .and_then(|f| f.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut cx = Ctx {
        prov: &provenance,
        env: env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
        problems,
        base_dir,
    };
    let RawConfig {
        daemon,
        registries,
        watch,
        sink,
        hooks,
        otel,
    } = raw;

    let daemon = validate_daemon(&mut cx, daemon);
    let registries = registries
        .into_iter()
        .filter_map(|(host, r)| {
            let settings = validate_registry(&mut cx, &host, r)?;
            Some((host, settings))
        })
        .collect();
    let watches = validate_watches(&mut cx, watch, &daemon.schedule);
    let sinks = validate_sinks(&mut cx, sink);
    let hooks = Hooks {
        acr: validate_hook(&mut cx, "acr", hooks.acr),
        eventgrid: validate_hook(&mut cx, "eventgrid", hooks.eventgrid),
    };
    let root = KeyPath::default().key("otel");
    if let Some(p) = &otel.protocol
        && p != "http/protobuf"
        && p != "grpc"
    {
        cx.problem(
            &root.clone().key("protocol"),
            format!("unknown protocol {p:?} (expected \"http/protobuf\" or \"grpc\")"),
        );
    }
    if let Some(e) = &otel.endpoint {
        if url::Url::parse(e)
            .map(|u| u.scheme().starts_with("http"))
            .unwrap_or(false)
        {
        } else {
            cx.problem(
                &root.key("endpoint"),
                format!("invalid endpoint {e:?} (expected e.g. \"http://127.0.0.1:4318\")"),
            );
        }
    }
    let otel = Otel {
        endpoint: otel.endpoint,
        protocol: otel.protocol,
    };

    if !cx.problems.is_empty() {
        return Err(ConfigError::Invalid(cx.problems));
    }
    Ok(Config {
        daemon,
        registries,
        watches,
        sinks,
        hooks,
        otel,
        files,
    })
}

fn validate_daemon(cx: &mut Ctx<'_>, d: super::raw::RawDaemon) -> Daemon {
    let at = KeyPath::default().key("daemon");

    let state_dir = cx.env.get("STATE_DIRECTORY").map(|s| {
        // systemd may pass several directories separated by colons; the first is ours.
        PathBuf::from(s.split(':').next().unwrap_or(s))
    });
    let state_raw = d.state.unwrap_or_else(|| DEFAULT_STATE.to_string());
    if state_raw.starts_with("postgres://") || state_raw.starts_with("postgresql://") {
        cx.problem(
            &at.clone().key("state"),
            "PostgreSQL state is not supported by this build; use a SQLite path such as \
             \"driftwatch.db\"",
        );
    }
    let state = {
        let p = PathBuf::from(&state_raw);
        match (&state_dir, p.is_absolute()) {
            (Some(dir), false) => dir.join(p),
            _ => p,
        }
    };

    let listen_raw = d.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen = match listen_raw.parse() {
        Ok(a) => a,
        Err(_) => {
            cx.problem(
                &at.clone().key("listen"),
                format!("invalid address {listen_raw:?} (expected e.g. \"127.0.0.1:9464\")"),
            );
            DEFAULT_LISTEN
                .parse()
                .expect("default listen address parses")
        }
    };

    let schedule = d.schedule.unwrap_or_else(|| DEFAULT_SCHEDULE.to_string());
    if let Err(msg) = check_cron(&schedule) {
        cx.problem(&at.clone().key("schedule"), msg);
    }

    let concurrency = match d.concurrency {
        None => DEFAULT_CONCURRENCY,
        Some(n @ 1..=1024) => n as usize,
        Some(n) => {
            cx.problem(
                &at.clone().key("concurrency"),
                format!("{n} is out of range 1..=1024"),
            );
            DEFAULT_CONCURRENCY
        }
    };
    let failing_after = match d.failing_after {
        None => DEFAULT_FAILING_AFTER,
        Some(n @ 1..=1000) => n as u32,
        Some(n) => {
            cx.problem(
                &at.clone().key("failing_after"),
                format!("{n} is out of range 1..=1000"),
            );
            DEFAULT_FAILING_AFTER
        }
    };
    let history_limit = match d.history_limit {
        None => DEFAULT_HISTORY_LIMIT,
        Some(n @ 1..=100_000) => n as u32,
        Some(n) => {
            cx.problem(
                &at.clone().key("history_limit"),
                format!("{n} is out of range 1..=100000"),
            );
            DEFAULT_HISTORY_LIMIT
        }
    };
    let request_timeout = match d.request_timeout {
        None => DEFAULT_REQUEST_TIMEOUT,
        Some(s) => parse_duration(cx, &at.clone().key("request_timeout"), &s)
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT),
    };

    let jitter = match d.jitter {
        None => DEFAULT_JITTER,
        Some(j) if (0.0..=1.0).contains(&j) => j,
        Some(j) => {
            cx.problem(
                &at.clone().key("jitter"),
                format!("{j} is out of range 0.0..=1.0 (a fraction of the interval, e.g. 0.5)"),
            );
            DEFAULT_JITTER
        }
    };
    let shutdown_timeout = match d.shutdown_timeout {
        None => DEFAULT_SHUTDOWN_TIMEOUT,
        Some(s) => parse_duration(cx, &at.clone().key("shutdown_timeout"), &s)
            .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
    };

    Daemon {
        state,
        listen,
        schedule,
        concurrency,
        alert_on_baseline: d.alert_on_baseline.unwrap_or(false),
        failing_after,
        history_limit,
        request_timeout,
        jitter,
        shutdown_timeout,
    }
}

fn parse_duration(cx: &mut Ctx<'_>, at: &KeyPath, s: &str) -> Option<Duration> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Some(d),
        _ => {
            cx.problem(
                at,
                format!("invalid duration {s:?} (expected e.g. \"30s\" or \"2m\")"),
            );
            None
        }
    }
}

/// Checks a six-field cron expression (seconds first), as the scheduler will parse it.
pub fn check_cron(expr: &str) -> Result<(), String> {
    let fields = expr.split_whitespace().count();
    if fields != 6 {
        return Err(format!(
            "invalid cron {expr:?}: expected 6 fields (sec min hour day month weekday), \
             got {fields}; e.g. \"0 */5 * * * *\""
        ));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(expr)
        .map(|_| ())
        .map_err(|e| format!("invalid cron {expr:?}: {e}"))
}

fn validate_registry(cx: &mut Ctx<'_>, host: &str, r: RawRegistry) -> Option<RegistrySettings> {
    let at = KeyPath::default().key("registries").key(host);
    let problems_before = cx.problems.len();
    if Reference::parse(&format!("{host}/x"))
        .map(|r| r.registry() != host)
        .unwrap_or(true)
    {
        cx.problem(
            &at,
            format!(
                "{host:?} is not a registry host (expected HOST[:PORT], \
                 e.g. \"myregistry.azurecr.io\")"
            ),
        );
    }
    let ca_file = r.ca_file.map(|f| {
        let p = cx.resolve(&f);
        match std::fs::read(&p) {
            Ok(bytes)
                if reqwest::Certificate::from_pem_bundle(&bytes).is_ok_and(|c| !c.is_empty()) => {}
            Ok(_) => cx.problem(
                &at.clone().key("ca_file"),
                format!("{} holds no PEM certificate", p.display()),
            ),
            Err(e) => cx.problem(
                &at.clone().key("ca_file"),
                format!("cannot read {}: {e}", p.display()),
            ),
        }
        p
    });
    let soft_delete_retention_days = match r.soft_delete_retention_days {
        None => DEFAULT_SOFT_DELETE_RETENTION_DAYS,
        Some(n @ 1..=90) => n as u32,
        Some(n) => {
            cx.problem(
                &at.clone().key("soft_delete_retention_days"),
                format!("{n} is out of range 1..=90 (ACR allows 1 to 90 days)"),
            );
            DEFAULT_SOFT_DELETE_RETENTION_DAYS
        }
    };
    let soft_delete_reminder = match r.soft_delete_reminder.as_deref() {
        None => Some(DEFAULT_SOFT_DELETE_REMINDER),
        Some("off") => None,
        Some(text) => parse_duration(cx, &at.clone().key("soft_delete_reminder"), text),
    };
    let attributes_refresh = match r.attributes_refresh.as_deref() {
        None => Some(DEFAULT_ATTRIBUTES_REFRESH),
        Some("off") => None,
        // Zero is meaningful here: at every check.
        Some(text) if humantime::parse_duration(text).is_ok_and(|d| d.is_zero()) => {
            Some(Duration::ZERO)
        }
        Some(text) => parse_duration(cx, &at.clone().key("attributes_refresh"), text),
    };
    let auth = match r.auth {
        None => Auth::Anonymous,
        Some(a) => validate_auth(cx, &at.clone().key("auth"), host, a),
    };
    let acr = r
        .acr
        .unwrap_or_else(|| is_acr_host(host) || matches!(auth, Auth::Entra(_)));
    // An Entra token opens every registry the identity may use; it never travels in clear
    // except to a registry on this machine (tests, a local proxy).
    if matches!(auth, Auth::Entra(_)) && r.insecure == Some(true) && !is_loopback(host) {
        cx.problem(
            &at.clone().key("insecure"),
            "plain HTTP cannot be used with an Entra identity (its token would travel in clear)",
        );
    }
    let settings = RegistrySettings {
        insecure: r.insecure.unwrap_or(false),
        ca_file,
        soft_delete_retention_days,
        soft_delete_reminder,
        attributes_refresh,
        acr,
        auth,
    };
    (cx.problems.len() == problems_before).then_some(settings)
}

fn validate_auth(cx: &mut Ctx<'_>, at: &KeyPath, host: &str, a: RawAuth) -> Auth {
    let method = a.method.clone().unwrap_or_else(|| "anonymous".to_string());
    let stray = |cx: &mut Ctx<'_>, allowed: &[&str]| {
        let set: [(&str, bool); 12] = [
            ("username", a.username.is_some()),
            ("password_env", a.password_env.is_some()),
            ("password_file", a.password_file.is_some()),
            ("config_file", a.config_file.is_some()),
            ("tenant_id", a.tenant_id.is_some()),
            ("client_id", a.client_id.is_some()),
            ("client_secret_env", a.client_secret_env.is_some()),
            ("client_secret_file", a.client_secret_file.is_some()),
            (
                "client_certificate_file",
                a.client_certificate_file.is_some(),
            ),
            ("authority_host", a.authority_host.is_some()),
            ("imds_endpoint", a.imds_endpoint.is_some()),
            ("federated_token_file", a.federated_token_file.is_some()),
        ];
        for (key, present) in set {
            if present && !allowed.contains(&key) {
                cx.problem(
                    &at.clone().key(key),
                    format!("not used by auth method {method:?}"),
                );
            }
        }
    };
    match method.as_str() {
        "anonymous" => {
            stray(cx, &[]);
            Auth::Anonymous
        }
        "basic" => {
            stray(cx, &["username", "password_env", "password_file"]);
            let password = cx.secret(at, "password", &a.password_env, &a.password_file);
            if a.password_env.is_none() && a.password_file.is_none() {
                cx.problem(
                    &at.clone().key("password_env"),
                    "basic auth needs password_env = \"VAR\" or password_file = \"/run/secrets/…\"",
                );
            }
            match (a.username, password) {
                (Some(username), Some(password)) => Auth::Basic { username, password },
                (None, _) => {
                    cx.problem(&at.clone().key("username"), "basic auth needs a username");
                    Auth::Anonymous
                }
                _ => Auth::Anonymous,
            }
        }
        "docker-config" => {
            stray(cx, &["config_file"]);
            let path = match &a.config_file {
                Some(f) => cx.resolve(f),
                None => default_docker_config(&cx.env),
            };
            match docker_config_credentials(&path, host) {
                Ok((username, password)) => Auth::Basic { username, password },
                Err(msg) => {
                    cx.problem(&at.clone().key("config_file"), msg);
                    Auth::Anonymous
                }
            }
        }
        "acr-aad" => {
            stray(
                cx,
                &[
                    "tenant_id",
                    "client_id",
                    "client_secret_env",
                    "client_secret_file",
                    "client_certificate_file",
                    "authority_host",
                ],
            );
            let authority_host = authority(cx, at, a.authority_host.clone(), None);
            let tenant_id = required(cx, at, "tenant_id", a.tenant_id.clone(), None);
            let client_id = required(cx, at, "client_id", a.client_id.clone(), None);
            let credential = match (
                &a.client_certificate_file,
                &a.client_secret_env,
                &a.client_secret_file,
            ) {
                (Some(file), None, None) => {
                    let path = cx.resolve(file);
                    if let Err(e) = crate::registry::entra::read_certificate(&path) {
                        cx.problem(&at.clone().key("client_certificate_file"), e);
                    }
                    Some(Err(path))
                }
                (Some(_), _, _) => {
                    cx.problem(
                        &at.clone().key("client_certificate_file"),
                        "set either a client secret or a certificate, not both",
                    );
                    None
                }
                (None, None, None) => {
                    cx.problem(
                        &at.clone().key("client_secret_env"),
                        "acr-aad needs client_secret_env, client_secret_file or \
                         client_certificate_file",
                    );
                    None
                }
                (None, _, _) => cx
                    .secret(
                        at,
                        "client_secret",
                        &a.client_secret_env,
                        &a.client_secret_file,
                    )
                    .map(Ok),
            };
            match (authority_host, tenant_id, client_id, credential) {
                (Some(authority_host), Some(tenant_id), Some(client_id), Some(Ok(secret))) => {
                    Auth::Entra(EntraCredential::ClientSecret {
                        authority_host,
                        tenant_id,
                        client_id,
                        secret,
                    })
                }
                (Some(authority_host), Some(tenant_id), Some(client_id), Some(Err(file))) => {
                    Auth::Entra(EntraCredential::ClientCertificate {
                        authority_host,
                        tenant_id,
                        client_id,
                        certificate_file: file,
                    })
                }
                _ => Auth::Anonymous,
            }
        }
        "azure-managed-identity" => {
            stray(cx, &["client_id", "imds_endpoint"]);
            let imds_endpoint = match &a.imds_endpoint {
                None => DEFAULT_IMDS_ENDPOINT.to_string(),
                Some(u) => http_url(cx, &at.clone().key("imds_endpoint"), u)
                    .map(|u| u.trim_end_matches('/').to_string())
                    .unwrap_or_default(),
            };
            // App Service, Functions and Container Apps announce their identity endpoint in
            // the environment; it takes precedence over IMDS, as in Azure's own SDKs.
            let app_service = match (
                cx.env.get("IDENTITY_ENDPOINT"),
                cx.env.get("IDENTITY_HEADER"),
            ) {
                (Some(endpoint), Some(header)) if !endpoint.is_empty() && !header.is_empty() => {
                    Some((endpoint.to_string(), SecretString::from(header.to_string())))
                }
                _ => None,
            };
            Auth::Entra(EntraCredential::ManagedIdentity {
                client_id: a.client_id.clone(),
                imds_endpoint,
                app_service,
            })
        }
        "azure-workload-identity" => {
            stray(
                cx,
                &[
                    "tenant_id",
                    "client_id",
                    "federated_token_file",
                    "authority_host",
                ],
            );
            let authority_host = authority(
                cx,
                at,
                a.authority_host.clone(),
                Some("AZURE_AUTHORITY_HOST"),
            );
            let tenant_id = required(
                cx,
                at,
                "tenant_id",
                a.tenant_id.clone(),
                Some("AZURE_TENANT_ID"),
            );
            let client_id = required(
                cx,
                at,
                "client_id",
                a.client_id.clone(),
                Some("AZURE_CLIENT_ID"),
            );
            let token_file = required(
                cx,
                at,
                "federated_token_file",
                a.federated_token_file.clone(),
                Some("AZURE_FEDERATED_TOKEN_FILE"),
            )
            .map(|f| cx.resolve(&f));
            if let Some(f) = &token_file
                && let Err(e) = std::fs::metadata(f)
            {
                cx.problem(
                    &at.clone().key("federated_token_file"),
                    format!("cannot read {}: {e}", f.display()),
                );
            }
            match (authority_host, tenant_id, client_id, token_file) {
                (Some(authority_host), Some(tenant_id), Some(client_id), Some(token_file)) => {
                    Auth::Entra(EntraCredential::WorkloadIdentity {
                        authority_host,
                        tenant_id,
                        client_id,
                        token_file,
                    })
                }
                _ => Auth::Anonymous,
            }
        }
        other => {
            cx.problem(
                &at.clone().key("method"),
                format!(
                    "unknown auth method {other:?} (expected anonymous, basic, acr-aad, \
                     azure-managed-identity, azure-workload-identity or docker-config)"
                ),
            );
            Auth::Anonymous
        }
    }
}

/// Whether `host` is an Azure Container Registry login server in any Azure cloud.
pub(crate) fn is_acr_host(host: &str) -> bool {
    let host = host.split(':').next().unwrap_or(host).to_ascii_lowercase();
    [".azurecr.io", ".azurecr.cn", ".azurecr.us", ".azurecr.de"]
        .iter()
        .any(|suffix| host.ends_with(suffix))
}

/// Whether `host` (`HOST[:PORT]`, or a bare host) is this machine.
fn is_loopback(host: &str) -> bool {
    let bare = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let bare = bare.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A key that may also come from an environment variable (the key wins).
fn required(
    cx: &mut Ctx<'_>,
    at: &KeyPath,
    key: &str,
    value: Option<String>,
    env: Option<&str>,
) -> Option<String> {
    let from_env = env.and_then(|var| cx.env.get(var)).map(|v| v.to_string());
    match value.or(from_env).filter(|v| !v.trim().is_empty()) {
        Some(v) => Some(v),
        None => {
            let hint = match env {
                Some(var) => format!("missing (set {key} here, or {var} in the environment)"),
                None => "missing".to_string(),
            };
            cx.problem(&at.clone().key(key), hint);
            None
        }
    }
}

/// The Entra authority host, with the trailing slash that paths are appended to.
fn authority(
    cx: &mut Ctx<'_>,
    at: &KeyPath,
    value: Option<String>,
    env: Option<&str>,
) -> Option<String> {
    let from_env = env.and_then(|var| cx.env.get(var)).map(|v| v.to_string());
    let text = value
        .or(from_env)
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_AUTHORITY_HOST.to_string());
    let url = http_url(cx, &at.clone().key("authority_host"), &text)?;
    let host = url::Url::parse(&url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    if url.starts_with("http://") && !is_loopback(&host) {
        cx.problem(
            &at.clone().key("authority_host"),
            format!("{url:?}: the authority must be reached over https"),
        );
        return None;
    }
    Some(format!("{}/", url.trim_end_matches('/')))
}

fn http_url(cx: &mut Ctx<'_>, at: &KeyPath, text: &str) -> Option<String> {
    match url::Url::parse(text) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            Some(text.trim().to_string())
        }
        _ => {
            cx.problem(
                at,
                format!(
                    "{text:?} is not an http(s) URL (e.g. \"https://login.microsoftonline.com/\")"
                ),
            );
            None
        }
    }
}

fn default_docker_config(env: &HashMap<&str, &str>) -> PathBuf {
    match (env.get("DOCKER_CONFIG"), env.get("HOME")) {
        (Some(dir), _) => Path::new(dir).join("config.json"),
        (None, Some(home)) => Path::new(home).join(".docker/config.json"),
        (None, None) => PathBuf::from(".docker/config.json"),
    }
}

/// Reads `auths` credentials for `host` from a docker `config.json`.
fn docker_config_credentials(path: &Path, host: &str) -> Result<(String, SecretString), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read docker config {}: {e}", path.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("docker config {} is not valid JSON: {e}", path.display()))?;
    let auths = doc.get("auths").and_then(|a| a.as_object());
    let entry = auths.and_then(|auths| {
        auths.iter().find_map(|(key, v)| {
            let k = key
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            let k = k.split('/').next().unwrap_or(k);
            let same = k == host
                || (host == crate::model::reference::DOCKER_HUB
                    && (k == "index.docker.io" || k == "registry-1.docker.io"));
            same.then_some(v)
        })
    });
    let Some(entry) = entry else {
        let helper = doc.get("credHelpers").and_then(|h| h.get(host)).is_some()
            || doc.get("credsStore").is_some();
        return Err(if helper {
            format!(
                "{} keeps credentials for {host} in a credential helper, which driftwatch does \
                 not run; use method = \"basic\" with password_file",
                path.display()
            )
        } else {
            format!("{} has no auths entry for {host}", path.display())
        });
    };
    if let Some(auth) = entry
        .get("auth")
        .and_then(|a| a.as_str())
        .filter(|a| !a.is_empty())
    {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| format!("{}: auths.{host}.auth is not base64", path.display()))?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| format!("{}: auths.{host}.auth is not user:password", path.display()))?;
        return Ok((user.to_string(), SecretString::from(pass.to_string())));
    }
    match (
        entry.get("username").and_then(|u| u.as_str()),
        entry.get("password").and_then(|p| p.as_str()),
    ) {
        (Some(u), Some(p)) => Ok((u.to_string(), SecretString::from(p.to_string()))),
        _ => Err(format!(
            "{}: auths.{host} has neither auth nor username/password",
            path.display()
        )),
    }
}

fn validate_watches(
    cx: &mut Ctx<'_>,
    raw: Vec<RawWatch>,
    default_schedule: &str,
) -> Vec<std::sync::Arc<Watch>> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, w) in raw.into_iter().enumerate() {
        let at = KeyPath::default().key("watch").index(i);
        let before = cx.problems.len();

        let reference = match &w.image {
            None => {
                cx.problem(
                    &at.clone().key("image"),
                    "missing (e.g. image = \"registry.example.com/team/api:prod\")",
                );
                None
            }
            Some(image) => match Reference::parse(image) {
                Ok(r) => Some(r),
                Err(e) => {
                    cx.problem(&at.clone().key("image"), e.to_string());
                    None
                }
            },
        };
        let name = match (&w.name, &reference) {
            (Some(n), _) if n.trim().is_empty() => {
                cx.problem(&at.clone().key("name"), "must not be empty");
                String::new()
            }
            (Some(n), _) => n.clone(),
            (None, Some(r)) => r.to_string(),
            (None, None) => String::new(),
        };
        if !name.is_empty() {
            if let Some(first) = seen.get(&name) {
                cx.problem(
                    &at.clone().key("name"),
                    format!("duplicate watch name {name:?} (first used by watch number {first})"),
                );
            } else {
                seen.insert(name.clone(), i);
            }
        }
        // An inherited schedule was checked (and reported) once, under [daemon].
        if let Some(Err(msg)) = w.schedule.as_deref().map(check_cron) {
            cx.problem(&at.clone().key("schedule"), msg);
        }
        let schedule = w.schedule.unwrap_or_else(|| default_schedule.to_string());
        let platforms = w.platforms.unwrap_or_default();
        for (j, p) in platforms.iter().enumerate() {
            let parts: Vec<&str> = p.split('/').collect();
            if !(2..=3).contains(&parts.len()) || parts.iter().any(|s| s.is_empty()) {
                cx.problem(
                    &at.clone().key("platforms").index(j),
                    format!(
                        "invalid platform {p:?} (expected os/arch[/variant], e.g. \"linux/arm64\")"
                    ),
                );
            }
        }
        let require_referrers = w.require_referrers.unwrap_or_default();
        for (j, t) in require_referrers.iter().enumerate() {
            if !REFERRER_ALIASES.contains(&t.as_str()) && !t.contains('/') {
                cx.problem(
                    &at.clone().key("require_referrers").index(j),
                    format!(
                        "{t:?} is neither an alias (signature, sbom, provenance) nor an artifact \
                         type such as \"application/spdx+json\""
                    ),
                );
            }
        }
        if let (Some(r), false) = (reference, cx.problems.len() > before) {
            out.push(std::sync::Arc::new(Watch {
                name,
                reference: r,
                schedule,
                platforms,
                referrers: w.referrers.unwrap_or(false),
                require_referrers,
                labels: w.labels.unwrap_or_default(),
            }));
        }
    }
    out
}

fn validate_sinks(cx: &mut Ctx<'_>, raw: Vec<RawSink>) -> Vec<Sink> {
    let mut seen = BTreeMap::new();
    let mut out = Vec::new();
    for (i, s) in raw.into_iter().enumerate() {
        let at = KeyPath::default().key("sink").index(i);
        let before = cx.problems.len();
        let name = match &s.name {
            Some(n) if !n.trim().is_empty() => n.clone(),
            _ => {
                cx.problem(
                    &at.clone().key("name"),
                    "missing (e.g. name = \"sre-hook\")",
                );
                String::new()
            }
        };
        if !name.is_empty() && seen.insert(name.clone(), i).is_some() {
            cx.problem(
                &at.clone().key("name"),
                format!("duplicate sink name {name:?}"),
            );
        }
        if let Some(events) = &s.events {
            for (j, pattern) in events.iter().enumerate() {
                let short = pattern
                    .strip_prefix(crate::event::TYPE_PREFIX)
                    .unwrap_or(pattern);
                if !EventType::ALL.iter().any(|t| glob_match(short, t.short())) {
                    cx.problem(
                        &at.clone().key("events").index(j),
                        format!(
                            "{pattern:?} matches no event type (e.g. \"tag.*\", \"digest.deleted\")"
                        ),
                    );
                }
            }
        }
        let min_severity = match s.min_severity.as_deref().map(str::parse::<Severity>) {
            None => Severity::Info,
            Some(Ok(sev)) => sev,
            Some(Err(msg)) => {
                cx.problem(&at.clone().key("min_severity"), msg);
                Severity::Info
            }
        };
        let delivery = validate_delivery(cx, &at, &s);
        let kind = match s.kind.as_deref() {
            Some("webhook") => validate_webhook(cx, &at, &s),
            Some("email") => validate_email(cx, &at, &s),
            Some(other) => {
                cx.problem(
                    &at.clone().key("type"),
                    format!("unknown sink type {other:?} (expected \"webhook\" or \"email\")"),
                );
                None
            }
            None => {
                cx.problem(
                    &at.clone().key("type"),
                    "missing (\"webhook\" or \"email\")",
                );
                None
            }
        };
        if let (Some(kind), false) = (kind, cx.problems.len() > before) {
            out.push(Sink {
                name,
                kind,
                events: s.events.map(|e| {
                    e.into_iter()
                        .map(|p| {
                            p.strip_prefix(crate::event::TYPE_PREFIX)
                                .unwrap_or(&p)
                                .to_string()
                        })
                        .collect()
                }),
                min_severity,
                labels: s.labels.unwrap_or_default(),
                delivery,
            });
        }
    }
    out
}

fn validate_delivery(cx: &mut Ctx<'_>, at: &KeyPath, s: &RawSink) -> DeliveryPolicy {
    let mut duration = |key: &str, value: &Option<String>, default: Duration| match value {
        None => default,
        Some(v) => parse_duration(cx, &at.clone().key(key), v).unwrap_or(default),
    };
    let max_age = duration("max_age", &s.max_age, DEFAULT_MAX_AGE);
    let retry_max_interval = duration(
        "retry_max_interval",
        &s.retry_max_interval,
        DEFAULT_RETRY_MAX_INTERVAL,
    );
    let timeout = duration("timeout", &s.timeout, DEFAULT_SINK_TIMEOUT);
    let max_per_minute = match s.max_per_minute {
        None => None,
        Some(n @ 1..=100_000) => Some(n as u32),
        Some(n) => {
            cx.problem(
                &at.clone().key("max_per_minute"),
                format!("{n} is out of range 1..=100000 (leave it out for no limit)"),
            );
            None
        }
    };
    DeliveryPolicy {
        max_age,
        retry_max_interval,
        max_per_minute,
        timeout,
    }
}

fn validate_webhook(cx: &mut Ctx<'_>, at: &KeyPath, s: &RawSink) -> Option<SinkKind> {
    for (key, set) in [
        ("smtp", s.smtp.is_some()),
        ("from", s.from.is_some()),
        ("to", s.to.is_some()),
        ("batch_window", s.batch_window.is_some()),
        ("starttls", s.starttls.is_some()),
        ("username", s.username.is_some()),
        ("password_env", s.password_env.is_some()),
        ("password_file", s.password_file.is_some()),
        ("subject_prefix", s.subject_prefix.is_some()),
    ] {
        if set {
            cx.problem(&at.clone().key(key), "only used by email sinks");
        }
    }
    let url = match s.url.as_deref().map(url::Url::parse) {
        Some(Ok(u)) if matches!(u.scheme(), "http" | "https") => Some(u),
        Some(_) => {
            cx.problem(
                &at.clone().key("url"),
                "invalid URL (expected e.g. \"https://hooks.example.com/driftwatch\")",
            );
            None
        }
        None => {
            cx.problem(
                &at.clone().key("url"),
                "missing (e.g. url = \"https://hooks.example.com/driftwatch\")",
            );
            None
        }
    };
    let secret = cx.secret(at, "secret", &s.secret_env, &s.secret_file);
    if let Some(secret) = &secret {
        use secrecy::ExposeSecret as _;
        let key = secret
            .expose_secret()
            .strip_prefix("whsec_")
            .unwrap_or(secret.expose_secret());
        if base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_err()
        {
            cx.problem(
                &at.clone().key(if s.secret_env.is_some() {
                    "secret_env"
                } else {
                    "secret_file"
                }),
                "the secret is not a Standard Webhooks secret (whsec_ followed by base64)",
            );
        }
    }
    let format = match s.format.as_deref() {
        None | Some("cloudevents") => WebhookFormat::CloudEvents,
        Some("slack") => WebhookFormat::Slack,
        Some("teams") => WebhookFormat::Teams,
        Some(other) => {
            cx.problem(
                &at.clone().key("format"),
                format!("unknown format {other:?} (expected cloudevents, slack or teams)"),
            );
            WebhookFormat::CloudEvents
        }
    };
    let mut headers = Vec::new();
    for (name, value) in s.headers.iter().flatten() {
        let key = at.clone().key("headers").key(name);
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            cx.problem(&key, format!("{name:?} is not a valid header name"));
            continue;
        }
        let value = match value {
            RawHeaderValue::Plain(v) => Some(SecretString::from(v.clone())),
            RawHeaderValue::Env { env } => env_value(cx, &key, env),
            RawHeaderValue::File { file } => file_value(cx, &key, file),
        };
        if let Some(v) = value {
            use secrecy::ExposeSecret as _;
            if reqwest::header::HeaderValue::from_str(v.expose_secret()).is_err() {
                cx.problem(&key, "the value is not a valid header value");
                continue;
            }
            headers.push((name.clone(), v));
        }
    }
    Some(SinkKind::Webhook {
        url: url?,
        secret,
        format,
        headers,
    })
}

fn env_value(cx: &mut Ctx<'_>, at: &KeyPath, var: &str) -> Option<SecretString> {
    match cx.env.get(var) {
        Some(v) if !v.is_empty() => Some(SecretString::from(v.to_string())),
        _ => {
            cx.problem(
                at,
                format!("environment variable {var} is not set or empty"),
            );
            None
        }
    }
}

fn file_value(cx: &mut Ctx<'_>, at: &KeyPath, file: &str) -> Option<SecretString> {
    let path = cx.resolve(file);
    match std::fs::read_to_string(&path) {
        Ok(s) => Some(SecretString::from(
            s.trim_end_matches(['\n', '\r']).to_string(),
        )),
        Err(e) => {
            cx.problem(at, format!("cannot read {}: {e}", path.display()));
            None
        }
    }
}

fn validate_email(cx: &mut Ctx<'_>, at: &KeyPath, s: &RawSink) -> Option<SinkKind> {
    for (key, set) in [
        ("url", s.url.is_some()),
        ("secret_env", s.secret_env.is_some()),
        ("secret_file", s.secret_file.is_some()),
        ("format", s.format.is_some()),
        ("headers", s.headers.is_some()),
    ] {
        if set {
            cx.problem(&at.clone().key(key), "only used by webhook sinks");
        }
    }
    let smtp = match s.smtp.as_deref().map(url::Url::parse) {
        Some(Ok(u)) if matches!(u.scheme(), "smtp" | "smtps") && u.host().is_some() => Some(u),
        Some(_) => {
            cx.problem(
                &at.clone().key("smtp"),
                "invalid relay (expected e.g. \"smtp://127.0.0.1:2525\" or \
                 \"smtps://mail.example.com\")",
            );
            None
        }
        None => {
            cx.problem(
                &at.clone().key("smtp"),
                "missing (e.g. smtp = \"smtp://127.0.0.1:2525\")",
            );
            None
        }
    };
    let from = match &s.from {
        Some(f) if f.contains('@') => Some(f.clone()),
        _ => {
            cx.problem(
                &at.clone().key("from"),
                "missing or not an address (e.g. \"driftwatch@example.com\")",
            );
            None
        }
    };
    let to = s.to.clone().unwrap_or_default();
    if to.is_empty() {
        cx.problem(&at.clone().key("to"), "needs at least one recipient");
    }
    for (j, addr) in to.iter().enumerate() {
        if !addr.contains('@') {
            cx.problem(
                &at.clone().key("to").index(j),
                format!("{addr:?} is not an address"),
            );
        }
    }
    let batch_window = match &s.batch_window {
        None => DEFAULT_BATCH_WINDOW,
        Some(w) => {
            parse_duration(cx, &at.clone().key("batch_window"), w).unwrap_or(DEFAULT_BATCH_WINDOW)
        }
    };
    let starttls_required = match s.starttls.as_deref() {
        None | Some("opportunistic") => false,
        Some("required") => true,
        Some(other) => {
            cx.problem(
                &at.clone().key("starttls"),
                format!("unknown value {other:?} (expected \"opportunistic\" or \"required\")"),
            );
            false
        }
    };
    if starttls_required && smtp.as_ref().is_some_and(|u| u.scheme() == "smtps") {
        cx.problem(
            &at.clone().key("starttls"),
            "smtps:// is TLS from the start; starttls applies to smtp://",
        );
    }
    let password = cx.secret(at, "password", &s.password_env, &s.password_file);
    let credentials = match (&s.username, password) {
        (Some(u), Some(p)) => Some((u.clone(), p)),
        (None, None) => None,
        (Some(_), None) => {
            if s.password_env.is_none() && s.password_file.is_none() {
                cx.problem(
                    &at.clone().key("username"),
                    "SMTP auth needs password_env or password_file too",
                );
            }
            None
        }
        (None, Some(_)) => {
            cx.problem(
                &at.clone().key("username"),
                "SMTP auth needs a username too",
            );
            None
        }
    };
    Some(SinkKind::Email {
        smtp: smtp?,
        from: from?,
        to,
        batch_window,
        starttls_required,
        credentials,
        subject_prefix: s.subject_prefix.clone(),
    })
}

fn validate_hook(cx: &mut Ctx<'_>, name: &str, hook: Option<RawHook>) -> Option<SecretString> {
    let hook = hook?;
    let at = KeyPath::default().key("hooks").key(name);
    let secret = cx.secret(&at, "secret", &hook.secret_env, &hook.secret_file);
    if hook.secret_env.is_none() && hook.secret_file.is_none() {
        cx.problem(
            &at.key("secret_env"),
            "an inbound hook needs secret_env or secret_file",
        );
    }
    secret
}
