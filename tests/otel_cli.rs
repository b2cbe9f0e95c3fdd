//! `driftwatch check` and `run` exporting to a real OTLP receiver: a tag that moves in a real
//! registry arrives as a log record, each check as spans with children, and the metrics.

mod support;

use std::time::{Duration, Instant};

use support::otlp::OtlpReceiver;
use support::{Registry, TestDir};

const ARRIVAL: Duration = Duration::from_secs(20);

fn config(registry: &Registry, endpoint: &str, protocol: &str) -> String {
    format!(
        "[daemon]\nstate = \"state.db\"\n\n[registries.\"{host}\"]\ninsecure = true\n\n\
         [otel]\nendpoint = \"{endpoint}\"\nprotocol = \"{protocol}\"\n\n\
         [[watch]]\nname = \"api-prod\"\nimage = \"{host}/team/api:prod\"\n\
         labels = {{ team = \"payments\" }}\n",
        host = registry.host()
    )
}

fn check(dir: &TestDir) {
    let out = dir.run(&["check", "--config", "driftwatch.toml"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check failed:\n{stderr}");
}

async fn a_moved_tag_is_exported(protocol: &str) {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let receiver = OtlpReceiver::start();
    let endpoint = match protocol {
        "grpc" => receiver.grpc_endpoint(),
        _ => receiver.http_endpoint(),
    };
    push.push_image("team/api", Some("prod"), "a").await;
    let dir = TestDir::new();
    dir.write_config(&config(&registry, &endpoint, protocol));
    check(&dir);
    let b = push.push_image("team/api", Some("prod"), "b").await;
    check(&dir);

    let log = receiver.wait_for_log("driftwatch.tag.moved", ARRIVAL);
    assert_eq!(log.str("oci.manifest.digest"), Some(b.digest.as_str()));
    assert_eq!(log.str("driftwatch.label.team"), Some("payments"));

    let cycles = receiver.wait_for_spans("check_cycle", 2, ARRIVAL);
    let ids: Vec<String> = cycles.iter().map(|s| s.span_id()).collect();
    let watches = receiver.wait_for_spans("check_watch", 2, ARRIVAL);
    assert!(watches.iter().all(|w| ids.contains(&w.parent_span_id())));
    let commits = receiver.wait_for_spans("store_commit", 2, ARRIVAL);
    assert!(commits.iter().all(|c| ids.contains(&c.parent_span_id())));
    let heads = receiver.wait_for_spans("HEAD", 2, ARRIVAL);
    assert!(
        heads
            .iter()
            .all(|h| h.str("http.request.method") == Some("HEAD"))
    );

    let checks = receiver.wait_for_metric("driftwatch.checks", ARRIVAL);
    assert!(checks.point(&[("outcome", "ok")]).is_some());
    let requests = receiver.wait_for_metric("driftwatch.registry.requests", ARRIVAL);
    assert!(
        requests
            .point(&[("http.response.status_class", "2xx")])
            .is_some()
    );
}

#[tokio::test]
async fn a_moved_tag_is_exported_over_grpc() {
    a_moved_tag_is_exported("grpc").await;
}

#[tokio::test]
async fn a_moved_tag_is_exported_over_http() {
    a_moved_tag_is_exported("http/protobuf").await;
}

#[tokio::test]
async fn a_collector_that_is_down_delays_exit_by_at_most_the_shutdown_bound() {
    let registry = Registry::start().await;
    registry
        .pusher()
        .push_image("team/api", Some("prod"), "a")
        .await;
    // Bound but not listening: connections are refused.
    let reserved = support::receiver::reserve_port(0).unwrap();
    let port = reserved.local_addr().unwrap().port();
    let dir = TestDir::new();
    dir.write_config(&config(
        &registry,
        &format!("http://127.0.0.1:{port}"),
        "grpc",
    ));
    let started = Instant::now();
    check(&dir);
    // main's telemetry shutdown bound (3 s) plus the check itself, on a loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_daemon_exports_and_flushes_on_sigterm() {
    let registry = Registry::start().await;
    registry
        .pusher()
        .push_image("team/api", Some("prod"), "a")
        .await;
    let receiver = OtlpReceiver::start();
    let dir = TestDir::new();
    let port = support::registry::free_port();
    dir.write_config(&format!(
        "[daemon]\nstate = \"state.db\"\nlisten = \"127.0.0.1:{port}\"\n\
         schedule = \"* * * * * *\"\njitter = 0.0\n\n\
         [registries.\"{host}\"]\ninsecure = true\n\n[otel]\nendpoint = \"{endpoint}\"\n\n\
         [[watch]]\nname = \"api-prod\"\nimage = \"{host}/team/api:prod\"\n",
        host = registry.host(),
        endpoint = receiver.http_endpoint(),
    ));
    let env = [("OTEL_METRIC_EXPORT_INTERVAL", "1000")];
    let mut daemon = dir.spawn(&["run", "--config", "driftwatch.toml"], &env);
    let log = receiver.wait_for_log("driftwatch.tag.created", ARRIVAL);
    assert_eq!(log.str("driftwatch.watch"), Some("api-prod"));
    let checks = receiver.wait_for_metric("driftwatch.checks", ARRIVAL);
    assert!(checks.point(&[("outcome", "ok")]).is_some());
    daemon.terminate();
    let status = daemon.wait_timeout(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    receiver.wait_for_metric("driftwatch.watches", ARRIVAL);
    receiver.wait_for_spans("check_cycle", 1, ARRIVAL);
}
