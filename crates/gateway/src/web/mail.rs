//! Sending login codes: by SMTP when configured, else into the gateway log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::config::{SmtpConfig, SmtpTls};

/// A message the [`Mailer::Capture`] variant kept: (recipient, code).
pub type Captured = Arc<Mutex<Vec<(String, String)>>>;

#[derive(Clone)]
pub enum Mailer {
    /// No SMTP configured: the code goes to the log at `warn` level, so a
    /// quickstart user can log in by reading the gateway's output.
    Log,
    Smtp {
        // Boxed: the transport is large and the other variants tiny.
        transport: Box<AsyncSmtpTransport<Tokio1Executor>>,
        from: Mailbox,
    },
    /// Keeps messages in memory; for tests that drive the gateway in-process.
    Capture(Captured),
}

#[derive(Debug, thiserror::Error)]
#[error("could not send mail: {0}")]
pub struct MailError(String);

impl Mailer {
    pub fn from_config(smtp: Option<&SmtpConfig>) -> anyhow::Result<Mailer> {
        let Some(smtp) = smtp else { return Ok(Mailer::Log) };
        let builder = match smtp.tls {
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host),
            SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)?,
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host)?,
        };
        let mut builder = builder.port(smtp.port()).timeout(Some(Duration::from_secs(15)));
        if let (Some(user), Some(password)) = (&smtp.username, &smtp.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(Mailer::Smtp {
            transport: Box::new(builder.build()),
            from: smtp.from.parse()?,
        })
    }

    pub fn capture() -> (Mailer, Captured) {
        let sent = Captured::default();
        (Mailer::Capture(sent.clone()), sent)
    }

    /// Sends `code` to `to`.
    pub async fn send_code(&self, to: &Address, code: &str, ttl_minutes: u64) -> Result<(), MailError> {
        match self {
            Mailer::Log => {
                tracing::warn!(to = %to, code, "no SMTP configured: login code written to the log");
                Ok(())
            }
            Mailer::Capture(sent) => {
                sent.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((to.to_string(), code.to_string()));
                Ok(())
            }
            Mailer::Smtp { transport, from } => {
                let message = Message::builder()
                    .from(from.clone())
                    .to(Mailbox::new(None, to.clone()))
                    .subject(format!("Your cxmpute login code: {code}"))
                    .header(ContentType::TEXT_PLAIN)
                    .body(format!(
                        "Your cxmpute login code is\n\n    {code}\n\nIt expires in {ttl_minutes} minutes and works once.\n\
                         If you did not ask for it, ignore this message.\n"
                    ))
                    .map_err(|e| MailError(e.to_string()))?;
                transport.send(message).await.map_err(|e| MailError(e.to_string()))?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_tls_mode_builds_a_transport() {
        for tls in [SmtpTls::Starttls, SmtpTls::Tls, SmtpTls::None] {
            let config = SmtpConfig {
                host: "smtp.example".into(),
                port: None,
                from: "cx <login@example.com>".into(),
                tls,
                username: Some("u".into()),
                password: Some("p".into()),
            };
            assert!(matches!(Mailer::from_config(Some(&config)), Ok(Mailer::Smtp { .. })));
        }
        assert!(matches!(Mailer::from_config(None), Ok(Mailer::Log)));
    }

    #[tokio::test]
    async fn captured_codes_are_kept() {
        let (mailer, sent) = Mailer::capture();
        let to: Address = "a@example.com".parse().unwrap();
        mailer.send_code(&to, "123456", 10).await.unwrap();
        assert_eq!(
            *sent.lock().unwrap(),
            [("a@example.com".to_string(), "123456".to_string())]
        );
    }
}
