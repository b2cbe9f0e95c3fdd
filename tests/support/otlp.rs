//! Stands in for an OpenTelemetry collector: a real OTLP receiver on 127.0.0.1, speaking gRPC
//! (the official `opentelemetry-proto` services on tonic) and HTTP/protobuf (`POST /v1/logs`,
//! `/v1/metrics`, `/v1/traces` on axum), that keeps everything it is sent for the test to read.

use std::future::IntoFuture;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::metrics::v1::{Metric, metric, number_data_point};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

const ARRIVAL_POLL: Duration = Duration::from_millis(20);
const PROTOBUF: &str = "application/x-protobuf";

/// How a record reached the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

/// The value of attribute `key` in `attributes`.
pub fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

/// A string attribute; `None` when missing or not a string.
pub fn attr_str<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attributes, key)? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

/// An integer attribute.
pub fn attr_int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attributes, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

/// An array attribute whose elements are all strings.
pub fn attr_strings(attributes: &[KeyValue], key: &str) -> Option<Vec<String>> {
    match attr(attributes, key)? {
        any_value::Value::ArrayValue(a) => a
            .values
            .iter()
            .map(|v| match &v.value {
                Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn any_str(v: &Option<AnyValue>) -> Option<&str> {
    match v.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What every received item carries besides itself.
#[derive(Debug, Clone)]
pub struct Origin {
    pub transport: Transport,
    pub resource: Vec<KeyValue>,
    pub scope: String,
}

impl Origin {
    fn new(transport: Transport, resource: &Option<Resource>, scope: Option<&str>) -> Origin {
        Origin {
            transport,
            resource: resource
                .as_ref()
                .map(|r| r.attributes.clone())
                .unwrap_or_default(),
            scope: scope.unwrap_or_default().to_string(),
        }
    }

    /// A string resource attribute, e.g. `service.name`.
    pub fn resource_str(&self, key: &str) -> Option<&str> {
        attr_str(&self.resource, key)
    }
}

/// One log record as received.
#[derive(Debug, Clone)]
pub struct ReceivedLog {
    pub origin: Origin,
    pub record: LogRecord,
}

impl ReceivedLog {
    pub fn event_name(&self) -> &str {
        &self.record.event_name
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        attr_str(&self.record.attributes, key)
    }

    pub fn body(&self) -> Option<&str> {
        any_str(&self.record.body)
    }

    /// Hex, empty when the record carries no trace context.
    pub fn trace_id(&self) -> String {
        hex(&self.record.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.record.span_id)
    }
}

/// One metric as received (metrics are exported again each interval; later ones are newer).
#[derive(Debug, Clone)]
pub struct ReceivedMetric {
    pub origin: Origin,
    pub metric: Metric,
}

/// A data point's value.
#[derive(Debug, Clone, PartialEq)]
pub enum PointValue {
    Int(i64),
    Double(f64),
    Histogram { count: u64, sum: Option<f64> },
}

/// One data point, with its attributes.
#[derive(Debug, Clone)]
pub struct Point {
    pub attributes: Vec<KeyValue>,
    pub value: PointValue,
}

impl Point {
    pub fn str(&self, key: &str) -> Option<&str> {
        attr_str(&self.attributes, key)
    }

    /// The value as a number (a histogram's count).
    pub fn number(&self) -> f64 {
        match self.value {
            PointValue::Int(i) => i as f64,
            PointValue::Double(d) => d,
            PointValue::Histogram { count, .. } => count as f64,
        }
    }
}

impl ReceivedMetric {
    pub fn name(&self) -> &str {
        &self.metric.name
    }

    pub fn unit(&self) -> &str {
        &self.metric.unit
    }

    /// `sum`, `gauge`, `histogram`, …
    pub fn kind(&self) -> &'static str {
        match &self.metric.data {
            Some(metric::Data::Sum(_)) => "sum",
            Some(metric::Data::Gauge(_)) => "gauge",
            Some(metric::Data::Histogram(_)) => "histogram",
            Some(metric::Data::ExponentialHistogram(_)) => "exponential_histogram",
            Some(metric::Data::Summary(_)) => "summary",
            None => "none",
        }
    }

    pub fn points(&self) -> Vec<Point> {
        let number = |p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint| Point {
            attributes: p.attributes.clone(),
            value: match p.value {
                Some(number_data_point::Value::AsInt(i)) => PointValue::Int(i),
                Some(number_data_point::Value::AsDouble(d)) => PointValue::Double(d),
                None => PointValue::Double(f64::NAN),
            },
        };
        match &self.metric.data {
            Some(metric::Data::Sum(s)) => s.data_points.iter().map(number).collect(),
            Some(metric::Data::Gauge(g)) => g.data_points.iter().map(number).collect(),
            Some(metric::Data::Histogram(h)) => h
                .data_points
                .iter()
                .map(|p| Point {
                    attributes: p.attributes.clone(),
                    value: PointValue::Histogram {
                        count: p.count,
                        sum: p.sum,
                    },
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The point whose attributes include every `(key, value)` of `want`.
    pub fn point(&self, want: &[(&str, &str)]) -> Option<Point> {
        self.points()
            .into_iter()
            .find(|p| want.iter().all(|(k, v)| p.str(k) == Some(*v)))
    }
}

/// One span as received.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub origin: Origin,
    pub span: Span,
}

impl ReceivedSpan {
    pub fn name(&self) -> &str {
        &self.span.name
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        attr_str(&self.span.attributes, key)
    }

    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// Empty for a root span.
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

#[derive(Default)]
struct Store {
    logs: Vec<ReceivedLog>,
    metrics: Vec<ReceivedMetric>,
    spans: Vec<ReceivedSpan>,
    /// `(transport, path or service)` of every export request, in arrival order.
    requests: Vec<(Transport, &'static str)>,
}

type Shared = Arc<Mutex<Store>>;

fn lock(state: &Shared) -> MutexGuard<'_, Store> {
    // A panicking handler must not hide everything else from the test.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn store_logs(state: &Shared, transport: Transport, req: ExportLogsServiceRequest) {
    let mut store = lock(state);
    store.requests.push((transport, "logs"));
    for rl in req.resource_logs {
        for sl in rl.scope_logs {
            let scope = sl.scope.as_ref().map(|s| s.name.as_str());
            for record in sl.log_records {
                let origin = Origin::new(transport, &rl.resource, scope);
                store.logs.push(ReceivedLog { origin, record });
            }
        }
    }
}

fn store_metrics(state: &Shared, transport: Transport, req: ExportMetricsServiceRequest) {
    let mut store = lock(state);
    store.requests.push((transport, "metrics"));
    for rm in req.resource_metrics {
        for sm in rm.scope_metrics {
            let scope = sm.scope.as_ref().map(|s| s.name.as_str());
            for metric in sm.metrics {
                let origin = Origin::new(transport, &rm.resource, scope);
                store.metrics.push(ReceivedMetric { origin, metric });
            }
        }
    }
}

fn store_spans(state: &Shared, transport: Transport, req: ExportTraceServiceRequest) {
    let mut store = lock(state);
    store.requests.push((transport, "traces"));
    for rs in req.resource_spans {
        for ss in rs.scope_spans {
            let scope = ss.scope.as_ref().map(|s| s.name.as_str());
            for span in ss.spans {
                let origin = Origin::new(transport, &rs.resource, scope);
                store.spans.push(ReceivedSpan { origin, span });
            }
        }
    }
}

/// The gRPC side: the three collector services over one shared store.
#[derive(Clone)]
struct Collector(Shared);

#[tonic::async_trait]
impl LogsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        store_logs(&self.0, Transport::Grpc, request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        store_metrics(&self.0, Transport::Grpc, request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        store_spans(&self.0, Transport::Grpc, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The HTTP side: decodes a protobuf body as `Req`, stores it, answers with an empty `Resp`.
fn http_export<Req, Resp>(
    state: &Shared,
    headers: &HeaderMap,
    body: &Bytes,
    store: fn(&Shared, Transport, Req),
) -> Response
where
    Req: prost::Message + Default,
    Resp: prost::Message + Default,
{
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with(PROTOBUF) {
        let msg = format!("expected {PROTOBUF}, got {content_type:?}");
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, msg).into_response();
    }
    match Req::decode(body.as_ref()) {
        Ok(req) => {
            store(state, Transport::Http, req);
            let answer = Resp::default().encode_to_vec();
            ([(header::CONTENT_TYPE, PROTOBUF)], answer).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("not OTLP protobuf: {e}")).into_response(),
    }
}

async fn http_logs(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    http_export::<_, ExportLogsServiceResponse>(&s, &headers, &body, store_logs)
}

async fn http_metrics(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    http_export::<_, ExportMetricsServiceResponse>(&s, &headers, &body, store_metrics)
}

async fn http_traces(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    http_export::<_, ExportTraceServiceResponse>(&s, &headers, &body, store_spans)
}

/// The OTLP receiver. It runs on its own thread and runtime, so it keeps answering while
/// the test thread blocks in a flush.
pub struct OtlpReceiver {
    grpc_port: u16,
    http_port: u16,
    state: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Starts both endpoints on free 127.0.0.1 ports; they accept connections when this
    /// returns.
    pub fn start() -> OtlpReceiver {
        let state: Shared = Arc::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(u16, u16), String>>();
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        let thread = std::thread::Builder::new()
            .name("otlp-receiver".to_string())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("OTLP receiver runtime");
                runtime.block_on(serve(served, ready_tx, stopped));
            })
            .expect("spawn the OTLP receiver thread");
        match ready_rx.recv() {
            Ok(Ok((grpc_port, http_port))) => OtlpReceiver {
                grpc_port,
                http_port,
                state,
                shutdown: Some(shutdown),
                thread: Some(thread),
            },
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => match thread.join() {
                Ok(()) => panic!("the OTLP receiver thread exited before listening"),
                Err(panic) => std::panic::resume_unwind(panic),
            },
        }
    }

    /// `http://127.0.0.1:PORT` of the gRPC server (as `[otel] endpoint` with `grpc`).
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// `http://127.0.0.1:PORT`, the base URL of the HTTP endpoint (as `[otel] endpoint`).
    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn logs(&self) -> Vec<ReceivedLog> {
        lock(&self.state).logs.clone()
    }

    pub fn metrics(&self) -> Vec<ReceivedMetric> {
        lock(&self.state).metrics.clone()
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        lock(&self.state).spans.clone()
    }

    /// `(transport, signal)` of every export request so far.
    pub fn requests(&self) -> Vec<(Transport, &'static str)> {
        lock(&self.state).requests.clone()
    }

    /// Polls until a log record satisfies `pred`; panics at `timeout` listing what came.
    pub fn wait_for_log_where(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ReceivedLog) -> bool,
    ) -> ReceivedLog {
        poll(timeout, || self.logs().into_iter().find(|l| pred(l))).unwrap_or_else(|| {
            let seen: Vec<String> = self
                .logs()
                .iter()
                .map(|l| format!("  {:?} {:?}", l.event_name(), l.body()))
                .collect();
            panic!(
                "no log record {what} within {timeout:?}; received:\n{}",
                seen.join("\n")
            )
        })
    }

    /// Polls until a log record with this event name arrives.
    pub fn wait_for_log(&self, event_name: &str, timeout: Duration) -> ReceivedLog {
        self.wait_for_log_where(&format!("named {event_name:?}"), timeout, |l| {
            l.event_name() == event_name
        })
    }

    /// Polls until a metric of this name arrives and returns the latest one received.
    pub fn wait_for_metric(&self, name: &str, timeout: Duration) -> ReceivedMetric {
        let latest = || self.metrics().into_iter().rev().find(|m| m.name() == name);
        poll(timeout, latest).unwrap_or_else(|| {
            let mut seen: Vec<String> = self
                .metrics()
                .iter()
                .map(|m| m.name().to_string())
                .collect();
            seen.sort();
            seen.dedup();
            panic!("no metric {name:?} within {timeout:?}; received: {seen:?}")
        })
    }

    /// Polls until at least `n` spans of this name arrived, and returns them all.
    pub fn wait_for_spans(&self, name: &str, n: usize, timeout: Duration) -> Vec<ReceivedSpan> {
        let found = || {
            let spans: Vec<ReceivedSpan> = self
                .spans()
                .into_iter()
                .filter(|s| s.name() == name)
                .collect();
            (spans.len() >= n).then_some(spans)
        };
        poll(timeout, found).unwrap_or_else(|| {
            let seen: Vec<String> = self.spans().iter().map(|s| s.name().to_string()).collect();
            panic!("fewer than {n} span(s) {name:?} within {timeout:?}; received: {seen:?}")
        })
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Calls `probe` until it yields something or `timeout` passes.
fn poll<T>(timeout: Duration, probe: impl Fn() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(ARRIVAL_POLL);
    }
}

async fn serve(
    state: Shared,
    ready: std::sync::mpsc::Sender<Result<(u16, u16), String>>,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let localhost = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let listeners = async {
        let grpc = tokio::net::TcpListener::bind(localhost).await?;
        let http = tokio::net::TcpListener::bind(localhost).await?;
        Ok::<_, std::io::Error>((grpc, http))
    };
    let (grpc, http) = match listeners.await {
        Ok(pair) => pair,
        Err(e) => {
            let _ = ready.send(Err(format!("OTLP receiver cannot bind 127.0.0.1: {e}")));
            return;
        }
    };
    let port = |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.port()).unwrap_or(0);
    let _ = ready.send(Ok((port(&grpc), port(&http))));

    let collector = Collector(state.clone());
    let grpc_server = tonic::transport::Server::builder()
        .add_service(LogsServiceServer::new(collector.clone()))
        .add_service(MetricsServiceServer::new(collector.clone()))
        .add_service(TraceServiceServer::new(collector))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc));
    let app = Router::new()
        .route("/v1/logs", post(http_logs))
        .route("/v1/metrics", post(http_metrics))
        .route("/v1/traces", post(http_traces))
        .with_state(state);
    // Returning drops the runtime, which closes the listeners and every open connection.
    tokio::select! {
        served = grpc_server => served.expect("OTLP gRPC server"),
        served = axum::serve(http, app).into_future() => served.expect("OTLP HTTP server"),
        _ = stopped => {}
    }
}
