-- Operator tools and referrals: versioned prices, notification banners, and
-- each account's referral code and referrer. Referral payouts are ledger
-- entries of kind 'referral' whose request_id is the payout key
-- ('referral:<day>:<referred>:<level>:<kind>'), so the ledger's
-- UNIQUE (request_id, kind, account_id) makes every payout happen once.

-- Every change of the price table is a new row; the highest version is in force.
CREATE TABLE pricing_versions (
    version    INTEGER PRIMARY KEY NOT NULL,
    -- The whole table as JSON (the gateway's `[pricing]` shape).
    pricing    TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE banners (
    id         TEXT PRIMARY KEY NOT NULL,
    message    TEXT NOT NULL,
    -- 'info', 'warning' or 'critical'.
    level      TEXT NOT NULL,
    starts_at  INTEGER NOT NULL,
    ends_at    INTEGER NOT NULL CHECK (ends_at > starts_at),
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX banners_time ON banners (ends_at, starts_at);

-- One row per account that has a code; the referrer is set at most once.
CREATE TABLE referrals (
    account_id  TEXT PRIMARY KEY NOT NULL REFERENCES accounts (id),
    code        TEXT NOT NULL UNIQUE,
    referrer_id TEXT REFERENCES accounts (id) CHECK (referrer_id <> account_id),
    referred_at INTEGER,
    created_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX referrals_referrer ON referrals (referrer_id);

-- Payout jobs and the provider page read usage by provider and by time.
CREATE INDEX usage_provider_time ON usage_records (provider_account_id, created_at);
CREATE INDEX usage_time ON usage_records (created_at);
