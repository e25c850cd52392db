-- The ledger keeps its integer ids but drops AUTOINCREMENT. With it, every
-- ledger insert also read and rewrote the ledger's row in sqlite_sequence:
-- two more b-tree visits per settlement (a charge and a reward) and one
-- more page in every commit's WAL frames. Without it SQLite gives each new
-- row the largest id plus one, which is the same sequence as long as the
-- newest rows are never deleted, and nothing deletes ledger rows (entries
-- are corrected by new entries, never removed). Ids therefore still grow
-- with time, which the ledger's pages (`id < before`) rely on.
-- Measured: docs/benchmarks.md ("A ledger without AUTOINCREMENT").
CREATE TABLE ledger_new (
    id         INTEGER PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    kind       TEXT NOT NULL,
    amount     INTEGER NOT NULL,
    request_id TEXT,
    note       TEXT,
    created_at INTEGER NOT NULL,
    -- A request is charged and rewarded at most once per account.
    UNIQUE (request_id, kind, account_id)
) STRICT;
INSERT INTO ledger_new (id, account_id, kind, amount, request_id, note, created_at)
    SELECT id, account_id, kind, amount, request_id, note, created_at FROM ledger;
DROP TABLE ledger;
ALTER TABLE ledger_new RENAME TO ledger;
CREATE INDEX ledger_account ON ledger (account_id, created_at);
