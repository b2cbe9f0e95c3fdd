//! A thin OCI Distribution client on reqwest: HEAD-first manifest lookups, verified GETs,
//! anonymous/basic/bearer auth with a per-scope token cache, bounded retries, and a cap on
//! in-flight requests per registry. One connection pool per registry.

pub mod acr;
pub mod auth;
pub mod entra;
pub mod error;
pub mod manifest;
pub mod referrers;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use secrecy::ExposeSecret as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument as _;

use crate::config::{Auth, EntraCredential, RegistrySettings};
use crate::model::Digest;
use crate::model::reference::DOCKER_HUB;
use auth::{Challenge, Token};
pub use error::RegistryError;

/// Manifests larger than this are refused (ACR's own limit is 4 MiB too).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Attempts per request for transient failures (5xx, 429, connection trouble).
const MAX_ATTEMPTS: u32 = 3;
/// A `Retry-After` longer than this is not waited for inside a check; the check fails and the
/// next scheduled one tries again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// First backoff step; doubled per attempt, with jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// How long connecting may take, separately from the whole request's timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Docker Hub's API lives on another host than the name references use.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// The answer to a manifest lookup: found, or an authoritative not-found.
#[derive(Debug)]
pub enum ManifestLookup<T> {
    /// The registry served it.
    Found(T),
    /// A reachable registry said 404 with `MANIFEST_UNKNOWN` or `NAME_UNKNOWN`.
    NotFound {
        /// The error code.
        code: String,
    },
}

/// What a HEAD told us.
#[derive(Debug, Clone)]
pub struct HeadInfo {
    /// `Docker-Content-Digest`, when sent.
    pub digest: Option<Digest>,
    /// Content-Type without parameters.
    pub media_type: String,
    /// Content-Length, when sent.
    pub size: Option<u64>,
}

/// The answer to a conditional request.
#[derive(Debug)]
pub enum Conditional<T> {
    /// 304: what the validator stands for is still current.
    NotModified,
    /// A full answer, with its `ETag` when the registry sent one.
    Changed(T, Option<String>),
}

/// A manifest body whose digest has been verified.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The verified digest.
    pub digest: Digest,
    /// Content-Type without parameters.
    pub media_type: String,
    /// The exact bytes served.
    pub body: Vec<u8>,
}

/// Clients for every registry the watches name, created on first use.
pub struct Registries {
    settings: BTreeMap<String, RegistrySettings>,
    concurrency: usize,
    timeout: Duration,
    clients: Mutex<HashMap<String, Arc<RegistryClient>>>,
}

