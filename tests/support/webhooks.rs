//! Independent verification of Standard Webhooks v1 (HMAC-SHA256) signatures, written from the
//! specification rather than from driftwatch's code, so tests can check what driftwatch signs.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::receiver::Received;

/// Prefix of a serialised symmetric signing secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Largest accepted distance between `webhook-timestamp` and now, either way.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;
/// 32 fixed bytes (the spec asks for at least 24) behind [`test_secret`].
const TEST_KEY: &[u8; 32] = b"driftwatch-integration-test-key!";

/// A fixed, valid `whsec_<base64>` secret for configs under test.
pub fn test_secret() -> String {
    format!("{SECRET_PREFIX}{}", STANDARD.encode(TEST_KEY))
}

/// Verifies a delivery's `webhook-id`, `webhook-timestamp` and `webhook-signature` headers
/// against `secret`, with the timestamp within five minutes of now.
pub fn verify(secret: &str, received: &Received) -> Result<(), String> {
    verify_at(secret, received, unix_now())
}

/// Same as [`verify`] with "now" given as Unix seconds.
pub fn verify_at(secret: &str, received: &Received, now_unix: i64) -> Result<(), String> {
    let id = single_header(received, "webhook-id")?;
    let timestamp = single_header(received, "webhook-timestamp")?;
    let signatures = single_header(received, "webhook-signature")?;
    verify_parts(secret, id, timestamp, signatures, &received.body, now_unix)
}

/// The verification itself: `signatures` is the raw `webhook-signature` value, a
/// space-separated list of `version,base64` entries of which one `v1` entry must match.
pub fn verify_parts(
    secret: &str,
    msg_id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now_unix: i64,
) -> Result<(), String> {
    let key = decode_secret(secret)?;
    if msg_id.is_empty() {
        return Err("webhook-id is empty".to_owned());
    }
    // The spec warns that a '.' in either field would make the signed content ambiguous.
    if msg_id.contains('.') {
        return Err(format!("webhook-id {msg_id:?} contains '.'"));
    }
    if timestamp.is_empty() || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "webhook-timestamp {timestamp:?} is not integer Unix seconds"
        ));
    }
    let sent: i64 = timestamp
        .parse()
        .map_err(|e| format!("webhook-timestamp {timestamp:?}: {e}"))?;
    let skew = now_unix.saturating_sub(sent);
    if skew.abs() > TIMESTAMP_TOLERANCE_SECS {
        return Err(format!(
            "webhook-timestamp {sent} is {skew} s away from now ({now_unix}), beyond \
             {TIMESTAMP_TOLERANCE_SECS} s"
        ));
    }

    let mut mac =
        Hmac::<Sha256>::new_from_slice(&key).map_err(|e| format!("HMAC rejects the key: {e}"))?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);

    let mut v1_entries = 0;
    for entry in signatures.split(' ').filter(|e| !e.is_empty()) {
        let Some(("v1", encoded)) = entry.split_once(',') else {
            // Other schemes (v1a, future versions) are allowed alongside and ignored.
            continue;
        };
        v1_entries += 1;
        let Ok(signature) = STANDARD.decode(encoded) else {
            continue;
        };
        // verify_slice compares in constant time.
        if mac.clone().verify_slice(&signature).is_ok() {
            return Ok(());
        }
    }
    if v1_entries == 0 {
        return Err(format!("webhook-signature {signatures:?} has no v1 entry"));
    }
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    Err(format!(
        "none of the {v1_entries} v1 signature(s) in {signatures:?} matches; for this id, \
         timestamp and body the secret gives v1,{expected}"
    ))
}

/// The HMAC key inside a `whsec_` secret (the prefix is optional, as in the reference
/// libraries).
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    let key = STANDARD
        .decode(encoded)
        .map_err(|e| format!("secret is not {SECRET_PREFIX}<base64>: {e}"))?;
    if key.is_empty() {
        return Err("secret decodes to an empty key".to_owned());
    }
    Ok(key)
}

/// The one value of header `name`; a missing or repeated header is an error.
fn single_header<'a>(received: &'a Received, name: &str) -> Result<&'a str, String> {
    match received.header_all(name).as_slice() {
        [value] => Ok(value),
        [] => Err(format!(
            "{} {} has no {name} header",
            received.method, received.path
        )),
        values => Err(format!(
            "{} {} has {} {name} headers: {values:?}",
            received.method,
            received.path,
            values.len()
        )),
    }
}

fn unix_now() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since_epoch.as_secs()).expect("Unix time fits in i64")
}
