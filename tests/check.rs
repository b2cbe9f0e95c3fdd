//! End-to-end scenarios of `driftwatch check` and the one-shot commands against a real CNCF
//! distribution registry: tags that move and disappear, deleted digests, changing indexes,
//! an unreachable registry, and restarts of driftwatch between checks.

mod support;

use std::process::Output;

use serde_json::Value;
use support::cli::json_lines as events;
use support::{Registry, TestDir};

fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

/// Runs driftwatch in `dir` on the config file there.
fn run(dir: &TestDir, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--config", "driftwatch.toml"]);
    dir.run(&all, &[])
}

fn check(dir: &TestDir) -> Vec<Value> {
    events(&run(dir, &["check", "--format", "json"]))
}

fn config(registry: &Registry, watches: &str) -> String {
    format!(
        "[daemon]\nstate = \"state.db\"\n\n[registries.\"{host}\"]\ninsecure = true\n\n{watches}",
        host = registry.host()
    )
}

#[tokio::test]
async fn a_moved_tag_is_reported_with_both_digests() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let a = push.push_image("team/api", Some("prod"), "a").await;
    let dir = TestDir::new();
    let image = format!("{}/team/api:prod", registry.host());
    let watch = format!(
        "[[watch]]\nname = \"api-prod\"\nimage = \"{image}\"\nlabels = {{ team = \"payments\" }}\n"
    );
    dir.write_config(&config(&registry, &watch));

    let baseline = check(&dir);
    assert_eq!(types(&baseline), ["driftwatch.tag.created"]);
    assert_eq!(baseline[0]["data"]["current"]["digest"], a.digest);

    assert!(
        check(&dir).is_empty(),
        "an unchanged tag must not produce events"
    );

    let b = push.push_image("team/api", Some("prod"), "b").await;
    let moved = check(&dir);
    assert_eq!(types(&moved), ["driftwatch.tag.moved"]);
    let e = &moved[0];
    assert_eq!(e["specversion"], "1.0");
    assert_eq!(e["subject"], image);
    assert_eq!(e["data"]["watch"], "api-prod");
    assert_eq!(e["data"]["severity"], "warning");
    assert_eq!(e["data"]["registry"], registry.host());
    assert_eq!(e["data"]["repository"], "team/api");
    assert_eq!(e["data"]["tag"], "prod");
    assert_eq!(e["data"]["previous"]["digest"], a.digest);
    assert_eq!(e["data"]["current"]["digest"], b.digest);
    assert_eq!(e["data"]["detected_by"], "poll");
    assert_eq!(e["data"]["labels"]["team"], "payments");
    let id = e["id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);

    // The event and both resolutions are in the store, newest first.
    let out = run(&dir, &["history", "--format", "json"]);
    let items = events(&out);
    assert_eq!(items[0]["kind"], "event");
    assert_eq!(items[0]["event"]["id"], id);
    assert!(
        items
            .iter()
            .any(|i| i["kind"] == "resolution" && i["digest"] == b.digest)
    );
    assert!(
        items
            .iter()
            .any(|i| i["kind"] == "resolution" && i["digest"] == a.digest)
    );
}

#[tokio::test]
async fn a_deleted_tag_and_a_deleted_digest_are_reported() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let a = push.push_image("team/api", Some("prod"), "a").await;
    let pinned = push.push_image("team/api", None, "deployed").await;
    let dir = TestDir::new();
    let host = registry.host();
    dir.write_config(&config(
        &registry,
        &format!(
            "[[watch]]\nname = \"tag\"\nimage = \"{host}/team/api:prod\"\n\
             [[watch]]\nname = \"pin\"\nimage = \"{host}/team/api@{}\"\n",
            pinned.digest
        ),
    ));
    assert_eq!(types(&check(&dir)), ["driftwatch.tag.created"]);

    push.delete_manifest("team/api", &a.digest).await;
    push.delete_manifest("team/api", &pinned.digest).await;
    let found = check(&dir);
    assert_eq!(
        types(&found),
        ["driftwatch.tag.deleted", "driftwatch.digest.deleted"]
    );
    assert_eq!(found[0]["data"]["previous"]["digest"], a.digest);
    assert!(found[0]["data"]["current"].is_null());
    assert_eq!(found[1]["data"]["severity"], "critical");
    assert!(found[1]["data"]["tag"].is_null());
    assert_eq!(found[1]["data"]["previous"]["digest"], pinned.digest);

    assert!(check(&dir).is_empty(), "a deletion is reported once");

    // Pushing the same bytes again restores both.
    push.put_manifest("team/api", "prod", &a.media_type, &a.bytes)
        .await;
    push.put_manifest(
        "team/api",
        &pinned.digest,
        &pinned.media_type,
        &pinned.bytes,
    )
    .await;
    assert_eq!(
        types(&check(&dir)),
        ["driftwatch.tag.restored", "driftwatch.digest.restored"]
    );
}

