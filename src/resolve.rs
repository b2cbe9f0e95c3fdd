//! Watch targets to observations: one tag or digest looked up HEAD-first, with the body
//! fetched only when the digest is one we hold no evidence for.

use crate::model::{ManifestEvidence, Observation, ObtainedBy, Reference, RegistryAttributes};
use crate::registry::acr::{AcrTag, Metadata};
use crate::registry::manifest::parse_evidence;
use crate::registry::{Fetched, ManifestLookup, Registries, RegistryClient, RegistryError};

/// What an ACR tag listing run earlier in the cycle said about a tag target.
#[derive(Debug, Clone, Default)]
pub enum Prefetch {
    /// No listing covered this target.
    #[default]
    None,
    /// The listing has the tag.
    Listed(AcrTag),
    /// A complete listing lacks the tag: deleted, or hidden with `listEnabled=false`.
    Unlisted,
}

/// Looks up `target` (a reference with a tag or a digest, not both).
///
/// `known` is evidence already stored for some digest of this target; when the HEAD answers
/// with that digest, it is reused instead of fetching the body again, so an unchanged tag
/// costs exactly one request.
///
/// With `referrers`, the referrers of the digest found are discovered too (see
/// [`referrers`]); they change without the digest changing, so they are looked up every time.
pub async fn observe(
    registries: &Registries,
    target: &Reference,
    known: Option<&ManifestEvidence>,
    referrers: bool,
    prefetch: Prefetch,
) -> Result<Observation, RegistryError> {
    let client = registries.client(target.registry())?;
    let repo = target.repository();
    let acr = if client.metadata_usable(repo) {
        observe_acr(&client, target, known, prefetch).await?
    } else {
        None
    };
    let mut observation = match acr {
        Some(o) => o,
        None => observe_manifest(&client, target, known).await?,
    };
    if let Observation::Absent { soft_delete, .. } = &mut observation
        && client.is_acr()
    {
        *soft_delete = Some(
            client
                .soft_delete(repo, target.digest(), target.tag())
                .await?,
        );
    }
    if let (Observation::Present(e), true) = (&mut observation, referrers) {
        (e.referrers, e.referrers_etag) =
            self::referrers(registries, target, &e.digest, known).await?;
    }
    Ok(observation)
}

async fn observe_manifest(
    client: &RegistryClient,
    target: &Reference,
    known: Option<&ManifestEvidence>,
) -> Result<Observation, RegistryError> {
    let repo = target.repository();
    let pinned = target.digest();
    let reference = match (pinned, target.tag()) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.to_string(),
        (None, None) => unreachable!("a parsed reference has a tag or a digest"),
    };

    let head = match client.head_manifest(repo, &reference).await? {
        ManifestLookup::NotFound { code } => return Ok(Observation::absent(code)),
        ManifestLookup::Found(h) => h,
    };
    let digest = match (head.digest, pinned) {
        (Some(d), Some(p)) if &d != p => {
            return Err(RegistryError::DigestMismatch {
                registry: target.registry().to_string(),
                what: format!("{repo}@{p}"),
                expected: p.to_string(),
                actual: d.to_string(),
            });
        }
        (Some(d), _) => d,
        (None, Some(p)) => p.clone(),
        // Without the header a HEAD by tag tells us nothing: fetch and hash the body.
        (None, None) => {
            return match client.get_manifest(repo, &reference, None).await? {
                ManifestLookup::Found(f) => evidence(target, f),
                ManifestLookup::NotFound { code } => Ok(Observation::absent(code)),
            };
        }
    };

    if let Some(k) = known.filter(|k| k.digest == digest) {
        let mut e = k.clone();
        e.obtained_by = ObtainedBy::Head;
        return Ok(Observation::Present(e));
    }
    // Fetch by digest, not by tag: the tag may move again between the two requests.
    fetch_by_digest(client, target, &digest).await
}

async fn fetch_by_digest(
    client: &RegistryClient,
    target: &Reference,
    digest: &crate::model::Digest,
) -> Result<Observation, RegistryError> {
    match client
        .get_manifest(target.repository(), digest.as_str(), Some(digest))
        .await?
    {
        ManifestLookup::Found(f) => evidence(target, f),
        ManifestLookup::NotFound { code } => Ok(Observation::absent(code)),
    }
}

