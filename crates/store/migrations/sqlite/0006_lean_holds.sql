-- Holds live only while a request runs, so the table stays small. It is now
-- keyed by request id alone (WITHOUT ROWID), without its two secondary
-- indexes: one b-tree instead of four, so a hold and its settlement each
-- write three fewer pages into the WAL (at low load every request commits
-- twice). Sums per account and the expiry sweep scan the small table.
-- Measured: about 5-10 % less gateway CPU per request at concurrency 1
-- (docs/benchmarks.md).
CREATE TABLE holds_new (
    request_id TEXT PRIMARY KEY NOT NULL,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    key_id     TEXT NOT NULL REFERENCES api_keys (id),
    amount     INTEGER NOT NULL CHECK (amount >= 0),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
INSERT INTO holds_new SELECT request_id, account_id, key_id, amount, created_at, expires_at FROM holds;
DROP TABLE holds;
ALTER TABLE holds_new RENAME TO holds;
