//! Scheduler tests on a paused tokio clock: jitter, skipping, triggers, reloads, shutdown.

use std::sync::Mutex as StdMutex;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::*;

fn config(text: &str) -> Arc<Config> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("driftwatch.toml");
    std::fs::write(&p, text).unwrap();
    Arc::new(Config::load_with_env(&p, &[]).unwrap())
}

fn watches(n: usize, schedule: &str) -> String {
    let mut s = String::from("[daemon]\njitter = 0.5\n");
    for i in 0..n {
        s.push_str(&format!(
            "[[watch]]\nname = \"w{i}\"\nimage = \"r.io/team/app{i}:prod\"\n\
             schedule = \"{schedule}\"\n"
        ));
    }
    s
}

type Calls = Arc<StdMutex<Vec<(Instant, Vec<String>, DetectedBy)>>>;

/// A runner that records each start and then waits for a permit, so tests control how long
/// a check runs.
fn recording_runner(calls: Calls, gate: Arc<Semaphore>) -> Runner<()> {
    Arc::new(move |(), watches: Vec<Arc<Watch>>, by| {
        let calls = calls.clone();
        let gate = gate.clone();
        Box::pin(async move {
            let names = watches.iter().map(|w| w.name.clone()).collect();
            calls.lock().unwrap().push((Instant::now(), names, by));
            gate.acquire().await.unwrap().forget();
        })
    })
}

