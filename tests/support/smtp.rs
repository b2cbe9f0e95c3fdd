//! Harness around a real SMTP server, Debian's `python3-aiosmtpd`, which stores every accepted
//! message in a Maildir on 127.0.0.1, plus a small MIME reader so tests can assert on the
//! headers and the decoded text and HTML parts of what driftwatch mailed.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use tempfile::TempDir;

use super::receiver::reserve_port;
use super::registry::free_port;

/// Environment variable that overrides which Python runs aiosmtpd (it must have the module).
pub const SMTP_PYTHON_ENV: &str = "DRIFTWATCH_TEST_SMTP_PYTHON";
/// aiosmtpd is a Debian package for the system Python, not for whatever `python3` is on PATH.
const DEFAULT_PYTHON: &str = "/usr/bin/python3";
const INSTALL_HINT: &str = "install it with `apt-get install python3-aiosmtpd`";
const MAIL_POLL: Duration = Duration::from_millis(50);
/// Same port race as the registry harness: a port found free may be taken before we bind it.
const START_ATTEMPTS: usize = 3;
/// Nesting deeper than this is treated as an opaque leaf rather than recursed into.
const MAX_MIME_DEPTH: usize = 16;

/// A running `python3 -m aiosmtpd` whose Mailbox handler writes into a Maildir in a tempdir.
pub struct SmtpServer {
    python: PathBuf,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    /// While stopped, a bound but not listening socket keeps the port (connections are
    /// refused) so no other test takes it before [`SmtpServer::restart`].
    reservation: Option<tokio::net::TcpSocket>,
}

