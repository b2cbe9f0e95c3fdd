//! OCI vocabulary shared by the push helpers and the fake registry: media types, descriptors,
//! digests and builders for small but valid image manifests and indexes.

use serde::Serialize;
use sha2::{Digest, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The Accept value a well-behaved client sends when it wants any modern manifest kind.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// `sha256:<hex>` of `bytes`, the only digest algorithm the tests use.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let out = Sha256::digest(bytes);
    let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A content descriptor as it appears inside manifests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    pub fn of(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: sha256_digest(bytes),
            size: bytes.len() as u64,
        }
    }
}

/// A platform triple; `variant` is only present for architectures such as arm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// Parses `os/arch` or `os/arch/variant`, panicking on anything else because a malformed
    /// platform in a test is a bug in the test.
    pub fn parse(spec: &str) -> Platform {
        let parts: Vec<&str> = spec.split('/').collect();
        match parts.as_slice() {
            [os, arch] => Platform::new(os, arch, None),
            [os, arch, variant] => Platform::new(os, arch, Some(variant)),
            _ => panic!("platform {spec:?} is not os/arch or os/arch/variant"),
        }
    }
}

/// A manifest (image or index) exactly as it was stored, so tests can compare digests and
/// re-push the identical bytes under other tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedManifest {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub bytes: Vec<u8>,
}

impl PushedManifest {
    pub fn from_bytes(media_type: &str, bytes: Vec<u8>) -> PushedManifest {
        PushedManifest {
            digest: sha256_digest(&bytes),
            media_type: media_type.to_owned(),
            size: bytes.len() as u64,
            bytes,
        }
    }

    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
        }
    }
}

/// An OCI image config whose content embeds `seed`, so every seed yields a distinct digest.
pub fn image_config(seed: &str, platform: &Platform) -> Vec<u8> {
    let mut config = serde_json::json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": { "Labels": { "driftwatch.test.seed": seed } },
        "rootfs": { "type": "layers", "diff_ids": [] },
    });
    if let Some(variant) = &platform.variant {
        config["variant"] = serde_json::Value::from(variant.as_str());
    }
    serde_json::to_vec(&config).expect("config serialises")
}

/// Layer bytes; registries never unpack layers, so they need not be a real gzip stream.
pub fn layer_bytes(seed: &str) -> Vec<u8> {
    format!("driftwatch test layer for seed {seed}\n").into_bytes()
}

/// Serialises an OCI image manifest over the given config and layers.
pub fn image_manifest(config: &Descriptor, layers: &[Descriptor]) -> Vec<u8> {
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config,
        "layers": layers,
    });
    serde_json::to_vec(&manifest).expect("manifest serialises")
}

/// Serialises an OCI image index whose entries carry platform objects.
pub fn image_index(children: &[(Descriptor, Platform)]) -> Vec<u8> {
    let manifests: Vec<serde_json::Value> = children
        .iter()
        .map(|(descriptor, platform)| {
            let mut entry = serde_json::to_value(descriptor).expect("descriptor serialises");
            entry["platform"] = serde_json::to_value(platform).expect("platform serialises");
            entry
        })
        .collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    });
    serde_json::to_vec(&index).expect("index serialises")
}

/// A self-contained image manifest body for tests that serve manifests from the fake
/// registry without pushing any blobs anywhere.
pub fn sample_manifest(seed: &str) -> Vec<u8> {
    let platform = Platform::new("linux", "amd64", None);
    let config = Descriptor::of(OCI_CONFIG, &image_config(seed, &platform));
    let layer = Descriptor::of(OCI_LAYER_GZIP, &layer_bytes(seed));
    image_manifest(&config, &[layer])
}
