//! Manifest media types and a tolerant reader of manifest and index JSON that turns a verified
//! body into evidence. Unknown fields are ignored; what we rely on is checked.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::model::{Descriptor, Digest, ManifestEvidence, ObtainedBy, Platform};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The Accept header for manifest requests. Every type is listed explicitly: a registry given
/// a narrower list may answer 404 for an index that exists, or substitute one platform's
/// manifest, which would look like deletion or drift.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Whether a media type is an index or manifest list.
pub fn is_index_type(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// Whether a media type is one we asked for.
pub fn is_known_type(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST
    )
}

/// The media type without parameters (`; charset=…`), which clients must ignore.
pub fn bare_media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    subject: Option<RawDescriptor>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: String,
    digest: Digest,
    size: i64,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl RawDescriptor {
    fn into_descriptor(self) -> Result<Descriptor, String> {
        let size = u64::try_from(self.size)
            .map_err(|_| format!("descriptor {} has a negative size", self.digest))?;
        Ok(Descriptor {
            media_type: self.media_type,
            digest: self.digest,
            size,
            artifact_type: self.artifact_type,
            annotations: self.annotations.unwrap_or_default(),
        })
    }
}

/// Docker's buildx marks attestation manifests in an index with this annotation.
const DOCKER_REFERENCE_TYPE: &str = "vnd.docker.reference.type";

/// Reads a verified manifest body into evidence.
///
/// `media_type` is the response's Content-Type; a body whose own `mediaType` disagrees is
/// rejected, as the distribution spec asks of clients.
pub fn parse_evidence(
    body: &[u8],
    media_type: &str,
    digest: Digest,
) -> Result<ManifestEvidence, String> {
    let raw: RawManifest =
        serde_json::from_slice(body).map_err(|e| format!("not a manifest: {e}"))?;
    if let Some(own) = &raw.media_type
        && !media_type.is_empty()
        && own != media_type
    {
        return Err(format!(
            "body says mediaType {own:?} but was served as {media_type:?}"
        ));
    }
    let media_type = if media_type.is_empty() {
        raw.media_type.clone().unwrap_or_default()
    } else {
        media_type.to_string()
    };

    let mut platforms = Vec::new();
    let mut attestations = Vec::new();
    if is_index_type(&media_type) {
        let children = raw.manifests.ok_or("an index without a manifests list")?;
        for child in children {
            let p = child.platform.as_ref();
            let entry = Platform {
                os: p.map_or_else(|| "unknown".to_string(), |p| p.os.clone()),
                architecture: p.map_or_else(|| "unknown".to_string(), |p| p.architecture.clone()),
                variant: p.and_then(|p| p.variant.clone()).filter(|v| !v.is_empty()),
                digest: child.digest.clone(),
            };
            let attestation = entry.os == "unknown"
                || entry.architecture == "unknown"
                || child
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(DOCKER_REFERENCE_TYPE));
            if attestation {
                attestations.push(entry);
            } else {
                platforms.push(entry);
            }
        }
    } else if raw.manifests.is_some() && raw.layers.is_none() {
        return Err("a manifests list in a body not served as an index".to_string());
    }

    let config = raw.config.map(RawDescriptor::into_descriptor).transpose()?;
    let layers = raw
        .layers
        .unwrap_or_default()
        .into_iter()
        .map(RawDescriptor::into_descriptor)
        .collect::<Result<Vec<_>, _>>()?;
    let subject = raw
        .subject
        .map(RawDescriptor::into_descriptor)
        .transpose()?;
    Ok(ManifestEvidence {
        digest,
        media_type,
        size: body.len() as u64,
        platforms,
        attestations,
        config,
        layers,
        annotations: raw.annotations.unwrap_or_default(),
        artifact_type: raw.artifact_type,
        subject,
        referrers: Vec::new(),
        referrers_etag: None,
        attributes: None,
        obtained_by: ObtainedBy::Get,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn attestation_entries_are_kept_apart_from_platforms() {
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": d('a'), "size": 10,
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": OCI_MANIFEST, "digest": d('b'), "size": 10,
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "digest": d('c'), "size": 10,
                 "platform": {"os": "unknown", "architecture": "unknown"},
                 "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}
            ]
        })
        .to_string();
        let e = parse_evidence(
            body.as_bytes(),
            OCI_INDEX,
            Digest::sha256_of(body.as_bytes()),
        )
        .unwrap();
        let keys: Vec<_> = e.platforms.iter().map(Platform::key).collect();
        assert_eq!(keys, ["linux/amd64", "linux/arm64/v8"]);
        assert_eq!(e.attestations.len(), 1);
        assert!(e.is_index());
    }

    #[test]
    fn an_image_manifest_yields_config_and_layers() {
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": d('a'), "size": 3},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": d('b'), "size": 7}],
            "annotations": {"org.opencontainers.image.source": "https://example.com/x"}
        })
        .to_string();
        let e = parse_evidence(
            body.as_bytes(),
            OCI_MANIFEST,
            Digest::sha256_of(body.as_bytes()),
        )
        .unwrap();
        assert_eq!(e.config.as_ref().unwrap().size, 3);
        assert_eq!(e.layers.len(), 1);
        assert_eq!(e.annotations.len(), 1);
        assert!(!e.is_index());
    }

    #[test]
    fn hostile_bodies_are_rejected_with_a_reason() {
        let dig = Digest::sha256_of(b"x");
        assert!(
            parse_evidence(
                b"{\"schemaVersion\": 2, \"layers\": [",
                OCI_MANIFEST,
                dig.clone()
            )
            .is_err()
        );
        let mismatch = format!("{{\"mediaType\": \"{OCI_INDEX}\", \"manifests\": []}}");
        let err = parse_evidence(mismatch.as_bytes(), OCI_MANIFEST, dig.clone()).unwrap_err();
        assert!(err.contains("mediaType"), "{err}");
        let bad_digest = r#"{"layers": [{"mediaType": "x", "digest": "sha256:zz", "size": 1}]}"#;
        assert!(parse_evidence(bad_digest.as_bytes(), OCI_MANIFEST, dig.clone()).is_err());
        let negative = format!(
            r#"{{"layers": [{{"mediaType": "x", "digest": "{}", "size": -1}}]}}"#,
            d('a')
        );
        assert!(parse_evidence(negative.as_bytes(), OCI_MANIFEST, dig).is_err());
    }
}
