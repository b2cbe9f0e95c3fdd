//! Test double for Azure Container Registry (ACR) and the Azure identity endpoints in front of
//! it, for tests that cannot reach Azure. Facts and guesses are labelled against
//! `../shared/reference/acr-oci.md` (cited below as "ref §N").
//!
//! # What it stands in for
//!
//! Three listeners on 127.0.0.1 (plain HTTP), served by one background thread with its own
//! tokio runtime, all backed by in-memory state the test controls:
//!
//! 1. **The registry** ([`AcrDouble::base_url`], login server [`AcrDouble::login_server`]):
//!    ACR's token service (`/oauth2/exchange`, `/oauth2/token`), the OCI `/v2` data plane
//!    (manifests, tag listing, referrers, delete), the `/acr/v1` metadata API and the
//!    undocumented `/acr/v1/_deleted` soft-delete listings.
//! 2. **Microsoft Entra ID** ([`AcrDouble::authority_host`]):
//!    `POST /{tenant}/oauth2/v2.0/token` for the client-credentials grant with a client secret,
//!    a certificate assertion, or a federated (workload identity) assertion.
//! 3. **Managed identity endpoints**: the VM Instance Metadata Service
//!    ([`AcrDouble::imds_endpoint`], `GET /metadata/identity/oauth2/token`) and the App Service
//!    / Container Apps `IDENTITY_ENDPOINT` ([`AcrDouble::identity_endpoint`]).
//!
//! It replaces none of driftwatch, and not Azure Resource Manager: the soft-delete retention
//! and the ARM-audience policy are switches on the double, not ARM calls. Not served: pushes
//! over HTTP (tests push through [`AcrDouble::push_image`] and friends), blobs, the catalogs,
//! `PATCH` of attributes (tests use [`AcrDouble::set_tag_attributes`] and friends).
//!
//! # Documented facts it follows
//!
//! - Challenge `401` + `WWW-Authenticate: Bearer realm="<base>/oauth2/token",service="<login>"`
//!   plus `scope="repository:<repo>:<action>"` (or `registry:catalog:*`), with the `UNAUTHORIZED`
//!   body whose `detail` names the scope: ref §2a, §1.8.
//! - `POST /oauth2/exchange` (`grant_type=access_token`, `service`, optional `tenant`,
//!   `access_token`) answers `{"refresh_token":…}`; `POST /oauth2/token`
//!   (`grant_type=refresh_token|password`, repeatable `scope`) and the Basic-auth
//!   `GET /oauth2/token?service=&scope=` answer `{"access_token":…}`; **no `expires_in`**,
//!   so clients must read the JWT `exp`: ref §2a. Basic credentials also work straight on
//!   `/v2` and `/acr/v1`, and the null-GUID username takes an ACR refresh token as password:
//!   ref §2a table.
//! - ACR JWT claim sets (`jti, sub, nbf, exp, iat, iss, aud, version, grant_type, tenant,
//!   permissions, roles` for refresh tokens; `access: [{type, name, actions}]` for access
//!   tokens): Azure/acr docs/AAD-OAuth.md (ref source S4).
//! - The server grants the intersection of requested and allowed actions; fewer rights are
//!   not an error at the token endpoint: ref §1.9.
//! - The ACR audience `https://containerregistry.azure.net` (`/.default` on the v2 endpoint,
//!   `resource=` on IMDS); the ARM audience works unless the registry disables it: ref §2a.
//! - IMDS: `api-version=2018-02-01`, `resource=`, optional `client_id=`, required
//!   `Metadata: true`; answer fields `access_token, refresh_token:"", expires_in, expires_on,
//!   not_before, resource, token_type` with numbers **as strings**: ref §2a.
//! - Workload identity: `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:
//!   jwt-bearer`, `client_assertion=<token file contents>`, federated audience
//!   `api://AzureADTokenExchange`, the file rotates: ref §2a.
//! - Manifests: `Content-Type`, `Content-Length`, `Docker-Content-Digest` on GET and HEAD;
//!   `404 MANIFEST_UNKNOWN` vs `404 NAME_UNKNOWN`; `DELETE` → `202`: ref §1.3, §1.7, §1.8.
//! - Referrers: an OCI index (empty rather than 404), `artifactType` falling back to
//!   `config.mediaType`, annotations copied, `Link` pagination, `OCI-Filters-Applied:
//!   artifactType`, `400 DIGEST_INVALID` on a malformed digest: ref §1.5, §2d.
//! - `/v2/<repo>/tags/list` with `n`/`last` and `Link`: ref §1.6.
//! - `/acr/v1`: `TagAttributes` (`tag` member), `TagList`, `ManifestAttributes` (`manifest`
//!   member), `AcrManifests`, `RepositoryAttributes`; `n`, `last`, `orderby=timedesc|timeasc`;
//!   relative `Link: </acr/v1/…?last=…&n=…&orderby=…>; rel="next"`; `tags` omitted once a
//!   manifest is untagged; `quarantineState`/`quarantineDetails` inside
//!   `changeableAttributes`; `references` only on indexes; `listEnabled=false` hides from
//!   listings; tag and manifest locks are independent; scope `metadata_read`: ref §2b.
//! - A quarantined manifest pulled by tag looks "not found": ref §2b.
//! - Soft delete: the `_deleted` paths, their `deleted_read` scope and the item fields
//!   (`digest, createdAt, deletedAt` / `tag, digest, createdAt, deletedAt`) as azure-cli reads
//!   them ([V-code] only); entries listed oldest first (the CLI takes the last match as most
//!   recent); untag creates a deleted-tag entry; re-pushing a soft-deleted digest is refused;
//!   deleting a subject takes its referrers along and restoring it does not bring them back;
//!   geo-replicated registries have no soft delete: ref §2c, §2d, §6.
//! - Inbound hook payloads: the ACR webhook push/delete samples (ref §2e, S7), the Event Grid
//!   `ImagePushed`/`ImageDeleted` examples (ref §2f, S9) and the `SubscriptionValidation`
//!   event with its `aeg-event-type` header (ref §2f, S8).
//!
//! # UNVERIFIED shapes (guesses; a live registry may differ)
//!
//! - Everything about `/acr/v1/_deleted` beyond the fields above: the `404` for an
//!   unsupported registry (here a plain-text Go-style `404 page not found`), the `403 DENIED`
//!   for no permission, and the pagination cursor (here `last=<opaque sequence>` in `Link`;
//!   clients must follow `Link`, not compute `last`). A push that moves a tag creates no
//!   deleted-tag entry here. `POST …/_deleted/…` (restore) is not served; use
//!   [`AcrDouble::restore`].
//! - A token that lacks a needed action gets `401` with a challenge naming the scope
//!   (default; switch to `403 DENIED` with [`AcrDouble::set_denied_status`]).
//! - Error bodies of the exchange/token endpoints (`401 UNAUTHORIZED` in the distribution
//!   error shape), of Entra (`{"error","error_description","error_codes",…}` with AADSTS
//!   codes) and of IMDS (`{"error","error_description"}`).
//! - The claims of the double's Entra tokens (`aud, iss, appid, oid, tid, …`); clients
//!   should treat them as opaque.
//! - The whole App Service flow: path `/msi/token`, header `X-IDENTITY-HEADER`,
//!   `api-version=2019-08-01`, answer `{access_token, expires_on:"<unix secs>", resource,
//!   token_type, client_id}`. IMDS selectors other than `client_id` (`object_id`,
//!   `mi_res_id`/`msi_res_id`) are recorded and refused.
//! - Certificate credentials: the assertion must be a JWT whose header has `x5t` or
//!   `x5t#S256` (matched when the test configures a thumbprint) and whose claims have
//!   `aud` = this token endpoint, `iss` = `sub` = client id, and an `exp` in the future. **The
//!   signature is not verified**; tests that care can check [`EntraRequest::client_assertion`].
//! - Quarantine (state other than `Passed`) or `readEnabled=false` on a pull by digest:
//!   `403 UNKNOWN` "The operation is disallowed…"; a locked manifest or tag refuses `DELETE`
//!   with `405`. `TAG_UNKNOWN` for a missing tag on `/acr/v1`.
//! - Page sizes: `/acr/v1` and `/v2/tags/list` cap `n` at 100 (the CLI sends `n=100`) and
//!   use it when `n` is absent; the body's `link` repeats the header. Referrers pages hold 50
//!   and their `Link` carries `last=<digest>&n=<size>`; `OCI-Filters-Applied` is sent unless
//!   switched off.
//! - Timestamps are RFC 3339 UTC with up to 7 fractional digits, trailing zeros dropped, as
//!   the samples look. No `ETag`/`If-None-Match` and no `Retry-After` behaviour.
//! - Normal Event Grid deliveries carrying `aeg-event-type: Notification`; the CloudEvents
//!   event as one structured-mode object.
//!
//! # JWTs
//!
//! Every token is `base64url(header).base64url(claims).`[`JWT_SIGNATURE`]: a fixed, fake
//! signature. The double recognises only tokens it issued (by exact string) and checks expiry
//! against its own clock ([`AcrDouble::advance_clock`] moves it); `exp` is whole Unix seconds
//! and a token is valid while `now < exp`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::IntoFuture;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, header};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Timelike, Utc};
use serde_json::{Value, json};

use super::oci::{self, Descriptor, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, Platform};

/// Entra tenant the double's directory answers for.
pub const TENANT_ID: &str = "6d1b0f3e-2c4a-4e8b-9f71-5a0c3d2e1b40";
/// Service principal (app registration) client id.
pub const SP_CLIENT_ID: &str = "0c8e4a52-7b1d-4f3e-a6c9-21d5e8f0b7a3";
/// The service principal's client secret.
pub const SP_CLIENT_SECRET: &str = "dw~test.secret-Q8v2L0xYp4N7";
/// Client id of the app registration a workload identity federates with.
pub const WORKLOAD_CLIENT_ID: &str = "4f2a9c61-0d3e-4b7a-8e15-c6b9d2a0f384";
/// Client id of a user-assigned managed identity.
pub const MI_CLIENT_ID: &str = "9b3d7e20-6a1c-4f58-b2e4-0d8c5a7f1e96";
/// Client id the double reports for the system-assigned managed identity.
pub const SYSTEM_MI_CLIENT_ID: &str = "e1c05a7d-3f92-4b68-9a0e-7d4b2c8f5a13";
/// Value of `IDENTITY_HEADER` for the App Service / Container Apps variant.
pub const IDENTITY_HEADER_VALUE: &str = "dw-identity-header-5f1c7a";
/// Admin user name and password (ACR's admin account, disabled until enabled).
pub const ADMIN_USERNAME: &str = "driftwatchtest";
pub const ADMIN_PASSWORD: &str = "admin-password-r2D9kX";
/// Username telling ACR that the password is an ACR refresh token (ref §2a).
pub const NULL_GUID_USERNAME: &str = "00000000-0000-0000-0000-000000000000";
/// Registry name used in Event Grid topics (the login server itself is 127.0.0.1:PORT).
pub const REGISTRY_NAME: &str = "driftwatchtest";
/// Subscription and resource group used in Event Grid topics.
pub const SUBSCRIPTION_ID: &str = "3c7f1a94-8e2b-4d06-b5a1-9f0e6c2d7b58";
pub const RESOURCE_GROUP: &str = "driftwatch-tests";

/// The ACR audience (v1 `resource`) and its v2 `scope`.
pub const ACR_AUDIENCE: &str = "https://containerregistry.azure.net";
pub const ACR_SCOPE: &str = "https://containerregistry.azure.net/.default";
/// The ARM audience, accepted by the exchange unless [`AcrDouble::set_arm_audience_allowed`].
pub const ARM_AUDIENCE: &str = "https://management.azure.com/";
/// The audience a federated service-account token carries.
pub const FEDERATED_TOKEN_AUDIENCE: &str = "api://AzureADTokenExchange";
/// `client_assertion_type` for certificate and federated assertions.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub const IMDS_TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
pub const IMDS_API_VERSION: &str = "2018-02-01";
pub const APP_SERVICE_TOKEN_PATH: &str = "/msi/token";
pub const APP_SERVICE_API_VERSION: &str = "2019-08-01";

/// The fixed third part of every JWT the double issues (base64url of "driftwatch acr double:
/// not signed"); no signature is computed or checked.
pub const JWT_SIGNATURE: &str = "ZHJpZnR3YXRjaCBhY3IgZG91YmxlOiBub3Qgc2lnbmVk";

/// Event Grid's delivery header and its values (ref §2f).
pub const AEG_EVENT_TYPE: &str = "aeg-event-type";
pub const AEG_SUBSCRIPTION_VALIDATION: &str = "SubscriptionValidation";
pub const AEG_NOTIFICATION: &str = "Notification";

/// Common artifact types for referrers.
pub const NOTARY_SIGNATURE: &str = "application/vnd.cncf.notary.signature";
pub const SPDX_SBOM: &str = "application/spdx+json";

/// Every repository action the double knows (ref §2a); all are granted by default.
pub const ALL_ACTIONS: &[&str] = &[
    "pull",
    "push",
    "delete",
    "metadata_read",
    "metadata_write",
    "deleted_read",
    "deleted_restore",
];

const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";
const ACR_ISSUER: &str = "Azure Container Registry";
const DISALLOWED: &str = "The operation is disallowed on this registry, repository or image.";
const DEFAULT_PAGE_LIMIT: usize = 100;
const DEFAULT_REFERRERS_PAGE: usize = 50;
const POLL: Duration = Duration::from_millis(10);

/// Lock flags of a tag or manifest (ref §2b `changeableAttributes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeableAttributes {
    pub delete_enabled: bool,
    pub write_enabled: bool,
    pub read_enabled: bool,
    pub list_enabled: bool,
}

