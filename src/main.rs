//! The `driftwatch` binary: parses the command line, sets up logging, runs the command and
//! maps its result to an exit status.

use std::process::ExitCode;

use std::time::Duration;

use clap::Parser as _;
use driftwatch::cli::{self, Cli, LogFormat};
use driftwatch::telemetry::{self, Telemetry};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// How long exiting may wait for telemetry to reach a collector; only a collector that is
/// down or slow makes it wait at all.
const TELEMETRY_SHUTDOWN: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // [otel] is read before logging starts, so that the OTel layers can join the subscriber.
    // A config that cannot be loaded means no export; the command itself reports why.
    let path = driftwatch::config::config_path(cli.config.as_deref());
    let loaded = driftwatch::config::Config::load(&path);
    let otel = loaded.as_ref().map(|c| c.otel.clone()).unwrap_or_default();
    let (telemetry, otel_error) = match Telemetry::init(&otel) {
        Ok(t) => (t, None),
        Err(e) => (Telemetry::disabled(), Some(e)),
    };
    init_logging(cli.log_format, &telemetry);
    if let Some(e) = otel_error {
        let cause = driftwatch::cycle::error_chain(&e);
        tracing::warn!(cause = %cause, "OpenTelemetry export is off");
    }
    telemetry::set_global(telemetry.clone());
    // driftwatch mostly waits on the network: one runtime thread avoids handing every answer
    // between workers, which cost more CPU than the work itself. Store calls still run on
    // the blocking pool; a few threads keep up, and each extra one keeps a malloc arena.
    let builder = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build();
    let runtime = match builder {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("driftwatch: error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_ERROR);
        }
    };
    let code = match runtime.block_on(cli::run(cli, loaded)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            cli::report_error(&e);
            ExitCode::from(cli::EXIT_ERROR)
        }
    };
    // Outside the runtime: shutdown blocks, for at most its bound.
    if let Err(e) = telemetry.shutdown(TELEMETRY_SHUTDOWN) {
        tracing::warn!(cause = %e, "telemetry was not fully exported");
    }
    code
}

/// Info for driftwatch; the cron library announces every job at info, which is noise here.
const DEFAULT_LOG_FILTER: &str = "info,tokio_cron_scheduler=warn";

fn init_logging(format: LogFormat, telemetry: &Telemetry) {
    // Built twice: the stderr log and the OTel log bridge each own a filter.
    let filter = || {
        EnvFilter::try_from_env("DRIFTWATCH_LOG")
            .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER))
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let stderr = match format {
        LogFormat::Json => stderr.json().boxed(),
        LogFormat::Text => stderr.boxed(),
    };
    tracing_subscriber::registry()
        .with(stderr.with_filter(telemetry::stderr_filter(filter())))
        .with(telemetry.layer(filter()))
        .init();
}
