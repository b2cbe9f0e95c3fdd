//! Stands in for a webhook receiver such as an SRE alerting endpoint: a real axum HTTP server
//! on 127.0.0.1 that records every delivery, answers with scripted statuses, and can go down
//! and come back on the same port to simulate an outage.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Response, StatusCode, header};

/// How long `restart` keeps retrying to bind the old port (e.g. while it is in TIME_WAIT).
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);
const REBIND_POLL: Duration = Duration::from_millis(50);
const ARRIVAL_POLL: Duration = Duration::from_millis(20);
const REFUSE_POLL: Duration = Duration::from_millis(10);

/// One scripted answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Respond {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Respond {
    /// `status` with no extra headers and an empty body.
    pub fn status(status: u16) -> Respond {
        Respond {
            status,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    /// `status` (typically 429 or 503) with `Retry-After: <secs>`.
    pub fn retry_after(status: u16, secs: u64) -> Respond {
        Respond::status(status).with_header("Retry-After", &secs.to_string())
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Respond {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body; it is sent as `text/plain` unless a `Content-Type` header is given.
    pub fn with_body(mut self, body: &str) -> Respond {
        self.body = body.to_owned();
        self
    }

    /// Panics (in the test's own thread) on anything the server could not send.
    fn validate(&self) {
        StatusCode::from_u16(self.status)
            .unwrap_or_else(|e| panic!("invalid scripted status {}: {e}", self.status));
        for (name, value) in &self.headers {
            HeaderName::from_bytes(name.as_bytes())
                .unwrap_or_else(|e| panic!("invalid scripted header name {name:?}: {e}"));
            HeaderValue::from_str(value)
                .unwrap_or_else(|e| panic!("invalid scripted header value {value:?}: {e}"));
        }
    }

    fn into_response(self) -> Response<Body> {
        let status = StatusCode::from_u16(self.status).expect("validated status");
        let mut builder = Response::builder().status(status);
        let has_type = self
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
        if !self.body.is_empty() && !has_type {
            builder = builder.header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
        }
        for (name, value) in &self.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder
            .body(Body::from(self.body))
            .expect("scripted response")
    }
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Header names lowercased, in arrival order; values are lossy UTF-8.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the request head arrived.
    pub at: Instant,
    /// Status the receiver answered with.
    pub status: u16,
}

impl Received {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as lossy UTF-8.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {} body is not JSON ({e}): {}",
                self.method,
                self.path,
                self.body_text()
            )
        })
    }
}

struct ReceiverState {
    default_status: u16,
    script: VecDeque<Respond>,
    requests: Vec<Received>,
}

type Shared = Arc<Mutex<ReceiverState>>;

fn lock(state: &Shared) -> MutexGuard<'_, ReceiverState> {
    // A panic in one handler must not hide every later request from the test.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running server thread with its own runtime.
