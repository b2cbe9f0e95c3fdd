//! OpenTelemetry in one place: drift events as OTLP log records, the daemon's health as
//! metrics, and `tracing` spans as traces, over gRPC or HTTP/protobuf. Without an endpoint
//! nothing is built and every call is a cheap no-op; with one, export runs on the SDK's own
//! threads behind bounded queues, so a slow or absent collector never holds up a check.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _};
use opentelemetry::metrics::{Counter, Gauge, Histogram, MeterProvider as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{InstrumentationScope, Key, KeyValue};
use opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge;
use opentelemetry_otlp::{ExporterBuildError, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::{BatchLogProcessor, SdkLogger, SdkLoggerProvider};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::resource::TelemetryResourceDetector;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::registry::LookupSpan;

use crate::config::Otel;
use crate::event::{Envelope, EventType, Severity};

/// The `service.name` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` say otherwise.
pub const DEFAULT_SERVICE_NAME: &str = "driftwatch";
/// How often the SDK's own warnings (a collector that is down, a full queue) may reach the
/// stderr log, per call site. Repeats within the interval are dropped.
pub const SDK_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Records waiting for export per signal; beyond it new ones are dropped, not waited for.
const QUEUE_SIZE: usize = 2048;
/// Records per OTLP request.
const BATCH_SIZE: usize = 512;
/// How long log records (drift events among them) wait before they are sent.
const LOG_DELAY: Duration = Duration::from_secs(1);
/// How long finished spans wait before they are sent.
const SPAN_DELAY: Duration = Duration::from_secs(5);
/// Metrics are collected and sent this often unless `OTEL_METRIC_EXPORT_INTERVAL` is set:
/// twice a minute, so a dashboard's one-minute rate always has two points.
const METRIC_INTERVAL: Duration = Duration::from_secs(30);
/// Bucket bounds of `driftwatch.check.duration`, in seconds: a HEAD answers in tens of
/// milliseconds, a check that waits for retries or `Retry-After` takes tens of seconds.
const CHECK_DURATION_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// What becomes a span: driftwatch's own spans (`check_watch`, `resolve` are debug spans)
/// and whatever libraries announce at info.
const TRACE_FILTER: &str = "info,driftwatch=debug";
/// Targets never exported through the OTel layers: the HTTP and gRPC stacks the exporters
/// use, and the SDK itself. Exporting their logs would feed each failed export back into
/// the next one.
const EXPORT_PLUMBING: &[&str] = &["hyper", "h2", "tonic", "tower", "reqwest", "opentelemetry"];
/// Distinct event names outside [`EventType`] that are kept (e.g. `driftwatch.test`); more
/// are reported as [`OTHER_EVENT`], which keeps names and metric attributes bounded.
const MAX_EXTRA_EVENT_NAMES: usize = 32;
const OTHER_EVENT: &str = "driftwatch.other";

/// What can go wrong setting up or tearing down export.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `[otel] protocol` or `OTEL_EXPORTER_OTLP_PROTOCOL` names a protocol not built in.
    #[error(
        "unsupported OTLP protocol {value:?} in {origin} (expected \"http/protobuf\" or \"grpc\")"
    )]
    Protocol {
        /// The value given.
        value: String,
        /// Where it came from: the config key or the environment variable.
        origin: &'static str,
    },
    /// The endpoint is not an http(s) URL.
    #[error(
        "invalid OTLP endpoint {endpoint:?} in {origin}: expected e.g. \"http://127.0.0.1:4318\""
    )]
    Endpoint {
        /// The value given.
        endpoint: String,
        /// Where it came from.
        origin: &'static str,
    },
    /// The SDK refused the exporter's settings.
    #[error("cannot build the OTLP {signal} exporter")]
    Exporter {
        /// `logs`, `metrics` or `traces`.
        signal: &'static str,
        /// The SDK's reason.
        #[source]
        source: ExporterBuildError,
    },
    /// The small runtime that drives the gRPC channels could not start.
    #[error("cannot start the OTLP gRPC runtime")]
    Runtime(#[source] std::io::Error),
    /// A flush did not complete; what was pending may be lost.
    #[error("flushing telemetry failed: {0}")]
    Flush(String),
    /// Shutdown did not flush everything within its bound.
    #[error("telemetry shutdown incomplete: {0}")]
    Shutdown(String),
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Protobuf over HTTP (port 4318); `/v1/logs`, `/v1/metrics`, `/v1/traces` are appended
    /// to the base URL. The default, as in the OTLP exporter specification.
    HttpProtobuf,
    /// gRPC (port 4317); the endpoint is used as is.
    Grpc,
}

impl Protocol {
    fn parse(value: &str, origin: &'static str) -> Result<Protocol, TelemetryError> {
        match value.trim() {
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            "grpc" => Ok(Protocol::Grpc),
            other => Err(TelemetryError::Protocol {
                value: other.to_string(),
                origin,
            }),
        }
    }
}

