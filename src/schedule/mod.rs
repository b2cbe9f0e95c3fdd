//! The daemon's scheduler. Watches are grouped by (schedule, reference): a group is checked
//! as one cycle, so a reference named by several watches is resolved once. Each cron tick
//! queues the tick's groups, each delayed by a stable per-group jitter so that thousands of
//! watches on one schedule do not hit a registry in one burst. A group is never checked twice
//! at once; a tick that finds it still running is skipped and counted. On-demand triggers
//! (registry webhooks) check a group at once, or right after its running check.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::time::DelayQueue;

use crate::config::{Config, Watch};
use crate::event::DetectedBy;

/// Identifies a group: the schedule and the canonical reference its watches share.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    /// The six-field cron expression.
    pub schedule: String,
    /// The canonical reference.
    pub reference: String,
}

/// Watches checked together, and when in each interval they are due.
#[derive(Debug, Clone)]
pub struct Group {
    /// The watches, in config order.
    pub watches: Vec<Arc<Watch>>,
    /// Delay after each cron tick.
    pub offset: Duration,
}

/// The watch set arranged for scheduling.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Every group.
    pub groups: BTreeMap<GroupKey, Group>,
    /// Each watch's group.
    pub by_watch: HashMap<String, GroupKey>,
    /// Each schedule's groups.
    pub by_schedule: BTreeMap<String, Vec<GroupKey>>,
}

impl Plan {
    /// Groups `config`'s watches; `jitter` is the fraction of each schedule's interval over
    /// which its groups are spread.
    pub fn new(config: &Config) -> Plan {
        let mut plan = Plan::default();
        let mut intervals: HashMap<String, Duration> = HashMap::new();
        for w in &config.watches {
            let key = GroupKey {
                schedule: w.schedule.clone(),
                reference: w.reference.to_string(),
            };
            let interval = *intervals
                .entry(w.schedule.clone())
                .or_insert_with(|| interval_of(&w.schedule, Utc::now()));
            plan.by_watch.insert(w.name.clone(), key.clone());
            if !plan.groups.contains_key(&key) {
                plan.by_schedule
                    .entry(key.schedule.clone())
                    .or_default()
                    .push(key.clone());
            }
            plan.groups
                .entry(key.clone())
                .or_insert_with(|| Group {
                    watches: Vec::new(),
                    offset: jitter_offset(&key, interval, config.daemon.jitter),
                })
                .watches
                .push(w.clone());
        }
        plan
    }

    /// When the watch's next check is due, after `now`.
    pub fn next_due(&self, watch: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let key = self.by_watch.get(watch)?;
        let offset = chrono::Duration::from_std(self.groups.get(key)?.offset).ok()?;
        let cron = parse_cron(&key.schedule)?;
        // The check of the current interval may still be waiting out its jitter.
        let previous = now - chrono::Duration::from_std(interval_of(&key.schedule, now)).ok()?;
        let mut it = cron.iter_after(previous);
        it.find(|t| *t + offset > now).map(|t| t + offset)
    }
}

/// The distinct schedules of `config`'s watches, sorted; what the cron jobs are made of.
pub fn schedules(config: &Config) -> Vec<String> {
    let set: std::collections::BTreeSet<&str> =
        config.watches.iter().map(|w| w.schedule.as_str()).collect();
    set.into_iter().map(str::to_string).collect()
}

fn parse_cron(schedule: &str) -> Option<croner::Cron> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(schedule)
        .ok()
}

/// The gap between the next two occurrences of a schedule after `from`; one minute if the
/// schedule cannot be read (validation rejects such schedules before they get here).
pub fn interval_of(schedule: &str, from: DateTime<Utc>) -> Duration {
    let Some(cron) = parse_cron(schedule) else {
        return Duration::from_secs(60);
    };
    let mut it = cron.iter_after(from);
    match (it.next(), it.next()) {
        (Some(a), Some(b)) => (b - a).to_std().unwrap_or(Duration::from_secs(60)),
        _ => Duration::from_secs(60),
    }
}

/// A stable offset in `[0, interval × fraction)` from the group key, so a group is checked at
/// the same point of every interval, across restarts and machines.
pub fn jitter_offset(key: &GroupKey, interval: Duration, fraction: f64) -> Duration {
    let window = interval.mul_f64(fraction.clamp(0.0, 1.0));
    let window_ms = window.as_millis() as u64;
    if window_ms == 0 {
        return Duration::ZERO;
    }
    // FNV-1a: tiny, deterministic, and spreads similar references well enough.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.schedule.bytes().chain([0]).chain(key.reference.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Duration::from_millis(h % window_ms)
}

/// Requests to the dispatcher.
pub enum Command<C> {
    /// A cron tick of this schedule fired.
    Tick(String),
    /// Check these watches now (from a registry webhook).
    Trigger(Vec<String>, DetectedBy),
    /// A new validated config, and what the runner needs with it.
    Replace(Arc<Config>, C),
}

/// What runs one group's check; the daemon's runner is a check cycle.
pub type Runner<C> = Arc<
    dyn Fn(C, Vec<Arc<Watch>>, DetectedBy) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// Counters the status line and endpoints report.
