-- Holds now live in the gateway's memory (crates/store/src/sqlite/holds.rs):
-- a SQLite file has one gateway, which returned every hold at start anyway.
-- Holds that an older gateway left behind go back to their balances and
-- keys here, and the table goes. `api_keys.reserved` stays, always 0.
UPDATE accounts SET balance = balance + (
    SELECT COALESCE(SUM(h.amount), 0) FROM holds h WHERE h.account_id = accounts.id
);
UPDATE api_keys SET reserved = 0;
DROP TABLE holds;
