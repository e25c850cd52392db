-- A hold and a settlement each run as one function call: one round trip, and
-- the account row stays locked only while the server runs the function and
-- commits, not across the eight or so round trips the gateway made before.
-- The rules are the ones crates/store/src/postgres/credits.rs documents:
-- accounts in id order, then keys; every check that guards a balance is part
-- of the UPDATE that changes it; a row that references an account or a key
-- (hold, ledger entry) is written after that account or key was updated in
-- the same transaction, so its foreign-key check finds a row version this
-- transaction owns and adds no lock of its own.
--
-- Both return a word the store maps to its outcome. `p_reward` is the reward
-- the store has already found payable (none without a provider account) and
-- `p_error` whether the roll-up counts an error (`rules::is_error`). Only the
-- clamp of the charge to the balance is restated here, since it needs the
-- balance read under the row lock (`rules::clamp_charge`).

CREATE FUNCTION cx_hold(
    p_request_id TEXT, p_account_id TEXT, p_key_id TEXT,
    p_amount BIGINT, p_now BIGINT, p_expires_at BIGINT
) RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    v_suspended BOOLEAN;
    v_revoked BOOLEAN;
BEGIN
    SELECT a.suspended, k.revoked_at IS NOT NULL INTO v_suspended, v_revoked
    FROM accounts a JOIN api_keys k ON k.account_id = a.id
    WHERE a.id = p_account_id AND k.id = p_key_id;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    IF v_suspended OR v_revoked THEN
        RETURN 'refused';
    END IF;

    -- The check and the debit are one statement: a concurrent hold waits for
    -- this row and re-checks the balance it leaves.
    UPDATE accounts SET balance = balance - p_amount
    WHERE id = p_account_id AND balance >= p_amount;
    IF NOT FOUND THEN
        RETURN 'insufficient_balance';
    END IF;

    UPDATE api_keys SET reserved = reserved + p_amount
    WHERE id = p_key_id AND (credit_limit IS NULL OR spent + reserved + p_amount <= credit_limit);
    IF NOT FOUND THEN
        -- Undone in the same transaction, under the row lock taken above.
        UPDATE accounts SET balance = balance + p_amount WHERE id = p_account_id;
        RETURN 'key_limit_reached';
    END IF;

    -- The hold row comes last: its foreign keys then lock row versions this
    -- transaction wrote itself. Inserted first, their KEY SHARE locks joined
    -- the locks of whichever transaction was updating the account, making a
    -- multixact of them on every hold, and one busy account managed about a
    -- hundred requests per second through the gateway (decision 47).
    INSERT INTO holds (request_id, account_id, key_id, amount, created_at, expires_at)
    VALUES (p_request_id, p_account_id, p_key_id, p_amount, p_now, p_expires_at)
    ON CONFLICT (request_id) DO NOTHING;
    IF NOT FOUND THEN
        UPDATE api_keys SET reserved = reserved - p_amount WHERE id = p_key_id;
        UPDATE accounts SET balance = balance + p_amount WHERE id = p_account_id;
        RETURN 'conflict';
    END IF;
    RETURN 'held';
END
$$;

CREATE FUNCTION cx_settle(
    p_request_id TEXT, p_account_id TEXT, p_key_id TEXT, p_device_id TEXT,
    p_provider_account_id TEXT, p_provision_id TEXT, p_service TEXT, p_model TEXT,
    p_input_tokens BIGINT, p_output_tokens BIGINT, p_characters BIGINT, p_pages BIGINT,
    p_latency_ms BIGINT, p_ttfb_ms BIGINT, p_status INTEGER, p_cost BIGINT,
    p_reward BIGINT, p_created_at BIGINT, p_day TEXT, p_error BIGINT
) RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    v_hold_account TEXT;
    v_hold_key TEXT;
    v_hold_amount BIGINT := 0;
    v_returned BIGINT := 0;
    v_balance BIGINT;
    v_charge BIGINT;
    v_paid BOOLEAN := p_provider_account_id IS NOT NULL AND p_reward > 0;