/// The ACR way: the metadata API names the digest and the attributes in one request, so an
/// unchanged target still costs one request, now with its lock flags. `None` leaves the
/// decision to `/v2`: the API said not found (a hidden or quarantined item looks the same),
/// or it cannot be used here (then it is not asked again).
async fn observe_acr(
    client: &RegistryClient,
    target: &Reference,
    known: Option<&ManifestEvidence>,
    prefetch: Prefetch,
) -> Result<Option<Observation>, RegistryError> {
    let repo = target.repository();
    let refused = |reason: String| {
        client.metadata_refused(repo, &reason);
        Ok(None)
    };
    if let Some(digest) = target.digest() {
        let manifest = match client.acr_manifest(repo, digest).await? {
            Metadata::Found(m) => m.attributes(),
            Metadata::NotFound => return Ok(None),
            Metadata::Unavailable(r) => return refused(r),
        };
        let mut e = match known.filter(|k| k.digest == *digest) {
            Some(k) => with_obtained_by(k, ObtainedBy::Metadata),
            None => match fetch_by_digest(client, target, digest).await? {
                Observation::Present(e) => e,
                Observation::Absent { code, .. } => {
                    return Err(unpullable(client, target, digest, &code));
                }
            },
        };
        e.attributes = Some(RegistryAttributes {
            tag: None,
            manifest: Some(manifest),
        });
        return Ok(Some(Observation::Present(e)));
    }
    let Some(tag) = target.tag() else {
        return Ok(None);
    };
    let (listed, by) = match prefetch {
        Prefetch::Listed(t) => (t, ObtainedBy::Listing),
        Prefetch::Unlisted => return Ok(None),
        Prefetch::None => match client.acr_tag(repo, tag).await? {
            Metadata::Found(t) => (t, ObtainedBy::Metadata),
            Metadata::NotFound => return Ok(None),
            Metadata::Unavailable(r) => return refused(r),
        },
    };
    let mut e = match known.filter(|k| k.digest == listed.digest) {
        Some(k) => with_obtained_by(k, by),
        None => {
            let mut e = match fetch_by_digest(client, target, &listed.digest).await? {
                Observation::Present(e) => e,
                Observation::Absent { code, .. } => {
                    return Err(unpullable(client, target, &listed.digest, &code));
                }
            };
            // The body is verified against the digest; which digest the tag names is what
            // the metadata API said.
            e.obtained_by = by;
            // The manifest's own attributes are read when the tag lands on it; a pinned
            // digest watch reads them at every check.
            let manifest = match client.acr_manifest(repo, &listed.digest).await? {
                Metadata::Found(m) => Some(m.attributes()),
                _ => None,
            };
            e.attributes = Some(RegistryAttributes {
                tag: None,
                manifest,
            });
            e
        }
    };
    let mut manifest = e.attributes.take().and_then(|a| a.manifest);
    // Under an unchanged tag, the manifest's own locks and quarantine are read again now
    // and then rather than at every check, which would double what a check costs.
    if known.is_some_and(|k| k.digest == listed.digest)
        && client.manifest_attributes_due(repo, &listed.digest)
        && let Metadata::Found(m) = client.acr_manifest(repo, &listed.digest).await?
    {
        manifest = Some(m.attributes());
    }
    e.attributes = Some(RegistryAttributes {
        tag: Some(listed.attributes()),
        manifest,
    });
    Ok(Some(Observation::Present(e)))
}

/// The metadata API lists it, `/v2` says it is not there: a quarantined or read-locked
/// manifest looks like this. Neither answer may move the watch's state.
fn unpullable(
    client: &RegistryClient,
    target: &Reference,
    digest: &crate::model::Digest,
    code: &str,
) -> RegistryError {
    RegistryError::Inconsistent {
        registry: client.registry().to_string(),
        what: format!("{}@{digest}", target.repository()),
        reason: format!(
            "/acr/v1 lists it but /v2 answers 404 {code} (quarantined, or readEnabled=false?)"
        ),
    }
}

fn with_obtained_by(known: &ManifestEvidence, by: ObtainedBy) -> ManifestEvidence {
    let mut e = known.clone();
    e.obtained_by = by;
    e
}

