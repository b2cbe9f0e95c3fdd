//! The command line: argument parsing, the one-shot commands, and their output formats.
//! Results go to stdout; logs and errors go to stderr.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::config::{self, Config};
use crate::cycle::{self, CycleOptions, error_chain};
use crate::event::{DetectedBy, Envelope};
use crate::model::{ManifestEvidence, Observation, Reference};
use crate::registry::Registries;
use crate::resolve;
use crate::store::{HistoryItem, Store};

/// Exit status: the command ran (and, for `verify`, the claim holds).
pub const EXIT_OK: u8 = 0;
/// Exit status: an error stopped the command.
pub const EXIT_ERROR: u8 = 1;
/// Exit status: the configuration is invalid (`config validate`).
pub const EXIT_INVALID: u8 = 2;
/// Exit status: drift found with `--fail-on-drift`, or a `verify` claim does not hold.
pub const EXIT_DRIFT: u8 = 3;
/// Exit status: `inspect` found no such reference.
pub const EXIT_NOT_FOUND: u8 = 4;

/// driftwatch: watches container registries for tag and digest drift.
#[derive(Debug, Parser)]
#[command(name = "driftwatch", version, about, long_about = None)]
pub struct Cli {
    /// Config file [default: $DRIFTWATCH_CONFIG, else /etc/driftwatch/driftwatch.toml]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log format on stderr; the level comes from DRIFTWATCH_LOG (default info)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Output formats of the commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: check every watch on its schedule, serve HTTP, reload config on change.
    Run,
    /// Run one check cycle over all (or the named) watches and print the events.
    Check(CheckArgs),
    /// Show the evidence for one reference, without touching stored state.
    Inspect {
        /// HOST[:PORT]/REPO[:TAG][@DIGEST]
        reference: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Pipeline gate: does REF resolve (to the expected digest)?
    Verify {
        /// HOST[:PORT]/REPO[:TAG][@DIGEST]
        reference: String,
        /// The digest REF must resolve to.
        #[arg(long, value_name = "DIGEST")]
        expect_digest: Option<String>,
        /// An artifact type (or alias: signature, sbom, provenance) that must refer to REF.
        #[arg(long, value_name = "TYPE")]
        require_referrer: Vec<String>,
    },
    /// Stored resolutions and events, newest first.
    History {
        /// Only this watch.
        #[arg(long)]
        watch: Option<String>,
        /// At most this many items.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Alert commands.
    #[command(subcommand)]
    Alert(AlertCommand),
}

/// `alert` subcommands.
#[derive(Debug, Subcommand)]
pub enum AlertCommand {
    /// Send one clearly labelled test event through a sink, and report the outcome.
    Test {
        /// The sink's name.
        #[arg(long)]
        sink: String,
    },
}

/// `check` options.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Only these watches (repeatable).
    #[arg(long = "watch", value_name = "NAME")]
    pub watches: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Store events but route none of them to sinks.
    #[arg(long)]
    pub no_alerts: bool,
    /// Exit 3 when an event other than a baseline or check health was found.
    #[arg(long)]
    pub fail_on_drift: bool,
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate the configuration; print every problem with its file and key.
    Validate,
}

/// Runs a parsed command line and returns its exit status. `loaded` is the result of
/// loading the config at [`config::config_path`], read once by the caller (which needs
/// `[otel]` before anything runs).
pub async fn run(cli: Cli, loaded: Result<Config, config::ConfigError>) -> anyhow::Result<u8> {
    let path = config::config_path(cli.config.as_deref());
    let explicit = cli.config.is_some();
    let load = |loaded: Result<Config, config::ConfigError>| config_or_error(&path, loaded);
    match cli.command {
        Command::Config(ConfigCommand::Validate) => Ok(validate(&path, loaded)),
        Command::Run => crate::app::run(path.clone(), load(loaded)?)
            .await
            .map(|()| EXIT_OK),
        Command::Alert(AlertCommand::Test { sink }) => alert_test(&load(loaded)?, &sink).await,
        Command::Check(args) => check(&load(loaded)?, args).await,
        Command::Inspect { reference, format } => {
            let config = load_optional(explicit, &path, loaded)?;
            inspect(&config, &reference, format).await
        }
        Command::Verify {
            reference,
            expect_digest,
            require_referrer,
        } => {
            let config = load_optional(explicit, &path, loaded)?;
            verify(
                &config,
                &reference,
                expect_digest.as_deref(),
                &require_referrer,
            )
            .await
        }
        Command::History {
            watch,
            limit,
            format,
        } => history(&load(loaded)?, watch, limit, format).await,
    }
}

fn config_or_error(
    path: &std::path::Path,
    loaded: Result<Config, config::ConfigError>,
) -> anyhow::Result<Config> {
    loaded.map_err(|e| {
        let lines = e.lines();
        anyhow::anyhow!(
            "invalid configuration {}:\n  {}",
            path.display(),
            lines.join("\n  ")
        )
    })
}

/// `inspect` and `verify` work without a config file, with default registry settings, unless
/// one was named explicitly or exists at the usual place.
fn load_optional(
    explicit: bool,
    path: &std::path::Path,
    loaded: Result<Config, config::ConfigError>,
) -> anyhow::Result<Config> {
    if explicit || path.exists() {
        config_or_error(path, loaded)
    } else {
        Ok(Config::defaults())
    }
}

fn validate(path: &std::path::Path, loaded: Result<Config, config::ConfigError>) -> u8 {
    match loaded {
        Ok(c) => {
            println!(
                "{}: valid ({} watches, {} sinks, {} files)",
                path.display(),
                c.watches.len(),
                c.sinks.len(),
                c.files.len()
            );
            EXIT_OK
        }
        Err(config::ConfigError::Read { path: p, source }) => {
            eprintln!("{}: cannot read: {source}", p.display());
            EXIT_INVALID
        }
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            EXIT_INVALID
        }
    }
}

