//! Referrers watched continuously: against the real distribution registry (which has no
//! referrers API, so the tag schema and cosign tags are used), and the native API path
//! (pages, filters, empty lists, 404 fallback) against the scripted fake.

mod support;

use std::collections::BTreeMap;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use driftwatch::config::RegistrySettings;
use driftwatch::model::{Digest, Reference};
use driftwatch::registry::Registries;
use driftwatch::resolve::referrers;
use serde_json::{Value, json};
use support::cli::event_types as types;
use support::cycles::Cycles;
use support::oci::{OCI_INDEX, OCI_MANIFEST, PushedManifest};
use support::{Behavior, FakeRegistry, Pusher, Registry, TestDir};

const NOTARY: &str = "application/vnd.cncf.notary.signature";
const SPDX: &str = "application/spdx+json";
const EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// Pushes an artifact manifest that refers to `subject`.
async fn push_referrer(
    push: &Pusher,
    repo: &str,
    subject: &PushedManifest,
    artifact_type: &str,
    seed: &str,
) -> Value {
    let empty = push.push_typed_blob(repo, EMPTY, b"{}").await;
    let layer = push.push_blob(repo, seed.as_bytes()).await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY, "digest": empty.digest, "size": empty.size},
        "layers": [{
            "mediaType": "application/octet-stream",
            "digest": layer.digest,
            "size": layer.size
        }],
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.size
        },
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = Digest::sha256_of(&bytes).to_string();
    push.put_manifest(repo, &digest, OCI_MANIFEST, &bytes).await;
    json!({
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": bytes.len(),
        "artifactType": artifact_type
    })
}

/// Writes the referrers tag schema's index for `subject`, as clients maintain it on
/// registries without the API.
async fn put_schema_index(push: &Pusher, repo: &str, subject: &PushedManifest, entries: &[Value]) {
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
    let tag = subject.digest.replace(':', "-");
    push.put_manifest(repo, &tag, OCI_INDEX, &serde_json::to_vec(&index).unwrap())
        .await;
}

fn run(dir: &TestDir, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--config", "driftwatch.toml"]);
    dir.run(&all, &[])
}

