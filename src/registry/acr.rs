//! Azure Container Registry's data-plane extras: tag and manifest attributes from
//! `/acr/v1`, its paged tag listing, and the soft-delete listings under `/acr/v1/_deleted`
//! (undocumented; shapes as azure-cli reads them).

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::{RegistryClient, RegistryError, read_capped};
use crate::model::{Digest, ItemAttributes, SoftDelete};

/// Pages of a tag listing or a soft-delete listing followed at most.
const MAX_PAGES: usize = 50;
/// Items per page asked for; ACR serves at most 100.
const PAGE_SIZE: usize = 100;
/// Body cap of one page.
const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// How long a repository whose metadata API refused us goes the generic way.
pub const RECHECK_METADATA: std::time::Duration = std::time::Duration::from_secs(3600);

/// What the metadata API said.
#[derive(Debug)]
pub enum Metadata<T> {
    /// It answered.
    Found(T),
    /// It said 404: the item is not there (or hidden); `/v2` has the last word.
    NotFound,
    /// It cannot be used here: no `metadata_read` (or `deleted_read`), or a registry without
    /// the API. The reason is for the one warning.
    Unavailable(String),
}

impl<T> Metadata<T> {
    /// The found value through `f`; the other answers as they are.
    fn try_map<U, E>(self, f: impl FnOnce(T) -> Result<U, E>) -> Result<Metadata<U>, E> {
        Ok(match self {
            Metadata::Found(v) => Metadata::Found(f(v)?),
            Metadata::NotFound => Metadata::NotFound,
            Metadata::Unavailable(r) => Metadata::Unavailable(r),
        })
    }
}

/// A tag as `/acr/v1/<repo>/_tags` describes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcrTag {
    /// The tag.
    pub name: String,
    /// The manifest it points at.
    pub digest: Digest,
    #[serde(default)]
    created_time: Option<String>,
    #[serde(default)]
    last_update_time: Option<String>,
    #[serde(default)]
    changeable_attributes: Option<Changeable>,
}

impl AcrTag {
    /// The tag's attributes as evidence.
    pub fn attributes(&self) -> ItemAttributes {
        item(
            &self.created_time,
            &self.last_update_time,
            &self.changeable_attributes,
            None,
        )
    }
}

/// A manifest as `/acr/v1/<repo>/_manifests/<digest>` describes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcrManifest {
    /// Its digest.
    pub digest: Digest,
    #[serde(default)]
    created_time: Option<String>,
    #[serde(default)]
    last_update_time: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    changeable_attributes: Option<Changeable>,
}

