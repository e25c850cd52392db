-- Group commit for PostgreSQL (decision 50): the holds and settlements a
-- gateway has queued while its previous batch ran go to the server as one
-- call of cx_batch, so they share one round trip, one transaction and one
-- commit. A busy account's row is then locked once per batch instead of once
-- per request, which is what bounded one account's requests per second.
--
-- `p_ops` is a JSON array; each element has `op` ('hold' or 'settle') and the
-- arguments of cx_hold or cx_settle by name. The answer is their words, in
-- the same order. Any exception (a missing account, a deadlock) rolls the
-- whole batch back, and the gateway then runs each job again on its own.
--
-- Lock order is the rule of crates/store/src/postgres/credits.rs: every
-- account the batch may touch first, in id order, then every key, in id
-- order. The calls that follow only re-take locks this transaction holds.

CREATE FUNCTION cx_batch(p_ops JSONB) RETURNS TEXT[] LANGUAGE plpgsql AS $$
DECLARE
    v_op JSONB;
    v_out TEXT[] := ARRAY[]::TEXT[];
BEGIN
    PERFORM 1 FROM accounts
    WHERE id IN (
        SELECT o->>'account_id' FROM jsonb_array_elements(p_ops) o
        UNION
        SELECT o->>'provider_account_id' FROM jsonb_array_elements(p_ops) o
    )
    ORDER BY id FOR NO KEY UPDATE;
    PERFORM 1 FROM api_keys
    WHERE id IN (SELECT o->>'key_id' FROM jsonb_array_elements(p_ops) o)
    ORDER BY id FOR NO KEY UPDATE;

    FOR v_op IN SELECT value FROM jsonb_array_elements(p_ops) LOOP
        IF v_op->>'op' = 'hold' THEN
            v_out := v_out || cx_hold(
                v_op->>'request_id', v_op->>'account_id', v_op->>'key_id',
                (v_op->>'amount')::BIGINT, (v_op->>'now')::BIGINT,
                (v_op->>'expires_at')::BIGINT);
        ELSIF v_op->>'op' = 'settle' THEN
            v_out := v_out || cx_settle(
                v_op->>'request_id', v_op->>'account_id', v_op->>'key_id',
                v_op->>'device_id', v_op->>'provider_account_id', v_op->>'provision_id',
                v_op->>'service', v_op->>'model',
                (v_op->>'input_tokens')::BIGINT, (v_op->>'output_tokens')::BIGINT,
                (v_op->>'characters')::BIGINT, (v_op->>'pages')::BIGINT,
                (v_op->>'latency_ms')::BIGINT, (v_op->>'ttfb_ms')::BIGINT,
                (v_op->>'status')::INTEGER, (v_op->>'cost')::BIGINT,
                (v_op->>'reward')::BIGINT, (v_op->>'created_at')::BIGINT,
                v_op->>'day', (v_op->>'error')::BIGINT);
        ELSE
            RAISE EXCEPTION 'unknown operation %', v_op->>'op' USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    RETURN v_out;
END
$$;
