//! Self-tests for the ACR / Entra / managed-identity test double in `support::acr`, driven
//! with plain reqwest so a broken double fails here rather than inside driftwatch's ACR tests.

mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::StatusCode;
use serde_json::Value;
use support::acr::{
    self, ACR_AUDIENCE, ACR_SCOPE, ADMIN_PASSWORD, ADMIN_USERNAME, AcrDouble, ChangeableAttributes,
    DeletedApi, IDENTITY_HEADER_VALUE, IMDS_TOKEN_PATH, JWT_BEARER, MI_CLIENT_ID, NOTARY_SIGNATURE,
    NULL_GUID_USERNAME, SP_CLIENT_ID, SP_CLIENT_SECRET, SPDX_SBOM, TENANT_ID, TokenFlow,
    WORKLOAD_CLIENT_ID,
};
use support::oci;

const REPO: &str = "team/app";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header").to_owned())
}

/// Entra client credentials for the service principal; returns the Entra access token.
async fn entra_token(http: &reqwest::Client, acr: &AcrDouble) -> String {
    let response = http
        .post(acr.entra_token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", SP_CLIENT_ID),
            ("client_secret", SP_CLIENT_SECRET),
            ("scope", ACR_SCOPE),
        ])
        .send()
        .await
        .expect("entra token");
    assert_eq!(response.status(), StatusCode::OK);
    let body = json_of(response).await;
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["expires_in"].as_u64().expect("numeric expires_in") > 0);
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

async fn exchange(http: &reqwest::Client, acr: &AcrDouble, entra: &str) -> reqwest::Response {
    http.post(format!("{}/oauth2/exchange", acr.base_url()))
        .form(&[
            ("grant_type", "access_token"),
            ("service", acr.login_server().as_str()),
            ("tenant", TENANT_ID),
            ("access_token", entra),
        ])
        .send()
        .await
        .expect("exchange")
}

async fn access_token(
    http: &reqwest::Client,
    acr: &AcrDouble,
    refresh: &str,
    scopes: &[&str],
) -> String {
    let service = acr.login_server();
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("service", service.as_str()),
        ("refresh_token", refresh),
    ];
    form.extend(scopes.iter().map(|s| ("scope", *s)));
    let response = http
        .post(acr.realm())
        .form(&form)
        .send()
        .await
        .expect("token");
    assert_eq!(response.status(), StatusCode::OK);
    let body = json_of(response).await;
    let object = body.as_object().expect("object");
    assert_eq!(object.len(), 1, "only access_token, no expires_in: {body}");
    object["access_token"].as_str().expect("token").to_owned()
}

/// The whole service-principal chain, ending in an ACR access token for `scopes`.
async fn sp_access_token(http: &reqwest::Client, acr: &AcrDouble, scopes: &[&str]) -> String {
    acr.enable_service_principal(SP_CLIENT_ID, SP_CLIENT_SECRET);
    let entra = entra_token(http, acr).await;
    let body = json_of(exchange(http, acr, &entra).await).await;
    let refresh = body["refresh_token"].as_str().expect("refresh_token");
    access_token(http, acr, refresh, scopes).await
}

async fn get(http: &reqwest::Client, url: &str, bearer: &str) -> reqwest::Response {
    http.get(url).bearer_auth(bearer).send().await.expect("GET")
}

/// Follows `Link` from `first_url` to the end; returns the pages' bodies.
async fn follow_pages(
    http: &reqwest::Client,
    acr: &AcrDouble,
    first_url: &str,
    bearer: &str,
) -> Vec<(Value, Option<String>)> {
    let mut pages = Vec::new();
    let mut url = first_url.to_owned();
    loop {
        let response = get(http, &url, bearer).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {url}");
        let filters = header(&response, "oci-filters-applied");
        let next = header(&response, "link");
        pages.push((json_of(response).await, filters));
        let Some(next) = next else {
            return pages;
        };
        let target = next
            .strip_prefix('<')
            .and_then(|rest| rest.split_once('>'))
            .map(|(target, _)| target)
            .expect("Link: <target>; rel=\"next\"");
        assert!(target.starts_with('/'), "relative Link target: {next}");
        assert!(next.ends_with("rel=\"next\""), "{next}");
        url = format!("{}{target}", acr.base_url());
        assert!(pages.len() < 100, "runaway pagination");
    }
}

