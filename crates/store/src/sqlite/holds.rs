//! Holds on SQLite live in the gateway's memory, not in the database.
//!
//! A SQLite file is served by one gateway (see `SqliteStore::lock_for_serving`),
//! and every hold is returned when that gateway starts, so a hold row would
//! only ever be read back by the process that wrote it. Keeping holds here
//! takes two write transactions' worth of statements off every request: a
//! hold is one read of the account and key, plus a map entry; a settlement
//! no longer deletes a row nor gives an amount back to the balance.
//!
//! The database balance therefore still contains what is held;
//! [`Holds::held_by_account`] is subtracted wherever the store shows a
//! balance, so the [`crate::Store`] contract is unchanged: a balance read
//! never includes credits that a running request may still spend.
//!
//! A settlement's clamp and an operator's adjustment decide on the credit
//! writer's connection while it is locked, inside the writer's transaction.
//! A job changes the map as it runs, recording each change in an undo log;
//! if its transaction does not commit, the log is played back, so the map
//! never reflects a write that was rolled back.
//!
//! A hold is decided beside the writer, on a connection of its own that sees
//! only committed rows (decision 58). For that, the map also counts what the
//! writer's open transaction has taken from each account and key but not yet
//! committed ([`Holds::owe`]): a hold whose request has been settled in the
//! open transaction has left the map, and its charge must still count until
//! the commit makes it part of the balance. After the commit (or rollback)
//! the writer clears that count and bumps [`Holds::generation`]; a decision
//! whose read began before that moment sees the generation change and is
//! made again.
//!
//! The standing a hold beside the writer read is kept here too, by key, until
//! the writer's transaction ends ([`Holds::known_standing`], decision 69): the
//! next holds of that key are decided on it without a read. That is what a
//! reader's kept snapshot would have shown them (decision 68), since nothing
//! the writer commits can come between; it ages by the same
//! measure as the snapshot it was read in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::{HoldOutcome, HoldRequest, Millis, Result, StoreError, UsageRecord};

/// One request's hold.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub account_id: String,
    pub key_id: String,
    pub amount: i64,
    pub expires_at: Millis,
    /// Its settlement is in the journal, waiting for the credit writer
    /// (`journal.rs`); the amount is then the charge, no longer the hold.
    pub settling: bool,
}

/// What [`Holds::begin_settling`] found.
pub(super) enum Settling {
    /// No hold: the settlement takes the synchronous path.
    Absent,
    /// The request's settlement is already in the journal.
    Already,
    /// Marked; the amount held before, should the journal refuse the record.
    Started(i64),
}

/// A change to [`Holds`] that a rollback must undo.
pub(super) enum Undo {
    Placed(String),
    Taken(String, Held),
}

/// What an account and its key look like in the database when a hold is
/// decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Standing {
    pub suspended: bool,
    pub revoked: bool,
    /// The database balance, which still contains the held amounts.
    pub balance: i64,
    pub credit_limit: Option<i64>,
    pub spent: i64,
}

#[derive(Default)]
pub(super) struct Holds {
    by_request: HashMap<String, Held>,
    by_account: HashMap<String, i64>,
    by_key: HashMap<String, i64>,
    /// Charges and debits of the writer's open transaction, by account and by
    /// key: in the writer's view of the balance, not yet in the committed one.
    owed_by_account: HashMap<String, i64>,
    owed_by_key: HashMap<String, i64>,
    /// Bumped each time the writer's transaction ends.
    generation: u64,
    /// Committed standings read beside the writer in this generation, by key
    /// id: the account they were read for, and when the snapshot they were
    /// read in began.
    standings: HashMap<String, (String, Standing, Instant)>,
}

impl Holds {
    pub fn held_by_account(&self, account_id: &str) -> i64 {
        self.by_account.get(account_id).copied().unwrap_or(0)
    }

    fn held_by_key(&self, key_id: &str) -> i64 {
        self.by_key.get(key_id).copied().unwrap_or(0)
    }

