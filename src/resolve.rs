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
pub async fn observe(
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
