//! Helpers for running the driftwatch binary from a scratch directory holding its config,
//! with an environment scrubbed of anything inherited that could change its behaviour.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// File name `write_config` uses, matching the daemon's default config file name.
pub const CONFIG_FILE: &str = "driftwatch.toml";
/// How long [`run_driftwatch`] lets one invocation run before killing it and failing.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_POLL: Duration = Duration::from_millis(10);

/// Path of the driftwatch binary Cargo built for this integration test.
pub fn driftwatch_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_driftwatch"))
}

/// A temporary working directory for one test, removed on drop.
pub struct TestDir {
    dir: TempDir,
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("driftwatch-test-")
            .tempdir()
            .expect("create test dir");
        TestDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `driftwatch.toml` into the directory and returns its path.
    pub fn write_config(&self, toml: &str) -> PathBuf {
        write_config(self.path(), toml)
    }

    /// Writes any file relative to the directory, creating parent directories.
    pub fn write(&self, relative: &str, contents: &str) -> PathBuf {
        let path = self.path().join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dirs");
        }
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
        path
    }

    /// Runs driftwatch to completion in this directory; see [`run_driftwatch`].
    pub fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        run_driftwatch(self.path(), args, env)
    }

    /// Starts driftwatch in this directory without waiting; see [`spawn_driftwatch`].
    pub fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> DriftwatchProcess {
        spawn_driftwatch(self.path(), args, env)
    }
}

/// Writes `toml` to `dir/driftwatch.toml` and returns the path.
pub fn write_config(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, toml).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
    path
}

/// A `Command` for driftwatch in `dir` with `DRIFTWATCH_LOG=warn` and then `env` applied.
///
/// Inherited `DRIFTWATCH*` variables (config path, `DRIFTWATCH__*` overrides) and proxy
/// settings are removed first, so a developer's shell cannot change what a test sees and
/// loopback traffic is never sent through a proxy.
pub fn driftwatch_command(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(driftwatch_bin());
    command.current_dir(dir).args(args).stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if is_scrubbed(&name) {
            command.env_remove(&name);
        }
    }
    command.env("DRIFTWATCH_LOG", "warn");
    command.envs(env.iter().copied());
    command
}

fn is_scrubbed(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    let upper = name.to_ascii_uppercase();
    // An OTLP endpoint in the environment would make every test export to it.
    upper.starts_with("DRIFTWATCH")
        || upper.starts_with("OTEL_")
        || matches!(
            upper.as_str(),
            "HTTP_PROXY" | "HTTPS_PROXY" | "ALL_PROXY" | "NO_PROXY"
        )
}

/// Runs driftwatch to completion in `dir` and returns its output, failing the test if it
/// runs longer than [`RUN_TIMEOUT`].
pub fn run_driftwatch(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    run_driftwatch_with_timeout(dir, args, env, RUN_TIMEOUT)
}

pub fn run_driftwatch_with_timeout(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Output {
    let mut process = spawn_driftwatch(dir, args, env);
    match process.wait_timeout(timeout) {
        Some(_) => process.into_output(),
        None => {
            let output = process.kill_and_collect();
            panic!(
                "driftwatch {args:?} still running after {timeout:?}; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// Starts driftwatch in `dir` with piped stdout/stderr that are drained in the background.
pub fn spawn_driftwatch(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> DriftwatchProcess {
    let mut child = driftwatch_command(dir, args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", driftwatch_bin()));
    // Drain both pipes on threads: a daemon that logs a lot must never stall on a full pipe.
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    DriftwatchProcess {
        child,
        stdout: Some(stdout),
        stderr: Some(stderr),
        status: None,
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buffer = Vec::new();
        // A read error just ends the capture; the exit status tells the real story.
        let _ = pipe.read_to_end(&mut buffer);
        buffer
    })
}

/// A running driftwatch process, killed on drop if still alive.
pub struct DriftwatchProcess {
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    status: Option<ExitStatus>,
}

impl DriftwatchProcess {
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Exit status if the process has exited, without blocking.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("poll driftwatch");
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit. `std` offers no timed wait, so this
    /// polls the exit status at a short interval within the bound.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(EXIT_POLL);
        }
    }

    /// Sends SIGTERM (through `kill(1)`, as std only offers SIGKILL) for graceful-shutdown
    /// tests; pair it with [`DriftwatchProcess::wait_timeout`].
    pub fn terminate(&mut self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(
            status.success() || self.try_status().is_some(),
            "kill -TERM failed"
        );
    }

    /// Kills the process (SIGKILL) and returns what it printed.
    pub fn kill_and_collect(mut self) -> Output {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            self.status = Some(self.child.wait().expect("reap driftwatch"));
        }
        self.into_output()
    }

    /// Waits for exit (no bound: call after `wait_timeout` succeeded) and returns the output.
    pub fn into_output(mut self) -> Output {
        let status = match self.status {
            Some(status) => status,
            None => self.child.wait().expect("wait for driftwatch"),
        };
        self.status = Some(status);
        let stdout = self.stdout.take().map(join_output).unwrap_or_default();
        let stderr = self.stderr.take().map(join_output).unwrap_or_default();
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

fn join_output(handle: JoinHandle<Vec<u8>>) -> Vec<u8> {
    handle.join().expect("output reader thread")
}

impl Drop for DriftwatchProcess {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The JSON lines a successful command printed (a `check --format json` run's events),
/// failing the test with its stderr when the command failed.
pub fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "driftwatch failed: {}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// The `type` of each event.
pub fn event_types(events: &[serde_json::Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}