    /// Which transaction of the writer's is open (or last ended).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Counts an amount the writer's open transaction takes from an account
    /// (and from a key's allowance) until [`Holds::end_transaction`].
    pub fn owe(&mut self, account_id: &str, key_id: Option<&str>, amount: i64) {
        if amount <= 0 {
            return;
        }
        add(&mut self.owed_by_account, account_id, amount);
        if let Some(key_id) = key_id {
            add(&mut self.owed_by_key, key_id, amount);
        }
    }

    /// The writer's transaction committed or rolled back: what it owed is in
    /// the committed balance now, or never will be.
    pub fn end_transaction(&mut self) {
        self.owed_by_account.clear();
        self.owed_by_key.clear();
        self.standings.clear();
        self.generation = self.generation.wrapping_add(1);
    }

    /// The committed standing of the hold's account and key read in this
    /// generation from a snapshot that began less than `max_age` ago.
    pub fn known_standing(&self, hold: &HoldRequest, max_age: Duration) -> Option<Standing> {
        self.standings
            .get(&hold.key_id)
            .filter(|(account_id, _, since)| *account_id == hold.account_id && since.elapsed() < max_age)
            .map(|&(_, standing, _)| standing)
    }

    /// Keeps a committed standing read in this generation, from a snapshot
    /// that began at `since`, for [`Holds::known_standing`].
    pub fn remember_standing(&mut self, hold: &HoldRequest, standing: Standing, since: Instant) {
        match self.standings.get_mut(&hold.key_id) {
            Some(known) if known.0 == hold.account_id => {
                known.1 = standing;
                known.2 = since;
            }
            _ => {
                self.standings
                    .insert(hold.key_id.clone(), (hold.account_id.clone(), standing, since));
            }
        }
    }

    /// Decides a hold against `standing` read from committed rows (outside
    /// the writer's transaction) and places it: what the open transaction
    /// owes counts as spent.
    pub fn place_committed(&mut self, hold: &HoldRequest, standing: &Standing) -> Result<HoldOutcome> {
        let standing = Standing {
            balance: standing.balance - self.owed_by_account.get(&hold.account_id).copied().unwrap_or(0),
            spent: standing.spent + self.owed_by_key.get(&hold.key_id).copied().unwrap_or(0),
            ..*standing
        };
        self.place(hold, &standing, &mut Vec::new())
    }

    /// Decides a hold against `standing` and places it.
    pub fn place(&mut self, hold: &HoldRequest, standing: &Standing, undo: &mut Vec<Undo>) -> Result<HoldOutcome> {
        if standing.suspended || standing.revoked {
            return Ok(HoldOutcome::Refused);
        }
        let available = standing.balance - self.held_by_account(&hold.account_id);
        if available < hold.amount {
            return Ok(HoldOutcome::InsufficientBalance);
        }
        let committed = standing.spent.saturating_add(self.held_by_key(&hold.key_id));
        if standing
            .credit_limit
            .is_some_and(|limit| committed.saturating_add(hold.amount) > limit)
        {
            return Ok(HoldOutcome::KeyLimitReached);
        }
        if self.by_request.contains_key(&hold.request_id) {
            return Err(StoreError::Conflict(format!(
                "request {} already holds credits",
                hold.request_id
            )));
        }
        self.insert(
            hold.request_id.clone(),
            Held {
                account_id: hold.account_id.clone(),
                key_id: hold.key_id.clone(),
                amount: hold.amount,
                expires_at: hold.expires_at,
                settling: false,
            },
        );
        undo.push(Undo::Placed(hold.request_id.clone()));
        Ok(HoldOutcome::Held)
    }

    /// Removes a request's hold for its settlement (undone on rollback).
    /// The hold moves into the undo log, which a commit clears.
    pub fn take(&mut self, request_id: &str, undo: &mut Vec<Undo>) {
        if let Some((request_id, held)) = self.remove(request_id) {
            undo.push(Undo::Taken(request_id, held));
        }
    }