impl Default for ChangeableAttributes {
    fn default() -> Self {
        ChangeableAttributes {
            delete_enabled: true,
            write_enabled: true,
            read_enabled: true,
            list_enabled: true,
        }
    }
}

impl ChangeableAttributes {
    /// `az acr repository update --write-enabled false --delete-enabled false`, the usual
    /// "lock" of a production tag.
    pub fn locked() -> Self {
        ChangeableAttributes {
            delete_enabled: false,
            write_enabled: false,
            ..ChangeableAttributes::default()
        }
    }

    fn json(&self) -> Value {
        json!({
            "deleteEnabled": self.delete_enabled,
            "writeEnabled": self.write_enabled,
            "readEnabled": self.read_enabled,
            "listEnabled": self.list_enabled,
        })
    }
}

/// How `/acr/v1/_deleted/...` answers, whatever the soft-delete policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletedApi {
    /// The listings work (empty when nothing was soft-deleted).
    Serve,
    /// The endpoint does not exist, as on a geo-replicated registry: `404`.
    NotFound,
    /// The caller lacks `registries/deleted/read`: `403 DENIED`.
    Forbidden,
}

/// Which listener a request reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Registry,
    Entra,
    Identity,
}

/// One request as a listener saw it, before any auth decision.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub listener: Listener,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Every header, names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub authorization: Option<String>,
    /// The body as text (form posts); empty for GET/HEAD.
    pub body: String,
    /// Status sent back; `None` while the answer is being built.
    pub status: Option<u16>,
    pub at: Instant,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first value of query parameter `name`, decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// Which ACR token-service flow a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFlow {
    /// `POST /oauth2/exchange`: Entra access token → ACR refresh token.
    Exchange,
    /// `POST /oauth2/token` with `grant_type=refresh_token`.
    RefreshToken,
    /// `POST /oauth2/token` with `grant_type=password`.
    Password,
    /// `GET /oauth2/token` with `Authorization: Basic`.
    BasicGet,
    /// `GET /oauth2/token` without credentials (anonymous pull).
    Anonymous,
    /// Anything the double could not classify (a bad grant type, say).
    Other,
}

/// One call to the ACR token service and its outcome.
#[derive(Debug, Clone)]
pub struct AcrTokenRequest {
    pub flow: TokenFlow,
    pub service: Option<String>,
    pub tenant: Option<String>,
    /// Scopes as requested, one entry per `scope` parameter.
    pub scopes: Vec<String>,
    /// `access` granted, as `type:name:action,action` strings (empty for refresh tokens).
    pub granted: Vec<String>,
    /// The principal: Entra client id, Basic user name or refresh token subject.
    pub client: Option<String>,
    pub status: u16,
    /// The token handed out, if any.
    pub issued: Option<String>,
    pub at: Instant,
}

/// One call to the fake Entra token endpoint.
#[derive(Debug, Clone)]
pub struct EntraRequest {
    pub tenant: String,
    pub grant_type: Option<String>,
    pub client_id: Option<String>,
    pub scope: Option<String>,
    pub client_secret: Option<String>,
    pub client_assertion_type: Option<String>,
    /// The assertion exactly as sent: for workload identity, the token file's contents.
    pub client_assertion: Option<String>,
    pub status: u16,
    /// Error code (`invalid_client`, …) when refused.
    pub error: Option<String>,
    pub issued: Option<String>,
    pub at: Instant,
}

/// Which managed-identity endpoint was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityEndpoint {
    Imds,
    AppService,
}

/// One call to IMDS or the App Service identity endpoint.
#[derive(Debug, Clone)]
pub struct IdentityRequest {
    pub endpoint: IdentityEndpoint,
    pub api_version: Option<String>,
    pub resource: Option<String>,
    pub client_id: Option<String>,
    /// `object_id`, `principal_id`, `mi_res_id` or `msi_res_id`, whichever was sent.
    pub other_selector: Option<(String, String)>,
    /// The `Metadata` header (IMDS) or `X-IDENTITY-HEADER` (App Service).
    pub secret_header: Option<String>,
    pub status: u16,
    pub issued: Option<String>,
    pub at: Instant,
}

/// What an inbound-hook payload describes; build one with [`AcrDouble::hook_image`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookImage {
    /// The login server, `127.0.0.1:PORT` (goes into `request.host`).
    pub host: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

#[derive(Debug, Clone)]
struct Manifest {
    media_type: String,
    bytes: Vec<u8>,
    created: DateTime<Utc>,
    updated: DateTime<Utc>,
    attrs: ChangeableAttributes,
    quarantine_state: Option<String>,
    quarantine_details: Option<String>,
    platform: Option<Platform>,
    config_media_type: Option<String>,
    artifact_type: Option<String>,
    subject: Option<String>,
    annotations: Option<Value>,
    /// Children of an index: digest and platform.
    references: Vec<(String, Option<Platform>)>,
    image_size: u64,
}

impl Manifest {
    fn pullable(&self) -> bool {
        self.attrs.read_enabled
            && self
                .quarantine_state
                .as_deref()
                .is_none_or(|s| s == "Passed")
    }
}

#[derive(Debug, Clone)]
struct Tag {
    digest: String,
    created: DateTime<Utc>,
    updated: DateTime<Utc>,
    attrs: ChangeableAttributes,
}

#[derive(Debug, Clone)]
struct DeletedManifest {
    seq: u64,
    digest: String,
    created_at: DateTime<Utc>,
    deleted_at: DateTime<Utc>,
    manifest: Manifest,
}

#[derive(Debug, Clone)]
struct DeletedTag {
    seq: u64,
    tag: String,
    digest: String,
    created_at: DateTime<Utc>,
    deleted_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
struct Repo {
    created: DateTime<Utc>,
    updated: DateTime<Utc>,
    manifests: BTreeMap<String, Manifest>,
    tags: BTreeMap<String, Tag>,
    deleted_manifests: Vec<DeletedManifest>,
    deleted_tags: Vec<DeletedTag>,
}

impl Repo {
    fn live(&self) -> bool {
        !self.manifests.is_empty()
    }

