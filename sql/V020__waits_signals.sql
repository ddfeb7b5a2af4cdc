-- pgcrew V020 (issue #18, items 3 and 4): durable waits, signals and approvals of tool calls.
--
-- A run can wait for a named signal (or sleep until a deadline) without holding a worker slot, a
-- run lease or a connection: the run goes to the new state `waiting`, the wait is one row of
-- pgcrew.run_waits, and the run's task is parked (scheduled until the wait's deadline; its
-- attempt given back, as a snooze does). A signal (pgcrew.signal_run) is stored in
-- pgcrew.run_signals and makes the parked task available at once, so any instance working the
-- task's queue resumes the run; a signal that arrives before the run reaches its wait is kept
-- and consumed by that wait. Run states now:
--
--   pending → running | failed | cancelled
--   running → waiting | completed | failed | cancelled
--   waiting → running | failed | cancelled
--
-- SQLSTATEs: PC002 unknown run, PC041 finished run (DETAIL = its state), PC050 the run waits for
-- another signal, PC051 the step is not waiting for approval (or was already decided), PC052 the
-- run waits at another step than the one resolving it, 55000 the run has not started, 22023 /
-- 22004 bad arguments, PC040 a payload over 1 MiB.

-- ---------------------------------------------------------------------------------------------
-- The run row's checks (V015) with the `waiting` state and its transitions.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgcrew.check_run_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_constraint text;
    v_column     text;
    v_value      text;
    v_rule       text;
BEGIN
    -- Each rule holds when it is true or NULL, as a CHECK constraint does.
    IF NOT coalesce(NEW.state IN ('pending', 'running', 'waiting', 'completed', 'failed', 'cancelled'), true) THEN
        v_constraint := 'runs_state_check'; v_column := 'state'; v_value := NEW.state;
        v_rule := 'one of pending, running, waiting, completed, failed, cancelled';
    ELSIF NOT coalesce(NEW.ledger_format IN (1, 2), true) THEN
        v_constraint := 'runs_ledger_format_check'; v_column := 'ledger_format';
        v_value := NEW.ledger_format::text; v_rule := '1 or 2';
    ELSIF NOT coalesce(NEW.cost_usd >= 0 AND NEW.cost_usd < 'Infinity'::numeric, true) THEN
        v_constraint := 'runs_cost_usd_valid'; v_column := 'cost_usd';
        v_value := NEW.cost_usd::text; v_rule := 'a finite USD amount >= 0';
    ELSIF NOT coalesce(NEW.budget_usd_limit >= 0 AND NEW.budget_usd_limit < 'Infinity'::numeric, true) THEN
        v_constraint := 'runs_budget_usd_limit_valid'; v_column := 'budget_usd_limit';
        v_value := NEW.budget_usd_limit::text; v_rule := 'a finite USD amount >= 0';
    ELSIF NOT coalesce(NEW.budget_spent_usd >= 0 AND NEW.budget_spent_usd < 'Infinity'::numeric, true) THEN
        v_constraint := 'runs_budget_spent_usd_valid'; v_column := 'budget_spent_usd';
        v_value := NEW.budget_spent_usd::text; v_rule := 'a finite USD amount >= 0';
    ELSIF NOT coalesce(NEW.budget_reserved_usd >= 0 AND NEW.budget_reserved_usd < 'Infinity'::numeric, true) THEN
        v_constraint := 'runs_budget_reserved_usd_valid'; v_column := 'budget_reserved_usd';
        v_value := NEW.budget_reserved_usd::text; v_rule := 'a finite USD amount >= 0';
    ELSIF NOT coalesce(NEW.input_tokens >= 0, true) THEN
        v_constraint := 'runs_input_tokens_valid'; v_column := 'input_tokens';
        v_value := NEW.input_tokens::text; v_rule := 'a token count >= 0';
    ELSIF NOT coalesce(NEW.output_tokens >= 0, true) THEN
        v_constraint := 'runs_output_tokens_valid'; v_column := 'output_tokens';
        v_value := NEW.output_tokens::text; v_rule := 'a token count >= 0';
    ELSIF TG_OP = 'INSERT' OR OLD.state = NEW.state
          OR (OLD.state = 'pending' AND NEW.state IN ('running', 'failed', 'cancelled'))
          OR (OLD.state = 'running' AND NEW.state IN ('waiting', 'completed', 'failed', 'cancelled'))
          OR (OLD.state = 'waiting' AND NEW.state IN ('running', 'failed', 'cancelled')) THEN
        RETURN NEW;
    ELSE
        -- Terminal states are final.
        RAISE EXCEPTION 'illegal run state transition for %: % -> %', OLD.id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation', HINT = 'pgcrew_illegal_transition';
    END IF;
    RAISE EXCEPTION 'new row for relation "runs" violates check constraint "%": % must be %, got %',
        v_constraint, v_column, v_rule, v_value
        USING ERRCODE = 'check_violation', CONSTRAINT = v_constraint, SCHEMA = 'pgcrew',
              TABLE = 'runs', COLUMN = v_column,
              DETAIL = format('run %s', NEW.id);