    /// Marks a request's hold as settling and lowers it to the charge: until
    /// the credit writer applies the settlement, the account's other requests
    /// are decided on the balance the charge will leave. Neither a release nor
    /// expiry removes a settling hold; its settlement does.
    /// A settlement for another account or key than the hold's is left to
    /// the synchronous path, which checks it against the database.
    pub fn begin_settling(&mut self, usage: &UsageRecord) -> Settling {
        let Some(held) = self
            .by_request
            .get_mut(&usage.request_id)
            .filter(|held| held.account_id == usage.account_id && held.key_id == usage.key_id)
        else {
            return Settling::Absent;
        };
        let charge = usage.cost;
        if held.settling {
            return Settling::Already;
        }
        let before = held.amount;
        let lower = before - charge.clamp(0, before);
        held.settling = true;
        held.amount -= lower;
        subtract(&mut self.by_account, &held.account_id, lower);
        subtract(&mut self.by_key, &held.key_id, lower);
        Settling::Started(before)
    }

    /// Undoes [`Holds::begin_settling`] (the journal could not take the record).
    pub fn cancel_settling(&mut self, request_id: &str, amount: i64) {
        if let Some((request_id, mut held)) = self.remove(request_id) {
            held.settling = false;
            held.amount = amount;
            self.insert(request_id, held);
        }
    }

    /// Plays an undo log back, newest change first.
    pub fn undo(&mut self, log: &mut Vec<Undo>) {
        while let Some(change) = log.pop() {
            match change {
                Undo::Placed(request_id) => {
                    self.remove(&request_id);
                }
                Undo::Taken(request_id, held) => self.insert(request_id, held),
            }
        }
    }

    /// Returns holds in full (no write: the balance never lost them); not
    /// those whose settlement is under way.
    pub fn release<'a>(&mut self, request_ids: impl IntoIterator<Item = &'a str>) -> u64 {
        request_ids
            .into_iter()
            .filter(|id| self.by_request.get(*id).is_some_and(|held| !held.settling) && self.remove(id).is_some())
            .count() as u64
    }

    pub fn release_expired(&mut self, now: Millis) -> u64 {
        let expired: Vec<String> = self
            .by_request
            .iter()
            .filter(|(_, held)| held.expires_at < now && !held.settling)
            .map(|(id, _)| id.clone())
            .collect();
        self.release(expired.iter().map(String::as_str))
    }

    /// Returns every hold; what the writer's open transaction owes stays.
    pub fn release_all(&mut self) -> u64 {
        let n = self.by_request.len() as u64;
        self.by_request.clear();
        self.by_account.clear();
        self.by_key.clear();
        n
    }

    fn insert(&mut self, request_id: String, held: Held) {
        add(&mut self.by_account, &held.account_id, held.amount);
        add(&mut self.by_key, &held.key_id, held.amount);
        self.by_request.insert(request_id, held);
    }

    fn remove(&mut self, request_id: &str) -> Option<(String, Held)> {
        let (request_id, held) = self.by_request.remove_entry(request_id)?;
        subtract(&mut self.by_account, &held.account_id, held.amount);
        subtract(&mut self.by_key, &held.key_id, held.amount);
        Some((request_id, held))
    }
}

/// Raises a running total; the id is copied only when it has none yet.
fn add(totals: &mut HashMap<String, i64>, id: &str, amount: i64) {
    match totals.get_mut(id) {
        Some(total) => *total += amount,
        None => {
            totals.insert(id.to_string(), amount);
        }
    }
}