    fn tags_of(&self, digest: &str) -> Vec<String> {
        self.tags
            .iter()
            .filter(|(_, t)| t.digest == digest)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

#[derive(Debug, Clone)]
enum SpCredential {
    Secret(String),
    Certificate { thumbprint: Option<String> },
}

#[derive(Debug, Clone)]
struct EntraGrant {
    tenant: String,
    client_id: String,
    audience: String,
    expires: u64,
}

#[derive(Debug, Clone)]
struct RefreshGrant {
    subject: String,
    grant_type: String,
    expires: u64,
}

#[derive(Debug, Clone)]
struct AccessGrant {
    access: Vec<ScopeGrant>,
    expires: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ScopeGrant {
    kind: String,
    name: String,
    actions: Vec<String>,
}

impl ScopeGrant {
    fn parse(scope: &str) -> Option<ScopeGrant> {
        let (kind, rest) = scope.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        if kind.is_empty() || name.is_empty() {
            return None;
        }
        Some(ScopeGrant {
            kind: kind.to_owned(),
            name: name.to_owned(),
            actions: actions
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }

    fn render(&self) -> String {
        format!("{}:{}:{}", self.kind, self.name, self.actions.join(","))
    }

    fn json(&self) -> Value {
        json!({ "type": self.kind, "name": self.name, "actions": self.actions })
    }
}

struct Ports {
    registry: u16,
    entra: u16,
    identity: u16,
}

struct AcrState {
    ports: Ports,
    clock_offset: Duration,
    last_stamp: Option<DateTime<Utc>>,
    seq: u64,
    repos: BTreeMap<String, Repo>,
    // Identity configuration.
    service_principals: HashMap<String, SpCredential>,
    workload: HashMap<String, BTreeSet<String>>,
    imds_system: bool,
    imds_user: BTreeSet<String>,
    app_service_system: bool,
    app_service_user: BTreeSet<String>,
    basic: HashMap<String, String>,
    anonymous_pull: bool,
    arm_audience_allowed: bool,
    // Permissions and token policy.
    granted_actions: BTreeSet<String>,
    catalog_allowed: bool,
    denied_status: StatusCode,
    access_lifetime: Duration,
    refresh_lifetime: Duration,
    entra_lifetime: Duration,
    entra_tokens: HashMap<String, EntraGrant>,
    refresh_tokens: HashMap<String, RefreshGrant>,
    access_tokens: HashMap<String, AccessGrant>,
    // Registry behaviour.
    soft_delete_enabled: bool,
    deleted_api: DeletedApi,
    page_limit: usize,
    referrers_page: usize,
    referrers_filtering: bool,
    // Records.
    requests: Vec<RecordedRequest>,
    token_requests: Vec<AcrTokenRequest>,
    entra_requests: Vec<EntraRequest>,
    identity_requests: Vec<IdentityRequest>,
}

impl AcrState {
    fn login_server(&self) -> String {
        format!("127.0.0.1:{}", self.ports.registry)
    }

    fn now_system(&self) -> SystemTime {
        SystemTime::now() + self.clock_offset
    }

    fn now_unix(&self) -> u64 {
        self.now_system()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
    }

    /// A timestamp strictly after every earlier one, so time orderings never tie.
    fn stamp(&mut self) -> DateTime<Utc> {
        let mut now: DateTime<Utc> = self.now_system().into();
        // Timestamps are printed with 100 ns resolution.
        now = now
            .with_nanosecond(now.nanosecond() / 100 * 100)
            .unwrap_or(now);
        if let Some(last) = self.last_stamp
            && now <= last
        {
            now = last + chrono::Duration::nanoseconds(100);
        }
        self.last_stamp = Some(now);
        now
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn expiry(&self, lifetime: Duration) -> u64 {
        self.now_unix() + lifetime.as_secs()
    }

    fn valid(&self, expires: u64) -> bool {
        self.now_unix() < expires
    }

    fn entra_endpoint(&self, tenant: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{tenant}/oauth2/v2.0/token",
            self.ports.entra
        )
    }
}

type Shared = Arc<Mutex<AcrState>>;

fn lock(state: &Shared) -> MutexGuard<'_, AcrState> {
    // A panic in one handler must not hide every later request from the test.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The ACR + Entra + managed-identity double. It runs on its own thread and runtime, so it
/// keeps answering while a test blocks on a child process or pauses its own tokio clock.
pub struct AcrDouble {
    state: Shared,
    ports: (u16, u16, u16),
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl AcrDouble {
    /// Starts the double; all three listeners accept connections when this returns. Nothing
    /// is enabled yet: no identity can log in until a test calls an `enable_*` method.
    pub async fn start() -> AcrDouble {
        AcrDouble::start_blocking()
    }

    /// Same as [`AcrDouble::start`] for synchronous tests.
    pub fn start_blocking() -> AcrDouble {
        let bind = || {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
            listener
                .set_nonblocking(true)
                .expect("nonblocking listener");
            let port = listener.local_addr().expect("local addr").port();
            (listener, port)
        };
        let (registry, registry_port) = bind();
        let (entra, entra_port) = bind();
        let (identity, identity_port) = bind();
        let state: Shared = Arc::new(Mutex::new(AcrState {
            ports: Ports {
                registry: registry_port,
                entra: entra_port,
                identity: identity_port,
            },
            clock_offset: Duration::ZERO,
            last_stamp: None,
            seq: 0,
            repos: BTreeMap::new(),
            service_principals: HashMap::new(),
            workload: HashMap::new(),
            imds_system: false,
            imds_user: BTreeSet::new(),
            app_service_system: false,
            app_service_user: BTreeSet::new(),
            basic: HashMap::new(),
            anonymous_pull: false,
            arm_audience_allowed: true,
            granted_actions: ALL_ACTIONS.iter().map(|a| (*a).to_owned()).collect(),
            catalog_allowed: true,
            denied_status: StatusCode::UNAUTHORIZED,
            // S4's sample access token lives ~75 min; refresh tokens 3 h (ref §2a).
            access_lifetime: Duration::from_secs(75 * 60),
            refresh_lifetime: Duration::from_secs(3 * 3600),
            entra_lifetime: Duration::from_secs(3599),
            entra_tokens: HashMap::new(),
            refresh_tokens: HashMap::new(),
            access_tokens: HashMap::new(),
            soft_delete_enabled: true,
            deleted_api: DeletedApi::Serve,
            page_limit: DEFAULT_PAGE_LIMIT,
            referrers_page: DEFAULT_REFERRERS_PAGE,
            referrers_filtering: true,
            requests: Vec::new(),
            token_requests: Vec::new(),
            entra_requests: Vec::new(),
            identity_requests: Vec::new(),
        }));
        let app = |listener: Listener| {
            Router::new()
                .fallback(handle)
                .with_state((state.clone(), listener))
        };
        let (registry_app, entra_app, identity_app) = (
            app(Listener::Registry),
            app(Listener::Entra),
            app(Listener::Identity),
        );
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("acr-double-{registry_port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("acr double runtime");
                runtime.block_on(async move {
                    let adopt = |l: TcpListener| {
                        tokio::net::TcpListener::from_std(l).expect("adopt listener")
                    };
                    let registry = axum::serve(adopt(registry), registry_app).into_future();
                    let entra = axum::serve(adopt(entra), entra_app).into_future();
                    let identity = axum::serve(adopt(identity), identity_app).into_future();
                    tokio::select! {
                        served = registry => served.expect("acr registry listener"),
                        served = entra => served.expect("acr entra listener"),
                        served = identity => served.expect("acr identity listener"),
                        _ = stopped => {}
                    }
                });
            })
            .expect("spawn acr double thread");
        AcrDouble {
            state,
            ports: (registry_port, entra_port, identity_port),
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    // ----- addresses -----------------------------------------------------------------------

    /// The registry listener's port.
    pub fn port(&self) -> u16 {
        self.ports.0
    }

    /// `127.0.0.1:PORT`: the registry host as image references and configs write it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.ports.0)
    }

    /// The login server, which is also the token `service` and `aud`: same as [`Self::host`].
    pub fn login_server(&self) -> String {
        self.host()
    }

    /// `http://127.0.0.1:PORT` without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// The challenge realm, `http://127.0.0.1:PORT/oauth2/token`.
    pub fn realm(&self) -> String {
        format!("{}/oauth2/token", self.base_url())
    }

    /// The Entra authority host with a trailing slash, as `AZURE_AUTHORITY_HOST` is written.
    pub fn authority_host(&self) -> String {
        format!("http://127.0.0.1:{}/", self.ports.1)
    }

    /// The Entra v2 token endpoint for [`TENANT_ID`].
    pub fn entra_token_url(&self) -> String {
        format!("{}{TENANT_ID}/oauth2/v2.0/token", self.authority_host())
    }

    /// IMDS base URL without a trailing slash, replacing `http://169.254.169.254`.
    pub fn imds_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.2)
    }

    /// The App Service / Container Apps `IDENTITY_ENDPOINT` (a full URL).
    pub fn identity_endpoint(&self) -> String {
        format!("{}{APP_SERVICE_TOKEN_PATH}", self.imds_endpoint())
    }

    // ----- identities and credentials ------------------------------------------------------

    /// Lets a service principal log in to Entra with `client_secret`.
    pub fn enable_service_principal(&self, client_id: &str, secret: &str) {
        lock(&self.state).service_principals.insert(
            client_id.to_owned(),
            SpCredential::Secret(secret.to_owned()),
        );
    }

    /// Lets a service principal log in with a certificate assertion. `thumbprint`, when given,
    /// must equal the assertion header's `x5t` or `x5t#S256` (base64url). The signature is not
    /// verified.
    pub fn enable_service_principal_certificate(&self, client_id: &str, thumbprint: Option<&str>) {
        lock(&self.state).service_principals.insert(
            client_id.to_owned(),
            SpCredential::Certificate {
                thumbprint: thumbprint.map(str::to_owned),
            },
        );
    }

    /// Lets `client_id` log in with a federated assertion equal to `federated_token` (the
    /// token file's contents); replaces any previously accepted one.
    pub fn enable_workload_identity(&self, client_id: &str, federated_token: &str) {
        let accepted = BTreeSet::from([federated_token.to_owned()]);
        lock(&self.state)
            .workload
            .insert(client_id.to_owned(), accepted);
    }

    /// Rotation: from now on only `new_token` is accepted for `client_id`, so a client that
    /// did not re-read the token file is refused.
    pub fn rotate_federated_token(&self, client_id: &str, new_token: &str) {
        self.enable_workload_identity(client_id, new_token);
    }

    /// Accepts `token` for `client_id` in addition to those already accepted.
    pub fn accept_federated_token(&self, client_id: &str, token: &str) {
        lock(&self.state)
            .workload
            .entry(client_id.to_owned())
            .or_default()
            .insert(token.to_owned());
    }

    /// Gives the VM a managed identity on IMDS: `None` for the system-assigned one, `Some` for
    /// a user-assigned one that requests must select with `client_id=`. Calls accumulate.
    pub fn enable_managed_identity(&self, client_id: Option<&str>) {
        let mut state = lock(&self.state);
        match client_id {
            None => state.imds_system = true,
            Some(id) => {
                state.imds_user.insert(id.to_owned());
            }
        }
    }

    /// Same as [`Self::enable_managed_identity`] for the App Service `IDENTITY_ENDPOINT`,
    /// which expects `X-IDENTITY-HEADER: `[`IDENTITY_HEADER_VALUE`].
    pub fn enable_app_service_identity(&self, client_id: Option<&str>) {
        let mut state = lock(&self.state);
        match client_id {
            None => state.app_service_system = true,
            Some(id) => {
                state.app_service_user.insert(id.to_owned());
            }
        }
    }

    /// Basic credentials accepted on `/v2`, `/acr/v1` and `GET /oauth2/token`: the admin user,
    /// a service principal's appId/secret or a repository-scoped token's name/password.
    pub fn add_basic_credentials(&self, username: &str, password: &str) {
        lock(&self.state)
            .basic
            .insert(username.to_owned(), password.to_owned());
    }

    /// Enables the admin user with [`ADMIN_USERNAME`] / [`ADMIN_PASSWORD`].
    pub fn enable_admin_user(&self) {
        self.add_basic_credentials(ADMIN_USERNAME, ADMIN_PASSWORD);
    }

    /// Anonymous pull (ref §2a, behaviour UNVERIFIED): `GET /oauth2/token` without
    /// credentials hands out pull-only tokens and `/v2` reads need no token.
    pub fn set_anonymous_pull(&self, enabled: bool) {
        lock(&self.state).anonymous_pull = enabled;
    }

    /// `azureADAuthenticationAsArmPolicy`: when false, the exchange refuses Entra tokens for
    /// the ARM audience (ref §2a).
    pub fn set_arm_audience_allowed(&self, allowed: bool) {
        lock(&self.state).arm_audience_allowed = allowed;
    }

    // ----- permissions and tokens ----------------------------------------------------------

    /// The repository actions every identity holds (default [`ALL_ACTIONS`]); the token
    /// service grants the intersection with what is asked (ref §1.9).
    pub fn set_granted_actions(&self, actions: &[&str]) {
        lock(&self.state).granted_actions = actions.iter().map(|a| (*a).to_owned()).collect();
    }

    fn set_action(&self, action: &str, allowed: bool) {
        let mut state = lock(&self.state);
        if allowed {
            state.granted_actions.insert(action.to_owned());
        } else {
            state.granted_actions.remove(action);
        }
    }

    /// Grants or withdraws `metadata_read` (the `/acr/v1` metadata API).
    pub fn set_metadata_read(&self, allowed: bool) {
        self.set_action("metadata_read", allowed);
    }

    /// Grants or withdraws `deleted_read` (the `_deleted` listings).
    pub fn set_deleted_read(&self, allowed: bool) {
        self.set_action("deleted_read", allowed);
    }

    /// Grants or withdraws `registry:catalog:*`.
    pub fn set_catalog_allowed(&self, allowed: bool) {
        lock(&self.state).catalog_allowed = allowed;
    }

    /// Status for a valid token lacking the needed action: 401 with a challenge (default) or
    /// 403 `DENIED`. UNVERIFIED which one ACR sends.
    pub fn set_denied_status(&self, status: u16) {
        assert!(
            status == 401 || status == 403,
            "denied status must be 401 or 403"
        );
        lock(&self.state).denied_status = StatusCode::from_u16(status).expect("valid status");
    }

    /// Lifetime of ACR access tokens issued from now on (default 75 min).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        lock(&self.state).access_lifetime = lifetime;
    }

    /// Lifetime of ACR refresh tokens issued from now on (default 3 h).
    pub fn set_refresh_token_lifetime(&self, lifetime: Duration) {
        lock(&self.state).refresh_lifetime = lifetime;
    }

    /// Lifetime of Entra, IMDS and App Service tokens issued from now on (default 3599 s).
    pub fn set_entra_token_lifetime(&self, lifetime: Duration) {
        lock(&self.state).entra_lifetime = lifetime;
    }

    /// Moves the double's clock forward: issued tokens expire sooner in its eyes, and new
    /// tokens and timestamps are dated later.
    pub fn advance_clock(&self, by: Duration) {
        lock(&self.state).clock_offset += by;
    }

    /// Invalidates every ACR access and refresh token issued so far.
    pub fn revoke_tokens(&self) {
        let mut state = lock(&self.state);
        state.access_tokens.clear();
        state.refresh_tokens.clear();
    }

    /// Invalidates ACR access tokens only; refresh tokens keep working.
    pub fn revoke_access_tokens(&self) {
        lock(&self.state).access_tokens.clear();
    }

    /// Invalidates every Entra / managed-identity token issued so far.
    pub fn revoke_entra_tokens(&self) {
        lock(&self.state).entra_tokens.clear();
    }

    // ----- registry behaviour ---------------------------------------------------------------

    /// The soft-delete policy (default on): whether `DELETE` and untag keep restorable
    /// entries. [`Self::soft_delete`] works either way.
    pub fn set_soft_delete_policy(&self, enabled: bool) {
        lock(&self.state).soft_delete_enabled = enabled;
    }

    /// How the `_deleted` endpoints answer (default [`DeletedApi::Serve`]).
    pub fn set_deleted_api(&self, api: DeletedApi) {
        lock(&self.state).deleted_api = api;
    }

    /// Largest page `/acr/v1`, `/acr/v1/_deleted` and `/v2/tags/list` serve, also used when
    /// `n` is absent (default 100).
    pub fn set_page_limit(&self, limit: usize) {
        assert!(limit > 0, "page limit must be positive");
        lock(&self.state).page_limit = limit;
    }

    /// Referrers per page (default 50).
    pub fn set_referrers_page_size(&self, size: usize) {
        assert!(size > 0, "page size must be positive");
        lock(&self.state).referrers_page = size;
    }

    /// Whether `?artifactType=` is applied server-side and announced with
    /// `OCI-Filters-Applied` (default true); false serves everything unfiltered.
    pub fn set_referrers_filtering(&self, enabled: bool) {
        lock(&self.state).referrers_filtering = enabled;
    }

    // ----- content --------------------------------------------------------------------------

    /// Pushes a linux/amd64 OCI image manifest unique to `seed` and points `tag` at it
    /// (moving the tag if it exists). Returns the digest and the exact manifest bytes.
    pub fn push_image(&self, repo: &str, tag: &str, seed: &str) -> (String, Vec<u8>) {
        self.push_image_for(repo, Some(tag), seed, "linux/amd64")
    }

    /// Pushes an image manifest for `platform` (`os/arch[/variant]`), optionally tagged.
    pub fn push_image_for(
        &self,
        repo: &str,
        tag: Option<&str>,
        seed: &str,
        platform: &str,
    ) -> (String, Vec<u8>) {
        let platform = Platform::parse(platform);
        let config_bytes = oci::image_config(seed, &platform);
        let config = Descriptor::of(OCI_CONFIG, &config_bytes);
        let layer = Descriptor::of(OCI_LAYER_GZIP, &oci::layer_bytes(seed));
        let bytes = oci::image_manifest(&config, &[layer]);
        let digest = self.store(repo, tag, OCI_MANIFEST, bytes.clone(), Some(platform));
        (digest, bytes)
    }

    /// Pushes one untagged image per platform and an OCI index over them, tagged `tag`.
    pub fn push_index(
        &self,
        repo: &str,
        tag: Option<&str>,
        seed: &str,
        platforms: &[&str],
    ) -> (String, Vec<u8>) {
        let children: Vec<(Descriptor, Platform)> = platforms
            .iter()
            .map(|spec| {
                let (digest, bytes) =
                    self.push_image_for(repo, None, &format!("{seed}/{spec}"), spec);
                let descriptor = Descriptor {
                    media_type: OCI_MANIFEST.to_owned(),
                    digest,
                    size: bytes.len() as u64,
                };
                (descriptor, Platform::parse(spec))
            })
            .collect();
        let bytes = oci::image_index(&children);
        let digest = self.store(repo, tag, OCI_INDEX, bytes.clone(), None);
        (digest, bytes)
    }

    /// Pushes an untagged artifact manifest whose `subject` is `subject_digest` (which must
    /// be live in `repo`): empty config, `artifactType`, one layer derived from `seed`.
    pub fn push_referrer(
        &self,
        repo: &str,
        subject_digest: &str,
        artifact_type: &str,
        seed: &str,
    ) -> (String, Vec<u8>) {
        let subject = {
            let state = lock(&self.state);
            let manifest = state
                .repos
                .get(repo)
                .and_then(|r| r.manifests.get(subject_digest))
                .unwrap_or_else(|| panic!("subject {repo}@{subject_digest} is not live"));
            Descriptor {
                media_type: manifest.media_type.clone(),
                digest: subject_digest.to_owned(),
                size: manifest.bytes.len() as u64,
            }
        };
        let layer = Descriptor::of(
            "application/octet-stream",
            format!("referrer payload {seed}").as_bytes(),
        );
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {
                "mediaType": EMPTY_CONFIG,
                "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
                "size": 2,
                "data": "e30=",
            },
            "layers": [layer],
            "subject": subject,
            "annotations": {
                "org.opencontainers.image.created": "2025-01-01T00:00:00Z",
                "driftwatch.test.seed": seed,
            },
        });
        let bytes = serde_json::to_vec(&manifest).expect("referrer serialises");
        let digest = self.store(repo, None, OCI_MANIFEST, bytes.clone(), None);
        (digest, bytes)
    }

    /// Stores arbitrary manifest bytes (its `subject`, `artifactType`, config media type and
    /// annotations are read from the JSON) and optionally tags them. Returns the digest.
    pub fn push_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> String {
        self.store(repo, tag, media_type, bytes, None)
    }

    fn store(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: Vec<u8>,
        platform: Option<Platform>,
    ) -> String {
        let digest = oci::sha256_digest(&bytes);
        let parsed: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let str_at = |pointer: &str| {
            parsed
                .pointer(pointer)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let sizes: u64 = parsed
            .get("layers")
            .or_else(|| parsed.get("manifests"))
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|d| d.get("size").and_then(Value::as_u64))
                    .sum()
            })
            .unwrap_or(0);
        let config_size = parsed
            .pointer("/config/size")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let references = parsed
            .get("manifests")
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|d| {
                        let digest = d.get("digest")?.as_str()?.to_owned();
                        let platform = d.get("platform").and_then(|p| {
                            Some(Platform::new(
                                p.get("os")?.as_str()?,
                                p.get("architecture")?.as_str()?,
                                p.get("variant").and_then(Value::as_str),
                            ))
                        });
                        Some((digest, platform))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut state = lock(&self.state);
        let now = state.stamp();
        let repo_entry = state.repos.entry(repo.to_owned()).or_insert_with(|| Repo {
            created: now,
            updated: now,
            manifests: BTreeMap::new(),
            tags: BTreeMap::new(),
            deleted_manifests: Vec::new(),
            deleted_tags: Vec::new(),
        });
        assert!(
            !repo_entry
                .deleted_manifests
                .iter()
                .any(|d| d.digest == digest),
            "ACR refuses to re-push soft-deleted {repo}@{digest} (ref §2c); restore it instead"
        );
        repo_entry.updated = now;
        repo_entry
            .manifests
            .entry(digest.clone())
            .or_insert_with(|| Manifest {
                media_type: media_type.to_owned(),
                image_size: bytes.len() as u64 + config_size + sizes,
                bytes,
                created: now,
                updated: now,
                attrs: ChangeableAttributes::default(),
                quarantine_state: None,
                quarantine_details: None,
                platform,
                config_media_type: str_at("/config/mediaType"),
                artifact_type: str_at("/artifactType"),
                subject: str_at("/subject/digest"),
                annotations: parsed.get("annotations").cloned(),
                references,
            });
        if let Some(tag) = tag {
            point_tag(repo_entry, tag, &digest, now);
        }
        digest
    }

