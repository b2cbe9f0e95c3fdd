//! Self-tests for the alert-sink support modules (real SMTP server, webhook receiver and
//! Standard Webhooks verifier), so a broken harness fails here with a clear message.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use support::webhooks::{self, verify, verify_at, verify_parts};
use support::{Mail, Receiver, Respond, SmtpServer};

const WAIT: Duration = Duration::from_secs(10);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// Reads one SMTP reply, following `NNN-` continuation lines, and checks its code.
fn expect_reply(reader: &mut impl BufRead, code: &str) -> String {
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        let read = reader.read_line(&mut line).expect("read smtp reply");
        assert!(
            read > 0,
            "smtp server closed the connection; got so far: {reply:?}"
        );
        reply.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            break;
        }
    }
    assert!(
        reply.starts_with(code),
        "expected smtp reply {code}, got {reply:?}"
    );
    reply
}

/// A minimal SMTP client: EHLO, MAIL FROM, RCPT TO, DATA (with dot-stuffing), QUIT.
fn send_smtp(port: u16, from: &str, to: &[&str], message: &str) {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect to smtp");
    stream
        .set_read_timeout(Some(WAIT))
        .expect("smtp read timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone smtp stream"));
    let mut writer = stream;
    let mut command = |line: &str, code: &str, reader: &mut BufReader<TcpStream>| {
        writer
            .write_all(format!("{line}\r\n").as_bytes())
            .expect("write smtp command");
        expect_reply(reader, code)
    };
    expect_reply(&mut reader, "220");
    command("EHLO selftest.localhost", "250", &mut reader);
    command(&format!("MAIL FROM:<{from}>"), "250", &mut reader);
    for rcpt in to {
        command(&format!("RCPT TO:<{rcpt}>"), "250", &mut reader);
    }
    command("DATA", "354", &mut reader);
    let mut data = String::new();
    for line in message.lines() {
        if line.starts_with('.') {
            data.push('.');
        }
        data.push_str(line);
        data.push_str("\r\n");
    }
    data.push('.');
    command(&data, "250", &mut reader);
    command("QUIT", "221", &mut reader);
}

/// Base64 wrapped at 76 columns, as mailers send it.
fn wrapped_base64(content: &str) -> String {
    let encoded = STANDARD.encode(content);
    let lines: Vec<&str> = encoded
        .as_bytes()
        .chunks(76)
        .map(|chunk| std::str::from_utf8(chunk).expect("base64 is ascii"))
        .collect();
    lines.join("\n")
}

