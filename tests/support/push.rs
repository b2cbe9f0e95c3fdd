//! Push helpers that drive a registry through the real distribution API (blob uploads,
//! manifest PUT/DELETE/HEAD), used to set up and mutate state before driftwatch looks at it.

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, LOCATION};
use url::Url;

use super::oci::{self, Descriptor, MANIFEST_ACCEPT, Platform, PushedManifest};

const DIGEST_HEADER: &str = "docker-content-digest";

/// A client bound to one registry base URL (`http://127.0.0.1:PORT`).
#[derive(Clone, Debug)]
pub struct Pusher {
    pub base: String,
    pub http: reqwest::Client,
}

impl Pusher {
    /// Panics unless `base` points at 127.0.0.1: test traffic must stay on this machine.
    pub fn new(base: &str) -> Pusher {
        let base = base.trim_end_matches('/').to_owned();
        assert_loopback(&parse_url(&base));
        // No proxy: an inherited HTTP_PROXY must never reroute loopback test traffic. No
        // request timeout either: under tokio's paused test clock a timer would fire while
        // real I/O is still in flight and fail healthy requests.
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("build reqwest client");
        Pusher { base, http }
    }

    fn url(&self, path: &str) -> Url {
        parse_url(&format!("{}{path}", self.base))
    }