    /// Points `tag` at an existing manifest of `repo` (a tag move when the tag exists).
    pub fn tag(&self, repo: &str, tag: &str, digest: &str) {
        let mut state = lock(&self.state);
        let now = state.stamp();
        let repo_entry = live_repo(&mut state, repo);
        assert!(
            repo_entry.manifests.contains_key(digest),
            "{repo}@{digest} is not live"
        );
        point_tag(repo_entry, tag, digest, now);
    }

    /// Removes `tag` (the manifest stays). With the soft-delete policy on, the tag is listed in
    /// `_deleted/{repo}/_tags` (ref §2c).
    pub fn untag(&self, repo: &str, tag: &str) {
        let mut state = lock(&self.state);
        let soft = state.soft_delete_enabled;
        let seq = state.next_seq();
        let now = state.stamp();
        let repo_entry = live_repo(&mut state, repo);
        let removed = repo_entry
            .tags
            .remove(tag)
            .unwrap_or_else(|| panic!("{repo}:{tag} does not exist"));
        repo_entry.updated = now;
        if let Some(manifest) = repo_entry.manifests.get_mut(&removed.digest) {
            manifest.updated = now;
        }
        if soft {
            repo_entry.deleted_tags.push(DeletedTag {
                seq,
                tag: tag.to_owned(),
                digest: removed.digest,
                created_at: removed.created,
                deleted_at: now,
            });
        }
    }

    /// Deletes a manifest for good (no soft-delete entry), with its tags and referrers.
    pub fn delete_manifest(&self, repo: &str, digest: &str) {
        let mut state = lock(&self.state);
        delete_graph(&mut state, repo, digest, None);
    }

    /// Soft-deletes `digest` now: it leaves `/v2` and `/acr/v1`, and it, its tags and its
    /// referrers (ACR deletes the graph, ref §2d) appear in the `_deleted` listings. Returns
    /// `deletedAt`.
    pub fn soft_delete(&self, repo: &str, digest: &str) -> DateTime<Utc> {
        let mut state = lock(&self.state);
        let now = state.stamp();
        delete_graph(&mut state, repo, digest, Some(now));
        now
    }

    /// Like [`Self::soft_delete`] with a chosen `deletedAt` (for purge-time arithmetic).
    pub fn soft_delete_at(&self, repo: &str, digest: &str, deleted_at: DateTime<Utc>) {
        let mut state = lock(&self.state);
        delete_graph(&mut state, repo, digest, Some(deleted_at));
    }

    /// The auto-purge: removes `digest` from both `_deleted` listings of `repo`.
    pub fn purge(&self, repo: &str, digest: &str) {
        let mut state = lock(&self.state);
        let repo_entry = state
            .repos
            .get_mut(repo)
            .unwrap_or_else(|| panic!("repository {repo} never existed"));
        let before = repo_entry.deleted_manifests.len();
        repo_entry.deleted_manifests.retain(|d| d.digest != digest);
        repo_entry.deleted_tags.retain(|d| d.digest != digest);
        assert!(
            repo_entry.deleted_manifests.len() < before,
            "{repo}@{digest} is not soft-deleted"
        );
    }

    /// `az acr manifest restore -n repo:tag -d digest --force`: brings a soft-deleted manifest
    /// back under `tag` (a tag of that name pointing elsewhere is soft-deleted, ref §2c). Its
    /// referrers stay deleted.
    pub fn restore(&self, repo: &str, digest: &str, tag: &str) {
        let mut state = lock(&self.state);
        let seq = state.next_seq();
        let now = state.stamp();
        let soft = state.soft_delete_enabled;
        let repo_entry = state
            .repos
            .get_mut(repo)
            .unwrap_or_else(|| panic!("repository {repo} never existed"));
        let position = repo_entry
            .deleted_manifests
            .iter()
            .position(|d| d.digest == digest)
            .unwrap_or_else(|| panic!("{repo}@{digest} is not soft-deleted"));
        let restored = repo_entry.deleted_manifests.remove(position);
        repo_entry
            .deleted_tags
            .retain(|d| !(d.digest == digest && d.tag == tag));
        let mut manifest = restored.manifest;
        manifest.updated = now;
        repo_entry.manifests.insert(digest.to_owned(), manifest);
        if let Some(old) = repo_entry.tags.get(tag).cloned()
            && old.digest != digest
            && soft
        {
            repo_entry.deleted_tags.push(DeletedTag {
                seq,
                tag: tag.to_owned(),
                digest: old.digest,
                created_at: old.created,
                deleted_at: now,
            });
        }
        repo_entry.updated = now;
        point_tag(repo_entry, tag, digest, now);
    }

    /// Sets a tag's lock flags (bumps its `lastUpdateTime`).
    pub fn set_tag_attributes(&self, repo: &str, tag: &str, attrs: ChangeableAttributes) {
        let mut state = lock(&self.state);
        let now = state.stamp();
        let entry = live_repo(&mut state, repo)
            .tags
            .get_mut(tag)
            .unwrap_or_else(|| panic!("{repo}:{tag} does not exist"));
        entry.attrs = attrs;
        entry.updated = now;
    }

    /// Sets a manifest's lock flags (bumps its `lastUpdateTime`).
    pub fn set_manifest_attributes(&self, repo: &str, digest: &str, attrs: ChangeableAttributes) {
        self.with_manifest(repo, digest, |m| m.attrs = attrs);
    }

    /// Sets `quarantineState` (`"Passed"`, `"Failed"`, …; `None` removes it) and
    /// `quarantineDetails` (a JSON string in ACR). A state other than `Passed` blocks pulls.
    pub fn set_quarantine(
        &self,
        repo: &str,
        digest: &str,
        state: Option<&str>,
        details: Option<&str>,
    ) {
        self.with_manifest(repo, digest, |m| {
            m.quarantine_state = state.map(str::to_owned);
            m.quarantine_details = details.map(str::to_owned);
        });
    }

    fn with_manifest(&self, repo: &str, digest: &str, change: impl FnOnce(&mut Manifest)) {
        let mut state = lock(&self.state);
        let now = state.stamp();
        let manifest = live_repo(&mut state, repo)
            .manifests
            .get_mut(digest)
            .unwrap_or_else(|| panic!("{repo}@{digest} is not live"));
        change(manifest);
        manifest.updated = now;
    }

    /// The digest `tag` points at, if the tag exists.
    pub fn tag_digest(&self, repo: &str, tag: &str) -> Option<String> {
        let state = lock(&self.state);
        state
            .repos
            .get(repo)
            .and_then(|r| r.tags.get(tag))
            .map(|t| t.digest.clone())
    }

    /// Whether `digest` is live (served by `/v2`) in `repo`.
    pub fn has_manifest(&self, repo: &str, digest: &str) -> bool {
        let state = lock(&self.state);
        state
            .repos
            .get(repo)
            .is_some_and(|r| r.manifests.contains_key(digest))
    }

    /// Whether `digest` is in `repo`'s deleted-manifests listing.
    pub fn is_soft_deleted(&self, repo: &str, digest: &str) -> bool {
        let state = lock(&self.state);
        state
            .repos
            .get(repo)
            .is_some_and(|r| r.deleted_manifests.iter().any(|d| d.digest == digest))
    }

    // ----- inbound-hook payloads ------------------------------------------------------------

    /// What a hook payload says about `repo:tag` as currently stored.
    pub fn hook_image(&self, repo: &str, tag: &str) -> HookImage {
        let state = lock(&self.state);
        let repo_entry = state
            .repos
            .get(repo)
            .unwrap_or_else(|| panic!("repository {repo} does not exist"));
        let digest = repo_entry
            .tags
            .get(tag)
            .unwrap_or_else(|| panic!("{repo}:{tag} does not exist"))
            .digest
            .clone();
        let manifest = &repo_entry.manifests[&digest];
        HookImage {
            host: state.login_server(),
            repository: repo.to_owned(),
            tag: Some(tag.to_owned()),
            media_type: manifest.media_type.clone(),
            size: manifest.bytes.len() as u64,
            digest,
        }
    }

    /// An ACR webhook `push` payload for `repo:tag` as stored now.
    pub fn webhook_push(&self, repo: &str, tag: &str) -> Value {
        acr_webhook_push(&self.hook_image(repo, tag))
    }

    /// An Event Grid `ImagePushed` delivery (an array of one event) for `repo:tag`.
    pub fn event_grid_pushed(&self, repo: &str, tag: &str) -> Value {
        event_grid_image_pushed(&self.hook_image(repo, tag))
    }

    // ----- observation ----------------------------------------------------------------------

    /// Every request on every listener, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state).requests.clone()
    }

    /// Requests whose method equals `method` (case-insensitive) and whose path starts with
    /// `path_prefix`, on any listener (their paths do not overlap).
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        count_matching(&lock(&self.state).requests, None, method, path_prefix)
    }

    /// Same as [`Self::count`] for requests that arrived at or after `since`.
    pub fn count_since(&self, since: Instant, method: &str, path_prefix: &str) -> usize {
        count_matching(
            &lock(&self.state).requests,
            Some(since),
            method,
            path_prefix,
        )
    }

    /// Calls to `/oauth2/exchange` and `/oauth2/token`.
    pub fn token_requests(&self) -> Vec<AcrTokenRequest> {
        lock(&self.state).token_requests.clone()
    }

    /// Calls to the Entra token endpoint.
    pub fn entra_requests(&self) -> Vec<EntraRequest> {
        lock(&self.state).entra_requests.clone()
    }

    /// Calls to IMDS and to the App Service identity endpoint.
    pub fn imds_requests(&self) -> Vec<IdentityRequest> {
        lock(&self.state).identity_requests.clone()
    }

    /// Forgets every recorded request of every kind.
    pub fn clear_requests(&self) {
        let mut state = lock(&self.state);
        state.requests.clear();
        state.token_requests.clear();
        state.entra_requests.clear();
        state.identity_requests.clear();
    }

    /// Polls (bounded, real time) until at least `n` requests match `method` and
    /// `path_prefix`; panics listing what arrived after `timeout`.
    pub fn wait_for_count(
        &self,
        method: &str,
        path_prefix: &str,
        n: usize,
        timeout: Duration,
    ) -> usize {
        wait_for_count(&self.state, method, path_prefix, n, timeout)
    }

    /// Same as [`Self::wait_for_count`], polling on tokio's blocking pool so it does not stall
    /// the caller's runtime.
    pub async fn wait_for_count_async(
        &self,
        method: &str,
        path_prefix: &str,
        n: usize,
        timeout: Duration,
    ) -> usize {
        let (state, method, prefix) = (
            self.state.clone(),
            method.to_owned(),
            path_prefix.to_owned(),
        );
        tokio::task::spawn_blocking(move || wait_for_count(&state, &method, &prefix, n, timeout))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }
}

impl Drop for AcrDouble {
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

fn count_matching(
    requests: &[RecordedRequest],
    since: Option<Instant>,
    method: &str,
    path_prefix: &str,
) -> usize {
    requests
        .iter()
        .filter(|r| since.is_none_or(|s| r.at >= s))
        .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path.starts_with(path_prefix))
        .count()
}

fn wait_for_count(
    state: &Shared,
    method: &str,
    path_prefix: &str,
    n: usize,
    timeout: Duration,
) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let (count, seen) = {
            let state = lock(state);
            let count = count_matching(&state.requests, None, method, path_prefix);
            let seen: Vec<String> = state
                .requests
                .iter()
                .map(|r| format!("  {} {} -> {:?}", r.method, r.path, r.status))
                .collect();
            (count, seen)
        };
        if count >= n {
            return count;
        }
        if Instant::now() >= deadline {
            panic!(
                "expected {n} {method} {path_prefix}* request(s) within {timeout:?}, saw {count}; \
                 all requests:\n{}",
                seen.join("\n")
            );
        }
        std::thread::sleep(POLL);
    }
}

fn live_repo<'a>(state: &'a mut AcrState, repo: &str) -> &'a mut Repo {
    state
        .repos
        .get_mut(repo)
        .filter(|r| r.live())
        .unwrap_or_else(|| panic!("repository {repo} has no live manifests"))
}