fn registries(config: &Config) -> Arc<Registries> {
    Arc::new(Registries::new(
        config.registries.clone(),
        config.daemon.concurrency,
        config.daemon.request_timeout,
    ))
}

async fn check(config: &Config, args: CheckArgs) -> anyhow::Result<u8> {
    for name in &args.watches {
        if !config.watches.iter().any(|w| &w.name == name) {
            anyhow::bail!("no watch named {name:?} in the configuration");
        }
    }
    let watches: Vec<_> = config
        .watches
        .iter()
        .filter(|w| args.watches.is_empty() || args.watches.contains(&w.name))
        .map(|w| w.as_ref())
        .collect();
    let store = Store::open(&config.daemon.state).await?;
    let registries = registries(config);
    let options = CycleOptions {
        route_alerts: !args.no_alerts,
        detected_by: DetectedBy::Poll,
    };
    let started = std::time::Instant::now();
    let report = cycle::run_cycle(config, &registries, &store, &watches, options).await?;
    let took = started.elapsed();

    for e in &report.events {
        match args.format {
            Format::Json => println!("{}", serde_json::to_string(e)?),
            Format::Text => println!("{}", event_line(e)),
        }
    }
    let failed: Vec<_> = report
        .watches
        .iter()
        .filter(|w| w.error.is_some())
        .collect();
    if args.format == Format::Text {
        eprintln!(
            "checked {} watches: {} ok, {} failed; {} events; {} registry requests; in {:.3} s",
            report.watches.len(),
            report.watches.len() - failed.len(),
            failed.len(),
            report.events.len(),
            registries.requests_sent(),
            took.as_secs_f64()
        );
    }
    // Deliver what this run routed, within a bound; the rest waits for the next run.
    if !args.no_alerts && !config.sinks.is_empty() {
        let deliverer = crate::alert::Deliverer::new(Arc::new(config.clone()), store.clone());
        let round = deliverer.drain(DRAIN_LIMIT).await?;
        if round.delivered + round.retried + round.dead + round.waiting > 0 {
            eprintln!(
                "alerts: {} delivered, {} to retry, {} dead, {} waiting",
                round.delivered, round.retried, round.dead, round.waiting
            );
        }
    }
    let drift = report
        .events
        .iter()
        .any(|e| e.event_type().is_some_and(|t| t.is_drift()));
    Ok(if drift && args.fail_on_drift {
        EXIT_DRIFT
    } else {
        EXIT_OK
    })
}