END $$;
REVOKE ALL ON FUNCTION pgcrew.check_run_row() FROM PUBLIC;

-- Leases (V008) can be taken on waiting runs too: the worker that resumes a run takes its lease
-- first, then moves it back to running.
CREATE OR REPLACE FUNCTION pgcrew.acquire_run_lease(p_run uuid, p_owner text, p_ttl_us bigint)
RETURNS TABLE (o_token bigint, o_expires_at timestamptz, o_state text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(r.lock_key) FROM pgcrew.runs r WHERE r.id = p_run;
    RETURN QUERY
    UPDATE pgcrew.runs r
       SET lease_token = CASE
               WHEN r.lease_owner = p_owner AND r.lease_expires_at > now() THEN r.lease_token
               ELSE r.lease_token + 1 END,
           lease_owner = p_owner,
           lease_expires_at = now() + p_ttl_us * interval '1 microsecond',
           updated_at = now()
     WHERE r.id = p_run
       AND r.state IN ('pending', 'running', 'waiting')
       AND (r.lease_owner IS NULL OR r.lease_expires_at IS NULL OR r.lease_expires_at <= now()
            OR r.lease_owner = p_owner)
    RETURNING r.lease_token, r.lease_expires_at, r.state;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Waits and signals.
-- ---------------------------------------------------------------------------------------------
-- The wait a run is in (at most one): the signal name it waits for, the step waiting, the
-- deadline (database time) and the task parked until then.
CREATE TABLE pgcrew.run_waits (
    run_id     uuid PRIMARY KEY REFERENCES pgcrew.runs (id) ON DELETE CASCADE,
    tenant_id  text NOT NULL REFERENCES pgcrew.tenants (id),
    name       text NOT NULL,
    step_key   text NOT NULL,
    deadline   timestamptz NOT NULL,
    task_id    bigint,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Signals sent to runs, kept until a wait consumes them (and afterwards, as a record).
CREATE TABLE pgcrew.run_signals (
    id               bigserial PRIMARY KEY,
    run_id           uuid NOT NULL REFERENCES pgcrew.runs (id) ON DELETE CASCADE,
    tenant_id        text NOT NULL REFERENCES pgcrew.tenants (id),
    name             text NOT NULL,
    payload          jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    consumed_at      timestamptz,
    consumed_by_step text
);
CREATE INDEX run_signals_unconsumed_idx ON pgcrew.run_signals (run_id, name, id)
    WHERE consumed_at IS NULL;

ALTER TABLE pgcrew.run_waits ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON pgcrew.run_waits
    USING (tenant_id = (SELECT pgcrew.current_tenant()))
    WITH CHECK (tenant_id = (SELECT pgcrew.current_tenant()));
ALTER TABLE pgcrew.run_signals ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON pgcrew.run_signals
    USING (tenant_id = (SELECT pgcrew.current_tenant()))
    WITH CHECK (tenant_id = (SELECT pgcrew.current_tenant()));

-- A signal name: 1 to 256 bytes, no control characters (22023 otherwise).
CREATE FUNCTION pgcrew.check_signal_name(p_name text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_name IS NULL THEN
        RAISE EXCEPTION 'a signal name is required' USING ERRCODE = '22004';
    END IF;
    IF octet_length(p_name) NOT BETWEEN 1 AND 256 OR p_name ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'signal name % must be 1 to 256 bytes without control characters',
            quote_literal(left(p_name, 64)) USING ERRCODE = '22023';
    END IF;
END $$;

-- Lock a run (its ledger lock) and return its state; PC002 when it does not exist.
CREATE FUNCTION pgcrew.lock_run_state(p_run uuid) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
BEGIN
    PERFORM pg_advisory_xact_lock(r.lock_key) FROM pgcrew.runs r WHERE r.id = p_run;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'PC002';
    END IF;
    SELECT r.state INTO v_state FROM pgcrew.runs r WHERE r.id = p_run;
    RETURN v_state;
END $$;

-- One wait step of a run, called by the worker executing it (with its lease token) each time
-- the run reaches the step (the first time, and on every resume until it resolves):
--  * an unconsumed signal named p_name: consume the oldest, end the wait, record
--    `signal_received` {name, signal_id, payload} and return ('signal', payload);
--  * the wait's deadline passed: end the wait, record `wait_timed_out` {name, deadline} and
--    return ('timeout', NULL);
--  * otherwise: begin the wait (the first time: record `wait_started` {name, timeout_ms,
--    deadline, details}), move the run to `waiting`, release its lease, park its running task
--    until the deadline (attempt given back) and return ('waiting', NULL, deadline).
--  * a replay of a step already resolved (its `signal_received` or `wait_timed_out` recorded):
--    return that outcome first, before any state check;
-- A resolved wait moves a waiting run back to running. The caller stops working on the run when
-- the outcome is 'waiting'.
CREATE FUNCTION pgcrew.wait_step(p_run uuid, p_lease_token bigint, p_name text, p_step_key text,
                                 p_timeout_us bigint, p_details jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (o_outcome text, o_payload jsonb, o_deadline timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_state  text;
    v_tenant text;
    v_wait   pgcrew.run_waits;
    v_sig    record;
    v_task   bigint;
    v_done   record;
BEGIN
    PERFORM pgcrew.check_signal_name(p_name);
    IF p_step_key IS NULL OR p_step_key = '' THEN
        RAISE EXCEPTION 'a wait needs a step key' USING ERRCODE = '22023';
    END IF;
    -- 0 .. 3650 days, as the queue's longest delay.
    IF p_timeout_us IS NULL OR p_timeout_us < 0 OR p_timeout_us > 315360000000000 THEN
        RAISE EXCEPTION 'a wait''s timeout must be between 0 and 3650 days, got % microseconds',
            p_timeout_us USING ERRCODE = '22023';
    END IF;
    -- A replay of a resolved step returns its recorded outcome (no lock, no state check).
    SELECT e.event_type, e.payload INTO v_done
      FROM pgcrew.events e
     WHERE e.run_id = p_run AND e.step_key = p_step_key
       AND e.event_type IN ('signal_received', 'wait_timed_out')
     ORDER BY e.seq LIMIT 1;
    IF FOUND THEN
        IF v_done.event_type = 'signal_received' THEN
            RETURN QUERY SELECT 'signal'::text, v_done.payload -> 'payload', NULL::timestamptz;
        ELSE
            RETURN QUERY SELECT 'timeout'::text, NULL::jsonb, NULL::timestamptz;
        END IF;
        RETURN;
    END IF;
    v_state := pgcrew.lock_run_state(p_run);
    IF v_state IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'run % is %: it cannot wait', p_run, v_state
            USING ERRCODE = 'PC041', DETAIL = v_state;
    END IF;
    IF v_state = 'pending' THEN
        RAISE EXCEPTION 'run % is pending: start it before it waits', p_run USING ERRCODE = '55000';
    END IF;
    SELECT r.tenant_id INTO v_tenant FROM pgcrew.runs r WHERE r.id = p_run;
    SELECT * INTO v_wait FROM pgcrew.run_waits w WHERE w.run_id = p_run;
    IF FOUND AND (v_wait.step_key <> p_step_key OR v_wait.name <> p_name) THEN
        RAISE EXCEPTION 'run % waits at step % for signal %, not at step % for signal %: the code that resumed it took another path',
            p_run, v_wait.step_key, v_wait.name, p_step_key, p_name USING ERRCODE = 'PC052';
    END IF;
    SELECT s.id, s.payload INTO v_sig
      FROM pgcrew.run_signals s
     WHERE s.run_id = p_run AND s.name = p_name AND s.consumed_at IS NULL
     ORDER BY s.id LIMIT 1;
    IF FOUND THEN
        PERFORM pgcrew.append_events(p_run, p_lease_token, ARRAY['signal_received'],
            ARRAY[p_step_key],
            ARRAY[jsonb_build_object('name', p_name, 'signal_id', v_sig.id, 'payload', v_sig.payload)],
            ARRAY[false]);
        UPDATE pgcrew.run_signals SET consumed_at = now(), consumed_by_step = p_step_key
         WHERE id = v_sig.id;
        DELETE FROM pgcrew.run_waits WHERE run_id = p_run;
        IF v_state = 'waiting' THEN
            UPDATE pgcrew.runs SET state = 'running', updated_at = now() WHERE id = p_run;
        END IF;
        RETURN QUERY SELECT 'signal'::text, v_sig.payload, NULL::timestamptz;
        RETURN;
    END IF;
    IF v_wait.run_id IS NOT NULL AND v_wait.deadline <= now() THEN
        PERFORM pgcrew.append_events(p_run, p_lease_token, ARRAY['wait_timed_out'],
            ARRAY[p_step_key],
            ARRAY[jsonb_build_object('name', p_name, 'deadline', v_wait.deadline)],
            ARRAY[false]);
        DELETE FROM pgcrew.run_waits WHERE run_id = p_run;
        IF v_state = 'waiting' THEN
            UPDATE pgcrew.runs SET state = 'running', updated_at = now() WHERE id = p_run;
        END IF;
        RETURN QUERY SELECT 'timeout'::text, NULL::jsonb, v_wait.deadline;
        RETURN;
    END IF;
    IF v_wait.run_id IS NULL THEN
        INSERT INTO pgcrew.run_waits (run_id, tenant_id, name, step_key, deadline)
        VALUES (p_run, v_tenant, p_name, p_step_key, now() + p_timeout_us * interval '1 microsecond')
        RETURNING * INTO v_wait;
        PERFORM pgcrew.append_events(p_run, p_lease_token, ARRAY['wait_started'],
            ARRAY[p_step_key],
            ARRAY[jsonb_build_object('name', p_name, 'timeout_ms', p_timeout_us / 1000,
                                     'deadline', v_wait.deadline,
                                     'details', coalesce(p_details, '{}'::jsonb))],
            ARRAY[false]);
    ELSIF p_lease_token IS NOT NULL
          AND NOT EXISTS (SELECT FROM pgcrew.runs r
                           WHERE r.id = p_run AND r.lease_token = p_lease_token
                             AND r.lease_owner IS NOT NULL AND r.lease_expires_at > now()) THEN
        -- Still fenced: a worker whose lease was taken over does not park the run.
        RAISE EXCEPTION 'the lease on run % with token % is no longer held', p_run, p_lease_token
            USING ERRCODE = 'PC001';
    END IF;
    UPDATE pgcrew.runs
       SET state = 'waiting', lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
     WHERE id = p_run;
    -- Park the run's running task (the earliest claimed, should the run have several) until the
    -- deadline, giving its attempt back (as a snooze). The worker's own acknowledgement of it
    -- then finds it no longer running and changes nothing.
    UPDATE pgcrew.tasks t
       SET state = 'scheduled', run_at = v_wait.deadline, attempts = greatest(0, t.attempts - 1),
           claim_token = NULL, heartbeat_at = NULL
     WHERE t.id = (SELECT r.id FROM pgcrew.tasks r
                    WHERE r.run_id = p_run AND r.state = 'running'
                    ORDER BY r.claimed_at, r.id LIMIT 1)
    RETURNING t.id INTO v_task;
    IF v_task IS NOT NULL THEN
        UPDATE pgcrew.run_waits SET task_id = v_task WHERE run_id = p_run;
    ELSIF v_wait.task_id IS NOT NULL THEN
        -- Resumed by hand (not by its task): the parked task stays parked until the deadline.
        UPDATE pgcrew.tasks t SET run_at = v_wait.deadline
         WHERE t.id = v_wait.task_id AND t.state IN ('scheduled', 'available');
    END IF;
    RETURN QUERY SELECT 'waiting'::text, NULL::jsonb, v_wait.deadline;
END $$;

-- Make a waiting run's parked task available now and wake the pools of its queue.
CREATE FUNCTION pgcrew.wake_waiting_task(p_task bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_queue text;
BEGIN
    UPDATE pgcrew.tasks t SET state = 'available', run_at = now()
     WHERE t.id = p_task AND t.state = 'scheduled'
    RETURNING t.queue INTO v_queue;
    -- As pgcrew.wake_queues(ARRAY[v_queue]), inline (V007).
    IF v_queue IS NOT NULL
       AND EXISTS (SELECT FROM pgcrew.queue_waiters w WHERE w.queue = v_queue) THEN
        PERFORM pg_notify('pgcrew_task_available', json_build_object('queue', v_queue)::text);
    END IF;
END $$;

-- Send signal p_name (with an optional JSON payload) to a run; returns the signal's id.
-- Refused: unknown run (PC002), finished run (PC041, DETAIL = its state), a run that waits for
-- another signal (PC050), a bad name (22004 / 22023), a payload over 1 MiB (PC040). A run that
-- is not waiting yet (pending, running) keeps the signal for its next wait on that name; a run
-- waiting for it is woken at once: its parked task becomes available to any instance.
CREATE FUNCTION pgcrew.signal_run(p_run uuid, p_name text, p_payload jsonb DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_state  text;
    v_tenant text;
    v_wait   pgcrew.run_waits;
    v_len    bigint;
    v_id     bigint;
BEGIN
    IF p_run IS NULL THEN
        RAISE EXCEPTION 'a run id is required' USING ERRCODE = '22004';
    END IF;
    PERFORM pgcrew.check_signal_name(p_name);
    v_len := octet_length(p_payload::text);
    IF v_len > 1048576 THEN
        PERFORM pgcrew.refuse_too_large('signal payload', v_len, 1048576);
    END IF;
    v_state := pgcrew.lock_run_state(p_run);
    IF v_state IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'run % is %: it takes no more signals', p_run, v_state
            USING ERRCODE = 'PC041', DETAIL = v_state;
    END IF;
    SELECT * INTO v_wait FROM pgcrew.run_waits w WHERE w.run_id = p_run;
    IF v_state = 'waiting' AND FOUND AND v_wait.name <> p_name THEN
        RAISE EXCEPTION 'run % is waiting for signal %, not %', p_run, quote_literal(v_wait.name),
            quote_literal(p_name) USING ERRCODE = 'PC050', DETAIL = v_wait.name;
    END IF;
    SELECT r.tenant_id INTO v_tenant FROM pgcrew.runs r WHERE r.id = p_run;
    INSERT INTO pgcrew.run_signals (run_id, tenant_id, name, payload)
    VALUES (p_run, v_tenant, p_name, p_payload)
    RETURNING id INTO v_id;
    IF v_wait.task_id IS NOT NULL AND v_wait.name = p_name THEN
        PERFORM pgcrew.wake_waiting_task(v_wait.task_id);
    END IF;
    RETURN v_id;
END $$;

-- Approve or reject the tool call of step p_step of a run that waits for its approval (signal
-- `approval/<step>`); p_by names who decided (default: the session user), p_reason is optional.
-- Returns the signal's id. Refused: unknown run (PC002), finished run (PC041), a step not waiting
-- for approval or already decided (PC051), a NULL decision (22004).
CREATE FUNCTION pgcrew.decide_approval(p_run uuid, p_step text, p_approved boolean,
                                       p_by text DEFAULT NULL, p_reason text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
    v_name  text;
BEGIN
    IF p_run IS NULL OR p_step IS NULL OR p_approved IS NULL THEN
        RAISE EXCEPTION 'a run, a step and a decision are required' USING ERRCODE = '22004';
    END IF;
    v_name := 'approval/' || p_step;
    PERFORM pgcrew.check_signal_name(v_name);
    v_state := pgcrew.lock_run_state(p_run);
    IF v_state IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'run % is %: it takes no more decisions', p_run, v_state
            USING ERRCODE = 'PC041', DETAIL = v_state;
    END IF;
    IF NOT EXISTS (SELECT FROM pgcrew.run_waits w WHERE w.run_id = p_run AND w.name = v_name) THEN
        RAISE EXCEPTION 'step % of run % is not waiting for approval', quote_literal(p_step), p_run
            USING ERRCODE = 'PC051';
    END IF;
    IF EXISTS (SELECT FROM pgcrew.run_signals s
                WHERE s.run_id = p_run AND s.name = v_name AND s.consumed_at IS NULL) THEN
        RAISE EXCEPTION 'step % of run % is already decided', quote_literal(p_step), p_run
            USING ERRCODE = 'PC051';
    END IF;
    RETURN pgcrew.signal_run(p_run, v_name, jsonb_build_object(
        'decision', CASE WHEN p_approved THEN 'approved' ELSE 'rejected' END,
        'by', coalesce(nullif(btrim(p_by), ''), session_user::text),
        'reason', p_reason));
END $$;

-- Functions: nothing for PUBLIC (as V010).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgcrew FROM PUBLIC;