impl Registries {
    /// Clients are built lazily from these settings; unnamed registries get the defaults.
    pub fn new(
        settings: BTreeMap<String, RegistrySettings>,
        concurrency: usize,
        timeout: Duration,
    ) -> Self {
        Registries {
            settings,
            concurrency,
            timeout,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client for `registry` (`HOST[:PORT]` as written in references).
    pub fn client(&self, registry: &str) -> Result<Arc<RegistryClient>, RegistryError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(registry) {
            return Ok(c.clone());
        }
        let settings = self.settings.get(registry).cloned().unwrap_or_default();
        let client = Arc::new(RegistryClient::new(
            registry,
            &settings,
            self.concurrency,
            self.timeout,
        )?);
        clients.insert(registry.to_string(), client.clone());
        Ok(client)
    }

    /// Requests sent so far to every registry, token requests included.
    pub fn requests_sent(&self) -> u64 {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .values()
            .map(|c| c.requests.load(Ordering::Relaxed))
            .sum()
    }
}

/// A client for one registry.
pub struct RegistryClient {
    registry: String,
    base: String,
    http: reqwest::Client,
    auth: Auth,
    challenge: Mutex<Option<Challenge>>,
    tokens: Mutex<HashMap<String, Token>>,
    /// For Entra credentials: the Entra token and the ACR refresh token traded for it.
    entra: Option<EntraState>,
    /// ACR: whether `/acr/v1` and the soft-delete listings are used.
    acr: bool,
    /// ACR soft-delete retention, for purge-time estimates.
    retention_days: u32,
    /// ACR repositories whose metadata API refused us, and when; they use the generic path
    /// for a while.
    metadata_unavailable: Mutex<HashMap<String, Instant>>,
    /// ACR repositories whose last tag listing took this many pages.
    listing_pages: Mutex<HashMap<String, usize>>,
    /// When each repository last answered that it has no referrers API.
    no_referrers_api: Mutex<HashMap<String, Instant>>,
    /// How often the manifest under an unchanged watched tag has its attributes read.
    attributes_refresh: Option<Duration>,
    /// When each (repository, digest) had its manifest attributes read under a tag.
    manifest_attributes_read: Mutex<HashMap<(String, Digest), Instant>>,
    /// When each (repository, subject) was last listed for cosign tags.
    cosign_listed: Mutex<HashMap<(String, Digest), Instant>>,
    /// Serialises token fetches so a burst of checks asks for each scope once.
    token_fetch: tokio::sync::Mutex<()>,
    limit: Arc<Semaphore>,
    requests: AtomicU64,
}

impl RegistryClient {
    fn new(
        registry: &str,
        settings: &RegistrySettings,
        concurrency: usize,
        timeout: Duration,
    ) -> Result<Self, RegistryError> {
        let setup = |reason: String| RegistryError::Setup {
            registry: registry.to_string(),
            reason,
        };
        let host = if registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            registry
        };
        let scheme = if settings.insecure { "http" } else { "https" };
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("driftwatch/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(concurrency)
            .redirect(redirect_policy());
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca).map_err(|e| setup(format!("{}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| setup(format!("{}: {e}", ca.display())))?;
            builder = builder.tls_certs_merge(certs);
        }
        if settings.insecure {
            // Plain HTTP needs no trust anchors; loading the system's costs milliseconds of
            // start-up per registry.
            builder = builder.tls_certs_only(std::iter::empty());
        }
        let http = builder.build().map_err(|e| setup(e.to_string()))?;
        let entra = match &settings.auth {
            Auth::Entra(credential) => Some(EntraState {
                credential: credential.clone(),
                // Entra and IMDS are not the registry: they get the system's trust anchors
                // whatever the registry's own TLS settings are.
                http: reqwest::Client::builder()
                    .user_agent(concat!("driftwatch/", env!("CARGO_PKG_VERSION")))
                    .timeout(timeout)
                    .connect_timeout(CONNECT_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| setup(e.to_string()))?,
                entra_token: Mutex::new(None),
                refresh_token: Mutex::new(None),
            }),
            _ => None,
        };
        Ok(RegistryClient {
            registry: registry.to_string(),
            base: format!("{scheme}://{host}"),
            http,
            auth: settings.auth.clone(),
            challenge: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            entra,
            acr: settings.acr,
            retention_days: settings.soft_delete_retention_days,
            metadata_unavailable: Mutex::new(HashMap::new()),
            listing_pages: Mutex::new(HashMap::new()),
            no_referrers_api: Mutex::new(HashMap::new()),
            cosign_listed: Mutex::new(HashMap::new()),
            attributes_refresh: settings.attributes_refresh,
            manifest_attributes_read: Mutex::new(HashMap::new()),
            token_fetch: tokio::sync::Mutex::new(()),
            limit: Arc::new(Semaphore::new(concurrency.max(1))),
            requests: AtomicU64::new(0),
        })
    }

    /// `HOST[:PORT]` as written in references.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// HEAD a manifest by tag or digest. A 404 is confirmed with a GET, because only a body
    /// carries the error code that makes a not-found authoritative.
    pub async fn head_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<ManifestLookup<HeadInfo>, RegistryError> {
        let what = format!("{repository}:{reference}");
        let (resp, _permit) = self
            .send(
                Method::HEAD,
                &manifest_path(repository, reference),
                repository,
                manifest::ACCEPT,
                &what,
            )
            .await?;
        match resp.status() {
            StatusCode::OK => {
                let digest = self.digest_header(&resp, &what)?;
                Ok(ManifestLookup::Found(HeadInfo {
                    digest,
                    media_type: content_type(&resp),
                    size: resp.content_length(),
                }))
            }
            StatusCode::NOT_FOUND => {
                drop(_permit);
                match self.get_manifest(repository, reference, None).await? {
                    ManifestLookup::Found(f) => Ok(ManifestLookup::Found(HeadInfo {
                        digest: Some(f.digest),
                        media_type: f.media_type,
                        size: Some(f.body.len() as u64),
                    })),
                    ManifestLookup::NotFound { code } => Ok(ManifestLookup::NotFound { code }),
                }
            }
            status => Err(self.status_error(status, None, &what)),
        }
    }

    /// GET a manifest and verify its body: against the requested digest when the reference
    /// is one, and against `Docker-Content-Digest` when the registry sends it.
    pub async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
        expect: Option<&Digest>,
    ) -> Result<ManifestLookup<Fetched>, RegistryError> {
        match self
            .get_manifest_if_changed(repository, reference, expect, None)
            .await?
        {
            Conditional::Changed(lookup, _) => Ok(lookup),
            // Nothing was offered to match, so this cannot happen; a registry that says it
            // anyway gave no authoritative answer.
            Conditional::NotModified => Err(RegistryError::Status {
                registry: self.registry.clone(),
                what: format!("{repository}:{reference}"),
                status: 304,
                code: None,
            }),
        }
    }