#[tokio::test]
async fn service_principal_exchange_token_and_manifest_flow() {
    let acr = AcrDouble::start().await;
    let http = client();
    let (digest, bytes) = acr.push_image(REPO, "v1", "sp-flow");
    let manifest_url = format!("{}/v2/{REPO}/manifests/v1", acr.base_url());

    let probe = http
        .get(format!("{}/v2/", acr.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(probe.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        header(&probe, "www-authenticate").unwrap(),
        format!(
            "Bearer realm=\"{}\",service=\"{}\"",
            acr.realm(),
            acr.login_server()
        )
    );
    let challenged = http.get(&manifest_url).send().await.unwrap();
    assert_eq!(challenged.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        header(&challenged, "www-authenticate").unwrap(),
        format!(
            "Bearer realm=\"{}\",service=\"{}\",scope=\"repository:{REPO}:pull\"",
            acr.realm(),
            acr.login_server()
        )
    );
    let body = json_of(challenged).await;
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    assert_eq!(body["errors"][0]["detail"][0]["Action"], "pull");

    // Nothing is enabled until the test says so.
    let refused = http
        .post(acr.entra_token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", SP_CLIENT_ID),
            ("client_secret", SP_CLIENT_SECRET),
            ("scope", ACR_SCOPE),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json_of(refused).await["error"], "unauthorized_client");

    acr.enable_service_principal(SP_CLIENT_ID, SP_CLIENT_SECRET);
    let entra = entra_token(&http, &acr).await;
    let entra_claims = acr::jwt_claims(&entra).expect("Entra JWT claims");
    assert_eq!(entra_claims["aud"], ACR_AUDIENCE);
    assert_eq!(entra_claims["tid"], TENANT_ID);

    let exchanged = exchange(&http, &acr, &entra).await;
    assert_eq!(exchanged.status(), StatusCode::OK);
    let body = json_of(exchanged).await;
    assert_eq!(
        body.as_object().unwrap().len(),
        1,
        "only refresh_token: {body}"
    );
    let refresh = body["refresh_token"].as_str().unwrap().to_owned();
    let refresh_claims = acr::jwt_claims(&refresh).unwrap();
    assert_eq!(refresh_claims["grant_type"], "refresh_token");
    assert_eq!(refresh_claims["aud"], acr.login_server().as_str());
    assert_eq!(refresh_claims["iss"], "Azure Container Registry");

    let scope = format!("repository:{REPO}:pull");
    let token = access_token(&http, &acr, &refresh, &[&scope]).await;
    assert_eq!(token.split('.').nth(2), Some(acr::JWT_SIGNATURE));
    let claims = acr::jwt_claims(&token).unwrap();
    let (exp, iat) = (
        claims["exp"].as_u64().unwrap(),
        claims["iat"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 75 * 60, "default access-token lifetime");
    assert_eq!(claims["access"][0]["type"], "repository");
    assert_eq!(claims["access"][0]["name"], REPO);
    assert_eq!(claims["access"][0]["actions"][0], "pull");

    let served = get(&http, &manifest_url, &token).await;
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(header(&served, "docker-content-digest").unwrap(), digest);
    assert_eq!(header(&served, "content-type").unwrap(), oci::OCI_MANIFEST);
    assert_eq!(served.bytes().await.unwrap().as_ref(), bytes.as_slice());
    let head = http
        .head(format!("{}/v2/{REPO}/manifests/{digest}", acr.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        header(&head, "content-length").unwrap(),
        bytes.len().to_string()
    );
    let missing = get(
        &http,
        &format!("{}/v2/{REPO}/manifests/nope", acr.base_url()),
        &token,
    )
    .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        json_of(missing).await["errors"][0]["code"],
        "MANIFEST_UNKNOWN"
    );
    let other_repo = get(
        &http,
        &format!("{}/v2/other/manifests/v1", acr.base_url()),
        &token,
    )
    .await;
    // The token is for team/app only: another repository needs a new token first.
    assert_eq!(other_repo.status(), StatusCode::UNAUTHORIZED);

    let flows: Vec<TokenFlow> = acr.token_requests().iter().map(|t| t.flow).collect();
    assert_eq!(flows, [TokenFlow::Exchange, TokenFlow::RefreshToken]);
    assert_eq!(acr.token_requests()[1].scopes, vec![scope.clone()]);
    assert_eq!(acr.token_requests()[1].granted, vec![scope.clone()]);
    assert_eq!(
        acr.token_requests()[0].client.as_deref(),
        Some(SP_CLIENT_ID)
    );
    let entra_calls = acr.entra_requests();
    assert_eq!(entra_calls.len(), 2, "the refused call and the good one");
    assert_eq!(
        entra_calls[1].client_secret.as_deref(),
        Some(SP_CLIENT_SECRET)
    );
    assert_eq!(entra_calls[1].scope.as_deref(), Some(ACR_SCOPE));

    // Expiry as the double's clock sees it forces a new token.
    acr.advance_clock(Duration::from_secs(76 * 60));
    assert_eq!(
        get(&http, &manifest_url, &token).await.status(),
        StatusCode::UNAUTHORIZED
    );
    acr.set_token_lifetime(Duration::from_secs(5));
    let short = access_token(&http, &acr, &refresh, &[&scope]).await;
    let claims = acr::jwt_claims(&short).unwrap();
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        5
    );
    assert_eq!(
        get(&http, &manifest_url, &short).await.status(),
        StatusCode::OK
    );
    acr.revoke_tokens();
    assert_eq!(
        get(&http, &manifest_url, &short).await.status(),
        StatusCode::UNAUTHORIZED
    );

    // Wrong secret, and the ARM audience once the registry disables it.
    let bad = http
        .post(acr.entra_token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", SP_CLIENT_ID),
            ("client_secret", "wrong"),
            ("scope", ACR_SCOPE),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(json_of(bad).await["error"], "invalid_client");
    let arm = http
        .post(acr.entra_token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", SP_CLIENT_ID),
            ("client_secret", SP_CLIENT_SECRET),
            ("scope", "https://management.azure.com/.default"),
        ])
        .send()
        .await
        .unwrap();
    let arm_token = json_of(arm).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        exchange(&http, &acr, &arm_token).await.status(),
        StatusCode::OK
    );
    acr.set_arm_audience_allowed(false);
    assert_eq!(
        exchange(&http, &acr, &arm_token).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn workload_identity_rotation_and_managed_identity_endpoints() {
    let acr = AcrDouble::start().await;
    let http = client();
    let first = acr::federated_token("first");
    let second = acr::federated_token("second");
    let claims = acr::jwt_claims(&first).unwrap();
    assert_eq!(claims["aud"][0], acr::FEDERATED_TOKEN_AUDIENCE);
    acr.enable_workload_identity(WORKLOAD_CLIENT_ID, &first);
    let federated = |assertion: &str| {
        http.post(acr.entra_token_url())
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", WORKLOAD_CLIENT_ID),
                ("scope", ACR_SCOPE),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", assertion),
            ])
            .send()
    };
    assert_eq!(federated(&first).await.unwrap().status(), StatusCode::OK);
    acr.rotate_federated_token(WORKLOAD_CLIENT_ID, &second);
    let stale = federated(&first).await.unwrap();
    assert_eq!(stale.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(json_of(stale).await["error"], "invalid_client");
    let fresh = federated(&second).await.unwrap();
    assert_eq!(fresh.status(), StatusCode::OK);
    let entra = json_of(fresh).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(exchange(&http, &acr, &entra).await.status(), StatusCode::OK);
    let assertions: Vec<Option<String>> = acr
        .entra_requests()
        .into_iter()
        .map(|r| r.client_assertion)
        .collect();
    assert_eq!(
        assertions,
        [Some(first.clone()), Some(first), Some(second)],
        "every assertion is recorded as sent"
    );

    // IMDS: Metadata header required, numbers as strings, user-assigned by client_id.
    let imds = format!("{}{IMDS_TOKEN_PATH}", acr.imds_endpoint());
    let query = [("api-version", "2018-02-01"), ("resource", ACR_AUDIENCE)];
    acr.enable_managed_identity(Some(MI_CLIENT_ID));
    let no_header = http.get(&imds).query(&query).send().await.unwrap();
    assert_eq!(no_header.status(), StatusCode::BAD_REQUEST);
    let unselected = http
        .get(&imds)
        .query(&query)
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(
        unselected.status(),
        StatusCode::BAD_REQUEST,
        "no system identity"
    );
    let answer = http
        .get(&imds)
        .query(&query)
        .query(&[("client_id", MI_CLIENT_ID)])
        .header("Metadata", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let body = json_of(answer).await;
    assert_eq!(body["expires_in"], "3599");
    assert!(body["expires_on"].as_str().unwrap().parse::<u64>().is_ok());
    assert_eq!(body["resource"], ACR_AUDIENCE);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["refresh_token"], "");
    let mi_token = body["access_token"].as_str().unwrap();
    assert_eq!(
        exchange(&http, &acr, mi_token).await.status(),
        StatusCode::OK
    );

    // App Service / Container Apps: X-IDENTITY-HEADER.
    acr.enable_app_service_identity(None);
    let endpoint = acr.identity_endpoint();
    let query = [("resource", ACR_AUDIENCE), ("api-version", "2019-08-01")];
    let wrong = http
        .get(&endpoint)
        .query(&query)
        .header("X-IDENTITY-HEADER", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let answer = http
        .get(&endpoint)
        .query(&query)
        .header("X-IDENTITY-HEADER", IDENTITY_HEADER_VALUE)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let body = json_of(answer).await;
    assert!(body["expires_on"].as_str().unwrap().parse::<u64>().is_ok());
    assert_eq!(body["client_id"], acr::SYSTEM_MI_CLIENT_ID);

    let calls = acr.imds_requests();
    assert_eq!(calls.len(), 5);
    assert_eq!(calls[2].client_id.as_deref(), Some(MI_CLIENT_ID));
    assert_eq!(calls[2].secret_header.as_deref(), Some("true"));
    assert_eq!(calls[4].endpoint, acr::IdentityEndpoint::AppService);
}

#[tokio::test]
async fn basic_auth_admin_user_and_refresh_token_as_password() {
    let acr = AcrDouble::start().await;
    let http = client();
    acr.push_image(REPO, "v1", "basic");
    acr.enable_admin_user();
    let manifest_url = format!("{}/v2/{REPO}/manifests/v1", acr.base_url());
    let direct = http
        .get(&manifest_url)
        .basic_auth(ADMIN_USERNAME, Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), StatusCode::OK, "Basic straight on /v2");
    let wrong = http
        .get(&manifest_url)
        .basic_auth(ADMIN_USERNAME, Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    let scope = format!("repository:{REPO}:pull,metadata_read");
    let response = http
        .get(acr.realm())
        .query(&[("service", acr.login_server()), ("scope", scope.clone())])
        .basic_auth(ADMIN_USERNAME, Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let token = json_of(response).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        get(&http, &manifest_url, &token).await.status(),
        StatusCode::OK
    );
    let tags_url = format!("{}/acr/v1/{REPO}/_tags/v1", acr.base_url());
    assert_eq!(get(&http, &tags_url, &token).await.status(), StatusCode::OK);
    let request = &acr.token_requests()[0];
    assert_eq!(request.flow, TokenFlow::BasicGet);
    assert_eq!(request.client.as_deref(), Some(ADMIN_USERNAME));

    // The null GUID makes the password an ACR refresh token.
    acr.enable_service_principal(SP_CLIENT_ID, SP_CLIENT_SECRET);
    let entra = entra_token(&http, &acr).await;
    let refresh = json_of(exchange(&http, &acr, &entra).await).await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let with_refresh = http
        .get(&manifest_url)
        .basic_auth(NULL_GUID_USERNAME, Some(&refresh))
        .send()
        .await
        .unwrap();
    assert_eq!(with_refresh.status(), StatusCode::OK);
    let password_grant = http
        .post(acr.realm())
        .form(&[
            ("grant_type", "password"),
            ("service", acr.login_server().as_str()),
            ("scope", scope.as_str()),
            ("username", ADMIN_USERNAME),
            ("password", ADMIN_PASSWORD),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(password_grant.status(), StatusCode::OK);
    let auth_header = format!(
        "Basic {}",
        STANDARD.encode(format!("{ADMIN_USERNAME}:{ADMIN_PASSWORD}"))
    );
    let recorded = acr.requests();
    assert!(
        recorded
            .iter()
            .any(|r| r.authorization.as_deref() == Some(auth_header.as_str()))
    );
}

#[tokio::test]
async fn metadata_endpoints_follow_documented_shapes_and_permissions() {
    let acr = AcrDouble::start().await;
    let http = client();
    let (digest, bytes) = acr.push_image(REPO, "v1", "meta");
    acr.tag(REPO, "latest", &digest);
    let (index, _) = acr.push_index(
        REPO,
        Some("multi"),
        "meta-multi",
        &["linux/amd64", "linux/arm64"],
    );
    let (untagged, _) = acr.push_image_for(REPO, None, "meta-untagged", "linux/arm64/v8");
    acr.set_tag_attributes(REPO, "v1", ChangeableAttributes::locked());
    acr.set_quarantine(
        REPO,
        &digest,
        Some("Passed"),
        Some("{\"state\":\"scan passed\"}"),
    );
    let scope = format!("repository:{REPO}:pull,metadata_read");
    let token = sp_access_token(&http, &acr, &[&scope]).await;
    let base = acr.base_url();

    let tag = json_of(get(&http, &format!("{base}/acr/v1/{REPO}/_tags/v1"), &token).await).await;
    assert_eq!(tag["registry"], acr.login_server().as_str());
    assert_eq!(tag["imageName"], REPO);
    let tag = &tag["tag"];
    assert_eq!(tag["name"], "v1");
    assert_eq!(tag["digest"], digest.as_str());
    assert_eq!(tag["signed"], false);
    assert!(tag["createdTime"].as_str().unwrap().ends_with('Z'));
    assert!(tag["lastUpdateTime"].as_str().unwrap() >= tag["createdTime"].as_str().unwrap());
    let attrs = &tag["changeableAttributes"];
    assert_eq!(attrs["deleteEnabled"], false);
    assert_eq!(attrs["writeEnabled"], false);
    assert_eq!(attrs["readEnabled"], true);
    assert_eq!(attrs["listEnabled"], true);

    let manifest_url = format!("{base}/acr/v1/{REPO}/_manifests/{digest}");
    let manifest = json_of(get(&http, &manifest_url, &token).await).await;
    let manifest = &manifest["manifest"];
    assert_eq!(manifest["digest"], digest.as_str());
    assert!(manifest["imageSize"].as_u64().unwrap() > bytes.len() as u64);
    assert_eq!(manifest["architecture"], "amd64");
    assert_eq!(manifest["os"], "linux");
    assert_eq!(manifest["mediaType"], oci::OCI_MANIFEST);
    assert_eq!(manifest["configMediaType"], oci::OCI_CONFIG);
    assert_eq!(manifest["tags"], serde_json::json!(["latest", "v1"]));
    assert!(manifest.get("references").is_none());
    let attrs = &manifest["changeableAttributes"];
    assert_eq!(
        attrs["deleteEnabled"], true,
        "tag and manifest locks are independent"
    );
    assert_eq!(attrs["quarantineState"], "Passed");
    assert_eq!(attrs["quarantineDetails"], "{\"state\":\"scan passed\"}");

    let bare = format!("{base}/acr/v1/{REPO}/_manifests/{untagged}");
    let bare = json_of(get(&http, &bare, &token).await).await;
    assert!(
        bare["manifest"].get("tags").is_none(),
        "untagged: no tags member"
    );
    assert_eq!(bare["manifest"]["architecture"], "arm64");
    let multi = json_of(
        get(
            &http,
            &format!("{base}/acr/v1/{REPO}/_manifests/{index}"),
            &token,
        )
        .await,
    )
    .await;
    let references = multi["manifest"]["references"].as_array().unwrap();
    assert_eq!(references.len(), 2);
    assert_eq!(references[1]["architecture"], "arm64");

    let missing = get(&http, &format!("{base}/acr/v1/{REPO}/_tags/nope"), &token).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let repo = json_of(get(&http, &format!("{base}/acr/v1/{REPO}"), &token).await).await;
    assert_eq!(repo["tagCount"], 3);
    assert_eq!(repo["manifestCount"], 5);

    // A quarantined image looks absent by tag and is refused by digest.
    acr.set_quarantine(REPO, &digest, Some("Pending"), None);
    let pull_token = sp_access_token(&http, &acr, &[&format!("repository:{REPO}:pull")]).await;
    let by_tag = get(
        &http,
        &format!("{base}/v2/{REPO}/manifests/v1"),
        &pull_token,
    )
    .await;
    assert_eq!(by_tag.status(), StatusCode::NOT_FOUND);
    let by_digest = get(
        &http,
        &format!("{base}/v2/{REPO}/manifests/{digest}"),
        &pull_token,
    )
    .await;
    assert_eq!(by_digest.status(), StatusCode::FORBIDDEN);

    // Without metadata_read the token is granted pull only, and /acr/v1 challenges.
    acr.set_metadata_read(false);
    let degraded = sp_access_token(&http, &acr, &[&scope]).await;
    let granted = acr.token_requests().last().unwrap().granted.clone();
    assert_eq!(granted, [format!("repository:{REPO}:pull")]);
    let refused = get(&http, &format!("{base}/acr/v1/{REPO}/_tags/v1"), &degraded).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(
        header(&refused, "www-authenticate")
            .unwrap()
            .ends_with(&format!("scope=\"repository:{REPO}:metadata_read\""))
    );
    acr.set_denied_status(403);
    let refused = get(&http, &format!("{base}/acr/v1/{REPO}/_tags/v1"), &degraded).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(json_of(refused).await["errors"][0]["code"], "DENIED");
}

#[tokio::test]
async fn tag_listing_pages_through_relative_links() {
    let acr = AcrDouble::start().await;
    let http = client();
    let mut pushed = Vec::new();
    for i in 0..250 {
        let tag = format!("t{i:03}");
        let (digest, _) = acr.push_image(REPO, &tag, &tag);
        pushed.push((tag, digest));
    }
    acr.set_tag_attributes(
        REPO,
        "t007",
        ChangeableAttributes {
            list_enabled: false,
            ..ChangeableAttributes::default()
        },
    );
    let token = sp_access_token(&http, &acr, &[&format!("repository:{REPO}:metadata_read")]).await;
    let since = Instant::now();
    let first = format!("{}/acr/v1/{REPO}/_tags?n=1000", acr.base_url());
    let pages = follow_pages(&http, &acr, &first, &token).await;
    assert_eq!(pages.len(), 3, "the default cap is 100 per page");
    assert_eq!(
        acr.count_since(since, "GET", &format!("/acr/v1/{REPO}/_tags")),
        3
    );
    let listed: Vec<(String, String)> = pages
        .iter()
        .flat_map(|(body, _)| body["tags"].as_array().unwrap().clone())
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_owned(),
                t["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = pushed
        .iter()
        .filter(|(t, _)| t != "t007")
        .cloned()
        .collect();
    assert_eq!(listed, expected, "lexical order, hidden tag left out");
    assert_eq!(pages[0].0["registry"], acr.login_server().as_str());
    assert_eq!(pages[0].0["imageName"], REPO);
    assert!(
        pages[0].0["link"]
            .as_str()
            .unwrap()
            .starts_with("</acr/v1/")
    );
    assert!(pages[2].0.get("link").is_none());

    // The Link carries n and orderby like ACR's sample.
    let response = get(
        &http,
        &format!(
            "{}/acr/v1/{REPO}/_tags?n=2&orderby=timedesc",
            acr.base_url()
        ),
        &token,
    )
    .await;
    assert_eq!(
        header(&response, "link").unwrap(),
        format!("</acr/v1/{REPO}/_tags?last=t248&n=2&orderby=timedesc>; rel=\"next\"")
    );
    let body = json_of(response).await;
    assert_eq!(body["tags"][0]["name"], "t249", "newest first");

    acr.set_page_limit(1000);
    let one = follow_pages(&http, &acr, &first, &token).await;
    assert_eq!(one.len(), 1);

    // The generic listing pages too.
    let pull = sp_access_token(&http, &acr, &[&format!("repository:{REPO}:pull")]).await;
    let generic = format!("{}/v2/{REPO}/tags/list?n=100", acr.base_url());
    let pages = follow_pages(&http, &acr, &generic, &pull).await;
    assert_eq!(pages.len(), 3);
    assert_eq!(pages[0].0["name"], REPO);
}

#[tokio::test]
async fn soft_delete_purge_and_restore_move_entries_between_listings() {
    let acr = AcrDouble::start().await;
    let http = client();
    acr.push_image(REPO, "keep", "keeper");
    let (digest, _) = acr.push_image(REPO, "v1", "doomed");
    acr.tag(REPO, "also", &digest);
    let (signature, _) = acr.push_referrer(REPO, &digest, NOTARY_SIGNATURE, "sig");
    let scopes = [format!(
        "repository:{REPO}:pull,metadata_read,deleted_read,delete"
    )];
    let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
    let token = sp_access_token(&http, &acr, &scopes).await;
    let base = acr.base_url();
    let deleted_manifests = format!("{base}/acr/v1/_deleted/{REPO}/_manifests");
    let deleted_tags = format!("{base}/acr/v1/_deleted/{REPO}/_tags");

    let empty = json_of(get(&http, &deleted_manifests, &token).await).await;
    assert_eq!(empty, serde_json::json!({ "manifests": [] }));

    let deleted_at = acr.soft_delete(REPO, &digest);
    let gone = get(
        &http,
        &format!("{base}/v2/{REPO}/manifests/{digest}"),
        &token,
    )
    .await;
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert_eq!(json_of(gone).await["errors"][0]["code"], "MANIFEST_UNKNOWN");
    let listed = json_of(get(&http, &deleted_manifests, &token).await).await;
    let entries = listed["manifests"].as_array().unwrap();
    let digests: Vec<&str> = entries
        .iter()
        .map(|e| e["digest"].as_str().unwrap())
        .collect();
    assert_eq!(
        digests,
        [digest.as_str(), signature.as_str()],
        "the referrer goes along"
    );
    let stamp = entries[0]["deletedAt"].as_str().unwrap();
    let parsed = chrono::DateTime::parse_from_rfc3339(stamp).unwrap();
    assert_eq!(parsed, deleted_at);
    assert!(entries[0]["createdAt"].as_str().unwrap() <= stamp);
    let tags = json_of(get(&http, &deleted_tags, &token).await).await;
    let names: Vec<&str> = tags["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tag"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["also", "v1"]);
    assert_eq!(tags["tags"][0]["digest"], digest.as_str());

    // Paging uses an opaque cursor in Link.
    acr.set_page_limit(1);
    let pages = follow_pages(&http, &acr, &deleted_manifests, &token).await;
    assert_eq!(pages.len(), 2);
    assert_eq!(pages[1].0["manifests"][0]["digest"], signature.as_str());
    acr.set_page_limit(100);

    acr.restore(REPO, &digest, "v1");
    assert!(acr.has_manifest(REPO, &digest));
    assert!(
        !acr.has_manifest(REPO, &signature),
        "restore leaves referrers deleted"
    );
    assert_eq!(acr.tag_digest(REPO, "v1").as_deref(), Some(digest.as_str()));
    let listed = json_of(get(&http, &deleted_manifests, &token).await).await;
    assert_eq!(listed["manifests"][0]["digest"], signature.as_str());
    assert_eq!(listed["manifests"].as_array().unwrap().len(), 1);
    let tags = json_of(get(&http, &deleted_tags, &token).await).await;
    assert_eq!(
        tags["tags"].as_array().unwrap().len(),
        1,
        "only 'also' stays deleted"
    );

    // DELETE over HTTP with the policy on soft-deletes; purge empties the listing.
    let deleted = http
        .delete(format!("{base}/v2/{REPO}/manifests/{digest}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    assert!(acr.is_soft_deleted(REPO, &digest));
    acr.purge(REPO, &digest);
    acr.purge(REPO, &signature);
    let listed = json_of(get(&http, &deleted_manifests, &token).await).await;
    assert_eq!(listed["manifests"], serde_json::json!([]));
    let tags = json_of(get(&http, &deleted_tags, &token).await).await;
    assert_eq!(tags["tags"], serde_json::json!([]));

    // A locked manifest refuses DELETE.
    let (locked, _) = acr.push_image(REPO, "locked", "locked");
    acr.set_manifest_attributes(REPO, &locked, ChangeableAttributes::locked());
    let refused = http
        .delete(format!("{base}/v2/{REPO}/manifests/{locked}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);

    // Untag with the policy on leaves a deleted-tag entry.
    acr.untag(REPO, "locked");
    let tags = json_of(get(&http, &deleted_tags, &token).await).await;
    assert_eq!(tags["tags"][0]["tag"], "locked");

    // Switches: unsupported, forbidden, and a token without deleted_read.
    acr.set_deleted_api(DeletedApi::NotFound);
    assert_eq!(
        get(&http, &deleted_manifests, &token).await.status(),
        StatusCode::NOT_FOUND
    );
    acr.set_deleted_api(DeletedApi::Forbidden);
    assert_eq!(
        get(&http, &deleted_manifests, &token).await.status(),
        StatusCode::FORBIDDEN
    );
    acr.set_deleted_api(DeletedApi::Serve);
    acr.set_deleted_read(false);
    let without = sp_access_token(&http, &acr, &scopes).await;
    assert_eq!(
        get(&http, &deleted_manifests, &without).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn referrers_paginate_filter_and_vanish_with_their_subject() {
    let acr = AcrDouble::start().await;
    let http = client();
    acr.push_image(REPO, "other", "other");
    let (subject, _) = acr.push_image(REPO, "v1", "subject");
    let mut signatures: Vec<String> = (0..5)
        .map(|i| {
            acr.push_referrer(REPO, &subject, NOTARY_SIGNATURE, &format!("sig{i}"))
                .0
        })
        .collect();
    let sboms: Vec<String> = (0..3)
        .map(|i| {
            acr.push_referrer(REPO, &subject, SPDX_SBOM, &format!("sbom{i}"))
                .0
        })
        .collect();
    acr.set_referrers_page_size(2);
    let token = sp_access_token(&http, &acr, &[&format!("repository:{REPO}:pull")]).await;
    let url = format!("{}/v2/{REPO}/referrers/{subject}", acr.base_url());

    let pages = follow_pages(&http, &acr, &url, &token).await;
    assert_eq!(pages.len(), 4);
    let mut all: Vec<String> = Vec::new();
    for (page, filters) in &pages {
        assert_eq!(page["mediaType"], oci::OCI_INDEX);
        assert_eq!(page["schemaVersion"], 2);
        assert!(filters.is_none());
        for descriptor in page["manifests"].as_array().unwrap() {
            assert_eq!(descriptor["mediaType"], oci::OCI_MANIFEST);
            assert!(descriptor["size"].as_u64().unwrap() > 0);
            assert!(descriptor["annotations"]["org.opencontainers.image.created"].is_string());
            all.push(descriptor["digest"].as_str().unwrap().to_owned());
        }
    }
    let mut expected = signatures.clone();
    expected.extend(sboms.iter().cloned());
    expected.sort();
    assert_eq!(all, expected);

    let filtered_url = format!("{url}?artifactType={}", SPDX_SBOM.replace('+', "%2B"));
    let pages = follow_pages(&http, &acr, &filtered_url, &token).await;
    assert_eq!(pages.len(), 2);
    let mut found: Vec<String> = Vec::new();
    for (page, filters) in &pages {
        assert_eq!(filters.as_deref(), Some("artifactType"));
        for descriptor in page["manifests"].as_array().unwrap() {
            assert_eq!(descriptor["artifactType"], SPDX_SBOM);
            found.push(descriptor["digest"].as_str().unwrap().to_owned());
        }
    }
    let mut sboms_sorted = sboms.clone();
    sboms_sorted.sort();
    assert_eq!(found, sboms_sorted);

    acr.set_referrers_filtering(false);
    let unfiltered = get(&http, &filtered_url, &token).await;
    assert!(header(&unfiltered, "oci-filters-applied").is_none());
    acr.set_referrers_filtering(true);

    let (none, _) = acr.push_image_for(REPO, None, "lonely", "linux/amd64");
    let empty = json_of(
        get(
            &http,
            &format!("{}/v2/{REPO}/referrers/{none}", acr.base_url()),
            &token,
        )
        .await,
    )
    .await;
    assert_eq!(empty["manifests"], serde_json::json!([]));
    let malformed = get(
        &http,
        &format!("{}/v2/{REPO}/referrers/sha256:xyz", acr.base_url()),
        &token,
    )
    .await;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        json_of(malformed).await["errors"][0]["code"],
        "DIGEST_INVALID"
    );
    let unknown_repo = get(
        &http,
        &format!("{}/v2/nope/referrers/{subject}", acr.base_url()),
        &token,
    )
    .await;
    assert_eq!(
        unknown_repo.status(),
        StatusCode::UNAUTHORIZED,
        "token is for team/app"
    );

    acr.soft_delete(REPO, &subject);
    signatures.sort();
    assert!(acr.is_soft_deleted(REPO, &signatures[0]));
    let after = json_of(get(&http, &url, &token).await).await;
    assert_eq!(after["manifests"], serde_json::json!([]));
}

#[tokio::test]
async fn hook_payloads_follow_the_documented_samples() {
    let acr = AcrDouble::start().await;
    let (digest, bytes) = acr.push_image(REPO, "v1", "hooks");
    let image = acr.hook_image(REPO, "v1");
    assert_eq!(image.digest, digest);
    assert_eq!(image.size, bytes.len() as u64);

    let push = acr.webhook_push(REPO, "v1");
    assert_eq!(push["action"], "push");
    assert_eq!(push["target"]["repository"], REPO);
    assert_eq!(push["target"]["tag"], "v1");
    assert_eq!(push["target"]["digest"], digest.as_str());
    assert_eq!(push["target"]["size"], push["target"]["length"]);
    assert_eq!(push["request"]["host"], acr.login_server().as_str());
    assert_eq!(push["request"]["method"], "PUT");
    let delete = acr::acr_webhook_delete(&image);
    assert_eq!(delete["action"], "delete");
    assert!(delete["target"].get("tag").is_none());

    let pushed = acr.event_grid_pushed(REPO, "v1");
    let event = &pushed.as_array().unwrap()[0];
    assert_eq!(
        event["eventType"],
        "Microsoft.ContainerRegistry.ImagePushed"
    );
    assert_eq!(event["subject"], format!("{REPO}:v1"));
    assert!(event["topic"].as_str().unwrap().contains("/registries/"));
    assert_eq!(event["data"]["target"]["digest"], digest.as_str());
    assert_eq!(event["metadataVersion"], "1");
    let deleted = acr::event_grid_image_deleted(&image);
    assert_eq!(
        deleted[0]["eventType"],
        "Microsoft.ContainerRegistry.ImageDeleted"
    );
    assert_eq!(deleted[0]["subject"], REPO);
    assert!(deleted[0]["data"]["target"].get("tag").is_none());

    let validation =
        acr::event_grid_subscription_validation("512d38b6-c7b8-40c8-89fe-f46f9e9622b6");
    assert_eq!(
        validation[0]["eventType"],
        "Microsoft.EventGrid.SubscriptionValidationEvent"
    );
    assert_eq!(
        validation[0]["data"]["validationCode"],
        "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"
    );
    let cloud = acr::cloud_event_image_pushed(&image);
    assert_eq!(cloud["specversion"], "1.0");
    assert_eq!(cloud["type"], "Microsoft.ContainerRegistry.ImagePushed");
}

#[test]
fn bounded_wait_sees_requests_from_another_thread() {
    let acr = AcrDouble::start_blocking();
    let url = format!("{}/v2/", acr.base_url());
    let poker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async { client().get(url).send().await.unwrap().status() })
    });
    assert_eq!(
        acr.wait_for_count("GET", "/v2/", 1, Duration::from_secs(10)),
        1
    );
    assert_eq!(poker.join().unwrap(), StatusCode::UNAUTHORIZED);
    let recorded = acr.requests();
    assert_eq!(recorded[0].listener, acr::Listener::Registry);
    assert_eq!(recorded[0].status, Some(401));
}