#[test]
fn smtp_server_receives_multipart_mail_and_mail_parses_it() {
    let smtp = SmtpServer::start();
    assert_eq!(smtp.url(), format!("smtp://127.0.0.1:{}", smtp.port()));
    assert!(smtp.messages().is_empty());

    let html = "<p>Tag <b>team/app:v1</b> moved \u{2014} caf\u{e9}</p>\n<p>second line</p>";
    let message = format!(
        "From: =?utf-8?q?Driftwatch_Caf=C3=A9?= <driftwatch@example.test>\n\
         To: sre@example.test\n\
         Subject: =?utf-8?q?drift_detected_=E2=80=94_team/app:v1?=\n \
         =?utf-8?b?{subject_tail}?=\n\
         X-Folded: first part\n\
         \tcontinued after a tab\n\
         MIME-Version: 1.0\n\
         Content-Type: multipart/alternative;\n boundary=\"=_selftest boundary\"\n\
         \n\
         This preamble is for non-MIME readers.\n\
         --=_selftest boundary\n\
         Content-Type: text/plain; charset=utf-8\n\
         Content-Transfer-Encoding: quoted-printable\n\
         \n\
         Tag team/app:v1 moved =E2=80=94 caf=C3=A9, in a line long enough to need a so=\n\
         ft break.\n\
         .a line starting with a dot\n\
         --=_selftest boundary\n\
         Content-Type: text/html; charset=\"utf-8\"\n\
         Content-Transfer-Encoding: base64\n\
         \n\
         {html_b64}\n\
         --=_selftest boundary--\n\
         epilogue\n",
        subject_tail = STANDARD.encode(" (digest changed)"),
        html_b64 = wrapped_base64(html),
    );
    send_smtp(
        smtp.port(),
        "driftwatch@example.test",
        &["sre@example.test", "oncall@example.test"],
        &message,
    );

    let mails = smtp.wait_for(1, WAIT);
    assert_eq!(mails.len(), 1, "{mails:#?}");
    let mail = &mails[0];
    assert!(mail.path.starts_with(smtp.maildir()), "{:?}", mail.path);
    assert_eq!(
        mail.subject(),
        Some("drift detected \u{2014} team/app:v1 (digest changed)")
    );
    assert_eq!(
        mail.header("FROM"),
        Some("Driftwatch Caf\u{e9} <driftwatch@example.test>")
    );
    assert_eq!(mail.header("to"), Some("sre@example.test"));
    assert_eq!(
        mail.header("x-folded"),
        Some("first part\tcontinued after a tab")
    );
    assert!(
        mail.raw_header("subject")
            .is_some_and(|s| s.starts_with("=?utf-8?q?drift_detected")),
        "{:?}",
        mail.raw_header("subject")
    );
    assert_eq!(mail.content_type, "multipart/alternative");
    assert_eq!(mail.mail_from(), Some("driftwatch@example.test"));
    assert_eq!(
        mail.rcpt_to(),
        vec!["sre@example.test", "oncall@example.test"]
    );
    assert_eq!(
        mail.text.as_deref(),
        Some(
            "Tag team/app:v1 moved \u{2014} caf\u{e9}, in a line long enough to need a soft \
             break.\n.a line starting with a dot"
        )
    );
    assert_eq!(mail.html.as_deref(), Some(html));
    assert_eq!(mail.parts.len(), 2);
    assert_eq!(mail.parts[1].charset.as_deref(), Some("utf-8"));
    assert!(mail.raw.contains("epilogue"));
}

#[test]
fn smtp_messages_come_back_in_arrival_order_and_survive_a_restart() {
    let mut smtp = SmtpServer::start();
    for n in 0..5 {
        let message = format!("Subject: message {n}\n\nbody of message {n}\n");
        send_smtp(smtp.port(), "a@example.test", &["b@example.test"], &message);
    }
    let mails = smtp.wait_for(5, WAIT);
    let subjects: Vec<&str> = mails.iter().filter_map(Mail::subject).collect();
    assert_eq!(
        subjects,
        [
            "message 0",
            "message 1",
            "message 2",
            "message 3",
            "message 4"
        ]
    );
    // No Content-Type: a plain single-part text mail.
    assert_eq!(mails[3].content_type, "text/plain");
    assert_eq!(mails[3].text.as_deref(), Some("body of message 3\n"));
    assert_eq!(mails[3].html, None);

    smtp.clear();
    assert!(smtp.messages().is_empty());
    smtp.stop();
    assert!(!smtp.is_running());
    let refused = TcpStream::connect((Ipv4Addr::LOCALHOST, smtp.port())).expect_err("stopped");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    let port = smtp.port();
    smtp.restart();
    assert!(smtp.is_running());
    assert_eq!(smtp.port(), port);
    let message = "Subject: after the outage\n\nback\n";
    send_smtp(port, "a@example.test", &["b@example.test"], message);
    let mails = smtp.wait_for(1, WAIT);
    assert_eq!(mails[0].subject(), Some("after the outage"));
}