impl AcrManifest {
    /// The manifest's attributes as evidence.
    pub fn attributes(&self) -> ItemAttributes {
        item(
            &self.created_time,
            &self.last_update_time,
            &self.changeable_attributes,
            self.tags.clone(),
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Changeable {
    #[serde(default)]
    delete_enabled: Option<bool>,
    #[serde(default)]
    write_enabled: Option<bool>,
    #[serde(default)]
    read_enabled: Option<bool>,
    #[serde(default)]
    list_enabled: Option<bool>,
    #[serde(default)]
    quarantine_state: Option<String>,
}

fn item(
    created: &Option<String>,
    updated: &Option<String>,
    changeable: &Option<Changeable>,
    tags: Option<Vec<String>>,
) -> ItemAttributes {
    let c = changeable.as_ref();
    ItemAttributes {
        created: created.clone(),
        updated: updated.clone(),
        delete_enabled: c.and_then(|c| c.delete_enabled),
        write_enabled: c.and_then(|c| c.write_enabled),
        read_enabled: c.and_then(|c| c.read_enabled),
        list_enabled: c.and_then(|c| c.list_enabled),
        quarantine_state: c.and_then(|c| c.quarantine_state.clone()),
        tags,
    }
}

#[derive(Deserialize)]
struct TagAnswer {
    tag: AcrTag,
}

#[derive(Deserialize)]
struct ManifestAnswer {
    manifest: AcrManifest,
}

#[derive(Deserialize)]
struct TagPage {
    #[serde(default)]
    tags: Vec<AcrTag>,
}

/// One entry of a soft-delete listing: a manifest (`digest`) or a tag (`tag` and `digest`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeletedEntry {
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    digest: Option<Digest>,
    deleted_at: String,
}

#[derive(Deserialize)]
struct DeletedPage {
    #[serde(default)]
    manifests: Vec<DeletedEntry>,
    #[serde(default)]
    tags: Vec<DeletedEntry>,
}

impl RegistryClient {
    /// Whether this registry is an ACR whose `/acr/v1` API is tried.
    pub fn is_acr(&self) -> bool {
        self.acr
    }

    /// Whether `/acr/v1` is worth asking for `repository`: an ACR, and it has not refused
    /// within the last [`RECHECK_METADATA`].
    pub fn metadata_usable(&self, repository: &str) -> bool {
        self.acr
            && self
                .metadata_unavailable
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(repository)
                .is_none_or(|at| at.elapsed() >= RECHECK_METADATA)
    }

    /// Records that `/acr/v1` refused us for `repository`, warning once: its checks go the
    /// generic way for [`RECHECK_METADATA`], then the API is tried again (a permission may
    /// have been granted meanwhile).
    pub fn metadata_refused(&self, repository: &str, reason: &str) {
        let first = self
            .metadata_unavailable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(repository.to_string(), std::time::Instant::now())
            .is_none();
        if first {
            tracing::warn!(
                registry = %self.registry,
                repository,
                cause = reason,
                "ACR metadata API unavailable; checking without attributes or tag listing \
                 (grant metadata_read, e.g. the AcrPull role's metadata read, to use it)"
            );
        }
    }

    /// Whether the attributes of `digest`, the manifest under a watched tag, are due to be
    /// read again: every `attributes_refresh` in a running process. The first call of a
    /// process only starts the clock, so that a one-shot `check` does not pay for it.
    pub fn manifest_attributes_due(&self, repository: &str, digest: &Digest) -> bool {
        let Some(every) = self.attributes_refresh else {
            return false;
        };
        let now = std::time::Instant::now();
        let mut read = self
            .manifest_attributes_read
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (repository.to_string(), digest.clone());
        match read.get(&key) {
            Some(at) if now.duration_since(*at) < every => false,
            Some(_) => {
                read.insert(key, now);
                true
            }
            None => {
                read.retain(|_, at| now.duration_since(*at) < every.max(RECHECK_METADATA));
                read.insert(key, now);
                every.is_zero()
            }
        }
    }

    /// `GET /acr/v1/<repo>/_tags/<tag>`.
    pub async fn acr_tag(
        &self,
        repository: &str,
        tag: &str,
    ) -> Result<Metadata<AcrTag>, RegistryError> {
        let path = format!("/acr/v1/{repository}/_tags/{tag}");
        let what = format!("attributes of {repository}:{tag}");
        let answer = self
            .metadata_get(&path, repository, "metadata_read", &what)
            .await?;
        answer.try_map(|body| {
            serde_json::from_slice::<TagAnswer>(&body)
                .map(|a| a.tag)
                .map_err(|e| self.malformed(&what, format!("not a tag answer: {e}")))
        })
    }

    /// `GET /acr/v1/<repo>/_manifests/<digest>`.
    pub async fn acr_manifest(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<Metadata<AcrManifest>, RegistryError> {
        let path = format!("/acr/v1/{repository}/_manifests/{digest}");
        let what = format!("attributes of {repository}@{digest}");
        let answer = self
            .metadata_get(&path, repository, "metadata_read", &what)
            .await?;
        answer.try_map(|body| {
            let m = serde_json::from_slice::<ManifestAnswer>(&body)
                .map_err(|e| self.malformed(&what, format!("not a manifest answer: {e}")))?
                .manifest;
            if m.digest != *digest {
                let reason = format!("the answer describes {} instead", m.digest);
                return Err(self.malformed(&what, reason));
            }
            Ok(m)
        })
    }

    /// Every tag of `repository` from the paged `/acr/v1/<repo>/_tags` listing, or `None`
    /// when it needs more than `max_pages` pages: then a lookup per tag is cheaper, and the
    /// page count is remembered so that the next cycle does not try again.
    pub async fn acr_tag_listing(
        &self,
        repository: &str,
        max_pages: usize,
    ) -> Result<Metadata<Option<Vec<AcrTag>>>, RegistryError> {
        let what = format!("tag listing of {repository}");
        let mut path = format!("/acr/v1/{repository}/_tags?n={PAGE_SIZE}");
        let mut out = Vec::new();
        for page in 1..=max_pages.min(MAX_PAGES) {
            let (body, next) = match self
                .metadata_page(&path, repository, "metadata_read", &what)
                .await?
            {
                Metadata::Found(p) => p,
                Metadata::NotFound => return Ok(Metadata::NotFound),
                Metadata::Unavailable(r) => return Ok(Metadata::Unavailable(r)),
            };
            let list: TagPage = serde_json::from_slice(&body)
                .map_err(|e| self.malformed(&what, format!("not a tag list: {e}")))?;
            out.extend(list.tags);
            match next {
                Some(p) => path = p,
                None => {
                    self.remember_listing(repository, page);
                    return Ok(Metadata::Found(Some(out)));
                }
            }
        }
        self.remember_listing(repository, max_pages + 1);
        Ok(Metadata::Found(None))
    }

    /// Pages the last tag listing of `repository` took (more than the limit when it was
    /// abandoned), if it was listed before.
    pub fn listing_pages(&self, repository: &str) -> Option<usize> {
        self.listing_pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(repository)
            .copied()
    }

    fn remember_listing(&self, repository: &str, pages: usize) {
        self.listing_pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(repository.to_string(), pages);
    }

    /// What the soft-delete listing says about `digest` in `repository`, or about `tag`
    /// when one is given. A listing that cannot be read for lack of permission, or that does
    /// not exist, is an unknown state; other trouble (throttling, 5xx) fails, like any
    /// other lookup, so that it is never mistaken for a purge.
    pub async fn soft_delete(
        &self,
        repository: &str,
        digest: Option<&Digest>,
        tag: Option<&str>,
    ) -> Result<SoftDelete, RegistryError> {
        let kind = if tag.is_some() { "_tags" } else { "_manifests" };
        let what = format!("soft-deleted {} of {repository}", &kind[1..]);
        let mut path = format!("/acr/v1/_deleted/{repository}/{kind}?n={PAGE_SIZE}");
        let mut found: Option<(DateTime<Utc>, DeletedEntry)> = None;
        let mut complete = false;
        for _ in 0..MAX_PAGES {
            let (body, next) = match self
                .metadata_page(&path, repository, "deleted_read", &what)
                .await?
            {
                Metadata::Found(p) => p,
                Metadata::NotFound => {
                    return Ok(SoftDelete::Unknown {
                        reason: "the registry has no soft-delete listing (soft delete is not \
                                 available on geo-replicated registries)"
                            .to_string(),
                    });
                }
                Metadata::Unavailable(reason) => return Ok(SoftDelete::Unknown { reason }),
            };
            let list: DeletedPage = serde_json::from_slice(&body)
                .map_err(|e| self.malformed(&what, format!("not a soft-delete listing: {e}")))?;
            // azure-cli's production code reads tags under "tags"; its mock under
            // "manifests". Both are accepted. A tag deleted more than once has several
            // entries: the latest deletion is the one that counts.
            for entry in list.manifests.into_iter().chain(list.tags) {
                let matches = match tag {
                    Some(t) => entry.tag.as_deref() == Some(t),
                    None => entry.digest.as_ref() == digest,
                };
                if !matches {
                    continue;
                }
                let at = DateTime::parse_from_rfc3339(&entry.deleted_at)
                    .map_err(|e| {
                        self.malformed(&what, format!("deletedAt {:?}: {e}", entry.deleted_at))
                    })?
                    .with_timezone(&Utc);
                if found.as_ref().is_none_or(|(latest, _)| at >= *latest) {
                    found = Some((at, entry));
                }
            }
            match next {
                Some(p) => path = p,
                None => {
                    complete = true;
                    break;
                }
            }
        }
        let Some((deleted_at, entry)) = found else {
            return Ok(if complete {
                SoftDelete::NotListed
            } else {
                SoftDelete::Unknown {
                    reason: format!("{what}: the listing was cut at {MAX_PAGES} pages"),
                }
            });
        };
        let digest = entry.digest.or_else(|| digest.cloned());
        let name = registry_name(&self.registry);
        let tag_part = tag.unwrap_or("<tag>");
        let restore_command = match &digest {
            Some(d) => {
                format!("az acr manifest restore -r {name} -n {repository}:{tag_part} -d {d}")
            }
            None => format!("az acr manifest restore -r {name} -n {repository}:{tag_part}"),
        };
        Ok(SoftDelete::SoftDeleted {
            deleted_at,
            purge_at: deleted_at + chrono::Duration::days(i64::from(self.retention_days)),
            retention_days: self.retention_days,
            digest: if tag.is_some() { digest } else { None },
            restore_command,
            reminded: false,
        })
    }

    async fn metadata_get(
        &self,
        path: &str,
        repository: &str,
        action: &str,
        what: &str,
    ) -> Result<Metadata<Vec<u8>>, RegistryError> {
        self.metadata_page(path, repository, action, what)
            .await?
            .try_map(|(body, _)| Ok(body))
    }

    /// One `/acr/v1` GET with a token for `repository:<repo>:<action>`: the body and the
    /// next page's path.
    async fn metadata_page(
        &self,
        path: &str,
        repository: &str,
        action: &str,
        what: &str,
    ) -> Result<Metadata<(Vec<u8>, Option<String>)>, RegistryError> {
        let scope = format!("repository:{repository}:{action}");
        let sent = self
            .send_scoped(Method::GET, path, &scope, "application/json", what)
            .await;
        let (resp, _permit) = match sent {
            Ok(r) => r,
            Err(RegistryError::Unauthorized { detail, .. }) => {
                return Ok(Metadata::Unavailable(format!(
                    "{what}: not authorized ({detail}); the identity lacks {action}"
                )));
            }
            Err(e) => return Err(e),
        };
        let status = resp.status();
        let next = super::referrers::next_link(&resp, &self.base);
        match status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(Metadata::NotFound),
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                return Ok(Metadata::Unavailable(format!(
                    "{what}: denied ({}); the identity lacks {action}",
                    status.as_u16()
                )));
            }
            // Classic registries have no `/acr/v1` (azure-cli falls back the same way).
            StatusCode::METHOD_NOT_ALLOWED => {
                return Ok(Metadata::Unavailable(format!(
                    "{what}: the registry does not serve /acr/v1 (405)"
                )));
            }
            s => {
                let body = read_capped(resp, 64 * 1024).await.unwrap_or_default();
                return Err(self.status_error(s, super::error_code(&body), what));
            }
        }
        let body = read_capped(resp, MAX_PAGE_BYTES)
            .await
            .map_err(|_| self.malformed(what, "unreadable or oversized page".to_string()))?;
        Ok(Metadata::Found((body, next)))
    }
}

/// The registry name `az` takes for `-r`: the login server's first label on Azure, else the
/// host as written.
pub fn registry_name(host: &str) -> &str {
    if crate::config::is_acr_host(host) {
        host.split('.').next().unwrap_or(host)
    } else {
        host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_answers_read_as_documented() {
        let body = br#"{"registry":"r.azurecr.io","imageName":"repo","tag":{"name":"v1",
            "digest":"sha256:0000000000000000000000000000000000000000000000000000000000000001",
            "createdTime":"2024-01-01T00:00:00Z","lastUpdateTime":"2024-01-02T00:00:00Z",
            "signed":false,"changeableAttributes":{"deleteEnabled":false,"writeEnabled":false,
            "readEnabled":true,"listEnabled":true}}}"#;
        let t: TagAnswer = serde_json::from_slice(body).unwrap();
        let a = t.tag.attributes();
        assert_eq!(a.delete_enabled, Some(false));
        assert_eq!(a.updated.as_deref(), Some("2024-01-02T00:00:00Z"));
        assert_eq!(a.tags, None);
    }

    #[test]
    fn manifest_answers_keep_quarantine_and_tags() {
        let body = br#"{"manifest":{
            "digest":"sha256:0000000000000000000000000000000000000000000000000000000000000001",
            "createdTime":"t","lastUpdateTime":"u","tags":["v1","latest"],
            "changeableAttributes":{"deleteEnabled":true,"quarantineState":"Passed"}}}"#;
        let m: ManifestAnswer = serde_json::from_slice(body).unwrap();
        let a = m.manifest.attributes();
        assert_eq!(a.quarantine_state.as_deref(), Some("Passed"));
        assert_eq!(a.tags, Some(vec!["v1".to_string(), "latest".to_string()]));
    }

    #[test]
    fn registry_names_for_az() {
        assert_eq!(registry_name("myreg.azurecr.io"), "myreg");
        assert_eq!(registry_name("127.0.0.1:5000"), "127.0.0.1:5000");
    }
}
