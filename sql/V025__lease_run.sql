-- pgcrew V025: take a run and resume it in one statement (issue #18, benchmark line "signalling
-- 10,000 waiting runs completes them at >= 1,000 runs/s").
--
-- A worker that picks up a woken run's task used to pay three transactions before the run's own
-- code went on: the lease (pgcrew.acquire_run_lease), a read of the run, and the wait step's
-- resolution (pgcrew.wait_step: the signal consumed, `signal_received` recorded, the run back to
-- running). With fsync on every commit waits for its WAL flush, and the run row was updated
-- three times. pgcrew.lease_run does all of it in one statement and one commit:
--
--  * the run's lock, then its row for update;
--  * the lease taken as pgcrew.acquire_run_lease takes it (a live lease of another owner, or a
--    finished run: nothing changes, the row is returned as it is and the caller sees that the
--    lease is not its own);
--  * a waiting run whose wait has resolved — an unconsumed signal of the wait's name, or the
--    wait's deadline passed — is resumed the way pgcrew.wait_step resolves it: the signal is
--    consumed, `signal_received` {name, signal_id, payload} (or `wait_timed_out` {name,
--    deadline}) is recorded under the wait's step key with the new lease, the wait ends and the
--    run is running again on p_instance. The wait step, when the run's code reaches it again,
--    answers from the ledger (V020) without a transaction of its own. A waiting run whose wait
--    has not resolved (a task woken early) keeps waiting: its code reaches the wait step, which
--    parks it again.
--
-- The run row is written once (lease, state and ledger head in one UPDATE), through
-- pgcrew.ledger_insert, which links one event after the head of a run the caller has locked
-- and leaves the head to the caller's own update of the run row.
--
-- It returns the run row afterwards, no row for an unknown run. PUBLIC and tenant roles cannot
-- execute it (the migration runner revokes EXECUTE on pgcrew functions from PUBLIC).
-- ---------------------------------------------------------------------------------------------
-- Link one event after the ledger head of run r, which the caller has locked (its advisory lock
-- and row) and checked (lease, open ledger): the same size checks, hash (v1/v2 by the run's
-- ledger format), beyond-the-head check (PC004) and one NOTIFY per run and transaction as
-- pgcrew.append_event. The caller moves the head (ledger_head_seq, ledger_head_hash) to the
-- returned seq and hash in its own update of the run row, under pgcrew.ledger_writer = 'append'.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION pgcrew.ledger_insert(r pgcrew.runs, p_type text, p_step_key text, p_payload jsonb,
                                     OUT o_seq bigint, OUT o_hash bytea)
LANGUAGE plpgsql AS $$
DECLARE
    v_prev bytea;
    v_at   timestamptz := clock_timestamp();
    v_len  integer := octet_length(p_payload::text);
    v_done text;
BEGIN
    IF coalesce(octet_length(p_type) NOT BETWEEN 1 AND 128, true)
       OR octet_length(p_step_key) > 512 OR coalesce(v_len > 1048576, true) THEN
        PERFORM pgcrew.refuse_event_input(p_type, p_step_key, v_len);
    END IF;
    IF r.ledger_head_hash IS NULL THEN
        o_seq := 1;
        v_prev := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
    ELSE
        o_seq := r.ledger_head_seq + 1;
        v_prev := r.ledger_head_hash;
    END IF;
    o_hash := pgcrew.ledger_event_hash(r.ledger_format, v_prev, r.id, o_seq, r.tenant_id, p_type,
                                       p_step_key, v_at, p_payload);
    INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, step_key, payload,
                               prev_hash, hash, created_at, dedupe)
    VALUES (r.id, o_seq, r.tenant_id, p_type, p_step_key, p_payload, v_prev, o_hash, v_at, false)
    ON CONFLICT (run_id, seq) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the ledger of run % already has an event at seq %, beyond its recorded head (seq %): it was written outside pgcrew.append_events; check it with pgcrew run verify-ledger',
            r.id, o_seq, o_seq - 1 USING ERRCODE = 'PC004';
    END IF;
    v_done := coalesce(current_setting('pgcrew.notified_runs', true), '');
    IF position(r.id::text IN v_done) = 0 THEN
        PERFORM pg_notify('pgcrew_run_event', json_build_object('run_id', r.id, 'seq', o_seq)::text),
                set_config('pgcrew.notified_runs', v_done || r.id::text || ',', true);
    END IF;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Take a run's lease and resume it when its wait has resolved (see the top of this file).
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION pgcrew.lease_run(p_run uuid, p_owner text, p_ttl_us bigint,
                                 p_instance text DEFAULT NULL)
