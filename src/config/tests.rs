//! Tests of loading and validation against files on disk.

use std::fs;

use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, text).unwrap();
    p
}

fn problems(path: &Path, env: &[(String, String)]) -> Vec<String> {
    match Config::load_with_env(path, env) {
        Ok(_) => vec![],
        Err(e) => e.lines(),
    }
}

#[test]
fn a_minimal_config_gets_every_default() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "driftwatch.toml",
        "[[watch]]\nimage = \"nginx\"\n",
    );
    let c = Config::load_with_env(&p, &[]).unwrap();
    assert_eq!(c.daemon.schedule, DEFAULT_SCHEDULE);
    assert_eq!(c.daemon.concurrency, DEFAULT_CONCURRENCY);
    assert_eq!(c.daemon.state, PathBuf::from(DEFAULT_STATE));
    assert_eq!(c.watches[0].name, "docker.io/library/nginx:latest");
    assert_eq!(c.watches[0].schedule, DEFAULT_SCHEDULE);
}

#[test]
fn every_problem_is_reported_with_its_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "driftwatch.toml",
        r#"
[daemon]
concurency = 4

[[watch]]
image = "127.0.0.1:5000/team/api:prod"

[[watch]]
image = "127.0.0.1:5000/team/api:dev"
schedule = "*/5 * *"
"#,
    );
    write(
        dir.path(),
        "conf.d/10-more.toml",
        "[[watch]]\nimage = \"127.0.0.1:5000/Team/api\"\nlabel = { a = \"b\" }\n",
    );
    let lines = problems(&p, &[]);
    let main = p.display().to_string();
    let extra = dir.path().join("conf.d/10-more.toml").display().to_string();
    assert!(
        lines.contains(&format!(
            "{main}: daemon.concurency: unknown key \"concurency\""
        )),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!(
            "{main}: watch[1].schedule: invalid cron \"*/5 * *\": expected 6 fields"
        ))),
        "{lines:?}"
    );
    assert!(
        lines.contains(&format!("{extra}: watch[0].label: unknown key \"label\"")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{extra}: watch[0].image: invalid repository"))),
        "{lines:?}"
    );
    assert_eq!(lines.len(), 4, "{lines:?}");
}

#[test]
fn a_syntax_error_names_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "driftwatch.toml",
        "[daemon]\nschedule = \"0 * * * * *\n",
    );
    match Config::load_with_env(&p, &[]) {
        Err(ConfigError::Syntax { line, column, .. }) => assert!(line == 2 && column > 1),
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

#[test]
fn conf_d_adds_watches_in_name_order_and_env_overrides_keys() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "driftwatch.toml",
        "[[watch]]\nname = \"a\"\nimage = \"r.io/a\"\n",
    );
    write(
        dir.path(),
        "conf.d/20-c.toml",
        "[[watch]]\nname = \"c\"\nimage = \"r.io/c\"\n",
    );
    write(
        dir.path(),
        "conf.d/10-b.toml",
        "[[watch]]\nname = \"b\"\nimage = \"r.io/b\"\n",
    );
    write(dir.path(), "conf.d/ignored.txt", "not toml");
    let env = vec![
        (
            "DRIFTWATCH__DAEMON__CONCURRENCY".to_string(),
            "3".to_string(),
        ),
        (
            "DRIFTWATCH__DAEMON__ALERT_ON_BASELINE".to_string(),
            "true".to_string(),
        ),
    ];
    let c = Config::load_with_env(&p, &env).unwrap();
    let names: Vec<_> = c.watches.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(c.daemon.concurrency, 3);
    assert!(c.daemon.alert_on_baseline);
    assert_eq!(c.files.len(), 3);
}

#[test]
fn a_bad_environment_override_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "driftwatch.toml", "");
    let env = vec![(
        "DRIFTWATCH__DAEMON__CONCURRENCY".to_string(),
        "0".to_string(),
    )];
    let lines = problems(&p, &env);
    assert_eq!(
        lines,
        [
            "environment DRIFTWATCH__DAEMON__CONCURRENCY: daemon.concurrency: \
             0 is out of range 1..=1024"
        ]
    );
}

#[test]
fn secrets_come_only_from_env_or_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "pw", "s3cret\n");
    let p = write(
        dir.path(),
        "driftwatch.toml",
        r#"
[registries."r.io".auth]
method = "basic"
username = "u"
password_file = "pw"

[registries."q.io".auth]
method = "basic"
username = "u"
password_env = "MISSING_PW"

[registries."p.io".auth]
method = "basic"
username = "u"
password = "inline"
"#,
    );
    let lines = problems(&p, &[]);
    let main = p.display();
    assert!(
        lines.contains(&format!(
            "{main}: registries.\"p.io\".auth.password: unknown key \"password\""
        )),
        "{lines:?}"
    );
    assert!(
        lines.contains(&format!(
            "{main}: registries.\"q.io\".auth.password_env: \
             environment variable MISSING_PW is not set or empty"
        )),
        "{lines:?}"
    );

    let p = write(
        dir.path(),
        "ok.toml",
        "[registries.\"r.io\".auth]\nmethod = \"basic\"\n\
         username = \"u\"\npassword_file = \"pw\"\n",
    );
    let c = Config::load_with_env(&p, &[]).unwrap();
    match &c.registries["r.io"].auth {
        Auth::Basic { username, password } => {
            use secrecy::ExposeSecret as _;
            assert_eq!(
                (username.as_str(), password.expose_secret()),
                ("u", "s3cret")
            );
            assert!(!format!("{:?}", c.registries["r.io"].auth).contains("s3cret"));
        }
        other => panic!("expected basic auth, got {other:?}"),
    }
}