/// How long `check` spends delivering alerts before it exits.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(15);

async fn alert_test(config: &Config, name: &str) -> anyhow::Result<u8> {
    let Some(sink) = config.sinks.iter().find(|s| s.name == name) else {
        let names: Vec<&str> = config.sinks.iter().map(|s| s.name.as_str()).collect();
        anyhow::bail!("no sink named {name:?} (configured: {})", names.join(", "));
    };
    let event = crate::alert::test_event(sink);
    let http = reqwest::Client::new();
    match crate::alert::send(&http, sink, std::slice::from_ref(&event)).await {
        Ok(()) => {
            println!("delivered test event {} to sink {name}", event.id);
            Ok(EXIT_OK)
        }
        Err(e) => {
            eprintln!("driftwatch: error: sink {name}: {e}");
            Ok(EXIT_ERROR)
        }
    }
}

fn event_line(e: &Envelope) -> String {
    let digest = |s: &Option<crate::event::StateSummary>| {
        s.as_ref()
            .map_or_else(|| "-".to_string(), |s| s.digest.short())
    };
    let short = e
        .kind
        .strip_prefix(crate::event::TYPE_PREFIX)
        .unwrap_or(&e.kind);
    format!(
        "{}  {:<8}  {:<19}  {}  {} -> {}",
        e.time,
        e.data.severity.to_string(),
        short,
        e.subject,
        digest(&e.data.previous),
        digest(&e.data.current)
    )
}

async fn inspect(config: &Config, reference: &str, format: Format) -> anyhow::Result<u8> {
    let r =
        Reference::parse(reference).with_context(|| format!("invalid reference {reference:?}"))?;
    let registries = registries(config);
    let observation = resolve::fetch_evidence(&registries, &r).await?;
    let mut e = match observation {
        Observation::Present(e) => e,
        Observation::Absent {
            code, soft_delete, ..
        } => {
            match (&soft_delete, format) {
                (Some(soft), Format::Json) => println!(
                    "{}",
                    json!({
                        "reference": r.to_string(),
                        "registry": r.registry(),
                        "repository": r.repository(),
                        "tag": r.tag(),
                        "digest": null,
                        "code": code,
                        "soft_deleted": soft,
                    })
                ),
                (
                    Some(crate::model::SoftDelete::SoftDeleted {
                        deleted_at,
                        purge_at,
                        restore_command,
                        ..
                    }),
                    Format::Text,
                ) => eprintln!(
                    "{r}: not found ({code}), but soft-deleted at {deleted_at}; expected purge \
                     {purge_at}; restore with: {restore_command}"
                ),
                (Some(crate::model::SoftDelete::Unknown { reason }), Format::Text) => {
                    eprintln!("{r}: not found ({code}); soft-delete state unknown: {reason}")
                }
                _ => eprintln!("{r}: not found ({code})"),
            }
            return Ok(EXIT_NOT_FOUND);
        }
    };
    // Referrers are shown when they can be listed; a registry that refuses the listing does
    // not hide the rest of the evidence.
    match resolve::referrers(&registries, &r, &e.digest, None).await {
        Ok((list, _)) => e.referrers = list,
        Err(err) => tracing::warn!(cause = %error_chain(&err), "referrers could not be listed"),
    }
    match format {
        Format::Json => println!("{}", serde_json::to_string(&inspect_json(&r, &e))?),
        Format::Text => print!("{}", inspect_text(&r, &e)),
    }
    Ok(EXIT_OK)
}

