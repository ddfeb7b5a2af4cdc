-- pgcrew V053: starting a run counts the tenant's runs in flight only when the tenant has a
-- run limit (issue #23).
--
-- pgcrew.start_run_fenced (V040) counted the tenant's running and waiting runs at every start
-- of a pending run, limit or none, under the tenant's admission lock (`tenant_runs`). The
-- count walks the runs index's entries for those states, live and dead, so it grows with the
-- tenant's churn: pg_stat_statements with nested statements, `pgcrew bench agents --runs 3000
-- --instances 1`: 1.59 ms of execution and 0.15 ms of planning per start (3,009 plans in
-- 3,000 calls), while every other start of the tenant waited for the lock (3.2 ms mean).
--
-- Now the limit is read first, under the same lock as before; without one nothing is counted.
-- Under a limit the runs are counted up to it (a start is refused at `limit` runs in flight),
-- and exactly, for the refusal's message and DETAIL, only when the start is refused. Same
-- arguments, result, errors and lock order.
-- Test: runs::admission::starts_count_runs_in_flight_only_under_a_limit.

CREATE OR REPLACE FUNCTION pgcrew.start_run_fenced(p_run uuid, p_lease_token bigint, p_instance text,
                                        p_details jsonb)
RETURNS SETOF pgcrew.runs
LANGUAGE plpgsql AS $$
DECLARE
    v_state   text;
    v_tenant  text;
    r         pgcrew.runs;
    v_running bigint;
    v_limit   integer;
    v_seq     bigint;
    v_hash    bytea;
    v_out     pgcrew.runs;
BEGIN
    -- Admission: serialise per tenant (tenant lock before run lock, always), pending runs only.
    SELECT x.state, x.tenant_id INTO v_state, v_tenant FROM pgcrew.runs x WHERE x.id = p_run;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'PC002';
    END IF;
    IF v_state = 'pending' THEN
        PERFORM pg_advisory_xact_lock(pgcrew.lock_key('tenant_runs', v_tenant));
    END IF;
    SELECT * INTO r FROM pgcrew.locked_run(p_run);
    IF r.id IS NULL THEN
        RAISE EXCEPTION 'run % not found', p_run USING ERRCODE = 'PC002';
    END IF;
    IF r.state NOT IN ('pending', 'waiting') THEN
        RAISE EXCEPTION 'illegal run state transition for %: % -> running', p_run, r.state
            USING ERRCODE = 'PC006', DETAIL = r.state;
    END IF;
    IF p_lease_token IS NOT NULL
       AND (r.lease_token <> p_lease_token OR r.lease_owner IS NULL
            OR r.lease_expires_at IS NULL OR r.lease_expires_at <= now()) THEN
        RAISE EXCEPTION 'run %: lease token % is no longer held (current token %, owner %)',
            p_run, p_lease_token, r.lease_token, coalesce(r.lease_owner, 'none')
            USING ERRCODE = 'PC001';
    END IF;
    IF r.state = 'pending' THEN
        -- As runs/count_running: sub-agent runs run in their parent's slot. The tenant's runs
        -- in flight are counted only under a limit, and only up to it; exactly when refused.
        SELECT t.max_concurrent_runs INTO v_limit FROM pgcrew.tenants t
         WHERE t.id = r.tenant_id AND r.parent_relation IS DISTINCT FROM 'subagent';
        IF v_limit IS NOT NULL THEN
            SELECT count(*) INTO v_running
              FROM (SELECT 1 FROM pgcrew.runs x
                     WHERE x.tenant_id = r.tenant_id AND x.state IN ('running', 'waiting')
                       AND x.parent_relation IS DISTINCT FROM 'subagent'
                     LIMIT v_limit) s;
            IF v_running >= v_limit THEN
                SELECT count(*) INTO v_running FROM pgcrew.runs x
                 WHERE x.tenant_id = r.tenant_id AND x.state IN ('running', 'waiting')
                   AND x.parent_relation IS DISTINCT FROM 'subagent';
                RAISE EXCEPTION 'tenant %: % of % concurrent runs; run % stays pending',
                    r.tenant_id, v_running, v_limit, p_run
                    USING ERRCODE = 'PC180',
                          DETAIL = v_running || ',' || v_limit || ',' || r.tenant_id;
            END IF;
        END IF;
    END IF;
    SELECT i.o_seq, i.o_hash INTO v_seq, v_hash
      FROM pgcrew.ledger_insert(r,
               CASE r.state WHEN 'waiting' THEN 'run_resumed' ELSE 'run_started' END,
               NULL,
               coalesce(p_details, '{}'::jsonb)
                   || jsonb_build_object('from', r.state, 'to', 'running')) i;
    PERFORM set_config('pgcrew.ledger_writer', 'append', true);
    UPDATE pgcrew.runs x
       SET state = 'running',
           instance_id = coalesce(p_instance, x.instance_id),
           started_at = coalesce(x.started_at, now()),
           ledger_head_seq = v_seq,
           ledger_head_hash = v_hash,
           updated_at = now()
     WHERE x.id = p_run
    RETURNING x.* INTO v_out;
    PERFORM set_config('pgcrew.ledger_writer', '', true);
    RETURN NEXT v_out;
END $$;
