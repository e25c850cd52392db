-- Device login (OAuth-style device codes) and the orchestrator's assignments.

-- A code a node shows its owner. Only hashes of the device code (the node's
-- secret) and of the user code (typed on the /link page) are stored.
CREATE TABLE device_codes (
    device_code_hash TEXT PRIMARY KEY NOT NULL,
    user_code_hash   TEXT NOT NULL UNIQUE,
    device_name      TEXT NOT NULL,
    -- 'pending', 'approved' (account_id set) or 'denied'.
    status           TEXT NOT NULL DEFAULT 'pending',
    account_id       TEXT REFERENCES accounts (id),
    -- Seconds the node must wait between polls; grows on every too-early poll.
    interval_secs    INTEGER NOT NULL,
    last_polled_at   INTEGER,
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL
) STRICT;
CREATE INDEX device_codes_expiry ON device_codes (expires_at);

-- The hardware a device last reported when it asked for its assignment.
CREATE TABLE device_reports (
    device_id   TEXT PRIMARY KEY NOT NULL REFERENCES devices (id),
    hardware    TEXT NOT NULL,
    assigned_at INTEGER NOT NULL
) STRICT;

-- The catalog models a device was assigned; the gateway admits only these
-- (and the device's upstream models) into the pools.
CREATE TABLE device_assignments (
    device_id TEXT NOT NULL REFERENCES devices (id),
    service   TEXT NOT NULL,
    model     TEXT NOT NULL,
    PRIMARY KEY (device_id, service, model)
) STRICT;
