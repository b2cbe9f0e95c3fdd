//! Watch targets to observations: one tag or digest looked up HEAD-first, with the body
//! fetched only when the digest is one we hold no evidence for.

use crate::model::{ManifestEvidence, Observation, ObtainedBy, Reference};
use crate::registry::manifest::parse_evidence;
use crate::registry::{Fetched, ManifestLookup, Registries, RegistryError};

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
) -> Result<Observation, RegistryError> {
    let mut observation = observe_manifest(registries, target, known).await?;
    if let (Observation::Present(e), true) = (&mut observation, referrers) {
        e.referrers = self::referrers(registries, target, &e.digest).await?;
    }
    Ok(observation)
}

async fn observe_manifest(
    registries: &Registries,
    target: &Reference,
    known: Option<&ManifestEvidence>,
) -> Result<Observation, RegistryError> {
    let client = registries.client(target.registry())?;
    let repo = target.repository();
    let pinned = target.digest();
    let reference = match (pinned, target.tag()) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.to_string(),
        (None, None) => unreachable!("a parsed reference has a tag or a digest"),
    };

    let head = match client.head_manifest(repo, &reference).await? {
        ManifestLookup::NotFound { code } => {
            return Ok(Observation::Absent {
                code,
                last_digest: None,
            });
        }
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
                ManifestLookup::NotFound { code } => Ok(Observation::Absent {
                    code,
                    last_digest: None,
                }),
            };
        }
    };

    if let Some(k) = known.filter(|k| k.digest == digest) {
        let mut e = k.clone();
        e.obtained_by = ObtainedBy::Head;
        return Ok(Observation::Present(e));
    }
    // Fetch by digest, not by tag: the tag may move again between the two requests.
    match client
        .get_manifest(repo, digest.as_str(), Some(&digest))
        .await?
    {
        ManifestLookup::Found(f) => evidence(target, f),
        ManifestLookup::NotFound { code } => Ok(Observation::Absent {
            code,
            last_digest: None,
        }),
    }
}

/// The referrers of `subject` in `target`'s repository, from every source there is: the
/// referrers API, or the referrers tag schema where the registry lacks the API, plus cosign's
/// `sha256-<hex>.sig|.att|.sbom` tags. Sorted by digest, each once.
///
/// Cost per call: one request to the API (or, without it, the tag schema's index when its
/// tag exists), one tag listing (more pages for repositories with over 1,000 tags), and one
/// HEAD per cosign tag present.
pub async fn referrers(
    registries: &Registries,
    target: &Reference,
    subject: &crate::model::Digest,
) -> Result<Vec<crate::model::Referrer>, RegistryError> {
    use crate::registry::referrers::{
        ApiAnswer, COSIGN_ATTESTATION, COSIGN_SBOM, COSIGN_SIGNATURE, parse_index, schema_tag,
    };
    let client = registries.client(target.registry())?;
    let repo = target.repository();
    let (mut found, api) = match client.referrers_api(repo, subject, None).await? {
        ApiAnswer::Supported(list) => (list, true),
        ApiAnswer::NoRepository => return Ok(Vec::new()),
        ApiAnswer::Unsupported => (Vec::new(), false),
    };

    let tags = client.tags(repo).await?.unwrap_or_default();
    let schema = schema_tag(subject);
    if !api && tags.contains(&schema) {
        // A tag-schema tag that is missing or not an index means no referrers.
        if let ManifestLookup::Found(f) = client.get_manifest(repo, &schema, None).await?
            && crate::registry::manifest::is_index_type(&f.media_type)
        {
            {
                let list = parse_index(&f.body, "tag-schema").map_err(|reason| {
                    RegistryError::Malformed {
                        registry: target.registry().to_string(),
                        what: format!("{repo}:{schema}"),
                        reason,
                    }
                })?;
                found.extend(list);
            }
        }
    }
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
            annotations.insert("dev.driftwatch.cosign.tag".to_string(), tag);
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
    Ok(found)
}

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
    match client
        .get_manifest(target.repository(), &reference, expect)
        .await?
    {
        ManifestLookup::Found(f) => evidence(target, f),
        ManifestLookup::NotFound { code } => Ok(Observation::Absent {
            code,
            last_digest: None,
        }),
    }
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