    /// Uploads a blob and describes it as `application/octet-stream`.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> Descriptor {
        self.push_typed_blob(repo, "application/octet-stream", bytes)
            .await
    }

    /// Uploads a blob with a monolithic upload: POST to open a session, then PUT with the
    /// digest to the Location the registry handed back.
    pub async fn push_typed_blob(&self, repo: &str, media_type: &str, bytes: &[u8]) -> Descriptor {
        let descriptor = Descriptor::of(media_type, bytes);
        let start = self.url(&format!("/v2/{repo}/blobs/uploads/"));
        let response = self
            .http
            .post(start.clone())
            .send()
            .await
            .expect("POST blob upload");
        let status = response.status();
        let headers = response.headers().clone();
        if status != StatusCode::ACCEPTED {
            let body = response.text().await.unwrap_or_default();
            panic!("POST {start} answered {status}, expected 202: {body}");
        }
        let location = header(&headers, LOCATION.as_str())
            .unwrap_or_else(|| panic!("POST {start} answered 202 without a Location header"));
        // Location may be relative or absolute and usually already carries `_state=...`, so
        // resolve it as a URL and append to its query instead of concatenating strings.
        let mut upload = start
            .join(&location)
            .unwrap_or_else(|e| panic!("bad upload Location {location:?}: {e}"));
        assert_loopback(&upload);
        upload
            .query_pairs_mut()
            .append_pair("digest", &descriptor.digest);
        let response = self
            .http
            .put(upload.clone())
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .expect("PUT blob upload");
        let status = response.status();
        if status != StatusCode::CREATED {
            let body = response.text().await.unwrap_or_default();
            panic!("PUT {upload} answered {status}, expected 201: {body}");
        }
        descriptor
    }

    /// PUTs a manifest under a tag or digest and returns the digest the registry reports,
    /// after checking it matches the bytes we sent.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let response = self
            .http
            .put(url.clone())
            .header(CONTENT_TYPE, media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .expect("PUT manifest");
        let status = response.status();
        let headers = response.headers().clone();
        if status != StatusCode::CREATED {
            let body = response.text().await.unwrap_or_default();
            panic!("PUT {url} answered {status}, expected 201: {body}");
        }
        let digest = header(&headers, DIGEST_HEADER)
            .unwrap_or_else(|| panic!("PUT {url} answered 201 without Docker-Content-Digest"));
        assert_eq!(
            digest,
            oci::sha256_digest(bytes),
            "registry digest for PUT {url}"
        );
        digest
    }

    /// Pushes a small unique linux/amd64 OCI image; `tag: None` pushes it by digest only.
    pub async fn push_image(&self, repo: &str, tag: Option<&str>, seed: &str) -> PushedManifest {
        let platform = Platform::new("linux", "amd64", None);
        self.push_image_for(repo, tag, seed, &platform).await
    }

    /// Pushes a small unique OCI image whose config names `platform`.
    pub async fn push_image_for(
        &self,
        repo: &str,
        tag: Option<&str>,
        seed: &str,
        platform: &Platform,
    ) -> PushedManifest {
        let config = oci::image_config(seed, platform);
        let config = self.push_typed_blob(repo, oci::OCI_CONFIG, &config).await;
        let layer = oci::layer_bytes(seed);
        let layer = self
            .push_typed_blob(repo, oci::OCI_LAYER_GZIP, &layer)
            .await;
        let manifest =
            PushedManifest::from_bytes(oci::OCI_MANIFEST, oci::image_manifest(&config, &[layer]));
        self.put_pushed(repo, tag, &manifest).await;
        manifest
    }

    /// Pushes an OCI index over already-pushed children, each with its platform.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: Option<&str>,
        children: &[(PushedManifest, &str, &str, Option<&str>)],
    ) -> PushedManifest {
        let entries: Vec<(Descriptor, Platform)> = children
            .iter()
            .map(|(child, os, arch, variant)| {
                (child.descriptor(), Platform::new(os, arch, *variant))
            })
            .collect();
        let index = PushedManifest::from_bytes(oci::OCI_INDEX, oci::image_index(&entries));
        self.put_pushed(repo, tag, &index).await;
        index
    }

    /// Pushes one child image per platform (`"linux/amd64"`, `"linux/arm64/v8"`, ...) and an
    /// index over them. Children are untagged, as `docker buildx` leaves them.
    pub async fn push_multiarch(
        &self,
        repo: &str,
        tag: Option<&str>,
        platforms: &[&str],
        seed: &str,
    ) -> (PushedManifest, Vec<(String, PushedManifest)>) {
        let mut children = Vec::with_capacity(platforms.len());
        let mut entries = Vec::with_capacity(platforms.len());
        for spec in platforms {
            let platform = Platform::parse(spec);
            let child_seed = format!("{seed}@{spec}");
            let child = self
                .push_image_for(repo, None, &child_seed, &platform)
                .await;
            entries.push((child.descriptor(), platform));
            children.push((spec.to_string(), child));
        }
        let index = PushedManifest::from_bytes(oci::OCI_INDEX, oci::image_index(&entries));
        self.put_pushed(repo, tag, &index).await;
        (index, children)
    }

    /// Points another tag at an existing manifest by re-PUTting its exact bytes.
    pub async fn tag_existing(&self, repo: &str, tag: &str, manifest: &PushedManifest) {
        let digest = self
            .put_manifest(repo, tag, &manifest.media_type, &manifest.bytes)
            .await;
        assert_eq!(
            digest, manifest.digest,
            "retagging must not change the digest"
        );
    }

    /// Deletes a manifest by digest (the registry also drops the tags that pointed at it).
    pub async fn delete_manifest(&self, repo: &str, digest: &str) {
        let url = self.url(&format!("/v2/{repo}/manifests/{digest}"));
        let response = self
            .http
            .delete(url.clone())
            .send()
            .await
            .expect("DELETE manifest");
        let status = response.status();
        if status != StatusCode::ACCEPTED {
            let body = response.text().await.unwrap_or_default();
            panic!("DELETE {url} answered {status}, expected 202: {body}");
        }
    }

    /// HEADs a manifest; `None` on 404, the Docker-Content-Digest on 200, panic otherwise.
    pub async fn head_digest(&self, repo: &str, reference: &str) -> Option<String> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let response = self
            .http
            .head(url.clone())
            .header(ACCEPT, MANIFEST_ACCEPT)
            .send()
            .await
            .expect("HEAD manifest");
        match response.status() {
            StatusCode::OK => Some(
                header(response.headers(), DIGEST_HEADER)
                    .unwrap_or_else(|| panic!("HEAD {url} answered 200 without a digest")),
            ),
            StatusCode::NOT_FOUND => None,
            status => panic!("HEAD {url} answered {status}, expected 200 or 404"),
        }
    }

    /// GETs a manifest with its served media type; `None` on 404, panic on other failures.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Option<PushedManifest> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let response = self
            .http
            .get(url.clone())
            .header(ACCEPT, MANIFEST_ACCEPT)
            .send()
            .await
            .expect("GET manifest");
        match response.status() {
            StatusCode::OK => {
                let media_type = header(response.headers(), CONTENT_TYPE.as_str())
                    .unwrap_or_else(|| panic!("GET {url} answered 200 without Content-Type"));
                let bytes = response.bytes().await.expect("read manifest body").to_vec();
                Some(PushedManifest::from_bytes(&media_type, bytes))
            }
            StatusCode::NOT_FOUND => None,
            status => panic!("GET {url} answered {status}, expected 200 or 404"),
        }
    }

    async fn put_pushed(&self, repo: &str, tag: Option<&str>, manifest: &PushedManifest) {
        let reference = tag.unwrap_or(&manifest.digest);
        let digest = self
            .put_manifest(repo, reference, &manifest.media_type, &manifest.bytes)
            .await;
        assert_eq!(digest, manifest.digest);
    }
}

fn parse_url(url: &str) -> Url {
    Url::parse(url).unwrap_or_else(|e| panic!("invalid URL {url:?}: {e}"))
}

fn assert_loopback(url: &Url) {
    assert_eq!(
        url.host_str(),
        Some("127.0.0.1"),
        "test traffic may only target 127.0.0.1, not {url}"
    );
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}
