//! driftwatch against Azure Container Registry, played by the test double in
//! `support::acr` (Azure cannot be reached from here): Entra logins of every kind ending in
//! ACR's token exchange, attributes and lock changes, soft delete, and the paged tag listing.
//! Every scenario runs the real `driftwatch` binary, except the listing's request count,
//! which needs two cycles of one process and so drives the library's cycle directly.

mod support;

use std::process::Output;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;
use support::TestDir;
use support::acr::{
    ACR_SCOPE, AcrDouble, ChangeableAttributes, DeletedApi, IDENTITY_HEADER_VALUE, JWT_BEARER,
    MI_CLIENT_ID, SP_CLIENT_ID, SP_CLIENT_SECRET, TENANT_ID, TokenFlow, WORKLOAD_CLIENT_ID,
    federated_token, jwt_claims,
};
use support::cli::{event_types as types, json_lines as events};
use support::cycles::Cycles;

const REPO: &str = "team/api";
const SECRET_VAR: &str = "DW_TEST_SP_SECRET";

/// A config for the double with `auth` as the registry's auth table body.
fn config(acr: &AcrDouble, auth: &str, extra_registry: &str, watches: &str) -> String {
    format!(
        "[daemon]\nstate = \"state.db\"\n\n\
         [registries.\"{host}\"]\ninsecure = true\n{extra_registry}\n\
         [registries.\"{host}\".auth]\n{auth}\n\n{watches}",
        host = acr.host()
    )
}

fn service_principal(acr: &AcrDouble) -> String {
    acr.enable_service_principal(SP_CLIENT_ID, SP_CLIENT_SECRET);
    format!(
        "method = \"acr-aad\"\ntenant_id = \"{TENANT_ID}\"\nclient_id = \"{SP_CLIENT_ID}\"\n\
         client_secret_env = \"{SECRET_VAR}\"\nauthority_host = \"{}\"",
        acr.authority_host()
    )
}

fn tag_watch(acr: &AcrDouble, name: &str, tag: &str) -> String {
    format!(
        "[[watch]]\nname = \"{name}\"\nimage = \"{}/{REPO}:{tag}\"\n",
        acr.host()
    )
}

fn check(dir: &TestDir) -> Vec<Value> {
    events(&dir.run(
        &["check", "--format", "json", "--config", "driftwatch.toml"],
        &[(SECRET_VAR, SP_CLIENT_SECRET)],
    ))
}

fn inspect(dir: &TestDir, image: &str) -> (Output, Value) {
    let out = dir.run(
        &[
            "inspect",
            image,
            "--format",
            "json",
            "--config",
            "driftwatch.toml",
        ],
        &[(SECRET_VAR, SP_CLIENT_SECRET)],
    );
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, json)
}

