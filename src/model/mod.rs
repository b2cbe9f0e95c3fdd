//! Pure domain types: references, digests, and the evidence a resolution records. No I/O.

pub mod digest;
pub mod reference;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use digest::{Digest, DigestError};
pub use reference::{Reference, ReferenceError};

/// One platform entry of an image index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture, e.g. `arm64`.
    pub architecture: String,
    /// CPU variant, e.g. `v8`, when the index gives one.
    #[serde(default)]
    pub variant: Option<String>,
    /// The child manifest's digest.
    pub digest: Digest,
}

impl Platform {
    /// `os/architecture[/variant]`, the usual way to name a platform.
    pub fn key(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{}", self.os, self.architecture, v),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// A content descriptor (config blob, layer, subject).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Artifact type, where the descriptor carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Annotations on the descriptor.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An artifact that refers to a manifest through its `subject` (signature, SBOM, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Referrer {
    /// The referrer manifest's digest.
    pub digest: Digest,
    /// Its artifact type, falling back to its config media type.
    pub artifact_type: Option<String>,
    /// Its manifest media type.
    pub media_type: String,
    /// Its annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Where it was found: `api` (the referrers API), `tag-schema` (the referrers tag
    /// schema's index), or `cosign-tag` (a `sha256-<hex>.sig|.att|.sbom` tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Artifact types each `require_referrers` alias stands for.
pub const REFERRER_ALIASES: &[(&str, &[&str])] = &[
    (
        "signature",
        &[
            "application/vnd.cncf.notary.signature",
            "application/vnd.dev.cosign.artifact.sig.v1+json",
        ],
    ),
    (
        "sbom",
        &[
            "application/spdx+json",
            "text/spdx",
            "application/vnd.cyclonedx+json",
            "application/vnd.dev.cosign.artifact.sbom.v1+json",
        ],
    ),
    (
        "provenance",
        &[
            "application/vnd.in-toto+json",
            "application/vnd.dev.sigstore.bundle.v0.3+json",
            "application/vnd.dev.cosign.artifact.att.v1+json",
        ],
    ),
];

impl Referrer {
    /// Whether this referrer satisfies `required`: an alias (`signature`, `sbom`,
    /// `provenance`) or an exact artifact type.
    pub fn satisfies(&self, required: &str) -> bool {
        let Some(t) = self.artifact_type.as_deref() else {
            return false;
        };
        match REFERRER_ALIASES
            .iter()
            .find(|(alias, _)| *alias == required)
        {
            Some((_, types)) => types.contains(&t),
            None => t == required,
        }
    }
}

/// How the digest of an observation was confirmed during the check that recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObtainedBy {
    /// A HEAD request confirmed the digest; the body details (platforms, layers) were carried
    /// over from the stored GET of the same digest, which is content-addressed and so the same.
    Head,
    /// The manifest body was fetched, hashed and verified in this check.
    Get,
    /// ACR's metadata API (`/acr/v1/<repo>/_tags/<tag>` or `_manifests/<digest>`) named the
    /// digest. The body of a digest not seen before was fetched by digest and verified; for a
    /// known one the details were carried over as for a HEAD.
    Metadata,
    /// One paged ACR tag listing (`/acr/v1/<repo>/_tags`) named the digest, for several
    /// watched tags at once; bodies as for [`ObtainedBy::Metadata`].
    Listing,
}

/// Registry-side attributes of a tag or a manifest, from ACR's `/acr/v1` metadata API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemAttributes {
    /// `createdTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// `lastUpdateTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<String>,
    /// `changeableAttributes.deleteEnabled`: false is a delete lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_enabled: Option<bool>,
    /// `changeableAttributes.writeEnabled`: false is a write (and delete) lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_enabled: Option<bool>,
    /// `changeableAttributes.readEnabled`: false blocks pulls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_enabled: Option<bool>,
    /// `changeableAttributes.listEnabled`: false hides the item from listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_enabled: Option<bool>,
    /// `quarantineState` (`Passed`, `Failed`, …), for a manifest under a quarantine policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine_state: Option<String>,
    /// The tags of a manifest (absent once it is untagged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

/// The registry-side attributes recorded with a resolution (ACR only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryAttributes {
    /// The watched tag's own attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<ItemAttributes>,
    /// The manifest's attributes. For a tag watch they are read when the tag moves to a
    /// digest; a pinned digest's are read at every check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ItemAttributes>,
}

