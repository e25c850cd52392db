-- Two indexes that every settlement wrote and almost nothing needed
-- (decision 56; see the SQLite migration of the same name):
-- usage_provider_time served reads that now go to the daily roll-ups or by
-- time alone; the ledger's unique (request_id, kind, account_id) is kept
-- for referral payouts only, since a settlement's usage record, inserted
-- first in the same transaction, already makes it happen once.
DROP INDEX IF EXISTS usage_provider_time;
DO $$
DECLARE
    unique_name TEXT;
BEGIN
    SELECT conname INTO unique_name FROM pg_constraint
        WHERE conrelid = 'ledger'::regclass AND contype = 'u';
    IF unique_name IS NOT NULL THEN
        EXECUTE format('ALTER TABLE ledger DROP CONSTRAINT %I', unique_name);
    END IF;
END
$$;
CREATE UNIQUE INDEX ledger_referral_once ON ledger (request_id, kind, account_id) WHERE kind = 'referral';
