-- pgcrew V023: one event, one scalar call (issue #14, benchmark line for single appends).
--
-- pgcrew.append_events takes arrays, so that a batch is one call. A single event paid for that
-- shape on every append: the client encodes four one-element arrays, the server decodes them,
-- subscripts them, chooses between the batch and the per-event path, and returns its row
-- through a set-returning function's tuplestore. pgcrew.append_event does the per-event path of
-- append_events (V017) for one event with scalar arguments and OUT parameters: the same lock
-- (the run's stored lock key), lease fence, closed-ledger check, size checks, idempotent
-- lookup, hash (v1 or v2 by the run's ledger_format), beyond-the-head check, head update under
-- the head guard and one NOTIFY per run and transaction. Errors and SQLSTATEs are those of
-- append_events (PC001 lease lost, PC002 unknown run, PC003 closed ledger, PC004 event beyond
-- the head, 22001/22023 from pgcrew.refuse_event_input).
--
-- The library sends every single event here; batches still go to append_events. Neither
-- function is executable by PUBLIC or tenant roles (the migration runner revokes EXECUTE on
-- every pgcrew function from PUBLIC after each run).

CREATE FUNCTION pgcrew.append_event(p_run uuid, p_lease_token bigint, p_type text,
                                    p_step_key text, p_payload jsonb, p_dedupe boolean,
                                    OUT o_seq bigint, OUT o_hash bytea,
                                    OUT o_created_at timestamptz, OUT o_inserted boolean)
LANGUAGE plpgsql AS $$
DECLARE
    r        record;
    v_bytes  bytea;
    v_prev   bytea;
    v_done   text;
    v_ignore text;
BEGIN
    -- The stored key (V017); no row means no run.
    PERFORM pg_advisory_xact_lock(k.lock_key) FROM pgcrew.runs k WHERE k.id = p_run;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'PC002';
    END IF;
    -- Read after the lock: the head is the last committed append's.
    SELECT x.tenant_id, x.lease_token, x.lease_owner, x.lease_expires_at, x.state,
           x.ledger_format, x.ledger_head_seq, x.ledger_head_hash
      INTO r FROM pgcrew.runs x WHERE x.id = p_run;
    IF p_lease_token IS NOT NULL
       AND (r.lease_token <> p_lease_token OR r.lease_owner IS NULL
            OR r.lease_expires_at IS NULL OR r.lease_expires_at <= now()) THEN
        RAISE EXCEPTION 'the lease on run % with token % is no longer held (current token %)',
            p_run, p_lease_token, r.lease_token USING ERRCODE = 'PC001';
    END IF;
    IF r.state IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'run % is %: its ledger is closed (appends to finished or purged runs are refused)',
            p_run, r.state USING ERRCODE = 'PC003';
    END IF;
    IF p_dedupe THEN
        IF coalesce(octet_length(p_type) NOT BETWEEN 1 AND 128, true)
           OR octet_length(p_step_key) > 512 THEN
            PERFORM pgcrew.refuse_event_input(p_type, p_step_key, 0);
        END IF;
        SELECT e.seq, e.hash, e.created_at INTO o_seq, o_hash, o_created_at
          FROM pgcrew.events e
         WHERE e.run_id = p_run AND e.dedupe AND e.event_type = p_type
           AND coalesce(e.step_key, '') = coalesce(p_step_key, '');
        IF FOUND THEN
            o_inserted := false;
            RETURN;
        END IF;
    END IF;
    v_bytes := convert_to(p_payload::text, 'UTF8');
    IF coalesce(octet_length(p_type) NOT BETWEEN 1 AND 128, true)
       OR octet_length(p_step_key) > 512
       OR coalesce(octet_length(v_bytes) > 1048576, true) THEN
        PERFORM pgcrew.refuse_event_input(p_type, p_step_key, octet_length(v_bytes));
    END IF;
    -- An empty ledger (no head hash) starts at seq 1 after the all-zero hash.
    IF r.ledger_head_hash IS NULL THEN
        o_seq := 1;
        v_prev := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
    ELSE
        o_seq := r.ledger_head_seq + 1;
        v_prev := r.ledger_head_hash;
    END IF;
    o_created_at := clock_timestamp();
    -- pgcrew.event_hash_v2 hashes the run id after the previous hash; event_hash (v1) not.
    o_hash := sha256(v_prev
                     || CASE WHEN r.ledger_format = 1 THEN '\x'::bytea ELSE uuid_send(p_run) END
                     || int8send(o_seq) || convert_to(r.tenant_id, 'UTF8') || '\x00'::bytea
                     || convert_to(p_type, 'UTF8') || '\x00'::bytea
                     || convert_to(coalesce(p_step_key, ''), 'UTF8') || '\x00'::bytea
                     || int8send((extract(epoch FROM o_created_at) * 1000000)::int8) || v_bytes);
    INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, step_key, payload,
                               prev_hash, hash, created_at, dedupe)
    VALUES (p_run, o_seq, r.tenant_id, p_type, p_step_key, p_payload,
            v_prev, o_hash, o_created_at, coalesce(p_dedupe, false))
    ON CONFLICT (run_id, seq) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the ledger of run % already has an event at seq %, beyond its recorded head (seq %): it was written outside pgcrew.append_events; check it with pgcrew run verify-ledger',
            p_run, o_seq, o_seq - 1 USING ERRCODE = 'PC004';
    END IF;
    v_ignore := set_config('pgcrew.ledger_writer', 'append', true);
    UPDATE pgcrew.runs SET ledger_head_seq = o_seq, ledger_head_hash = o_hash WHERE id = p_run;
    v_ignore := set_config('pgcrew.ledger_writer', '', true);
    v_done := coalesce(current_setting('pgcrew.notified_runs', true), '');
    IF position(p_run::text IN v_done) = 0 THEN
        PERFORM pg_notify('pgcrew_run_event',
                          json_build_object('run_id', p_run, 'seq', o_seq)::text),
                set_config('pgcrew.notified_runs', v_done || p_run::text || ',', true);
    END IF;
    o_inserted := true;
END $$;
REVOKE ALL ON FUNCTION pgcrew.append_event(uuid, bigint, text, text, jsonb, boolean) FROM PUBLIC;
