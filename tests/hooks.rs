//! The daemon's inbound registry hooks, against the real binary, a real registry and a real
//! webhook receiver: refused deliveries and handshakes trigger nothing, and a push announced
//! by an ACR webhook, an Event Grid event or a CloudEvent is checked and alerted at once.

mod support;

use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use support::acr::{
    HookImage, acr_webhook_push, cloud_event_image_pushed, event_grid_image_pushed,
    event_grid_subscription_validation,
};
use support::process::until;
use support::registry::free_port;
use support::{PushedManifest, Receiver, Registry, TestDir};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const ACR_SECRET: &str = "acr-hook-secret-0123456789";
const GRID_SECRET: &str = "event-grid-secret-9876543210";
/// A schedule that does not fire during a test (midnight on January 1st): every check here
/// is one a hook asked for.
const NEVER: &str = "0 0 0 1 1 *";

fn config(port: u16, registry: &Registry, sink: Option<&Receiver>, hooks: &str) -> String {
    let host = registry.host();
    let sink = sink.map_or(String::new(), |r| {
        format!(
            "[[sink]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"{}\"\n\
             retry_max_interval = \"1s\"\n\n",
            r.url("/events")
        )
    });
    format!(
        "[daemon]\nstate = \"state.db\"\nlisten = \"127.0.0.1:{port}\"\n\
         schedule = \"{NEVER}\"\njitter = 0.0\n\n\
         [registries.\"{host}\"]\ninsecure = true\n\n\
         [[watch]]\nname = \"api\"\nimage = \"{host}/team/api:prod\"\n\n\
         [[watch]]\nname = \"other\"\nimage = \"{host}/team/other:prod\"\n\n\
         {sink}{hooks}"
    )
}

const BOTH_HOOKS: &str = "[hooks.acr]\nsecret_env = \"DRIFTWATCH_ACR_HOOK_SECRET\"\n\
                          [hooks.eventgrid]\nsecret_env = \"DRIFTWATCH_EVENTGRID_SECRET\"\n";
const ACR_ONLY: &str = "[hooks.acr]\nsecret_env = \"DRIFTWATCH_ACR_HOOK_SECRET\"\n";

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

struct Daemon {
    dir: TestDir,
    port: u16,
    _process: support::DriftwatchProcess,
    http: reqwest::Client,
}

impl Daemon {
    async fn start(registry: &Registry, sink: Option<&Receiver>) -> Daemon {
        let dir = TestDir::new();
        let port = free_port();
        dir.write_config(&config(port, registry, sink, BOTH_HOOKS));
        let process = dir.spawn(
            &["run", "--config", "driftwatch.toml"],
            &[
                ("DRIFTWATCH_LOG", "info"),
                ("DRIFTWATCH_ACR_HOOK_SECRET", ACR_SECRET),
                ("DRIFTWATCH_EVENTGRID_SECRET", GRID_SECRET),
            ],
        );
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let d = Daemon {
            dir,
            port,
            _process: process,
            http,
        };
        until(Duration::from_secs(20), "readiness", async || {
            let url = d.url("/readyz");
            let resp = d.http.get(url).send().await.ok()?;
            (resp.status() == 200).then_some(())
        })
        .await;
        d
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let resp = request.send().await.expect("the daemon answers");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("a body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
        }
    }