BEGIN
    -- The record is the settlement's claim: a second settle of the same
    -- request waits on this row and then stops here, touching nothing.
    INSERT INTO usage_records (request_id, account_id, key_id, device_id,
        provider_account_id, provision_id, service, model, input_tokens, output_tokens,
        characters, pages, latency_ms, ttfb_ms, status, cost, reward, created_at)
    VALUES (p_request_id, p_account_id, p_key_id, p_device_id, p_provider_account_id,
        p_provision_id, p_service, p_model, p_input_tokens, p_output_tokens, p_characters,
        p_pages, p_latency_ms, p_ttfb_ms, p_status, p_cost, p_reward, p_created_at)
    ON CONFLICT (request_id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'already_settled';
    END IF;

    PERFORM 1 FROM accounts
    WHERE id = p_account_id OR (v_paid AND id = p_provider_account_id)
    ORDER BY id FOR NO KEY UPDATE;

    DELETE FROM holds WHERE request_id = p_request_id
    RETURNING account_id, key_id, amount INTO v_hold_account, v_hold_key, v_hold_amount;
    IF FOUND THEN
        IF v_hold_account = p_account_id THEN
            -- Given back in the charging UPDATE below: one row version, not two.
            v_returned := v_hold_amount;
        ELSE
            UPDATE accounts SET balance = balance + v_hold_amount WHERE id = v_hold_account;
        END IF;
        IF v_hold_key <> p_key_id THEN
            UPDATE api_keys SET reserved = reserved - v_hold_amount WHERE id = v_hold_key;
        END IF;
    ELSE
        v_hold_key := NULL;
        v_hold_amount := 0;
    END IF;

    SELECT balance + v_returned INTO v_balance FROM accounts WHERE id = p_account_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account %', p_account_id USING ERRCODE = 'no_data_found';
    END IF;
    -- Never more than the balance (only possible when the hold is gone).
    v_charge := LEAST(p_cost, GREATEST(v_balance, 0));
    IF v_charge <> p_cost THEN
        UPDATE usage_records SET cost = v_charge WHERE request_id = p_request_id;
    END IF;
    IF v_charge > 0 OR v_returned > 0 THEN
        UPDATE accounts SET balance = balance + v_returned - v_charge WHERE id = p_account_id;
    END IF;
    IF v_charge > 0 THEN
        INSERT INTO ledger (account_id, kind, amount, request_id, created_at)
        VALUES (p_account_id, 'charge', -v_charge, p_request_id, p_created_at);
    END IF;

    UPDATE api_keys SET spent = spent + v_charge, last_used_at = p_created_at,
        reserved = reserved - CASE WHEN v_hold_key = p_key_id THEN v_hold_amount ELSE 0 END
    WHERE id = p_key_id;

    IF v_paid THEN
        UPDATE accounts SET balance = balance + p_reward WHERE id = p_provider_account_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'account %', p_provider_account_id USING ERRCODE = 'no_data_found';
        END IF;
        INSERT INTO ledger (account_id, kind, amount, request_id, created_at)
        VALUES (p_provider_account_id, 'reward', p_reward, p_request_id, p_created_at);
    END IF;

    INSERT INTO daily_rollups (day, account_id, device_id, service, model, requests,
        errors, input_tokens, output_tokens, cost, reward)
    VALUES (p_day, p_account_id, COALESCE(p_device_id, ''), p_service, p_model, 1,
        p_error, p_input_tokens, p_output_tokens,
        v_charge, p_reward)
    ON CONFLICT (day, account_id, device_id, service, model) DO UPDATE SET
        requests = daily_rollups.requests + 1,
        errors = daily_rollups.errors + excluded.errors,
        input_tokens = daily_rollups.input_tokens + excluded.input_tokens,
        output_tokens = daily_rollups.output_tokens + excluded.output_tokens,
        cost = daily_rollups.cost + excluded.cost,
        reward = daily_rollups.reward + excluded.reward;
    RETURN 'settled';
END
$$;
