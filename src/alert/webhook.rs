//! The webhook sink: one POST per event (or one batch), CloudEvents, Slack or Teams bodies,
//! custom headers, and Standard Webhooks signatures computed afresh for every attempt.

use std::time::Duration;

use base64::Engine as _;
use hmac::{KeyInit as _, Mac as _};
use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use secrecy::{ExposeSecret as _, SecretString};

use super::{DeliveryError, format};
use crate::config::WebhookFormat;
use crate::event::Envelope;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// What a webhook sink needs to post.
pub struct Webhook<'a> {
    /// The receiver.
    pub url: &'a url::Url,
    /// The `whsec_…` secret, when deliveries are signed.
    pub secret: Option<&'a SecretString>,
    /// Body format.
    pub format: WebhookFormat,
    /// Extra headers.
    pub headers: &'a [(String, SecretString)],
    /// Request timeout.
    pub timeout: Duration,
}

/// The Standard Webhooks signature of `body`: `v1,` and base64 HMAC-SHA256 of
/// `id.timestamp.body`, keyed with the base64 part of the secret after `whsec_`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "the webhook secret is not base64 after whsec_".to_string())?;
    let mut mac = HmacSha256::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let sig = mac.finalize().into_bytes();
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(sig)
    ))
}

impl Webhook<'_> {
    /// Posts `events`: one event as itself, several as one batch (a CloudEvents batch, or one
    /// Slack or Teams message listing them).
    pub async fn post(
        &self,
        http: &reqwest::Client,
        events: &[Envelope],
    ) -> Result<(), DeliveryError> {
        let (body, content_type) = match (self.format, events) {
            (WebhookFormat::CloudEvents, [one]) => {
                (serde_json::to_vec(one), "application/cloudevents+json")
            }
            (WebhookFormat::CloudEvents, many) => (
                serde_json::to_vec(many),
                "application/cloudevents-batch+json",
            ),
            (WebhookFormat::Slack, evs) => {
                (serde_json::to_vec(&format::slack(evs)), "application/json")
            }
            (WebhookFormat::Teams, evs) => {
                (serde_json::to_vec(&format::teams(evs)), "application/json")
            }
        };
        let body = body.map_err(|e| DeliveryError::Permanent(format!("cannot encode: {e}")))?;
        // A single event keeps its own id, so receivers can de-duplicate retries; a batch is a
        // message of its own.
        let id = match events {
            [one] => one.id.clone(),
            _ => uuid::Uuid::now_v7().to_string(),
        };
        let timestamp = chrono::Utc::now().timestamp();

        let mut req = http
            .post(self.url.clone())
            .timeout(self.timeout)
            .header(CONTENT_TYPE, content_type)
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(secret) = self.secret {
            let signature = sign(secret.expose_secret(), &id, timestamp, &body)
                .map_err(DeliveryError::Permanent)?;
            req = req.header("webhook-signature", signature);
        }
        for (name, value) in self.headers {
            let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value.expose_secret()),
            ) else {
                continue;
            };
            req = req.header(n, v);
        }
        let resp = req
            .body(body)
            .send()
            .await
            .map_err(|e| DeliveryError::Retry {
                reason: crate::cycle::error_chain(&e),
                retry_after: None,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let reason = format!("the receiver answered {}", status.as_u16());
        if status == reqwest::StatusCode::GONE {
            return Err(DeliveryError::Permanent(reason));
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::registry::parse_retry_after);
        Err(DeliveryError::Retry {
            reason,
            retry_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The example secret, id, timestamp and body published with the Standard Webhooks
        // specification, and the signature it gives for them.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        use crate::registry::parse_retry_after;
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