/// Where and how to export, resolved from `[otel]` and the `OTEL_*` environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The transport.
    pub protocol: Protocol,
    /// The full URL (HTTP) or endpoint (gRPC) for log records.
    pub logs_endpoint: String,
    /// The same for metrics.
    pub metrics_endpoint: String,
    /// The same for spans.
    pub traces_endpoint: String,
    /// The resource's `service.name`.
    pub service_name: String,
    /// Further resource attributes, from `OTEL_RESOURCE_ATTRIBUTES`.
    pub resource_attributes: Vec<(String, String)>,
    /// How often metrics are sent: `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds), else
    /// 30 s.
    pub metric_interval: Duration,
}

impl Settings {
    /// Resolves the settings with `env` as the environment; `None` means nothing is to be
    /// exported (no endpoint, or `OTEL_SDK_DISABLED=true`).
    ///
    /// The config's `endpoint` and `protocol` win over `OTEL_EXPORTER_OTLP_ENDPOINT` and
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, as code wins over the environment in the OTel SDKs.
    /// When the endpoint comes from the environment, `OTEL_EXPORTER_OTLP_LOGS_ENDPOINT` (and
    /// `_METRICS_`, `_TRACES_`) override it per signal, used as given.
    pub fn resolve(
        otel: &Otel,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Settings>, TelemetryError> {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let (base, origin) = match (&otel.endpoint, var("OTEL_EXPORTER_OTLP_ENDPOINT")) {
            (Some(e), _) => (e.clone(), "otel.endpoint"),
            (None, Some(e)) => (e, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            (None, None) => return Ok(None),
        };
        check_endpoint(&base, origin)?;
        let protocol = match (&otel.protocol, var("OTEL_EXPORTER_OTLP_PROTOCOL")) {
            (Some(p), _) => Protocol::parse(p, "otel.protocol")?,
            (None, Some(p)) => Protocol::parse(&p, "OTEL_EXPORTER_OTLP_PROTOCOL")?,
            (None, None) => Protocol::HttpProtobuf,
        };
        let from_config = otel.endpoint.is_some();
        let endpoint = |signal_var: &'static str, path: &str| -> Result<String, TelemetryError> {
            if !from_config && let Some(e) = var(signal_var) {
                check_endpoint(&e, signal_var)?;
                return Ok(e);
            }
            Ok(match protocol {
                Protocol::HttpProtobuf => format!("{}{path}", base.trim_end_matches('/')),
                Protocol::Grpc => base.clone(),
            })
        };

        let mut resource_attributes = var("OTEL_RESOURCE_ATTRIBUTES")
            .map(|v| parse_resource_attributes(&v))
            .unwrap_or_default();
        let from_attributes = resource_attributes
            .iter()
            .position(|(k, _)| k == "service.name")
            .map(|i| resource_attributes.remove(i).1);
        let service_name = var("OTEL_SERVICE_NAME")
            .map(|v| v.trim().to_string())
            .or(from_attributes)
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());
        Ok(Some(Settings {
            protocol,
            logs_endpoint: endpoint("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "/v1/logs")?,
            metrics_endpoint: endpoint("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "/v1/metrics")?,
            traces_endpoint: endpoint("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "/v1/traces")?,
            service_name,
            resource_attributes,
            metric_interval: var("OTEL_METRIC_EXPORT_INTERVAL")
                .and_then(|v| v.trim().parse().ok())
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
                .unwrap_or(METRIC_INTERVAL),
        }))
    }

    fn resource(&self) -> Resource {
        let attributes = self
            .resource_attributes
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()));
        Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .with_attributes(attributes)
            .with_service_name(self.service_name.clone())
            .build()
    }
}

fn check_endpoint(endpoint: &str, origin: &'static str) -> Result<(), TelemetryError> {
    match url::Url::parse(endpoint) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(TelemetryError::Endpoint {
            endpoint: endpoint.to_string(),
            origin,
        }),
    }
}

/// `key1=value1,key2=value2` with percent-encoded values, as the OTel specification writes
/// `OTEL_RESOURCE_ATTRIBUTES`; malformed entries are skipped.
fn parse_resource_attributes(value: &str) -> Vec<(String, String)> {
    value
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), percent_decode(v.trim())))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The export pipelines; present only when an endpoint is configured.
struct Pipelines {
    settings: Settings,
    logs: SdkLoggerProvider,
    traces: SdkTracerProvider,
    metrics: SdkMeterProvider,
    /// Emits drift events; its scope is `driftwatch`, apart from the tracing bridge's.
    logger: SdkLogger,
    /// Drives the gRPC channels, so that export works whatever runtime (if any) the caller
    /// has, and never competes with checks for its workers. HTTP export needs none.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    /// Set by shutdown; the `tracing` layers and [`Telemetry::emit_event`] stop feeding the
    /// stopped pipelines, which would otherwise warn about every record.
    shut_down: Arc<AtomicBool>,
}

impl Drop for Pipelines {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside an async context.
        if let Some(rt) = self
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            rt.shutdown_background();
        }
    }
}

/// The process's OpenTelemetry: exporters, the `tracing` layer, drift events and metrics.
/// Cheap to clone; clones share the pipelines.
#[derive(Clone)]
pub struct Telemetry {
    pipelines: Option<Arc<Pipelines>>,
    metrics: Metrics,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pipelines {
            Some(p) => f
                .debug_struct("Telemetry")
                .field("settings", &p.settings)
                .finish_non_exhaustive(),
            None => f.write_str("Telemetry(disabled)"),
        }
    }
}