#[tokio::test]
async fn a_service_principal_logs_in_through_the_acr_exchange() {
    let acr = AcrDouble::start().await;
    let (digest, _) = acr.push_image(REPO, "prod", "a");
    let dir = TestDir::new();
    let auth = service_principal(&acr);
    dir.write_config(&config(&acr, &auth, "", &tag_watch(&acr, "api", "prod")));

    let first = check(&dir);
    assert_eq!(types(&first), ["driftwatch.tag.created"]);
    assert_eq!(first[0]["data"]["current"]["digest"], digest);

    let entra = acr.entra_requests();
    assert_eq!(entra.len(), 1, "one Entra login per process: {entra:?}");
    assert_eq!(entra[0].status, 200);
    assert_eq!(entra[0].grant_type.as_deref(), Some("client_credentials"));
    assert_eq!(entra[0].scope.as_deref(), Some(ACR_SCOPE));
    assert_eq!(entra[0].client_secret.as_deref(), Some(SP_CLIENT_SECRET));

    let tokens = acr.token_requests();
    let exchange: Vec<_> = tokens
        .iter()
        .filter(|t| t.flow == TokenFlow::Exchange)
        .collect();
    assert_eq!(exchange.len(), 1, "{tokens:?}");
    assert_eq!(exchange[0].tenant.as_deref(), Some(TENANT_ID));
    assert_eq!(exchange[0].status, 200);
    let scopes: Vec<&str> = tokens
        .iter()
        .filter(|t| t.flow == TokenFlow::RefreshToken && t.status == 200)
        .flat_map(|t| t.scopes.iter().map(String::as_str))
        .collect();
    assert!(
        scopes.contains(&"repository:team/api:metadata_read"),
        "{scopes:?}"
    );
    assert!(scopes.contains(&"repository:team/api:pull"), "{scopes:?}");

    // The evidence holds the registry-side attributes and says where the digest came from.
    let (out, json) = inspect(&dir, &format!("{}/{REPO}:prod", acr.host()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json["attributes"]["tag"]["delete_enabled"], true);
    assert_eq!(json["attributes"]["manifest"]["tags"][0], "prod");
}

#[tokio::test]
async fn a_certificate_credential_signs_its_assertion() {
    use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
    use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};

    let acr = AcrDouble::start().await;
    acr.push_image(REPO, "prod", "a");
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let pkcs8 = AsDer::<Pkcs8V1Der>::as_der(&key).unwrap();
    // The double does not parse the certificate: any DER stands in for it, and its
    // thumbprint is what the assertion must name.
    let cert_der = b"driftwatch test certificate".to_vec();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n\
         -----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        b64(&cert_der),
        b64(pkcs8.as_ref())
    );
    let thumbprint = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &cert_der).as_ref());
    acr.enable_service_principal_certificate(SP_CLIENT_ID, Some(&thumbprint));

    let dir = TestDir::new();
    dir.write("sp.pem", &pem);
    let auth = format!(
        "method = \"acr-aad\"\ntenant_id = \"{TENANT_ID}\"\nclient_id = \"{SP_CLIENT_ID}\"\n\
         client_certificate_file = \"sp.pem\"\nauthority_host = \"{}\"",
        acr.authority_host()
    );
    dir.write_config(&config(&acr, &auth, "", &tag_watch(&acr, "api", "prod")));
    assert_eq!(types(&check(&dir)), ["driftwatch.tag.created"]);

    let entra = acr.entra_requests();
    assert_eq!(entra[0].status, 200, "{entra:?}");
    assert_eq!(entra[0].client_assertion_type.as_deref(), Some(JWT_BEARER));
    let assertion = entra[0].client_assertion.clone().unwrap();
    let (input, signature) = assertion.rsplit_once('.').unwrap();
    let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(signature)
        .unwrap();
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public_key().as_ref())
        .verify(input.as_bytes(), &signature)
        .expect("the assertion is signed with the certificate's key");
    let claims = jwt_claims(&assertion).unwrap();
    assert_eq!(claims["iss"], SP_CLIENT_ID);
    assert_eq!(claims["aud"], acr.entra_token_url());

    // A key that is not a key is refused when the config is read, naming the key.
    dir.write(
        "sp.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let out = dir.run(&["config", "validate", "--config", "driftwatch.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("auth.client_certificate_file"), "{stderr}");
    assert!(stderr.contains("no PEM private key"), "{stderr}");
}

#[tokio::test]
async fn managed_identities_use_imds_or_the_app_service_endpoint() {
    let acr = AcrDouble::start().await;
    acr.push_image(REPO, "prod", "a");
    acr.enable_managed_identity(Some(MI_CLIENT_ID));
    let dir = TestDir::new();
    let auth = format!(
        "method = \"azure-managed-identity\"\nclient_id = \"{MI_CLIENT_ID}\"\n\
         imds_endpoint = \"{}\"",
        acr.imds_endpoint()
    );
    dir.write_config(&config(&acr, &auth, "", &tag_watch(&acr, "api", "prod")));
    assert_eq!(types(&check(&dir)), ["driftwatch.tag.created"]);
    let imds = acr.imds_requests();
    assert_eq!(imds.len(), 1, "{imds:?}");
    assert_eq!(imds[0].status, 200);
    assert_eq!(imds[0].secret_header.as_deref(), Some("true"));
    assert_eq!(imds[0].client_id.as_deref(), Some(MI_CLIENT_ID));
    assert_eq!(
        imds[0].resource.as_deref(),
        Some("https://containerregistry.azure.net")
    );

    // App Service and Container Apps announce their endpoint in the environment.
    acr.enable_app_service_identity(None);
    let dir = TestDir::new();
    dir.write_config(&config(
        &acr,
        "method = \"azure-managed-identity\"",
        "",
        &tag_watch(&acr, "api", "prod"),
    ));
    let out = dir.run(
        &["check", "--format", "json", "--config", "driftwatch.toml"],
        &[
            ("IDENTITY_ENDPOINT", &acr.identity_endpoint()),
            ("IDENTITY_HEADER", IDENTITY_HEADER_VALUE),
        ],
    );
    assert_eq!(types(&events(&out)), ["driftwatch.tag.created"]);
    let app = acr.imds_requests();
    assert_eq!(app.len(), 2, "{app:?}");
    assert_eq!(app[1].status, 200);
    assert_eq!(app[1].secret_header.as_deref(), Some(IDENTITY_HEADER_VALUE));
}

