//! The registry client and resolver against answers a real registry will not give: wrong
//! digests, oversized and truncated bodies, 5xx, 429 with Retry-After, expiring tokens. They
//! come from the scripted fake in `support::fake`. None of them may ever look like a deletion.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use driftwatch::config::{Auth, RegistrySettings};
use driftwatch::model::{Observation, ObtainedBy, Reference};
use driftwatch::registry::{Registries, RegistryError};
use driftwatch::resolve::observe;
use support::fake::error_body;
use support::oci::{OCI_MANIFEST, sample_manifest, sha256_digest};
use support::{Behavior, FakeRegistry};

fn registries(fake: &FakeRegistry, auth: Auth) -> Arc<Registries> {
    let settings = RegistrySettings {
        insecure: true,
        auth,
        ..Default::default()
    };
    let map = BTreeMap::from([(fake.host(), settings)]);
    Arc::new(Registries::new(map, 4, Duration::from_secs(5)))
}

fn tag(fake: &FakeRegistry, tag: &str) -> Reference {
    Reference::parse(&format!("{}/team/api:{tag}", fake.host())).unwrap()
}

fn pinned(fake: &FakeRegistry, digest: &str) -> Reference {
    Reference::parse(&format!("{}/team/api@{digest}", fake.host())).unwrap()
}

/// A plain lookup: no stored evidence, no referrers, no ACR listing.
async fn look(regs: &Registries, r: &Reference) -> Result<Observation, RegistryError> {
    observe(regs, r, None, false, Default::default()).await
}

async fn fails(fake: &FakeRegistry, r: &Reference) -> RegistryError {
    match look(&registries(fake, Auth::Anonymous), r).await {
        Err(e) => e,
        Ok(o) => panic!("expected a failure, got {o:?}"),
    }
}

#[tokio::test]
async fn a_wrong_digest_header_fails_verification() {
    let fake = FakeRegistry::start().await;
    fake.set(
        "prod",
        Behavior::WrongDigestHeader {
            media_type: OCI_MANIFEST.into(),
            body: sample_manifest("a"),
        },
    );
    let e = fails(&fake, &tag(&fake, "prod")).await;
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");
    assert!(!e.is_retriable());
}

#[tokio::test]
async fn a_body_that_does_not_hash_to_the_requested_digest_is_rejected() {
    let fake = FakeRegistry::start().await;
    let claimed = sha256_digest(b"something else entirely");
    fake.set(
        &claimed,
        Behavior::NoDigestHeader {
            media_type: OCI_MANIFEST.into(),
            body: sample_manifest("a"),
        },
    );
    let e = fails(&fake, &pinned(&fake, &claimed)).await;
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");

    // With the header, a HEAD that names another digest is caught before any GET.
    fake.set(
        &claimed,
        Behavior::serve(OCI_MANIFEST, sample_manifest("a")),
    );
    let e = fails(&fake, &pinned(&fake, &claimed)).await;
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");
}

#[tokio::test]
async fn an_oversized_manifest_is_refused() {
    let fake = FakeRegistry::start().await;
    fake.set("big", Behavior::Oversized);
    let e = fails(&fake, &tag(&fake, "big")).await;
    assert!(matches!(e, RegistryError::TooLarge { .. }), "{e}");
}

#[tokio::test]
async fn a_truncated_manifest_is_malformed() {
    let fake = FakeRegistry::start().await;
    fake.set(
        "cut",
        Behavior::Truncated {
            media_type: OCI_MANIFEST.into(),
        },
    );
    let e = fails(&fake, &tag(&fake, "cut")).await;
    assert!(matches!(e, RegistryError::Malformed { .. }), "{e}");
}

#[tokio::test]
async fn server_errors_are_retried_within_a_bound() {
    let fake = FakeRegistry::start().await;
    fake.set(
        "flaky",
        Behavior::Sequence(vec![
            Behavior::status(503, ""),
            Behavior::serve_manifest("a"),
        ]),
    );
    // A sequence advertises no single digest; the body is served by digest as well.
    fake.set(
        &sha256_digest(&sample_manifest("a")),
        Behavior::serve_manifest("a"),
    );
    let o = look(&registries(&fake, Auth::Anonymous), &tag(&fake, "flaky"))
        .await
        .unwrap();
    assert!(matches!(o, Observation::Present(_)));

    fake.set("down", Behavior::status(500, ""));
    fake.clear_requests();
    let e = fails(&fake, &tag(&fake, "down")).await;
    assert!(
        matches!(e, RegistryError::Status { status: 500, .. }) && e.is_retriable(),
        "{e}"
    );
    assert_eq!(fake.count("HEAD", "/v2/team/api/manifests/down"), 3);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let fake = FakeRegistry::start().await;
    fake.set(
        "slow",
        Behavior::Sequence(vec![
            Behavior::too_many_requests(1),
            Behavior::serve_manifest("a"),
        ]),
    );
    look(&registries(&fake, Auth::Anonymous), &tag(&fake, "slow"))
        .await
        .unwrap();
    let heads: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "HEAD")
        .collect();
    assert_eq!(heads.len(), 2);
    let waited = heads[1].at - heads[0].at;
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");

    // A wait longer than a check should take is not waited for: the check fails as retriable.
    fake.set("later", Behavior::too_many_requests(3600));
    let e = fails(&fake, &tag(&fake, "later")).await;
    assert!(
        matches!(e, RegistryError::RateLimited { .. }) && e.is_retriable(),
        "{e}"
    );
}