    /// [`Self::get_manifest`] with `If-None-Match: etag`: a registry that supports it answers
    /// 304 when the manifest is unchanged. A fresh answer comes with its `ETag`.
    pub async fn get_manifest_if_changed(
        &self,
        repository: &str,
        reference: &str,
        expect: Option<&Digest>,
        etag: Option<&str>,
    ) -> Result<Conditional<ManifestLookup<Fetched>>, RegistryError> {
        let what = format!("{repository}:{reference}");
        let path = manifest_path(repository, reference);
        let scope = format!("repository:{repository}:pull");
        let (resp, _permit) = self
            .send_with(Method::GET, &path, &scope, manifest::ACCEPT, etag, &what)
            .await?;
        let status = resp.status();
        if status == StatusCode::NOT_MODIFIED && etag.is_some() {
            return Ok(Conditional::NotModified);
        }
        let new_etag = header_text(&resp, reqwest::header::ETAG);
        Ok(Conditional::Changed(
            self.read_manifest(resp, &what, expect).await?,
            new_etag,
        ))
    }

    async fn read_manifest(
        &self,
        resp: Response,
        what: &str,
        expect: Option<&Digest>,
    ) -> Result<ManifestLookup<Fetched>, RegistryError> {
        let what = what.to_string();
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            let body = read_capped(resp, 64 * 1024).await.unwrap_or_default();
            return match error_code(&body) {
                Some(code) if code == "MANIFEST_UNKNOWN" || code == "NAME_UNKNOWN" => {
                    Ok(ManifestLookup::NotFound { code })
                }
                code => Err(self.status_error(status, code, &what)),
            };
        }
        if status != StatusCode::OK {
            let body = read_capped(resp, 64 * 1024).await.unwrap_or_default();
            return Err(self.status_error(status, error_code(&body), &what));
        }

        let media_type = content_type(&resp);
        let header = self.digest_header(&resp, &what)?;
        let body = match read_capped(resp, MAX_MANIFEST_BYTES).await {
            Ok(b) => b,
            Err(ReadError::TooLarge) => {
                return Err(RegistryError::TooLarge {
                    registry: self.registry.clone(),
                    what,
                    limit: MAX_MANIFEST_BYTES,
                });
            }
            Err(ReadError::Http(source)) => {
                return Err(RegistryError::Transport {
                    registry: self.registry.clone(),
                    source,
                });
            }
        };

        // Every digest we were given must hold for the exact bytes; a mismatch is never
        // trusted, whichever side is wrong.
        let mismatch = |expected: &Digest| RegistryError::DigestMismatch {
            registry: self.registry.clone(),
            what: what.clone(),
            expected: expected.to_string(),
            actual: Digest::sha256_of(&body).to_string(),
        };
        for claimed in [expect, header.as_ref()].into_iter().flatten() {
            match claimed.verify(&body) {
                Some(true) => {}
                Some(false) => return Err(mismatch(claimed)),
                None if expect.is_none() => {
                    return Err(RegistryError::Malformed {
                        registry: self.registry.clone(),
                        what,
                        reason: format!("cannot verify digest algorithm of {claimed}"),
                    });
                }
                None => {}
            }
        }
        let digest = expect
            .cloned()
            .or(header)
            .unwrap_or_else(|| Digest::sha256_of(&body));
        Ok(ManifestLookup::Found(Fetched {
            digest,
            media_type,
            body,
        }))
    }

