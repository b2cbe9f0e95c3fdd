//! `driftwatch run` as a real process against a real registry: scheduled checks, the status
//! endpoints, config reload, graceful shutdown, and systemd notifications.

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::process::until;
use support::registry::free_port;
use support::{DriftwatchProcess, Registry, TestDir};

struct Daemon {
    dir: TestDir,
    port: u16,
    process: Option<DriftwatchProcess>,
    http: reqwest::Client,
}

impl Daemon {
    fn start(registry: &Registry, watches: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = TestDir::new();
        let port = free_port();
        dir.write_config(&format!(
            "[daemon]\nstate = \"state.db\"\nlisten = \"127.0.0.1:{port}\"\n\
             schedule = \"* * * * * *\"\njitter = 0.0\n\n\
             [registries.\"{}\"]\ninsecure = true\n\n{watches}",
            registry.host()
        ));
        let mut env = env.to_vec();
        env.push(("DRIFTWATCH_LOG", "info"));
        let process = dir.spawn(&["run", "--config", "driftwatch.toml"], &env);
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Daemon {
            dir,
            port,
            process: Some(process),
            http,
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, Value)> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let resp = self.http.get(url).send().await.ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.json().await.ok()?))
    }

    async fn watch(&self, name: &str) -> Option<Value> {
        let (_, v) = self.get("/v1/watches").await?;
        v["watches"]
            .as_array()?
            .iter()
            .find(|w| w["name"] == name)
            .cloned()
    }

    async fn ready(&self) {
        until(Duration::from_secs(20), "readiness", async || {
            self.get("/readyz").await.filter(|(s, _)| *s == 200)
        })
        .await;
    }

    fn history(&self) -> Vec<Value> {
        let out = self.dir.run(
            &["history", "--format", "json", "--config", "driftwatch.toml"],
            &[],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// SIGTERM, then the exit status and everything the daemon logged.
    fn terminate(&mut self) -> (Option<i32>, String) {
        let mut p = self.process.take().unwrap();
        p.terminate();
        let status = p.wait_timeout(Duration::from_secs(20));
        assert!(status.is_some(), "the daemon did not exit after SIGTERM");
        let out = p.into_output();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[tokio::test]
async fn a_moved_tag_is_stored_by_the_running_daemon_and_shown_in_the_status() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let a = push.push_image("team/api", Some("prod"), "a").await;
    let image = format!("{}/team/api:prod", registry.host());
    let mut d = Daemon::start(
        &registry,
        &format!("[[watch]]\nname = \"api\"\nimage = \"{image}\"\n"),
        &[],
    );
    d.ready().await;

    until(Duration::from_secs(20), "the baseline", async || {
        d.watch("api").await.filter(|w| w["digest"] == a.digest)
    })
    .await;
    let b = push.push_image("team/api", Some("prod"), "b").await;
    let w = until(Duration::from_secs(20), "the move", async || {
        d.watch("api").await.filter(|w| w["digest"] == b.digest)
    })
    .await;
    assert_eq!(w["outcome"], "ok");
    assert_eq!(w["image"], image);
    assert!(w["next_due"].is_string() && w["checked_at"].is_string());

    let moved: Vec<Value> = d
        .history()
        .into_iter()
        .filter(|i| i["kind"] == "event" && i["event"]["type"] == "driftwatch.tag.moved")
        .collect();
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0]["event"]["data"]["previous"]["digest"], a.digest);
    assert_eq!(moved[0]["event"]["data"]["current"]["digest"], b.digest);

    let (code, log) = d.terminate();
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn a_reload_adds_watches_and_an_invalid_file_keeps_the_old_config() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    push.push_image("team/api", Some("prod"), "a").await;
    let other = push.push_image("team/web", Some("prod"), "w").await;
    let host = registry.host();
    let d = Daemon::start(
        &registry,
        &format!("[[watch]]\nname = \"api\"\nimage = \"{host}/team/api:prod\"\n"),
        &[],
    );
    d.ready().await;

    d.dir.write(
        "conf.d/20-web.toml",
        &format!("[[watch]]\nname = \"web\"\nimage = \"{host}/team/web:prod\"\n"),
    );
    until(
        Duration::from_secs(20),
        "the new watch's baseline",
        async || d.watch("web").await.filter(|w| w["digest"] == other.digest),
    )
    .await;

    d.dir.write(
        "conf.d/30-bad.toml",
        "[[watch]]\nname = \"bad\"\nimage = \"r.io/Bad\"\n",
    );
    let (_, why) = until(Duration::from_secs(20), "readiness to drop", async || {
        d.get("/readyz").await.filter(|(s, _)| *s == 503)
    })
    .await;
    assert_eq!(why["ready"], false);
    let problem = why["problems"][0].as_str().unwrap();
    assert!(
        problem.contains("30-bad.toml: watch[0].image: invalid repository"),
        "{problem}"
    );
    // Still running on the old config: both watches keep being checked.
    let before = d.watch("web").await.unwrap()["checked_at"].clone();
    until(
        Duration::from_secs(20),
        "a check on the old config",
        async || d.watch("web").await.filter(|w| w["checked_at"] != before),
    )
    .await;
    assert!(d.watch("bad").await.is_none());

    std::fs::remove_file(d.dir.path().join("conf.d/30-bad.toml")).unwrap();
    d.ready().await;
}

#[tokio::test]
async fn sigterm_during_checks_exits_0_and_leaves_a_clean_store() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let mut watches = String::new();
    for i in 0..40 {
        push.push_image(&format!("team/app{i}"), Some("prod"), &format!("s{i}"))
            .await;
        watches.push_str(&format!(
            "[[watch]]\nname = \"w{i}\"\nimage = \"{}/team/app{i}:prod\"\n",
            registry.host()
        ));
    }
    let mut d = Daemon::start(&registry, &watches, &[]);
    d.ready().await;
    until(
        Duration::from_secs(20),
        "checks to be under way",
        async || {
            let (_, v) = d.get("/v1/watches").await?;
            v["watches"]
                .as_array()?
                .iter()
                .any(|w| w["checked_at"].is_string())
                .then_some(())
        },
    )
    .await;
    let (code, log) = d.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("stopped"), "{log}");

    let history = d.history();
    assert!(history.iter().any(|i| i["kind"] == "resolution"));
    let out = d.dir.run(&["check", "--config", "driftwatch.toml"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn systemd_hears_ready_and_watchdog_pings() {
    let registry = Registry::start().await;
    let host = registry.host();
    let sock_dir = tempfile::tempdir().unwrap();
    let path = sock_dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let path_str = path.to_str().unwrap().to_string();
    let mut d = Daemon::start(
        &registry,
        &format!("[[watch]]\nimage = \"{host}/team/api:prod\"\n"),
        &[("NOTIFY_SOCKET", &path_str), ("WATCHDOG_USEC", "400000")],
    );

    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        assert!(Instant::now() < deadline, "notifications so far: {seen:?}");
        let n = socket
            .recv(&mut buf)
            .expect("a notification within the read timeout");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        seen.iter()
            .any(|m| m.contains("STATUS=1 watches in 1 groups")),
        "{seen:?}"
    );

    let (code, _) = d.terminate();
    assert_eq!(code, Some(0));
    let n = socket.recv(&mut buf).unwrap();
    let mut rest = vec![String::from_utf8_lossy(&buf[..n]).into_owned()];
    socket.set_nonblocking(true).unwrap();
    while let Ok(n) = socket.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(rest.iter().any(|m| m.contains("STOPPING=1")), "{rest:?}");
}
