-- pgcrew V024: fewer round trips and commits on the path of a resumed run (issue #18, benchmark
-- line "signalling 10,000 waiting runs completes them at >= 1,000 runs/s").
--
-- A resumed run used to cost its worker about 11 statements and 3 commits besides the claim and
-- the acknowledgement (both batched): take the lease, read the run, read it again and move it
-- back to running with `run_resumed` (begin, read, lock, read for update, append, update, read,
-- commit), read the wait step's events, resolve the wait step, then complete the run (begin,
-- lock, read for update, append, update, sign, read, commit). This migration adds:
--
--  * pgcrew.resume_run(run, lease token, instance[, tenant]): `waiting → running` with `run_resumed`
--    {instance_id, from, to} appended through pgcrew.append_event, under the run's lock and the
--    caller's lease (PC001), in one statement; it returns the run row (unchanged when the run is
--    not waiting, no row for an unknown run). The library's runs::resume_run (the workflow
--    kernel, the agent runtime) calls it instead of the generic transition;
--  * pgcrew.locked_run(run): the run's lock, then its row FOR UPDATE, in one statement (was two);
--    every transition starts with it;
--  * pgcrew.wait_step answers a replay itself: a step whose `signal_received` or
--    `wait_timed_out` is recorded returns it (outcome 'signal' with the recorded payload, or
--    'timeout') before any state check, as the library did with a read of the step's events
--    before calling it. Otherwise it is V020's function.

-- ---------------------------------------------------------------------------------------------
-- The run's lock, then its row locked for update (a new snapshot after the lock, as the
-- function's second statement). No row: no such run.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION pgcrew.locked_run(p_run uuid) RETURNS SETOF pgcrew.runs
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(k.lock_key) FROM pgcrew.runs k WHERE k.id = p_run;
    RETURN QUERY SELECT * FROM pgcrew.runs r WHERE r.id = p_run FOR UPDATE;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Resume a waiting run (`waiting → running`, `run_resumed`), as the worker that picked up its
-- woken task does before replaying it. A run in another state is returned as it is (the caller
-- decides: running is already resumed, pending must be started, a finished run is an illegal
-- transition). With p_lease_token the caller must hold the run's lease (PC001). With p_tenant, a
-- run of another tenant is not found (no row, nothing changed). No admission: a waiting run
-- counts towards its tenant's max_concurrent_runs while it waits.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION pgcrew.resume_run(p_run uuid, p_lease_token bigint, p_instance text,
                                  p_tenant text DEFAULT NULL)
RETURNS SETOF pgcrew.runs
LANGUAGE plpgsql AS $$
DECLARE
    r pgcrew.runs;
BEGIN
    SELECT * INTO r FROM pgcrew.locked_run(p_run);
    IF r.id IS NULL OR r.tenant_id <> coalesce(p_tenant, r.tenant_id) THEN
        RETURN;
    END IF;
    IF r.state <> 'waiting' THEN
        RETURN NEXT r;
        RETURN;
    END IF;
    IF p_lease_token IS NOT NULL
       AND (r.lease_token <> p_lease_token OR r.lease_owner IS NULL
            OR r.lease_expires_at IS NULL OR r.lease_expires_at <= now()) THEN
        RAISE EXCEPTION 'run %: lease token % is no longer held (current token %, owner %)',
            p_run, p_lease_token, r.lease_token, coalesce(r.lease_owner, 'none')
            USING ERRCODE = 'PC001';
    END IF;
    -- Record first, then move the run (as every transition does).
    PERFORM pgcrew.append_event(p_run, p_lease_token, 'run_resumed', NULL,
        jsonb_build_object('instance_id', p_instance, 'from', 'waiting', 'to', 'running'), false);
    RETURN QUERY
    UPDATE pgcrew.runs x
       SET state = 'running',
           instance_id = coalesce(p_instance, x.instance_id),
           started_at = coalesce(x.started_at, now()),
           updated_at = now()
     WHERE x.id = p_run
    RETURNING x.*;
END $$;

-- ---------------------------------------------------------------------------------------------
-- V020's wait step, answering replays of a resolved step from the ledger first.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgcrew.wait_step(p_run uuid, p_lease_token bigint, p_name text, p_step_key text,
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
