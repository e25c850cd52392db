//! Row shapes shared by both backends and their conversion into the public
//! types.
//!
//! The row structs hold only types both drivers decode the same way (text,
//! `i64`, `bool`), so one `FromRow` derive serves SQLite and PostgreSQL; the
//! parsing of enums and lists lives here once instead of in every query.

use sqlx::FromRow;

use crate::{
    Account, ApiKey, DailyRollup, Device, KeyAuth, LedgerEntry, LedgerKind, ProvisionRecord, Result, Service,
    StoreError, UsageRecord,
};

#[derive(FromRow)]
pub(crate) struct AccountRow {
    id: String,
    name: String,
    email: Option<String>,
    balance: i64,
    suspended: bool,
    suspended_reason: Option<String>,
    created_at: i64,
}

impl From<AccountRow> for Account {
    fn from(r: AccountRow) -> Self {
        Account {
            id: r.id,
            name: r.name,
            email: r.email,
            balance: r.balance,
            suspended: r.suspended,
            suspended_reason: r.suspended_reason,
            created_at: r.created_at,
        }
    }
}

#[derive(FromRow)]
pub(crate) struct ApiKeyRow {
    id: String,
    account_id: String,
    name: String,
    prefix: String,
    secret_hash: String,
    credit_limit: Option<i64>,
    spent: i64,
    allowed_services: Option<String>,
    rpm_limit: Option<i64>,
    revoked_at: Option<i64>,
    last_used_at: Option<i64>,
    created_at: i64,
}

impl TryFrom<ApiKeyRow> for ApiKey {
    type Error = StoreError;

    fn try_from(r: ApiKeyRow) -> Result<Self> {
        let rpm_limit = r
            .rpm_limit
            .map(|n| u32::try_from(n).map_err(|_| StoreError::Corrupt(format!("rpm_limit {n}"))))
            .transpose()?;
        Ok(ApiKey {
            allowed_services: r.allowed_services.as_deref().map(parse_services).transpose()?,
            id: r.id,
            account_id: r.account_id,
            name: r.name,
            prefix: r.prefix,
            secret_hash: r.secret_hash,
            credit_limit: r.credit_limit,
            spent: r.spent,
            rpm_limit,
            revoked_at: r.revoked_at,
            last_used_at: r.last_used_at,
            created_at: r.created_at,
        })
    }
}

/// `api_keys.*` plus the owner's suspension flag, read by one JOIN.
#[derive(FromRow)]
pub(crate) struct KeyAuthRow {
    #[sqlx(flatten)]
    key: ApiKeyRow,
    account_suspended: bool,
}

impl TryFrom<KeyAuthRow> for KeyAuth {
    type Error = StoreError;

    fn try_from(r: KeyAuthRow) -> Result<Self> {
        Ok(KeyAuth {
            key: r.key.try_into()?,
            account_suspended: r.account_suspended,
        })
    }
}

#[derive(FromRow)]
pub(crate) struct DeviceRow {
    id: String,
    account_id: String,
    name: String,
    access_key_hash: String,
    created_at: i64,
    last_seen_at: Option<i64>,
}

impl From<DeviceRow> for Device {
    fn from(r: DeviceRow) -> Self {
        Device {
            id: r.id,
            account_id: r.account_id,
            name: r.name,
            access_key_hash: r.access_key_hash,
            created_at: r.created_at,
            last_seen_at: r.last_seen_at,
        }
    }
}

#[derive(FromRow)]
pub(crate) struct ProvisionRow {
    id: String,
    device_id: String,
    service: String,
    model: String,
    mode: String,
    endpoint: Option<String>,
    online: bool,
    updated_at: i64,
}

impl TryFrom<ProvisionRow> for ProvisionRecord {
    type Error = StoreError;

    fn try_from(r: ProvisionRow) -> Result<Self> {
        Ok(ProvisionRecord {
            service: parse_service(&r.service)?,
            id: r.id,
            device_id: r.device_id,
            model: r.model,
            mode: r.mode,
            endpoint: r.endpoint,
            online: r.online,
            updated_at: r.updated_at,
        })
    }
}

#[derive(FromRow)]
pub(crate) struct LedgerRow {
    id: i64,
    account_id: String,
    kind: String,
    amount: i64,
    request_id: Option<String>,
    note: Option<String>,
    created_at: i64,
}

impl TryFrom<LedgerRow> for LedgerEntry {
    type Error = StoreError;

    fn try_from(r: LedgerRow) -> Result<Self> {
        Ok(LedgerEntry {
            kind: parse_kind(&r.kind)?,
            id: r.id,
            account_id: r.account_id,
            amount: r.amount,
            request_id: r.request_id,
            note: r.note,
            created_at: r.created_at,
        })
    }
}

