//! OpenTelemetry export against a real in-process OTLP receiver, over gRPC and HTTP/protobuf:
//! drift events as log records, metrics, spans with their parents, and a collector that is
//! down costing the caller nothing but a bounded shutdown.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use driftwatch::config::Otel;
use driftwatch::event::{Change, DetectedBy, Envelope, EnvelopeContext, EventType, StateSummary};
use driftwatch::model::Digest;
use driftwatch::telemetry::{
    self, CheckOutcome, DeliveryOutcome, ReloadOutcome, Settings, Telemetry,
};
use support::otlp::{OtlpReceiver, Transport, attr_int, attr_strings};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Generous: a loaded 2-core CI machine is slow, and polling returns as soon as data is in.
const ARRIVAL: Duration = Duration::from_secs(20);
/// What a test allows `Telemetry::shutdown` when the collector is unreachable.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(2);

fn start_at(endpoint: String, protocol: &str) -> Telemetry {
    let otel = Otel {
        endpoint: Some(endpoint),
        protocol: Some(protocol.to_string()),
    };
    // An empty environment: what the test says is what is used.
    let settings = Settings::resolve(&otel, &|_| None)
        .expect("valid settings")
        .expect("an endpoint is set");
    Telemetry::start(settings).expect("telemetry starts")
}

fn start(receiver: &OtlpReceiver, transport: Transport) -> Telemetry {
    match transport {
        Transport::Grpc => start_at(receiver.grpc_endpoint(), "grpc"),
        Transport::Http => start_at(receiver.http_endpoint(), "http/protobuf"),
    }
}

fn state(digest: &Digest) -> StateSummary {
    StateSummary {
        digest: digest.clone(),
        media_type: "application/vnd.oci.image.index.v1+json".to_string(),
        platforms: Vec::new(),
        referrers: Vec::new(),
    }
}

fn envelope(change: Change, tag: Option<&str>, labels: &BTreeMap<String, String>) -> Envelope {
    Envelope::new(
        change,
        &EnvelopeContext {
            source: "driftwatch://test-host",
            watch: "api-prod",
            registry: "127.0.0.1:5000",
            repository: "team/api",
            tag,
            labels,
            detected_by: DetectedBy::Poll,
            time: Utc::now(),
        },
    )
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("team".to_string(), "payments".to_string()),
        ("env".to_string(), "prod".to_string()),
    ])
}

/// `tag.moved` of `127.0.0.1:5000/team/api:prod`, with two labels.
fn moved() -> (Envelope, Digest, Digest) {
    let (from, to) = (Digest::sha256_of(b"old"), Digest::sha256_of(b"new"));
    let mut change = Change::new(EventType::TagMoved, "127.0.0.1:5000/team/api:prod");
    change.previous = Some(state(&from));
    change.current = Some(state(&to));
    change.detail = serde_json::json!({"from": from.to_string(), "to": to.to_string()});
    (envelope(change, Some("prod"), &labels()), from, to)
}

/// `digest.deleted` of a pinned digest: critical, no tag, only a previous state.
fn digest_deleted() -> (Envelope, Digest) {
    let gone = Digest::sha256_of(b"gone");
    let mut change = Change::new(
        EventType::DigestDeleted,
        format!("127.0.0.1:5000/team/api@{gone}"),
    );
    change.previous = Some(state(&gone));
    (envelope(change, None, &BTreeMap::new()), gone)
}

