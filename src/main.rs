//! The `driftwatch` binary: parses the command line, sets up logging, runs the command and
//! maps its result to an exit status.

use std::process::ExitCode;

use clap::Parser as _;
use driftwatch::cli::{self, Cli, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // The daemon spreads its work over every core; a one-shot command is mostly waiting on
    // the network, and one thread avoids handing each answer between workers.
    let builder = match cli.command {
        cli::Command::Run => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            // Store calls are short; a few blocking threads keep up, and every extra thread
            // keeps a malloc arena of its own.
            b.max_blocking_threads(4);
            b
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build();
    let runtime = match builder {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("driftwatch: error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_ERROR);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            cli::report_error(&e);
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}

/// Info for driftwatch; the cron library announces every job at info, which is noise here.
const DEFAULT_LOG_FILTER: &str = "info,tokio_cron_scheduler=warn";

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("DRIFTWATCH_LOG")
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