fn point_tag(repo: &mut Repo, tag: &str, digest: &str, now: DateTime<Utc>) {
    let previous = repo.tags.get(tag).map(|t| t.digest.clone());
    match repo.tags.get_mut(tag) {
        Some(existing) => {
            if existing.digest != digest {
                existing.digest = digest.to_owned();
                existing.updated = now;
            }
        }
        None => {
            repo.tags.insert(
                tag.to_owned(),
                Tag {
                    digest: digest.to_owned(),
                    created: now,
                    updated: now,
                    attrs: ChangeableAttributes::default(),
                },
            );
        }
    }
    for touched in [previous, Some(digest.to_owned())].into_iter().flatten() {
        if let Some(manifest) = repo.manifests.get_mut(&touched) {
            manifest.updated = now;
        }
    }
    repo.updated = now;
}

/// Removes `digest`, its tags and (recursively) its referrers from the live view; with
/// `soft = Some(deletedAt)` they go to the `_deleted` listings, each entry with its own
/// sequence number (the listings' cursor).
fn delete_graph(state: &mut AcrState, repo: &str, digest: &str, soft: Option<DateTime<Utc>>) {
    let mut seq = state.seq;
    let repo_entry = state
        .repos
        .get_mut(repo)
        .unwrap_or_else(|| panic!("repository {repo} does not exist"));
    assert!(
        repo_entry.manifests.contains_key(digest),
        "{repo}@{digest} is not live"
    );
    let mut pending = vec![digest.to_owned()];
    while let Some(current) = pending.pop() {
        let Some(manifest) = repo_entry.manifests.remove(&current) else {
            continue;
        };
        for tag in repo_entry.tags_of(&current) {
            let removed = repo_entry.tags.remove(&tag).expect("tag listed");
            if let Some(deleted_at) = soft {
                seq += 1;
                repo_entry.deleted_tags.push(DeletedTag {
                    seq,
                    tag,
                    digest: current.clone(),
                    created_at: removed.created,
                    deleted_at,
                });
            }
        }
        pending.extend(
            repo_entry
                .manifests
                .iter()
                .filter(|(_, m)| m.subject.as_deref() == Some(current.as_str()))
                .map(|(d, _)| d.clone()),
        );
        if let Some(deleted_at) = soft {
            seq += 1;
            repo_entry.deleted_manifests.push(DeletedManifest {
                seq,
                digest: current.clone(),
                created_at: manifest.created,
                deleted_at,
                manifest,
            });
        }
    }
    state.seq = seq;
}

// ===== HTTP ===================================================================================

async fn handle(
    State((state, listener)): State<(Shared, Listener)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let index = {
        let mut state = lock(&state);
        state.requests.push(RecordedRequest {
            listener,
            method: method.as_str().to_owned(),
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            authorization: header_str(&headers, header::AUTHORIZATION.as_str()),
            body: String::from_utf8_lossy(&body).into_owned(),
            status: None,
            at: Instant::now(),
        });
        state.requests.len() - 1
    };
    let request = Req {
        method,
        path: uri.path().to_owned(),
        query: pairs(uri.query().unwrap_or("").as_bytes()),
        headers,
        form: pairs(&body),
    };
    let response = {
        let mut state = lock(&state);
        match listener {
            Listener::Registry => registry(&mut state, &request),
            Listener::Entra => entra(&mut state, &request),
            Listener::Identity => identity(&mut state, &request),
        }
    };
    if let Some(recorded) = lock(&state).requests.get_mut(index) {
        recorded.status = Some(response.status().as_u16());
    }
    response
}

struct Req {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    form: Vec<(String, String)>,
}

impl Req {
    fn query(&self, key: &str) -> Option<String> {
        first(&self.query, key)
    }

    fn form(&self, key: &str) -> Option<String> {
        first(&self.form, key)
    }

    fn header(&self, name: &str) -> Option<String> {
        header_str(&self.headers, name)
    }
}

fn pairs(raw: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw).into_owned().collect()
}

fn first(pairs: &[(String, String)], key: &str) -> Option<String> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

fn all(pairs: &[(String, String)], key: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .collect()
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Body>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header("Docker-Distribution-Api-Version", "registry/2.0")
        .body(body.into())
        .expect("response")
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    respond(status, "application/json; charset=utf-8", value.to_string())
}

/// `{"errors":[{"code","message","detail"}]}` (ref §1.8).
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({ "errors": [{ "code": code, "message": message, "detail": null }] }),
    )
}

fn add_header(mut response: Response<Body>, name: &'static str, value: &str) -> Response<Body> {
    response.headers_mut().insert(
        name,
        HeaderValue::from_str(value).expect("valid header value"),
    );
    response
}

fn not_found_page() -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "404 page not found\n",
    )
}

/// RFC 3339 UTC with up to 7 fractional digits, trailing zeros dropped.
fn acr_time(at: DateTime<Utc>) -> String {
    let base = at.format("%Y-%m-%dT%H:%M:%S").to_string();
    let fraction = format!("{:07}", at.nanosecond() / 100);
    let fraction = fraction.trim_end_matches('0');
    if fraction.is_empty() {
        format!("{base}Z")
    } else {
        format!("{base}.{fraction}Z")
    }
}

fn is_digest(reference: &str) -> bool {
    reference.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Decodes `%XX` escapes in a path segment.
fn unescape(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode_query(pairs: &[(&str, &str)]) -> String {
    let mut serializer = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        serializer.append_pair(k, v);
    }
    serializer.finish()
}

// ----- JWTs -------------------------------------------------------------------------------------

fn jwt(claims: &Value) -> String {
    let header = json!({ "alg": "RS256", "typ": "JWT", "kid": "driftwatch-acr-double" });
    format!(
        "{}.{}.{JWT_SIGNATURE}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn jwt_part(token: &str, index: usize) -> Option<Value> {
    let part = token.split('.').nth(index)?;
    let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The claims of a JWT (the middle part), for tests reading `exp` and friends.
pub fn jwt_claims(token: &str) -> Option<Value> {
    jwt_part(token, 1)
}

/// A JWT-shaped Kubernetes service-account token to use as a federated token file's content;
/// `seed` makes it unique, `exp` is an hour after `iat`.
pub fn federated_token(seed: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    jwt(&json!({
        "aud": [FEDERATED_TOKEN_AUDIENCE],
        "iss": "https://oidc.prod-aks.azure.com/driftwatch-tests/",
        "sub": "system:serviceaccount:driftwatch:driftwatch",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": seed,
    }))
}

fn jti() -> String {
    uuid::Uuid::now_v7().to_string()
}

// ===== registry listener ========================================================================

/// A refusal built while checking a request; boxed because responses are large.
type Refusal = Box<Response<Body>>;

/// What a route needs: `None` for `/v2/` (any valid credential).
struct Need {
    kind: &'static str,
    name: String,
    action: &'static str,
}

impl Need {
    fn repo(name: &str, action: &'static str) -> Need {
        Need {
            kind: "repository",
            name: name.to_owned(),
            action,
        }
    }
}

fn registry(state: &mut AcrState, req: &Req) -> Response<Body> {
    let path = req.path.clone();
    if path == "/oauth2/exchange" {
        return exchange(state, req);
    }
    if path == "/oauth2/token" {
        return acr_token(state, req);
    }
    if path == "/v2/" || path == "/v2" {
        return match authorize(state, req, None) {
            Ok(()) => json_response(StatusCode::OK, &json!({})),
            Err(denied) => *denied,
        };
    }
    if let Some(rest) = path.strip_prefix("/v2/") {
        if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
            return manifests(state, req, &unescape(name), &unescape(reference));
        }
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return tags_list(state, req, &unescape(name));
        }
        if let Some((name, digest)) = rest.rsplit_once("/referrers/") {
            return referrers(state, req, &unescape(name), &unescape(digest));
        }
        return not_found_page();
    }
    if let Some(rest) = path.strip_prefix("/acr/v1/_deleted/") {
        if let Some(name) = rest.strip_suffix("/_manifests") {
            return deleted_listing(state, req, &unescape(name), false);
        }
        if let Some(name) = rest.strip_suffix("/_tags") {
            return deleted_listing(state, req, &unescape(name), true);
        }
        return not_found_page();
    }
    if let Some(rest) = path.strip_prefix("/acr/v1/") {
        if let Some((name, tag)) = rest.rsplit_once("/_tags/") {
            return acr_tag(state, req, &unescape(name), &unescape(tag));
        }
        if let Some(name) = rest.strip_suffix("/_tags") {
            return acr_listing(state, req, &unescape(name), true);
        }
        if let Some((name, digest)) = rest.rsplit_once("/_manifests/") {
            return acr_manifest(state, req, &unescape(name), &unescape(digest));
        }
        if let Some(name) = rest.strip_suffix("/_manifests") {
            return acr_listing(state, req, &unescape(name), false);
        }
        if !rest.is_empty() && !rest.starts_with('_') {
            return acr_repository(state, req, &unescape(rest));
        }
    }
    not_found_page()
}

/// Checks the caller's credential for `need`; `Err` is the response to send.
fn authorize(state: &AcrState, req: &Req, need: Option<&Need>) -> Result<(), Refusal> {
    let given = req.header("authorization");
    let scheme = given
        .as_deref()
        .and_then(|v| v.split_once(' '))
        .map(|(s, rest)| (s.to_ascii_lowercase(), rest.trim().to_owned()));
    let authenticated_with = match scheme {
        Some((s, token)) if s == "bearer" => state
            .access_tokens
            .get(&token)
            .filter(|g| state.valid(g.expires))
            .map(|g| Some(g.access.clone())),
        Some((s, creds)) if s == "basic" => basic_principal(state, &creds).map(|_| None),
        _ => None,
    };
    let Some(access) = authenticated_with else {
        if state.anonymous_pull && need.is_none_or(|n| n.action == "pull") {
            return Ok(());
        }
        return Err(Box::new(challenge(state, need, "authentication required")));
    };
    let Some(need) = need else {
        return Ok(());
    };
    let allowed = match access {
        // Bearer: only what the token carries.
        Some(access) => access.iter().any(|g| {
            g.kind == need.kind
                && g.name == need.name
                && g.actions.iter().any(|a| a == need.action || a == "*")
        }),
        // Basic: whatever the identity holds.
        None => holds(state, need.kind, need.action),
    };
    if allowed {
        return Ok(());
    }
    if state.denied_status == StatusCode::FORBIDDEN {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "DENIED",
            "requested access to the resource is denied",
        )));
    }
    Err(Box::new(challenge(
        state,
        Some(need),
        "authentication required, visit https://aka.ms/acr/authorization for more information.",
    )))
}

fn holds(state: &AcrState, kind: &str, action: &str) -> bool {
    match kind {
        "registry" => state.catalog_allowed,
        _ => state.granted_actions.contains(action),
    }
}

/// The principal behind `Basic <creds>`: a configured user, or the null GUID with a live ACR
/// refresh token.
fn basic_principal(state: &AcrState, encoded: &str) -> Option<String> {
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    if user == NULL_GUID_USERNAME {
        let grant = state
            .refresh_tokens
            .get(pass)
            .filter(|g| state.valid(g.expires))?;
        return Some(grant.subject.clone());
    }
    (state.basic.get(user).map(String::as_str) == Some(pass)).then(|| user.to_owned())
}

/// 401 with `WWW-Authenticate: Bearer realm,service[,scope]` and the scope in `detail`.
fn challenge(state: &AcrState, need: Option<&Need>, message: &str) -> Response<Body> {
    let mut value = format!(
        "Bearer realm=\"http://{}/oauth2/token\",service=\"{}\"",
        state.login_server(),
        state.login_server()
    );
    let detail = match need {
        Some(need) => {
            value.push_str(&format!(
                ",scope=\"{}:{}:{}\"",
                need.kind, need.name, need.action
            ));
            json!([{ "Type": need.kind, "Name": need.name, "Action": need.action }])
        }
        None => Value::Null,
    };
    let body = json!({
        "errors": [{ "code": "UNAUTHORIZED", "message": message, "detail": detail }]
    });
    add_header(
        json_response(StatusCode::UNAUTHORIZED, &body),
        "www-authenticate",
        &value,
    )
}

// ----- ACR token service ----------------------------------------------------------------------

struct TokenRecord {
    flow: TokenFlow,
    service: Option<String>,
    tenant: Option<String>,
    scopes: Vec<String>,
    client: Option<String>,
}

fn record_token(
    state: &mut AcrState,
    record: TokenRecord,
    granted: Vec<String>,
    response: &Response<Body>,
    issued: Option<String>,
) {
    state.token_requests.push(AcrTokenRequest {
        flow: record.flow,
        service: record.service,
        tenant: record.tenant,
        scopes: record.scopes,
        granted,
        client: record.client,
        status: response.status().as_u16(),
        issued,
        at: Instant::now(),
    });
}

fn token_error(status: StatusCode, message: &str) -> Response<Body> {
    let code = if status == StatusCode::UNAUTHORIZED {
        "UNAUTHORIZED"
    } else {
        "BAD_REQUEST"
    };
    error(status, code, message)
}

