//! `driftwatch run`: wires config, store, scheduler, HTTP endpoints, config reload and
//! systemd notifications together, and shuts them down in order on a signal.
//!
//! Background services (HTTP, the scheduler, alert delivery) are started here and stopped
//! through one cancellation token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{self, Config};
use crate::cycle::{self, CycleOptions, error_chain};
use crate::event::DetectedBy;
use crate::registry::Registries;
use crate::schedule::{self, Command, Runner, View};
use crate::server::{self, Health, ServerState};
use crate::store::Store;

/// How long config-file events must settle before a reload: editors write in several steps.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(300);

/// What a check needs that changes with the config.
pub struct Live {
    /// The config in force.
    pub config: Arc<Config>,
    /// Registry clients built from it.
    pub registries: Arc<Registries>,
}

impl Live {
    fn new(config: Arc<Config>) -> Arc<Live> {
        let registries = Arc::new(Registries::new(
            config.registries.clone(),
            config.daemon.concurrency,
            config.daemon.request_timeout,
        ));
        Arc::new(Live { config, registries })
    }
}

/// Runs the daemon until SIGTERM or SIGINT. A second signal exits at once.
pub async fn run(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    trim_heap();
    let store = Store::open(&config.daemon.state).await?;
    tracing::info!(
        config = %config_path.display(),
        state = %store.path().display(),
        watches = config.watches.len(),
        "starting"
    );

    let stop = CancellationToken::new();
    let health = Arc::new(RwLock::new(Health {
        ready: false,
        problems: vec!["starting".to_string()],
    }));
    let current = Arc::new(RwLock::new(config.clone()));
    let view = Arc::new(View::default());

    // HTTP first, so that a port already in use stops start-up before anything runs.
    let listener = tokio::net::TcpListener::bind(config.daemon.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.daemon.listen))?;
    // The dispatcher's channel, with the config already queued: any check requested over
    // HTTP is queued behind it, so the dispatcher never sees a trigger without a plan.
    let (tx, rx) = mpsc::channel::<Command<Arc<Live>>>(1024);
    tx.send(Command::Replace(config.clone(), Live::new(config.clone())))
        .await
        .context("the scheduler stopped")?;
    let state = ServerState {
        health: health.clone(),
        config: current.clone(),
        view: view.clone(),
        store: store.clone(),
        trigger: hook_trigger(tx.clone()),
    };
    let http_stop = stop.clone();
    let http = tokio::spawn(async move {
        let served = axum::serve(listener, server::router(state))
            .with_graceful_shutdown(http_stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(cause = %e, "HTTP server failed");
        }
    });
    tracing::info!(listen = %config.daemon.listen, "serving HTTP");

    // Alert delivery: checks commit outbox rows and wake the deliverer.
    let wake = Arc::new(tokio::sync::Notify::new());
    let deliverer = Arc::new(crate::alert::Deliverer::new(config.clone(), store.clone()));
    let delivery = tokio::spawn(deliverer.clone().run(stop.clone(), wake.clone()));
    // Gauges are read from the store on a timer, right whichever path changed them.
    let gauges = tokio::spawn(record_gauges(store.clone(), current.clone(), stop.clone()));
    let runner = check_runner(store.clone(), wake);
    let watchdog = sd_notify::watchdog_enabled();
    let beat_view = view.clone();
    let heartbeat: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        let status = status_line(&beat_view);
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Watchdog,
            sd_notify::NotifyState::Status(&status),
        ]);
    });
    // The dispatcher: every check starts here.
    let dispatcher = tokio::spawn(schedule::dispatch(
        rx,
        runner,
        view.clone(),
        stop.clone(),
        config.daemon.shutdown_timeout,
        watchdog.map(|w| w / 2),
        heartbeat,
    ));

    let mut cron = CronJobs::start(tx.clone()).await?;
    cron.sync(&schedule::schedules(&config)).await?;

    // Reloads: file changes (debounced) and SIGHUP.
    let (reload_tx, mut reload_rx) = mpsc::channel::<()>(1);
    let mut watcher = ConfigWatcher::start(&config_path, reload_tx.clone())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    // Ready only now: config and state are loaded, checks are scheduled, and changes to the
    // config files will be seen.
    *health.write().unwrap_or_else(|e| e.into_inner()) = Health {
        ready: true,
        problems: vec![],
    };
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status_line(&view)),
    ]);
    tracing::info!("ready");
    let reloader = Reloader {
        path: config_path,
        health,
        current,
        tx: tx.clone(),
        view: view.clone(),
        deliverer,
    };

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reloader.reload(&mut cron).await,
            Some(()) = reload_rx.recv() => {
                // Wait until the files have been quiet for a moment.
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(RELOAD_DEBOUNCE) => break,
                        Some(()) = reload_rx.recv() => {}
                    }
                }
                watcher.refresh();
                reloader.reload(&mut cron).await;
            }
        }
    }

    // Shutdown: no new checks, running ones get the bound, then the store is closed as the
    // last handle drops. A second signal does not wait.
    tracing::info!("stopping");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    stop.cancel();
    let _ = cron.scheduler.shutdown().await;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting without waiting for running checks");
        std::process::exit(1);
    });
    let _ = dispatcher.await;
    let _ = gauges.await;
    let _ = delivery.await;
    let _ = http.await;
    tracing::info!("stopped");
    Ok(())
}

