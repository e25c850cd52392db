-- Timestamps are milliseconds since the Unix epoch, money is integer credits
-- (nano-dollars). Kept column-for-column identical to the SQLite schema.

CREATE TABLE accounts (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    email            TEXT UNIQUE,
    balance          BIGINT NOT NULL DEFAULT 0 CHECK (balance >= 0),
    suspended        BOOLEAN NOT NULL DEFAULT FALSE,
    suspended_reason TEXT,
    created_at       BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id               TEXT PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts (id),
    name             TEXT NOT NULL,
    prefix           TEXT NOT NULL,
    secret_hash      TEXT NOT NULL,
    credit_limit     BIGINT,
    spent            BIGINT NOT NULL DEFAULT 0,
    -- Sum of the outstanding holds made through this key.
    reserved         BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    allowed_services TEXT,
    rpm_limit        BIGINT,
    revoked_at       BIGINT,
    last_used_at     BIGINT,
    created_at       BIGINT NOT NULL
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE devices (
    id              TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts (id),
    name            TEXT NOT NULL,
    access_key_hash TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    last_seen_at    BIGINT
);
CREATE INDEX devices_account ON devices (account_id);

CREATE TABLE provisions (
    id         TEXT PRIMARY KEY,
    device_id  TEXT NOT NULL REFERENCES devices (id),
    service    TEXT NOT NULL,
    model      TEXT NOT NULL,
    mode       TEXT NOT NULL,
    endpoint   TEXT,
    online     BOOLEAN NOT NULL DEFAULT TRUE,
    updated_at BIGINT NOT NULL,
    UNIQUE (device_id, service, model)
);

CREATE TABLE ledger (
    id         BIGSERIAL PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    kind       TEXT NOT NULL,
    amount     BIGINT NOT NULL,
    request_id TEXT,
    note       TEXT,
    created_at BIGINT NOT NULL,
    -- A request is charged and rewarded at most once per account.
    UNIQUE (request_id, kind, account_id)
);
CREATE INDEX ledger_account ON ledger (account_id, created_at);

CREATE TABLE holds (
    request_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    key_id     TEXT NOT NULL REFERENCES api_keys (id),
    amount     BIGINT NOT NULL CHECK (amount >= 0),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX holds_account ON holds (account_id);
CREATE INDEX holds_expiry ON holds (expires_at);

-- History: no foreign keys, so records outlive what they mention.
CREATE TABLE usage_records (
    request_id          TEXT PRIMARY KEY,
    account_id          TEXT NOT NULL,
    key_id              TEXT NOT NULL,
    device_id           TEXT,
    provider_account_id TEXT,
    provision_id        TEXT,
    service             TEXT NOT NULL,
    model               TEXT NOT NULL,
    input_tokens        BIGINT NOT NULL,
    output_tokens       BIGINT NOT NULL,
    characters          BIGINT NOT NULL,
    pages               BIGINT NOT NULL,
    latency_ms          BIGINT NOT NULL,
    ttfb_ms             BIGINT NOT NULL,
    status              INTEGER NOT NULL,
    cost                BIGINT NOT NULL,
    reward              BIGINT NOT NULL,
    created_at          BIGINT NOT NULL
);
CREATE INDEX usage_account_time ON usage_records (account_id, created_at);

CREATE TABLE daily_rollups (
    day           TEXT NOT NULL,
    account_id    TEXT NOT NULL,
    -- '' when no device answered, so the primary key needs no NULLs.
    device_id     TEXT NOT NULL,
    service       TEXT NOT NULL,
    model         TEXT NOT NULL,
    requests      BIGINT NOT NULL,
    errors        BIGINT NOT NULL,
    input_tokens  BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cost          BIGINT NOT NULL,
    reward        BIGINT NOT NULL,
    PRIMARY KEY (day, account_id, device_id, service, model)
);
