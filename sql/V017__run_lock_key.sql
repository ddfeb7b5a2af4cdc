-- pgcrew V017: each run stores its secret-keyed advisory-lock key (issue #14, benchmark line).
--
-- Every append takes the run's advisory lock, keyed with the installation secret so that no
-- tenant role can compute it (V008): key = pgcrew.lock_key('run', run id). Deriving it on each
-- append (a nested PL/pgSQL call, a read of pgcrew.installation_secret and a sha256) was the
-- largest cost append_events had over the pre-#14 schema, whose key was the public
-- hashtext of the run id: single appends ran at 0.90 x the pre-#14 rate in `pgcrew bench ledger`.
--
-- The key is now derived once, when the run is inserted, and kept in runs.lock_key:
--  * a BEFORE INSERT trigger sets it from pgcrew.lock_key('run', id), whatever the INSERT gave;
--  * a BEFORE UPDATE OF lock_key trigger refuses any change (PC005), so the stored key always
--    equals the derived one and every other holder of the run lock (leases, transitions,
--    pgcrew.lock_run, artifacts, summaries, purges, instances of earlier versions) still takes
--    the same lock as append_events;
--  * append_events reads the key with the run's primary-key lookup and locks it; the rest of
--    the function is V016's.
--
-- A tenant role that can read its own runs can read their keys: it can then hold the lock of
-- its own runs only, which it could already stall by other means. The key of another tenant's
-- run is neither stored where it can read it nor computable without the secret.

ALTER TABLE pgcrew.runs ADD COLUMN lock_key bigint;
UPDATE pgcrew.runs SET lock_key = pgcrew.lock_key('run', id::text);
ALTER TABLE pgcrew.runs ALTER COLUMN lock_key SET NOT NULL;

CREATE FUNCTION pgcrew.set_run_lock_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.lock_key := pgcrew.lock_key('run', NEW.id::text);
    ELSIF NEW.lock_key IS DISTINCT FROM OLD.lock_key OR NEW.id IS DISTINCT FROM OLD.id THEN
        RAISE EXCEPTION 'run %: runs.lock_key and runs.id are fixed when the run is created (the key is derived from the id with the installation secret)',
            OLD.id USING ERRCODE = 'PC005';
    END IF;
    RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION pgcrew.set_run_lock_key() FROM PUBLIC;

CREATE TRIGGER runs_lock_key
    BEFORE INSERT OR UPDATE OF lock_key, id ON pgcrew.runs
    FOR EACH ROW EXECUTE FUNCTION pgcrew.set_run_lock_key();

CREATE OR REPLACE FUNCTION pgcrew.append_events(p_run uuid, p_lease_token bigint, p_types text[],
                                     p_step_keys text[], p_payloads jsonb[], p_dedupe boolean[])
RETURNS TABLE (o_seq bigint, o_hash bytea, o_created_at timestamptz, o_inserted boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_tenant   text;
    v_token    bigint;
    v_owner    text;
    v_expires  timestamptz;
    v_state    text;
    v_format   smallint;
    v_head     bigint;
    v_seq      bigint;
    v_hash     bytea;
    v_prev     bytea;
    v_now      timestamptz;
    v_now_us   bytea;
    v_tenant_b bytea;
    v_run_b    bytea;
    v_bytes    bytea;
    v_hashes   bytea[];
    v_prevs    bytea[];
    v_stored   bigint;
    v_stray    bigint;
    v_first    bigint;
    v_done     text;
    v_ignore   text;
    i          integer;
BEGIN
    -- The stored key (see above); no row means no run.
    PERFORM pg_advisory_xact_lock(r.lock_key) FROM pgcrew.runs r WHERE r.id = p_run;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'PC002';
    END IF;
    -- An empty ledger (no head hash) starts at seq 0 after the all-zero hash.
    SELECT r.tenant_id, r.lease_token, r.lease_owner, r.lease_expires_at, r.state, r.ledger_format,
           CASE WHEN r.ledger_head_hash IS NULL THEN 0 ELSE r.ledger_head_seq END,
           coalesce(r.ledger_head_hash,
                    '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
      INTO v_tenant, v_token, v_owner, v_expires, v_state, v_format, v_seq, v_hash
      FROM pgcrew.runs r WHERE r.id = p_run;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'PC002';
    END IF;
    IF p_lease_token IS NOT NULL
       AND (v_token <> p_lease_token OR v_owner IS NULL OR v_expires IS NULL OR v_expires <= now()) THEN
        RAISE EXCEPTION 'the lease on run % with token % is no longer held (current token %)',
            p_run, p_lease_token, v_token USING ERRCODE = 'PC001';
    END IF;
    IF v_state IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'run % is %: its ledger is closed (appends to finished or purged runs are refused)',
            p_run, v_state USING ERRCODE = 'PC003';
    END IF;
    v_now := clock_timestamp();
    -- Two paths with the same size checks and hash, kept apart: PL/pgSQL prepares each expression
    -- it evaluates once per transaction (a few thousand instructions each), so a single append
    -- evaluates as few expressions as it can.
    IF p_types[2] IS NOT NULL AND NOT coalesce(true = ANY (p_dedupe), false) THEN
        -- A batch without idempotent events: every event is new, event i gets seq v_head + i.
        v_head := v_seq;
        v_now_us := int8send((extract(epoch FROM v_now) * 1000000)::int8);
        v_tenant_b := convert_to(v_tenant, 'UTF8') || '\x00'::bytea;
        -- pgcrew.event_hash_v2 hashes the run id after the previous hash; event_hash (v1) not.
        v_run_b := CASE WHEN v_format = 1 THEN '\x'::bytea ELSE uuid_send(p_run) END;
        o_created_at := v_now;
        o_inserted := true;
        FOR i IN 1 .. array_length(p_types, 1) LOOP
            v_bytes := convert_to(p_payloads[i]::text, 'UTF8');
            IF coalesce(octet_length(p_types[i]) NOT BETWEEN 1 AND 128, true)
               OR octet_length(p_step_keys[i]) > 512
               OR coalesce(octet_length(v_bytes) > 1048576, true) THEN
                PERFORM pgcrew.refuse_event_input(p_types[i], p_step_keys[i], octet_length(v_bytes));
            END IF;
            v_prevs[i] := v_hash;
            v_seq := v_seq + 1;
            v_hash := sha256(v_prevs[i] || v_run_b || int8send(v_seq) || v_tenant_b
                             || convert_to(p_types[i], 'UTF8') || '\x00'::bytea
                             || convert_to(coalesce(p_step_keys[i], ''), 'UTF8') || '\x00'::bytea
                             || v_now_us || v_bytes);
            v_hashes[i] := v_hash;
            o_seq := v_seq;
            o_hash := v_hash;
            RETURN NEXT;
        END LOOP;
        INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, step_key, payload,
                                   prev_hash, hash, created_at, dedupe)
        SELECT p_run, v_head + u.i, v_tenant, p_types[u.i], p_step_keys[u.i], p_payloads[u.i],
               u.prev, u.hash, v_now, false
          FROM unnest(v_prevs, v_hashes) WITH ORDINALITY AS u(prev, hash, i)
        ON CONFLICT (run_id, seq) DO NOTHING;
        GET DIAGNOSTICS v_stored = ROW_COUNT;
        IF v_stored <> v_seq - v_head THEN
            SELECT min(e.seq) INTO v_stray FROM pgcrew.events e
             WHERE e.run_id = p_run AND e.seq > v_head AND e.seq <= v_seq
               AND e.hash IS DISTINCT FROM v_hashes[e.seq - v_head];
            RAISE EXCEPTION 'the ledger of run % already has an event at seq %, beyond its recorded head (seq %): it was written outside pgcrew.append_events; check it with pgcrew run verify-ledger',
                p_run, v_stray, v_head USING ERRCODE = 'PC004';
        END IF;
        v_first := v_head + 1;
    ELSE
        -- One event, or a batch with idempotent events (each lookup must see the events before
        -- it): one INSERT an event, as in V015.
        FOR i IN 1 .. coalesce(array_length(p_types, 1), 0) LOOP
            IF p_dedupe[i] THEN
                IF coalesce(octet_length(p_types[i]) NOT BETWEEN 1 AND 128, true)
                   OR octet_length(p_step_keys[i]) > 512 THEN
                    PERFORM pgcrew.refuse_event_input(p_types[i], p_step_keys[i], 0);
                END IF;
                SELECT e.seq, e.hash, e.created_at INTO o_seq, o_hash, o_created_at
                  FROM pgcrew.events e
                 WHERE e.run_id = p_run AND e.dedupe AND e.event_type = p_types[i]
                   AND coalesce(e.step_key, '') = coalesce(p_step_keys[i], '');
                IF FOUND THEN
                    o_inserted := false;
                    RETURN NEXT;
                    CONTINUE;
                END IF;
            END IF;
            v_bytes := convert_to(p_payloads[i]::text, 'UTF8');
            IF coalesce(octet_length(p_types[i]) NOT BETWEEN 1 AND 128, true)
               OR octet_length(p_step_keys[i]) > 512
               OR coalesce(octet_length(v_bytes) > 1048576, true) THEN
                PERFORM pgcrew.refuse_event_input(p_types[i], p_step_keys[i], octet_length(v_bytes));
            END IF;
            v_prev := v_hash;
            v_seq := v_seq + 1;
            v_hash := sha256(v_prev
                             || CASE WHEN v_format = 1 THEN '\x'::bytea ELSE uuid_send(p_run) END
                             || int8send(v_seq) || convert_to(v_tenant, 'UTF8') || '\x00'::bytea
                             || convert_to(p_types[i], 'UTF8') || '\x00'::bytea
                             || convert_to(coalesce(p_step_keys[i], ''), 'UTF8') || '\x00'::bytea
                             || int8send((extract(epoch FROM v_now) * 1000000)::int8) || v_bytes);
            INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, step_key, payload,
                                       prev_hash, hash, created_at, dedupe)
            VALUES (p_run, v_seq, v_tenant, p_types[i], p_step_keys[i], p_payloads[i],
                    v_prev, v_hash, v_now, coalesce(p_dedupe[i], false))
            ON CONFLICT (run_id, seq) DO NOTHING;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'the ledger of run % already has an event at seq %, beyond its recorded head (seq %): it was written outside pgcrew.append_events; check it with pgcrew run verify-ledger',
                    p_run, v_seq, v_seq - 1 USING ERRCODE = 'PC004';
            END IF;
            IF v_first IS NULL THEN
                v_first := v_seq;
            END IF;
            o_seq := v_seq;
            o_hash := v_hash;
            o_created_at := v_now;
            o_inserted := true;
            RETURN NEXT;
        END LOOP;
    END IF;
    IF v_first IS NOT NULL THEN
        v_ignore := set_config('pgcrew.ledger_writer', 'append', true);
        UPDATE pgcrew.runs SET ledger_head_seq = v_seq, ledger_head_hash = v_hash WHERE id = p_run;
        v_ignore := set_config('pgcrew.ledger_writer', '', true);
        v_done := coalesce(current_setting('pgcrew.notified_runs', true), '');
        IF position(p_run::text IN v_done) = 0 THEN
            PERFORM pg_notify('pgcrew_run_event',
                              json_build_object('run_id', p_run, 'seq', v_first)::text),
                    set_config('pgcrew.notified_runs', v_done || p_run::text || ',', true);
        END IF;
    END IF;
END $$;
