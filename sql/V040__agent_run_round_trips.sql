-- pgcrew V040: fewer round trips per agent run (issue #23: "≤ 12 database round trips for a
-- one-model-step run"; it took ~33).
--
-- Three statements replace transactions of several statements each; every guarantee stays
-- where it was (the run's lock and lease fence, the hash-chained ledger appends, the exact
-- reserve/settle arithmetic and its lock order: ledger lock, tenant row, run row).
--
--  * pgcrew.start_run_fenced: pending → running (or waiting → running) in one statement: the
--    tenant's admission lock for a pending run, the run's lock and row, the transition and lease
--    checks, the tenant's max_concurrent_runs (PC180 with DETAIL 'running,limit,tenant' when reached:
--    nothing is written), `run_started` / `run_resumed` linked to the ledger and one update of
--    the run row. It replaces BEGIN, get_run, lock_tenant, locked_run, count_running,
--    append_event, update_state, COMMIT.
--  * pgcrew.model_step_begin: a model step's start when nothing is recorded for the step and no
--    degradation rule of the tenant is active at its budget status (the request then runs as
--    asked): under the run's ledger lock, the tenant's and the run's budget checked and reserved
--    as tenancy/reserve_* do, the reservation inserted and `model_requested` appended with the
--    caller's lease token (pgcrew.append_event: PC001 when the lease is lost, and nothing is
--    reserved). Otherwise it writes nothing and returns what the kernel's slow path reads (the
--    step's events with the tenant's status and policy, as kernel/model_step_events), or the
--    refusing budget's figures.
--  * pgcrew.model_step_end: a model step's end when the settlement takes no budget past its
--    limit: under the run's ledger lock, a step recorded meanwhile releases the reservation;
--    otherwise the settlement (tenancy/settle's statement) and `model_completed` (idempotent,
--    under the lease). A settlement that would overrun a limit writes nothing here: the kernel
--    records it with `budget_overrun` in its own transaction, as before.
--
-- None is SECURITY DEFINER; PUBLIC and tenant roles cannot execute them (revoked below, as
-- after every migration creating functions).
-- ---------------------------------------------------------------------------------------------