fn events_arrive_as_log_records(transport: Transport) {
    let receiver = OtlpReceiver::start();
    let telemetry = start(&receiver, transport);
    let (event, from, to) = moved();
    let (deleted, gone) = digest_deleted();
    telemetry.emit_event(&event);
    telemetry.emit_event(&deleted);
    telemetry.force_flush().expect("flush");

    let log = receiver.wait_for_log("driftwatch.tag.moved", ARRIVAL);
    assert_eq!(log.origin.transport, transport);
    assert_eq!(log.origin.scope, "driftwatch");
    assert_eq!(log.origin.resource_str("service.name"), Some("driftwatch"));
    assert_eq!(log.record.severity_number, 13, "warning is WARN");
    assert_eq!(log.record.severity_text, "warning");
    assert!(log.record.time_unix_nano > 0);
    let body = log.body().expect("a string body");
    assert!(
        body.starts_with("tag.moved 127.0.0.1:5000/team/api:prod: sha256:"),
        "{body}"
    );
    assert!(!body.contains('\n'), "one line: {body}");

    let attrs = &log.record.attributes;
    assert_eq!(
        log.str("container.image.name"),
        Some("127.0.0.1:5000/team/api")
    );
    assert_eq!(
        attr_strings(attrs, "container.image.tags"),
        Some(vec!["prod".to_string()])
    );
    assert_eq!(
        log.str("oci.manifest.digest"),
        Some(to.to_string().as_str())
    );
    assert_eq!(log.str("server.address"), Some("127.0.0.1"));
    assert_eq!(attr_int(attrs, "server.port"), Some(5000));
    assert_eq!(log.str("driftwatch.watch"), Some("api-prod"));
    assert_eq!(
        log.str("driftwatch.previous_digest"),
        Some(from.to_string().as_str())
    );
    assert_eq!(log.str("driftwatch.event_id"), Some(event.id.as_str()));
    assert_eq!(log.str("driftwatch.severity"), Some("warning"));
    assert_eq!(log.str("driftwatch.label.team"), Some("payments"));
    assert_eq!(log.str("driftwatch.label.env"), Some("prod"));
    assert_eq!(
        log.str("cloudevents.event_type"),
        Some("driftwatch.tag.moved")
    );
    assert!(
        log.str("driftwatch.detail")
            .is_some_and(|d| d.contains("\"to\""))
    );

    let critical = receiver.wait_for_log("driftwatch.digest.deleted", ARRIVAL);
    assert_eq!(critical.record.severity_number, 17, "critical is ERROR");
    assert_eq!(critical.record.severity_text, "critical");
    assert_eq!(
        attr_strings(&critical.record.attributes, "container.image.tags"),
        None
    );
    assert_eq!(
        critical.str("oci.manifest.digest"),
        Some(gone.to_string().as_str()),
        "without a current state the previous digest is the one concerned"
    );

    // Exactly one record per event, and each is counted by type.
    let copies = receiver
        .logs()
        .iter()
        .filter(|l| l.str("driftwatch.event_id") == Some(event.id.as_str()))
        .count();
    assert_eq!(copies, 1);
    let counted = receiver.wait_for_metric("driftwatch.events", ARRIVAL);
    assert_eq!(counted.unit(), "{event}");
    let moved = counted.point(&[("event.type", "driftwatch.tag.moved")]);
    assert_eq!(moved.map(|p| p.number()), Some(1.0));

    telemetry
        .shutdown(Duration::from_secs(10))
        .expect("clean shutdown");
}

#[test]
fn events_arrive_as_log_records_over_grpc() {
    events_arrive_as_log_records(Transport::Grpc);
}

#[test]
fn events_arrive_as_log_records_over_http() {
    events_arrive_as_log_records(Transport::Http);
}