impl Telemetry {
    /// Exports nothing; every method is a no-op.
    pub const fn disabled() -> Telemetry {
        Telemetry {
            pipelines: None,
            metrics: Metrics::disabled(),
        }
    }

    /// Starts export as `[otel]` and the process environment say, or returns a disabled
    /// handle when there is no endpoint.
    pub fn init(otel: &Otel) -> Result<Telemetry, TelemetryError> {
        match Settings::resolve(otel, &|name| std::env::var(name).ok())? {
            Some(settings) => Telemetry::start(settings),
            None => Ok(Telemetry::disabled()),
        }
    }

    /// Starts the three OTLP pipelines. Nothing is sent until there is something to send, so
    /// this succeeds with the collector down.
    pub fn start(settings: Settings) -> Result<Telemetry, TelemetryError> {
        let resource = settings.resource();
        let runtime = match settings.protocol {
            Protocol::Grpc => Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("otlp-grpc")
                    .enable_all()
                    .build()
                    .map_err(TelemetryError::Runtime)?,
            ),
            Protocol::HttpProtobuf => None,
        };
        // tonic spawns each channel's worker on the runtime current while it is built.
        let entered = runtime.as_ref().map(|rt| rt.enter());
        let exporters = Exporters::build(&settings);
        drop(entered);
        let exporters = match exporters {
            Ok(e) => e,
            Err(err) => {
                if let Some(rt) = runtime {
                    rt.shutdown_background();
                }
                return Err(err);
            }
        };

