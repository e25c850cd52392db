-- Two indexes that every settlement wrote and almost nothing needed
-- (decision 56; measured in docs/benchmarks.md, "Two indexes fewer"):
--
-- usage_provider_time (provider, time) served reads that now go to the daily
-- roll-ups (a provider's page) or by time alone (payouts: usage_time).
DROP INDEX IF EXISTS usage_provider_time;

-- The ledger's UNIQUE (request_id, kind, account_id) took an entry for the
-- charge and for the reward of every request, keyed by the request's random
-- id. A settlement already happens at most once: its usage record, keyed by
-- the request id, is inserted first in the same transaction, and a second
-- settlement stops there. Only referral payouts rely on the ledger itself
-- (`ON CONFLICT ... DO NOTHING`), so only they keep a unique index. SQLite
-- cannot drop a table's UNIQUE constraint, so the table is copied once, ids
-- included, as migration 8 did.
CREATE TABLE ledger_new (
    id         INTEGER PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    kind       TEXT NOT NULL,
    amount     INTEGER NOT NULL,
    request_id TEXT,
    note       TEXT,
    created_at INTEGER NOT NULL
) STRICT;
INSERT INTO ledger_new (id, account_id, kind, amount, request_id, note, created_at)
    SELECT id, account_id, kind, amount, request_id, note, created_at FROM ledger;
DROP TABLE ledger;
ALTER TABLE ledger_new RENAME TO ledger;
CREATE INDEX ledger_account ON ledger (account_id, created_at);
-- A day's referral payout is paid once per (day, referred account, level, kind).
CREATE UNIQUE INDEX ledger_referral_once ON ledger (request_id, kind, account_id) WHERE kind = 'referral';
