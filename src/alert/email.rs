//! The email sink: one mail per delivery, with plain-text and HTML parts carrying the
//! evidence; several events due together go out as one digest mail.

use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};
use secrecy::{ExposeSecret as _, SecretString};

use super::{DeliveryError, format};
use crate::event::Envelope;

/// What an email sink needs to send.
pub struct Email<'a> {
    /// `smtp://` or `smtps://` relay.
    pub smtp: &'a url::Url,
    /// Sender.
    pub from: &'a str,
    /// Recipients.
    pub to: &'a [String],
    /// Refuse plain text on `smtp://`.
    pub starttls_required: bool,
    /// SMTP AUTH.
    pub credentials: Option<&'a (String, SecretString)>,
    /// Subject prefix.
    pub subject_prefix: Option<&'a str>,
    /// Session timeout.
    pub timeout: Duration,
}

impl Email<'_> {
    fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, DeliveryError> {
        let host = self.smtp.host_str().unwrap_or_default().to_string();
        let mut builder = match self.smtp.scheme() {
            "smtps" => AsyncSmtpTransport::<Tokio1Executor>::relay(&host)
                .map_err(|e| DeliveryError::Permanent(format!("smtps relay {host}: {e}")))?,
            _ => {
                let params = TlsParameters::new(host.clone())
                    .map_err(|e| DeliveryError::Permanent(format!("TLS for {host}: {e}")))?;
                let tls = if self.starttls_required {
                    Tls::Required(params)
                } else {
                    Tls::Opportunistic(params)
                };
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host)
                    .port(25)
                    .tls(tls)
            }
        };
        if let Some(port) = self.smtp.port() {
            builder = builder.port(port);
        }
        if let Some((user, pass)) = self.credentials {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                pass.expose_secret().to_string(),
            ));
        }
        Ok(builder.timeout(Some(self.timeout)).build())
    }

    /// The message for `events`, without sending it.
    pub fn message(&self, events: &[Envelope]) -> Result<Message, DeliveryError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            DeliveryError::Permanent(format!("invalid address {what}: {e}"))
        };
        let from: Mailbox = self.from.parse().map_err(|e| bad(self.from, &e))?;
        let mut builder = Message::builder()
            .from(from)
            .subject(format::mail_subject(events, self.subject_prefix));
        for to in self.to {
            let mailbox: Mailbox = to.parse().map_err(|e| bad(to, &e))?;
            builder = builder.to(mailbox);
        }
        builder
            .multipart(MultiPart::alternative_plain_html(
                format::mail_text(events),
                format::mail_html(events),
            ))
            .map_err(|e| DeliveryError::Permanent(format!("cannot build the mail: {e}")))
    }

    /// Sends one mail carrying `events`.
    pub async fn send(&self, events: &[Envelope]) -> Result<(), DeliveryError> {
        let message = self.message(events)?;
        let transport = self.transport()?;
        match transport.send(message).await {
            Ok(_) => Ok(()),
            // A 5xx from the relay will not change by retrying (unknown mailbox, refused
            // sender); everything else might.
            Err(e) if e.is_permanent() => {
                Err(DeliveryError::Permanent(crate::cycle::error_chain(&e)))
            }
            Err(e) => Err(DeliveryError::Retry {
                reason: crate::cycle::error_chain(&e),
                retry_after: None,
            }),
        }
    }
}
