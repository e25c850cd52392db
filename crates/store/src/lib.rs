//! Persistence for the cxmpute gateway.
//!
//! # Layout
//! - [`Store`]: the one trait the gateway talks to. Every method is a complete
//!   unit of work (one transaction where it writes more than one row), so callers
//!   never juggle transactions and both backends stay interchangeable.
//! - `sqlite` / `postgres`: the two backends, each owning its migrations under
//!   `migrations/<backend>/`. [`connect`] picks one by URL scheme.
//! - `conformance`: the behaviour every backend must show; run by the tests of both.
//!
//! # Money
//! Credits are integers (`i64`): one credit is one billionth of a US dollar
//! (a "nano-dollar"), which is fine-grained enough to price a single embedding
//! token without rounding and still holds ±9.2 billion dollars.
//!
//! # The ledger, holds and settlement
//! `accounts.balance` is the spendable balance. A request first *holds* its
//! worst-case cost ([`Store::hold`]): the balance drops by the hold amount in
//! the same statement that checks it is sufficient, so concurrent requests can
//! never spend the same credit twice. When the answer is complete the request is
//! *settled* ([`Store::settle`]): in one transaction the hold row is deleted,
//! the unused part of the hold goes back to the balance, a `charge` ledger entry,
//! a `reward` ledger entry for the provider's account (and its balance), a usage
//! record and the daily roll-ups are written. Settlement is keyed by the request
//! id, so it happens at most once; a hold left by a crash is returned by
//! [`Store::release_expired_holds`].
//!
//! That is the PostgreSQL backend, whose replicas share their holds. SQLite,
//! whose file one gateway serves ([`Store::claim_for_serving`]), keeps holds
//! in that gateway's memory instead and subtracts them from every balance it
//! shows, so callers see the same contract (see `sqlite/holds.rs`).
//!
//! Invariant checked by the conformance suite:
//! `balance == sum(ledger.amount) - sum(holds.amount)` for every account.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

mod devices;
mod error;
mod rows;
mod rules;
mod web;
pub use devices::{
    DecideOutcome, DeviceCodeInfo, DeviceDecision, NewDeviceCode, NewDeviceKey, PollOutcome, StoredAssignment,
    SLOW_DOWN_STEP_SECS,
};
pub use error::StoreError;
pub use web::{CodeCheck, Session};

#[doc(hidden)]
pub mod admin;
#[doc(hidden)]
pub mod referrals;
pub use admin::{Banner, BannerLevel, NetworkUsage, NewBanner, PricingVersion, ProviderDay, UsageDay};
pub use referrals::{PayoutKind, PayoutRun, ReferralPlan, Referred};

pub mod ids;

mod postgres;
mod sqlite;

#[doc(hidden)]
pub mod conformance;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Milliseconds since the Unix epoch. All timestamps in the store use this.
pub type Millis = i64;

/// Opens the store named by `url` and runs pending migrations.
///
/// `sqlite://path/to/file.db` (created when missing), `sqlite::memory:`, or
/// `postgres://…` / `postgresql://…`.
pub async fn connect(url: &str) -> Result<std::sync::Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(PgStore::connect(url).await?))
    } else {
        Err(StoreError::InvalidUrl(redact_url(url)))
    }
}

/// Removes a password from a database URL so it can be logged.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme_end], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// The services the platform offers. Stored and sent as their lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    Chat,
    Embeddings,
    Speech,
    Scrape,
}

impl Service {
    pub const ALL: [Service; 4] = [Service::Chat, Service::Embeddings, Service::Speech, Service::Scrape];

    pub fn as_str(self) -> &'static str {
        match self {
            Service::Chat => "chat",
            Service::Embeddings => "embeddings",
            Service::Speech => "speech",
            Service::Scrape => "scrape",
        }
    }

    pub fn parse(s: &str) -> Option<Service> {
        match s {
            "chat" => Some(Service::Chat),
            "embeddings" => Some(Service::Embeddings),
            "speech" | "tts" => Some(Service::Speech),
            "scrape" => Some(Service::Scrape),
            _ => None,
        }
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    pub id: String,
    pub name: String,
    pub email: Option<String>,
    pub balance: i64,
    pub suspended: bool,
    pub suspended_reason: Option<String>,
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    /// Public id (the part of the key between `sk-cx-` and the secret).
    pub id: String,
    pub account_id: String,
    pub name: String,
    /// What the owner sees in listings, e.g. `sk-cx-ab12cd34…`.
    pub prefix: String,
    /// Hex SHA-256 of the secret part. Secrets are 32 random bytes, so a fast
    /// hash is enough: nothing to brute-force.
    #[serde(skip)]
    pub secret_hash: String,
    /// Most the key may ever spend (charges plus outstanding holds), or none.
    pub credit_limit: Option<i64>,
    /// Charged so far through this key.
    pub spent: i64,
    /// `None`: every service.
    pub allowed_services: Option<Vec<Service>>,
    pub rpm_limit: Option<u32>,
    pub revoked_at: Option<Millis>,
    pub last_used_at: Option<Millis>,
    pub created_at: Millis,
}

