//! Harness around the real CNCF distribution registry (`docker-registry` 2.8) so integration
//! tests exercise driftwatch against genuine registry behaviour on 127.0.0.1.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::push::Pusher;

/// Environment variable that overrides where the registry binary lives.
pub const REGISTRY_BIN_ENV: &str = "DRIFTWATCH_TEST_REGISTRY_BIN";
const DEFAULT_REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// A port picked by binding :0 can be taken by someone else before the registry binds it,
/// so a fresh start retries a few times with a new port when that is what went wrong.
const START_ATTEMPTS: usize = 3;

/// A running `docker-registry serve` process with its own config and storage in a tempdir.
pub struct Registry {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl Registry {
    /// Starts a fresh registry and waits until `GET /v2/` answers 200.
    ///
    /// The startup wait blocks, so it runs on tokio's blocking pool; that keeps it correct
    /// on a current-thread runtime and under paused test time.
    pub async fn start() -> Registry {
        run_blocking(Registry::start_blocking).await
    }

    /// Same as [`Registry::start`] for synchronous tests.
    pub fn start_blocking() -> Registry {
        let bin = registry_bin();
        let dir = tempfile::Builder::new()
            .prefix("driftwatch-registry-")
            .tempdir()
            .expect("create registry tempdir");
        std::fs::create_dir_all(dir.path().join("storage")).expect("create storage dir");
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match launch(&bin, dir.path(), port) {
                Ok(child) => {
                    return Registry {
                        bin,
                        dir,
                        port,
                        child: Some(child),
                    };
                }
                Err(err) if err.contains("address already in use") => last_error = err,
                Err(err) => panic!("{err}"),
            }
        }
        panic!("registry could not get a free port after {START_ATTEMPTS} attempts: {last_error}")
    }

    /// `127.0.0.1:PORT`, the form image references and driftwatch configs use.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT` without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// A push helper aimed at this registry.
    pub fn pusher(&self) -> Pusher {
        Pusher::new(&self.base_url())
    }

    /// Directory holding the registry's blobs and manifests; it survives stop/restart.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Everything the registry process wrote to stdout/stderr so far, across restarts.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process and reaps it; storage stays so [`Registry::restart`] sees the same
    /// content. Calling it twice is harmless.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // kill fails only if the process already exited; wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (if needed) and starts again on the same port with the same storage.
    pub async fn restart(&mut self) {
        self.stop();
        let (bin, dir, port) = (self.bin.clone(), self.dir.path().to_owned(), self.port);
        let child =
            run_blocking(move || launch(&bin, &dir, port).unwrap_or_else(|e| panic!("{e}"))).await;
        self.child = Some(child);
    }

    /// Same as [`Registry::restart`] for synchronous tests.
    pub fn restart_blocking(&mut self) {
        self.stop();
        let child = launch(&self.bin, self.dir.path(), self.port).unwrap_or_else(|e| panic!("{e}"));
        self.child = Some(child);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Resolves the registry binary, panicking with install instructions rather than skipping:
/// a test suite that silently skips its real-registry tests proves nothing.
pub fn registry_bin() -> PathBuf {
    let bin = std::env::var_os(REGISTRY_BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_REGISTRY_BIN));
    if !bin.is_file() {
        panic!(
            "registry binary {} not found: install it with `apt-get install docker-registry` \
             (or set {REGISTRY_BIN_ENV} to a distribution 2.8 registry binary)",
            bin.display()
        );
    }
    bin
}

/// Asks the kernel for a free loopback port. The listener is dropped before the registry
/// binds, which leaves a small race that [`Registry::start_blocking`] retries around.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn config_yaml(storage: &Path, port: u16) -> String {
    // No auth and no health section: the tests want a plain, permissive registry, and
    // storage-driver health checks would only add background noise.
    format!(
        "version: 0.1\n\
         log:\n  level: error\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: driftwatch-test-secret\n",
        storage = storage.display(),
    )
}

/// Writes the config, spawns the registry and blocks until it answers or fails. On failure
/// the child is reaped and the error carries the registry's own output.
fn launch(bin: &Path, dir: &Path, port: u16) -> Result<Child, String> {
    let config = dir.join("config.yml");
    std::fs::write(&config, config_yaml(&dir.join("storage"), port)).expect("write config");
    let log_path = dir.join("registry.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("open registry log");
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    // Output goes to a file rather than a pipe so a chatty registry can never block on a
    // full pipe that nobody drains.
    let child = Command::new(bin)
        .arg("serve")
        .arg(&config)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; install it with `apt-get install docker-registry`",
                bin.display()
            )
        });

    super::process::wait_ready(
        child,
        &format!("registry on port {port}"),
        &log_path,
        log_start,
        || probe_v2(port),
    )
}

/// One blocking `GET /v2/` over a raw socket; true only on an HTTP 200.
fn probe_v2(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(1));
    if stream.set_read_timeout(timeout).is_err() || stream.set_write_timeout(timeout).is_err() {
        return false;
    }
    let request =
        format!("GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 64];
    let mut filled = 0;
    // The status line fits in the first few bytes; read until we have it or the peer stops.
    while filled < head.len() {
        match stream.read(&mut head[filled..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
        if head[..filled].contains(&b'\n') {
            break;
        }
    }
    let head = String::from_utf8_lossy(&head[..filled]);
    head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200")
}

/// Runs blocking work on tokio's blocking pool and re-raises its panic with the original
/// message, so a failed startup reads the same as in a synchronous test.
async fn run_blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}