fn check(dir: &TestDir) -> Vec<Value> {
    let out = run(dir, &["check", "--format", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn lost_signatures_and_unsigned_moves_are_reported_on_a_registry_without_the_api() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let signed = push.push_image("team/api", Some("prod"), "signed").await;
    let sig = push_referrer(&push, "team/api", &signed, NOTARY, "notary-sig").await;
    let sbom = push_referrer(&push, "team/api", &signed, SPDX, "spdx-sbom").await;
    put_schema_index(&push, "team/api", &signed, &[sig.clone(), sbom.clone()]).await;
    let cosign = push.push_image("team/api", None, "cosign-sig").await;
    let cosign_tag = format!("{}.sig", signed.digest.replace(':', "-"));
    push.tag_existing("team/api", &cosign_tag, &cosign).await;

    let dir = TestDir::new();
    let host = registry.host();
    dir.write_config(&format!(
        "[daemon]\nstate = \"state.db\"\n[registries.\"{host}\"]\ninsecure = true\n\
         [[watch]]\nname = \"api\"\nimage = \"{host}/team/api:prod\"\nreferrers = true\n\
         require_referrers = [\"signature\", \"sbom\"]\n"
    ));

    let baseline = check(&dir);
    assert_eq!(types(&baseline), ["driftwatch.tag.created"]);
    let found = baseline[0]["data"]["current"]["referrers"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(found.len(), 3, "{found:?}");
    let sources: Vec<&str> = found
        .iter()
        .map(|r| r["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources.iter().filter(|s| **s == "tag-schema").count(), 2);
    assert!(sources.contains(&"cosign-tag"));

    assert!(check(&dir).is_empty(), "an unchanged referrer set is quiet");

    // The Notary signature is deleted, and the index updated: exactly one loss. The cosign
    // signature still satisfies "signature", so nothing is missing.
    push.delete_manifest("team/api", sig["digest"].as_str().unwrap())
        .await;
    put_schema_index(&push, "team/api", &signed, std::slice::from_ref(&sbom)).await;
    let lost = check(&dir);
    assert_eq!(types(&lost), ["driftwatch.referrers.lost"]);
    let detail = &lost[0]["data"]["detail"]["lost"];
    assert_eq!(detail.as_array().unwrap().len(), 1);
    assert_eq!(detail[0]["digest"], sig["digest"]);
    assert_eq!(detail[0]["artifact_type"], NOTARY);

    // The tag moves to an image nobody signed.
    let unsigned = push.push_image("team/api", Some("prod"), "unsigned").await;
    let moved = check(&dir);
    assert_eq!(
        types(&moved),
        ["driftwatch.tag.moved", "driftwatch.referrers.missing"]
    );
    assert_eq!(
        moved[1]["data"]["detail"]["missing"],
        json!(["signature", "sbom"])
    );
    assert_eq!(moved[1]["data"]["current"]["digest"], unsigned.digest);

    // verify gates on the same discovery.
    let signed_ref = format!("{host}/team/api@{}", signed.digest);
    let ok = run(
        &dir,
        &["verify", &signed_ref, "--require-referrer", "signature"],
    );
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let no = run(
        &dir,
        &[
            "verify",
            &format!("{host}/team/api:prod"),
            "--require-referrer",
            "signature",
        ],
    );
    assert_eq!(no.status.code(), Some(3));
    let inspect = run(&dir, &["inspect", &signed_ref, "--format", "json"]);
    let v: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v["referrers"].as_array().unwrap().len(), 2);
}

fn registries(fake: &FakeRegistry) -> Arc<Registries> {
    let settings = RegistrySettings {
        insecure: true,
        ..Default::default()
    };
    Arc::new(Registries::new(
        BTreeMap::from([(fake.host(), settings)]),
        4,
        Duration::from_secs(5),
    ))
}

fn page(entries: &[(&str, &str)], headers: &[(&str, &str)]) -> Behavior {
    let manifests: Vec<Value> = entries
        .iter()
        .map(
            |(d, t)| json!({"mediaType": OCI_MANIFEST, "digest": d, "size": 10, "artifactType": t}),
        )
        .collect();
    let mut h = vec![("Content-Type".to_string(), OCI_INDEX.to_string())];
    h.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Behavior::Status {
        code: 200,
        headers: h,
        body: json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
            .to_string(),
    }
}

fn tag_list(tags: &[&str]) -> Behavior {
    Behavior::Status {
        code: 200,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: json!({"name": "team/api", "tags": tags}).to_string(),
    }
}

#[tokio::test]
async fn the_native_api_is_followed_across_pages_and_filtered_when_the_registry_does_not() {
    let fake = FakeRegistry::start().await;
    let subject = Digest::sha256_of(b"subject");
    let (a, b, c) = (
        Digest::sha256_of(b"a"),
        Digest::sha256_of(b"b"),
        Digest::sha256_of(b"c"),
    );
    let base = format!("/v2/team/api/referrers/{subject}");
    fake.set_path(
        &base,
        page(
            &[(a.as_str(), NOTARY)],
            &[("Link", &format!("<{base}?last=1>; rel=\"next\""))],
        ),
    );
    fake.set_path(
        &format!("{base}?last=1"),
        page(&[(b.as_str(), SPDX), (c.as_str(), NOTARY)], &[]),
    );
    fake.set_path("/v2/team/api/tags/list?n=1000", tag_list(&["prod"]));
    let target = Reference::parse(&format!("{}/team/api:prod", fake.host())).unwrap();
    let regs = registries(&fake);

    let (list, _) = referrers(&regs, &target, &subject, None).await.unwrap();
    let digests: Vec<&Digest> = list.iter().map(|r| &r.digest).collect();
    assert_eq!(list.len(), 3, "both pages are read: {digests:?}");
    assert!(list.iter().all(|r| r.source.as_deref() == Some("api")));

    // A filtered request the registry did not filter is filtered here.
    let client = regs.client(&fake.host()).unwrap();
    let q = format!("{base}?artifactType=application%2Fspdx%2Bjson");
    fake.set_path(&q, page(&[(a.as_str(), NOTARY), (b.as_str(), SPDX)], &[]));
    let answer = client
        .referrers_api("team/api", &subject, Some(SPDX))
        .await
        .unwrap();
    let driftwatch::registry::referrers::ApiAnswer::Supported(only) = answer else {
        panic!()
    };
    assert_eq!(only.len(), 1);
    // One that says it filtered is trusted as it is.
    fake.set_path(
        &q,
        page(
            &[(a.as_str(), NOTARY), (b.as_str(), SPDX)],
            &[("OCI-Filters-Applied", "artifactType")],
        ),
    );
    let answer = client
        .referrers_api("team/api", &subject, Some(SPDX))
        .await
        .unwrap();
    let driftwatch::registry::referrers::ApiAnswer::Supported(trusted) = answer else {
        panic!()
    };
    assert_eq!(trusted.len(), 2);
}

#[tokio::test]
async fn an_empty_index_is_no_referrers_and_a_404_falls_back_to_the_tag_schema() {
    let fake = FakeRegistry::start().await;
    let subject = Digest::sha256_of(b"subject");
    let target = Reference::parse(&format!("{}/team/api:prod", fake.host())).unwrap();
    fake.set_path("/v2/team/api/tags/list?n=1000", tag_list(&["prod"]));
    fake.set_path(&format!("/v2/team/api/referrers/{subject}"), page(&[], &[]));
    assert!(
        referrers(&registries(&fake), &target, &subject, None)
            .await
            .unwrap()
            .0
            .is_empty()
    );

    // No API (404 without NAME_UNKNOWN): the tag schema's index is read instead.
    let fake = FakeRegistry::start().await;
    let target = Reference::parse(&format!("{}/team/api:prod", fake.host())).unwrap();
    let schema = subject.as_str().replace(':', "-");
    fake.set_path(
        "/v2/team/api/tags/list?n=1000",
        tag_list(&["prod", &schema]),
    );
    let a = Digest::sha256_of(b"a");
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": a, "size": 3, "artifactType": SPDX}]});
    fake.set(
        &schema,
        Behavior::serve(OCI_INDEX, serde_json::to_vec(&index).unwrap()),
    );
    let (list, _) = referrers(&registries(&fake), &target, &subject, None)
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].source.as_deref(), Some("tag-schema"));

    // A failing API never looks like an empty list.
    let fake = FakeRegistry::start().await;
    let target = Reference::parse(&format!("{}/team/api:prod", fake.host())).unwrap();
    fake.set_path(
        &format!("/v2/team/api/referrers/{subject}"),
        Behavior::status(503, ""),
    );
    assert!(
        referrers(&registries(&fake), &target, &subject, None)
            .await
            .is_err()
    );
}

fn known(
    subject: &Digest,
    referrers: &[driftwatch::model::Referrer],
    etag: Option<String>,
) -> driftwatch::model::ManifestEvidence {
    serde_json::from_value(json!({
        "digest": subject,
        "media_type": OCI_MANIFEST,
        "size": 10,
        "referrers": referrers,
        "referrers_etag": etag,
        "obtained_by": "head",
    }))
    .unwrap()
}

#[tokio::test]
async fn an_unchanged_list_from_the_api_costs_one_conditional_request() {
    let fake = FakeRegistry::start().await;
    let subject = Digest::sha256_of(b"subject");
    let a = Digest::sha256_of(b"a");
    let path = format!("/v2/team/api/referrers/{subject}");
    fake.set_path(
        &path,
        Behavior::Sequence(vec![
            page(&[(a.as_str(), NOTARY)], &[("ETag", "\"v1\"")]),
            Behavior::Status {
                code: 304,
                headers: vec![("ETag".into(), "\"v1\"".into())],
                body: String::new(),
            },
        ]),
    );
    fake.set_path("/v2/team/api/tags/list?n=1000", tag_list(&["prod"]));
    let target = Reference::parse(&format!("{}/team/api:prod", fake.host())).unwrap();
    let regs = registries(&fake);

    let (first, etag) = referrers(&regs, &target, &subject, None).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(etag.as_deref(), Some("\"v1\""));

    fake.clear_requests();
    let stored = known(&subject, &first, etag);
    let (again, etag) = referrers(&regs, &target, &subject, Some(&stored))
        .await
        .unwrap();
    assert_eq!(again, first, "a 304 keeps the stored list");
    assert_eq!(etag.as_deref(), Some("\"v1\""));
    let sent = fake.requests();
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert_eq!(sent[0].if_none_match.as_deref(), Some("\"v1\""));
}

#[tokio::test]
async fn an_unchanged_tag_schema_index_costs_one_request_per_check_in_the_daemon() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let signed = push.push_image("team/api", Some("prod"), "signed").await;
    let sig = push_referrer(&push, "team/api", &signed, NOTARY, "notary-sig").await;
    let sbom = push_referrer(&push, "team/api", &signed, SPDX, "spdx-sbom").await;
    put_schema_index(&push, "team/api", &signed, &[sig.clone(), sbom]).await;

    let dir = TestDir::new();
    let host = registry.host();
    let path = dir.write_config(&format!(
        "[daemon]\nstate = \"state.db\"\n[registries.\"{host}\"]\ninsecure = true\n\
         [[watch]]\nname = \"api\"\nimage = \"{host}/team/api:prod\"\nreferrers = true\n"
    ));
    let cycles = Cycles::open(&path, &[]).await;
    let cycle = async || {
        let (report, requests) = cycles.run().await;
        assert!(report.watches[0].error.is_none(), "{:?}", report.watches);
        (report, requests)
    };
    let (baseline, _) = cycle().await;
    assert_eq!(baseline.events.len(), 1);

    // One HEAD for the tag, one conditional GET (304) for the tag schema's index.
    let (steady, requests) = cycle().await;
    assert!(steady.events.is_empty());
    assert_eq!(requests, 2);

    // The SBOM is removed from the index: the conditional GET gets the new one.
    put_schema_index(&push, "team/api", &signed, &[sig]).await;
    let (lost, requests) = cycle().await;
    let kinds: Vec<&str> = lost.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["driftwatch.referrers.lost"]);
    assert_eq!(requests, 2);
}