    fn digest_header(&self, resp: &Response, what: &str) -> Result<Option<Digest>, RegistryError> {
        let Some(value) = resp.headers().get("docker-content-digest") else {
            return Ok(None);
        };
        let text = value.to_str().unwrap_or("").trim();
        if text.is_empty() {
            return Ok(None);
        }
        Digest::parse(text)
            .map(Some)
            .map_err(|e| RegistryError::Malformed {
                registry: self.registry.clone(),
                what: what.to_string(),
                reason: format!("Docker-Content-Digest: {e}"),
            })
    }

    fn status_error(&self, status: StatusCode, code: Option<String>, what: &str) -> RegistryError {
        match status {
            StatusCode::FORBIDDEN => RegistryError::Denied {
                registry: self.registry.clone(),
                what: what.to_string(),
            },
            StatusCode::UNAUTHORIZED => RegistryError::Unauthorized {
                registry: self.registry.clone(),
                what: what.to_string(),
                detail: "credentials rejected".to_string(),
            },
            _ => RegistryError::Status {
                registry: self.registry.clone(),
                what: what.to_string(),
                status: status.as_u16(),
                code,
            },
        }
    }

    /// Sends a request needing `pull` on `repository`; see [`Self::send_scoped`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        repository: &str,
        accept: &str,
        what: &str,
    ) -> Result<(Response, OwnedSemaphorePermit), RegistryError> {
        let scope = format!("repository:{repository}:pull");
        self.send_with(method, path, &scope, accept, None, what)
            .await
    }

    async fn send_scoped(
        &self,
        method: Method,
        path: &str,
        scope: &str,
        accept: &str,
        what: &str,
    ) -> Result<(Response, OwnedSemaphorePermit), RegistryError> {
        self.send_with(method, path, scope, accept, None, what)
            .await
    }

    /// Sends a request with auth for `scope` (and `If-None-Match` when given), retrying
    /// transient failures within a bound. The returned permit keeps the request counted
    /// against the concurrency cap until the body has been read.
    async fn send_with(
        &self,
        method: Method,
        path: &str,
        scope: &str,
        accept: &str,
        if_none_match: Option<&str>,
        what: &str,
    ) -> Result<(Response, OwnedSemaphorePermit), RegistryError> {
        let url = format!("{}{path}", self.base);
        let scope = scope.to_string();
        let mut attempt = 0;
        let mut reauthenticated = false;
        loop {
            attempt += 1;
            let authorization = self.authorization(&scope).await?;
            let permit = self
                .limit
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            self.requests.fetch_add(1, Ordering::Relaxed);
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header(ACCEPT, accept);
            if let Some(etag) = if_none_match {
                req = req.header(reqwest::header::IF_NONE_MATCH, etag);
            }
            if let Some(h) = &authorization {
                req = req.header(AUTHORIZATION, h);
            }
            let span = tracing::debug_span!(
                "registry_request",
                otel.name = %method,
                otel.kind = "client",
                http.request.method = %method,
                server.address = %self.registry,
                url.full = %url,
                http.request.resend_count = attempt - 1,
                http.response.status_code = tracing::field::Empty,
            );
            let sent = req.send().instrument(span.clone()).await;
            let status = sent.as_ref().ok().map(|r| r.status().as_u16());
            if let Some(code) = status {
                span.record("http.response.status_code", code);
            }
            crate::telemetry::metrics().registry_request(&self.registry, method.as_str(), status);
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    drop(permit);
                    if attempt < MAX_ATTEMPTS && (e.is_timeout() || e.is_connect()) {
                        tracing::debug!(
                            registry = %self.registry, attempt, cause = %e, "retrying request"
                        );
                        tokio::time::sleep(backoff(attempt)).await;
                        continue;
                    }
                    return Err(RegistryError::Transport {
                        registry: self.registry.clone(),
                        source: e,
                    });
                }
            };
            match resp.status() {
                StatusCode::UNAUTHORIZED => {
                    drop(permit);
                    if reauthenticated {
                        return Err(self.unauthorized(what, &authorization));
                    }
                    reauthenticated = true;
                    let header = resp
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(auth::parse_challenge);
                    let Some(challenge) = header else {
                        return Err(self.unauthorized(what, &authorization));
                    };
                    // A token the registry no longer accepts must not be offered again. (On
                    // ACR a 401 also means a token without the action asked for; the refresh
                    // token it came from stays good.)
                    self.tokens
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&scope);
                    *self.challenge.lock().unwrap_or_else(|e| e.into_inner()) = Some(challenge);
                    attempt -= 1;
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    drop(permit);
                    let wait = retry_after(&resp);
                    if attempt < MAX_ATTEMPTS && wait.is_none_or(|w| w <= MAX_RETRY_AFTER) {
                        tokio::time::sleep(wait.unwrap_or_else(|| backoff(attempt))).await;
                        continue;
                    }
                    return Err(RegistryError::RateLimited {
                        registry: self.registry.clone(),
                        retry_after: wait,
                    });
                }
                s if s.is_server_error() && attempt < MAX_ATTEMPTS => {
                    drop(permit);
                    let status = s.as_u16();
                    tracing::debug!(registry = %self.registry, attempt, status, "retrying request");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                _ => return Ok((resp, permit)),
            }
        }
    }

    fn unauthorized(&self, what: &str, sent: &Option<String>) -> RegistryError {
        let detail = match (sent, &self.auth) {
            (None, Auth::Anonymous) => "the registry requires credentials; none are configured",
            (Some(_), Auth::Entra(_)) => {
                "the ACR token was rejected (does the identity hold AcrPull, or the scope's \
                 action, on this repository?)"
            }
            (None, _) => "the registry's challenge could not be answered",
            (Some(_), _) => "credentials or token rejected",
        };
        RegistryError::Unauthorized {
            registry: self.registry.clone(),
            what: what.to_string(),
            detail: detail.to_string(),
        }
    }

    /// The Authorization header for `scope`, fetching a token when the registry wants one.
    async fn authorization(&self, scope: &str) -> Result<Option<String>, RegistryError> {
        let challenge = self
            .challenge
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.basic_header()),
            Some(Challenge::Bearer { realm, service, .. }) => {
                if let Some(t) = self.cached_token(scope) {
                    return Ok(Some(t));
                }
                let _guard = self.token_fetch.lock().await;
                if let Some(t) = self.cached_token(scope) {
                    return Ok(Some(t));
                }
                let token = self.fetch_token(&realm, service.as_deref(), scope).await?;
                let header = format!("Bearer {}", token.value.expose_secret());
                self.tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(scope.to_string(), token);
                Ok(Some(header))
            }
        }
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(scope)
            .filter(|t| t.refresh_at > Instant::now())
            .map(|t| format!("Bearer {}", t.value.expose_secret()))
    }

    fn basic_header(&self) -> Option<String> {
        match &self.auth {
            Auth::Basic { username, password } => {
                let raw = format!("{username}:{}", password.expose_secret());
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                ))
            }
            Auth::Anonymous | Auth::Entra(_) => None,
        }
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Token, RegistryError> {
        if let Some(entra) = &self.entra {
            return self.acr_token(entra, realm, service, scope).await;
        }
        let token_error = |reason: String| RegistryError::Token {
            realm: realm.to_string(),
            reason,
        };
        let mut query: Vec<(&str, &str)> = vec![("scope", scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut req = self.http.get(realm).query(&query);
        if let Some(h) = self.basic_header() {
            req = req.header(AUTHORIZATION, h);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let sent = req.send().await;
        let metrics = crate::telemetry::metrics();
        let code = sent.as_ref().ok().map(|r| r.status().as_u16());
        metrics.registry_request(&self.registry, "GET", code);
        let resp = sent.map_err(|e| token_error(e.to_string()))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                registry: self.registry.clone(),
                what: format!("token for {scope}"),
                detail: format!("the token endpoint answered {}", status.as_u16()),
            });
        }
        if !status.is_success() {
            return Err(token_error(format!("status {}", status.as_u16())));
        }
        let body = read_capped(resp, 1024 * 1024)
            .await
            .map_err(|_| token_error("unreadable or oversized answer".to_string()))?;
        let token = auth::parse_token_answer(&body, Instant::now()).map_err(token_error)?;
        metrics.token_refresh(&self.registry);
        Ok(token)
    }
}

