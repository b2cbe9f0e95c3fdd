//! Test double standing in for misbehaving registries: an in-process axum server on 127.0.0.1
//! whose answers (wrong digests, truncation, throttling, token auth) are scripted per test.
//! It replaces hostile remote registries only, never any part of driftwatch under test.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Uri, header};
use base64::Engine;

use super::oci::{self, OCI_MANIFEST};

/// Size of the body served by [`Behavior::Oversized`]: far beyond any sane manifest limit.
pub const OVERSIZED_LEN: usize = 5 * 1024 * 1024;

/// How the fake answers one manifest request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behavior {
    /// A correct answer: Docker-Content-Digest is the sha256 of `body`.
    Serve { media_type: String, body: Vec<u8> },
    /// The body is fine but the digest header names some other content.
    WrongDigestHeader { media_type: String, body: Vec<u8> },
    /// No Docker-Content-Digest header on HEAD or GET.
    NoDigestHeader { media_type: String, body: Vec<u8> },
    /// A 5 MiB body labelled as an OCI manifest (HEAD gets only the headers).
    Oversized,
    /// The first half of a manifest's JSON, with a digest header matching those bytes.
    Truncated { media_type: String },
    /// An arbitrary status with extra headers and a body (which HEAD omits).
    Status {
        code: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Accepts the request and never answers, for client timeout tests.
    Hang,
    /// Each request takes the next behaviour; the last one repeats forever.
    Sequence(Vec<Behavior>),
}

impl Behavior {
    pub fn serve(media_type: &str, body: impl Into<Vec<u8>>) -> Behavior {
        Behavior::Serve {
            media_type: media_type.to_owned(),
            body: body.into(),
        }
    }

    /// Serves a unique, well-formed OCI image manifest derived from `seed`.
    pub fn serve_manifest(seed: &str) -> Behavior {
        Behavior::serve(OCI_MANIFEST, oci::sample_manifest(seed))
    }

    pub fn status(code: u16, body: &str) -> Behavior {
        Behavior::Status {
            code,
            headers: Vec::new(),
            body: body.to_owned(),
        }
    }

    /// 429 with `Retry-After: <secs>`, as rate-limited registries answer.
    pub fn too_many_requests(retry_after_secs: u64) -> Behavior {
        Behavior::Status {
            code: 429,
            headers: vec![("Retry-After".to_owned(), retry_after_secs.to_string())],
            body: error_body("TOOMANYREQUESTS", "too many requests"),
        }
    }

    /// 404 with the distribution spec's MANIFEST_UNKNOWN error body.
    pub fn manifest_unknown() -> Behavior {
        Behavior::status(404, &error_body("MANIFEST_UNKNOWN", "manifest unknown"))
    }

    /// 404 with an empty body, as some proxies and CDNs answer.
    pub fn not_found_empty() -> Behavior {
        Behavior::status(404, "")
    }

    /// 403 with a DENIED error body.
    pub fn denied() -> Behavior {
        Behavior::status(
            403,
            &error_body("DENIED", "requested access to the resource is denied"),
        )
    }

    /// Flattens nested sequences so the cursor walks plain behaviours only.
    fn flatten(self, into: &mut Vec<Behavior>) {
        match self {
            Behavior::Sequence(steps) => steps.into_iter().for_each(|b| b.flatten(into)),
            other => into.push(other),
        }
    }
}

/// `{"errors":[{"code":CODE,"message":MESSAGE}]}` as the distribution spec defines it.
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] })
        .to_string()
}

/// Authentication the whole fake demands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    /// Token auth through the fake's own `/token` endpoint.
    Bearer {
        token_lifetime_secs: u64,
    },
    Basic {
        user: String,
        pass: String,
    },
}

/// One request as the fake saw it, before any auth decision.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub accept: Option<String>,
    pub if_none_match: Option<String>,
    /// Status sent back; `None` while the answer is pending (e.g. [`Behavior::Hang`]).
    pub status: Option<u16>,
    pub at: Instant,
}

/// One call to `/token` and what it handed out.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub scope: Option<String>,
    pub service: Option<String>,
    pub authorization: Option<String>,
    pub token: String,
    pub at: Instant,
}

struct Script {
    steps: Vec<Behavior>,
    next: usize,
}

impl Script {
    fn new(behavior: Behavior) -> Script {
        let mut steps = Vec::new();
        behavior.flatten(&mut steps);
        assert!(
            !steps.is_empty(),
            "Behavior::Sequence needs at least one step"
        );
        Script { steps, next: 0 }
    }

    fn take(&mut self) -> Behavior {
        let step = self.steps[self.next.min(self.steps.len() - 1)].clone();
        self.next += 1;
        step
    }
}