        let logs = SdkLoggerProvider::builder()
            .with_log_processor(
                BatchLogProcessor::builder(exporters.logs)
                    .with_batch_config(
                        opentelemetry_sdk::logs::BatchConfigBuilder::default()
                            .with_max_queue_size(QUEUE_SIZE)
                            .with_max_export_batch_size(BATCH_SIZE)
                            .with_scheduled_delay(LOG_DELAY)
                            .build(),
                    )
                    .build(),
            )
            .with_resource(resource.clone())
            .build();
        let traces = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporters.traces)
                    .with_batch_config(
                        opentelemetry_sdk::trace::BatchConfigBuilder::default()
                            .with_max_queue_size(QUEUE_SIZE)
                            .with_max_export_batch_size(BATCH_SIZE)
                            .with_scheduled_delay(SPAN_DELAY)
                            .build(),
                    )
                    .build(),
            )
            .with_resource(resource.clone())
            .build();
        let metrics = SdkMeterProvider::builder()
            .with_reader(
                PeriodicReader::builder(exporters.metrics)
                    .with_interval(settings.metric_interval)
                    .build(),
            )
            .with_resource(resource)
            .build();

        let logger = logs.logger_with_scope(scope());
        let instruments = Instruments::new(&metrics);
        Ok(Telemetry {
            pipelines: Some(Arc::new(Pipelines {
                settings,
                logs,
                traces,
                metrics,
                logger,
                runtime: Mutex::new(runtime),
                shut_down: Arc::new(AtomicBool::new(false)),
            })),
            metrics: Metrics {
                instruments: Some(Arc::new(instruments)),
            },
        })
    }

    /// Whether anything is exported.
    pub fn is_enabled(&self) -> bool {
        self.pipelines.is_some()
    }

    /// Where and how export goes, when it is enabled.
    pub fn settings(&self) -> Option<&Settings> {
        self.pipelines.as_ref().map(|p| &p.settings)
    }

    /// The metrics handle; cheap to clone, a no-op when export is disabled.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The `tracing` layers that turn spans into OTel spans and log events into OTel log
    /// records carrying the trace context; `None` when export is disabled, so nothing is
    /// added to the subscriber then.
    ///
    /// `log_filter` decides which log events are exported (pass the same directives as the
    /// stderr log); spans follow a fixed filter that includes driftwatch's debug spans. The
    /// HTTP/gRPC stacks and the SDK itself are never exported, whatever the filters say.
    pub fn layer<S>(&self, log_filter: EnvFilter) -> Option<Box<dyn Layer<S> + Send + Sync>>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let p = self.pipelines.as_ref()?;
        let tracer = p.traces.tracer_with_scope(scope());
        let spans = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(EnvFilter::new(TRACE_FILTER).and(Exportable {
                shut_down: p.shut_down.clone(),
            }));
        let logs =
            OpenTelemetryTracingBridge::new(&p.logs).with_filter(log_filter.and(Exportable {
                shut_down: p.shut_down.clone(),
            }));
        Some(spans.and_then(logs).boxed())
    }

    /// Emits one stored event as an OTel log record (an OTel event named after its type)
    /// and counts it in `driftwatch.events`. Never blocks: when the export queue is full the
    /// record is dropped.
    ///
    /// Severity: info is INFO, warning is WARN, and critical is ERROR. FATAL is kept for a
    /// process that cannot go on; a deleted digest needs a human, which is what ERROR means
    /// in driftwatch's own logs too. The original word is the severity text.
    pub fn emit_event(&self, envelope: &Envelope) {
        let name = event_name(&envelope.kind);
        self.metrics.event(name);
        let Some(p) = &self.pipelines else { return };
        if p.shut_down.load(Ordering::Relaxed) {
            return;
        }
        let data = &envelope.data;

        let mut record = p.logger.create_log_record();
        record.set_event_name(name);
        let (number, text) = match data.severity {
            Severity::Info => (opentelemetry::logs::Severity::Info, "info"),
            Severity::Warning => (opentelemetry::logs::Severity::Warn, "warning"),
            Severity::Critical => (opentelemetry::logs::Severity::Error, "critical"),
        };
        record.set_severity_number(number);
        record.set_severity_text(text);
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&envelope.time) {
            record.set_timestamp(SystemTime::from(t));
        }
        record.set_observed_timestamp(SystemTime::now());
        record.set_body(AnyValue::from(summary(envelope)));

        let (host, port) = split_host_port(&data.registry);
        let previous = data.previous.as_ref().map(|s| s.digest.to_string());
        let current = data.current.as_ref().map(|s| s.digest.to_string());
        record.add_attribute(
            "container.image.name",
            format!("{}/{}", data.registry, data.repository),
        );
        if let Some(tag) = &data.tag {
            record.add_attribute(
                "container.image.tags",
                AnyValue::ListAny(Box::new(vec![AnyValue::from(tag.clone())])),
            );
        }
        if let Some(digest) = current.clone().or_else(|| previous.clone()) {
            record.add_attribute("oci.manifest.digest", digest);
        }
        record.add_attribute("server.address", host.to_string());
        if let Some(port) = port {
            record.add_attribute("server.port", i64::from(port));
        }
        record.add_attribute("cloudevents.event_id", envelope.id.clone());
        record.add_attribute("cloudevents.event_source", envelope.source.clone());
        record.add_attribute(
            "cloudevents.event_spec_version",
            envelope.specversion.clone(),
        );
        record.add_attribute("cloudevents.event_type", envelope.kind.clone());
        record.add_attribute("cloudevents.event_subject", envelope.subject.clone());
        record.add_attribute("driftwatch.watch", data.watch.clone());
        record.add_attribute("driftwatch.event_id", envelope.id.clone());
        record.add_attribute("driftwatch.severity", text);
        if let Some(previous) = previous {
            record.add_attribute("driftwatch.previous_digest", previous);
        }
        let detected_by = match data.detected_by {
            crate::event::DetectedBy::Poll => "poll",
            crate::event::DetectedBy::Webhook => "webhook",
        };
        record.add_attribute("driftwatch.detected_by", detected_by);
        if data.detail.as_object().is_none_or(|o| !o.is_empty()) {
            record.add_attribute("driftwatch.detail", data.detail.to_string());
        }
        for (key, value) in &data.labels {
            record.add_attribute(Key::new(format!("driftwatch.label.{key}")), value.clone());
        }
        p.logger.emit(record);
    }

    /// Sends everything pending now and waits for it (tests, and before a one-shot command
    /// exits). Blocks the calling thread; a collector that is down makes it fail, not hang
    /// beyond the exporters' own timeouts.
    pub fn force_flush(&self) -> Result<(), TelemetryError> {
        let Some(p) = &self.pipelines else {
            return Ok(());
        };
        let failures: Vec<String> = [
            ("logs", p.logs.force_flush()),
            ("traces", p.traces.force_flush()),
            ("metrics", p.metrics.force_flush()),
        ]
        .into_iter()
        .filter_map(|(signal, r)| r.err().map(|e| format!("{signal}: {e}")))
        .collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(TelemetryError::Flush(failures.join("; ")))
        }
    }

    /// Flushes and stops the pipelines, returning within `timeout` whatever the collector
    /// does; what has not been sent by then is lost. Blocks the calling thread, so call it
    /// outside the async runtime (after `block_on`) or from `spawn_blocking`. Later calls,
    /// and calls on clones, return at once.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), TelemetryError> {
        let Some(p) = &self.pipelines else {
            return Ok(());
        };
        if p.shut_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;

        // Each provider flushes on its own thread: the metrics one ignores any timeout it is
        // given, and one stuck signal must not eat the others' time.
        let (tx, rx) = mpsc::channel::<(&'static str, Result<(), String>)>();
        let (logs, traces, metrics) = (p.logs.clone(), p.traces.clone(), p.metrics.clone());
        let jobs: [(&'static str, ShutdownJob); 3] = [
            (
                "logs",
                Box::new(move || logs.shutdown_with_timeout(timeout)),
            ),
            (
                "traces",
                Box::new(move || traces.shutdown_with_timeout(timeout)),
            ),
            (
                "metrics",
                Box::new(move || metrics.shutdown_with_timeout(timeout)),
            ),
        ];
        let mut pending: HashSet<&'static str> = HashSet::new();
        let mut failures = Vec::new();
        for (signal, job) in jobs {
            let tx = tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("otel-shutdown-{signal}"))
                .spawn(move || {
                    let _ = tx.send((signal, job().map_err(|e| e.to_string())));
                });
            match spawned {
                Ok(_) => {
                    pending.insert(signal);
                }
                Err(e) => failures.push(format!("{signal}: cannot start its shutdown: {e}")),
            }
        }
        drop(tx);
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((signal, result)) => {
                    pending.remove(signal);
                    if let Err(e) = result {
                        failures.push(format!("{signal}: {e}"));
                    }
                }
                Err(_) => break,
            }
        }
        let mut late: Vec<&str> = pending.into_iter().collect();
        late.sort_unstable();
        for signal in late {
            failures.push(format!("{signal}: not flushed within {timeout:?}"));
        }

        if let Some(rt) = p.runtime.lock().unwrap_or_else(|e| e.into_inner()).take() {
            rt.shutdown_background();
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(TelemetryError::Shutdown(failures.join("; ")))
        }
    }
}