/// Gives the memory that config parsing freed back to the system. Reading a large config
/// allocates hundreds of thousands of small blocks; glibc keeps their pages for the life of
/// the process otherwise (about 20 MB for 10,000 watches).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only returns free pages to the kernel; it takes no pointers and
        // has no preconditions.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Inbound hooks queue their checks without waiting: a full queue is answered 503, so the
/// registry retries rather than holding a connection open.
fn hook_trigger(tx: mpsc::Sender<Command<Arc<Live>>>) -> server::Trigger {
    Arc::new(move |names| {
        tx.try_send(Command::Trigger(names, DetectedBy::Webhook))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => server::TriggerError::Full,
                mpsc::error::TrySendError::Closed(_) => server::TriggerError::Stopped,
            })
    })
}

fn check_runner(store: Store, wake: Arc<tokio::sync::Notify>) -> Runner<Arc<Live>> {
    Arc::new(move |live: Arc<Live>, watches, by: DetectedBy| {
        let store = store.clone();
        let wake = wake.clone();
        Box::pin(async move {
            let refs: Vec<&config::Watch> = watches.iter().map(|w| w.as_ref()).collect();
            let options = CycleOptions {
                route_alerts: true,
                detected_by: by,
            };
            let result =
                cycle::run_cycle(&live.config, &live.registries, &store, &refs, options).await;
            match result {
                Ok(report) if !report.events.is_empty() => wake.notify_one(),
                Ok(_) => {}
                // Nothing was committed; the next tick checks these watches again.
                Err(e) => tracing::error!(cause = %error_chain(&e), "storing a check failed"),
            }
        })
    })
}

/// How often `driftwatch.watches` and the outbox gauges are read from the store.
const GAUGE_INTERVAL: Duration = Duration::from_secs(30);

/// Records the watch and outbox gauges until `stop`; nothing at all when export is off.
async fn record_gauges(store: Store, config: Arc<RwLock<Arc<Config>>>, stop: CancellationToken) {
    if !crate::telemetry::global().is_enabled() {
        return;
    }
    let metrics = crate::telemetry::metrics();
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The store keeps rows of removed watches; only configured ones count.
        let watched: std::collections::HashSet<String> = {
            let config = config.read().unwrap_or_else(|e| e.into_inner());
            config.watches.iter().map(|w| w.name.clone()).collect()
        };
        if let Ok(rows) = store.watch_rows().await {
            let (mut ok, mut failing) = (0, 0);
            for row in rows.iter().filter(|r| watched.contains(&r.name)) {
                match row.outcome.as_deref() {
                    Some("ok") => ok += 1,
                    Some("failed") => failing += 1,
                    _ => {}
                }
            }
            metrics.watches(ok, failing);
        }
        if let Ok(c) = store.outbox_counts().await {
            metrics.outbox(c.pending.max(0) as u64, c.dead.max(0) as u64);
        }
    }
}

fn status_line(view: &View) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let plan = view.plan.lock().unwrap_or_else(|e| e.into_inner()).clone();
    format!(
        "{} watches in {} groups; {} checks started, {} skipped, {} running",
        plan.by_watch.len(),
        plan.groups.len(),
        view.stats.started.load(Relaxed),
        view.stats.skipped.load(Relaxed),
        view.stats.running.load(Relaxed),
    )
}

/// One cron job per distinct schedule; each tick tells the dispatcher which schedule fired.
struct CronJobs {
    scheduler: JobScheduler,
    jobs: HashMap<String, Uuid>,
    tx: mpsc::Sender<Command<Arc<Live>>>,
}

impl CronJobs {
    async fn start(tx: mpsc::Sender<Command<Arc<Live>>>) -> anyhow::Result<CronJobs> {
        let scheduler = JobScheduler::new()
            .await
            .context("cannot create the cron scheduler")?;
        scheduler
            .start()
            .await
            .context("cannot start the cron scheduler")?;
        Ok(CronJobs {
            scheduler,
            jobs: HashMap::new(),
            tx,
        })
    }

