//! Referrer discovery: the OCI 1.1 referrers API with its `Link` pages, the referrers tag
//! schema for registries without the API, and cosign's `sha256-<hex>.sig|.att|.sbom` tags,
//! which most signed images in the wild still use.

use std::collections::BTreeMap;

use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::{RegistryClient, RegistryError, manifest, read_capped};
use crate::model::{Digest, Referrer};

/// Referrer pages followed at most; a subject with more is reported as far as read.
const MAX_PAGES: usize = 20;
/// Tag-list pages followed at most (of up to 1,000 tags each).
const MAX_TAG_PAGES: usize = 50;
/// Body cap of one referrers or tag-list page.
const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// How long a registry's missing referrers API is believed before it is asked again.
const RECHECK_API: std::time::Duration = std::time::Duration::from_secs(3600);
/// How often a repository's tags are listed to discover new cosign tags of a subject whose
/// referrers are known; in between, only the known cosign tags are looked at.
pub const COSIGN_RELIST: std::time::Duration = std::time::Duration::from_secs(3600);

/// Artifact type given to a cosign `.sig` tag's manifest.
pub const COSIGN_SIGNATURE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// Artifact type given to a cosign `.sbom` tag's manifest.
pub const COSIGN_SBOM: &str = "application/vnd.dev.cosign.artifact.sbom.v1+json";
/// Artifact type given to a cosign `.att` tag's manifest.
pub const COSIGN_ATTESTATION: &str = "application/vnd.dev.cosign.artifact.att.v1+json";

/// What the referrers API said.
#[derive(Debug)]
pub enum ApiAnswer {
    /// The registry implements the API; here is the (filtered) list.
    Supported(Vec<Referrer>),
    /// The list is unchanged since the ETag offered (304).
    NotModified,
    /// The registry does not implement it: use the tag schema.
    Unsupported,
    /// The repository does not exist.
    NoRepository,
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    media_type: String,
    digest: Digest,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// Referrers listed in an index body (an API page or a tag-schema index).
pub fn parse_index(body: &[u8], source: &str) -> Result<Vec<Referrer>, String> {
    let index: Index = serde_json::from_slice(body).map_err(|e| format!("not an index: {e}"))?;
    Ok(index
        .manifests
        .into_iter()
        .map(|m| Referrer {
            digest: m.digest,
            artifact_type: m.artifact_type,
            media_type: m.media_type,
            annotations: m.annotations,
            source: Some(source.to_string()),
        })
        .collect())
}

/// The `rel="next"` target of a `Link` header, as a path on the same registry.
pub(super) fn next_link(resp: &reqwest::Response, base: &str) -> Option<String> {
    let header = resp.headers().get(reqwest::header::LINK)?.to_str().ok()?;
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params.split(';').any(|p| {
            let p = p.trim().replace(' ', "");
            p == "rel=\"next\"" || p == "rel=next"
        });
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        if !is_next {
            return None;
        }
        // Relative targets are resolved against the registry; absolute ones must stay on it,
        // so that credentials never follow a link elsewhere.
        if target.starts_with('/') {
            Some(target.to_string())
        } else {
            target
                .strip_prefix(base)
                .filter(|p| p.starts_with('/'))
                .map(str::to_string)
        }
    })
}