CREATE FUNCTION pgcrew.start_run_fenced(p_run uuid, p_lease_token bigint, p_instance text,
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
        -- As runs/count_running: sub-agent runs run in their parent's slot.
        SELECT count(*) INTO v_running FROM pgcrew.runs x
         WHERE x.tenant_id = r.tenant_id AND x.state IN ('running', 'waiting')
           AND x.parent_relation IS DISTINCT FROM 'subagent';
        SELECT t.max_concurrent_runs INTO v_limit FROM pgcrew.tenants t
         WHERE t.id = r.tenant_id AND r.parent_relation IS DISTINCT FROM 'subagent';
        IF v_limit IS NOT NULL AND v_running >= v_limit THEN
            RAISE EXCEPTION 'tenant %: % of % concurrent runs; run % stays pending',
                r.tenant_id, v_running, v_limit, p_run
                USING ERRCODE = 'PC180', DETAIL = v_running || ',' || v_limit || ',' || r.tenant_id;
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

-- Whether the degradation policy p_policy has no rule active at budget status p_status (a rule
-- applies from its `at` status upward): a step then runs exactly as asked. A policy the kernel
-- would have to parse (not an object, rules not an array, an unknown status) is "no".
CREATE FUNCTION pgcrew.no_degradation_at(p_policy jsonb, p_status text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_policy IS NULL OR jsonb_typeof(p_policy) <> 'object' THEN false
        WHEN NOT p_policy ? 'rules' OR p_policy->'rules' = 'null'::jsonb THEN true
        WHEN jsonb_typeof(p_policy->'rules') <> 'array' THEN false
        ELSE NOT EXISTS (
            SELECT 1 FROM jsonb_array_elements(p_policy->'rules') rule
             WHERE coalesce(array_position(ARRAY['HEALTHY', 'WARNING', 'CRITICAL', 'EXCEEDED'],
                                           rule->>'at'), 0)
                   <= coalesce(array_position(ARRAY['HEALTHY', 'WARNING', 'CRITICAL', 'EXCEEDED'],
                                              p_status), 5))
    END
$$;

CREATE FUNCTION pgcrew.model_step_begin(p_run uuid, p_tenant text, p_step_key text,
                                        p_lease_token bigint, p_reservation uuid,
                                        p_instance text, p_model text, p_estimate float8,
                                        p_payload jsonb)
RETURNS TABLE (o_outcome text, o_seq bigint, o_hash bytea, o_created_at timestamptz,
               o_amount_usd float8, o_reserved_at timestamptz,
               o_limit_usd float8, o_spent_usd float8, o_reserved_usd float8,
               o_budget_status text, o_degradation_policy jsonb,
               o_event_seq bigint, o_event_type text, o_event_payload jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    t        record;
    r        record;
    a        record;
    v_res    record;
    v_amount numeric;
BEGIN
    -- The run's ledger lock first (lock order: ledger lock, tenant row, run row).
    PERFORM pg_advisory_xact_lock(k.lock_key) FROM pgcrew.runs k WHERE k.id = p_run;
    SELECT x.budget_status, x.degradation_policy, x.budget_usd_limit, x.spent_usd,
           x.reserved_usd
      INTO t FROM pgcrew.tenants x WHERE x.id = p_tenant FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT x.budget_usd_limit, x.budget_spent_usd, x.budget_reserved_usd
      INTO r FROM pgcrew.runs x WHERE x.id = p_run AND x.tenant_id = p_tenant FOR UPDATE;
    IF NOT FOUND
       OR NOT pgcrew.no_degradation_at(t.degradation_policy, t.budget_status)
       OR EXISTS (SELECT 1 FROM pgcrew.events e WHERE e.run_id = p_run AND e.step_key = p_step_key)
    THEN
        -- The slow path's read (kernel/model_step_events); nothing written.
        RETURN QUERY
            SELECT 'state'::text, NULL::bigint, NULL::bytea, NULL::timestamptz,
                   NULL::float8, NULL::timestamptz, NULL::float8,
                   NULL::float8, NULL::float8, t.budget_status::text, t.degradation_policy,
                   e.seq, e.event_type, e.payload
              FROM (SELECT 1) one
              LEFT JOIN pgcrew.events e ON e.run_id = p_run AND e.step_key = p_step_key
             ORDER BY e.seq;
        RETURN;
    END IF;
    v_amount := pgcrew.money_amount(p_estimate, 'estimate_usd');
    -- As tenancy/reserve_tenant and tenancy/reserve_run: refused when the estimate does not fit.
    IF t.budget_usd_limit IS NOT NULL
       AND t.spent_usd + t.reserved_usd + v_amount > t.budget_usd_limit THEN
        RETURN QUERY SELECT 'tenant_refused'::text, NULL::bigint, NULL::bytea,
                            NULL::timestamptz, NULL::float8,
                            NULL::timestamptz, t.budget_usd_limit::float8, t.spent_usd::float8,
                            t.reserved_usd::float8, t.budget_status::text, NULL::jsonb,
                            NULL::bigint, NULL::text, NULL::jsonb;
        RETURN;
    END IF;
    IF r.budget_usd_limit IS NOT NULL
       AND r.budget_spent_usd + r.budget_reserved_usd + v_amount > r.budget_usd_limit THEN
        RETURN QUERY SELECT 'run_refused'::text, NULL::bigint, NULL::bytea,
                            NULL::timestamptz, NULL::float8,
                            NULL::timestamptz, r.budget_usd_limit::float8,
                            r.budget_spent_usd::float8, r.budget_reserved_usd::float8,
                            t.budget_status::text, NULL::jsonb,
                            NULL::bigint, NULL::text, NULL::jsonb;
        RETURN;
    END IF;
    UPDATE pgcrew.tenants x
       SET reserved_usd = x.reserved_usd + v_amount, updated_at = now()
     WHERE x.id = p_tenant;
    UPDATE pgcrew.runs x
       SET budget_reserved_usd = x.budget_reserved_usd + v_amount
     WHERE x.id = p_run;
    INSERT INTO pgcrew.budget_reservations (id, tenant_id, run_id, instance_id, model, amount_usd)
    VALUES (p_reservation, p_tenant, p_run, p_instance, p_model, v_amount)
    RETURNING amount_usd, created_at INTO v_res;
    SELECT * INTO a FROM pgcrew.append_event(p_run, p_lease_token, 'model_requested', p_step_key,
                                             p_payload, false);
    RETURN QUERY SELECT 'reserved'::text, a.o_seq, a.o_hash, a.o_created_at,
                        v_res.amount_usd::float8, v_res.created_at,
                        NULL::float8, NULL::float8, NULL::float8, t.budget_status::text,
                        NULL::jsonb, NULL::bigint, NULL::text, NULL::jsonb;
END $$;

CREATE FUNCTION pgcrew.model_step_end(p_run uuid, p_tenant text, p_step_key text,
                                      p_lease_token bigint, p_reservation uuid,
                                      p_cost float8, p_category text, p_model text,
                                      p_prompt_tokens bigint, p_completion_tokens bigint,
                                      p_payload jsonb)
RETURNS TABLE (o_outcome text, o_seq bigint, o_hash bytea, o_created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    v_cost numeric := pgcrew.money_amount(p_cost, 'cost_usd');
    v_pt   bigint := pgcrew.token_count(p_prompt_tokens, 'prompt_tokens');
    v_ct   bigint := pgcrew.token_count(p_completion_tokens, 'completion_tokens');
    t      record;
    r      record;
    a      record;
    v_n    bigint;
    v_id   pgcrew.cost_entries.id%TYPE;
BEGIN
    PERFORM pgcrew.lock_run(p_run);
    IF EXISTS (SELECT 1 FROM pgcrew.events e
                WHERE e.run_id = p_run AND e.step_key = p_step_key
                  AND e.event_type = 'model_completed') THEN
        -- Recorded meanwhile by another attempt: that record stands; release (as
        -- tenancy/release_reservation).
        WITH rel AS (
            DELETE FROM pgcrew.budget_reservations
            WHERE id = p_reservation AND tenant_id = p_tenant
            RETURNING tenant_id, run_id, amount_usd
        ), tu AS (
            UPDATE pgcrew.tenants x
            SET reserved_usd = x.reserved_usd - rel.amount_usd, updated_at = now()
            FROM rel WHERE x.id = rel.tenant_id
            RETURNING x.id
        ), ru AS (
            UPDATE pgcrew.runs x
            SET budget_reserved_usd = x.budget_reserved_usd - rel.amount_usd
            FROM rel WHERE x.id = rel.run_id
            RETURNING x.id
        )
        SELECT (SELECT count(*) FROM tu) + (SELECT count(*) FROM ru) INTO v_n;
        RETURN QUERY SELECT 'recorded'::text, NULL::bigint, NULL::bytea, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT x.spent_usd, x.budget_usd_limit INTO t
      FROM pgcrew.tenants x WHERE x.id = p_tenant FOR UPDATE;
    IF NOT FOUND OR (v_cost > 0 AND t.budget_usd_limit IS NOT NULL
                     AND t.spent_usd + v_cost > t.budget_usd_limit) THEN
        RETURN QUERY SELECT 'slow'::text, NULL::bigint, NULL::bytea, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT x.budget_spent_usd, x.budget_usd_limit INTO r
      FROM pgcrew.runs x WHERE x.id = p_run AND x.tenant_id = p_tenant FOR UPDATE;
    IF NOT FOUND OR (v_cost > 0 AND r.budget_usd_limit IS NOT NULL
                     AND r.budget_spent_usd + v_cost > r.budget_usd_limit) THEN
        RETURN QUERY SELECT 'slow'::text, NULL::bigint, NULL::bytea, NULL::timestamptz;
        RETURN;
    END IF;
    -- tenancy/settle's statement (no limit passed: checked above).
    WITH rel AS (
        DELETE FROM pgcrew.budget_reservations
        WHERE id = p_reservation AND tenant_id = p_tenant
        RETURNING amount_usd, run_id
    ), tu AS (
        UPDATE pgcrew.tenants x
        SET spent_usd = x.spent_usd + v_cost,
            reserved_usd = x.reserved_usd - coalesce((SELECT sum(rel.amount_usd) FROM rel), 0),
            updated_at = now()
        WHERE x.id = p_tenant
        RETURNING x.id
    ), ru AS (
        UPDATE pgcrew.runs x
        SET budget_spent_usd = x.budget_spent_usd + v_cost,
            budget_reserved_usd = x.budget_reserved_usd
                - coalesce((SELECT sum(rel.amount_usd) FROM rel WHERE rel.run_id = x.id), 0)
        WHERE x.id = p_run AND x.tenant_id = p_tenant
        RETURNING x.id
    )
    INSERT INTO pgcrew.cost_entries (tenant_id, run_id, category, model, step_key, prompt_tokens,
                                     completion_tokens, cost_usd, reservation_id)
    SELECT p_tenant, (SELECT ru.id FROM ru), p_category, p_model, p_step_key, v_pt, v_ct,
           v_cost, p_reservation
      FROM tu
    RETURNING id INTO v_id;
    SELECT * INTO a FROM pgcrew.append_event(p_run, p_lease_token, 'model_completed', p_step_key,
                                             p_payload, true);
    IF NOT a.o_inserted THEN
        -- Recorded meanwhile by a writer that did not take the ledger lock: undo the settlement
        -- (the statement fails); the caller releases the reservation.
        RAISE EXCEPTION 'run %: step % was recorded meanwhile', p_run, p_step_key
            USING ERRCODE = 'PC181';
    END IF;
    RETURN QUERY SELECT 'completed'::text, a.o_seq, a.o_hash, a.o_created_at;
END $$;

-- Functions: nothing for PUBLIC (as V010; every migration creating functions revokes again).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgcrew FROM PUBLIC;