struct Server {
    shutdown: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

/// The webhook receiver. It runs on its own thread and runtime, so it keeps answering while a
/// test blocks on a child process or uses a paused or current-thread runtime.
pub struct Receiver {
    port: u16,
    state: Shared,
    server: Option<Server>,
    /// While stopped, a bound but not listening socket keeps the port: connections are
    /// refused, yet no other test can take the port before [`Receiver::restart`].
    reservation: Option<tokio::net::TcpSocket>,
}

impl Receiver {
    /// Starts on a free 127.0.0.1 port; it is accepting connections when this returns.
    /// Every request gets 200 until [`Receiver::set_default`] or [`Receiver::script`].
    pub fn start() -> Receiver {
        let state: Shared = Arc::new(Mutex::new(ReceiverState {
            default_status: 200,
            script: VecDeque::new(),
            requests: Vec::new(),
        }));
        let (server, port) = launch(state.clone(), 0).unwrap_or_else(|e| panic!("{e}"));
        Receiver {
            port,
            state,
            server: Some(server),
            reservation: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT` followed by `path` (a leading `/` is added if missing).
    pub fn url(&self, path: &str) -> String {
        let slash = if path.starts_with('/') { "" } else { "/" };
        format!("http://127.0.0.1:{}{slash}{path}", self.port)
    }

    /// Status for requests once the script is used up (200 initially).
    pub fn set_default(&self, status: u16) {
        Respond::status(status).validate();
        lock(&self.state).default_status = status;
    }

    /// Appends answers to the queue; each request takes the next one, then the default.
    pub fn script(&self, responses: Vec<Respond>) {
        responses.iter().for_each(Respond::validate);
        lock(&self.state).script.extend(responses);
    }

    /// Scripted answers not consumed yet.
    pub fn pending_script(&self) -> usize {
        lock(&self.state).script.len()
    }

    /// Every request so far, in arrival order (kept across stop and restart).
    pub fn requests(&self) -> Vec<Received> {
        lock(&self.state).requests.clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.state).requests.clear();
    }

    /// Polls until at least `n` requests were recorded and returns all of them; panics at
    /// `timeout` listing what did arrive.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        wait_for_requests(&self.state, n, timeout)
    }

    /// Same as [`Receiver::wait_for`], polling on tokio's blocking pool (real time, so it
    /// stays bounded even when the test pauses tokio's clock).
    pub async fn wait_for_async(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let state = self.state.clone();
        match tokio::task::spawn_blocking(move || wait_for_requests(&state, n, timeout)).await {
            Ok(requests) => requests,
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }

    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Stops listening and drops open connections, so new connections are refused; recorded
    /// requests, the script and the port stay. Calling it twice is harmless.
    pub fn stop(&mut self) {
        if self.server.is_some() && self.reservation.is_none() {
            // Reserve first: the listener shares the port (SO_REUSEPORT) until it closes, so
            // there is no moment where another test's bind to port 0 could be handed it.
            self.reservation = reserve_port(self.port).ok();
        }
        if self.shut_down() {
            wait_until_refused(self.port);
        }
    }

    /// Stops the server thread; true if one was running.
    fn shut_down(&mut self) -> bool {
        let Some(server) = self.server.take() else {
            return false;
        };
        // The server may already be gone if it panicked; joining is all that is left.
        let _ = server.shutdown.send(());
        let _ = server.thread.join();
        true
    }

    /// Stops (if needed) and listens again on the same port, retrying the bind briefly.
    pub fn restart(&mut self) {
        self.stop();
        let (server, port) =
            launch(self.state.clone(), self.port).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(port, self.port, "receiver restarted on a different port");
        self.server = Some(server);
        self.reservation = None;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Binds 127.0.0.1:`port` without listening, so connections to it are refused while the
/// port stays ours. It can share the port with a listener made by this module (both set
/// SO_REUSEPORT) or, through SO_REUSEADDR, with a later non-listening or listening bind
/// by another server such as aiosmtpd. Binding port 0 never lands on a reserved port.
pub fn reserve_port(port: u16) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    Ok(socket)
}

/// Polls until connecting to the port is refused. Our listener is closed already, but a
/// child process forked by another test thread holds a copy of every descriptor until it
/// execs, and meanwhile the kernel still completes handshakes on that copy (later resetting
/// them). Waiting it out makes `stop` mean "refuses connections" when it returns.
fn wait_until_refused(port: u16) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + REBIND_TIMEOUT;
    loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => return,
            outcome if Instant::now() >= deadline => panic!(
                "port {port} still accepts connections {REBIND_TIMEOUT:?} after the webhook \
                 receiver stopped: {outcome:?}"
            ),
            _ => std::thread::sleep(REFUSE_POLL),
        }
    }
}

fn wait_for_requests(state: &Shared, n: usize, timeout: Duration) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    loop {
        let requests = lock(state).requests.clone();
        if requests.len() >= n {
            return requests;
        }
        if Instant::now() >= deadline {
            let arrived: Vec<String> = requests
                .iter()
                .map(|r| format!("  {} {} -> {}", r.method, r.path, r.status))
                .collect();
            panic!(
                "expected at least {n} webhook request(s) within {timeout:?}, {} arrived:\n{}",
                requests.len(),
                arrived.join("\n")
            );
        }
        std::thread::sleep(ARRIVAL_POLL);
    }
}

/// Spawns the server thread, binds `port` (0 for any) and returns once it is listening, with
/// the bound port.
fn launch(state: Shared, port: u16) -> Result<(Server, u16), String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u16, String>>();
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("webhook-receiver-{port}"))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("webhook receiver runtime");
            runtime.block_on(async move {
                let listener = match bind(port).await {
                    Ok(listener) => listener,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let bound = listener.local_addr().map(|a| a.port()).unwrap_or(port);
                let _ = ready_tx.send(Ok(bound));
                let app = Router::new().fallback(handle).with_state(state);
                // Dropping the runtime when this returns closes the listener and every open
                // connection, which is what an outage looks like to the client.
                tokio::select! {
                    served = axum::serve(listener, app).into_future() => {
                        served.expect("webhook receiver server");
                    }
                    _ = stopped => {}
                }
            });
        })
        .expect("spawn webhook receiver thread");
    match ready_rx.recv() {
        Ok(Ok(bound)) => Ok((Server { shutdown, thread }, bound)),
        Ok(Err(err)) => {
            let _ = thread.join();
            Err(err)
        }
        // The thread died before reporting: re-raise its panic.
        Err(_) => match thread.join() {
            Ok(()) => Err("webhook receiver thread exited before listening".to_owned()),
            Err(panic) => std::panic::resume_unwind(panic),
        },
    }
}

/// Listens on 127.0.0.1:`port` with SO_REUSEADDR (for TIME_WAIT leftovers) and SO_REUSEPORT
/// (to coexist with this receiver's own reservation). A specific port is retried for a
/// bounded time, since a just-closed listener's port can stay busy briefly.
async fn bind(port: u16) -> Result<tokio::net::TcpListener, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + REBIND_TIMEOUT;
    loop {
        let attempt = tokio::net::TcpSocket::new_v4().and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            socket.listen(1024)
        });
        match attempt {
            Ok(listener) => return Ok(listener),
            Err(err)
                if port != 0
                    && err.kind() == std::io::ErrorKind::AddrInUse
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(REBIND_POLL).await;
            }
            Err(err) => return Err(format!("webhook receiver cannot bind {addr}: {err}")),
        }
    }
}

async fn handle(State(state): State<Shared>, request: Request) -> Response<Body> {
    let at = Instant::now();
    let (parts, body) = request.into_parts();
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_ascii_lowercase(), value)
        })
        .collect();
    let mut received = Received {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers,
        body: Vec::new(),
        at,
        status: 0,
    };
    match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => {
            received.body = bytes.to_vec();
            let mut state = lock(&state);
            // Taking the answer and recording under one lock keeps the two in the same order.
            let respond = match state.script.pop_front() {
                Some(respond) => respond,
                None => Respond::status(state.default_status),
            };
            received.status = respond.status;
            state.requests.push(received);
            respond.into_response()
        }
        // A body cut short by the client does not consume a scripted answer.
        Err(err) => {
            received.status = 400;
            lock(&state).requests.push(received);
            Respond::status(400)
                .with_body(&format!("unreadable body: {err}"))
                .into_response()
        }
    }
}