#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub prefix: String,
    pub secret_hash: String,
    pub credit_limit: Option<i64>,
    pub allowed_services: Option<Vec<Service>>,
    pub rpm_limit: Option<u32>,
}

/// A key's owner-editable settings (see [`Store::update_api_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySettings {
    pub name: String,
    pub credit_limit: Option<i64>,
    pub allowed_services: Option<Vec<Service>>,
    pub rpm_limit: Option<u32>,
}

/// What the gateway needs on every request, read in one query: the key and
/// the owning account's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAuth {
    pub key: ApiKey,
    pub account_suspended: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    pub id: String,
    pub account_id: String,
    pub name: String,
    #[serde(skip)]
    pub access_key_hash: String,
    pub created_at: Millis,
    pub last_seen_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProvisionRecord {
    pub id: String,
    pub device_id: String,
    pub service: Service,
    pub model: String,
    /// `link` or `direct`.
    pub mode: String,
    pub endpoint: Option<String>,
    pub online: bool,
    pub updated_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerKind {
    Deposit,
    Charge,
    Reward,
    Adjust,
    /// A referral payout (see the `referrals` module).
    Referral,
}

impl LedgerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Deposit => "deposit",
            LedgerKind::Charge => "charge",
            LedgerKind::Reward => "reward",
            LedgerKind::Adjust => "adjust",
            LedgerKind::Referral => "referral",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    pub id: i64,
    pub account_id: String,
    pub kind: LedgerKind,
    /// Signed: charges are negative.
    pub amount: i64,
    pub request_id: Option<String>,
    pub note: Option<String>,
    pub created_at: Millis,
}