    async fn sync(&mut self, schedules: &[String]) -> anyhow::Result<()> {
        let stale: Vec<String> = self
            .jobs
            .keys()
            .filter(|s| !schedules.contains(s))
            .cloned()
            .collect();
        for s in stale {
            if let Some(id) = self.jobs.remove(&s) {
                let _ = self.scheduler.remove(&id).await;
            }
        }
        for s in schedules {
            if self.jobs.contains_key(s) {
                continue;
            }
            let tx = self.tx.clone();
            let name = s.clone();
            let job = Job::new_async(s.as_str(), move |_, _| {
                let tx = tx.clone();
                let name = name.clone();
                Box::pin(async move {
                    let _ = tx.send(Command::Tick(name)).await;
                })
            })
            .with_context(|| format!("cannot schedule {s:?}"))?;
            let id = self
                .scheduler
                .add(job)
                .await
                .with_context(|| format!("cannot schedule {s:?}"))?;
            self.jobs.insert(s.clone(), id);
        }
        Ok(())
    }
}

struct Reloader {
    deliverer: Arc<crate::alert::Deliverer>,
    path: PathBuf,
    health: Arc<RwLock<Health>>,
    current: Arc<RwLock<Arc<Config>>>,
    tx: mpsc::Sender<Command<Arc<Live>>>,
    view: Arc<View>,
}

impl Reloader {
    /// Validates the new config first; an invalid one leaves the daemon on the old one and
    /// says why in the log and in `/readyz`.
    async fn reload(&self, cron: &mut CronJobs) {
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Reloading,
            sd_notify::NotifyState::monotonic_usec_now()
                .unwrap_or(sd_notify::NotifyState::Custom("")),
        ]);
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let result = match loaded {
            Ok(r) => r,
            Err(e) => Err(config::ConfigError::Internal(e.to_string())),
        };
        match result {
            Ok(new) => {
                let new = Arc::new(new);
                let old = self
                    .current
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if new.daemon.state != old.daemon.state || new.daemon.listen != old.daemon.listen {
                    tracing::warn!("daemon.state and daemon.listen changes take effect at restart");
                }
                let _ = self
                    .tx
                    .send(Command::Replace(new.clone(), Live::new(new.clone())))
                    .await;
                let schedules = schedule::schedules(&new);
                if let Err(e) = cron.sync(&schedules).await {
                    tracing::error!(cause = %error_chain(e.as_ref()), "rescheduling failed");
                }
                self.deliverer.replace_config(new.clone());
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
                *self.health.write().unwrap_or_else(|e| e.into_inner()) = Health {
                    ready: true,
                    problems: Vec::new(),
                };
                tracing::info!(watches = new.watches.len(), "configuration reloaded");
                trim_heap();
                crate::telemetry::metrics().config_reload(crate::telemetry::ReloadOutcome::Ok);
            }
            Err(e) => {
                crate::telemetry::metrics().config_reload(crate::telemetry::ReloadOutcome::Failed);
                let problems = e.lines();
                for p in &problems {
                    tracing::warn!(problem = %p, "invalid configuration; keeping the previous one");
                }
                *self.health.write().unwrap_or_else(|e| e.into_inner()) = Health {
                    ready: false,
                    problems,
                };
            }
        }
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status_line(&self.view)),
        ]);
    }
}

/// Watches the config file's directory and `conf.d` (the directories, because editors and
/// `systemctl edit` replace files by renaming) and signals a reload on relevant changes.
struct ConfigWatcher {
    watcher: notify::RecommendedWatcher,
    conf_d: PathBuf,
    conf_d_watched: bool,
}

impl ConfigWatcher {
    fn start(path: &Path, tx: mpsc::Sender<()>) -> anyhow::Result<ConfigWatcher> {
        use notify::{EventKind, RecursiveMode, Watcher as _};

        // Events carry absolute paths; compare against absolute ones.
        let file = std::path::absolute(path).context("cannot resolve the config path")?;
        let dir = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        let conf_d = config::conf_d(&file);
        let relevant = {
            let (file, conf_d) = (file.clone(), conf_d.clone());
            move |p: &Path| {
                p == file
                    || p == conf_d
                    || (p.parent() == Some(&conf_d) && p.extension().is_some_and(|e| e == "toml"))
            }
        };
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            // Our own reads of the files must not trigger another reload.
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            if event.paths.iter().any(|p| relevant(p)) {
                // A full channel already holds a pending reload; one is enough.
                let _ = tx.try_send(());
            }
        })
        .context("cannot watch the configuration files")?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
        let mut w = ConfigWatcher {
            watcher,
            conf_d,
            conf_d_watched: false,
        };
        w.refresh();
        Ok(w)
    }

    /// Starts watching `conf.d` once it exists; it may be created after start-up.
    fn refresh(&mut self) {
        use notify::{RecursiveMode, Watcher as _};
        if !self.conf_d_watched && self.conf_d.is_dir() {
            match self
                .watcher
                .watch(&self.conf_d, RecursiveMode::NonRecursive)
            {
                Ok(()) => self.conf_d_watched = true,
                Err(e) => {
                    tracing::warn!(cause = %e, dir = %self.conf_d.display(), "cannot watch conf.d")
                }
            }
        }
    }
}