fn metrics_arrive_with_names_units_and_bounded_attributes(transport: Transport) {
    let receiver = OtlpReceiver::start();
    let telemetry = start(&receiver, transport);
    let m = telemetry.metrics().clone();
    m.check(CheckOutcome::Ok, Duration::from_millis(40));
    m.check(CheckOutcome::Ok, Duration::from_millis(60));
    m.check(CheckOutcome::Failed, Duration::from_secs(3));
    m.registry_request("127.0.0.1:5000", "HEAD", Some(200));
    m.registry_request("127.0.0.1:5000", "GET", Some(404));
    m.registry_request("127.0.0.1:5000", "HEAD", None);
    m.watches(3, 1);
    m.outbox(4, 1);
    m.delivery("sre-hook", DeliveryOutcome::Retry);
    m.delivery("sre-hook", DeliveryOutcome::Delivered);
    m.token_refresh("127.0.0.1:5000");
    m.config_reload(ReloadOutcome::Failed);
    telemetry.force_flush().expect("flush");

    let expected = [
        ("driftwatch.checks", "{check}", "sum"),
        ("driftwatch.check.duration", "s", "histogram"),
        ("driftwatch.registry.requests", "{request}", "sum"),
        ("driftwatch.watches", "{watch}", "gauge"),
        ("driftwatch.outbox.pending", "{row}", "gauge"),
        ("driftwatch.outbox.dead", "{row}", "gauge"),
        ("driftwatch.deliveries", "{attempt}", "sum"),
        ("driftwatch.token.refreshes", "{refresh}", "sum"),
        ("driftwatch.config.reloads", "{reload}", "sum"),
    ];
    for (name, unit, kind) in expected {
        let metric = receiver.wait_for_metric(name, ARRIVAL);
        assert_eq!(metric.origin.transport, transport);
        assert_eq!((metric.unit(), metric.kind()), (unit, kind), "{name}");
    }
    let number = |name: &str, want: &[(&str, &str)]| {
        receiver
            .wait_for_metric(name, ARRIVAL)
            .point(want)
            .unwrap_or_else(|| panic!("{name} has no point with {want:?}"))
            .number()
    };
    assert_eq!(number("driftwatch.checks", &[("outcome", "ok")]), 2.0);
    assert_eq!(number("driftwatch.checks", &[("outcome", "failed")]), 1.0);
    assert_eq!(
        number("driftwatch.check.duration", &[("outcome", "ok")]),
        2.0
    );
    let head_ok = [
        ("server.address", "127.0.0.1"),
        ("http.request.method", "HEAD"),
        ("http.response.status_class", "2xx"),
    ];
    assert_eq!(number("driftwatch.registry.requests", &head_ok), 1.0);
    let no_answer = [("http.response.status_class", "error")];
    assert_eq!(number("driftwatch.registry.requests", &no_answer), 1.0);
    let get_404 = [
        ("http.request.method", "GET"),
        ("http.response.status_class", "4xx"),
    ];
    assert_eq!(number("driftwatch.registry.requests", &get_404), 1.0);
    assert_eq!(number("driftwatch.watches", &[("state", "ok")]), 3.0);
    assert_eq!(number("driftwatch.watches", &[("state", "failing")]), 1.0);
    assert_eq!(number("driftwatch.outbox.pending", &[]), 4.0);
    assert_eq!(number("driftwatch.outbox.dead", &[]), 1.0);
    let retried = [("sink", "sre-hook"), ("outcome", "retry")];
    assert_eq!(number("driftwatch.deliveries", &retried), 1.0);
    let refreshed = [("server.address", "127.0.0.1")];
    assert_eq!(number("driftwatch.token.refreshes", &refreshed), 1.0);
    assert_eq!(
        number("driftwatch.config.reloads", &[("outcome", "failed")]),
        1.0
    );

    let requests = receiver.wait_for_metric("driftwatch.registry.requests", ARRIVAL);
    let port = requests
        .point(&head_ok)
        .map(|p| attr_int(&p.attributes, "server.port"));
    assert_eq!(port, Some(Some(5000)));
    let histogram = receiver.wait_for_metric("driftwatch.check.duration", ARRIVAL);
    let failed = histogram
        .point(&[("outcome", "failed")])
        .expect("a failed point");
    assert_eq!(
        failed.value,
        support::otlp::PointValue::Histogram {
            count: 1,
            sum: Some(3.0)
        }
    );

    telemetry
        .shutdown(Duration::from_secs(10))
        .expect("clean shutdown");
}

#[test]
fn metrics_arrive_with_names_units_and_bounded_attributes_over_grpc() {
    metrics_arrive_with_names_units_and_bounded_attributes(Transport::Grpc);
}

#[test]
fn metrics_arrive_with_names_units_and_bounded_attributes_over_http() {
    metrics_arrive_with_names_units_and_bounded_attributes(Transport::Http);
}

