//! The `[web]` section: login codes, sessions, administrators, mail.

use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Where browsers reach the gateway, e.g. `https://cxmpute.example`.
    /// Session cookies get `Secure` when it is `https://`.
    pub public_url: Option<String>,
    /// Accounts with these email addresses (any case) are administrators.
    pub admin_emails: Vec<String>,
    /// How long a login code stays valid.
    pub code_ttl_secs: u64,
    /// Wrong or right, checks of one code beyond this many fail.
    pub code_attempts: u32,
    /// Codes one address may request per hour.
    pub codes_per_address_per_hour: u32,
    /// Login requests (codes asked for and codes tried) per client IP per hour.
    pub logins_per_ip_per_hour: u32,
    /// How long a session lasts after login.
    pub session_ttl_hours: u64,
    /// Read the client IP from `X-Forwarded-For` (only behind a proxy that sets it).
    pub trust_forwarded_for: bool,
    /// Outgoing mail. Without it codes are written to the gateway log
    /// (fine for a laptop, not for real users).
    pub smtp: Option<SmtpConfig>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    /// Default: 587 for `starttls`, 465 for `tls`, 25 for `none`.
    #[serde(default)]
    pub port: Option<u16>,
    /// The sender, e.g. `cxmpute <login@cxmpute.example>`.
    pub from: String,
    #[serde(default)]
    pub tls: SmtpTls,
    #[serde(default)]
    pub username: Option<String>,
    /// Also `CXMPUTE_SMTP_PASSWORD`.
    #[serde(default)]
    pub password: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP upgraded with STARTTLS (required, not opportunistic).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
    /// No encryption: only for a relay on the same machine or a test server.
    None,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            public_url: None,
            admin_emails: Vec::new(),
            code_ttl_secs: 600,
            code_attempts: 5,
            codes_per_address_per_hour: 5,
            logins_per_ip_per_hour: 60,
            session_ttl_hours: 24 * 7,
            trust_forwarded_for: false,
            smtp: None,
        }
    }
}

impl WebConfig {
    pub fn secure_cookies(&self) -> bool {
        self.public_url.as_deref().is_some_and(|u| u.starts_with("https://"))
    }

    pub fn is_admin(&self, email: Option<&str>) -> bool {
        email.is_some_and(|e| self.admin_emails.iter().any(|a| a.eq_ignore_ascii_case(e)))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.code_ttl_secs >= 1, "web.code_ttl_secs must be at least 1");
        anyhow::ensure!(self.code_attempts >= 1, "web.code_attempts must be at least 1");
        anyhow::ensure!(
            self.codes_per_address_per_hour >= 1 && self.logins_per_ip_per_hour >= 1,
            "web rate limits must be at least 1"
        );
        anyhow::ensure!(self.session_ttl_hours >= 1, "web.session_ttl_hours must be at least 1");
        if let Some(url) = &self.public_url {
            anyhow::ensure!(
                url.starts_with("http://") || url.starts_with("https://"),
                "web.public_url must start with http:// or https://"
            );
        }
        if let Some(smtp) = &self.smtp {
            anyhow::ensure!(!smtp.host.is_empty(), "web.smtp.host must not be empty");
            smtp.from
                .parse::<lettre::message::Mailbox>()
                .map_err(|e| anyhow::anyhow!("web.smtp.from is not a mail address: {e}"))?;
            anyhow::ensure!(
                smtp.username.is_some() == smtp.password.is_some(),
                "web.smtp.username and password go together"
            );
        }
        Ok(())
    }
}

impl SmtpConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        })
    }
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("public_url", &self.public_url)
            .field("admin_emails", &self.admin_emails.len())
            .field("code_ttl_secs", &self.code_ttl_secs)
            .field("code_attempts", &self.code_attempts)
            .field("codes_per_address_per_hour", &self.codes_per_address_per_hour)
            .field("logins_per_ip_per_hour", &self.logins_per_ip_per_hour)
            .field("session_ttl_hours", &self.session_ttl_hours)
            .field("trust_forwarded_for", &self.trust_forwarded_for)
            .field("smtp", &self.smtp)
            .finish()
    }
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port())
            .field("from", &self.from)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    const FILE: &str = "[web]\nadmin_emails = [\"Ops@Example.com\"]\n\
        [web.smtp]\nhost = \"smtp.example\"\nfrom = \"cx <login@example.com>\"\nusername = \"u\"\npassword = \"hunter2\"\n";

    #[test]
    fn smtp_section_parses_with_defaults_and_hides_the_password() {
        let config: Config = toml::from_str(FILE).unwrap();
        config.validate().unwrap();
        let smtp = config.web.smtp.as_ref().unwrap();
        assert_eq!(smtp.tls, SmtpTls::Starttls);
        assert_eq!(smtp.port(), 587);
        assert!(config.web.is_admin(Some("ops@example.COM")));
        assert!(!config.web.is_admin(Some("other@example.com")));
        assert!(!config.web.is_admin(None));
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("Ops@"), "{shown}");
    }

    #[test]
    fn environment_sets_public_url_admins_and_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(&path, FILE).unwrap();
        let c = Config::load(Some(&path), |k| match k {
            "CXMPUTE_PUBLIC_URL" => Some("https://cx.example".into()),
            "CXMPUTE_ADMIN_EMAILS" => Some("a@x.io, b@x.io,".into()),
            "CXMPUTE_SMTP_PASSWORD" => Some("from-env".into()),
            _ => None,
        })
        .unwrap();
        assert!(c.web.secure_cookies());
        assert_eq!(c.web.admin_emails, ["a@x.io", "b@x.io"]);
        assert_eq!(c.web.smtp.unwrap().password.as_deref(), Some("from-env"));
    }

    #[test]
    fn bad_web_settings_are_refused() {
        for bad in [
            "[web.smtp]\nhost = \"h\"\nfrom = \"not an address\"\n",
            "[web.smtp]\nhost = \"h\"\nfrom = \"a@b.c\"\nusername = \"u\"\n",
            "[web.smtp]\nhost = \"\"\nfrom = \"a@b.c\"\n",
            "[web]\npublic_url = \"ftp://x\"\n",
            "[web]\ncode_attempts = 0\n",
        ] {
            let config: Config = toml::from_str(bad).unwrap();
            assert!(config.validate().is_err(), "{bad}");
        }
        assert!(toml::from_str::<Config>("[web.smtp]\nhost = \"h\"\nfrom = \"a@b.c\"\ntls = \"ssl\"\n").is_err());
    }
}