    /// POSTs `body` to `path`, with `Authorization: Bearer <secret>` when a secret is given.
    async fn post(
        &self,
        path: &str,
        secret: Option<&str>,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> Reply {
        let mut request = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(s) = secret {
            request = request.bearer_auth(s);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send(request).await
    }

    async fn options(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = self.http.request(reqwest::Method::OPTIONS, self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send(request).await
    }

    async fn watch(&self, name: &str) -> Value {
        let resp = self.http.get(self.url("/v1/watches")).send().await.unwrap();
        let v: Value = resp.json().await.unwrap();
        v["watches"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no watch {name} in {v}"))
    }

    /// Asks for a check of `other` through the ACR hook and waits until it is stored. Checks
    /// start in the order they were asked for, so any check a refused delivery had asked
    /// for `api` would have started before this one.
    async fn barrier(&self, other: &HookImage) {
        let before = self.watch("other").await["checked_at"].clone();
        let r = self
            .post(
                "/v1/hooks/acr",
                Some(ACR_SECRET),
                &[],
                acr_webhook_push(other).to_string(),
            )
            .await;
        assert_eq!((r.status, &r.body), (202, &json!({"triggered": ["other"]})));
        until(Duration::from_secs(10), "the check of other", async || {
            let w = self.watch("other").await;
            (w["checked_at"].is_string() && w["checked_at"] != before).then_some(())
        })
        .await;
    }
}

fn hook_image(registry: &Registry, repository: &str, manifest: &PushedManifest) -> HookImage {
    HookImage {
        host: registry.host(),
        repository: repository.to_string(),
        tag: Some("prod".to_string()),
        digest: manifest.digest.clone(),
        media_type: manifest.media_type.clone(),
        size: manifest.size,
    }
}

/// Sends a request head announcing a body over the limit, and no body: the answer must come
/// from the announced length alone, so no unread bytes make the connection reset.
async fn oversized_post(port: u16, path: &str, secret: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {secret}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        2 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn refused_deliveries_and_handshakes_trigger_no_check() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let api = push.push_image("team/api", Some("prod"), "a").await;
    let other = push.push_image("team/other", Some("prod"), "o").await;
    let api = hook_image(&registry, "team/api", &api);
    let other = hook_image(&registry, "team/other", &other);
    let d = Daemon::start(&registry, None).await;
    let acr_body = acr_webhook_push(&api).to_string();
    let grid_body = event_grid_image_pushed(&api).to_string();

    // Wrong or missing secrets: 401, whichever hook, and one hook's secret is not the other's.
    for (path, secret, body) in [
        ("/v1/hooks/acr", None, &acr_body),
        ("/v1/hooks/acr", Some("wrong"), &acr_body),
        ("/v1/hooks/acr", Some(GRID_SECRET), &acr_body),
        ("/v1/hooks/eventgrid", None, &grid_body),
        ("/v1/hooks/eventgrid", Some(ACR_SECRET), &grid_body),
    ] {
        let r = d.post(path, secret, &[], body.clone()).await;
        assert_eq!(r.status, 401, "{path} with {secret:?}: {}", r.body);
        assert!(r.body["error"].is_string(), "{}", r.body);
        assert_eq!(r.headers["www-authenticate"], "Bearer");
    }
    let basic = d
        .post(
            "/v1/hooks/acr",
            None,
            &[("authorization", &format!("Basic {ACR_SECRET}"))],
            acr_body.clone(),
        )
        .await;
    assert_eq!(basic.status, 401);

    // Malformed bodies: 400, saying what is wrong and where.
    let r = d
        .post("/v1/hooks/acr", Some(ACR_SECRET), &[], "{\"action\": ")
        .await;
    assert_eq!(r.status, 400);
    let error = r.body["error"].as_str().unwrap();
    assert!(error.starts_with("the body is not valid JSON"), "{error}");
    let r = d
        .post(
            "/v1/hooks/acr",
            Some(ACR_SECRET),
            &[],
            r#"{"action":"push","target":{"tag":"prod"}}"#,
        )
        .await;
    assert_eq!(
        (r.status, &r.body),
        (
            400,
            &json!({"error": "$.target: missing field `repository`"})
        )
    );
    let r = d
        .post(
            "/v1/hooks/eventgrid",
            Some(GRID_SECRET),
            &[],
            r#"[{"eventType":"Microsoft.ContainerRegistry.ImagePushed","data":{"target":7}}]"#,
        )
        .await;
    let error = "$[0].data.target: invalid type: integer `7`, expected an object with a repository";
    assert_eq!((r.status, &r.body), (400, &json!({ "error": error })));
    let answer = oversized_post(d.port, "/v1/hooks/eventgrid", GRID_SECRET).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // The Event Grid validation handshake needs no secret, and triggers nothing. Without the
    // header that announces it, a body from a sender without the secret is not even read.
    let code = "512d38b6-c7b8-40c8-89fe-f46f9e9622b6";
    let validation = event_grid_subscription_validation(code).to_string();
    let announced = [("aeg-event-type", "SubscriptionValidation")];
    for (headers, secret) in [(&announced[..], None), (&[][..], Some(GRID_SECRET))] {
        let r = d
            .post("/v1/hooks/eventgrid", secret, headers, validation.clone())
            .await;
        assert_eq!(
            (r.status, &r.body),
            (200, &json!({"validationResponse": code}))
        );
    }
    let r = d
        .post("/v1/hooks/eventgrid", None, &[], validation.clone())
        .await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = d
        .post(
            "/v1/hooks/eventgrid",
            None,
            &[("aeg-event-type", "SubscriptionValidation")],
            grid_body.clone(),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = d
        .options(
            "/v1/hooks/eventgrid",
            &[
                ("WebHook-Request-Origin", "eventgrid.azure.net"),
                ("WebHook-Request-Rate", "120"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["webhook-allowed-origin"], "eventgrid.azure.net");
    assert_eq!(r.headers["webhook-allowed-rate"], "*");
    let r = d
        .options(
            "/v1/hooks/eventgrid",
            &[("WebHook-Request-Origin", "eventgrid.azure.net")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("webhook-allowed-rate"));
    assert_eq!(d.options("/v1/hooks/eventgrid", &[]).await.status, 400);

    d.barrier(&other).await;
    assert_eq!(d.watch("api").await["checked_at"], Value::Null);

    // Secrets are read from the config in force: without [hooks.eventgrid] the route is gone.
    d.dir
        .write_config(&config(d.port, &registry, None, ACR_ONLY));
    let origin = [("WebHook-Request-Origin", "eventgrid.azure.net")];
    until(Duration::from_secs(20), "the reload", async || {
        (d.options("/v1/hooks/eventgrid", &origin).await.status == 404).then_some(())
    })
    .await;
    let r = d
        .post(
            "/v1/hooks/eventgrid",
            Some(GRID_SECRET),
            &[],
            grid_body.clone(),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = d
        .post("/v1/hooks/eventgrid", None, &[], validation.clone())
        .await;
    assert_eq!(r.status, 404, "{}", r.body);

    d.barrier(&other).await;
    assert_eq!(d.watch("api").await["checked_at"], Value::Null);
}

/// Waits for the sink's next delivery and checks it is the move to `to`, detected by a
/// webhook, delivered within a second of `posted`.
async fn assert_moved_within_a_second(receiver: &Receiver, n: usize, posted: Instant, to: &str) {
    let received = receiver.wait_for_async(n, Duration::from_secs(10)).await;
    let delivery = &received[n - 1];
    let event = delivery.json();
    assert_eq!(event["type"], "driftwatch.tag.moved", "{event}");
    assert_eq!(event["data"]["detected_by"], "webhook", "{event}");
    assert_eq!(event["data"]["current"]["digest"], to, "{event}");
    let took = delivery.at.saturating_duration_since(posted);
    assert!(
        took <= Duration::from_secs(1),
        "the alert arrived {took:?} after the hook"
    );
}

#[tokio::test]
async fn a_push_announced_by_each_hook_schema_is_alerted_within_a_second() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let receiver = Receiver::start();
    let a = push.push_image("team/api", Some("prod"), "a").await;
    let d = Daemon::start(&registry, Some(&receiver)).await;

    // The first push notice gives the watch its baseline (not alerted by default).
    let r = d
        .post(
            "/v1/hooks/acr",
            Some(ACR_SECRET),
            &[],
            acr_webhook_push(&hook_image(&registry, "team/api", &a)).to_string(),
        )
        .await;
    assert_eq!((r.status, &r.body), (202, &json!({"triggered": ["api"]})));
    until(Duration::from_secs(10), "the baseline", async || {
        (d.watch("api").await["digest"] == a.digest).then_some(())
    })
    .await;
    assert_eq!(d.watch("other").await["checked_at"], Value::Null);

    // An ACR webhook.
    let b = push.push_image("team/api", Some("prod"), "b").await;
    let body = acr_webhook_push(&hook_image(&registry, "team/api", &b)).to_string();
    let posted = Instant::now();
    let r = d.post("/v1/hooks/acr", Some(ACR_SECRET), &[], body).await;
    assert_eq!((r.status, &r.body), (202, &json!({"triggered": ["api"]})));
    assert_moved_within_a_second(&receiver, 1, posted, &b.digest).await;

    // An Event Grid-schema delivery.
    let c = push.push_image("team/api", Some("prod"), "c").await;
    let body = event_grid_image_pushed(&hook_image(&registry, "team/api", &c)).to_string();
    let posted = Instant::now();
    let notification = [("aeg-event-type", "Notification")];
    let r = d
        .post(
            "/v1/hooks/eventgrid",
            Some(GRID_SECRET),
            &notification,
            body,
        )
        .await;
    assert_eq!((r.status, &r.body), (202, &json!({"triggered": ["api"]})));
    assert_moved_within_a_second(&receiver, 2, posted, &c.digest).await;

    // A CloudEvents 1.0 delivery.
    let e = push.push_image("team/api", Some("prod"), "e").await;
    let body = cloud_event_image_pushed(&hook_image(&registry, "team/api", &e)).to_string();
    let posted = Instant::now();
    let r = d
        .send(
            d.http
                .post(d.url("/v1/hooks/eventgrid"))
                .bearer_auth(GRID_SECRET)
                .header(
                    "content-type",
                    "application/cloudevents+json; charset=utf-8",
                )
                .body(body),
        )
        .await;
    assert_eq!((r.status, &r.body), (202, &json!({"triggered": ["api"]})));
    assert_moved_within_a_second(&receiver, 3, posted, &e.digest).await;

    // A push elsewhere in the registry concerns no watch.
    let mut unrelated = hook_image(&registry, "team/api", &e);
    unrelated.tag = Some("canary".to_string());
    let r = d
        .post(
            "/v1/hooks/acr",
            Some(ACR_SECRET),
            &[],
            acr_webhook_push(&unrelated).to_string(),
        )
        .await;
    assert_eq!((r.status, &r.body), (202, &json!({"triggered": []})));
    assert_eq!(d.watch("other").await["checked_at"], Value::Null);
}