fn inspect_json(r: &Reference, e: &ManifestEvidence) -> serde_json::Value {
    let index = e.is_index();
    json!({
        "reference": r.to_string(),
        "registry": r.registry(),
        "repository": r.repository(),
        "tag": r.tag(),
        "digest": e.digest,
        "media_type": e.media_type,
        "size": e.size,
        "platforms": if index { json!(e.platforms) } else { json!(null) },
        "attestations": if index { json!(e.attestations) } else { json!(null) },
        "config": e.config,
        "layers": if index { json!(null) } else { json!(e.layers) },
        "annotations": e.annotations,
        "artifact_type": e.artifact_type,
        "subject": e.subject,
        "referrers": e.referrers,
        "attributes": e.attributes,
        "soft_deleted": null,
    })
}

fn inspect_text(r: &Reference, e: &ManifestEvidence) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "{:<12}{}", "reference", r);
    let _ = writeln!(s, "{:<12}{}", "digest", e.digest);
    let _ = writeln!(s, "{:<12}{}", "media type", e.media_type);
    let _ = writeln!(s, "{:<12}{} bytes", "size", e.size);
    if let Some(t) = &e.artifact_type {
        let _ = writeln!(s, "{:<12}{}", "artifact", t);
    }
    let width = e
        .platforms
        .iter()
        .chain(&e.attestations)
        .map(|p| p.key().len())
        .max()
        .unwrap_or(0);
    for (i, p) in e.platforms.iter().enumerate() {
        let label = if i == 0 { "platforms" } else { "" };
        let _ = writeln!(s, "{label:<12}{:<width$}  {}", p.key(), p.digest);
    }
    for (i, p) in e.attestations.iter().enumerate() {
        let label = if i == 0 { "attestations" } else { "" };
        let _ = writeln!(s, "{label:<12}{:<width$}  {}", p.key(), p.digest);
    }
    if let Some(c) = &e.config {
        let _ = writeln!(
            s,
            "{:<12}{}  {} bytes  {}",
            "config", c.digest, c.size, c.media_type
        );
    }
    for (i, l) in e.layers.iter().enumerate() {
        let label = if i == 0 { "layers" } else { "" };
        let _ = writeln!(
            s,
            "{label:<12}{}  {} bytes  {}",
            l.digest, l.size, l.media_type
        );
    }
    for (i, (k, v)) in e.annotations.iter().enumerate() {
        let label = if i == 0 { "annotations" } else { "" };
        let _ = writeln!(s, "{label:<12}{k}={v}");
    }
    if let Some(a) = &e.attributes {
        for (scope, item) in [("tag", &a.tag), ("manifest", &a.manifest)] {
            let Some(item) = item else { continue };
            let flag = |name: &str, v: Option<bool>| v.map(|v| format!("{name}={v}"));
            let parts: Vec<String> = [
                flag("delete", item.delete_enabled),
                flag("write", item.write_enabled),
                flag("read", item.read_enabled),
                flag("list", item.list_enabled),
                item.quarantine_state
                    .as_ref()
                    .map(|q| format!("quarantine={q}")),
                item.updated.as_ref().map(|u| format!("updated={u}")),
            ]
            .into_iter()
            .flatten()
            .collect();
            let _ = writeln!(s, "{:<12}{}", format!("{scope} attrs"), parts.join("  "));
        }
    }
    for (i, r) in e.referrers.iter().enumerate() {
        let label = if i == 0 { "referrers" } else { "" };
        let _ = writeln!(
            s,
            "{label:<12}{}  {}  ({})",
            r.digest,
            r.artifact_type.as_deref().unwrap_or("-"),
            r.source.as_deref().unwrap_or("-")
        );
    }
    s
}

