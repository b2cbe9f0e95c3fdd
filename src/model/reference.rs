//! Image references, `HOST[:PORT]/REPO[:TAG][@DIGEST]`, with Docker Hub's normalisation rules
//! and the OCI name and tag grammars.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::digest::{Digest, DigestError};

/// The registry name Docker Hub references normalise to.
pub const DOCKER_HUB: &str = "docker.io";

/// The longest reference (host, name, tag) accepted, as common clients cap it.
const MAX_NAME_LEN: usize = 255;

/// A parsed, normalised image reference.
///
/// At least one of `tag` and `digest` is set: a reference that names neither gets the tag
/// `latest`, as every container tool does.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Nothing to parse.
    #[error("empty image reference")]
    Empty,
    /// The registry host part is malformed.
    #[error("invalid registry host {0:?} (expected e.g. registry.example.com:5000)")]
    Host(String),
    /// The repository path breaks the OCI name grammar.
    #[error(
        "invalid repository name {0:?}: lowercase letters, digits and . _ __ - separators, \
         components joined by /"
    )]
    Repository(String),
    /// The tag breaks the OCI tag grammar.
    #[error("invalid tag {0:?}: up to 128 of [A-Za-z0-9_.-], not starting with . or -")]
    Tag(String),
    /// The digest part is malformed.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// The whole reference is too long.
    #[error("image reference is longer than {MAX_NAME_LEN} characters")]
    TooLong,
}

impl Reference {
    /// Parses a reference, normalising Docker Hub names (`nginx` becomes
    /// `docker.io/library/nginx:latest`).
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }

        let (rest, digest) = match input.rsplit_once('@') {
            Some((rest, d)) => (rest, Some(Digest::parse(d)?)),
            None => (input, None),
        };

        // A colon after the last slash separates the tag; an earlier one is a host's port.
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if last_slash.is_none_or(|s| colon > s) => {
                (&rest[..colon], Some(rest[colon + 1..].to_string()))
            }
            _ => (rest, None),
        };

        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if looks_like_host(first) => (first.to_string(), path.to_string()),
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };

        if !valid_host(&registry) {
            return Err(ReferenceError::Host(registry));
        }
        if !valid_repository(&repository) {
            return Err(ReferenceError::Repository(repository));
        }
        if let Some(t) = &tag
            && !valid_tag(t)
        {
            return Err(ReferenceError::Tag(t.clone()));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        let r = Reference {
            registry,
            repository,
            tag,
            digest,
        };
        if r.registry.len() + 1 + r.repository.len() > MAX_NAME_LEN {
            return Err(ReferenceError::TooLong);
        }
        Ok(r)
    }

    /// Builds a reference from parts that the caller has already validated.
    pub fn from_parts(
        registry: &str,
        repository: &str,
        tag: Option<&str>,
        digest: Option<Digest>,
    ) -> Result<Self, ReferenceError> {
        let mut s = format!("{registry}/{repository}");
        if let Some(t) = tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &digest {
            s.push('@');
            s.push_str(d.as_str());
        }
        Reference::parse(&s)
    }

    /// The registry as written, `HOST[:PORT]` (`docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry, e.g. `team/api`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if the reference names one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The pinned digest, if the reference names one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The same repository with only the tag (no digest).
    pub fn tag_only(&self) -> Option<Reference> {
        let tag = self.tag.clone()?;
        Some(Reference {
            digest: None,
            tag: Some(tag),
            ..self.clone()
        })
    }

    /// The same repository with only the digest (no tag).
    pub fn digest_only(&self) -> Option<Reference> {
        let digest = self.digest.clone()?;
        Some(Reference {
            tag: None,
            digest: Some(digest),
            ..self.clone()
        })
    }

    /// `REGISTRY/REPOSITORY`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

fn looks_like_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost" || first.starts_with('[')
}

fn valid_host(host: &str) -> bool {
    // An IPv6 literal is bracketed; otherwise a DNS name or IPv4 address, then an optional port.
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return false;
        }
        match after {
            "" => ("v6", None),
            p => match p.strip_prefix(':') {
                Some(p) => ("v6", Some(p)),
                None => return false,
            },
        }
    } else {
        match host.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    let name_ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    name_ok && port_ok
}

