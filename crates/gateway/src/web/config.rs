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
    /// How often a gateway looks for a newer price table version in the
    /// store (one written by another replica's admin page).
    pub pricing_refresh_secs: u64,
    /// Referral shares and the payout job.
    pub referrals: ReferralConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReferralConfig {
    /// Shares of a referred account's provider rewards, level 1 first, in percent.
    pub reward_levels_percent: Vec<f64>,
    /// Shares of a referred account's usage spend, level 1 first, in percent.
    pub spend_levels_percent: Vec<f64>,
    /// Credits paid once to the direct referrer when the referred account
    /// first pays for usage (0: no bonus).
    pub first_usage_bonus: i64,
    /// How often the payout job runs; 0 turns it off (admins can still run it).
    pub payout_interval_secs: u64,
    /// How many finished days each run (re)visits; paid days are skipped.
    pub payout_days_back: u32,
}

impl Default for ReferralConfig {
    fn default() -> Self {
        ReferralConfig {
            reward_levels_percent: vec![10.0, 5.0, 2.5],
            spend_levels_percent: vec![15.0, 8.0, 4.0],
            first_usage_bonus: 0,
            payout_interval_secs: 3600,
            payout_days_back: 3,
        }
    }
}

impl ReferralConfig {
    /// The plan in basis points; `None` when a share is not a multiple of
    /// 0.01 % between 0 and 100.
    pub fn plan(&self) -> Option<cxmpute_store::ReferralPlan> {
        let bps = |v: &[f64]| -> Option<Vec<u32>> {
            v.iter()
                .map(|p| {
                    let b = (p * 100.0).round();
                    ((0.0..=10_000.0).contains(&b) && (p * 100.0 - b).abs() < 1e-6).then_some(b as u32)
                })
                .collect()
        };
        let plan = cxmpute_store::ReferralPlan {
            reward_bps: bps(&self.reward_levels_percent)?,
            spend_bps: bps(&self.spend_levels_percent)?,
            first_usage_bonus: self.first_usage_bonus,
        };
        plan.validate().ok().map(|_| plan)
    }
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
            pricing_refresh_secs: 30,
            referrals: ReferralConfig::default(),
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
        anyhow::ensure!(
            self.pricing_refresh_secs >= 1,
            "web.pricing_refresh_secs must be at least 1"
        );
        anyhow::ensure!(
            self.referrals.plan().is_some(),
            "web.referrals: shares are 0-100 percent in steps of 0.01, at most 10 levels; the bonus is not negative"
        );
        anyhow::ensure!(
            (1..=366).contains(&self.referrals.payout_days_back),
            "web.referrals.payout_days_back must be 1-366"
        );
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
            .field("pricing_refresh_secs", &self.pricing_refresh_secs)
            .field("referrals", &self.referrals)
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
            "[web.referrals]\nreward_levels_percent = [10.001]\n",
            "[web.referrals]\nspend_levels_percent = [101]\n",
            "[web.referrals]\nfirst_usage_bonus = -1\n",
        ] {
            let config: Config = toml::from_str(bad).unwrap();
            assert!(config.validate().is_err(), "{bad}");
        }
        assert!(toml::from_str::<Config>("[web.smtp]\nhost = \"h\"\nfrom = \"a@b.c\"\ntls = \"ssl\"\n").is_err());
    }
}