#[test]
fn mail_parser_handles_nested_parts_attachments_and_charsets() {
    let raw = "Subject: =?utf-8?b?4oCU?= =?utf-8?q?=E2=80?=\r\n \
               =?utf-8?q?=94_split?= =?iso-8859-1?q?caf=E9?= plain\r\n\
               Content-Type: multipart/mixed; boundary=outer\r\n\
               \r\n\
               --outer\r\n\
               Content-Type: multipart/alternative; boundary=\"inner\"\r\n\
               \r\n\
               --inner\r\n\
               Content-Type: text/plain; charset=ISO-8859-1\r\n\
               Content-Transfer-Encoding: quoted-printable\r\n\
               \r\n\
               caf=E9   \r\n\
               --inner\r\n\
               Content-Type: text/html\r\n\
               \r\n\
               <p>hi</p>\r\n\
               --inner--\r\n\
               --outer\r\n\
               Content-Type: text/plain; name=evidence.txt\r\n\
               Content-Disposition: attachment; filename=evidence.txt\r\n\
               Content-Transfer-Encoding: base64\r\n\
               \r\n\
               ZXZpZGVuY2U\r\n\
               --outer--\r\n";
    let mail = Mail::parse(raw.as_bytes());
    assert_eq!(
        mail.subject(),
        Some("\u{2014}\u{2014} splitcaf\u{e9} plain")
    );
    assert_eq!(mail.content_type, "multipart/mixed");
    assert_eq!(mail.parts.len(), 3);
    assert_eq!(mail.text.as_deref(), Some("caf\u{e9}"));
    assert_eq!(mail.html.as_deref(), Some("<p>hi</p>"));
    assert!(mail.parts[2].is_attachment());
    assert_eq!(mail.parts[2].body, b"evidence");
}

#[tokio::test]
async fn receiver_records_posts_and_serves_scripted_responses() {
    let receiver = Receiver::start();
    receiver.script(vec![
        Respond::status(503).with_body("down for maintenance"),
        Respond::retry_after(429, 2),
    ]);
    let client = client();
    let url = receiver.url("/hooks/sre?team=platform");
    assert!(url.starts_with(&format!("http://127.0.0.1:{}/", receiver.port())));

    let mut statuses = Vec::new();
    for n in 0..3 {
        let response = client
            .post(&url)
            .header("Content-Type", "application/json")
            .header("X-Delivery", format!("d-{n}"))
            .body(format!("{{\"n\":{n}}}"))
            .send()
            .await
            .expect("post to receiver");
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("ascii").to_owned());
        let status = response.status().as_u16();
        let body = response.text().await.expect("response body");
        statuses.push((status, retry_after, body));
    }
    assert_eq!(
        statuses,
        [
            (503, None, "down for maintenance".to_owned()),
            (429, Some("2".to_owned()), String::new()),
            (200, None, String::new()),
        ]
    );
    assert_eq!(receiver.pending_script(), 0);

    receiver.set_default(410);
    let gone = client.get(receiver.url("gone")).send().await.expect("get");
    assert_eq!(gone.status().as_u16(), 410);

    let requests = receiver.wait_for(4, WAIT);
    assert_eq!(requests.len(), 4);
    let first = &requests[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/hooks/sre");
    assert_eq!(first.query.as_deref(), Some("team=platform"));
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert!(
        first
            .headers
            .iter()
            .any(|(n, v)| n == "x-delivery" && v == "d-0")
    );
    assert_eq!(first.body, b"{\"n\":0}");
    assert_eq!(first.json()["n"], 0);
    let recorded: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(recorded, [503, 429, 200, 410]);
    assert_eq!(
        (requests[3].method.as_str(), requests[3].path.as_str()),
        ("GET", "/gone")
    );
    assert!(requests.windows(2).all(|w| w[0].at <= w[1].at));
}

#[tokio::test]
async fn receiver_outage_refuses_connections_and_restart_reuses_the_port() {
    let mut receiver = Receiver::start();
    let port = receiver.port();
    // No pooling, so the post-outage request really has to connect.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let url = receiver.url("/hook");
    let ok = client.post(&url).body("before").send().await.expect("post");
    assert_eq!(ok.status().as_u16(), 200);

    receiver.stop();
    assert!(!receiver.is_running());
    let err = client
        .post(&url)
        .body("during")
        .send()
        .await
        .expect_err("receiver is down");
    assert!(err.is_connect(), "expected a connect error, got {err:?}");
    let refused = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect_err("port closed");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    receiver.restart();
    assert_eq!(receiver.port(), port);
    let ok = client.post(&url).body("after").send().await.expect("post");
    assert_eq!(ok.status().as_u16(), 200);
    let bodies: Vec<String> = receiver
        .wait_for(2, WAIT)
        .iter()
        .map(|r| r.body_text())
        .collect();
    assert_eq!(bodies, ["before", "after"]);

    // A second outage and recovery works the same way.
    receiver.restart();
    let ok = client.post(&url).body("again").send().await.expect("post");
    assert_eq!(ok.status().as_u16(), 200);
}