fn exchange(state: &mut AcrState, req: &Req) -> Response<Body> {
    let mut record = TokenRecord {
        flow: TokenFlow::Exchange,
        service: req.form("service"),
        tenant: req.form("tenant"),
        scopes: Vec::new(),
        client: None,
    };
    let entra_token = req.form("access_token").unwrap_or_default();
    let grant = state.entra_tokens.get(&entra_token).cloned();
    if let Some(grant) = &grant {
        record.client = Some(grant.client_id.clone());
    }
    let failure = if req.method != Method::POST {
        Some((StatusCode::METHOD_NOT_ALLOWED, "use POST".to_owned()))
    } else if req.form("grant_type").as_deref() != Some("access_token") {
        Some((
            StatusCode::BAD_REQUEST,
            "grant_type must be access_token (the refresh-token grants are deprecated)".to_owned(),
        ))
    } else if record.service.as_deref() != Some(state.login_server().as_str()) {
        Some((
            StatusCode::BAD_REQUEST,
            format!("service must be {}", state.login_server()),
        ))
    } else {
        match &grant {
            None => Some((
                StatusCode::UNAUTHORIZED,
                "access_token is not an Entra token this directory issued".to_owned(),
            )),
            Some(g) if !state.valid(g.expires) => Some((
                StatusCode::UNAUTHORIZED,
                "the Entra access token has expired".to_owned(),
            )),
            Some(g) if record.tenant.as_deref().is_some_and(|t| t != g.tenant) => Some((
                StatusCode::UNAUTHORIZED,
                "tenant does not match the Entra token".to_owned(),
            )),
            Some(g) if !audience_accepted(state, &g.audience) => Some((
                StatusCode::UNAUTHORIZED,
                format!("audience {} is not accepted by this registry", g.audience),
            )),
            Some(_) => None,
        }
    };
    if let Some((status, message)) = failure {
        let response = token_error(status, &message);
        record_token(state, record, Vec::new(), &response, None);
        return response;
    }
    let grant = grant.expect("checked above");
    let now = state.now_unix();
    let expires = state.expiry(state.refresh_lifetime);
    let token = jwt(&json!({
        "jti": jti(),
        "sub": grant.client_id,
        "nbf": now,
        "exp": expires,
        "iat": now,
        "iss": ACR_ISSUER,
        "aud": state.login_server(),
        "version": "1.0",
        "grant_type": "refresh_token",
        "tenant": grant.tenant,
        "permissions": { "actions": ["*"], "notActions": [] },
        "roles": [],
    }));
    state.refresh_tokens.insert(
        token.clone(),
        RefreshGrant {
            subject: grant.client_id.clone(),
            grant_type: "access_token".to_owned(),
            expires,
        },
    );
    let response = json_response(StatusCode::OK, &json!({ "refresh_token": token }));
    record_token(state, record, Vec::new(), &response, Some(token));
    response
}

fn audience_accepted(state: &AcrState, audience: &str) -> bool {
    let trimmed = audience.trim_end_matches('/');
    trimmed == ACR_AUDIENCE
        || (state.arm_audience_allowed && trimmed == ARM_AUDIENCE.trim_end_matches('/'))
}

fn acr_token(state: &mut AcrState, req: &Req) -> Response<Body> {
    let (source, flow) = match req.method {
        Method::POST => {
            let flow = match req.form("grant_type").as_deref() {
                Some("refresh_token") => TokenFlow::RefreshToken,
                Some("password") => TokenFlow::Password,
                _ => TokenFlow::Other,
            };
            (&req.form, flow)
        }
        Method::GET => {
            let flow = match req.header("authorization") {
                Some(_) => TokenFlow::BasicGet,
                None => TokenFlow::Anonymous,
            };
            (&req.query, flow)
        }
        _ => {
            return token_error(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST");
        }
    };
    let mut record = TokenRecord {
        flow,
        service: first(source, "service"),
        tenant: None,
        scopes: all(source, "scope"),
        client: None,
    };
    let principal: Result<(String, String), (StatusCode, String)> = match flow {
        TokenFlow::RefreshToken => {
            let token = first(source, "refresh_token").unwrap_or_default();
            match state.refresh_tokens.get(&token) {
                Some(g) if state.valid(g.expires) => Ok((g.subject.clone(), g.grant_type.clone())),
                Some(_) => Err((StatusCode::UNAUTHORIZED, "refresh token expired".to_owned())),
                None => Err((StatusCode::UNAUTHORIZED, "unknown refresh token".to_owned())),
            }
        }
        TokenFlow::Password => {
            let user = first(source, "username").unwrap_or_default();
            let pass = first(source, "password").unwrap_or_default();
            let creds = STANDARD.encode(format!("{user}:{pass}"));
            basic_principal(state, &creds)
                .map(|p| (p, "password".to_owned()))
                .ok_or((
                    StatusCode::UNAUTHORIZED,
                    "bad username or password".to_owned(),
                ))
        }
        TokenFlow::BasicGet => req
            .header("authorization")
            .and_then(|v| {
                let (scheme, creds) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("basic")
                    .then(|| creds.to_owned())
            })
            .and_then(|creds| basic_principal(state, &creds))
            .map(|p| (p, "password".to_owned()))
            .ok_or((StatusCode::UNAUTHORIZED, "bad basic credentials".to_owned())),
        TokenFlow::Anonymous if state.anonymous_pull => {
            Ok(("anonymous".to_owned(), "anonymous".to_owned()))
        }
        TokenFlow::Anonymous => Err((
            StatusCode::UNAUTHORIZED,
            "authentication required".to_owned(),
        )),
        _ => Err((
            StatusCode::BAD_REQUEST,
            "grant_type must be refresh_token or password".to_owned(),
        )),
    };
    let (subject, grant_type) = match principal {
        Ok(found) => found,
        Err((status, message)) => {
            let response = token_error(status, &message);
            record_token(state, record, Vec::new(), &response, None);
            return response;
        }
    };
    record.client = Some(subject.clone());
    if record.service.as_deref() != Some(state.login_server().as_str()) {
        let message = format!("service must be {}", state.login_server());
        let response = token_error(StatusCode::BAD_REQUEST, &message);
        record_token(state, record, Vec::new(), &response, None);
        return response;
    }
    let anonymous = flow == TokenFlow::Anonymous;
    let access: Vec<ScopeGrant> = record
        .scopes
        .iter()
        .flat_map(|s| {
            s.split(' ')
                .filter_map(ScopeGrant::parse)
                .collect::<Vec<_>>()
        })
        .map(|mut grant| {
            let requested = std::mem::take(&mut grant.actions);
            grant.actions = requested
                .into_iter()
                .flat_map(|a| {
                    if a == "*" && grant.kind == "repository" {
                        state.granted_actions.iter().cloned().collect()
                    } else {
                        vec![a]
                    }
                })
                .filter(|a| {
                    if anonymous {
                        grant.kind == "repository" && a == "pull"
                    } else {
                        holds(state, &grant.kind, a)
                    }
                })
                .collect();
            grant
        })
        .collect();
    let now = state.now_unix();
    let expires = state.expiry(state.access_lifetime);
    let token = jwt(&json!({
        "jti": jti(),
        "sub": subject,
        "nbf": now,
        "exp": expires,
        "iat": now,
        "iss": ACR_ISSUER,
        "aud": state.login_server(),
        "version": "1.0",
        "access": access.iter().map(ScopeGrant::json).collect::<Vec<_>>(),
        "roles": [],
        "grant_type": grant_type,
    }));
    let granted = access.iter().map(ScopeGrant::render).collect();
    state
        .access_tokens
        .insert(token.clone(), AccessGrant { access, expires });
    let response = json_response(StatusCode::OK, &json!({ "access_token": token }));
    record_token(state, record, granted, &response, Some(token));
    response
}

// ----- /v2 --------------------------------------------------------------------------------------

fn manifests(state: &mut AcrState, req: &Req, name: &str, reference: &str) -> Response<Body> {
    let delete = req.method == Method::DELETE;
    let action = if delete { "delete" } else { "pull" };
    if let Err(denied) = authorize(state, req, Some(&Need::repo(name, action))) {
        return *denied;
    }
    if !(delete || req.method == Method::GET || req.method == Method::HEAD) {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "the double does not accept pushes over HTTP",
        );
    }
    let by_digest = reference.contains(':');
    if by_digest && !is_digest(reference) {
        return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest");
    }
    let Some(repo) = state.repos.get(name).filter(|r| r.live()) else {
        return error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            &format!("repository name not known to registry: {name}"),
        );
    };
    let tag = (!by_digest).then(|| repo.tags.get(reference)).flatten();
    let digest = if by_digest {
        reference.to_owned()
    } else {
        match tag {
            Some(tag) => tag.digest.clone(),
            None => return manifest_unknown(reference),
        }
    };
    let Some(manifest) = repo.manifests.get(&digest) else {
        return manifest_unknown(reference);
    };
    if delete {
        return delete_over_http(state, name, reference, &digest, by_digest);
    }
    let tag_readable = tag.is_none_or(|t| t.attrs.read_enabled);
    if !(manifest.pullable() && tag_readable) {
        let quarantined = manifest
            .quarantine_state
            .as_deref()
            .is_some_and(|s| s != "Passed");
        // Quarantined images look absent by tag (ref §2b); the rest is UNVERIFIED.
        if quarantined && !by_digest {
            return manifest_unknown(reference);
        }
        return error(StatusCode::FORBIDDEN, "UNKNOWN", DISALLOWED);
    }
    let head = req.method == Method::HEAD;
    let body = if head {
        Body::empty()
    } else {
        Body::from(manifest.bytes.clone())
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, &manifest.media_type)
        .header(header::CONTENT_LENGTH, manifest.bytes.len())
        .header("Docker-Content-Digest", &digest)
        .header("Docker-Distribution-Api-Version", "registry/2.0")
        .body(body)
        .expect("manifest response")
}

fn manifest_unknown(reference: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
        &format!("manifest {reference} is not found"),
    )
}

fn delete_over_http(
    state: &mut AcrState,
    name: &str,
    reference: &str,
    digest: &str,
    by_digest: bool,
) -> Response<Body> {
    let repo = state.repos.get(name).expect("checked by caller");
    let attrs = if by_digest {
        repo.manifests[digest].attrs
    } else {
        repo.tags[reference].attrs
    };
    if !(attrs.delete_enabled && attrs.write_enabled) {
        return error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", DISALLOWED);
    }
    let soft = state.soft_delete_enabled;
    if by_digest {
        let when = soft.then(|| state.stamp());
        delete_graph(state, name, digest, when);
    } else {
        let seq = state.next_seq();
        let now = state.stamp();
        let repo = state.repos.get_mut(name).expect("checked by caller");
        let removed = repo.tags.remove(reference).expect("checked by caller");
        if soft {
            repo.deleted_tags.push(DeletedTag {
                seq,
                tag: reference.to_owned(),
                digest: removed.digest,
                created_at: removed.created,
                deleted_at: now,
            });
        }
    }
    respond(StatusCode::ACCEPTED, "text/plain; charset=utf-8", "")
}

fn page_size(state: &AcrState, req: &Req) -> Result<usize, Refusal> {
    match req.query("n") {
        None => Ok(state.page_limit),
        Some(raw) => raw
            .parse::<usize>()
            .map(|n| n.min(state.page_limit))
            .map_err(|_| {
                Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "PAGINATION_NUMBER_INVALID",
                    "invalid number of results requested",
                ))
            }),
    }
}

/// Splits `keys` (already in serving order) into the page after `last` of size `n`; returns
/// the page's index range and whether more follow.
fn page_range(
    keys: &[String],
    last: Option<&str>,
    n: usize,
    lexical: bool,
) -> (usize, usize, bool) {
    let start = match last {
        None => 0,
        Some(last) => match keys.iter().position(|k| k == last) {
            Some(i) => i + 1,
            None if lexical => keys
                .iter()
                .position(|k| k.as_str() > last)
                .unwrap_or(keys.len()),
            None => keys.len(),
        },
    };
    let end = (start + n).min(keys.len());
    (start, end, end < keys.len() && n > 0)
}

fn link(path: &str, query: &[(&str, &str)]) -> String {
    format!("<{path}?{}>; rel=\"next\"", encode_query(query))
}

fn tags_list(state: &mut AcrState, req: &Req, name: &str) -> Response<Body> {
    if let Err(denied) = authorize(state, req, Some(&Need::repo(name, "pull"))) {
        return *denied;
    }
    let n = match page_size(state, req) {
        Ok(n) => n,
        Err(bad) => return *bad,
    };
    let Some(repo) = state.repos.get(name).filter(|r| r.live()) else {
        return error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "repository name not known",
        );
    };
    let keys: Vec<String> = repo
        .tags
        .iter()
        .filter(|(_, t)| t.attrs.list_enabled)
        .map(|(k, _)| k.clone())
        .collect();
    let last = req.query("last");
    let (start, end, more) = page_range(&keys, last.as_deref(), n, true);
    let page = &keys[start..end];
    let response = json_response(StatusCode::OK, &json!({ "name": name, "tags": page }));
    if more {
        let path = format!("/v2/{name}/tags/list");
        let n = n.to_string();
        let next = link(&path, &[("last", &keys[end - 1]), ("n", &n)]);
        return add_header(response, "link", &next);
    }
    response
}