impl RegistryClient {
    /// `GET /v2/<repo>/referrers/<digest>`, following `Link` pages. With `artifact_type`,
    /// the list is filtered here unless the registry says `OCI-Filters-Applied:
    /// artifactType`.
    pub async fn referrers_api(
        &self,
        repository: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ApiAnswer, RegistryError> {
        Ok(self
            .referrers_api_if_changed(repository, subject, artifact_type, None)
            .await?
            .0)
    }

    /// [`Self::referrers_api`] with `If-None-Match: etag` on the first page, and the ETag of
    /// a list that fits one page (a later page could change under an unchanged first one).
    pub async fn referrers_api_if_changed(
        &self,
        repository: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
        etag: Option<&str>,
    ) -> Result<(ApiAnswer, Option<String>), RegistryError> {
        let what = format!("referrers of {repository}@{subject}");
        let mut path = format!("/v2/{repository}/referrers/{subject}");
        if let Some(t) = artifact_type {
            path.push_str(&format!(
                "?artifactType={}",
                url::form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()
            ));
        }
        let mut out = Vec::new();
        let scope = format!("repository:{repository}:pull");
        let mut first_etag = None;
        for page in 0..MAX_PAGES {
            let offer = if page == 0 { etag } else { None };
            let (resp, _permit) = self
                .send_with(
                    Method::GET,
                    &path,
                    &scope,
                    manifest::OCI_INDEX,
                    offer,
                    &what,
                )
                .await?;
            let status = resp.status();
            if page == 0 && offer.is_some() && status == StatusCode::NOT_MODIFIED {
                return Ok((ApiAnswer::NotModified, etag.map(str::to_string)));
            }
            if page == 0 {
                first_etag = super::header_text(&resp, reqwest::header::ETAG);
            }
            let content_type = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| manifest::bare_media_type(v).to_string())
                .unwrap_or_default();
            let filtered = resp
                .headers()
                .get("oci-filters-applied")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|f| f.trim() == "artifactType"));
            let next = next_link(&resp, &self.base);
            if status == StatusCode::NOT_FOUND {
                let body = read_capped(resp, 64 * 1024).await.unwrap_or_default();
                return Ok((
                    match super::error_code(&body).as_deref() {
                        Some("NAME_UNKNOWN") => ApiAnswer::NoRepository,
                        _ if page == 0 => ApiAnswer::Unsupported,
                        code => {
                            return Err(self.status_error(status, code.map(str::to_string), &what));
                        }
                    },
                    None,
                ));
            }
            // Some registries answer an unknown route with 400 or 405 instead of 404.
            if page == 0 && matches!(status.as_u16(), 400 | 405) {
                return Ok((ApiAnswer::Unsupported, None));
            }
            if status != StatusCode::OK {
                let body = read_capped(resp, 64 * 1024).await.unwrap_or_default();
                return Err(self.status_error(status, super::error_code(&body), &what));
            }
            if content_type != manifest::OCI_INDEX {
                if page == 0 {
                    return Ok((ApiAnswer::Unsupported, None));
                }
                return Err(self.malformed(&what, format!("a page served as {content_type:?}")));
            }
            let body = read_capped(resp, MAX_PAGE_BYTES)
                .await
                .map_err(|_| self.malformed(&what, "unreadable or oversized page".to_string()))?;
            let mut list =
                parse_index(&body, "api").map_err(|reason| self.malformed(&what, reason))?;
            if let (Some(t), false) = (artifact_type, filtered) {
                list.retain(|r| r.artifact_type.as_deref() == Some(t));
            }
            out.extend(list);
            match next {
                Some(p) => path = p,
                None => {
                    let etag = if page == 0 { first_etag } else { None };
                    return Ok((ApiAnswer::Supported(out), etag));
                }
            }
        }
        tracing::warn!(
            registry = %self.registry,
            subject = %subject,
            pages = MAX_PAGES,
            "referrers list cut at the page limit"
        );
        Ok((ApiAnswer::Supported(out), None))
    }

    /// Whether `repository` recently answered that it has no referrers API, so that the tag
    /// schema is used without asking again (for an hour).
    pub fn referrers_api_absent(&self, repository: &str) -> bool {
        self.no_referrers_api
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(repository)
            .is_some_and(|since| since.elapsed() < RECHECK_API)
    }

    /// Records that `repository` has no referrers API.
    pub fn note_referrers_api_absent(&self, repository: &str) {
        let mut absent = self
            .no_referrers_api
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        absent.retain(|_, since| since.elapsed() < RECHECK_API);
        absent.insert(repository.to_string(), std::time::Instant::now());
    }

    /// Whether `repository`'s tags were listed for cosign tags of `subject` within the last
    /// [`COSIGN_RELIST`]; then only the cosign tags already known are looked at.
    pub fn cosign_listed_recently(&self, repository: &str, subject: &Digest) -> bool {
        self.cosign_listed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(repository.to_string(), subject.clone()))
            .is_some_and(|at| at.elapsed() < COSIGN_RELIST)
    }

    /// Records a cosign tag discovery for `subject`, forgetting those too old to matter.
    pub fn note_cosign_listed(&self, repository: &str, subject: &Digest) {
        let mut listed = self.cosign_listed.lock().unwrap_or_else(|e| e.into_inner());
        listed.retain(|_, at| at.elapsed() < COSIGN_RELIST);
        listed.insert(
            (repository.to_string(), subject.clone()),
            std::time::Instant::now(),
        );
    }

    /// Every tag of a repository (following `Link` pages), or `None` if the repository does
    /// not exist.
    pub async fn tags(&self, repository: &str) -> Result<Option<Vec<String>>, RegistryError> {
        let what = format!("tags of {repository}");
        let mut path = format!("/v2/{repository}/tags/list?n=1000");
        let mut out = Vec::new();
        for _ in 0..MAX_TAG_PAGES {
            let (resp, _permit) = self
                .send(Method::GET, &path, repository, "application/json", &what)
                .await?;
            let status = resp.status();
            let next = next_link(&resp, &self.base);
            if status == StatusCode::NOT_FOUND {
                let body = read_capped(resp, 64 * 1024).await.unwrap_or_default();
                return match super::error_code(&body).as_deref() {
                    Some("NAME_UNKNOWN") => Ok(None),
                    code => Err(self.status_error(status, code.map(str::to_string), &what)),
                };
            }
            if status != StatusCode::OK {
                let body = read_capped(resp, 64 * 1024).await.unwrap_or_default();
                return Err(self.status_error(status, super::error_code(&body), &what));
            }
            let body = read_capped(resp, MAX_PAGE_BYTES)
                .await
                .map_err(|_| self.malformed(&what, "unreadable or oversized page".to_string()))?;
            let list: TagList = serde_json::from_slice(&body)
                .map_err(|e| self.malformed(&what, format!("not a tag list: {e}")))?;
            out.extend(list.tags.unwrap_or_default());
            match next {
                Some(p) => path = p,
                None => return Ok(Some(out)),
            }
        }
        Ok(Some(out))
    }

    pub(super) fn malformed(&self, what: &str, reason: String) -> RegistryError {
        RegistryError::Malformed {
            registry: self.registry.clone(),
            what: what.to_string(),
            reason,
        }
    }
}

/// The tag the referrers tag schema uses for `subject`: `<alg>-<encoded>`.
pub fn schema_tag(subject: &Digest) -> String {
    let alg: String = subject.algorithm().chars().take(32).collect();
    let enc: String = subject.encoded().chars().take(64).collect();
    format!("{alg}-{enc}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_tags_follow_the_spec() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(schema_tag(&d), d.as_str().replace(':', "-"));
    }
}
