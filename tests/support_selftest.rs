//! Self-tests for the integration-test support module, so a broken harness fails here with a
//! clear message instead of as a confusing failure in driftwatch's own tests.

mod support;

use reqwest::StatusCode;
use support::{Auth, Behavior, FakeRegistry, Registry, oci};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

#[tokio::test]
async fn real_registry_push_head_delete_and_restart() {
    let mut registry = Registry::start().await;
    let pusher = registry.pusher();

    let image = pusher
        .push_image("team/app", Some("v1"), "selftest-one")
        .await;
    assert_eq!(image.media_type, oci::OCI_MANIFEST);
    let head = pusher.head_digest("team/app", "v1").await;
    assert_eq!(head.as_deref(), Some(image.digest.as_str()));

    let (index, children) = pusher
        .push_multiarch(
            "team/app",
            Some("multi"),
            &["linux/amd64", "linux/arm64/v8"],
            "m",
        )
        .await;
    assert_eq!(children.len(), 2);
    assert_eq!(
        pusher.head_digest("team/app", "multi").await,
        Some(index.digest.clone())
    );
    let served = pusher
        .get_manifest("team/app", "multi")
        .await
        .expect("index served");
    assert_eq!(served, index);

    // Storage must survive a restart on the same port.
    registry.restart().await;
    assert_eq!(
        pusher.head_digest("team/app", "v1").await,
        Some(image.digest.clone())
    );

    pusher.tag_existing("team/app", "v1-alias", &image).await;
    pusher.delete_manifest("team/app", &image.digest).await;
    assert_eq!(pusher.head_digest("team/app", &image.digest).await, None);
    assert_eq!(pusher.head_digest("team/app", "v1").await, None);
    assert_eq!(pusher.head_digest("team/app", "v1-alias").await, None);
}

#[tokio::test]
async fn fake_bearer_flow_challenges_then_accepts_token_until_revoked() {
    let fake = FakeRegistry::start().await;
    fake.set("latest", Behavior::serve_manifest("bearer"));
    fake.set_auth(Auth::Bearer {
        token_lifetime_secs: 300,
    });
    let http = client();
    let url = format!("{}/v2/lib/app/manifests/latest", fake.base_url());

    let challenged = http.get(&url).send().await.expect("unauthenticated GET");
    assert_eq!(challenged.status(), StatusCode::UNAUTHORIZED);
    let challenge = challenged.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    let expected = format!(
        "Bearer realm=\"http://{}/token\",service=\"fake\",scope=\"repository:lib/app:pull\"",
        fake.host()
    );
    assert_eq!(challenge, expected);

    let token_url = format!("{}/token", fake.base_url());
    let token: serde_json::Value = http
        .get(&token_url)
        .query(&[("service", "fake"), ("scope", "repository:lib/app:pull")])
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token json");
    let token = token["token"].as_str().expect("token field").to_owned();
    assert_eq!(
        fake.token_requests()[0].scope.as_deref(),
        Some("repository:lib/app:pull")
    );

    let served = http
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("authorised GET");
    assert_eq!(served.status(), StatusCode::OK);
    let digest = served.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = served.bytes().await.expect("body");
    assert_eq!(digest, oci::sha256_digest(&body));

    fake.revoke_tokens();
    let revoked = http
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("revoked GET");
    assert_eq!(revoked.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(fake.count("GET", "/v2/lib/app/manifests/"), 3);
}

#[tokio::test]
async fn fake_scripted_behaviours_including_429_retry_after() {
    let fake = FakeRegistry::start().await;
    fake.set(
        "busy",
        Behavior::Sequence(vec![
            Behavior::too_many_requests(1),
            Behavior::serve_manifest("b"),
        ]),
    );
    fake.set("huge", Behavior::Oversized);
    let http = client();
    let url = |reference: &str| format!("{}/v2/lib/app/manifests/{reference}", fake.base_url());

    let throttled = http.get(url("busy")).send().await.expect("first GET");
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(throttled.headers()["retry-after"], "1");
    let body = throttled.text().await.expect("429 body");
    assert!(body.contains("TOOMANYREQUESTS"), "{body}");
    for _ in 0..2 {
        let ok = http.head(url("busy")).send().await.expect("later HEAD");
        assert_eq!(
            ok.status(),
            StatusCode::OK,
            "the last step of a sequence repeats"
        );
    }

    let huge = http.head(url("huge")).send().await.expect("oversized HEAD");
    assert_eq!(huge.headers()["content-length"], "5242880");

    let missing = http.get(url("nope")).send().await.expect("unknown GET");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert!(missing.text().await.unwrap().contains("MANIFEST_UNKNOWN"));
}