fn referrers(state: &mut AcrState, req: &Req, name: &str, digest: &str) -> Response<Body> {
    if let Err(denied) = authorize(state, req, Some(&Need::repo(name, "pull"))) {
        return *denied;
    }
    if !is_digest(digest) {
        return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest");
    }
    let Some(repo) = state.repos.get(name).filter(|r| r.live()) else {
        return error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "repository name not known",
        );
    };
    let filter = req
        .query("artifactType")
        .filter(|t| !t.is_empty() && state.referrers_filtering);
    let descriptors: Vec<(String, Value)> = repo
        .manifests
        .iter()
        .filter(|(_, m)| m.subject.as_deref() == Some(digest))
        .filter_map(|(d, m)| {
            let artifact_type = m.artifact_type.clone().or_else(|| {
                (m.media_type != OCI_INDEX)
                    .then(|| m.config_media_type.clone())
                    .flatten()
            });
            if let Some(wanted) = &filter
                && artifact_type.as_deref() != Some(wanted.as_str())
            {
                return None;
            }
            let mut descriptor = json!({
                "mediaType": m.media_type,
                "digest": d,
                "size": m.bytes.len(),
            });
            if let Some(t) = artifact_type {
                descriptor["artifactType"] = Value::from(t);
            }
            if let Some(a) = &m.annotations {
                descriptor["annotations"] = a.clone();
            }
            Some((d.clone(), descriptor))
        })
        .collect();
    let keys: Vec<String> = descriptors.iter().map(|(d, _)| d.clone()).collect();
    let n = req
        .query("n")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(state.referrers_page)
        .clamp(1, state.referrers_page);
    let last = req.query("last");
    let (start, end, more) = page_range(&keys, last.as_deref(), n, true);
    let page: Vec<Value> = descriptors[start..end]
        .iter()
        .map(|(_, v)| v.clone())
        .collect();
    let index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": page });
    let mut response = respond(StatusCode::OK, OCI_INDEX, index.to_string());
    if let Some(wanted) = &filter {
        response = add_header(response, "oci-filters-applied", "artifactType");
        if more {
            let path = format!("/v2/{name}/referrers/{digest}");
            let n = n.to_string();
            let query = [
                ("artifactType", wanted.as_str()),
                ("last", &keys[end - 1]),
                ("n", &n),
            ];
            return add_header(response, "link", &link(&path, &query));
        }
    } else if more {
        let path = format!("/v2/{name}/referrers/{digest}");
        let n = n.to_string();
        return add_header(
            response,
            "link",
            &link(&path, &[("last", &keys[end - 1]), ("n", &n)]),
        );
    }
    response
}

// ----- /acr/v1 ----------------------------------------------------------------------------------

fn tag_json(name: &str, tag: &Tag) -> Value {
    json!({
        "name": name,
        "digest": tag.digest,
        "createdTime": acr_time(tag.created),
        "lastUpdateTime": acr_time(tag.updated),
        "signed": false,
        "changeableAttributes": tag.attrs.json(),
    })
}

fn manifest_json(repo: &Repo, digest: &str, m: &Manifest) -> Value {
    let mut value = json!({
        "digest": digest,
        "imageSize": m.image_size,
        "createdTime": acr_time(m.created),
        "lastUpdateTime": acr_time(m.updated),
        "mediaType": m.media_type,
    });
    if let Some(platform) = &m.platform {
        value["architecture"] = Value::from(platform.architecture.as_str());
        value["os"] = Value::from(platform.os.as_str());
    }
    if let Some(config) = &m.config_media_type {
        value["configMediaType"] = Value::from(config.as_str());
    }
    let tags = repo.tags_of(digest);
    if !tags.is_empty() {
        value["tags"] = json!(tags);
    }
    if m.media_type == OCI_INDEX || m.media_type == oci::DOCKER_MANIFEST_LIST {
        value["references"] = m
            .references
            .iter()
            .map(|(d, p)| {
                json!({
                    "digest": d,
                    "architecture": p.as_ref().map(|p| p.architecture.clone()),
                    "os": p.as_ref().map(|p| p.os.clone()),
                })
            })
            .collect();
    }
    let mut attrs = m.attrs.json();
    if let Some(q) = &m.quarantine_state {
        attrs["quarantineState"] = Value::from(q.as_str());
    }
    if let Some(d) = &m.quarantine_details {
        attrs["quarantineDetails"] = Value::from(d.as_str());
    }
    value["changeableAttributes"] = attrs;
    value
}

fn metadata_gate<'a>(
    state: &'a AcrState,
    req: &Req,
    name: &str,
    action: &'static str,
) -> Result<&'a Repo, Refusal> {
    authorize(state, req, Some(&Need::repo(name, action)))?;
    state.repos.get(name).filter(|r| r.live()).ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            &format!("repository {name} is not found"),
        ))
    })
}

fn acr_repository(state: &mut AcrState, req: &Req, name: &str) -> Response<Body> {
    let repo = match metadata_gate(state, req, name, "metadata_read") {
        Ok(repo) => repo,
        Err(denied) => return *denied,
    };
    json_response(
        StatusCode::OK,
        &json!({
            "registry": state.login_server(),
            "imageName": name,
            "createdTime": acr_time(repo.created),
            "lastUpdateTime": acr_time(repo.updated),
            "manifestCount": repo.manifests.len(),
            "tagCount": repo.tags.len(),
            "changeableAttributes": ChangeableAttributes::default().json(),
        }),
    )
}

fn acr_tag(state: &mut AcrState, req: &Req, name: &str, tag: &str) -> Response<Body> {
    if req.method == Method::DELETE {
        if let Err(denied) = metadata_gate(state, req, name, "delete") {
            return *denied;
        }
        let repo = state.repos.get(name).expect("gate checked");
        let Some(existing) = repo.tags.get(tag) else {
            return error(
                StatusCode::NOT_FOUND,
                "TAG_UNKNOWN",
                "the specified tag does not exist",
            );
        };
        let digest = existing.digest.clone();
        return delete_over_http(state, name, tag, &digest, false);
    }
    let repo = match metadata_gate(state, req, name, "metadata_read") {
        Ok(repo) => repo,
        Err(denied) => return *denied,
    };
    match repo.tags.get(tag) {
        Some(found) => json_response(
            StatusCode::OK,
            &json!({
                "registry": state.login_server(),
                "imageName": name,
                "tag": tag_json(tag, found),
            }),
        ),
        None => error(
            StatusCode::NOT_FOUND,
            "TAG_UNKNOWN",
            "the specified tag does not exist",
        ),
    }
}

fn acr_manifest(state: &mut AcrState, req: &Req, name: &str, digest: &str) -> Response<Body> {
    let repo = match metadata_gate(state, req, name, "metadata_read") {
        Ok(repo) => repo,
        Err(denied) => return *denied,
    };
    if !is_digest(digest) {
        return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest");
    }
    match repo.manifests.get(digest) {
        Some(m) => json_response(
            StatusCode::OK,
            &json!({
                "registry": state.login_server(),
                "imageName": name,
                "manifest": manifest_json(repo, digest, m),
            }),
        ),
        None => manifest_unknown(digest),
    }
}

/// `GET /acr/v1/{repo}/_tags` (`tags = true`) or `/_manifests`, paged and ordered.
fn acr_listing(state: &mut AcrState, req: &Req, name: &str, tags: bool) -> Response<Body> {
    let repo = match metadata_gate(state, req, name, "metadata_read") {
        Ok(repo) => repo,
        Err(denied) => return *denied,
    };
    let n = match page_size(state, req) {
        Ok(n) => n,
        Err(bad) => return *bad,
    };
    let orderby = req.query("orderby").unwrap_or_default();
    let mut items: Vec<(String, DateTime<Utc>, Value)> = if tags {
        repo.tags
            .iter()
            .filter(|(_, t)| t.attrs.list_enabled)
            .map(|(k, t)| (k.clone(), t.updated, tag_json(k, t)))
            .collect()
    } else {
        repo.manifests
            .iter()
            .filter(|(_, m)| m.attrs.list_enabled)
            .map(|(d, m)| (d.clone(), m.updated, manifest_json(repo, d, m)))
            .collect()
    };
    let lexical = match orderby.as_str() {
        "timedesc" => {
            items.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            false
        }
        "timeasc" => {
            items.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
            false
        }
        _ => true,
    };
    let keys: Vec<String> = items.iter().map(|i| i.0.clone()).collect();
    let last = req.query("last");
    let (start, end, more) = page_range(&keys, last.as_deref(), n, lexical);
    let page: Vec<Value> = items[start..end].iter().map(|i| i.2.clone()).collect();
    let member = if tags { "tags" } else { "manifests" };
    let mut body = json!({ "registry": state.login_server(), "imageName": name });
    body[member] = Value::from(page);
    if more {
        let path = format!("/acr/v1/{name}/_{member}");
        let n = n.to_string();
        let next = link(
            &path,
            &[("last", &keys[end - 1]), ("n", &n), ("orderby", &orderby)],
        );
        body["link"] = Value::from(next.as_str());
        return add_header(json_response(StatusCode::OK, &body), "link", &next);
    }
    json_response(StatusCode::OK, &body)
}

/// `GET /acr/v1/_deleted/{repo}/_manifests` or `/_tags` (UNVERIFIED API, ref §2c).
fn deleted_listing(state: &mut AcrState, req: &Req, name: &str, tags: bool) -> Response<Body> {
    match state.deleted_api {
        DeletedApi::NotFound => return not_found_page(),
        DeletedApi::Forbidden => {
            return error(
                StatusCode::FORBIDDEN,
                "DENIED",
                "requested access to the resource is denied",
            );
        }
        DeletedApi::Serve => {}
    }
    if let Err(denied) = authorize(state, req, Some(&Need::repo(name, "deleted_read"))) {
        return *denied;
    }
    let n = match page_size(state, req) {
        Ok(n) => n,
        Err(bad) => return *bad,
    };
    let Some(repo) = state.repos.get(name) else {
        return error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "repository name not known",
        );
    };
    let mut items: Vec<(u64, Value)> = if tags {
        repo.deleted_tags
            .iter()
            .map(|d| {
                let value = json!({
                    "tag": d.tag,
                    "digest": d.digest,
                    "createdAt": acr_time(d.created_at),
                    "deletedAt": acr_time(d.deleted_at),
                });
                (d.seq, value)
            })
            .collect()
    } else {
        repo.deleted_manifests
            .iter()
            .map(|d| {
                let value = json!({
                    "digest": d.digest,
                    "createdAt": acr_time(d.created_at),
                    "deletedAt": acr_time(d.deleted_at),
                });
                (d.seq, value)
            })
            .collect()
    };
    items.sort_by_key(|(seq, _)| *seq);
    // The cursor is the sequence of the last entry served; as a fallback a tag or digest.
    let start = match req.query("last") {
        None => 0,
        Some(last) => match last.parse::<u64>() {
            Ok(seq) => items
                .iter()
                .position(|(s, _)| *s > seq)
                .unwrap_or(items.len()),
            Err(_) => {
                let key = if tags { "tag" } else { "digest" };
                items
                    .iter()
                    .position(|(_, v)| v[key] == last.as_str())
                    .map_or(items.len(), |i| i + 1)
            }
        },
    };
    let end = (start + n).min(items.len());
    let page: Vec<Value> = items[start..end].iter().map(|(_, v)| v.clone()).collect();
    let member = if tags { "tags" } else { "manifests" };
    let mut body = json!({});
    body[member] = Value::from(page);
    let response = json_response(StatusCode::OK, &body);
    if end < items.len() && n > 0 {
        let path = format!("/acr/v1/_deleted/{name}/_{member}");
        let (last, n) = (items[end - 1].0.to_string(), n.to_string());
        let next = link(&path, &[("last", &last), ("n", &n), ("orderby", "")]);
        return add_header(response, "link", &next);
    }
    response
}

// ===== Entra listener ===========================================================================

fn entra_error(status: StatusCode, error: &str, code: u32, description: &str) -> Response<Body> {
    json_response(
        status,
        &json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {description}"),
            "error_codes": [code],
            "timestamp": acr_time(Utc::now()),
            "trace_id": jti(),
            "correlation_id": jti(),
        }),
    )
}

fn entra(state: &mut AcrState, req: &Req) -> Response<Body> {
    let tenant = req
        .path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix("/oauth2/v2.0/token"))
        .map(str::to_owned);
    let Some(tenant) = tenant.filter(|t| !t.contains('/')) else {
        return not_found_page();
    };
    let basic = req.header("authorization").and_then(|v| {
        let (scheme, creds) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = String::from_utf8(STANDARD.decode(creds.trim()).ok()?).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        Some((id.to_owned(), secret.to_owned()))
    });
    let client_id = req
        .form("client_id")
        .or_else(|| basic.as_ref().map(|b| b.0.clone()));
    let mut record = EntraRequest {
        tenant: tenant.clone(),
        grant_type: req.form("grant_type"),
        client_id: client_id.clone(),
        scope: req.form("scope"),
        client_secret: req.form("client_secret").or_else(|| basic.map(|b| b.1)),
        client_assertion_type: req.form("client_assertion_type"),
        client_assertion: req.form("client_assertion"),
        status: 0,
        error: None,
        issued: None,
        at: Instant::now(),
    };
    let outcome = entra_check(state, &record, &tenant);
    let response = match outcome {
        Err((status, error, code, description)) => {
            record.error = Some(error.to_owned());
            entra_error(status, error, code, &description)
        }
        Ok(audience) => {
            let client = client_id.expect("checked");
            let (token, lifetime) = issue_entra_token(state, &tenant, &client, &audience);
            record.issued = Some(token.clone());
            json_response(
                StatusCode::OK,
                &json!({
                    "token_type": "Bearer",
                    "expires_in": lifetime,
                    "ext_expires_in": lifetime,
                    "access_token": token,
                }),
            )
        }
    };
    record.status = response.status().as_u16();
    state.entra_requests.push(record);
    response
}

