//! Alert delivery end to end: a real registry, driftwatch as a real process, a real HTTP
//! receiver and a real SMTP server. Signatures are checked by an independent implementation
//! of Standard Webhooks in `support::webhooks`.

mod support;

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::registry::free_port;
use support::webhooks::{test_secret, verify};
use support::{Receiver, Registry, Respond, SmtpServer, TestDir};

const WAIT: Duration = Duration::from_secs(30);

fn lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn run(dir: &TestDir, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--config", "driftwatch.toml"]);
    dir.run(&all, &[("HOOK_SECRET", &test_secret())])
}

fn check(dir: &TestDir) -> Vec<Value> {
    lines(&run(dir, &["check", "--format", "json"]))
}

fn history(dir: &TestDir) -> Vec<Value> {
    lines(&run(
        dir,
        &["history", "--format", "json", "--limit", "1000"],
    ))
}

/// A config with one watch per repository in `repos`, and the given sinks.
fn config(registry: &Registry, repos: &[&str], extra: &str) -> String {
    let mut s = format!(
        "[daemon]\nstate = \"state.db\"\nlisten = \"127.0.0.1:{}\"\nschedule = \"* * * * * *\"\n\
         jitter = 0.0\n\n[registries.\"{}\"]\ninsecure = true\n\n",
        free_port(),
        registry.host()
    );
    for r in repos {
        s.push_str(&format!(
            "[[watch]]\nname = \"{r}\"\nimage = \"{}/team/{r}:prod\"\n\
             labels = {{ team = \"sre\" }}\n",
            registry.host()
        ));
    }
    s.push_str(extra);
    s
}

fn webhook_sink(receiver: &Receiver, extra: &str) -> String {
    format!(
        "[[sink]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"{}\"\n\
         secret_env = \"HOOK_SECRET\"\n\
         retry_max_interval = \"1s\"\n{extra}\n",
        receiver.url("/hook")
    )
}

#[tokio::test]
async fn a_moved_tag_reaches_the_webhook_signed_and_only_once() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let a = push.push_image("team/api", Some("prod"), "a").await;
    let receiver = Receiver::start();
    let dir = TestDir::new();
    dir.write_config(&config(&registry, &["api"], &webhook_sink(&receiver, "")));

    check(&dir);
    assert!(
        receiver.requests().is_empty(),
        "the baseline is not alerted"
    );

    let b = push.push_image("team/api", Some("prod"), "b").await;
    let events = check(&dir);
    let got = receiver.wait_for(1, WAIT);
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/hook");
    assert_eq!(
        r.header("content-type"),
        Some("application/cloudevents+json")
    );
    assert_eq!(
        r.header("webhook-id"),
        Some(events[0]["id"].as_str().unwrap())
    );
    let body = r.json();
    assert_eq!(body, events[0], "the webhook body is the stored envelope");
    assert_eq!(body["data"]["previous"]["digest"], a.digest);
    assert_eq!(body["data"]["current"]["digest"], b.digest);
    verify(&test_secret(), r).expect("the signature verifies");

    let mut tampered = r.clone();
    tampered.body = r.body_text().replace(&b.digest, &a.digest).into_bytes();
    assert!(
        verify(&test_secret(), &tampered).is_err(),
        "a tampered body must not verify"
    );

    let delivered: Vec<Value> = history(&dir)
        .into_iter()
        .filter(|i| i["kind"] == "event" && i["event"]["type"] == "driftwatch.tag.moved")
        .collect();
    assert_eq!(delivered[0]["deliveries"][0]["status"], "delivered");

    // The same change again (back to a, then to b) is not sent a second time.
    push.tag_existing("team/api", "prod", &a).await;
    check(&dir);
    push.tag_existing("team/api", "prod", &b).await;
    check(&dir);
    let all = receiver.requests();
    let moves: Vec<_> = all
        .iter()
        .map(|r| {
            (
                r.json()["data"]["previous"]["digest"].clone(),
                r.json()["data"]["current"]["digest"].clone(),
            )
        })
        .collect();
    assert_eq!(moves.len(), 2, "{moves:?}");
}