RETURNS SETOF pgcrew.runs
LANGUAGE plpgsql AS $$
DECLARE
    r      pgcrew.runs;
    v_wait pgcrew.run_waits;
    v_sig  record;
    v_type text;
    v_body jsonb;
    v_seq  bigint;
    v_hash bytea;
    v_out  pgcrew.runs;
BEGIN
    IF p_owner IS NULL OR p_ttl_us IS NULL OR p_ttl_us < 1000 THEN
        RAISE EXCEPTION 'a run lease needs an owner and a ttl of at least 1 ms' USING ERRCODE = '22023';
    END IF;
    SELECT * INTO r FROM pgcrew.locked_run(p_run);
    IF r.id IS NULL THEN
        RETURN;
    END IF;
    IF r.state NOT IN ('pending', 'running', 'waiting')
       OR (r.lease_owner <> p_owner AND coalesce(r.lease_expires_at > now(), false)) THEN
        RETURN NEXT r;
        RETURN;
    END IF;
    IF r.state = 'waiting' THEN
        SELECT * INTO v_wait FROM pgcrew.run_waits w WHERE w.run_id = p_run;
        IF FOUND THEN
            SELECT s.id, s.payload INTO v_sig
              FROM pgcrew.run_signals s
             WHERE s.run_id = p_run AND s.name = v_wait.name AND s.consumed_at IS NULL
             ORDER BY s.id LIMIT 1;
            IF FOUND THEN
                v_type := 'signal_received';
                v_body := jsonb_build_object('name', v_wait.name, 'signal_id', v_sig.id,
                                             'payload', v_sig.payload);
                UPDATE pgcrew.run_signals
                   SET consumed_at = now(), consumed_by_step = v_wait.step_key
                 WHERE id = v_sig.id;
            ELSIF v_wait.deadline <= now() THEN
                v_type := 'wait_timed_out';
                v_body := jsonb_build_object('name', v_wait.name, 'deadline', v_wait.deadline);
            END IF;
        END IF;
    END IF;
    IF v_type IS NOT NULL THEN
        -- Record first (the run is locked and about to be leased), then move it, in one update.
        SELECT i.o_seq, i.o_hash INTO v_seq, v_hash
          FROM pgcrew.ledger_insert(r, v_type, v_wait.step_key, v_body) i;
        DELETE FROM pgcrew.run_waits WHERE run_id = p_run;
    END IF;
    -- The head moves only to the event just linked (or stays): the ledger writer's update.
    PERFORM set_config('pgcrew.ledger_writer', 'append', true);
    UPDATE pgcrew.runs x
       SET lease_token = CASE
               WHEN x.lease_owner = p_owner AND x.lease_expires_at > now() THEN x.lease_token
               ELSE x.lease_token + 1 END,
           lease_owner = p_owner,
           lease_expires_at = now() + p_ttl_us * interval '1 microsecond',
           state = CASE WHEN v_type IS NULL THEN x.state ELSE 'running' END,
           instance_id = CASE WHEN v_type IS NULL THEN x.instance_id
                              ELSE coalesce(p_instance, x.instance_id) END,
           ledger_head_seq = coalesce(v_seq, x.ledger_head_seq),
           ledger_head_hash = coalesce(v_hash, x.ledger_head_hash),
           updated_at = now()
     WHERE x.id = p_run
    RETURNING x.* INTO v_out;
    PERFORM set_config('pgcrew.ledger_writer', '', true);
    RETURN NEXT v_out;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Finish a run (`completed`, `failed` or `cancelled`) in one statement: the run's lock and row,