fn hand_signature(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .expect("base64 key");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("hmac key");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    STANDARD.encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn verify_accepts_a_hand_signed_delivery_and_rejects_tampering() {
    let secret = webhooks::test_secret();
    assert!(secret.starts_with("whsec_"));
    assert!(webhooks::decode_secret(&secret).expect("valid").len() >= 24);

    let receiver = Receiver::start();
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    )
    .expect("i64 seconds");
    let (id, timestamp) = ("msg_selftest_0001", now.to_string());
    let body = br#"{"type":"drift.detected","data":{"ref":"team/app:v1"}}"#;
    let signature = hand_signature(&secret, id, &timestamp, body);
    let response = client()
        .post(receiver.url("/webhook"))
        .header("webhook-id", id)
        .header("Webhook-Timestamp", &timestamp)
        .header(
            "webhook-signature",
            format!("v1a,bm90IHVzZWQ= v1,{signature}"),
        )
        .body(body.to_vec())
        .send()
        .await
        .expect("post");
    assert_eq!(response.status().as_u16(), 200);
    let received = receiver.wait_for(1, WAIT).remove(0);

    assert_eq!(verify(&secret, &received), Ok(()));

    let mut tampered = received.clone();
    tampered.body = br#"{"type":"drift.detected","data":{"ref":"team/app:v2"}}"#.to_vec();
    let err = verify(&secret, &tampered).expect_err("tampered body");
    assert!(err.contains("matches"), "{err}");

    let other_secret = format!("whsec_{}", STANDARD.encode([7u8; 32]));
    assert!(verify(&other_secret, &received).is_err());

    assert_eq!(verify_at(&secret, &received, now + 299), Ok(()));
    let err = verify_at(&secret, &received, now + 301).expect_err("stale");
    assert!(err.contains("beyond"), "{err}");
    assert!(verify_at(&secret, &received, now - 301).is_err());

    let mut unsigned = received.clone();
    unsigned
        .headers
        .retain(|(name, _)| name != "webhook-signature");
    let err = verify(&secret, &unsigned).expect_err("no signature");
    assert!(err.contains("no webhook-signature header"), "{err}");
}

#[test]
fn verify_matches_the_specification_reference_vector() {
    // The signing example used across the Standard Webhooks reference libraries.
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (id, timestamp) = ("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330");
    let body = br#"{"test": 2432232314}"#;
    let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    let now = 1_614_265_330;
    assert_eq!(verify_parts(secret, id, timestamp, good, body, now), Ok(()));
    assert_eq!(
        format!("v1,{}", hand_signature(secret, id, timestamp, body)),
        good
    );
    let bad = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=";
    assert!(verify_parts(secret, id, timestamp, bad, body, now).is_err());
    assert!(verify_parts(secret, id, timestamp, "v2,abc", body, now).is_err());
    assert!(verify_parts(secret, id, "16142653.30", good, body, now).is_err());
}

#[test]
#[should_panic(expected = "expected at least 2 mail(s)")]
fn smtp_wait_for_panics_listing_what_arrived() {
    let smtp = SmtpServer::start();
    send_smtp(
        smtp.port(),
        "a@example.test",
        &["b@example.test"],
        "Subject: only one\n\nbody\n",
    );
    smtp.wait_for(2, Duration::from_millis(500));
}

#[test]
#[should_panic(expected = "expected at least 1 webhook request(s)")]
fn receiver_wait_for_panics_when_nothing_arrives() {
    let receiver = Receiver::start();
    receiver.wait_for(1, Duration::from_millis(100));
}