/// One provider's shutdown, run on a thread of its own.
type ShutdownJob = Box<dyn FnOnce() -> opentelemetry_sdk::error::OTelSdkResult + Send>;

/// The three exporters, before they are put behind processors.
struct Exporters {
    logs: opentelemetry_otlp::LogExporter,
    metrics: opentelemetry_otlp::MetricExporter,
    traces: opentelemetry_otlp::SpanExporter,
}

impl Exporters {
    fn build(s: &Settings) -> Result<Exporters, TelemetryError> {
        use opentelemetry_otlp::{LogExporter, MetricExporter, SpanExporter};
        let err = |signal| move |source| TelemetryError::Exporter { signal, source };
        // The protocol is set explicitly so that OTEL_EXPORTER_OTLP_*_PROTOCOL cannot
        // contradict the transport chosen here.
        Ok(match s.protocol {
            Protocol::HttpProtobuf => {
                let http = opentelemetry_otlp::Protocol::HttpBinary;
                Exporters {
                    logs: LogExporter::builder()
                        .with_http()
                        .with_protocol(http)
                        .with_endpoint(&s.logs_endpoint)
                        .build()
                        .map_err(err("logs"))?,
                    metrics: MetricExporter::builder()
                        .with_http()
                        .with_protocol(http)
                        .with_endpoint(&s.metrics_endpoint)
                        .build()
                        .map_err(err("metrics"))?,
                    traces: SpanExporter::builder()
                        .with_http()
                        .with_protocol(http)
                        .with_endpoint(&s.traces_endpoint)
                        .build()
                        .map_err(err("traces"))?,
                }
            }
            Protocol::Grpc => {
                let grpc = opentelemetry_otlp::Protocol::Grpc;
                Exporters {
                    logs: LogExporter::builder()
                        .with_tonic()
                        .with_protocol(grpc)
                        .with_endpoint(&s.logs_endpoint)
                        .build()
                        .map_err(err("logs"))?,
                    metrics: MetricExporter::builder()
                        .with_tonic()
                        .with_protocol(grpc)
                        .with_endpoint(&s.metrics_endpoint)
                        .build()
                        .map_err(err("metrics"))?,
                    traces: SpanExporter::builder()
                        .with_tonic()
                        .with_protocol(grpc)
                        .with_endpoint(&s.traces_endpoint)
                        .build()
                        .map_err(err("traces"))?,
                }
            }
        })
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("driftwatch")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

fn is_plumbing(target: &str) -> bool {
    EXPORT_PLUMBING.iter().any(|p| target.starts_with(p))
}

/// What the OTel layers may see: nothing from the export plumbing, and nothing once the
/// pipelines are shut down. The second is decided per event, so interest in a call site is
/// never cached as "always".
struct Exportable {
    shut_down: Arc<AtomicBool>,
}

impl<S> Filter<S> for Exportable {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        !self.shut_down.load(Ordering::Relaxed) && !is_plumbing(meta.target())
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if is_plumbing(meta.target()) {
            Interest::never()
        } else {
            Interest::sometimes()
        }
    }
}

/// The static event name for an envelope's type: the OTel API wants `&'static str`, and a
/// bounded set of names keeps the `event.type` metric attribute bounded too.
fn event_name(kind: &str) -> &'static str {
    static KNOWN: OnceLock<Vec<&'static str>> = OnceLock::new();
    static EXTRA: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    if let Some(t) = EventType::parse(kind).filter(|t| t.full() == kind) {
        let known = KNOWN.get_or_init(|| {
            // Leaked once per type, a fixed handful of short strings.
            EventType::ALL
                .iter()
                .map(|t| &*Box::leak(t.full().into_boxed_str()))
                .collect()
        });
        if let Some(i) = EventType::ALL.iter().position(|x| *x == t) {
            return known[i];
        }
    }
    let mut extra = EXTRA
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(name) = extra.get(kind) {
        return name;
    }
    if extra.len() >= MAX_EXTRA_EVENT_NAMES {
        return OTHER_EVENT;
    }
    let name: &'static str = Box::leak(kind.to_string().into_boxed_str());
    extra.insert(name);
    name
}

/// One line for people: `tag.moved 127.0.0.1:5000/team/api:prod: sha256:9f2c41d0e1aa ->
/// sha256:4b1de7702c3f`.
fn summary(e: &Envelope) -> String {
    let short = e
        .kind
        .strip_prefix(crate::event::TYPE_PREFIX)
        .unwrap_or(&e.kind);
    let digest = |s: &Option<crate::event::StateSummary>| {
        s.as_ref().map(|s| {
            let d = s.digest.to_string();
            match d.split_once(':') {
                Some((alg, hex)) => format!("{alg}:{}", &hex[..hex.len().min(12)]),
                None => d,
            }
        })
    };
    match (digest(&e.data.previous), digest(&e.data.current)) {
        (Some(p), Some(c)) if p != c => format!("{short} {}: {p} -> {c}", e.subject),
        (_, Some(c)) => format!("{short} {}: {c}", e.subject),
        (Some(p), None) => format!("{short} {}: was {p}", e.subject),
        (None, None) => format!("{short} {}", e.subject),
    }
}