#[tokio::test]
async fn an_index_that_loses_a_platform_reports_it_removed() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    push.push_multiarch(
        "team/api",
        Some("prod"),
        &["linux/amd64", "linux/arm64"],
        "v1",
    )
    .await;
    let dir = TestDir::new();
    dir.write_config(&config(
        &registry,
        &format!("[[watch]]\nimage = \"{}/team/api:prod\"\n", registry.host()),
    ));
    let baseline = check(&dir);
    assert_eq!(
        baseline[0]["data"]["current"]["platforms"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    push.push_multiarch("team/api", Some("prod"), &["linux/amd64"], "v1")
        .await;
    let found = check(&dir);
    assert_eq!(
        types(&found),
        ["driftwatch.tag.moved", "driftwatch.platforms.changed"]
    );
    let detail = &found[1]["data"]["detail"];
    assert_eq!(detail["removed"].as_array().unwrap().len(), 1);
    assert_eq!(detail["removed"][0]["architecture"], "arm64");
    assert_eq!(detail["added"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn a_stopped_registry_fails_the_check_and_never_looks_deleted() {
    let mut registry = Registry::start().await;
    let push = registry.pusher();
    let a = push.push_image("team/api", Some("prod"), "a").await;
    let pinned = push.push_image("team/api", None, "pin").await;
    let dir = TestDir::new();
    let host = registry.host();
    dir.write_config(&config(
        &registry,
        &format!(
            "[[watch]]\nname = \"tag\"\nimage = \"{host}/team/api:prod\"\n\
             [[watch]]\nname = \"pin\"\nimage = \"{host}/team/api@{}\"\n",
            pinned.digest
        ),
    ));
    check(&dir);

    registry.stop();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let out = run(&dir, &["check", "--format", "json"]);
        assert!(
            out.status.success(),
            "a failing watch does not fail the cycle"
        );
        seen.extend(types(&events(&out)));
    }
    assert_eq!(
        seen,
        ["driftwatch.check.failing", "driftwatch.check.failing"],
        "once per watch"
    );

    registry.restart().await;
    let back = check(&dir);
    assert_eq!(
        types(&back),
        ["driftwatch.check.recovered", "driftwatch.check.recovered"]
    );
    let out = run(&dir, &["history", "--watch", "tag", "--format", "json"]);
    let items = events(&out);
    let resolutions: Vec<_> = items.iter().filter(|i| i["kind"] == "resolution").collect();
    assert_eq!(
        resolutions.len(),
        1,
        "failed checks must not store resolutions"
    );
    assert_eq!(resolutions[0]["digest"], a.digest);
}

#[tokio::test]
async fn two_moves_between_checks_are_one_move_from_the_stored_digest() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let a = push.push_image("team/api", Some("prod"), "a").await;
    let dir = TestDir::new();
    dir.write_config(&config(
        &registry,
        &format!("[[watch]]\nimage = \"{}/team/api:prod\"\n", registry.host()),
    ));
    check(&dir);
    push.push_image("team/api", Some("prod"), "b").await;
    let c = push.push_image("team/api", Some("prod"), "c").await;
    let found = check(&dir);
    assert_eq!(types(&found), ["driftwatch.tag.moved"]);
    assert_eq!(found[0]["data"]["previous"]["digest"], a.digest);
    assert_eq!(found[0]["data"]["current"]["digest"], c.digest);
}

#[tokio::test]
async fn a_tag_at_digest_watch_reports_divergence_and_fail_on_drift_exits_3() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let a = push.push_image("team/api", Some("prod"), "a").await;
    let dir = TestDir::new();
    dir.write_config(&config(
        &registry,
        &format!(
            "[[watch]]\nimage = \"{}/team/api:prod@{}\"\n",
            registry.host(),
            a.digest
        ),
    ));
    assert_eq!(types(&check(&dir)), ["driftwatch.tag.created"]);
    let out = run(&dir, &["check", "--fail-on-drift"]);
    assert_eq!(out.status.code(), Some(0), "no drift yet");

    push.push_image("team/api", Some("prod"), "b").await;
    let out = run(&dir, &["check", "--fail-on-drift", "--format", "json"]);
    assert_eq!(out.status.code(), Some(3));
    let found: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(types(&found), ["driftwatch.tag.diverged"]);
    assert_eq!(found[0]["data"]["previous"]["digest"], a.digest);
}

#[tokio::test]
async fn inspect_and_verify_answer_with_their_exit_statuses() {
    let registry = Registry::start().await;
    let push = registry.pusher();
    let (index, children) = push
        .push_multiarch(
            "team/api",
            Some("prod"),
            &["linux/amd64", "linux/arm64/v8"],
            "x",
        )
        .await;
    let dir = TestDir::new();
    dir.write_config(&config(&registry, ""));
    let host = registry.host();
    let image = format!("{host}/team/api:prod");

    let out = run(&dir, &["inspect", &image, "--format", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["digest"], index.digest);
    assert_eq!(v["repository"], "team/api");
    assert_eq!(v["platforms"][1]["variant"], "v8");
    assert_eq!(v["platforms"][1]["digest"], children[1].1.digest);
    assert!(v["attributes"].is_null());

    let out = run(
        &dir,
        &[
            "inspect",
            &children[0]
                .1
                .digest
                .replace("sha256:", &format!("{host}/team/api@sha256:")),
        ],
    );
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("layers"), "{text}");

    let out = run(&dir, &["inspect", &format!("{host}/team/api:nope")]);
    assert_eq!(out.status.code(), Some(4));

    let ok = run(&dir, &["verify", &image, "--expect-digest", &index.digest]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let wrong = run(
        &dir,
        &["verify", &image, "--expect-digest", &children[0].1.digest],
    );
    assert_eq!(wrong.status.code(), Some(3));
    let missing = run(&dir, &["verify", &format!("{host}/team/api:gone")]);
    assert_eq!(missing.status.code(), Some(3));
    let pinned_wrong = run(
        &dir,
        &["verify", &format!("{image}@{}", children[0].1.digest)],
    );
    assert_eq!(pinned_wrong.status.code(), Some(3));

    let err = run(&dir, &["verify", "not a reference"]);
    assert_eq!(err.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&err.stderr).contains("invalid reference"));
}

#[test]
fn config_validate_prints_every_problem_and_exits_2() {
    let dir = TestDir::new();
    dir.write_config(
        "[daemon]\nschedule = \"*/5 * *\"\nconcurency = 2\n\n[[watch]]\nimage = \"r.io/Team/x\"\n",
    );
    let out = dir.run(&["config", "validate", "--config", "driftwatch.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(lines.iter().any(|l| l.starts_with(
        "driftwatch.toml: daemon.schedule: invalid cron \"*/5 * *\": expected 6 fields"
    )));
    assert!(lines.contains(&"driftwatch.toml: daemon.concurency: unknown key \"concurency\""));
    assert!(out.stdout.is_empty());

    dir.write_config("[[watch]]\nimage = \"r.io/team/x:1\"\n");
    let out = dir.run(&["--config", "driftwatch.toml", "config", "validate"], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    dir.write_config("[daemon\nstate = 1\n");
    let out = dir.run(&["config", "validate", "--config", "driftwatch.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("driftwatch.toml: line 1, column"));
}

#[tokio::test]
async fn an_unusable_state_file_stops_check_and_is_left_untouched() {
    let registry = Registry::start().await;
    let dir = TestDir::new();
    dir.write_config(&config(
        &registry,
        &format!("[[watch]]\nimage = \"{}/team/api:prod\"\n", registry.host()),
    ));
    let garbage = "definitely not sqlite\n".repeat(200);
    let state = dir.write("state.db", &garbage);
    let out = run(&dir, &["check"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot open state file"), "{stderr}");
    assert_eq!(std::fs::read_to_string(state).unwrap(), garbage);
}