/// Lowers a running total, dropping it at zero so the maps hold only live
/// accounts and keys.
fn subtract(totals: &mut HashMap<String, i64>, id: &str, amount: i64) {
    if let Some(total) = totals.get_mut(id) {
        *total -= amount;
        if *total == 0 {
            totals.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str, amount: i64) -> HoldRequest {
        HoldRequest {
            request_id: id.into(),
            account_id: "acc".into(),
            key_id: "key".into(),
            amount,
            expires_at: 100,
        }
    }

    fn usage(id: &str, cost: i64) -> UsageRecord {
        UsageRecord {
            request_id: id.into(),
            account_id: "acc".into(),
            key_id: "key".into(),
            device_id: None,
            provider_account_id: None,
            provision_id: None,
            service: crate::Service::Chat,
            model: "m".into(),
            input_tokens: 0,
            output_tokens: 0,
            characters: 0,
            pages: 0,
            latency_ms: 0,
            ttfb_ms: 0,
            status: 200,
            cost,
            reward: 0,
            created_at: 0,
        }
    }

    fn standing(balance: i64) -> Standing {
        Standing {
            suspended: false,
            revoked: false,
            balance,
            credit_limit: None,
            spent: 0,
        }
    }

    #[test]
    fn undo_restores_the_map_as_it_was() {
        let mut holds = Holds::default();
        let mut log = Vec::new();
        holds.place(&request("a", 30), &standing(100), &mut log).expect("place");
        log.clear();
        holds.place(&request("b", 50), &standing(100), &mut log).expect("place");
        holds.take("a", &mut log);
        assert_eq!(holds.held_by_account("acc"), 50);
        holds.undo(&mut log);
        assert_eq!(holds.held_by_account("acc"), 30);
        assert_eq!(
            holds.place(&request("c", 71), &standing(100), &mut log).expect("place"),
            HoldOutcome::InsufficientBalance,
            "the restored hold counts again"
        );
        assert_eq!(holds.release(["a"]), 1);
        assert!(holds.by_account.is_empty() && holds.by_key.is_empty());
    }

    #[test]
    fn a_settling_hold_counts_its_charge_until_settled() {
        let mut holds = Holds::default();
        let mut log = Vec::new();
        holds.place(&request("a", 60), &standing(100), &mut log).expect("place");
        let mut other_key = usage("a", 10);
        other_key.key_id = "other".into();
        assert!(matches!(holds.begin_settling(&other_key), Settling::Absent));
        assert!(matches!(holds.begin_settling(&usage("a", 10)), Settling::Started(60)));
        assert!(matches!(holds.begin_settling(&usage("a", 10)), Settling::Already));
        assert!(matches!(holds.begin_settling(&usage("b", 10)), Settling::Absent));
        assert_eq!(holds.held_by_account("acc"), 10);
        assert_eq!(holds.held_by_key("key"), 10);
        assert_eq!(holds.release(["a"]), 0, "a settling hold is not released");
        assert_eq!(holds.release_expired(1_000), 0, "nor expired");
        assert_eq!(
            holds.place(&request("c", 90), &standing(100), &mut log).expect("place"),
            HoldOutcome::Held,
            "the charge, not the hold, is what the next request must leave"
        );
        holds.take("a", &mut log);
        assert_eq!(holds.held_by_account("acc"), 90);
        holds.cancel_settling("c", 90);
        assert!(matches!(holds.begin_settling(&usage("c", 200)), Settling::Started(90)));
        assert_eq!(
            holds.held_by_account("acc"),
            90,
            "a charge above the hold keeps the hold"
        );
        holds.cancel_settling("c", 90);
        assert_eq!(holds.release(["c"]), 1);
        assert!(holds.by_account.is_empty() && holds.by_key.is_empty());
    }

    #[test]
    fn expiry_releases_only_old_holds() {
        let mut holds = Holds::default();
        let mut log = Vec::new();
        holds
            .place(&request("old", 10), &standing(100), &mut log)
            .expect("place");
        let mut late = request("late", 20);
        late.expires_at = 500;
        holds.place(&late, &standing(100), &mut log).expect("place");
        assert_eq!(holds.release_expired(200), 1);
        assert_eq!(holds.held_by_account("acc"), 20);
    }
}