/// `HOST[:PORT]` into the host and the port, as `server.address` and `server.port` want
/// them; `[::1]:5000` style addresses lose their brackets.
fn split_host_port(registry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = registry.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (registry, None),
        },
        _ => (registry, None),
    }
}

/// How a check ended, for `driftwatch.checks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The registry gave an authoritative answer.
    Ok,
    /// It did not; state was left alone.
    Failed,
}

/// What became of one delivery attempt, for `driftwatch.deliveries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The sink accepted it.
    Delivered,
    /// It failed and will be tried again.
    Retry,
    /// It failed for good (410 Gone, or past `max_age`).
    Dead,
}

/// How a config reload ended, for `driftwatch.config.reloads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new config is in force.
    Ok,
    /// It was invalid; the old one stays.
    Failed,
}

/// The instruments, created once per meter provider.
struct Instruments {
    checks: Counter<u64>,
    check_duration: Histogram<f64>,
    registry_requests: Counter<u64>,
    events: Counter<u64>,
    watches: Gauge<u64>,
    outbox_pending: Gauge<u64>,
    outbox_dead: Gauge<u64>,
    deliveries: Counter<u64>,
    token_refreshes: Counter<u64>,
    config_reloads: Counter<u64>,
}

impl Instruments {
    fn new(provider: &SdkMeterProvider) -> Instruments {
        let meter = provider.meter_with_scope(scope());
        let counter = |name: &'static str, unit: &'static str, doc: &'static str| {
            meter
                .u64_counter(name)
                .with_unit(unit)
                .with_description(doc)
                .build()
        };
        let gauge = |name: &'static str, unit: &'static str, doc: &'static str| {
            meter
                .u64_gauge(name)
                .with_unit(unit)
                .with_description(doc)
                .build()
        };
        Instruments {
            checks: counter("driftwatch.checks", "{check}", "Watch checks, by outcome."),
            check_duration: meter
                .f64_histogram("driftwatch.check.duration")
                .with_unit("s")
                .with_description("How long a watch check took.")
                .with_boundaries(CHECK_DURATION_BOUNDS.to_vec())
                .build(),
            registry_requests: counter(
                "driftwatch.registry.requests",
                "{request}",
                "Requests sent to registries, by registry, method and status class.",
            ),
            events: counter("driftwatch.events", "{event}", "Stored events, by type."),
            watches: gauge("driftwatch.watches", "{watch}", "Watches, by state."),
            outbox_pending: gauge(
                "driftwatch.outbox.pending",
                "{row}",
                "Outbox rows waiting for delivery.",
            ),
            outbox_dead: gauge(
                "driftwatch.outbox.dead",
                "{row}",
                "Outbox rows given up on.",
            ),
            deliveries: counter(
                "driftwatch.deliveries",
                "{attempt}",
                "Delivery attempts, by sink and outcome.",
            ),
            token_refreshes: counter(
                "driftwatch.token.refreshes",
                "{refresh}",
                "Bearer tokens fetched from registries' token endpoints.",
            ),
            config_reloads: counter(
                "driftwatch.config.reloads",
                "{reload}",
                "Configuration reloads, by outcome.",
            ),
        }
    }
}

/// Records driftwatch's metrics. Cheap to clone; every method is a no-op when export is
/// disabled. Attributes are bounded: outcomes, registries, sinks and event types from the
/// config and the code, never digests or tags.
#[derive(Clone, Default)]
pub struct Metrics {
    instruments: Option<Arc<Instruments>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.instruments.is_some() {
            "enabled"
        } else {
            "disabled"
        };
        write!(f, "Metrics({state})")
    }
}

impl Metrics {
    /// Records nothing.
    pub const fn disabled() -> Metrics {
        Metrics { instruments: None }
    }

    /// One watch check and how long it took.
    pub fn check(&self, outcome: CheckOutcome, duration: Duration) {
        let Some(i) = &self.instruments else { return };
        let outcome = match outcome {
            CheckOutcome::Ok => "ok",
            CheckOutcome::Failed => "failed",
        };
        let attributes = [KeyValue::new("outcome", outcome)];
        i.checks.add(1, &attributes);
        i.check_duration.record(duration.as_secs_f64(), &attributes);
    }

    /// One request to `registry` (`HOST[:PORT]`); `status` is `None` when no response came
    /// (connection refused, timeout, TLS).
    pub fn registry_request(&self, registry: &str, method: &str, status: Option<u16>) {
        let Some(i) = &self.instruments else { return };
        let class = match status {
            Some(100..=199) => "1xx",
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            _ => "error",
        };
        let mut attributes = server_attributes(registry);
        attributes.push(KeyValue::new("http.request.method", method.to_string()));
        attributes.push(KeyValue::new("http.response.status_class", class));
        i.registry_requests.add(1, &attributes);
    }

    /// Counts one event of `name` (a full type from [`event_name`]).
    fn event(&self, name: &'static str) {
        let Some(i) = &self.instruments else { return };
        i.events.add(1, &[KeyValue::new("event.type", name)]);
    }