#[tokio::test]
async fn an_outage_loses_nothing_and_keeps_each_watchs_order() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    for r in ["api", "web"] {
        push.push_image(&format!("team/{r}"), Some("prod"), &format!("{r}0"))
            .await;
    }
    let mut receiver = Receiver::start();
    receiver.set_default(503);
    let dir = TestDir::new();
    dir.write_config(&config(
        &registry,
        &["api", "web"],
        &webhook_sink(&receiver, ""),
    ));
    let env = [("HOOK_SECRET", test_secret())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut daemon = dir.spawn(&["run", "--config", "driftwatch.toml"], &env);

    // Moves while the receiver answers 503, then while it is gone entirely.
    let wait_events = |n: usize| {
        let deadline = Instant::now() + WAIT;
        loop {
            let stored: Vec<Value> = history(&dir)
                .into_iter()
                .filter(|i| i["kind"] == "event" && i["event"]["type"] == "driftwatch.tag.moved")
                .collect();
            if stored.len() >= n {
                return stored;
            }
            assert!(
                Instant::now() < deadline,
                "only {} moves stored",
                stored.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let baseline_wait = Instant::now() + WAIT;
    while !history(&dir)
        .iter()
        .any(|i| i["kind"] == "resolution" && i["watch"] == "web")
    {
        assert!(Instant::now() < baseline_wait, "no baseline");
        std::thread::sleep(Duration::from_millis(100));
    }
    push.push_image("team/api", Some("prod"), "api1").await;
    wait_events(1);
    receiver.wait_for(1, WAIT);
    receiver.stop();
    push.push_image("team/web", Some("prod"), "web1").await;
    wait_events(2);
    push.push_image("team/api", Some("prod"), "api2").await;
    let stored = wait_events(3);

    receiver.set_default(200);
    receiver.restart();
    let deadline = Instant::now() + WAIT;
    let ok = loop {
        let ok: Vec<_> = receiver
            .requests()
            .into_iter()
            .filter(|r| r.status == 200)
            .collect();
        if ok.len() >= 3 {
            break ok;
        }
        assert!(
            Instant::now() < deadline,
            "only {} deliveries after the outage",
            ok.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    daemon.terminate();
    assert!(daemon.wait_timeout(Duration::from_secs(20)).is_some());

    // Every stored event arrived with its stored id, in detection order per watch.
    let stored_ids: Vec<(String, String)> = stored
        .iter()
        .rev()
        .map(|i| {
            (
                i["event"]["data"]["watch"].as_str().unwrap().into(),
                i["event"]["id"].as_str().unwrap().into(),
            )
        })
        .collect();
    let delivered: Vec<(String, String)> = ok
        .iter()
        .map(|r| {
            (
                r.json()["data"]["watch"].as_str().unwrap().into(),
                r.json()["id"].as_str().unwrap().into(),
            )
        })
        .collect();
    for watch in ["api", "web"] {
        let want: Vec<_> = stored_ids.iter().filter(|(w, _)| w == watch).collect();
        let mut got: Vec<_> = delivered.iter().filter(|(w, _)| w == watch).collect();
        got.dedup();
        assert_eq!(got, want, "deliveries of {watch}");
    }
    for r in &ok {
        verify(&test_secret(), r).expect("each attempt is signed afresh");
    }
    let attempts_503 = receiver
        .requests()
        .iter()
        .filter(|r| r.status == 503)
        .count();
    assert!(attempts_503 >= 1);
}

#[tokio::test]
async fn rows_pending_when_the_daemon_is_killed_are_delivered_after_restart() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    push.push_image("team/api", Some("prod"), "a").await;
    let mut receiver = Receiver::start();
    receiver.stop();
    let dir = TestDir::new();
    dir.write_config(&config(&registry, &["api"], &webhook_sink(&receiver, "")));
    check(&dir);
    push.push_image("team/api", Some("prod"), "b").await;
    let env_secret = test_secret();
    let env = [("HOOK_SECRET", env_secret.as_str())];

    let daemon = dir.spawn(&["run", "--config", "driftwatch.toml"], &env);
    let deadline = Instant::now() + WAIT;
    let id = loop {
        let pending: Vec<Value> = history(&dir)
            .into_iter()
            .filter(|i| i["kind"] == "event" && i["deliveries"][0]["status"] == "pending")
            .collect();
        if let Some(p) = pending.first() {
            break p["event"]["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no pending row");
        std::thread::sleep(Duration::from_millis(100));
    };
    daemon.kill_and_collect();

    receiver.restart();
    let mut daemon = dir.spawn(&["run", "--config", "driftwatch.toml"], &env);
    let got = receiver.wait_for(1, WAIT);
    assert_eq!(got[0].json()["id"], id.as_str());
    let deadline = Instant::now() + WAIT;
    loop {
        let h = history(&dir);
        let row = h
            .iter()
            .find(|i| i["kind"] == "event" && i["event"]["id"] == id.as_str())
            .unwrap();
        if row["deliveries"][0]["status"] == "delivered" {
            break;
        }
        assert!(Instant::now() < deadline, "not marked delivered: {row}");
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.terminate();
    assert!(daemon.wait_timeout(Duration::from_secs(20)).is_some());
}

#[tokio::test]
async fn retry_after_is_honoured_and_gone_is_dead_at_once() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    push.push_image("team/api", Some("prod"), "a").await;
    push.push_image("team/web", Some("prod"), "w").await;
    let receiver = Receiver::start();
    receiver.script(vec![Respond::retry_after(429, 2)]);
    let dir = TestDir::new();
    dir.write_config(&config(&registry, &["api"], &webhook_sink(&receiver, "")));
    check(&dir);
    push.push_image("team/api", Some("prod"), "b").await;
    let env_secret = test_secret();
    let mut daemon = dir.spawn(
        &["run", "--config", "driftwatch.toml"],
        &[("HOOK_SECRET", env_secret.as_str())],
    );
    let got = receiver.wait_for(2, WAIT);
    daemon.terminate();
    assert!(daemon.wait_timeout(Duration::from_secs(20)).is_some());
    assert_eq!((got[0].status, got[1].status), (429, 200));
    let waited = got[1].at - got[0].at;
    assert!(waited >= Duration::from_secs(2), "retried after {waited:?}");

    // 410 Gone: dead at once, shown by history, no retry.
    let gone = Receiver::start();
    gone.set_default(410);
    let dir = TestDir::new();
    dir.write_config(&config(&registry, &["web"], &webhook_sink(&gone, "")));
    check(&dir);
    push.push_image("team/web", Some("prod"), "w2").await;
    check(&dir);
    assert_eq!(gone.requests().len(), 1);
    let h = history(&dir);
    let ev = h
        .iter()
        .find(|i| i["kind"] == "event" && i["event"]["type"] == "driftwatch.tag.moved")
        .unwrap();
    assert_eq!(ev["deliveries"][0]["status"], "dead");
    assert!(
        ev["deliveries"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("410")
    );
}

#[tokio::test]
async fn a_check_sends_its_events_as_one_mail_with_both_parts() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    for r in ["api", "web"] {
        push.push_image(&format!("team/{r}"), Some("prod"), &format!("{r}0"))
            .await;
    }
    let smtp = SmtpServer::start();
    let sink = format!(
        "[[sink]]\nname = \"mail\"\ntype = \"email\"\nsmtp = \"{}\"\n\
         from = \"driftwatch@example.com\"\n\
         to = [\"sre@example.com\", \"sec@example.com\"]\nsubject_prefix = \"[test]\"\n",
        smtp.url()
    );
    let dir = TestDir::new();
    dir.write_config(&config(&registry, &["api", "web"], &sink));
    check(&dir);
    let api1 = push.push_image("team/api", Some("prod"), "api1").await;
    let web1 = push.push_image("team/web", Some("prod"), "web1").await;
    check(&dir);
    let mails = smtp.wait_for(1, WAIT);
    assert_eq!(mails.len(), 1, "two events, one digest mail");
    let m = &mails[0];
    assert_eq!(m.header("from"), Some("driftwatch@example.com"));
    assert!(m.header("to").unwrap().contains("sec@example.com"));
    assert_eq!(
        m.subject(),
        Some("[test] driftwatch: 2 events (warning at most)")
    );
    let text = m.text.as_deref().unwrap();
    assert!(
        text.contains(&api1.digest) && text.contains(&web1.digest),
        "{text}"
    );
    assert!(text.contains("team=sre"), "labels are in the mail: {text}");
    let html = m.html.as_deref().unwrap();
    assert!(
        html.contains(&api1.digest) && html.contains("<table>"),
        "{html}"
    );

    // A single event is a mail of its own, named by its type.
    push.push_image("team/api", Some("prod"), "api2").await;
    check(&dir);
    let mails = smtp.wait_for(2, WAIT);
    let subject = mails[1].subject().unwrap();
    assert!(
        subject.starts_with("[test] driftwatch: tag.moved "),
        "{subject}"
    );
}

#[tokio::test]
async fn the_daemon_folds_events_due_within_the_window_into_one_mail() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let repos = ["a", "b", "c"];
    for r in repos {
        push.push_image(&format!("team/{r}"), Some("prod"), r).await;
    }
    let smtp = SmtpServer::start();
    let sink = format!(
        "[[sink]]\nname = \"mail\"\ntype = \"email\"\nsmtp = \"{}\"\nfrom = \"dw@example.com\"\n\
         to = [\"sre@example.com\"]\nbatch_window = \"3s\"\n",
        smtp.url()
    );
    let dir = TestDir::new();
    dir.write_config(&config(&registry, &repos, &sink));
    check(&dir);
    let mut daemon = dir.spawn(&["run", "--config", "driftwatch.toml"], &[]);
    for r in repos {
        push.push_image(&format!("team/{r}"), Some("prod"), &format!("{r}1"))
            .await;
    }
    let mails = smtp.wait_for(1, WAIT);
    // Give a second mail the chance to arrive if the window did not fold them.
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline && smtp.messages().len() < 2 {
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.terminate();
    assert!(daemon.wait_timeout(Duration::from_secs(20)).is_some());
    let all = smtp.messages();
    assert_eq!(
        all.len(),
        1,
        "subjects: {:?}",
        all.iter().map(|m| m.subject()).collect::<Vec<_>>()
    );
    assert!(mails[0].subject().unwrap().contains("3 events"));
}

#[tokio::test]
async fn alert_test_reports_delivery_and_failure() {
    let registry = Registry::start().await;
    let receiver = Receiver::start();
    let smtp = SmtpServer::start();
    let dir = TestDir::new();
    let sinks = format!(
        "{}[[sink]]\nname = \"mail\"\ntype = \"email\"\nsmtp = \"{}\"\nfrom = \"dw@example.com\"\n\
         to = [\"sre@example.com\"]\n\
         [[sink]]\nname = \"chat\"\ntype = \"webhook\"\nformat = \"slack\"\nurl = \"{}\"\n\
         [[sink]]\nname = \"down\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{}/x\"\n",
        webhook_sink(&receiver, ""),
        smtp.url(),
        receiver.url("/slack"),
        free_port()
    );
    dir.write_config(&config(&registry, &[], &sinks));

    let out = run(&dir, &["alert", "test", "--sink", "hook"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = receiver.wait_for(1, WAIT);
    assert_eq!(got[0].json()["type"], "driftwatch.test");
    verify(&test_secret(), &got[0]).unwrap();

    let out = run(&dir, &["alert", "test", "--sink", "chat"]);
    assert_eq!(out.status.code(), Some(0));
    let got = receiver.wait_for(2, WAIT);
    assert!(
        got[1].json()["text"]
            .as_str()
            .unwrap()
            .contains("driftwatch"),
        "{}",
        got[1].body_text()
    );

    let out = run(&dir, &["alert", "test", "--sink", "mail"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(smtp.wait_for(1, WAIT).len(), 1);

    let out = run(&dir, &["alert", "test", "--sink", "down"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sink down"));
}

#[tokio::test]
async fn past_the_rate_limit_alerts_are_folded_into_one_batch_not_dropped() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let repos = ["a", "b", "c", "d", "e"];
    for r in repos {
        push.push_image(&format!("team/{r}"), Some("prod"), r).await;
    }
    let receiver = Receiver::start();
    let dir = TestDir::new();
    dir.write_config(&config(
        &registry,
        &repos,
        &webhook_sink(&receiver, "max_per_minute = 2"),
    ));
    check(&dir);
    for r in repos {
        push.push_image(&format!("team/{r}"), Some("prod"), &format!("{r}1"))
            .await;
    }
    let events = check(&dir);
    assert_eq!(events.len(), 5);
    let got = receiver.wait_for(3, WAIT);
    assert_eq!(got.len(), 3, "two single deliveries and one batch");
    let singles: Vec<_> = got
        .iter()
        .filter(|r| r.header("content-type") == Some("application/cloudevents+json"))
        .collect();
    let batches: Vec<_> = got
        .iter()
        .filter(|r| r.header("content-type") == Some("application/cloudevents-batch+json"))
        .collect();
    assert_eq!((singles.len(), batches.len()), (2, 1));
    let batch = batches[0].json();
    assert_eq!(batch.as_array().unwrap().len(), 3);
    verify(&test_secret(), batches[0]).expect("a batch is signed too");

    // Every event was delivered once, in one form or the other.
    let mut ids: Vec<String> = singles
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_string())
        .collect();
    ids.extend(
        batch
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string()),
    );
    ids.sort();
    let mut stored: Vec<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    stored.sort();
    assert_eq!(ids, stored);
}