/// Reserve `amount` credits on `account_id` (and on the key's limit) for one request.
#[derive(Debug, Clone)]
pub struct HoldRequest {
    pub request_id: String,
    pub account_id: String,
    pub key_id: String,
    pub amount: i64,
    pub expires_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOutcome {
    Held,
    /// The account balance does not cover the amount.
    InsufficientBalance,
    /// The key's credit limit does not cover the amount.
    KeyLimitReached,
    /// The account is suspended or the key revoked since the caller looked.
    Refused,
}

/// Everything recorded when a request ends, successful or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub request_id: String,
    pub account_id: String,
    pub key_id: String,
    /// The device (and its owner) that answered; none when no provider was reached.
    pub device_id: Option<String>,
    pub provider_account_id: Option<String>,
    pub provision_id: Option<String>,
    pub service: Service,
    pub model: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub characters: i64,
    pub pages: i64,
    pub latency_ms: i64,
    pub ttfb_ms: i64,
    /// HTTP status sent to the client (499 when the client went away).
    pub status: i32,
    /// Charged to the user (≥ 0, ≤ the hold).
    pub cost: i64,
    /// Credited to the provider's account.
    pub reward: i64,
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DailyRollup {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    pub account_id: String,
    pub device_id: String,
    pub service: Service,
    pub model: String,
    pub requests: i64,
    pub errors: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost: i64,
    pub reward: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleOutcome {
    Settled,
    /// A usage record for this request id exists already: nothing was written.
    AlreadySettled,
}

/// The storage operations of the gateway. Implemented by [`SqliteStore`] and
/// [`PgStore`]; both pass [`conformance`].
#[async_trait]
pub trait Store: AdminStore + ReferralStore + Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    // Accounts
    async fn create_account(&self, name: &str, email: Option<&str>) -> Result<Account>;
    async fn account(&self, id: &str) -> Result<Option<Account>>;
    async fn list_accounts(&self) -> Result<Vec<Account>>;
    async fn set_suspended(&self, id: &str, reason: Option<&str>) -> Result<()>;
    /// Adds `amount` (> 0) to the balance with a `deposit` ledger entry; returns the new balance.
    async fn deposit(&self, account_id: &str, amount: i64, note: Option<&str>) -> Result<i64>;
    async fn ledger(&self, account_id: &str, limit: i64) -> Result<Vec<LedgerEntry>>;

    // API keys
    async fn create_api_key(&self, key: NewApiKey) -> Result<ApiKey>;
    async fn api_keys(&self, account_id: &str) -> Result<Vec<ApiKey>>;
    async fn key_auth(&self, key_id: &str) -> Result<Option<KeyAuth>>;
    /// Returns false when no such key exists.
    async fn revoke_api_key(&self, key_id: &str) -> Result<bool>;
    /// Replaces a live key's name and limits (its secret, spend and history
    /// stay); false when there is no such key or it was revoked.
    async fn update_api_key(&self, key_id: &str, settings: &KeySettings) -> Result<bool>;

    // Provider devices and provisions
    async fn create_device(&self, account_id: &str, name: &str, id: &str, access_key_hash: &str) -> Result<Device>;
    async fn device(&self, id: &str) -> Result<Option<Device>>;
    async fn devices(&self, account_id: &str) -> Result<Vec<Device>>;
    async fn touch_device(&self, id: &str, at: Millis) -> Result<()>;
    /// Makes the device's credential useless for good (its access-key hash
    /// is cleared; the device and its history stay). True if it had one.
    async fn revoke_device(&self, id: &str) -> Result<bool>;
    /// Inserts or updates (device, service, model), returning the provision
    /// id; `link_id` names the link (or registration) that announced it.
    async fn upsert_provision(
        &self,
        device_id: &str,
        service: Service,
        model: &str,
        mode: &str,
        endpoint: Option<&str>,
        link_id: Option<&str>,
    ) -> Result<String>;
    /// Marks the device's provisions offline: all of them (`None`), or only
    /// those `link_id` announced last (a link closing while the device may
    /// already be linked again, here or on another gateway replica).
    async fn set_device_offline(&self, device_id: &str, link_id: Option<&str>) -> Result<()>;
    async fn provisions(&self) -> Result<Vec<ProvisionRecord>>;
    /// Every model any provision ever offered, per service (for 404 vs 503).
    async fn known_models(&self) -> Result<Vec<(Service, String)>>;

    // Credits
    async fn hold(&self, hold: HoldRequest) -> Result<HoldOutcome>;
    /// Returns an unsettled hold in full (request failed before any cost).
    async fn release(&self, request_id: &str) -> Result<()>;
    /// Settles a request: see the crate docs. `usage.cost` must not exceed the
    /// hold; a settle without a hold (it expired) charges the balance directly.
    async fn settle(&self, usage: UsageRecord) -> Result<SettleOutcome>;
    /// Releases holds whose `expires_at` is before `now`; returns how many.
    async fn release_expired_holds(&self, now: Millis) -> Result<u64>;
    /// Releases every hold (single-gateway start-up after a crash); returns how many.
    async fn release_all_holds(&self) -> Result<u64>;

    // Metering
    async fn usage(&self, request_id: &str) -> Result<Option<UsageRecord>>;
    async fn usage_for_account(&self, account_id: &str, limit: i64) -> Result<Vec<UsageRecord>>;
    async fn rollups(&self, day: &str) -> Result<Vec<DailyRollup>>;
    /// Sum of ledger amounts per kind for one account (for audits and tests).
    async fn ledger_sum(&self, account_id: &str, kind: LedgerKind) -> Result<i64>;
    async fn held_amount(&self, account_id: &str) -> Result<i64>;

    async fn ping(&self) -> Result<()>;

    /// Claims the database for the one gateway that serves requests from it,
    /// where a backend allows only one (SQLite keeps holds in that gateway's
    /// memory). Fails with [`StoreError::InUse`] while another process holds
    /// the claim; released when the store is dropped or the process ends.
    async fn claim_for_serving(&self) -> Result<()> {
        Ok(())
    }

    // Web login (see the `web` module). Emails compare case-insensitively.
    async fn account_by_email(&self, email: &str) -> Result<Option<Account>>;
    /// Stores the hash of a new code for `email`, replacing any earlier one
    /// (and its attempt count).
    async fn put_login_code(&self, email: &str, code_hash: &str, now: Millis, expires_at: Millis) -> Result<()>;
    /// Counts one attempt on `email`'s code and judges `code_hash` against it;
    /// a valid code is consumed. After `max_attempts` attempts every check,
    /// the right code included, is [`CodeCheck::Locked`].
    async fn check_login_code(&self, email: &str, code_hash: &str, now: Millis, max_attempts: u32)
        -> Result<CodeCheck>;
    async fn create_session(&self, token_hash: &str, account_id: &str, now: Millis, expires_at: Millis) -> Result<()>;
    /// The session with this token hash, unless it expired by `now`.
    async fn session(&self, token_hash: &str, now: Millis) -> Result<Option<Session>>;
    /// Returns false when there was no such session.
    async fn delete_session(&self, token_hash: &str) -> Result<bool>;
    /// Ends every session of an account; returns how many.
    async fn delete_sessions_of(&self, account_id: &str) -> Result<u64>;
    /// Deletes expired codes and sessions; returns how many rows went.
    async fn purge_expired_logins(&self, now: Millis) -> Result<u64>;

    // Device login and assignments (see the `devices` module).
    /// Stores a new code pair; a user code hash already in use is a
    /// [`StoreError::Conflict`] (the caller draws another).
    async fn create_device_code(&self, code: NewDeviceCode) -> Result<()>;
    /// The code with this user code hash, expired or not.
    async fn device_code(&self, user_code_hash: &str) -> Result<Option<DeviceCodeInfo>>;
    /// Approves or denies a pending, unexpired code.
    async fn decide_device_code(
        &self,
        user_code_hash: &str,
        decision: DeviceDecision<'_>,
        now: Millis,
    ) -> Result<DecideOutcome>;
    /// A node's poll: see [`PollOutcome`]. On approval creates the device
    /// with `key` and consumes the code, in one transaction.
    async fn poll_device_code(&self, device_code_hash: &str, now: Millis, key: NewDeviceKey) -> Result<PollOutcome>;
    /// Deletes expired device codes; returns how many.
    async fn purge_expired_device_codes(&self, now: Millis) -> Result<u64>;
    /// Replaces a device's assignment and hardware report.
    async fn put_assignment(
        &self,
        device_id: &str,
        models: &[(Service, String)],
        hardware: &str,
        now: Millis,
    ) -> Result<()>;
    /// The device's assignment, if it ever asked for one.
    async fn assignment(&self, device_id: &str) -> Result<Option<StoredAssignment>>;
}

/// The operator tools and dashboards (see the `admin` module); part of every [`Store`].
#[async_trait]
pub trait AdminStore: Send + Sync {
    /// Accounts whose id is `query` or whose email or name contains it (any case).
    async fn search_accounts(&self, query: &str, limit: i64) -> Result<Vec<Account>>;
    /// Adds a signed, non-zero `amount` with an `adjust` ledger entry carrying
    /// `note`; refused (nothing written) when the balance would go negative.
    /// Returns the new balance.
    async fn adjust_balance(&self, account_id: &str, amount: i64, note: &str) -> Result<i64>;
    /// Ledger entries with an id below `before_id` (all when none), newest first.
    async fn ledger_page(&self, account_id: &str, before_id: Option<i64>, limit: i64) -> Result<Vec<LedgerEntry>>;
    /// Stores the next version of the price table (JSON text).
    async fn add_pricing_version(&self, pricing: &str, created_by: &str) -> Result<PricingVersion>;
    async fn latest_pricing_version(&self) -> Result<Option<PricingVersion>>;
    /// Newest first.
    async fn pricing_versions(&self, limit: i64) -> Result<Vec<PricingVersion>>;
    async fn create_banner(&self, banner: NewBanner) -> Result<Banner>;
    /// Banners that have not ended at `now` (current and scheduled), by start.
    async fn banners_from(&self, now: Millis) -> Result<Vec<Banner>>;
    /// Returns false when there was no such banner.
    async fn delete_banner(&self, id: &str) -> Result<bool>;
    /// The account's usage per day, service and model from `since_day` on.
    async fn usage_days(&self, account_id: &str, since_day: &str) -> Result<Vec<UsageDay>>;
    /// Requests served and rewards earned per day by the account's devices.
    async fn provider_days(&self, account_id: &str, since_day: &str) -> Result<Vec<ProviderDay>>;
    /// (requests served, rewards earned) by the account's devices, all time.
    async fn provider_totals(&self, account_id: &str) -> Result<(i64, i64)>;
    /// Network-wide usage since `since`.
    async fn network_usage(&self, since: Millis) -> Result<NetworkUsage>;
}

/// Referral codes, referrers and payouts (see the `referrals` module); part of every [`Store`].
#[async_trait]
pub trait ReferralStore: Send + Sync {
    /// The account's code, made on first use.
    async fn referral_code(&self, account_id: &str) -> Result<String>;
    async fn account_of_referral_code(&self, code: &str) -> Result<Option<String>>;
    async fn referrer_of(&self, account_id: &str) -> Result<Option<String>>;
    /// Records who referred `account_id`: once (`Conflict` after), never
    /// itself or an account it referred, directly or not (`InvalidInput`).
    async fn set_referrer(&self, account_id: &str, referrer_id: &str) -> Result<()>;
    /// Accounts `referrer_id` referred directly.
    async fn referred_by(&self, referrer_id: &str) -> Result<Vec<Referred>>;
    /// Pays one UTC day's referral shares; idempotent (see the `referrals` module).
    async fn pay_referrals(&self, day: &str, plan: &ReferralPlan) -> Result<PayoutRun>;
}

/// `YYYY-MM-DD` (UTC) of a millisecond timestamp, without a date library.
pub fn day_of(ms: Millis) -> String {
    let days = ms.div_euclid(86_400_000);
    // Civil-from-days, after Howard Hinnant's public-domain algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}")
}

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_civil_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(951_782_400_000), "2000-02-29");
        assert_eq!(day_of(1_795_910_399_999), "2026-11-28");
        assert_eq!(day_of(-1), "1969-12-31");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}