async fn verify(
    config: &Config,
    reference: &str,
    expect: Option<&str>,
    require_referrer: &[String],
) -> anyhow::Result<u8> {
    let r =
        Reference::parse(reference).with_context(|| format!("invalid reference {reference:?}"))?;
    let expect = expect
        .map(crate::model::Digest::parse)
        .transpose()
        .context("invalid --expect-digest")?;
    for t in require_referrer {
        let alias = crate::model::REFERRER_ALIASES.iter().any(|(a, _)| a == t);
        if !alias && !t.contains('/') {
            anyhow::bail!(
                "--require-referrer {t:?} is neither an alias (signature, sbom, provenance) nor \
                 an artifact type such as application/spdx+json"
            );
        }
    }
    let registries = registries(config);
    let mut resolved = None;
    if let Some(t) = r.tag_only() {
        match resolve::observe(&registries, &t, None, false, Default::default()).await? {
            Observation::Present(e) => resolved = Some(e.digest),
            Observation::Absent { code, .. } => {
                println!("does not hold: {t} does not exist ({code})");
                return Ok(EXIT_DRIFT);
            }
        }
    }
    if let Some(d) = r.digest_only() {
        if let Observation::Absent {
            code, soft_delete, ..
        } = resolve::observe(&registries, &d, None, false, Default::default()).await?
        {
            println!("does not hold: {d} does not exist ({code})");
            if let Some(crate::model::SoftDelete::SoftDeleted {
                purge_at,
                restore_command,
                ..
            }) = soft_delete
            {
                println!(
                    "  it is soft-deleted, restorable until about {purge_at}: {restore_command}"
                );
            }
            return Ok(EXIT_DRIFT);
        }
        match &resolved {
            Some(tag_digest) if Some(tag_digest) != r.digest() => {
                println!(
                    "does not hold: {} points at {tag_digest}, not {}",
                    r.tag().unwrap_or(""),
                    d
                );
                return Ok(EXIT_DRIFT);
            }
            _ => resolved = r.digest().cloned(),
        }
    }
    let digest = resolved.expect("a reference has a tag or a digest");
    if let Some(want) = expect.filter(|w| *w != digest) {
        println!("does not hold: {r} resolves to {digest}, not {want}");
        return Ok(EXIT_DRIFT);
    }
    if !require_referrer.is_empty() {
        let (found, _) = resolve::referrers(&registries, &r, &digest, None).await?;
        let missing: Vec<&str> = require_referrer
            .iter()
            .filter(|t| !found.iter().any(|f| f.satisfies(t)))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            println!(
                "does not hold: {r} ({digest}) has no referrer of type {}",
                missing.join(", ")
            );
            return Ok(EXIT_DRIFT);
        }
    }
    println!("holds: {r} resolves to {digest}");
    Ok(EXIT_OK)
}

async fn history(
    config: &Config,
    watch: Option<String>,
    limit: usize,
    format: Format,
) -> anyhow::Result<u8> {
    let store = Store::open(&config.daemon.state).await?;
    for item in store.history(watch, limit).await? {
        match (format, item) {
            (
                Format::Json,
                HistoryItem::Event {
                    envelope,
                    deliveries,
                    ..
                },
            ) => {
                let line = json!({"kind": "event", "event": envelope, "deliveries": deliveries});
                println!("{line}");
            }
            (
                Format::Json,
                HistoryItem::Resolution {
                    watch,
                    time,
                    digest,
                    evidence,
                },
            ) => {
                let line = json!({"kind": "resolution", "watch": watch, "time": time,
                                  "digest": digest, "evidence": evidence});
                println!("{line}");
            }
            (
                Format::Text,
                HistoryItem::Event {
                    envelope,
                    deliveries,
                    ..
                },
            ) => {
                let sinks: Vec<String> = deliveries
                    .iter()
                    .map(|d| format!("{}:{}", d.sink, d.status))
                    .collect();
                let tail = if sinks.is_empty() {
                    String::new()
                } else {
                    format!("  [{}]", sinks.join(" "))
                };
                println!(
                    "event       {}  {}{tail}",
                    envelope.data.watch,
                    event_line(&envelope)
                );
            }
            (
                Format::Text,
                HistoryItem::Resolution {
                    watch,
                    time,
                    digest,
                    ..
                },
            ) => {
                println!(
                    "resolution  {watch}  {time}  {}",
                    digest.as_deref().unwrap_or("(absent)")
                );
            }
        }
    }
    Ok(EXIT_OK)
}

/// Prints an error and its causes once, on stderr.
pub fn report_error(e: &anyhow::Error) {
    eprintln!("driftwatch: error: {}", error_chain(e.as_ref()));
}