#[test]
fn docker_config_credentials_are_read_from_auths() {
    let dir = tempfile::tempdir().unwrap();
    // "alice:pa55" in base64.
    write(
        dir.path(),
        "docker.json",
        r#"{"auths": {"https://r.io": {"auth": "YWxpY2U6cGE1NQ=="}}}"#,
    );
    let p = write(
        dir.path(),
        "driftwatch.toml",
        "[registries.\"r.io\".auth]\nmethod = \"docker-config\"\nconfig_file = \"docker.json\"\n\
         [registries.\"s.io\".auth]\nmethod = \"docker-config\"\nconfig_file = \"docker.json\"\n",
    );
    let lines = problems(&p, &[]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("has no auths entry for s.io"),
        "{lines:?}"
    );
}

#[test]
fn duplicate_names_and_unknown_sink_types_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "driftwatch.toml",
        r#"
[[watch]]
name = "x"
image = "r.io/a"
[[watch]]
name = "x"
image = "r.io/b"
[[sink]]
name = "s"
type = "pager"
[[sink]]
name = "h"
type = "webhook"
url = "http://127.0.0.1:1/hook"
events = ["tags.*"]
min_severity = "loud"
"#,
    );
    let lines = problems(&p, &[]);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("watch[1].name: duplicate watch name"))
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("sink[0].type: unknown sink type \"pager\""))
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("sink[1].events[0]: \"tags.*\" matches no event type"))
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("sink[1].min_severity: unknown severity"))
    );
}

#[test]
fn state_directory_anchors_a_relative_state_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "driftwatch.toml", "");
    let env = vec![(
        "STATE_DIRECTORY".to_string(),
        "/var/lib/driftwatch".to_string(),
    )];
    let c = Config::load_with_env(&p, &env).unwrap();
    assert_eq!(
        c.daemon.state,
        PathBuf::from("/var/lib/driftwatch/driftwatch.db")
    );
}

#[test]
fn entra_auth_methods_say_what_they_lack() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "driftwatch.toml",
        "[registries.\"a.azurecr.io\".auth]\nmethod = \"acr-aad\"\nclient_id = \"c\"\n\
         client_secret_env = \"S\"\nclient_certificate_file = \"sp.pem\"\n\
         [registries.\"b.azurecr.io\".auth]\nmethod = \"azure-workload-identity\"\n\
         [registries.\"c.azurecr.io\".auth]\nmethod = \"azure-managed-identity\"\n\
         imds_endpoint = \"not a url\"\nusername = \"x\"\n\
         [[watch]]\nimage = \"a.azurecr.io/x:1\"\n",
    );
    let got = problems(&p, &[]);
    let want = [
        "registries.\"a.azurecr.io\".auth.tenant_id: missing",
        "registries.\"a.azurecr.io\".auth.client_certificate_file: set either a client secret \
         or a certificate, not both",
        "registries.\"b.azurecr.io\".auth.tenant_id: missing (set tenant_id here, or \
         AZURE_TENANT_ID in the environment)",
        "registries.\"b.azurecr.io\".auth.federated_token_file: missing",
        "registries.\"c.azurecr.io\".auth.username: not used by auth method \
         \"azure-managed-identity\"",
        "registries.\"c.azurecr.io\".auth.imds_endpoint: \"not a url\" is not an http(s) URL",
    ];
    for w in want {
        assert!(got.iter().any(|g| g.contains(w)), "{w}\nnot in {got:#?}");
    }
}

#[test]
fn workload_identity_comes_from_the_environment_and_acr_is_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let token = write(dir.path(), "token", "eyJ.x.y");
    let p = write(
        dir.path(),
        "driftwatch.toml",
        "[registries.\"127.0.0.1:5000\".auth]\nmethod = \"azure-workload-identity\"\n\
         [registries.\"myreg.azurecr.io\"]\nsoft_delete_reminder = \"off\"\n\
         [[watch]]\nimage = \"127.0.0.1:5000/x:1\"\n",
    );
    let env: Vec<(String, String)> = [
        ("AZURE_CLIENT_ID", "client"),
        ("AZURE_TENANT_ID", "tenant"),
        ("AZURE_FEDERATED_TOKEN_FILE", token.to_str().unwrap()),
        ("AZURE_AUTHORITY_HOST", "https://login.example.com"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let c = Config::load_with_env(&p, &env).unwrap();
    let local = &c.registries["127.0.0.1:5000"];
    assert!(local.acr, "an Entra identity implies ACR");
    match &local.auth {
        Auth::Entra(EntraCredential::WorkloadIdentity {
            authority_host,
            tenant_id,
            client_id,
            token_file,
        }) => {
            assert_eq!(authority_host, "https://login.example.com/");
            assert_eq!(tenant_id, "tenant");
            assert_eq!(client_id, "client");
            assert_eq!(token_file, &token);
        }
        other => panic!("{other:?}"),
    }
    let named = &c.registries["myreg.azurecr.io"];
    assert!(named.acr);
    assert_eq!(named.soft_delete_reminder, None);
}