impl SmtpServer {
    /// Starts a fresh server and blocks until it greets with `220` on 127.0.0.1.
    pub fn start() -> SmtpServer {
        let python = smtp_python();
        let dir = tempfile::Builder::new()
            .prefix("driftwatch-smtp-")
            .tempdir()
            .expect("create smtp tempdir");
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match launch(&python, dir.path(), port) {
                Ok(child) => {
                    return SmtpServer {
                        python,
                        dir,
                        port,
                        child: Some(child),
                        reservation: None,
                    };
                }
                Err(err) if err.to_ascii_lowercase().contains("address already in use") => {
                    last_error = err;
                }
                Err(err) => panic!("{err}"),
            }
        }
        panic!(
            "smtp server could not get a free port after {START_ATTEMPTS} attempts: {last_error}"
        )
    }

    /// Same as [`SmtpServer::start`], run on tokio's blocking pool so async tests (even on a
    /// current-thread runtime) do not stall their executor while Python starts.
    pub async fn start_async() -> SmtpServer {
        run_blocking(SmtpServer::start).await
    }

    /// `smtp://127.0.0.1:PORT`, plain SMTP without TLS or authentication.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1`, for configs that take host and port separately.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The Maildir (with `new/`, `cur/` and `tmp/`) the server delivers into.
    pub fn maildir(&self) -> PathBuf {
        self.dir.path().join("maildir")
    }

    /// Everything the server process wrote to stdout/stderr so far, across restarts.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("smtp.log")).unwrap_or_default()
    }

    /// Every delivered message, oldest first.
    pub fn messages(&self) -> Vec<Mail> {
        read_maildir(&self.maildir())
    }

    /// Polls every 50 ms until at least `n` messages were delivered and returns all of them,
    /// oldest first; panics at `timeout` listing what did arrive and the server's output.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Mail> {
        wait_for_mail(self.dir.path(), n, timeout)
    }

    /// Same as [`SmtpServer::wait_for`], polling on tokio's blocking pool (real time, so it
    /// stays bounded even when the test pauses tokio's clock).
    pub async fn wait_for_async(&self, n: usize, timeout: Duration) -> Vec<Mail> {
        let dir = self.dir.path().to_owned();
        run_blocking(move || wait_for_mail(&dir, n, timeout)).await
    }

    /// Deletes every delivered message, so later waits count from zero.
    pub fn clear(&self) {
        for sub in ["new", "cur"] {
            let Ok(entries) = std::fs::read_dir(self.maildir().join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server and reaps it, so connections are refused; delivered mail and the
    /// port stay. Calling it twice is harmless.
    pub fn stop(&mut self) {
        let was_running = self.child.is_some();
        self.kill();
        if was_running && self.reservation.is_none() {
            // aiosmtpd binds with SO_REUSEADDR, which lets it rebind beside this reservation.
            self.reservation = reserve_port(self.port).ok();
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // kill fails only if the process already exited; wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (if needed) and starts again on the same port and Maildir, to simulate a mail
    /// server outage and recovery.
    pub fn restart(&mut self) {
        self.stop();
        let child =
            launch(&self.python, self.dir.path(), self.port).unwrap_or_else(|e| panic!("{e}"));
        self.child = Some(child);
        self.reservation = None;
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resolves the Python that has aiosmtpd, panicking with install instructions rather than
/// skipping: an email test that silently skips proves nothing.
pub fn smtp_python() -> PathBuf {
    let python = std::env::var_os(SMTP_PYTHON_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PYTHON));
    if !python.is_file() {
        panic!(
            "{} not found, so the aiosmtpd test server cannot run: {INSTALL_HINT} \
             (or set {SMTP_PYTHON_ENV} to a Python that has the aiosmtpd module)",
            python.display()
        );
    }
    // -I (isolated) keeps a developer's PYTHONPATH or user site-packages from leaking in.
    let probe = Command::new(&python)
        .args(["-I", "-c", "import aiosmtpd"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", python.display()));
    if !probe.status.success() {
        panic!(
            "{} cannot import aiosmtpd ({}): {INSTALL_HINT}\n{}",
            python.display(),
            probe.status,
            String::from_utf8_lossy(&probe.stderr)
        );
    }
    python
}

/// Spawns aiosmtpd and blocks until it greets or fails. On failure the child is reaped and
/// the error carries the server's own output.
fn launch(python: &Path, dir: &Path, port: u16) -> Result<Child, String> {
    let maildir = dir.join("maildir");
    let log_path = dir.join("smtp.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("open smtp log");
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    // Output goes to a file rather than a pipe so the server can never block on a full pipe.
    let child = Command::new(python)
        .args(["-I", "-m", "aiosmtpd", "-n", "-l"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-c", "aiosmtpd.handlers.Mailbox"])
        .arg(&maildir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", python.display()));

    super::process::wait_ready(
        child,
        &format!("aiosmtpd on port {port}"),
        &log_path,
        log_start,
        || probe_greeting(port),
    )
}

/// Connects once and reads the greeting; true only on a `220` line.
fn probe_greeting(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(1));
    if stream.set_read_timeout(timeout).is_err() || stream.set_write_timeout(timeout).is_err() {
        return false;
    }
    let mut line = String::new();
    let greeted = match stream.try_clone() {
        Ok(reader) => {
            BufReader::new(reader).read_line(&mut line).is_ok() && line.starts_with("220")
        }
        Err(_) => false,
    };
    // Leave politely so the server does not log a dropped session.
    let _ = stream.write_all(b"QUIT\r\n");
    greeted
}

fn wait_for_mail(dir: &Path, n: usize, timeout: Duration) -> Vec<Mail> {
    let maildir = dir.join("maildir");
    let deadline = Instant::now() + timeout;
    loop {
        let mails = read_maildir(&maildir);
        if mails.len() >= n {
            return mails;
        }
        if Instant::now() >= deadline {
            let arrived: Vec<String> = mails
                .iter()
                .map(|m| {
                    format!(
                        "  from {:?} to {:?}: {:?}",
                        m.mail_from(),
                        m.rcpt_to(),
                        m.subject()
                    )
                })
                .collect();
            panic!(
                "expected at least {n} mail(s) within {timeout:?}, {} arrived:\n{}\n\
                 smtp server output:\n{}",
                mails.len(),
                arrived.join("\n"),
                std::fs::read_to_string(dir.join("smtp.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(MAIL_POLL);
    }
}

/// Reads `new/` and `cur/` in arrival order. Python names Maildir files
/// `SECS.M<usec>P<pid>Q<counter>.<host>`; the microseconds are not zero-padded, so the names
/// are ordered numerically rather than as strings.
fn read_maildir(maildir: &Path) -> Vec<Mail> {
    let mut files = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file() {
                let name = entry.file_name().to_string_lossy().into_owned();
                files.push((arrival_key(&name), path));
            }
        }
    }
    files.sort();
    files
        .into_iter()
        // Files only ever appear complete (link from tmp/), but one may be removed by clear().
        .filter_map(|(_, path)| {
            std::fs::read(&path)
                .ok()
                .map(|raw| Mail::parse_file(path, &raw))
        })
        .collect()
}

/// (seconds, microseconds, per-process counter, name); unparsable names sort last.
fn arrival_key(name: &str) -> (u64, u64, u64, String) {
    let parsed = (|| {
        let (secs, rest) = name.split_once('.')?;
        let rest = rest.strip_prefix('M')?;
        let (usec, rest) = rest.split_once('P')?;
        let (_pid, rest) = rest.split_once('Q')?;
        let counter = rest.split('.').next()?;
        Some((
            secs.parse().ok()?,
            usec.parse().ok()?,
            counter.parse().ok()?,
        ))
    })();
    let (secs, usec, counter) = parsed.unwrap_or((u64::MAX, 0, 0));
    (secs, usec, counter, name.to_owned())
}

/// One delivered message: the raw text plus parsed headers and decoded body parts.
#[derive(Debug, Clone)]
pub struct Mail {
    /// The Maildir file it was read from (empty for [`Mail::parse`]).
    pub path: PathBuf,
    /// The stored message as text (lossy UTF-8); Maildir stores it with `\n` line endings.
    pub raw: String,
    /// Top-level headers in order: unfolded, trimmed, RFC 2047 encoded words decoded.
    pub headers: Vec<(String, String)>,
    /// Top-level headers unfolded and trimmed but not decoded.
    pub raw_headers: Vec<(String, String)>,
    /// Lowercased top-level media type, e.g. `multipart/alternative` (`text/plain` if absent).
    pub content_type: String,
    /// Decoded body of the first inline `text/plain` part (or of a plain single-part mail).
    pub text: Option<String>,
    /// Decoded body of the first inline `text/html` part.
    pub html: Option<String>,
    /// Every leaf part in document order, multipart containers flattened away.
    pub parts: Vec<MimePart>,
}

/// One leaf MIME part with its transfer encoding undone.
#[derive(Debug, Clone)]
pub struct MimePart {
    /// Unfolded, trimmed, RFC 2047-decoded headers of the part.
    pub headers: Vec<(String, String)>,
    /// Lowercased media type, e.g. `text/html`.
    pub content_type: String,
    /// Lowercased `charset` parameter, if any.
    pub charset: Option<String>,
    /// Body after quoted-printable or base64 decoding (line endings normalised to `\n`).
    pub body: Vec<u8>,
}

impl MimePart {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body decoded from its charset (UTF-8, US-ASCII and ISO-8859-1 are understood;
    /// anything else is read as lossy UTF-8).
    pub fn text(&self) -> String {
        decode_charset(&self.body, self.charset.as_deref())
    }

    /// True when `Content-Disposition` says `attachment`.
    pub fn is_attachment(&self) -> bool {
        self.header("content-disposition").is_some_and(|d| {
            d.split(';')
                .next()
                .is_some_and(|kind| kind.trim().eq_ignore_ascii_case("attachment"))
        })
    }
}

impl Mail {
    /// Parses a message from its bytes (CRLF or LF line endings).
    pub fn parse(raw: &[u8]) -> Mail {
        Mail::parse_file(PathBuf::new(), raw)
    }

    fn parse_file(path: PathBuf, raw: &[u8]) -> Mail {
        let normalized = normalize_newlines(raw);
        let (raw_headers, body) = split_entity(&normalized);
        let headers = decode_headers(&raw_headers);
        let content_type = parse_content_type(find_header(&headers, "content-type")).mime;
        let mut parts = Vec::new();
        collect_parts(&headers, body, 0, &mut parts);
        let inline_body = |mime: &str| {
            parts
                .iter()
                .find(|p| p.content_type == mime && !p.is_attachment())
                .map(MimePart::text)
        };
        let (text, html) = (inline_body("text/plain"), inline_body("text/html"));
        Mail {
            path,
            raw: String::from_utf8_lossy(raw).into_owned(),
            headers,
            raw_headers,
            content_type,
            text,
            html,
            parts,
        }
    }

    /// First header named `name` (case-insensitive), unfolded and RFC 2047-decoded.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Every header named `name` (case-insensitive), decoded, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// First header named `name`, unfolded but with encoded words left as sent.
    pub fn raw_header(&self, name: &str) -> Option<&str> {
        find_header(&self.raw_headers, name)
    }

    /// The decoded `Subject`, if any.
    pub fn subject(&self) -> Option<&str> {
        self.header("subject")
    }

    /// Envelope sender (`MAIL FROM`), recorded by aiosmtpd as `X-MailFrom`.
    pub fn mail_from(&self) -> Option<&str> {
        self.header("x-mailfrom")
    }

    /// Envelope recipients (`RCPT TO`), recorded by aiosmtpd as `X-RcptTo`.
    pub fn rcpt_to(&self) -> Vec<String> {
        self.header("x-rcptto")
            .map(|v| {
                v.split(',')
                    .map(|r| r.trim().to_owned())
                    .filter(|r| !r.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn normalize_newlines(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\r' && raw.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(raw[i]);
        i += 1;
    }
    out
}

/// Splits an entity (LF line endings) into unfolded, trimmed headers and the body after the
/// blank line; an entity without a blank line is all headers.
fn split_entity(entity: &[u8]) -> (Vec<(String, String)>, &[u8]) {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut pos = 0;
    let mut body_start = entity.len();
    while pos < entity.len() {
        let end = entity[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(entity.len(), |i| pos + i);
        let line = String::from_utf8_lossy(&entity[pos..end]);
        let next = (end + 1).min(entity.len());
        if line.is_empty() {
            body_start = next;
            break;
        }
        if line.starts_with([' ', '\t']) {
            // Unfolding removes only the line break; the leading whitespace stays.
            if let Some((_, value)) = headers.last_mut() {
                value.push_str(&line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_owned(), value.to_owned()));
        }
        pos = next;
    }
    for (_, value) in &mut headers {
        *value = value.trim().to_owned();
    }
    (headers, &entity[body_start..])
}

fn decode_headers(raw: &[(String, String)]) -> Vec<(String, String)> {
    raw.iter()
        .map(|(name, value)| (name.clone(), decode_encoded_words(value)))
        .collect()
}

struct ContentType {
    mime: String,
    params: Vec<(String, String)>,
}

impl ContentType {
    fn param(&self, name: &str) -> Option<&str> {
        find_header(&self.params, name)
    }
}

/// Parses `type/subtype; key=value; key="quoted value"`; a missing or empty value means
/// `text/plain`, the RFC 2045 default.
fn parse_content_type(value: Option<&str>) -> ContentType {
    let mut pieces = split_unquoted(value.unwrap_or(""), ';').into_iter();
    let mime = pieces
        .next()
        .map(|m| m.trim().to_ascii_lowercase())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "text/plain".to_owned());
    let params = pieces
        .filter_map(|piece| {
            let (key, value) = piece.split_once('=')?;
            Some((key.trim().to_ascii_lowercase(), unquote(value.trim())))
        })
        .collect();
    ContentType { mime, params }
}

fn split_unquoted(value: &str, separator: char) -> Vec<String> {
    let mut pieces = vec![String::new()];
    let (mut quoted, mut escaped) = (false, false);
    for c in value.chars() {
        let current = pieces.last_mut().expect("at least one piece");
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == separator && !quoted {
            pieces.push(String::new());
            continue;
        }
        current.push(c);
    }
    pieces
}

fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Walks an entity: multiparts are split and recursed into, anything else becomes a leaf.
fn collect_parts(headers: &[(String, String)], body: &[u8], depth: usize, out: &mut Vec<MimePart>) {
    let content_type = parse_content_type(find_header(headers, "content-type"));
    if content_type.mime.starts_with("multipart/")
        && depth < MAX_MIME_DEPTH
        && let Some(boundary) = content_type.param("boundary")
    {
        for part in split_multipart(body, boundary) {
            let (raw_headers, part_body) = split_entity(part);
            collect_parts(&decode_headers(&raw_headers), part_body, depth + 1, out);
        }
        return;
    }
    let encoding = find_header(headers, "content-transfer-encoding")
        .map(|e| e.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let body = match encoding.as_str() {
        "quoted-printable" => decode_quoted_printable(body),
        // Undecodable base64 is kept as sent so an assertion failure shows what was there.
        "base64" => decode_base64(body).unwrap_or_else(|| body.to_vec()),
        _ => body.to_vec(),
    };
    out.push(MimePart {
        headers: headers.to_vec(),
        charset: content_type.param("charset").map(str::to_ascii_lowercase),
        content_type: content_type.mime,
        body,
    });
}

/// Splits a multipart body at `--boundary` lines up to `--boundary--`. The line break before
/// each delimiter belongs to the delimiter, as RFC 2046 says; preamble and epilogue are
/// dropped, and a missing close delimiter ends the last part at the end of the body.
fn split_multipart<'a>(body: &'a [u8], boundary: &str) -> Vec<&'a [u8]> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut parts = Vec::new();
    let mut open: Option<usize> = None;
    let mut pos = 0;
    while pos < body.len() {
        let end = body[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(body.len(), |i| pos + i);
        let line = body[pos..end].trim_ascii_end();
        if let Some(rest) = line.strip_prefix(delimiter)
            && (rest.is_empty() || rest == b"--")
        {
            if let Some(start) = open {
                // pos - 1 is the '\n' ending the part's last line.
                parts.push(&body[start..pos.saturating_sub(1).max(start)]);
            }
            if rest == b"--" {
                return parts;
            }
            open = Some((end + 1).min(body.len()));
        }
        pos = end + 1;
    }
    if let Some(start) = open {
        parts.push(&body[start..]);
    }
    parts
}

fn decode_quoted_printable(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    let last = lines.len() - 1;
    for (index, line) in lines.into_iter().enumerate() {
        // Trailing whitespace is transport padding and must be dropped (RFC 2045 6.7).
        let line = line.trim_ascii_end();
        let (line, soft_break) = match line.strip_suffix(b"=") {
            Some(stripped) => (stripped, true),
            None => (line, false),
        };
        let mut i = 0;
        while i < line.len() {
            if line[i] == b'='
                && let Some(byte) = line.get(i + 1..i + 3).and_then(hex_byte)
            {
                out.push(byte);
                i += 3;
                continue;
            }
            out.push(line[i]);
            i += 1;
        }
        if !soft_break && index != last {
            out.push(b'\n');
        }
    }
    out
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(pair).ok()?;
    u8::from_str_radix(text, 16).ok()
}

fn decode_base64(encoded: &[u8]) -> Option<Vec<u8>> {
    // Mailers differ on padding; accept it present or absent.
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let compact: Vec<u8> = encoded
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    LENIENT.decode(compact).ok()
}

fn decode_charset(bytes: &[u8], charset: Option<&str>) -> String {
    match charset.map(str::to_ascii_lowercase).as_deref() {
        Some("iso-8859-1" | "iso8859-1" | "latin1" | "latin-1" | "l1") => {
            bytes.iter().map(|&b| char::from(b)).collect()
        }
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Decodes RFC 2047 encoded words (`=?charset?B|Q?text?=`). Whitespace between two encoded
/// words is dropped, and adjacent words in one charset are joined before charset decoding
/// so a character split across two words survives.
fn decode_encoded_words(value: &str) -> String {
    let mut out = String::new();
    let mut pending_space = "";
    // Bytes of consecutive encoded words sharing a charset, not yet charset-decoded.
    let mut run: Option<(String, Vec<u8>)> = None;
    for token in tokens(value) {
        if token.starts_with(char::is_whitespace) {
            pending_space = token;
            continue;
        }
        match decode_encoded_word(token) {
            Some((charset, bytes)) => match run.as_mut() {
                Some((run_charset, run_bytes)) if *run_charset == charset => {
                    run_bytes.extend_from_slice(&bytes);
                }
                _ => {
                    if let Some((run_charset, run_bytes)) = run.take() {
                        out.push_str(&decode_charset(&run_bytes, Some(&run_charset)));
                    } else {
                        out.push_str(pending_space);
                    }
                    run = Some((charset, bytes));
                }
            },
            None => {
                if let Some((run_charset, run_bytes)) = run.take() {
                    out.push_str(&decode_charset(&run_bytes, Some(&run_charset)));
                }
                out.push_str(pending_space);
                out.push_str(token);
            }
        }
        pending_space = "";
    }
    if let Some((run_charset, run_bytes)) = run {
        out.push_str(&decode_charset(&run_bytes, Some(&run_charset)));
    }
    out.push_str(pending_space);
    out
}

/// Splits into alternating runs of whitespace and non-whitespace, keeping both.
fn tokens(value: &str) -> Vec<&str> {
    let mut tokens = Vec::new();
    let mut start = 0;
    let mut in_space = None;
    for (i, c) in value.char_indices() {
        let space = c.is_whitespace();
        if in_space.is_some_and(|s| s != space) {
            tokens.push(&value[start..i]);
            start = i;
        }
        in_space = Some(space);
    }
    if start < value.len() {
        tokens.push(&value[start..]);
    }
    tokens
}

fn decode_encoded_word(token: &str) -> Option<(String, Vec<u8>)> {
    let inner = token.strip_prefix("=?")?.strip_suffix("?=")?;
    let mut fields = inner.splitn(3, '?');
    let (charset, encoding, text) = (fields.next()?, fields.next()?, fields.next()?);
    if charset.is_empty() || text.contains('?') {
        return None;
    }
    // RFC 2231 allows a language suffix: `utf-8*en`.
    let charset = charset.split('*').next()?.to_ascii_lowercase();
    let bytes = match encoding {
        "B" | "b" => decode_base64(text.as_bytes())?,
        "Q" | "q" => {
            let mut bytes = Vec::with_capacity(text.len());
            let raw = text.as_bytes();
            let mut i = 0;
            while i < raw.len() {
                match raw[i] {
                    b'_' => bytes.push(b' '),
                    b'=' => {
                        bytes.push(raw.get(i + 1..i + 3).and_then(hex_byte)?);
                        i += 2;
                    }
                    other => bytes.push(other),
                }
                i += 1;
            }
            bytes
        }
        _ => return None,
    };
    Some((charset, bytes))
}

/// Runs blocking work on tokio's blocking pool and re-raises its panic with the original
/// message, so a failure reads the same as in a synchronous test.
async fn run_blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}