struct Harness {
    tx: mpsc::Sender<Command<()>>,
    calls: Calls,
    gate: Arc<Semaphore>,
    view: Arc<View>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn harness() -> Harness {
    let (tx, rx) = mpsc::channel(64);
    let calls: Calls = Arc::default();
    let gate = Arc::new(Semaphore::new(0));
    let view = Arc::new(View::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(dispatch(
        rx,
        recording_runner(calls.clone(), gate.clone()),
        view.clone(),
        stop.clone(),
        Duration::from_secs(10),
        None,
        Arc::new(|| {}),
    ));
    Harness {
        tx,
        calls,
        gate,
        view,
        stop,
        task,
    }
}

/// Lets the dispatcher and its tasks run until they are all waiting.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[test]
fn jitter_is_stable_and_inside_its_window() {
    let interval = Duration::from_secs(60);
    let mut offsets = HashSet::new();
    for i in 0..200 {
        let key = GroupKey {
            schedule: "0 * * * * *".into(),
            reference: format!("r.io/a{i}:1"),
        };
        let a = jitter_offset(&key, interval, 0.5);
        assert_eq!(
            a,
            jitter_offset(&key, interval, 0.5),
            "the same key, the same offset"
        );
        assert!(a < Duration::from_secs(30));
        offsets.insert(a.as_secs());
    }
    assert!(
        offsets.len() > 20,
        "200 groups spread over many seconds, got {}",
        offsets.len()
    );
    let key = GroupKey {
        schedule: "x".into(),
        reference: "y".into(),
    };
    assert_eq!(jitter_offset(&key, interval, 0.0), Duration::ZERO);
}

#[test]
fn intervals_come_from_the_cron_expression() {
    let now = Utc::now();
    assert_eq!(interval_of("*/5 * * * * *", now), Duration::from_secs(5));
    assert_eq!(interval_of("0 */5 * * * *", now), Duration::from_secs(300));
}

#[test]
fn watches_sharing_a_reference_and_schedule_form_one_group() {
    let c = config(
        "[[watch]]\nname = \"a\"\nimage = \"r.io/x:1\"\n\
         [[watch]]\nname = \"b\"\nimage = \"r.io/x:1\"\n\
         [[watch]]\nname = \"c\"\nimage = \"r.io/y:1\"\n\
         [[watch]]\nname = \"d\"\nimage = \"r.io/x:1\"\nschedule = \"*/10 * * * * *\"\n",
    );
    let plan = Plan::new(&c);
    assert_eq!(plan.groups.len(), 3);
    assert_eq!(plan.by_watch["a"], plan.by_watch["b"]);
    assert_ne!(plan.by_watch["a"], plan.by_watch["d"]);
    assert_eq!(schedules(&c).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_tick_starts_each_group_at_its_offset() {
    let h = harness();
    let c = config(&watches(50, "0 * * * * *"));
    let plan = Plan::new(&c);
    h.tx.send(Command::Replace(c.clone(), ())).await.unwrap();
    h.gate.add_permits(1000);
    let ticked = Instant::now();
    h.tx.send(Command::Tick("0 * * * * *".into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(31)).await;
    settle().await;

    let calls = h.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 50);
    let mut starts = Vec::new();
    for (at, names, by) in &calls {
        assert_eq!(*by, DetectedBy::Poll);
        let offset = plan.groups[&plan.by_watch[&names[0]]].offset;
        let waited = *at - ticked;
        assert!(
            waited >= offset && waited < offset + Duration::from_millis(5),
            "{waited:?} vs {offset:?}"
        );
        starts.push(waited);
    }
    // Spread over the window, not in one burst.
    let distinct: HashSet<u128> = starts.iter().map(|d| d.as_millis() / 1000).collect();
    assert!(distinct.len() > 10, "{distinct:?}");
    assert!(starts.iter().all(|d| *d < Duration::from_secs(30)));
}

#[tokio::test(start_paused = true)]
async fn a_tick_that_finds_the_group_running_is_skipped() {
    let h = harness();
    let c = config(&watches(1, "0 * * * * *").replace("jitter = 0.5", "jitter = 0.0"));
    h.tx.send(Command::Replace(c, ())).await.unwrap();
    h.tx.send(Command::Tick("0 * * * * *".into()))
        .await
        .unwrap();
    settle().await;
    h.tx.send(Command::Tick("0 * * * * *".into()))
        .await
        .unwrap();
    settle().await;
    assert_eq!(h.calls.lock().unwrap().len(), 1, "never twice at once");
    assert_eq!(h.view.stats.skipped.load(Ordering::Relaxed), 1);

    // Once it finishes, the next tick runs it again.
    h.gate.add_permits(1);
    settle().await;
    h.tx.send(Command::Tick("0 * * * * *".into()))
        .await
        .unwrap();
    settle().await;
    assert_eq!(h.calls.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_webhook_trigger_runs_at_once_or_right_after_the_running_check() {
    let h = harness();
    let c = config(&watches(2, "0 0 * * * *"));
    h.tx.send(Command::Replace(c, ())).await.unwrap();
    h.tx.send(Command::Trigger(vec!["w0".into()], DetectedBy::Webhook))
        .await
        .unwrap();
    settle().await;
    assert_eq!(h.calls.lock().unwrap().len(), 1);
    // A second trigger while it runs is remembered, not dropped and not run in parallel.
    h.tx.send(Command::Trigger(vec!["w0".into()], DetectedBy::Webhook))
        .await
        .unwrap();
    settle().await;
    assert_eq!(h.calls.lock().unwrap().len(), 1);
    h.gate.add_permits(1);
    settle().await;
    let calls = h.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].1, ["w0"]);
    assert_eq!(calls[1].2, DetectedBy::Webhook);
}

#[tokio::test(start_paused = true)]
async fn a_reload_checks_new_watches_at_once_and_forgets_removed_ones() {
    let h = harness();
    h.gate.add_permits(1000);
    h.tx.send(Command::Replace(config(&watches(2, "0 * * * * *")), ()))
        .await
        .unwrap();
    settle().await;
    assert!(
        h.calls.lock().unwrap().is_empty(),
        "the first config waits for its ticks"
    );

    // w0 stays, w1 goes, w2 is new.
    let next = watches(3, "0 * * * * *").replace(
        "[[watch]]\nname = \"w1\"\nimage = \"r.io/team/app1:prod\"\nschedule = \"0 * * * * *\"\n",
        "",
    );
    h.tx.send(Command::Replace(config(&next), ()))
        .await
        .unwrap();
    settle().await;
    let calls = h.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].1, ["w2"]);

    h.tx.send(Command::Tick("0 * * * * *".into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(31)).await;
    settle().await;
    let mut names: Vec<String> = h
        .calls
        .lock()
        .unwrap()
        .iter()
        .skip(1)
        .flat_map(|c| c.1.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["w0", "w2"]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_running_checks_within_the_bound() {
    let h = harness();
    let c = config(&watches(1, "0 * * * * *").replace("jitter = 0.5", "jitter = 0.0"));
    h.tx.send(Command::Replace(c, ())).await.unwrap();
    h.tx.send(Command::Tick("0 * * * * *".into()))
        .await
        .unwrap();
    settle().await;
    assert_eq!(h.calls.lock().unwrap().len(), 1);

    let stopped = Instant::now();
    h.stop.cancel();
    // The check never finishes: the dispatcher gives up at the 10 s bound.
    h.task.await.unwrap();
    assert_eq!(stopped.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn shutdown_returns_as_soon_as_running_checks_finish() {
    let h = harness();
    let c = config(&watches(1, "0 * * * * *").replace("jitter = 0.5", "jitter = 0.0"));
    h.tx.send(Command::Replace(c, ())).await.unwrap();
    h.tx.send(Command::Tick("0 * * * * *".into()))
        .await
        .unwrap();
    settle().await;
    let stopped = Instant::now();
    h.stop.cancel();
    let gate = h.gate.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        gate.add_permits(1);
    });
    h.task.await.unwrap();
    assert_eq!(stopped.elapsed(), Duration::from_secs(2));
}