/// The referrers of `subject` in `target`'s repository, from every source there is: the
/// referrers API, or the referrers tag schema where the registry lacks the API, plus cosign's
/// `sha256-<hex>.sig|.att|.sbom` tags. Sorted by digest, each once. Also returns the
/// validator (ETag) the next lookup can offer.
///
/// `known` is the stored evidence of the same subject, if any: its validator makes the API
/// request (or the tag schema's index) conditional, and its cosign tags are looked at
/// directly while the repository's tags were listed for this subject within the last hour.
/// So an unchanged set costs one request (plus one per cosign tag) in a long-running
/// process; a fresh process also asks whether the API exists and lists the tags once.
pub async fn referrers(
    registries: &Registries,
    target: &Reference,
    subject: &crate::model::Digest,
    known: Option<&ManifestEvidence>,
) -> Result<(Vec<crate::model::Referrer>, Option<String>), RegistryError> {
    use crate::registry::Conditional;
    use crate::registry::referrers::{
        ApiAnswer, COSIGN_ATTESTATION, COSIGN_SBOM, COSIGN_SIGNATURE, parse_index, schema_tag,
    };
    let client = registries.client(target.registry())?;
    let repo = target.repository();
    let known = known.filter(|k| k.digest == *subject);
    let etag = known.and_then(|k| k.referrers_etag.as_deref());
    let known_from = |source: &str| -> Vec<crate::model::Referrer> {
        known
            .map(|k| {
                k.referrers
                    .iter()
                    .filter(|r| r.source.as_deref() == Some(source))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };

    let mut found = Vec::new();
    let mut validator = None;
    let mut api = false;
    if !client.referrers_api_absent(repo) {
        match client
            .referrers_api_if_changed(repo, subject, None, etag)
            .await?
        {
            (ApiAnswer::Supported(list), tag) => (found, validator, api) = (list, tag, true),
            (ApiAnswer::NotModified, tag) => {
                (found, validator, api) = (known_from("api"), tag, true)
            }
            (ApiAnswer::NoRepository, _) => return Ok((Vec::new(), None)),
            (ApiAnswer::Unsupported, _) => client.note_referrers_api_absent(repo),
        }
    }
    let schema = schema_tag(subject);
    if !api {
        // A tag-schema tag that is missing or not an index means no referrers.
        match client
            .get_manifest_if_changed(repo, &schema, None, etag)
            .await?
        {
            Conditional::NotModified => {
                found.extend(known_from("tag-schema"));
                validator = etag.map(str::to_string);
            }
            Conditional::Changed(ManifestLookup::Found(f), tag)
                if crate::registry::manifest::is_index_type(&f.media_type) =>
            {
                let list = parse_index(&f.body, "tag-schema").map_err(|reason| {
                    RegistryError::Malformed {
                        registry: target.registry().to_string(),
                        what: format!("{repo}:{schema}"),
                        reason,
                    }
                })?;
                found.extend(list);
                validator = tag;
            }
            Conditional::Changed(..) => {}
        }
    }

    // Cosign tags: listed now and then; in between, the ones already known are looked at.
    let cosign_known = known_from("cosign-tag");
    let tags: Vec<String> = if known.is_some() && client.cosign_listed_recently(repo, subject) {
        cosign_known
            .iter()
            .filter_map(|r| r.annotations.get(COSIGN_TAG_ANNOTATION).cloned())
            .collect()
    } else {
        let listed = client.tags(repo).await?.unwrap_or_default();
        client.note_cosign_listed(repo, subject);
        listed
    };
    for (suffix, artifact_type) in [
        (".sig", COSIGN_SIGNATURE),
        (".att", COSIGN_ATTESTATION),
        (".sbom", COSIGN_SBOM),
    ] {
        let tag = format!("{schema}{suffix}");
        if !tags.contains(&tag) {
            continue;
        }
        if let ManifestLookup::Found(h) = client.head_manifest(repo, &tag).await? {
            let Some(digest) = h.digest else { continue };
            let mut annotations = std::collections::BTreeMap::new();
            annotations.insert(COSIGN_TAG_ANNOTATION.to_string(), tag);
            found.push(crate::model::Referrer {
                digest,
                artifact_type: Some(artifact_type.to_string()),
                media_type: h.media_type,
                annotations,
                source: Some("cosign-tag".to_string()),
            });
        }
    }
    found.sort_by(|a, b| a.digest.cmp(&b.digest));
    found.dedup_by(|a, b| a.digest == b.digest);
    Ok((found, validator))
}

/// The annotation naming the cosign tag a referrer was found under.
const COSIGN_TAG_ANNOTATION: &str = "dev.driftwatch.cosign.tag";

/// Fetches the full evidence for a reference (by digest when it has one), for `inspect`.
pub async fn fetch_evidence(
    registries: &Registries,
    target: &Reference,
) -> Result<Observation, RegistryError> {
    let client = registries.client(target.registry())?;
    let (reference, expect) = match (target.digest(), target.tag()) {
        (Some(d), _) => (d.to_string(), Some(d)),
        (None, Some(t)) => (t.to_string(), None),
        (None, None) => unreachable!("a parsed reference has a tag or a digest"),
    };
    let repo = target.repository();
    let mut observation = match client.get_manifest(repo, &reference, expect).await? {
        ManifestLookup::Found(f) => evidence(target, f)?,
        ManifestLookup::NotFound { code } => Observation::absent(code),
    };
    match &mut observation {
        Observation::Present(e) if client.metadata_usable(repo) => {
            let tag = match target.tag().filter(|_| target.digest().is_none()) {
                Some(t) => match client.acr_tag(repo, t).await? {
                    Metadata::Found(t) => Some(t.attributes()),
                    Metadata::NotFound => None,
                    Metadata::Unavailable(r) => {
                        client.metadata_refused(repo, &r);
                        return Ok(observation);
                    }
                },
                None => None,
            };
            let manifest = match client.acr_manifest(repo, &e.digest).await? {
                Metadata::Found(m) => Some(m.attributes()),
                Metadata::NotFound => None,
                Metadata::Unavailable(r) => {
                    client.metadata_refused(repo, &r);
                    return Ok(observation);
                }
            };
            e.attributes = Some(RegistryAttributes { tag, manifest });
        }
        Observation::Absent { soft_delete, .. } if client.is_acr() => {
            let tag = target.tag().filter(|_| target.digest().is_none());
            *soft_delete = Some(client.soft_delete(repo, target.digest(), tag).await?);
        }
        _ => {}
    }
    Ok(observation)
}

fn evidence(target: &Reference, f: Fetched) -> Result<Observation, RegistryError> {
    let what = target.to_string();
    parse_evidence(&f.body, &f.media_type, f.digest)
        .map(Observation::Present)
        .map_err(|reason| RegistryError::Malformed {
            registry: target.registry().to_string(),
            what,
            reason,
        })
}