-- the transition check (PC006, DETAIL = the run's state: pending and waiting runs can fail or be
-- cancelled, only a running run completes), the lease check when p_lease_token is given (PC001),
-- `run_completed` / `run_failed` / `run_cancelled` with p_details plus {from, to} linked to the
-- ledger, and one update of the run row with the outcome fields (as the library's state update:
-- tokens and cost added, the lease cleared, finalized_at set) and the new ledger head. PC002 for
-- an unknown run, 22023 for another target state. The caller signs the new head (the returned
-- row's ledger_head_seq and ledger_head_hash) in the same transaction.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION pgcrew.finish_run(p_run uuid, p_state text, p_lease_token bigint, p_details jsonb,
                                  p_instance text, p_response_text text, p_stop_reason text,
                                  p_input_tokens bigint, p_output_tokens bigint, p_cost_usd float8,
                                  p_error_type text, p_error_message text, p_cancel_reason text)
RETURNS SETOF pgcrew.runs
LANGUAGE plpgsql AS $$
DECLARE
    r      pgcrew.runs;
    v_seq  bigint;
    v_hash bytea;
    v_out  pgcrew.runs;
BEGIN
    IF p_state IS NULL OR p_state NOT IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'pgcrew.finish_run moves a run to completed, failed or cancelled, not %',
            coalesce(p_state, 'NULL') USING ERRCODE = '22023';
    END IF;
    SELECT * INTO r FROM pgcrew.locked_run(p_run);
    IF r.id IS NULL THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'PC002';
    END IF;
    IF NOT (r.state = 'running' OR (r.state IN ('pending', 'waiting') AND p_state <> 'completed')) THEN
        RAISE EXCEPTION 'illegal run state transition for %: % -> %', p_run, r.state, p_state
            USING ERRCODE = 'PC006', DETAIL = r.state;
    END IF;
    IF p_lease_token IS NOT NULL
       AND (r.lease_token <> p_lease_token OR r.lease_owner IS NULL
            OR r.lease_expires_at IS NULL OR r.lease_expires_at <= now()) THEN
        RAISE EXCEPTION 'run %: lease token % is no longer held (current token %, owner %)',
            p_run, p_lease_token, r.lease_token, coalesce(r.lease_owner, 'none')
            USING ERRCODE = 'PC001';
    END IF;
    SELECT i.o_seq, i.o_hash INTO v_seq, v_hash
      FROM pgcrew.ledger_insert(r,
               CASE p_state WHEN 'completed' THEN 'run_completed'
                            WHEN 'failed' THEN 'run_failed' ELSE 'run_cancelled' END,
               NULL,
               coalesce(p_details, '{}'::jsonb) || jsonb_build_object('from', r.state, 'to', p_state)) i;
    PERFORM set_config('pgcrew.ledger_writer', 'append', true);
    UPDATE pgcrew.runs x
       SET state = p_state,
           instance_id = coalesce(p_instance, x.instance_id),
           response_text = coalesce(p_response_text, x.response_text),
           stop_reason = coalesce(p_stop_reason, x.stop_reason),
           input_tokens = x.input_tokens + coalesce(p_input_tokens, 0),
           output_tokens = x.output_tokens + coalesce(p_output_tokens, 0),
           cost_usd = x.cost_usd + coalesce(p_cost_usd, 0)::numeric,
           error_type = coalesce(p_error_type, x.error_type),
           error_message = coalesce(p_error_message, x.error_message),
           cancel_reason = coalesce(p_cancel_reason, x.cancel_reason),
           cancel_requested_at = CASE WHEN p_state = 'cancelled' THEN now()
                                      ELSE x.cancel_requested_at END,
           finalized_at = now(),
           lease_owner = NULL,
           lease_expires_at = NULL,
           ledger_head_seq = v_seq,
           ledger_head_hash = v_hash,
           updated_at = now()
     WHERE x.id = p_run
    RETURNING x.* INTO v_out;
    PERFORM set_config('pgcrew.ledger_writer', '', true);
    RETURN NEXT v_out;
END $$;