    /// How many watches are currently checked fine and how many are failing.
    pub fn watches(&self, ok: u64, failing: u64) {
        let Some(i) = &self.instruments else { return };
        i.watches.record(ok, &[KeyValue::new("state", "ok")]);
        i.watches
            .record(failing, &[KeyValue::new("state", "failing")]);
    }

    /// The outbox's rows waiting for delivery and those given up on.
    pub fn outbox(&self, pending: u64, dead: u64) {
        let Some(i) = &self.instruments else { return };
        i.outbox_pending.record(pending, &[]);
        i.outbox_dead.record(dead, &[]);
    }

    /// One delivery attempt through `sink` (the sink's configured name).
    pub fn delivery(&self, sink: &str, outcome: DeliveryOutcome) {
        let Some(i) = &self.instruments else { return };
        let outcome = match outcome {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retry => "retry",
            DeliveryOutcome::Dead => "dead",
        };
        let attributes = [
            KeyValue::new("sink", sink.to_string()),
            KeyValue::new("outcome", outcome),
        ];
        i.deliveries.add(1, &attributes);
    }

    /// One bearer token fetched for `registry`.
    pub fn token_refresh(&self, registry: &str) {
        let Some(i) = &self.instruments else { return };
        i.token_refreshes.add(1, &server_attributes(registry));
    }

    /// One configuration reload.
    pub fn config_reload(&self, outcome: ReloadOutcome) {
        let Some(i) = &self.instruments else { return };
        let outcome = match outcome {
            ReloadOutcome::Ok => "ok",
            ReloadOutcome::Failed => "failed",
        };
        i.config_reloads
            .add(1, &[KeyValue::new("outcome", outcome)]);
    }
}

fn server_attributes(registry: &str) -> Vec<KeyValue> {
    let (host, port) = split_host_port(registry);
    let mut attributes = Vec::with_capacity(4);
    attributes.push(KeyValue::new("server.address", host.to_string()));
    if let Some(port) = port {
        attributes.push(KeyValue::new("server.port", i64::from(port)));
    }
    attributes
}

static GLOBAL: OnceLock<Telemetry> = OnceLock::new();
static DISABLED: Telemetry = Telemetry::disabled();

/// Makes `telemetry` the process's, for code far from `main` (the registry client, the
/// scheduler). Only the first call takes effect; it returns false for later ones.
pub fn set_global(telemetry: Telemetry) -> bool {
    GLOBAL.set(telemetry).is_ok()
}

/// The process's telemetry: what [`set_global`] installed, else a disabled one.
pub fn global() -> &'static Telemetry {
    GLOBAL.get().unwrap_or(&DISABLED)
}

/// The process's metrics; see [`global`].
pub fn metrics() -> &'static Metrics {
    global().metrics()
}

/// A filter for the stderr log that lets each OTel SDK or exporter call site through at most
/// once per `interval`: a collector that is down then costs a warning per interval, not one
/// per failed batch. Everything else passes; combine it with the level filter using
/// [`FilterExt::and`](tracing_subscriber::filter::FilterExt::and), or use [`stderr_filter`].
#[derive(Debug)]
pub struct SdkLogLimiter {
    interval: Duration,
    last: Mutex<HashMap<tracing::callsite::Identifier, Instant>>,
}

impl SdkLogLimiter {
    /// A limiter allowing one message per SDK call site per `interval`.
    pub fn new(interval: Duration) -> SdkLogLimiter {
        SdkLogLimiter {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    fn is_sdk(meta: &Metadata<'_>) -> bool {
        meta.is_event() && meta.target().starts_with("opentelemetry")
    }
}

impl<S> Filter<S> for SdkLogLimiter {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        if !SdkLogLimiter::is_sdk(meta) {
            return true;
        }
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.get(&meta.callsite()) {
            Some(at) if now.duration_since(*at) < self.interval => false,
            _ => {
                last.insert(meta.callsite(), now);
                true
            }
        }
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        // SDK call sites are decided per event; the rest once and for all.
        if SdkLogLimiter::is_sdk(meta) {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }
}

/// The stderr log's filter: `level` (e.g. from `DRIFTWATCH_LOG`), with the OTel SDK's own
/// messages limited to one per call site per [`SDK_LOG_INTERVAL`].
pub fn stderr_filter<S>(level: EnvFilter) -> impl Filter<S> + Send + Sync + 'static
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    level.and(SdkLogLimiter::new(SDK_LOG_INTERVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| vars.get(k).cloned()
    }

    fn otel(endpoint: Option<&str>, protocol: Option<&str>) -> Otel {
        Otel {
            endpoint: endpoint.map(str::to_string),
            protocol: protocol.map(str::to_string),
        }
    }

    #[test]
    fn without_an_endpoint_nothing_is_exported() {
        assert_eq!(
            Settings::resolve(&otel(None, None), &env(&[])).unwrap(),
            None
        );
        let t = Telemetry::init(&otel(None, Some("grpc")));
        // The process environment of a test run has no OTLP endpoint.
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
            assert!(!t.unwrap().is_enabled());
        }
    }

    #[test]
    fn http_appends_the_signal_paths_and_grpc_uses_the_endpoint_as_is() {
        let http = Settings::resolve(&otel(Some("http://127.0.0.1:4318/"), None), &env(&[]))
            .unwrap()
            .unwrap();
        assert_eq!(http.protocol, Protocol::HttpProtobuf);
        assert_eq!(http.logs_endpoint, "http://127.0.0.1:4318/v1/logs");
        assert_eq!(http.metrics_endpoint, "http://127.0.0.1:4318/v1/metrics");
        assert_eq!(http.traces_endpoint, "http://127.0.0.1:4318/v1/traces");

        let grpc = Settings::resolve(
            &otel(Some("http://127.0.0.1:4317"), Some("grpc")),
            &env(&[]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(grpc.protocol, Protocol::Grpc);
        assert_eq!(grpc.logs_endpoint, "http://127.0.0.1:4317");
        assert_eq!(grpc.traces_endpoint, "http://127.0.0.1:4317");
    }

    #[test]
    fn the_environment_fills_in_what_the_config_leaves_open() {
        let vars = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://127.0.0.1:9999",
            ),
        ]);
        let s = Settings::resolve(&otel(None, None), &vars)
            .unwrap()
            .unwrap();
        assert_eq!(s.protocol, Protocol::Grpc);
        assert_eq!(s.logs_endpoint, "http://127.0.0.1:4317");
        assert_eq!(s.traces_endpoint, "http://127.0.0.1:9999");

        // The config's own endpoint and protocol win, signal overrides included.
        let s = Settings::resolve(
            &otel(Some("http://127.0.0.1:4318"), Some("http/protobuf")),
            &vars,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.traces_endpoint, "http://127.0.0.1:4318/v1/traces");
    }