/// What ACR's soft-delete listings said about something the registry no longer serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SoftDelete {
    /// Listed as soft-deleted: restorable until the purge.
    SoftDeleted {
        /// `deletedAt` as the registry reported it.
        deleted_at: DateTime<Utc>,
        /// `deletedAt` plus the configured retention: when ACR's daily purge may take it.
        purge_at: DateTime<Utc>,
        /// The retention the purge time assumes (ACR does not report it).
        retention_days: u32,
        /// The digest the deleted tag pointed at, for a tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<Digest>,
        /// The command that restores it.
        restore_command: String,
        /// Whether the reminder before the purge was raised.
        #[serde(default)]
        reminded: bool,
    },
    /// Not listed: deleted for good (hard delete, purged, or soft delete off).
    NotListed,
    /// The listings could not be read (no `deleted_read`, or a registry without them, such
    /// as a geo-replicated one).
    Unknown {
        /// Why.
        reason: String,
    },
}

/// The evidence for one manifest: everything needed to prove which artifact a reference meant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEvidence {
    /// The manifest digest, verified against the body when it was fetched.
    pub digest: Digest,
    /// The manifest media type.
    pub media_type: String,
    /// Size of the manifest body in bytes.
    pub size: u64,
    /// Platform entries, for an index.
    #[serde(default)]
    pub platforms: Vec<Platform>,
    /// Index entries that are attestations or other non-platform children.
    #[serde(default)]
    pub attestations: Vec<Platform>,
    /// The config descriptor, for an image manifest.
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// Layer descriptors, for an image manifest.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Manifest annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The manifest's `artifactType`, when it has one.
    #[serde(default)]
    pub artifact_type: Option<String>,
    /// The manifest's `subject`, when it refers to another manifest.
    #[serde(default)]
    pub subject: Option<Descriptor>,
    /// Referrers of this digest, when the watch tracks them.
    #[serde(default)]
    pub referrers: Vec<Referrer>,
    /// The validator (`ETag`) of the referrer list, offered with the next lookup so that an
    /// unchanged list costs a 304.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrers_etag: Option<String>,
    /// Registry-side attributes (ACR), when the registry has them and lets us read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<RegistryAttributes>,
    /// How this check confirmed the digest.
    pub obtained_by: ObtainedBy,
}

impl ManifestEvidence {
    /// Whether the manifest is an image index (or Docker manifest list).
    pub fn is_index(&self) -> bool {
        crate::registry::manifest::is_index_type(&self.media_type)
    }
}

/// What one lookup (a tag or a digest) found.
// Observations are nearly always the large variant; boxing it would add an allocation
// per lookup and buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Observation {
    /// The registry served the manifest.
    Present(ManifestEvidence),
    /// The registry answered with an authoritative not-found.
    Absent {
        /// The registry's error code, e.g. `MANIFEST_UNKNOWN`.
        code: String,
        /// The digest last seen here before it went missing, if it was ever seen.
        #[serde(default)]
        last_digest: Option<Digest>,
        /// What ACR's soft-delete listings say; `None` on other registries.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        soft_delete: Option<SoftDelete>,
    },
}

impl Observation {
    /// An authoritative not-found with `code`, before the differ and the soft-delete lookup
    /// have filled in the rest.
    pub fn absent(code: String) -> Observation {
        Observation::Absent {
            code,
            last_digest: None,
            soft_delete: None,
        }
    }

    /// The digest, when present.
    pub fn digest(&self) -> Option<&Digest> {
        match self {
            Observation::Present(e) => Some(&e.digest),
            Observation::Absent { .. } => None,
        }
    }

    /// The evidence, when present.
    pub fn evidence(&self) -> Option<&ManifestEvidence> {
        match self {
            Observation::Present(e) => Some(e),
            Observation::Absent { .. } => None,
        }
    }
}

/// One successful check of a watch: the tag lookup, the pinned-digest lookup, or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// When the check ran.
    pub time: DateTime<Utc>,
    /// The tag lookup, for a watch that names a tag.
    #[serde(default)]
    pub tag: Option<Observation>,
    /// The pinned-digest lookup, for a watch that names a digest.
    #[serde(default)]
    pub pinned: Option<Observation>,
}

impl Resolution {
    /// The digest this resolution stands for: the tag's when there is one, else the pin's.
    pub fn digest(&self) -> Option<&Digest> {
        self.tag
            .as_ref()
            .or(self.pinned.as_ref())
            .and_then(Observation::digest)
    }
}