type EntraFailure = (StatusCode, &'static str, u32, String);

/// Validates a token request; `Ok` carries the audience to issue for.
fn entra_check(state: &AcrState, r: &EntraRequest, tenant: &str) -> Result<String, EntraFailure> {
    let bad = |error: &'static str, code: u32, text: String| {
        let status = if error == "invalid_client" {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        };
        Err((status, error, code, text))
    };
    if tenant != TENANT_ID {
        return bad(
            "invalid_request",
            90002,
            format!("Tenant '{tenant}' not found."),
        );
    }
    if r.grant_type.as_deref() != Some("client_credentials") {
        return bad(
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.".to_owned(),
        );
    }
    let scope = r.scope.clone().unwrap_or_default();
    let Some(audience) = scope.strip_suffix("/.default").filter(|a| !a.is_empty()) else {
        return bad(
            "invalid_scope",
            1002012,
            format!("The provided value for scope {scope} is not valid."),
        );
    };
    let Some(client_id) = r.client_id.as_deref() else {
        return bad(
            "invalid_request",
            900144,
            "The request body must contain client_id.".into(),
        );
    };
    let assertion = match &r.client_assertion_type {
        Some(t) if t != JWT_BEARER => {
            return bad(
                "invalid_request",
                50027,
                format!("Invalid client_assertion_type {t}."),
            );
        }
        Some(_) => Some(r.client_assertion.clone().unwrap_or_default()),
        None => None,
    };
    if let Some(accepted) = state.workload.get(client_id) {
        return match assertion {
            Some(a) if accepted.contains(&a) => Ok(audience.to_owned()),
            Some(_) => bad(
                "invalid_client",
                700211,
                "No matching federated identity record found for presented assertion.".into(),
            ),
            None => bad(
                "invalid_client",
                7000218,
                "The request body must contain client_assertion or client_secret.".into(),
            ),
        };
    }
    match (state.service_principals.get(client_id), assertion) {
        (None, _) => bad(
            "unauthorized_client",
            700016,
            format!("Application with identifier '{client_id}' was not found in the directory."),
        ),
        (Some(SpCredential::Secret(secret)), None) => {
            if r.client_secret.as_deref() == Some(secret.as_str()) {
                Ok(audience.to_owned())
            } else {
                bad(
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided.".into(),
                )
            }
        }
        (Some(SpCredential::Certificate { thumbprint }), Some(assertion)) => {
            let endpoint = state.entra_endpoint(tenant);
            check_certificate_assertion(
                state,
                &assertion,
                client_id,
                &endpoint,
                thumbprint.as_deref(),
            )
            .map(|()| audience.to_owned())
            .or_else(|text| bad("invalid_client", 700027, text))
        }
        (Some(_), _) => bad(
            "invalid_client",
            7000218,
            "The credential type does not match the one registered for this client.".into(),
        ),
    }
}

fn check_certificate_assertion(
    state: &AcrState,
    assertion: &str,
    client_id: &str,
    endpoint: &str,
    thumbprint: Option<&str>,
) -> Result<(), String> {
    if assertion.split('.').count() != 3 {
        return Err("Client assertion is not a JWT.".into());
    }
    let header = jwt_part(assertion, 0).ok_or("Client assertion header is not JSON.")?;
    let claims = jwt_claims(assertion).ok_or("Client assertion claims are not JSON.")?;
    let x5t = header.get("x5t").and_then(Value::as_str);
    let x5t_s256 = header.get("x5t#S256").and_then(Value::as_str);
    if x5t.is_none() && x5t_s256.is_none() {
        return Err("Client assertion header has no x5t or x5t#S256.".into());
    }
    if let Some(expected) = thumbprint
        && x5t != Some(expected)
        && x5t_s256 != Some(expected)
    {
        return Err("Client assertion thumbprint does not match the certificate.".into());
    }
    let claim = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
    if claim("aud").as_deref() != Some(endpoint) {
        return Err(format!("Client assertion aud must be {endpoint}."));
    }
    if claim("iss").as_deref() != Some(client_id) || claim("sub").as_deref() != Some(client_id) {
        return Err("Client assertion iss and sub must be the client id.".into());
    }
    let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    if !state.valid(exp) {
        return Err("Client assertion is not within its valid time range.".into());
    }
    Ok(())
}

/// Issues an Entra-style access token; returns it and its lifetime in seconds.
fn issue_entra_token(
    state: &mut AcrState,
    tenant: &str,
    client_id: &str,
    audience: &str,
) -> (String, u64) {
    let lifetime = state.entra_lifetime.as_secs();
    let now = state.now_unix();
    let expires = now + lifetime;
    let token = jwt(&json!({
        "aud": audience,
        "iss": format!("https://sts.windows.net/{tenant}/"),
        "iat": now,
        "nbf": now,
        "exp": expires,
        "appid": client_id,
        "azp": client_id,
        "oid": format!("oid-{client_id}"),
        "sub": format!("oid-{client_id}"),
        "tid": tenant,
        "idtyp": "app",
        "ver": "1.0",
        "uti": jti(),
    }));
    state.entra_tokens.insert(
        token.clone(),
        EntraGrant {
            tenant: tenant.to_owned(),
            client_id: client_id.to_owned(),
            audience: audience.to_owned(),
            expires,
        },
    );
    (token, lifetime)
}

// ===== managed identity listener ================================================================

fn identity(state: &mut AcrState, req: &Req) -> Response<Body> {
    let endpoint = match req.path.as_str() {
        IMDS_TOKEN_PATH => IdentityEndpoint::Imds,
        APP_SERVICE_TOKEN_PATH => IdentityEndpoint::AppService,
        _ => return not_found_page(),
    };
    let selectors = ["object_id", "principal_id", "mi_res_id", "msi_res_id"];
    let other_selector = selectors
        .iter()
        .find_map(|k| req.query(k).map(|v| ((*k).to_owned(), v)));
    let secret_header = match endpoint {
        IdentityEndpoint::Imds => req.header("metadata"),
        IdentityEndpoint::AppService => req.header("x-identity-header"),
    };
    let mut record = IdentityRequest {
        endpoint,
        api_version: req.query("api-version"),
        resource: req.query("resource"),
        client_id: req.query("client_id"),
        other_selector,
        secret_header,
        status: 0,
        issued: None,
        at: Instant::now(),
    };
    let response = match identity_check(state, req, &record) {
        Err((status, description)) => json_response(
            status,
            &json!({ "error": "invalid_request", "error_description": description }),
        ),
        Ok(client_id) => {
            let resource = record.resource.clone().expect("checked");
            let audience = resource.trim_end_matches("/.default").to_owned();
            let (token, lifetime) = issue_entra_token(state, TENANT_ID, &client_id, &audience);
            record.issued = Some(token.clone());
            let now = state.now_unix();
            let expires_on = (now + lifetime).to_string();
            match endpoint {
                IdentityEndpoint::Imds => json_response(
                    StatusCode::OK,
                    &json!({
                        "access_token": token,
                        "refresh_token": "",
                        "expires_in": lifetime.to_string(),
                        "expires_on": expires_on,
                        "not_before": now.to_string(),
                        "resource": resource,
                        "token_type": "Bearer",
                    }),
                ),
                IdentityEndpoint::AppService => json_response(
                    StatusCode::OK,
                    &json!({
                        "access_token": token,
                        "expires_on": expires_on,
                        "resource": resource,
                        "token_type": "Bearer",
                        "client_id": client_id,
                    }),
                ),
            }
        }
    };
    record.status = response.status().as_u16();
    state.identity_requests.push(record);
    response
}

/// Validates a managed-identity request; `Ok` carries the identity's client id.
fn identity_check(
    state: &AcrState,
    req: &Req,
    r: &IdentityRequest,
) -> Result<String, (StatusCode, String)> {
    let bad = |text: &str| Err((StatusCode::BAD_REQUEST, text.to_owned()));
    if req.method != Method::GET {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "use GET".to_owned()));
    }
    let (system, users, version) = match r.endpoint {
        IdentityEndpoint::Imds => {
            if r.secret_header.as_deref() != Some("true") {
                return bad("Required metadata header not specified");
            }
            (state.imds_system, &state.imds_user, IMDS_API_VERSION)
        }
        IdentityEndpoint::AppService => {
            if r.secret_header.as_deref() != Some(IDENTITY_HEADER_VALUE) {
                return Err((
                    StatusCode::UNAUTHORIZED,
                    "X-IDENTITY-HEADER is missing or wrong".to_owned(),
                ));
            }
            (
                state.app_service_system,
                &state.app_service_user,
                APP_SERVICE_API_VERSION,
            )
        }
    };
    match r.api_version.as_deref() {
        None => return bad("Required query variable 'api-version' is missing"),
        Some(v) if v != version => return bad(&format!("api-version {v} is not supported")),
        Some(_) => {}
    }
    if r.resource.as_deref().is_none_or(str::is_empty) {
        return bad("Required query variable 'resource' is missing");
    }
    if r.other_selector.is_some() {
        return bad("Identity not found");
    }
    match &r.client_id {
        Some(id) if users.contains(id) => Ok(id.clone()),
        Some(_) => bad("Identity not found"),
        None if system => Ok(SYSTEM_MI_CLIENT_ID.to_owned()),
        None => bad("Identity not found"),
    }
}

// ===== inbound-hook payloads ===================================================================

fn event_time_9(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string()
}

/// An ACR webhook `push` payload, shaped like the documented sample (ref §2e): `target` has
/// `mediaType, size, digest, length, repository, tag`; `request` has `id, host, method,
/// useragent`.
pub fn acr_webhook_push(image: &HookImage) -> Value {
    let mut target = json!({
        "mediaType": image.media_type,
        "size": image.size,
        "digest": image.digest,
        "length": image.size,
        "repository": image.repository,
    });
    if let Some(tag) = &image.tag {
        target["tag"] = Value::from(tag.as_str());
    }
    json!({
        "id": uuid::Uuid::now_v7().to_string(),
        "timestamp": event_time_9(Utc::now()),
        "action": "push",
        "target": target,
        "request": {
            "id": uuid::Uuid::now_v7().to_string(),
            "host": image.host,
            "method": "PUT",
            "useragent": "docker/24.0.7 go/go1.20.10 os/linux arch/amd64",
        },
    })
}

/// An ACR webhook `delete` payload (ref §2e): `target` carries only `mediaType, digest,
/// repository`, never a tag.
pub fn acr_webhook_delete(image: &HookImage) -> Value {
    json!({
        "id": uuid::Uuid::now_v7().to_string(),
        "timestamp": event_time_9(Utc::now()),
        "action": "delete",
        "target": {
            "mediaType": image.media_type,
            "digest": image.digest,
            "repository": image.repository,
        },
        "request": {
            "id": uuid::Uuid::now_v7().to_string(),
            "host": image.host,
            "method": "DELETE",
            "useragent": "python-requests/2.31.0",
        },
    })
}

fn event_grid_topic() -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{RESOURCE_GROUP}/providers/\
         Microsoft.ContainerRegistry/registries/{REGISTRY_NAME}"
    )
}

/// The `data` of an Event Grid image event, shaped like the 2021 example (ref §2f, S9).
fn event_grid_data(image: &HookImage, pushed: bool) -> Value {
    let webhook = if pushed {
        acr_webhook_push(image)
    } else {
        acr_webhook_delete(image)
    };
    json!({
        "id": webhook["id"],
        "timestamp": acr_time(Utc::now()),
        "action": webhook["action"],
        "location": "westus",
        "target": webhook["target"],
        "request": webhook["request"],
    })
}

fn event_grid_event(image: &HookImage, pushed: bool) -> Value {
    let data = event_grid_data(image, pushed);
    let (event_type, subject) = match (&image.tag, pushed) {
        (Some(tag), true) => (
            "Microsoft.ContainerRegistry.ImagePushed",
            format!("{}:{tag}", image.repository),
        ),
        (_, true) => (
            "Microsoft.ContainerRegistry.ImagePushed",
            image.repository.clone(),
        ),
        (_, false) => (
            "Microsoft.ContainerRegistry.ImageDeleted",
            image.repository.clone(),
        ),
    };
    json!([{
        "id": data["id"],
        "topic": event_grid_topic(),
        "subject": subject,
        "eventType": event_type,
        "data": data,
        "dataVersion": "2.0",
        "metadataVersion": "1",
        "eventTime": acr_time(Utc::now()),
    }])
}

/// An Event Grid-schema delivery body (an array of one event) for
/// `Microsoft.ContainerRegistry.ImagePushed`; subject `repo:tag` (ref §2f). Deliver it with
/// `aeg-event-type: Notification` (that header value is UNVERIFIED).
pub fn event_grid_image_pushed(image: &HookImage) -> Value {
    event_grid_event(image, true)
}

/// Same for `Microsoft.ContainerRegistry.ImageDeleted`: subject is the repository, the target
/// has no tag (ref §2f).
pub fn event_grid_image_deleted(image: &HookImage) -> Value {
    event_grid_event(image, false)
}

/// The Event Grid subscription-validation delivery (ref §2f, S8): send it with
/// `aeg-event-type: SubscriptionValidation`; the endpoint must answer 200
/// `{"validationResponse": validation_code}`.
pub fn event_grid_subscription_validation(validation_code: &str) -> Value {
    let now = acr_time(Utc::now());
    json!([{
        "id": uuid::Uuid::now_v7().to_string(),
        "topic": format!("/subscriptions/{SUBSCRIPTION_ID}"),
        "subject": "",
        "data": {
            "validationCode": validation_code,
            "validationUrl": format!(
                "https://127.0.0.1:553/eventsubscriptions/driftwatch/validate?id={validation_code}\
                 &t={now}&apiVersion=2018-05-01-preview&token=driftwatch-test"
            ),
        },
        "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
        "eventTime": now,
        "metadataVersion": "1",
        "dataVersion": "1",
    }])
}

/// A CloudEvents 1.0 `Microsoft.ContainerRegistry.ImagePushed` event (ref §2f envelope), one
/// structured-mode object (`Content-Type: application/cloudevents+json`).
pub fn cloud_event_image_pushed(image: &HookImage) -> Value {
    let data = event_grid_data(image, true);
    let subject = match &image.tag {
        Some(tag) => format!("{}:{tag}", image.repository),
        None => image.repository.clone(),
    };
    json!({
        "id": data["id"],
        "source": event_grid_topic(),
        "subject": subject,
        "type": "Microsoft.ContainerRegistry.ImagePushed",
        "time": acr_time(Utc::now()),
        "data": data,
        "specversion": "1.0",
    })
}