/// Polls `probe` every 20 ms for at most `limit`: the double's records are what is awaited.
async fn until<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_workload_identity_rereads_its_rotated_token_and_refreshes_before_expiry() {
    let acr = AcrDouble::start().await;
    acr.push_image(REPO, "prod", "a");
    // Short lifetimes: every token runs out between a few of the daemon's one-second cycles.
    let lifetime = Duration::from_secs(3);
    acr.set_token_lifetime(lifetime);
    acr.set_refresh_token_lifetime(lifetime);
    acr.set_entra_token_lifetime(lifetime);
    let first = federated_token("first");
    acr.enable_workload_identity(WORKLOAD_CLIENT_ID, &first);
    let dir = TestDir::new();
    let token_file = dir.write("azure-identity-token", &first);
    let port = support::registry::free_port();
    dir.write_config(&format!(
        "[daemon]\nstate = \"state.db\"\nlisten = \"127.0.0.1:{port}\"\n\
         schedule = \"* * * * * *\"\njitter = 0.0\n\n\
         [registries.\"{host}\"]\ninsecure = true\n\
         [registries.\"{host}\".auth]\nmethod = \"azure-workload-identity\"\n\n{watch}",
        host = acr.host(),
        watch = tag_watch(&acr, "api", "prod"),
    ));
    let token_path = token_file.display().to_string();
    let authority = acr.authority_host();
    let mut daemon = dir.spawn(
        &["run", "--config", "driftwatch.toml"],
        &[
            ("AZURE_CLIENT_ID", WORKLOAD_CLIENT_ID),
            ("AZURE_TENANT_ID", TENANT_ID),
            ("AZURE_FEDERATED_TOKEN_FILE", &token_path),
            ("AZURE_AUTHORITY_HOST", &authority),
            ("DRIFTWATCH_LOG", "info"),
        ],
    );

    let ok_with = |token: &str| {
        acr.entra_requests()
            .iter()
            .filter(|r| r.status == 200 && r.client_assertion.as_deref() == Some(token))
            .count()
    };
    until(
        Duration::from_secs(20),
        "a login with the first token",
        || (ok_with(&first) >= 1).then_some(()),
    )
    .await;

    // The kubelet rotates the file; Entra accepts the new token and, after the overlap,
    // only the new one.
    let second = federated_token("second");
    acr.accept_federated_token(WORKLOAD_CLIENT_ID, &second);
    std::fs::write(&token_file, &second).unwrap();
    until(
        Duration::from_secs(20),
        "a login with the rotated token",
        || (ok_with(&second) >= 1).then_some(()),
    )
    .await;
    acr.rotate_federated_token(WORKLOAD_CLIENT_ID, &second);
    let rotated_at = Instant::now();
    let logins = ok_with(&second);
    until(
        Duration::from_secs(20),
        "another login after the rotation",
        || (ok_with(&second) > logins).then_some(()),
    )
    .await;
    let refused: Vec<_> = acr
        .entra_requests()
        .into_iter()
        .filter(|r| r.status != 200 && r.at >= rotated_at)
        .collect();
    assert!(
        refused.is_empty(),
        "the old token was sent again: {refused:?}"
    );

    // Tokens were renewed ahead of their expiry: after the first challenge, no registry
    // request met a 401.
    let rejected: Vec<_> = acr
        .requests()
        .into_iter()
        .filter(|r| r.status == Some(401) && !r.path.starts_with("/oauth2"))
        .collect();
    assert!(
        rejected.len() <= 1,
        "reactive re-authentication: {rejected:?}"
    );
    let refreshes = acr
        .token_requests()
        .iter()
        .filter(|t| t.flow == TokenFlow::RefreshToken && t.status == 200)
        .count();
    assert!(refreshes >= 2, "access tokens were renewed: {refreshes}");

    daemon.terminate();
    assert!(
        daemon
            .wait_timeout(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
}

#[tokio::test]
async fn a_lock_removed_from_a_production_tag_is_a_warning() {
    let acr = AcrDouble::start().await;
    acr.push_image(REPO, "prod", "a");
    acr.set_tag_attributes(REPO, "prod", ChangeableAttributes::locked());
    let dir = TestDir::new();
    let auth = service_principal(&acr);
    dir.write_config(&config(&acr, &auth, "", &tag_watch(&acr, "api", "prod")));
    assert_eq!(types(&check(&dir)), ["driftwatch.tag.created"]);
    assert!(check(&dir).is_empty(), "nothing changed");

    acr.set_tag_attributes(REPO, "prod", ChangeableAttributes::default());
    let changed = check(&dir);
    assert_eq!(types(&changed), ["driftwatch.attributes.changed"]);
    let data = &changed[0]["data"];
    assert_eq!(data["severity"], "warning");
    let fields: Vec<(&str, &str, bool, bool)> = data["detail"]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["scope"].as_str().unwrap(),
                c["field"].as_str().unwrap(),
                c["old"].as_bool().unwrap(),
                c["new"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        fields,
        [
            ("tag", "deleteEnabled", false, true),
            ("tag", "writeEnabled", false, true)
        ]
    );

    // Locking again is worth knowing, not a warning.
    acr.set_tag_attributes(REPO, "prod", ChangeableAttributes::locked());
    let locked = check(&dir);
    assert_eq!(locked[0]["data"]["severity"], "info");
}

#[tokio::test]
async fn a_manifest_lock_under_an_unchanged_tag_is_read_again_when_due() {
    let acr = AcrDouble::start().await;
    let (digest, _) = acr.push_image(REPO, "prod", "a");
    let dir = TestDir::new();
    let auth = service_principal(&acr);
    let watch = tag_watch(&acr, "api", "prod");
    dir.write_config(&config(&acr, &auth, "attributes_refresh = \"0s\"", &watch));
    check(&dir);

    acr.set_manifest_attributes(REPO, &digest, ChangeableAttributes::locked());
    let locked = check(&dir);
    assert_eq!(types(&locked), ["driftwatch.attributes.changed"]);
    let change = &locked[0]["data"]["detail"]["changes"][0];
    assert_eq!(change["scope"], "manifest");
    assert_eq!(change["field"], "deleteEnabled");

    // With the default hourly refresh a one-shot check leaves the manifest alone.
    dir.write_config(&config(&acr, &auth, "", &watch));
    acr.set_manifest_attributes(REPO, &digest, ChangeableAttributes::default());
    let since = Instant::now();
    assert!(check(&dir).is_empty());
    assert_eq!(
        acr.count_since(since, "GET", "/acr/v1/team/api/_manifests"),
        0
    );
}

#[tokio::test]
async fn without_metadata_read_checks_go_the_generic_way_with_one_warning() {
    let acr = AcrDouble::start().await;
    let (a, _) = acr.push_image(REPO, "prod", "a");
    acr.push_image(REPO, "staging", "b");
    acr.set_metadata_read(false);
    let dir = TestDir::new();
    let auth = service_principal(&acr);
    let watches = format!(
        "{}{}",
        tag_watch(&acr, "prod", "prod"),
        tag_watch(&acr, "staging", "staging")
    );
    dir.write_config(&config(&acr, &auth, "", &watches));
    let out = dir.run(
        &["check", "--format", "json", "--config", "driftwatch.toml"],
        &[(SECRET_VAR, SP_CLIENT_SECRET)],
    );
    let found = events(&out);
    assert_eq!(
        types(&found),
        ["driftwatch.tag.created", "driftwatch.tag.created"]
    );
    assert_eq!(found[0]["data"]["current"]["digest"], a);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("ACR metadata API unavailable").count(),
        1,
        "{stderr}"
    );
    let (out, json) = inspect(&dir, &format!("{}/{REPO}:prod", acr.host()));
    assert!(out.status.success());
    assert_eq!(json["attributes"], Value::Null);
}

fn pinned_watch(acr: &AcrDouble, digest: &str) -> String {
    format!(
        "[[watch]]\nname = \"deployed\"\nimage = \"{}/{REPO}@{digest}\"\n",
        acr.host()
    )
}

#[tokio::test]
async fn a_soft_deleted_digest_is_reported_restorable_then_purged() {
    let acr = AcrDouble::start().await;
    let (digest, _) = acr.push_image(REPO, "prod", "a");
    let dir = TestDir::new();
    let auth = service_principal(&acr);
    dir.write_config(&config(
        &acr,
        &auth,
        "soft_delete_retention_days = 3",
        &pinned_watch(&acr, &digest),
    ));
    check(&dir);

    let deleted_at = acr.soft_delete(REPO, &digest);
    let soft = check(&dir);
    assert_eq!(types(&soft), ["driftwatch.digest.soft_deleted"]);
    let detail = &soft[0]["data"]["detail"];
    let purge_at: chrono::DateTime<chrono::Utc> =
        detail["purge_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(purge_at, deleted_at + chrono::Duration::days(3));
    let restore = detail["restore_command"].as_str().unwrap();
    assert!(
        restore.starts_with("az acr manifest restore -r ") && restore.ends_with(&digest),
        "{restore}"
    );
    assert_eq!(soft[0]["data"]["severity"], "critical");
    assert!(check(&dir).is_empty(), "still soft-deleted: nothing new");

    acr.purge(REPO, &digest);
    let purged = check(&dir);
    assert_eq!(types(&purged), ["driftwatch.digest.deleted"]);
    assert_eq!(purged[0]["data"]["detail"]["purged"], true);
}

#[tokio::test]
async fn a_soft_deleted_digest_that_is_restored_is_reported_back() {
    let acr = AcrDouble::start().await;
    let (digest, _) = acr.push_image(REPO, "prod", "a");
    let dir = TestDir::new();
    let auth = service_principal(&acr);
    dir.write_config(&config(&acr, &auth, "", &pinned_watch(&acr, &digest)));
    check(&dir);
    acr.soft_delete(REPO, &digest);
    assert_eq!(types(&check(&dir)), ["driftwatch.digest.soft_deleted"]);

    // `inspect` says the same, with the command to run.
    let (out, json) = inspect(&dir, &format!("{}/{REPO}@{digest}", acr.host()));
    assert_eq!(out.status.code(), Some(4), "not found");
    assert_eq!(json["soft_deleted"]["state"], "soft_deleted");

    // A pipeline gate says so too.
    let verify = dir.run(
        &[
            "verify",
            &format!("{}/{REPO}@{digest}", acr.host()),
            "--config",
            "driftwatch.toml",
        ],
        &[(SECRET_VAR, SP_CLIENT_SECRET)],
    );
    assert_eq!(verify.status.code(), Some(3));
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(said.contains("soft-deleted, restorable until"), "{said}");

    acr.restore(REPO, &digest, "prod");
    let back = check(&dir);
    assert_eq!(types(&back), ["driftwatch.digest.restored"]);
    assert_eq!(back[0]["data"]["detail"]["was"]["state"], "soft_deleted");
}

#[tokio::test]
async fn an_unreadable_soft_delete_listing_leaves_the_state_unknown() {
    for api in [DeletedApi::Forbidden, DeletedApi::NotFound] {
        let acr = AcrDouble::start().await;
        let (digest, _) = acr.push_image(REPO, "prod", "a");
        acr.set_deleted_api(api);
        let dir = TestDir::new();
        let auth = service_principal(&acr);
        dir.write_config(&config(&acr, &auth, "", &pinned_watch(&acr, &digest)));
        check(&dir);
        acr.soft_delete(REPO, &digest);
        let gone = check(&dir);
        assert_eq!(types(&gone), ["driftwatch.digest.deleted"], "{api:?}");
        let soft = &gone[0]["data"]["detail"]["soft_delete"];
        assert_eq!(soft["state"], "unknown", "{api:?}: {soft}");
        assert!(soft["reason"].as_str().is_some_and(|r| !r.is_empty()));
    }
}

#[tokio::test]
async fn an_untagged_tag_is_deleted_with_its_soft_delete_entry() {
    let acr = AcrDouble::start().await;
    let (digest, _) = acr.push_image(REPO, "prod", "a");
    let dir = TestDir::new();
    let auth = service_principal(&acr);
    dir.write_config(&config(&acr, &auth, "", &tag_watch(&acr, "api", "prod")));
    check(&dir);
    acr.untag(REPO, "prod");
    let gone = check(&dir);
    assert_eq!(types(&gone), ["driftwatch.tag.deleted"]);
    let detail = &gone[0]["data"]["detail"];
    assert_eq!(detail["soft_delete"]["state"], "soft_deleted");
    assert_eq!(detail["soft_delete"]["digest"], digest);
    let restore = detail["restore_command"].as_str().unwrap();
    assert!(
        restore.contains(&format!("-n {REPO}:prod -d {digest}")),
        "{restore}"
    );
}

#[tokio::test]
async fn two_hundred_watched_tags_of_one_repository_cost_two_requests_a_cycle() {
    use driftwatch::model::{Observation, ObtainedBy};

    let acr = AcrDouble::start().await;
    let (digest, _) = acr.push_image(REPO, "tag-000", "a");
    let mut watches = String::new();
    for i in 0..200 {
        let tag = format!("tag-{i:03}");
        acr.tag(REPO, &tag, &digest);
        watches.push_str(&tag_watch(&acr, &tag, &tag));
    }
    acr.enable_admin_user();
    let dir = TestDir::new();
    let auth = format!(
        "method = \"basic\"\nusername = \"{}\"\npassword_env = \"DW_ADMIN_PASSWORD\"",
        support::acr::ADMIN_USERNAME
    );
    let path = dir.write_config(&config(&acr, &auth, "acr = true", &watches));
    let env = vec![(
        "DW_ADMIN_PASSWORD".to_string(),
        support::acr::ADMIN_PASSWORD.to_string(),
    )];
    let cycles = Cycles::open(&path, &env).await;
    let (baseline, _) = cycles.run().await;
    assert_eq!(baseline.events.len(), 200);
    assert!(baseline.watches.iter().all(|w| w.error.is_none()));

    let since = Instant::now();
    let (steady, _) = cycles.run().await;
    assert!(steady.events.is_empty());
    let sent: Vec<String> = acr
        .requests()
        .into_iter()
        .filter(|r| r.at >= since)
        .map(|r| format!("{} {}?{}", r.method, r.path, r.query.unwrap_or_default()))
        .collect();
    assert_eq!(sent.len(), 2, "{sent:#?}");
    assert!(
        sent.iter()
            .all(|r| r.starts_with("GET /acr/v1/team/api/_tags"))
    );

    // A tag that moves is found through the listing too, and its evidence says so.
    let (moved, _) = acr.push_image(REPO, "tag-123", "b");
    let (third, _) = cycles.run().await;
    assert_eq!(third.events.len(), 1);
    assert_eq!(third.events[0].kind, "driftwatch.tag.moved");
    let key = (
        "tag-123".to_string(),
        format!("{}/{REPO}:tag-123", acr.host()),
    );
    let states = cycles.store.load_states(vec![key]).await.unwrap();
    let last = states["tag-123"].last.as_ref().unwrap();
    let Some(Observation::Present(e)) = &last.tag else {
        panic!("{last:?}")
    };
    assert_eq!(e.obtained_by, ObtainedBy::Listing);
    assert_eq!(e.digest.as_str(), moved);
}