#[derive(Debug, Default)]
pub struct Stats {
    /// Group checks started.
    pub started: AtomicU64,
    /// Ticks skipped because the group's previous check was still running.
    pub skipped: AtomicU64,
    /// Group checks running now.
    pub running: AtomicU64,
}

/// The dispatcher's shared, readable view: the current plan and counters.
#[derive(Default)]
pub struct View {
    /// The plan in force.
    pub plan: Mutex<Arc<Plan>>,
    /// Counters.
    pub stats: Stats,
}

/// Runs the dispatcher until `commands` closes or `stop` fires, then waits up to `drain` for
/// running checks. `heartbeat` is called every `heartbeat_every` from the dispatcher's own
/// loop, so that a wedged dispatcher stops the heartbeat (and systemd's watchdog notices).
pub async fn dispatch<C: Clone + Send + 'static>(
    mut commands: mpsc::Receiver<Command<C>>,
    runner: Runner<C>,
    view: Arc<View>,
    stop: tokio_util::sync::CancellationToken,
    drain: Duration,
    heartbeat_every: Option<Duration>,
    heartbeat: Arc<dyn Fn() + Send + Sync>,
) {
    let mut ctx: Option<C> = None;
    let mut plan = Arc::new(Plan::default());
    let mut queue: DelayQueue<GroupKey> = DelayQueue::new();
    let mut queued: HashSet<GroupKey> = HashSet::new();
    let mut running: HashMap<GroupKey, bool> = HashMap::new();
    let mut tasks: JoinSet<GroupKey> = JoinSet::new();
    let mut beat = tokio::time::interval(heartbeat_every.unwrap_or(Duration::from_secs(3600)));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let start = |key: &GroupKey,
                 by: DetectedBy,
                 plan: &Plan,
                 ctx: &Option<C>,
                 running: &mut HashMap<GroupKey, bool>,
                 tasks: &mut JoinSet<GroupKey>| {
        let (Some(group), Some(ctx)) = (plan.groups.get(key), ctx) else {
            return;
        };
        if let Some(rerun) = running.get_mut(key) {
            // Never twice at once: a tick is skipped; a webhook asks for one more run after.
            match by {
                DetectedBy::Poll => {
                    view.stats.skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        reference = %key.reference,
                        "previous check still running; tick skipped"
                    );
                }
                DetectedBy::Webhook => *rerun = true,
            }
            return;
        }
        running.insert(key.clone(), false);
        view.stats.started.fetch_add(1, Ordering::Relaxed);
        view.stats.running.fetch_add(1, Ordering::Relaxed);
        let fut = runner(ctx.clone(), group.watches.clone(), by);
        let key = key.clone();
        tasks.spawn(async move {
            fut.await;
            key
        });
    };

    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            cmd = commands.recv() => match cmd {
                None => break,
                Some(Command::Tick(schedule)) => {
                    for key in plan.by_schedule.get(&schedule).into_iter().flatten() {
                        if queued.insert(key.clone()) {
                            queue.insert(key.clone(), plan.groups[key].offset);
                        }
                    }
                }
                Some(Command::Trigger(names, by)) => {
                    let keys: HashSet<GroupKey> =
                        names.iter().filter_map(|n| plan.by_watch.get(n).cloned()).collect();
                    for key in keys {
                        start(&key, by, &plan, &ctx, &mut running, &mut tasks);
                    }
                }
                Some(Command::Replace(config, new_ctx)) => {
                    let new_plan = Arc::new(Plan::new(&config));
                    // New groups (new watches, changed references or schedules) get their
                    // baseline at once rather than waiting for their first tick.
                    let fresh: Vec<GroupKey> = new_plan
                        .groups
                        .keys()
                        .filter(|k| !plan.groups.contains_key(*k))
                        .cloned()
                        .collect();
                    let first = ctx.is_none();
                    ctx = Some(new_ctx);
                    plan = new_plan;
                    *view.plan.lock().unwrap_or_else(|e| e.into_inner()) = plan.clone();
                    if !first {
                        for key in fresh {
                            start(&key, DetectedBy::Poll, &plan, &ctx, &mut running, &mut tasks);
                        }
                    }
                }
            },
            Some(expired) = std::future::poll_fn(|cx| queue.poll_expired(cx)),
                if !queue.is_empty() => {
                let key = expired.into_inner();
                queued.remove(&key);
                start(&key, DetectedBy::Poll, &plan, &ctx, &mut running, &mut tasks);
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                view.stats.running.fetch_sub(1, Ordering::Relaxed);
                match done {
                    Ok(key) => {
                        if running.remove(&key) == Some(true) {
                            start(&key, DetectedBy::Webhook, &plan, &ctx, &mut running, &mut tasks);
                        }
                    }
                    Err(e) => tracing::error!(cause = %e, "a check task panicked"),
                }
            }
            _ = beat.tick(), if heartbeat_every.is_some() => heartbeat(),
        }
    }

    // Stop starting checks; let running ones finish within the bound.
    let wait = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(drain, wait).await.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "checks still running at the shutdown bound; abandoned"
        );
        tasks.abort_all();
    }
}

#[cfg(test)]
mod tests;
