-- Timestamps are milliseconds since the Unix epoch, money is integer credits
-- (nano-dollars), booleans are 0/1. STRICT makes SQLite reject values of the
-- wrong type (e.g. an overflowing sum turned REAL) instead of storing them.

CREATE TABLE accounts (
    id               TEXT PRIMARY KEY NOT NULL,
    name             TEXT NOT NULL,
    email            TEXT UNIQUE,
    balance          INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0),
    suspended        INTEGER NOT NULL DEFAULT 0,
    suspended_reason TEXT,
    created_at       INTEGER NOT NULL
) STRICT;

CREATE TABLE api_keys (
    id               TEXT PRIMARY KEY NOT NULL,
    account_id       TEXT NOT NULL REFERENCES accounts (id),
    name             TEXT NOT NULL,
    prefix           TEXT NOT NULL,
    secret_hash      TEXT NOT NULL,
    credit_limit     INTEGER,
    spent            INTEGER NOT NULL DEFAULT 0,
    -- Sum of the outstanding holds made through this key.
    reserved         INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    allowed_services TEXT,
    rpm_limit        INTEGER,
    revoked_at       INTEGER,
    last_used_at     INTEGER,
    created_at       INTEGER NOT NULL
) STRICT;
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE devices (
    id              TEXT PRIMARY KEY NOT NULL,
    account_id      TEXT NOT NULL REFERENCES accounts (id),
    name            TEXT NOT NULL,
    access_key_hash TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    last_seen_at    INTEGER
) STRICT;
CREATE INDEX devices_account ON devices (account_id);

CREATE TABLE provisions (
    id         TEXT PRIMARY KEY NOT NULL,
    device_id  TEXT NOT NULL REFERENCES devices (id),
    service    TEXT NOT NULL,
    model      TEXT NOT NULL,
    mode       TEXT NOT NULL,
    endpoint   TEXT,
    online     INTEGER NOT NULL DEFAULT 1,
    updated_at INTEGER NOT NULL,
    UNIQUE (device_id, service, model)
) STRICT;

CREATE TABLE ledger (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    kind       TEXT NOT NULL,
    amount     INTEGER NOT NULL,
    request_id TEXT,
    note       TEXT,
    created_at INTEGER NOT NULL,
    -- A request is charged and rewarded at most once per account.
    UNIQUE (request_id, kind, account_id)
) STRICT;
CREATE INDEX ledger_account ON ledger (account_id, created_at);

CREATE TABLE holds (
    request_id TEXT PRIMARY KEY NOT NULL,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    key_id     TEXT NOT NULL REFERENCES api_keys (id),
    amount     INTEGER NOT NULL CHECK (amount >= 0),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;
CREATE INDEX holds_account ON holds (account_id);
CREATE INDEX holds_expiry ON holds (expires_at);

-- History: no foreign keys, so records outlive what they mention.
CREATE TABLE usage_records (
    request_id          TEXT PRIMARY KEY NOT NULL,
    account_id          TEXT NOT NULL,
    key_id              TEXT NOT NULL,
    device_id           TEXT,
    provider_account_id TEXT,
    provision_id        TEXT,
    service             TEXT NOT NULL,
    model               TEXT NOT NULL,
    input_tokens        INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    characters          INTEGER NOT NULL,
    pages               INTEGER NOT NULL,
    latency_ms          INTEGER NOT NULL,
    ttfb_ms             INTEGER NOT NULL,
    status              INTEGER NOT NULL,
    cost                INTEGER NOT NULL,
    reward              INTEGER NOT NULL,
    created_at          INTEGER NOT NULL
) STRICT;
CREATE INDEX usage_account_time ON usage_records (account_id, created_at);

CREATE TABLE daily_rollups (
    day           TEXT NOT NULL,
    account_id    TEXT NOT NULL,
    -- '' when no device answered, so the primary key needs no NULLs.
    device_id     TEXT NOT NULL,
    service       TEXT NOT NULL,
    model         TEXT NOT NULL,
    requests      INTEGER NOT NULL,
    errors        INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost          INTEGER NOT NULL,
    reward        INTEGER NOT NULL,
    PRIMARY KEY (day, account_id, device_id, service, model)
) STRICT;
