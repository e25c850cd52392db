//! Counters that a transaction of settlements adds to, written once per
//! transaction instead of once per request.
//!
//! Under load the credit writer commits many settlements together (group
//! commit). Each of them adds to the same few rows: the user's balance, the
//! key's spend, the provider's balance and a daily roll-up. Those additions
//! are gathered here while the transaction runs and written just before its
//! commit, one statement per row touched, so a batch of 64 requests from one
//! account makes four such updates instead of 256. The per-request rows (the
//! usage record and the ledger entries) are still written one by one.
//!
//! Every read inside the transaction that a gathered amount belongs to adds
//! it (`balance`, `spent`): a job sees the same numbers it would have seen had
//! the jobs before it written theirs at once. A transaction that fails drops
//! what it gathered with its rollback.

use rusqlite::{params, Connection};

use super::credits::{add_to_balance, after_write, balance_of, db};
use crate::{day_of, rules, Millis, Result, UsageRecord};

const DAY_MS: Millis = 86_400_000;

#[derive(Default)]
pub(super) struct Pending {
    // Each list has a few entries per transaction (the accounts, keys and
    // models of its requests), so they are searched in place: finding an
    // entry allocates and hashes nothing.
    /// Account id → amount to add to its balance.
    balances: Vec<(String, i64)>,
    /// Key id → (amount to add to its spend, its new `last_used_at`).
    keys: Vec<(String, (i64, Millis))>,
    rollups: Vec<(RollupKey, RollupSums)>,
    /// Account id → its balance as stored, read once per transaction: the
    /// settlements of a batch from one account read it once, not once each.
    /// Only this connection writes while its transaction runs; what it
    /// writes to a balance outside `balances` goes through [`Pending::stored_wrote`].
    stored: Vec<(String, i64)>,
}

struct RollupKey {
    /// Days since 1970-01-01 (UTC).
    day: Millis,
    account_id: String,
    device_id: String,
    service: &'static str,
    model: String,
}

#[derive(Default)]
struct RollupSums {
    requests: i64,
    errors: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost: i64,
    reward: i64,
}

impl Pending {
    /// What this transaction has yet to add to the account's stored balance.
    pub(super) fn balance(&self, account_id: &str) -> i64 {
        find(&self.balances, account_id).map_or(0, |&(_, amount)| amount)
    }

    /// The account's balance as stored (without what this transaction has
    /// yet to add), read from `conn` the first time the transaction asks.
    pub(super) fn stored_balance(&mut self, conn: &Connection, account_id: &str) -> Result<i64> {
        if let Some(&(_, balance)) = find(&self.stored, account_id) {
            return Ok(balance);
        }
        let balance = balance_of(conn, account_id)?;
        self.stored.push((account_id.to_string(), balance));
        Ok(balance)
    }

    /// The transaction has just added `amount` to the account's stored
    /// balance directly (an adjustment): keep the copy read before true.
    pub(super) fn stored_wrote(&mut self, account_id: &str, amount: i64) {
        if let Some((_, balance)) = self.stored.iter_mut().find(|(id, _)| id == account_id) {
            *balance += amount;
        }
    }

    /// What this transaction has yet to add to the key's stored spend.
    pub(super) fn spent(&self, key_id: &str) -> i64 {
        find(&self.keys, key_id).map_or(0, |&(_, (spent, _))| spent)
    }

    fn add_to_balance(&mut self, account_id: &str, amount: i64) {
        match self.balances.iter_mut().find(|(id, _)| id == account_id) {
            Some((_, sum)) => *sum += amount,
            None => self.balances.push((account_id.to_string(), amount)),
        }
    }

    /// The settlement of `u`, which charged `charge` and rewarded `reward`.
    pub(super) fn settled(&mut self, u: &UsageRecord, charge: i64, reward: i64) {
        if charge != 0 {
            self.add_to_balance(&u.account_id, -charge);
        }
        if let (Some(provider), true) = (&u.provider_account_id, reward > 0) {
            self.add_to_balance(provider, reward);
        }
        match self.keys.iter_mut().find(|(id, _)| *id == u.key_id) {
            Some((_, (spent, last_used))) => {
                *spent += charge;
                *last_used = u.created_at;
            }
            None => self.keys.push((u.key_id.clone(), (charge, u.created_at))),
        }
        let day = u.created_at.div_euclid(DAY_MS);
        let device_id = u.device_id.as_deref().unwrap_or("");
        let found = self.rollups.iter().position(|(k, _)| {
            k.day == day
                && k.account_id == u.account_id
                && k.device_id == device_id
                && k.service == u.service.as_str()
                && k.model == u.model
        });
        let at = found.unwrap_or_else(|| {
            let key = RollupKey {
                day,
                account_id: u.account_id.clone(),
                device_id: device_id.to_string(),
                service: u.service.as_str(),
                model: u.model.clone(),
            };
            self.rollups.push((key, RollupSums::default()));
            self.rollups.len() - 1
        });
        let sums = &mut self.rollups[at].1;
        sums.requests += 1;
        sums.errors += rules::is_error(u.status);
        sums.input_tokens += u.input_tokens;
        sums.output_tokens += u.output_tokens;
        sums.cost += charge;
        sums.reward += reward;
    }

    /// Writes what was gathered, and forgets it. Runs inside the
    /// transaction, before its commit; an error fails the whole transaction.
    pub(super) fn flush(&mut self, conn: &Connection) -> Result<()> {
        self.stored.clear();
        for (account_id, amount) in self.balances.drain(..) {
            if amount != 0 {
                add_to_balance(conn, &account_id, amount).map_err(after_write)?;
            }
        }
        if !self.keys.is_empty() {
            let mut update = conn
                .prepare_cached("UPDATE api_keys SET spent = spent + ?2, last_used_at = ?3 WHERE id = ?1")
                .map_err(db)?;
            for (key_id, (spent, last_used)) in self.keys.drain(..) {
                update.execute(params![key_id, spent, last_used]).map_err(db)?;
            }
        }
        if !self.rollups.is_empty() {
            let mut upsert = conn
                .prepare_cached(
                    "INSERT INTO daily_rollups (day, account_id, device_id, service, model, requests, \
                     errors, input_tokens, output_tokens, cost, reward) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
                     ON CONFLICT (day, account_id, device_id, service, model) DO UPDATE SET \
                     requests = daily_rollups.requests + excluded.requests, \
                     errors = daily_rollups.errors + excluded.errors, \
                     input_tokens = daily_rollups.input_tokens + excluded.input_tokens, \
                     output_tokens = daily_rollups.output_tokens + excluded.output_tokens, \
                     cost = daily_rollups.cost + excluded.cost, \
                     reward = daily_rollups.reward + excluded.reward",
                )
                .map_err(db)?;
            for (k, s) in self.rollups.drain(..) {
                upsert
                    .execute(params![
                        day_of(k.day * DAY_MS),
                        k.account_id,
                        k.device_id,
                        k.service,
                        k.model,
                        s.requests,
                        s.errors,
                        s.input_tokens,
                        s.output_tokens,
                        s.cost,
                        s.reward
                    ])
                    .map_err(db)?;
            }
        }
        Ok(())
    }

    /// Forgets what was gathered (the transaction rolled back).
    pub(super) fn clear(&mut self) {
        self.stored.clear();
        self.balances.clear();
        self.keys.clear();
        self.rollups.clear();
    }
}

fn find<'a, V>(list: &'a [(String, V)], id: &str) -> Option<&'a (String, V)> {
    list.iter().find(|(entry, _)| entry == id)
}
