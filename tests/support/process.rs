//! Starting real servers for tests: wait until a spawned process answers its readiness probe,
//! and read what it logged when it does not.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// How long a server may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often readiness is probed.
pub const READY_POLL: Duration = Duration::from_millis(25);

/// Polls `probe` until it succeeds, the process exits, or [`READY_TIMEOUT`] passes. On
/// failure the process is killed and the error carries what it logged since `log_start`.
pub fn wait_ready(
    mut child: Child,
    what: &str,
    log_path: &Path,
    log_start: u64,
    probe: impl Fn() -> bool,
) -> Result<Child, String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("poll {what}: {e}"))? {
            return Err(format!(
                "{what} exited with {status} before becoming ready; output:\n{}",
                read_log_from(log_path, log_start)
            ));
        }
        if probe() {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{what} not ready within {READY_TIMEOUT:?}; output:\n{}",
                read_log_from(log_path, log_start)
            ));
        }
        std::thread::sleep(READY_POLL);
    }
}

/// The log file's contents from byte `offset` on.
pub fn read_log_from(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `limit`: what a test waits
/// for is the system's own progress, never a fixed sleep.
pub async fn until<T>(limit: Duration, what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