    #[test]
    fn sdk_disabled_turns_everything_off() {
        let vars = env(&[("OTEL_SDK_DISABLED", "TRUE")]);
        let s = Settings::resolve(&otel(Some("http://127.0.0.1:4318"), None), &vars).unwrap();
        assert_eq!(s, None);
        let vars = env(&[("OTEL_SDK_DISABLED", "false")]);
        let s = Settings::resolve(&otel(Some("http://127.0.0.1:4318"), None), &vars).unwrap();
        assert!(s.is_some());
    }

    #[test]
    fn unknown_protocols_and_bad_endpoints_are_refused_with_their_origin() {
        let vars = env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]);
        let e = Settings::resolve(&otel(Some("http://127.0.0.1:4318"), None), &vars).unwrap_err();
        assert!(e.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{e}");
        let vars = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4318")]);
        let e = Settings::resolve(&otel(None, None), &vars).unwrap_err();
        assert!(matches!(e, TelemetryError::Endpoint { .. }), "{e}");
    }

    #[test]
    fn service_name_comes_from_the_environment_else_defaults() {
        let vars = env(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod%20eu, service.name=dw,bad",
        )]);
        let s = Settings::resolve(&otel(Some("http://127.0.0.1:4318"), None), &vars)
            .unwrap()
            .unwrap();
        assert_eq!(s.service_name, "dw");
        assert_eq!(
            s.resource_attributes,
            vec![("deployment.environment".to_string(), "prod eu".to_string())]
        );
        let vars = env(&[
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=dw"),
            ("OTEL_SERVICE_NAME", "watcher"),
        ]);
        let s = Settings::resolve(&otel(Some("http://127.0.0.1:4318"), None), &vars)
            .unwrap()
            .unwrap();
        assert_eq!(s.service_name, "watcher");
        let s = Settings::resolve(&otel(Some("http://127.0.0.1:4318"), None), &env(&[]))
            .unwrap()
            .unwrap();
        assert_eq!(s.service_name, DEFAULT_SERVICE_NAME);
    }

    #[test]
    fn registries_split_into_address_and_port() {
        assert_eq!(split_host_port("127.0.0.1:5000"), ("127.0.0.1", Some(5000)));
        assert_eq!(
            split_host_port("mcr.microsoft.com"),
            ("mcr.microsoft.com", None)
        );
        assert_eq!(split_host_port("[::1]:5000"), ("::1", Some(5000)));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
    }

    #[test]
    fn event_names_are_interned_and_bounded() {
        assert_eq!(event_name("driftwatch.tag.moved"), "driftwatch.tag.moved");
        assert!(std::ptr::eq(
            event_name("driftwatch.tag.moved"),
            event_name("driftwatch.tag.moved")
        ));
        assert_eq!(event_name("driftwatch.test"), "driftwatch.test");
        for i in 0..MAX_EXTRA_EVENT_NAMES * 2 {
            event_name(&format!("made.up.{i}"));
        }
        assert_eq!(event_name("made.up.last"), OTHER_EVENT);
    }

    #[test]
    fn disabled_metrics_record_nothing_and_cost_nothing() {
        let m = Metrics::disabled();
        m.check(CheckOutcome::Ok, Duration::from_millis(3));
        m.registry_request("127.0.0.1:5000", "HEAD", Some(200));
        m.watches(1, 0);
        m.outbox(0, 0);
        m.delivery("hook", DeliveryOutcome::Delivered);
        m.token_refresh("127.0.0.1:5000");
        m.config_reload(ReloadOutcome::Ok);
        assert!(!global().is_enabled());
        assert_eq!(format!("{m:?}"), "Metrics(disabled)");
    }
}