struct FakeState {
    port: u16,
    by_reference: HashMap<String, Script>,
    by_name_and_reference: HashMap<(String, String), Script>,
    /// Answers for any other path (with its query), e.g. referrers pages and tag lists.
    by_path: HashMap<String, Script>,
    auth: Auth,
    /// Valid tokens and when each expires; revocation simply forgets them.
    tokens: HashMap<String, Instant>,
    token_counter: u64,
    requests: Vec<RecordedRequest>,
    token_requests: Vec<TokenRequest>,
}

type Shared = Arc<Mutex<FakeState>>;

fn lock(state: &Shared) -> MutexGuard<'_, FakeState> {
    // A panic in one handler must not hide every later request from the test.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The hostile registry. It runs on its own thread and runtime, so it keeps answering even
/// while a test blocks on a child process or uses a paused or current-thread runtime.
pub struct FakeRegistry {
    port: u16,
    state: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeRegistry {
    /// Starts the fake; it is accepting connections when this returns.
    pub async fn start() -> FakeRegistry {
        FakeRegistry::start_blocking()
    }

    /// Same as [`FakeRegistry::start`] for synchronous tests.
    pub fn start_blocking() -> FakeRegistry {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("local addr").port();
        let state: Shared = Arc::new(Mutex::new(FakeState {
            port,
            by_reference: HashMap::new(),
            by_name_and_reference: HashMap::new(),
            by_path: HashMap::new(),
            auth: Auth::None,
            tokens: HashMap::new(),
            token_counter: 0,
            requests: Vec::new(),
            token_requests: Vec::new(),
        }));
        let app = Router::new().fallback(handle).with_state(state.clone());
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("fake-registry-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake registry runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("adopt listener");
                    // Not a graceful shutdown: a Hang request would wait forever. Dropping the
                    // runtime at the end of this thread cancels every open connection.
                    tokio::select! {
                        served = axum::serve(listener, app).into_future() => {
                            served.expect("fake registry server");
                        }
                        _ = stopped => {}
                    }
                });
            })
            .expect("spawn fake registry thread");
        FakeRegistry {
            port,
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// Scripts the answer for `reference` (a tag or digest) in any repository. References
    /// with no script get 404 MANIFEST_UNKNOWN. Like a real registry, the fake also serves
    /// the same answer under the digest it advertises for it, unless that digest has a script
    /// of its own, so a client that fetches by digest after a HEAD by tag meets the same lie.
    pub fn set(&self, reference: &str, behavior: Behavior) {
        let mut state = lock(&self.state);
        if let Some(digest) = advertised_digest(&behavior)
            && digest != reference
        {
            state
                .by_reference
                .entry(digest)
                .or_insert_with(|| Script::new(behavior.clone()));
        }
        state
            .by_reference
            .insert(reference.to_owned(), Script::new(behavior));
    }

    /// Scripts the answer for `reference` in repository `name` only; this wins over
    /// [`FakeRegistry::set`].
    pub fn set_for(&self, name: &str, reference: &str, behavior: Behavior) {
        lock(&self.state).by_name_and_reference.insert(
            (name.to_owned(), reference.to_owned()),
            Script::new(behavior),
        );
    }

    /// Scripts the answer for a GET of `path_and_query` outside the manifest routes, such as
    /// `/v2/team/api/referrers/sha256:…` or `/v2/team/api/tags/list?n=1000`.
    pub fn set_path(&self, path_and_query: &str, behavior: Behavior) {
        lock(&self.state)
            .by_path
            .insert(path_and_query.to_owned(), Script::new(behavior));
    }

    /// Forgets every script, so all references answer 404 again.
    pub fn clear(&self) {
        let mut state = lock(&self.state);
        state.by_reference.clear();
        state.by_name_and_reference.clear();
    }

    pub fn set_auth(&self, auth: Auth) {
        lock(&self.state).auth = auth;
    }

    /// Invalidates every token issued so far; later requests bearing them get 401.
    pub fn revoke_tokens(&self) {
        lock(&self.state).tokens.clear();
    }

    pub fn token_requests(&self) -> Vec<TokenRequest> {
        lock(&self.state).token_requests.clone()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state).requests.clone()
    }

    /// Requests whose method equals `method` (case-insensitive) and whose path starts with
    /// `path_prefix`.
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        lock(&self.state)
            .requests
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path.starts_with(path_prefix))
            .count()
    }

    pub fn clear_requests(&self) {
        let mut state = lock(&self.state);
        state.requests.clear();
        state.token_requests.clear();
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // The server may already be gone if it panicked; nothing to do then.
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn handle(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response<Body> {
    let index = record(&state, &method, &uri, &headers);
    let response = route(&state, &method, &uri, &headers).await;
    if let Some(request) = lock(&state).requests.get_mut(index) {
        request.status = Some(response.status().as_u16());
    }
    response
}

fn record(state: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap) -> usize {
    let mut state = lock(state);
    state.requests.push(RecordedRequest {
        method: method.as_str().to_owned(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        authorization: header_str(headers, header::AUTHORIZATION),
        accept: header_str(headers, header::ACCEPT),
        if_none_match: header_str(headers, header::IF_NONE_MATCH),
        status: None,
        at: Instant::now(),
    });
    state.requests.len() - 1
}

async fn route(state: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap) -> Response<Body> {
    let path = uri.path();
    if path == "/token" {
        return issue_token(state, uri, headers);
    }
    if path == "/v2/" || path == "/v2" {
        if let Some(denied) = check_auth(state, headers, None) {
            return denied;
        }
        return json_response(StatusCode::OK, "{}".to_owned());
    }
    let full = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let scripted = lock(state).by_path.get_mut(&full).map(Script::take);
    if let Some(behavior) = scripted {
        let name = path
            .strip_prefix("/v2/")
            .and_then(|r| r.split_once('/'))
            .map(|(n, _)| n);
        if let Some(denied) = check_auth(state, headers, name) {
            return denied;
        }
        return respond(behavior, method == Method::HEAD).await;
    }
    let Some((name, reference)) = path
        .strip_prefix("/v2/")
        .and_then(|rest| rest.rsplit_once("/manifests/"))
        .filter(|(name, reference)| !name.is_empty() && !reference.is_empty())
    else {
        let body = error_body("UNSUPPORTED", "the fake registry only serves manifests");
        return json_response(StatusCode::NOT_FOUND, body);
    };
    let (name, reference) = (percent_decode(name), percent_decode(reference));
    if let Some(denied) = check_auth(state, headers, Some(&name)) {
        return denied;
    }
    if method != Method::GET && method != Method::HEAD {
        let body = error_body("UNSUPPORTED", "the fake registry is read-only");
        return json_response(StatusCode::METHOD_NOT_ALLOWED, body);
    }
    let behavior = {
        let mut state = lock(state);
        let key = (name, reference);
        match state.by_name_and_reference.get_mut(&key) {
            Some(script) => Some(script.take()),
            None => state.by_reference.get_mut(&key.1).map(Script::take),
        }
    };
    let head = method == Method::HEAD;
    match behavior {
        Some(behavior) => respond(behavior, head).await,
        None => respond(Behavior::manifest_unknown(), head).await,
    }
}

/// The digest `respond` puts in `Docker-Content-Digest` for a behaviour, where it is fixed.
fn advertised_digest(behavior: &Behavior) -> Option<String> {
    match behavior {
        Behavior::Serve { body, .. } => Some(oci::sha256_digest(body)),
        Behavior::WrongDigestHeader { body, .. } => {
            let mut other = body.clone();
            other.extend_from_slice(b"\n-- not the served content --");
            Some(oci::sha256_digest(&other))
        }
        Behavior::Oversized => Some(oversized().1.to_string()),
        Behavior::Truncated { .. } => {
            let full = oci::sample_manifest("truncated");
            Some(oci::sha256_digest(&full[..full.len() / 2]))
        }
        _ => None,
    }
}

async fn respond(behavior: Behavior, head: bool) -> Response<Body> {
    match behavior {
        Behavior::Serve { media_type, body } => {
            let digest = oci::sha256_digest(&body);
            manifest_response(&media_type, body, Some(&digest), head)
        }
        Behavior::WrongDigestHeader { media_type, body } => {
            let mut other = body.clone();
            other.extend_from_slice(b"\n-- not the served content --");
            let digest = oci::sha256_digest(&other);
            manifest_response(&media_type, body, Some(&digest), head)
        }
        Behavior::NoDigestHeader { media_type, body } => {
            manifest_response(&media_type, body, None, head)
        }
        Behavior::Oversized => {
            let (body, digest) = oversized();
            // Sending the same 5 MiB on every GET is the point; HEAD only sees its size.
            let body = if head { Vec::new() } else { body.clone() };
            let mut response = manifest_response(OCI_MANIFEST, body, Some(digest), head);
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(OVERSIZED_LEN));
            response
        }
        Behavior::Truncated { media_type } => {
            let full = oci::sample_manifest("truncated");
            let body = full[..full.len() / 2].to_vec();
            let digest = oci::sha256_digest(&body);
            manifest_response(&media_type, body, Some(&digest), head)
        }
        Behavior::Status {
            code,
            headers,
            body,
        } => {
            let status = StatusCode::from_u16(code).expect("valid status code");
            let mut builder = Response::builder().status(status);
            let has_type = headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
            if !body.is_empty() && !has_type {
                builder = builder.header(header::CONTENT_TYPE, "application/json; charset=utf-8");
            }
            for (name, value) in &headers {
                let name = HeaderName::from_bytes(name.as_bytes()).expect("valid header name");
                let value = HeaderValue::from_str(value).expect("valid header value");
                builder = builder.header(name, value);
            }
            builder = builder.header(header::CONTENT_LENGTH, body.len());
            let body = if head {
                Body::empty()
            } else {
                Body::from(body)
            };
            builder.body(body).expect("status response")
        }
        Behavior::Hang => std::future::pending::<Response<Body>>().await,
        Behavior::Sequence(_) => unreachable!("sequences are flattened when scripted"),
    }
}

/// Builds a manifest answer; for HEAD the body is dropped but Content-Length still states
/// what GET would send, as real registries do.
fn manifest_response(
    media_type: &str,
    body: Vec<u8>,
    digest: Option<&str>,
    head: bool,
) -> Response<Body> {
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, media_type)
        .header(header::CONTENT_LENGTH, body.len())
        .header("Docker-Distribution-Api-Version", "registry/2.0");
    if let Some(digest) = digest {
        builder = builder.header("Docker-Content-Digest", digest);
    }
    let body = if head {
        Body::empty()
    } else {
        Body::from(body)
    };
    builder.body(body).expect("manifest response")
}

fn oversized() -> &'static (Vec<u8>, String) {
    static OVERSIZED: OnceLock<(Vec<u8>, String)> = OnceLock::new();
    OVERSIZED.get_or_init(|| {
        // Starts like a manifest so a client that streams and parses early still sees JSON.
        let mut body =
            format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","annotations":{{"pad":""#)
                .into_bytes();
        body.resize(OVERSIZED_LEN - 3, b'x');
        body.extend_from_slice(br#""}}"#);
        let digest = oci::sha256_digest(&body);
        (body, digest)
    })
}

/// Returns the 401 to send, or `None` when the request may proceed.
fn check_auth(state: &Shared, headers: &HeaderMap, name: Option<&str>) -> Option<Response<Body>> {
    let state = lock(state);
    let given = header_str(headers, header::AUTHORIZATION);
    let challenge = match &state.auth {
        Auth::None => return None,
        Auth::Bearer { .. } => {
            let valid = given
                .as_deref()
                .and_then(|v| strip_scheme(v, "Bearer"))
                .and_then(|token| state.tokens.get(token))
                .is_some_and(|expiry| Instant::now() < *expiry);
            if valid {
                return None;
            }
            let mut challenge = format!(
                "Bearer realm=\"http://127.0.0.1:{}/token\",service=\"fake\"",
                state.port
            );
            if let Some(name) = name {
                challenge.push_str(&format!(",scope=\"repository:{name}:pull\""));
            }
            challenge
        }
        Auth::Basic { user, pass } => {
            let expected =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            let valid = given
                .as_deref()
                .and_then(|v| strip_scheme(v, "Basic"))
                .is_some_and(|creds| creds == expected);
            if valid {
                return None;
            }
            "Basic realm=\"fake\"".to_owned()
        }
    };
    let body = error_body("UNAUTHORIZED", "authentication required");
    let mut response = json_response(StatusCode::UNAUTHORIZED, body);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_str(&challenge).expect("valid challenge"),
    );
    Some(response)
}

