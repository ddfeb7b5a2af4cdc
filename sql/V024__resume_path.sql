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
--  * (pgcrew.wait_step answers a replay itself — V020's function, which returns a resolved
--    step's recorded outcome before any state check — so the library no longer reads the
--    step's events before calling it.)

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