fn check_spans_arrive_with_their_children(transport: Transport) {
    let receiver = OtlpReceiver::start();
    let telemetry = start(&receiver, transport);
    let layer = telemetry
        .layer(EnvFilter::new("info"))
        .expect("export is on");
    let subscriber = tracing_subscriber::registry().with(layer);
    let (event, _, _) = moved();
    // The same shape as a cycle: driftwatch's debug spans, a log line inside, a drift event
    // emitted while the check's span is current, and chatter from the export plumbing.
    tracing::subscriber::with_default(subscriber, || {
        let check = tracing::debug_span!(
            target: "driftwatch::cycle",
            "check_watch",
            watch.name = "api-prod",
            image.ref = "127.0.0.1:5000/team/api:prod",
        );
        let _entered = check.enter();
        let resolve = tracing::debug_span!(
            target: "driftwatch::cycle",
            "resolve",
            image.ref = "127.0.0.1:5000/team/api:prod",
        );
        resolve.in_scope(|| tracing::info!(target: "driftwatch::resolve", "resolved in test"));
        telemetry.emit_event(&event);
        tracing::warn!(target: "opentelemetry_sdk", "sdk plumbing in test");
        tracing::warn!(target: "hyper::proto", "http plumbing in test");
    });
    telemetry.force_flush().expect("flush");

    let check = receiver.wait_for_spans("check_watch", 1, ARRIVAL).remove(0);
    let resolve = receiver.wait_for_spans("resolve", 1, ARRIVAL).remove(0);
    assert_eq!(check.origin.transport, transport);
    assert_eq!(
        check.origin.resource_str("service.name"),
        Some("driftwatch")
    );
    assert_eq!(check.str("watch.name"), Some("api-prod"));
    assert_eq!(check.str("image.ref"), Some("127.0.0.1:5000/team/api:prod"));
    assert_eq!(check.parent_span_id(), "", "check_watch is a root span");
    assert_eq!(resolve.trace_id(), check.trace_id());
    assert_eq!(resolve.parent_span_id(), check.span_id());

    // Trace context in the logs: the log line and the drift event belong to the check.
    let line = receiver.wait_for_log_where("\"resolved in test\"", ARRIVAL, |l| {
        l.body() == Some("resolved in test")
    });
    assert_eq!(line.trace_id(), check.trace_id());
    assert_eq!(line.span_id(), resolve.span_id());
    let drift = receiver.wait_for_log("driftwatch.tag.moved", ARRIVAL);
    assert_eq!(drift.trace_id(), check.trace_id());

    // The exporters' own stacks are never exported: it would feed failures back into export.
    let plumbing: Vec<_> = receiver
        .logs()
        .into_iter()
        .filter(|l| l.body().is_some_and(|b| b.contains("plumbing in test")))
        .collect();
    assert!(plumbing.is_empty(), "exported: {plumbing:?}");

    telemetry
        .shutdown(Duration::from_secs(10))
        .expect("clean shutdown");
}

#[test]
fn check_spans_arrive_with_their_children_over_grpc() {
    check_spans_arrive_with_their_children(Transport::Grpc);
}

#[test]
fn check_spans_arrive_with_their_children_over_http() {
    check_spans_arrive_with_their_children(Transport::Http);
}

fn a_collector_that_is_down_costs_nothing(protocol: &str) {
    // A bound but not listening port: connections are refused, and no other test can take it.
    let reserved = support::receiver::reserve_port(0).expect("reserve a port");
    let port = reserved.local_addr().expect("reserved address").port();
    let telemetry = start_at(format!("http://127.0.0.1:{port}"), protocol);
    let layer = telemetry
        .layer(EnvFilter::new("info"))
        .expect("export is on");
    let subscriber = tracing_subscriber::registry().with(layer);
    let (event, _, _) = moved();
    let metrics = telemetry.metrics().clone();

    tracing::subscriber::with_default(subscriber, || {
        for i in 0..10_000u32 {
            let span = tracing::debug_span!(target: "driftwatch::cycle", "check_watch", i);
            let _entered = span.enter();
            telemetry.emit_event(&event);
            metrics.check(CheckOutcome::Ok, Duration::from_millis(5));
            metrics.registry_request("127.0.0.1:5000", "HEAD", Some(200));
            metrics.delivery("sre-hook", DeliveryOutcome::Retry);
        }
    });

    // Whatever could not be sent is given up on within the bound; an error is expected.
    let started = Instant::now();
    let outcome = telemetry.shutdown(SHUTDOWN_BOUND);
    let took = started.elapsed();
    assert!(
        took < SHUTDOWN_BOUND + Duration::from_secs(2),
        "shutdown took {took:?} with a {SHUTDOWN_BOUND:?} bound ({outcome:?})"
    );
    // A second shutdown, e.g. from another clone, returns at once.
    assert!(telemetry.shutdown(SHUTDOWN_BOUND).is_ok());
    drop(reserved);
}

#[test]
fn a_collector_that_is_down_costs_nothing_over_grpc() {
    a_collector_that_is_down_costs_nothing("grpc");
}