#[tokio::test]
async fn not_found_is_authoritative_only_with_a_registry_error_code() {
    let fake = FakeRegistry::start().await;
    fake.set("gone", Behavior::manifest_unknown());
    let o = look(&registries(&fake, Auth::Anonymous), &tag(&fake, "gone"))
        .await
        .unwrap();
    assert!(matches!(o, Observation::Absent { ref code, .. } if code == "MANIFEST_UNKNOWN"));

    fake.set("proxy", Behavior::not_found_empty());
    let e = fails(&fake, &tag(&fake, "proxy")).await;
    assert!(
        matches!(
            e,
            RegistryError::Status {
                status: 404,
                code: None,
                ..
            }
        ),
        "{e}"
    );

    fake.set("secret", Behavior::denied());
    let e = fails(&fake, &tag(&fake, "secret")).await;
    assert!(matches!(e, RegistryError::Denied { .. }), "{e}");

    fake.set(
        "odd",
        Behavior::status(404, &error_body("BLOB_UNKNOWN", "blob unknown")),
    );
    let e = fails(&fake, &tag(&fake, "odd")).await;
    assert!(
        matches!(e, RegistryError::Status { status: 404, .. }),
        "{e}"
    );
}

#[tokio::test]
async fn an_unchanged_tag_costs_one_head() {
    let fake = FakeRegistry::start().await;
    fake.set("prod", Behavior::serve_manifest("a"));
    let regs = registries(&fake, Auth::Anonymous);
    let first = look(&regs, &tag(&fake, "prod")).await.unwrap();
    let Observation::Present(known) = first else {
        panic!("expected present")
    };
    assert_eq!(known.obtained_by, ObtainedBy::Get);
    assert_eq!(known.layers.len(), 1);

    fake.clear_requests();
    let again = observe(
        &regs,
        &tag(&fake, "prod"),
        Some(&known),
        false,
        Default::default(),
    )
    .await
    .unwrap();
    let Observation::Present(e) = again else {
        panic!("expected present")
    };
    assert_eq!(e.obtained_by, ObtainedBy::Head);
    assert_eq!(
        e.layers, known.layers,
        "evidence is carried over from the stored GET"
    );
    let sent: Vec<_> = fake.requests().into_iter().map(|r| r.method).collect();
    assert_eq!(sent, ["HEAD"]);
}

#[tokio::test]
async fn a_missing_digest_header_on_head_by_tag_falls_back_to_hashing() {
    let fake = FakeRegistry::start().await;
    let body = sample_manifest("a");
    fake.set(
        "prod",
        Behavior::NoDigestHeader {
            media_type: OCI_MANIFEST.into(),
            body: body.clone(),
        },
    );
    let o = look(&registries(&fake, Auth::Anonymous), &tag(&fake, "prod"))
        .await
        .unwrap();
    assert_eq!(o.digest().unwrap().as_str(), sha256_digest(&body));
}

#[tokio::test]
async fn bearer_tokens_are_cached_and_renewed_after_a_401() {
    let fake = FakeRegistry::start().await;
    fake.set_auth(support::Auth::Bearer {
        token_lifetime_secs: 300,
    });
    fake.set("prod", Behavior::serve_manifest("a"));
    let regs = registries(&fake, Auth::Anonymous);
    let r = tag(&fake, "prod");
    look(&regs, &r).await.unwrap();
    look(&regs, &r).await.unwrap();
    assert_eq!(
        fake.token_requests().len(),
        1,
        "the token is cached per scope"
    );
    assert_eq!(
        fake.token_requests()[0].scope.as_deref(),
        Some("repository:team/api:pull")
    );

    // A token the registry stops accepting is replaced once, transparently.
    fake.revoke_tokens();
    look(&regs, &r).await.unwrap();
    assert_eq!(fake.token_requests().len(), 2);
}

#[tokio::test]
async fn basic_credentials_are_sent_when_the_registry_asks() {
    let fake = FakeRegistry::start().await;
    fake.set_auth(support::Auth::Basic {
        user: "u".into(),
        pass: "p".into(),
    });
    fake.set("prod", Behavior::serve_manifest("a"));
    let e = fails(&fake, &tag(&fake, "prod")).await;
    assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e}");

    let auth = Auth::Basic {
        username: "u".into(),
        password: "p".to_string().into(),
    };
    let o = look(&registries(&fake, auth), &tag(&fake, "prod"))
        .await
        .unwrap();
    assert!(matches!(o, Observation::Present(_)));
    let wrong = Auth::Basic {
        username: "u".into(),
        password: "nope".to_string().into(),
    };
    let e = look(&registries(&fake, wrong), &tag(&fake, "prod"))
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized { .. }), "{e}");
}