fn issue_token(state: &Shared, uri: &Uri, headers: &HeaderMap) -> Response<Body> {
    let mut state = lock(state);
    let lifetime = match state.auth {
        Auth::Bearer {
            token_lifetime_secs,
        } => token_lifetime_secs,
        // Outside Bearer mode tokens are useless but harmless; give them a nominal lifetime.
        _ => 60,
    };
    state.token_counter += 1;
    let token = format!(
        "fake-token-{}-{:016x}",
        state.token_counter,
        fastrand::u64(..)
    );
    let now = Instant::now();
    state
        .tokens
        .insert(token.clone(), now + Duration::from_secs(lifetime));
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    state.token_requests.push(TokenRequest {
        scope: query.get("scope").cloned(),
        service: query.get("service").cloned(),
        authorization: header_str(headers, header::AUTHORIZATION),
        token: token.clone(),
        at: now,
    });
    let body = serde_json::json!({ "token": token, "expires_in": lifetime });
    json_response(StatusCode::OK, body.to_string())
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header("Docker-Distribution-Api-Version", "registry/2.0")
        .body(Body::from(body))
        .expect("json response")
}

fn header_str(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Strips an auth scheme case-insensitively, as RFC 9110 says schemes are.
fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, rest) = value.split_once(' ')?;
    given.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

/// Decodes `%XX` escapes so `sha256%3Aabc` and `sha256:abc` name the same reference.
fn percent_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