#[derive(FromRow)]
pub(crate) struct UsageRow {
    request_id: String,
    account_id: String,
    key_id: String,
    device_id: Option<String>,
    provider_account_id: Option<String>,
    provision_id: Option<String>,
    service: String,
    model: String,
    input_tokens: i64,
    output_tokens: i64,
    characters: i64,
    pages: i64,
    latency_ms: i64,
    ttfb_ms: i64,
    status: i32,
    cost: i64,
    reward: i64,
    created_at: i64,
}

impl TryFrom<UsageRow> for UsageRecord {
    type Error = StoreError;

    fn try_from(r: UsageRow) -> Result<Self> {
        Ok(UsageRecord {
            service: parse_service(&r.service)?,
            request_id: r.request_id,
            account_id: r.account_id,
            key_id: r.key_id,
            device_id: r.device_id,
            provider_account_id: r.provider_account_id,
            provision_id: r.provision_id,
            model: r.model,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            characters: r.characters,
            pages: r.pages,
            latency_ms: r.latency_ms,
            ttfb_ms: r.ttfb_ms,
            status: r.status,
            cost: r.cost,
            reward: r.reward,
            created_at: r.created_at,
        })
    }
}

#[derive(FromRow)]
pub(crate) struct RollupRow {
    day: String,
    account_id: String,
    device_id: String,
    service: String,
    model: String,
    requests: i64,
    errors: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost: i64,
    reward: i64,
}

impl TryFrom<RollupRow> for DailyRollup {
    type Error = StoreError;

    fn try_from(r: RollupRow) -> Result<Self> {
        Ok(DailyRollup {
            service: parse_service(&r.service)?,
            day: r.day,
            account_id: r.account_id,
            device_id: r.device_id,
            model: r.model,
            requests: r.requests,
            errors: r.errors,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cost: r.cost,
            reward: r.reward,
        })
    }
}

/// Converts every row, failing on the first one that does not parse.
pub(crate) fn convert_all<R, T>(rows: Vec<R>) -> Result<Vec<T>>
where
    T: TryFrom<R, Error = StoreError>,
{
    rows.into_iter().map(T::try_from).collect()
}

/// `(service, model)` pairs as read by `known_models`.
pub(crate) fn parse_models(rows: Vec<(String, String)>) -> Result<Vec<(Service, String)>> {
    rows.into_iter()
        .map(|(service, model)| Ok((parse_service(&service)?, model)))
        .collect()
}

/// Stored as a comma-separated list; `None` (every service) stays NULL, while
/// an empty list (no service) is stored as `''` so the two are not confused.
/// `update_api_key`, the same on both backends.
pub(crate) const UPDATE_API_KEY: &str = "UPDATE api_keys SET name = $2, credit_limit = $3, allowed_services = $4, \
     rpm_limit = $5 WHERE id = $1 AND revoked_at IS NULL";

pub(crate) fn services_to_text(services: Option<&[Service]>) -> Option<String> {
    services.map(|list| list.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(","))
}

fn parse_services(text: &str) -> Result<Vec<Service>> {
    text.split(',').filter(|s| !s.is_empty()).map(parse_service).collect()
}

fn parse_service(text: &str) -> Result<Service> {
    Service::parse(text).ok_or_else(|| StoreError::Corrupt(format!("unknown service {text:?}")))
}

fn parse_kind(text: &str) -> Result<LedgerKind> {
    match text {
        "deposit" => Ok(LedgerKind::Deposit),
        "charge" => Ok(LedgerKind::Charge),
        "reward" => Ok(LedgerKind::Reward),
        "adjust" => Ok(LedgerKind::Adjust),
        "referral" => Ok(LedgerKind::Referral),
        _ => Err(StoreError::Corrupt(format!("unknown ledger kind {text:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_lists_round_trip() {
        let all = services_to_text(Some(&[Service::Chat, Service::Speech]));
        assert_eq!(all.as_deref(), Some("chat,speech"));
        assert_eq!(
            parse_services("chat,speech").ok(),
            Some(vec![Service::Chat, Service::Speech])
        );
        assert_eq!(services_to_text(Some(&[])).as_deref(), Some(""));
        assert_eq!(parse_services("").ok(), Some(vec![]));
        assert!(parse_services("chat,nope").is_err());
    }
}

/// `accounts.*` plus the session's own times (renamed: both have `created_at`).
#[derive(FromRow)]
pub(crate) struct SessionRow {
    #[sqlx(flatten)]
    account: AccountRow,
    session_created_at: i64,
    session_expires_at: i64,
}

impl From<SessionRow> for crate::Session {
    fn from(r: SessionRow) -> Self {
        crate::Session {
            account: r.account.into(),
            created_at: r.session_created_at,
            expires_at: r.session_expires_at,
        }
    }
}