/// The OCI name grammar: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` components joined by `/`.
fn valid_repository(repo: &str) -> bool {
    !repo.is_empty() && repo.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: one '.', one or two '_', or any number of '-'.
        let start = i;
        let sep = b[i];
        while i < b.len() && b[i] == sep {
            i += 1;
        }
        let run = i - start;
        let ok = match sep {
            b'.' => run == 1,
            b'_' => run <= 2,
            b'-' => true,
            _ => false,
        };
        // Separators stand between alphanumeric runs, never next to each other.
        if !ok || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// The OCI tag grammar: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

impl Serialize for Reference {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Reference {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Reference::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn canon(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn docker_hub_names_are_normalised() {
        assert_eq!(canon("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(canon("nginx:1.27"), "docker.io/library/nginx:1.27");
        assert_eq!(canon("bitnami/redis"), "docker.io/bitnami/redis:latest");
        assert_eq!(
            canon("index.docker.io/library/nginx"),
            "docker.io/library/nginx:latest"
        );
        assert_eq!(
            canon(&format!("nginx@{D}")),
            format!("docker.io/library/nginx@{D}")
        );
    }

    #[test]
    fn hosts_are_recognised_by_dot_colon_or_localhost() {
        let r = Reference::parse("127.0.0.1:5000/team/api:prod").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "team/api", Some("prod"))
        );
        let r = Reference::parse("localhost/api").unwrap();
        assert_eq!(r.registry(), "localhost");
        let r = Reference::parse("mcr.microsoft.com/dotnet/runtime:8.0").unwrap();
        assert_eq!(r.repository(), "dotnet/runtime");
        let r = Reference::parse("[::1]:5000/api:v1").unwrap();
        assert_eq!(r.registry(), "[::1]:5000");
    }

    #[test]
    fn tag_and_digest_together_are_kept() {
        let r = Reference::parse(&format!("reg.io/team/api:prod@{D}")).unwrap();
        assert_eq!(r.tag(), Some("prod"));
        assert_eq!(r.digest().unwrap().as_str(), D);
        assert_eq!(r.tag_only().unwrap().to_string(), "reg.io/team/api:prod");
        assert_eq!(
            r.digest_only().unwrap().to_string(),
            format!("reg.io/team/api@{D}")
        );
    }

    #[test]
    fn invalid_references_name_the_bad_part() {
        assert!(matches!(Reference::parse(""), Err(ReferenceError::Empty)));
        assert!(matches!(
            Reference::parse("reg.io/Team/api"),
            Err(ReferenceError::Repository(_))
        ));
        assert!(matches!(
            Reference::parse("reg.io/a..b"),
            Err(ReferenceError::Repository(_))
        ));
        assert!(matches!(
            Reference::parse("reg.io/a___b"),
            Err(ReferenceError::Repository(_))
        ));
        assert!(matches!(
            Reference::parse("reg.io/api:.bad"),
            Err(ReferenceError::Tag(_))
        ));
        assert!(matches!(
            Reference::parse("reg.io:99999/api"),
            Err(ReferenceError::Host(_))
        ));
        assert!(matches!(
            Reference::parse("reg.io/api@sha256:abc"),
            Err(ReferenceError::Digest(_))
        ));
        let long_tag = "t".repeat(129);
        assert!(matches!(
            Reference::parse(&format!("reg.io/api:{long_tag}")),
            Err(ReferenceError::Tag(_))
        ));
    }

    #[test]
    fn separators_follow_the_oci_grammar() {
        for ok in [
            "a",
            "a.b",
            "a_b",
            "a__b",
            "a-b",
            "a---b",
            "a/b/c",
            "a0.b1-c2__d3",
        ] {
            assert!(valid_repository(ok), "{ok} should be valid");
        }
        for bad in ["-a", "a-", "a._b", "a/", "/a", "a//b", "a.-b", "A"] {
            assert!(!valid_repository(bad), "{bad} should be invalid");
        }
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,6}((\\.|_|__|-{1,3})[a-z0-9]{1,6}){0,2}"
    }

    fn canonical_reference() -> impl Strategy<Value = String> {
        let host = prop_oneof![
            Just("docker.io".to_string()),
            "[a-z][a-z0-9]{0,8}\\.[a-z]{2,5}",
            "[a-z][a-z0-9]{0,8}\\.[a-z]{2,5}:[1-9][0-9]{0,3}",
            "127\\.0\\.0\\.1:[1-9][0-9]{3}",
        ];
        let repo = prop::collection::vec(component(), 1..4).prop_map(|c| c.join("/"));
        let tag = prop::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}");
        let digest = prop::option::of("[a-f0-9]{64}".prop_map(|h| format!("sha256:{h}")));
        (host, repo, tag, digest).prop_map(|(host, repo, tag, digest)| {
            // Docker Hub's canonical form keeps official images under library/.
            let repo = if host == "docker.io" && !repo.contains('/') {
                format!("library/{repo}")
            } else {
                repo
            };
            let tag = if tag.is_none() && digest.is_none() {
                Some("latest".into())
            } else {
                tag
            };
            let mut s = format!("{host}/{repo}");
            if let Some(t) = tag {
                s = format!("{s}:{t}");
            }
            if let Some(d) = digest {
                s = format!("{s}@{d}");
            }
            s
        })
    }

    proptest! {
        #[test]
        fn display_after_parse_is_identity_on_canonical_references(s in canonical_reference()) {
            let r = Reference::parse(&s).unwrap();
            prop_assert_eq!(r.to_string(), s.clone());
            prop_assert_eq!(Reference::parse(&r.to_string()).unwrap(), r);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = Reference::parse(&s);
        }
    }
}