#[test]
fn a_collector_that_is_down_costs_nothing_over_http() {
    a_collector_that_is_down_costs_nothing("http/protobuf");
}

/// A `MakeWriter` that keeps what the fmt layer writes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn sdk_warnings_reach_the_stderr_log_once_per_interval() {
    let captured = Capture::default();
    let writer = captured.clone();
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_filter(telemetry::stderr_filter(EnvFilter::new("info")));
    let subscriber = tracing_subscriber::registry().with(stderr);
    tracing::subscriber::with_default(subscriber, || {
        for _ in 0..100 {
            tracing::warn!(target: "opentelemetry_sdk", "export failed in test");
            tracing::warn!(target: "driftwatch::cycle", "check failed in test");
            tracing::debug!(target: "opentelemetry_sdk", "below the level in test");
        }
    });
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert_eq!(text.matches("export failed in test").count(), 1, "{text}");
    assert_eq!(text.matches("check failed in test").count(), 100);
    assert_eq!(text.matches("below the level in test").count(), 0);
}

#[test]
fn without_an_endpoint_there_is_no_layer_and_nothing_to_flush() {
    let telemetry = Telemetry::disabled();
    let layer = telemetry.layer::<tracing_subscriber::Registry>(EnvFilter::new("info"));
    assert!(layer.is_none());
    let (event, _, _) = moved();
    telemetry.emit_event(&event);
    telemetry
        .metrics()
        .check(CheckOutcome::Ok, Duration::from_millis(1));
    telemetry.force_flush().expect("nothing to flush");
    telemetry.shutdown(SHUTDOWN_BOUND).expect("nothing to stop");
    let disabled = Otel {
        endpoint: Some("http://127.0.0.1:4318".to_string()),
        protocol: None,
    };
    let off = Settings::resolve(&disabled, &|k| {
        (k == "OTEL_SDK_DISABLED").then(|| "true".into())
    });
    assert_eq!(off.expect("valid"), None);
}

/// Set (to an OTLP endpoint) in the child process of
/// [`nothing_is_fed_to_pipelines_that_were_shut_down`].
const SHUTDOWN_CHILD: &str = "DRIFTWATCH_TEST_SHUTDOWN_CHILD";

/// The child's half: owns the global subscriber as `main` does, which only a process of its
/// own can. In the normal test run it does nothing.
#[test]
fn child_process_of_the_shutdown_test() {
    let Some(endpoint) = std::env::var_os(SHUTDOWN_CHILD) else {
        return;
    };
    let telemetry = start_at(endpoint.into_string().unwrap(), "http/protobuf");
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_filter(telemetry::stderr_filter(EnvFilter::new("info")));
    let exported = telemetry
        .layer(EnvFilter::new("info"))
        .expect("export is on");
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(stderr).with(exported),
    )
    .expect("the child's only subscriber");
    // One call site used before and after shutdown, as main's and the daemon's are.
    let log =
        |when: &str| tracing::warn!(target: "driftwatch", when, "logged in the shutdown test");
    log("before");
    telemetry
        .shutdown(Duration::from_secs(10))
        .expect("clean shutdown");
    log("after");
    let span = tracing::debug_span!(target: "driftwatch::cycle", "check_watch");
    span.in_scope(|| telemetry.emit_event(&moved().0));
}

#[test]
fn nothing_is_fed_to_pipelines_that_were_shut_down() {
    let receiver = OtlpReceiver::start();
    let exe = std::env::current_exe().expect("the test binary");
    let child = std::process::Command::new(exe)
        .args([
            "--exact",
            "child_process_of_the_shutdown_test",
            "--nocapture",
        ])
        .env(SHUTDOWN_CHILD, receiver.http_endpoint())
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(child.status.success(), "child failed:\n{stderr}");
    assert!(stderr.contains("when=\"after\""), "{stderr}");
    // A stopped pipeline warns about each record it is handed; it must be handed none.
    assert!(
        !stderr.contains("AfterShutdown"),
        "the SDK complained:\n{stderr}"
    );
    let exported: Vec<_> = receiver
        .logs()
        .iter()
        .filter_map(|l| l.str("when").map(str::to_string))
        .collect();
    assert_eq!(exported, ["before"]);
}