/// Up to 5 redirects, but none to another origin that would resend a body (307 and 308
/// keep the method and body, and a token service's form carries tokens).
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let resends_body = matches!(attempt.status().as_u16(), 307 | 308);
        let first = attempt.previous().first();
        let cross_origin = first.is_some_and(|f| f.origin() != attempt.url().origin());
        if attempt.previous().len() >= 5 {
            attempt.error("too many redirects")
        } else if resends_body && cross_origin {
            attempt.stop()
        } else {
            attempt.follow()
        }
    })
}

/// Entra credentials and the tokens obtained with them.
struct EntraState {
    credential: EntraCredential,
    http: reqwest::Client,
    entra_token: Mutex<Option<Token>>,
    refresh_token: Mutex<Option<Token>>,
}

impl EntraState {
    fn forget(&self) {
        *self.entra_token.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.refresh_token.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn tenant(&self) -> Option<&str> {
        match &self.credential {
            EntraCredential::ClientSecret { tenant_id, .. }
            | EntraCredential::ClientCertificate { tenant_id, .. }
            | EntraCredential::WorkloadIdentity { tenant_id, .. } => Some(tenant_id),
            EntraCredential::ManagedIdentity { .. } => None,
        }
    }
}

fn valid(slot: &Mutex<Option<Token>>) -> Option<secrecy::SecretString> {
    let slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    slot.as_ref()
        .filter(|t| t.refresh_at > Instant::now())
        .map(|t| t.value.clone())
}

impl RegistryClient {
    /// ACR's token chain for an Entra identity: an Entra token for ACR's audience, traded at
    /// `/oauth2/exchange` for an ACR refresh token, traded at the realm for an access token
    /// per scope. Each is kept until shortly before its own expiry (ACR's answers carry no
    /// `expires_in`; their JWT `exp` says it). A refresh or Entra token the token service
    /// rejects is dropped and the chain started again once.
    async fn acr_token(
        &self,
        entra: &EntraState,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Token, RegistryError> {
        // The Entra token opens every registry the identity may use: it goes only to the
        // registry's own token service, whatever realm a challenge names.
        if !same_origin(realm, &self.base) {
            return Err(RegistryError::Token {
                realm: realm.to_string(),
                reason: format!(
                    "the challenge names a token service outside {}; an Entra token is only \
                     sent to the registry itself",
                    self.base
                ),
            });
        }
        let service = service.unwrap_or(&self.registry);
        let exchange = format!("{}/oauth2/exchange", self.base);
        let mut retried = false;
        loop {
            let refresh = match valid(&entra.refresh_token) {
                Some(t) => t,
                None => {
                    let access = match valid(&entra.entra_token) {
                        Some(t) => t,
                        None => {
                            let token = entra::token(&entra.http, &entra.credential)
                                .await
                                .map_err(|e| RegistryError::Token {
                                    realm: e.endpoint,
                                    reason: format!("Entra ID: {}", e.reason),
                                })?;
                            crate::telemetry::metrics().token_refresh(&self.registry);
                            let value = token.value.clone();
                            *entra.entra_token.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(token);
                            value
                        }
                    };
                    let mut form = vec![
                        ("grant_type", "access_token"),
                        ("service", service),
                        ("access_token", access.expose_secret()),
                    ];
                    if let Some(tenant) = entra.tenant() {
                        form.push(("tenant", tenant));
                    }
                    match self.token_post(&exchange, &form).await {
                        Ok(token) => {
                            let value = token.value.clone();
                            *entra
                                .refresh_token
                                .lock()
                                .unwrap_or_else(|e| e.into_inner()) = Some(token);
                            value
                        }
                        Err(TokenPostError::Rejected(e)) if !retried => {
                            tracing::debug!(cause = %e, "Entra token rejected; logging in again");
                            entra.forget();
                            retried = true;
                            continue;
                        }
                        Err(TokenPostError::Rejected(e) | TokenPostError::Failed(e)) => {
                            return Err(e);
                        }
                    }
                }
            };
            let form = [
                ("grant_type", "refresh_token"),
                ("service", service),
                ("scope", scope),
                ("refresh_token", refresh.expose_secret()),
            ];
            match self.token_post(realm, &form).await {
                Ok(token) => return Ok(token),
                Err(TokenPostError::Rejected(e)) if !retried => {
                    tracing::debug!(cause = %e, "ACR refresh token rejected; exchanging again");
                    *entra
                        .refresh_token
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = None;
                    retried = true;
                }
                Err(TokenPostError::Rejected(e) | TokenPostError::Failed(e)) => return Err(e),
            }
        }
    }

    /// A form POST to ACR's token service, read as a token answer.
    async fn token_post(&self, url: &str, form: &[(&str, &str)]) -> Result<Token, TokenPostError> {
        let token_error = |reason: String| RegistryError::Token {
            realm: url.to_string(),
            reason,
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let sent = self.http.post(url).form(form).send().await;
        let metrics = crate::telemetry::metrics();
        metrics.registry_request(
            &self.registry,
            "POST",
            sent.as_ref().ok().map(|r| r.status().as_u16()),
        );
        let resp =
            sent.map_err(|e| TokenPostError::Failed(token_error(crate::cycle::error_chain(&e))))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(TokenPostError::Rejected(token_error(format!(
                "status {}: the token service refused the identity (is it granted access to \
                 this registry, e.g. the AcrPull role?)",
                status.as_u16()
            ))));
        }
        if !status.is_success() {
            return Err(TokenPostError::Failed(token_error(format!(
                "status {}",
                status.as_u16()
            ))));
        }
        let body = read_capped(resp, 1024 * 1024).await.map_err(|_| {
            TokenPostError::Failed(token_error("unreadable or oversized answer".to_string()))
        })?;
        let token = auth::parse_token_answer(&body, Instant::now())
            .map_err(|reason| TokenPostError::Failed(token_error(reason)))?;
        metrics.token_refresh(&self.registry);
        Ok(token)
    }
}

/// How a POST to ACR's token service failed.
enum TokenPostError {
    /// 401 or 403: what was offered (an Entra or refresh token) is not accepted.
    Rejected(RegistryError),
    /// Anything else.
    Failed(RegistryError),
}

/// Whether `url` is on the origin `base` (`scheme://host[:port]`).
fn same_origin(url: &str, base: &str) -> bool {
    url.strip_prefix(base)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn manifest_path(repository: &str, reference: &str) -> String {
    format!("/v2/{repository}/manifests/{reference}")
}

fn header_text(resp: &Response, name: reqwest::header::HeaderName) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn content_type(resp: &Response) -> String {
    resp.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| manifest::bare_media_type(v).to_string())
        .unwrap_or_default()
}

/// The first error code of a distribution error body, `{"errors":[{"code":…}]}`.
fn error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("errors")?
        .get(0)?
        .get("code")?
        .as_str()
        .map(str::to_string)
}

fn retry_after(resp: &Response) -> Option<Duration> {
    parse_retry_after(resp.headers().get(RETRY_AFTER)?.to_str().ok()?)
}

/// A `Retry-After` value: delay seconds, or an HTTP date (a date past gives zero).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let left = when
        .signed_duration_since(chrono::Utc::now())
        .num_milliseconds();
    Some(Duration::from_millis(left.max(0) as u64))
}

/// Exponential backoff with jitter: about 200 ms, 400 ms, 800 ms, each ±50 %.
fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_BASE * 2u32.saturating_pow(attempt.saturating_sub(1));
    base.mul_f64(0.5 + fastrand::f64())
}

enum ReadError {
    TooLarge,
    Http(reqwest::Error),
}

async fn read_capped(mut resp: Response, limit: usize) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut body = Vec::with_capacity(resp.content_length().unwrap_or(0) as usize);
    while let Some(chunk) = resp.chunk().await.map_err(ReadError::Http)? {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
