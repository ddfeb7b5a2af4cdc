-- pgcrew V050: pgcrew.claim_tasks no longer plans its per-tenant scan on every call (issue #23).
--
-- The general claim (several tenants with work in a queue, limits, due tasks) takes each
-- tenant's share with one locking scan per tenant. Its values (queue, tenant, the ids taken so
-- far and the share) reached the plan: a plan for the values looked cheaper than the generic one
-- (the LIMIT it could see), so PostgreSQL's plan cache planned it again on every call
-- (pg_stat_statements with nested statements, two tenants with work, 2,000 claims of 10:
-- 4,001 plans in 4,000 scans, 0.054 ms each against 0.069 ms of execution; a claim over N tenants
-- plans N times). So did its claim of a single unlimited tenant (2,001 plans in 2,000 claims,
-- 0.09 ms each), which a worker pool reaches when the fast claim steps aside for a due retry
-- and then keeps until its queue runs dry. Redefined with both, when they take at most 1,000
-- tasks, reading their values through a one-row `arg` and bounded by a constant LIMIT under the
-- share, as V048's fast claims: every plan costs the same, and the generic one is kept from
-- the sixth call. More than 1,000 tasks take the statements as before. The rest of the
-- function is V035's, unchanged.
-- Test: queue::plans::general_claims_plan_their_tenant_scans_once.

CREATE OR REPLACE FUNCTION pgcrew.claim_tasks(p_queues text[], p_limit integer, p_instance text)
RETURNS TABLE (id bigint, queue text, kind text, tenant_id text, run_id uuid, priority smallint,
               payload jsonb, attempts integer, max_attempts integer, claim_token uuid,
               run_at timestamptz, created_at timestamptz, lag_us bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_token uuid := gen_random_uuid();
    v_ids bigint[];
    v_left integer := p_limit;
    v_q text;
    v_tenants text[];
    v_caps integer[];
    v_n integer;
    v_share integer;
    v_start integer;
    v_i integer;
    v_k integer;
    v_t text;
    v_lim integer;
    v_qlim integer;
    v_running integer;
    v_take integer;
    v_got bigint[];
    v_pass integer;
    v_claimed integer;
    v_all_paused boolean;
    v_paused text[];
    v_key_field text;
    v_key_max integer;
    v_key_room jsonb;
    v_key_locked boolean := false;
    r record;
    v_rl_queue boolean;
    v_rl_tenant boolean;
    v_rl_kind boolean;
    v_tok double precision;
    v_kind_room jsonb;
    v_kind_frac jsonb;
    v_q_room integer;
    v_q_frac double precision;
    v_q_left integer;
    v_outer_left integer;
    v_t_room integer[];
    v_t_frac double precision[];
    v_taken integer[];
BEGIN
    IF p_limit IS NULL OR p_limit <= 0 OR p_queues IS NULL THEN
        RETURN;
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgcrew.claim_tasks needs READ COMMITTED isolation, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'PC023',
                  HINT = 'claim outside an explicit transaction or in a READ COMMITTED one: concurrency limits are counted under a lock and need a snapshot taken after it';
    END IF;
    -- Rate limits (V028): which scopes have any. Kind buckets are taken for the whole call:
    -- each kind's whole tokens are its room; a bucket another claimer holds gives no room.
    SELECT coalesce(bool_or(l.scope = 'queue'), false), coalesce(bool_or(l.scope = 'tenant'), false),
           coalesce(bool_or(l.scope = 'kind'), false)
      INTO v_rl_queue, v_rl_tenant, v_rl_kind
      FROM pgcrew.rate_limits l;
    IF v_rl_kind THEN
        v_kind_room := '{}';
        v_kind_frac := '{}';
        FOR r IN SELECT l.name, pgcrew.rate_tokens(l) AS tok FROM pgcrew.rate_limits l
                  WHERE l.scope = 'kind' ORDER BY l.name FOR UPDATE SKIP LOCKED LOOP
            v_kind_room := v_kind_room || jsonb_build_object(r.name, floor(r.tok)::integer);
            v_kind_frac := v_kind_frac || jsonb_build_object(r.name, r.tok - floor(r.tok));
        END LOOP;
        SELECT v_kind_room || coalesce(jsonb_object_agg(l.name, 0), '{}'::jsonb) INTO v_kind_room
          FROM pgcrew.rate_limits l WHERE l.scope = 'kind' AND NOT (v_kind_room ? l.name);
    END IF;
    FOREACH v_q IN ARRAY p_queues LOOP
        EXIT WHEN v_left <= 0;
        -- Promote this queue's due scheduled / retryable tasks (bounded per claim).
        UPDATE pgcrew.tasks t SET state = 'available'
         WHERE t.id IN (SELECT s.id FROM pgcrew.tasks s
                         WHERE s.state IN ('scheduled', 'retryable') AND s.pending_deps = 0
                           AND s.queue = v_q AND s.run_at <= now()
                         ORDER BY s.run_at LIMIT 1000
                         FOR UPDATE SKIP LOCKED);
        -- Pauses of this queue (V028): the whole queue, or some tenants.
        SELECT bool_or(p.tenant_id IS NULL), array_agg(p.tenant_id) FILTER (WHERE p.tenant_id IS NOT NULL)
          INTO v_all_paused, v_paused
          FROM pgcrew.queue_pauses p WHERE p.queue = v_q;
        CONTINUE WHEN v_all_paused;
        -- Concurrency per key (V028): serialise this queue's claims and count its running
        -- tasks per key under the lock (a snapshot taken after it: READ COMMITTED). Wait for
        -- the lock only while holding no other queue's (claims of several queues could
        -- otherwise deadlock); else try it, and skip the queue this cycle when it is taken.
        SELECT k.key_field, k.max_running INTO v_key_field, v_key_max
          FROM pgcrew.queue_key_limits k WHERE k.queue = v_q;
        IF v_key_field IS NOT NULL THEN
            IF NOT v_key_locked THEN
                PERFORM pg_advisory_xact_lock(pgcrew.lock_key('queue_keys', v_q));
            ELSIF NOT pg_try_advisory_xact_lock(pgcrew.lock_key('queue_keys', v_q)) THEN
                CONTINUE;
            END IF;
            v_key_locked := true;
            -- V035: tell the fast limited claims a claim is counting (they step aside while
            -- this row is locked, or when its counter moved after their snapshot), and wait
            -- for one in flight: the count below then sees its tasks.
            UPDATE pgcrew.claim_features f SET claims = f.claims + 1 WHERE f.queue = v_q;
            -- Far from the limit (V031): the queue's running tasks plus this batch fit under
            -- it, so no key can reach it in this claim; claim as without a key limit.
            SELECT count(*) INTO v_running FROM pgcrew.tasks x
             WHERE x.state = 'running' AND x.queue = v_q;
            IF v_running + v_left <= v_key_max THEN
                v_key_field := NULL;
            ELSE
                SELECT coalesce(jsonb_object_agg(c.k, v_key_max - c.n), '{}'::jsonb) INTO v_key_room
                  FROM (SELECT x.payload ->> v_key_field AS k, count(*) AS n FROM pgcrew.tasks x
                         WHERE x.state = 'running' AND x.queue = v_q
                           AND x.payload ->> v_key_field IS NOT NULL
                         GROUP BY 1) c;
            END IF;
        END IF;
        -- The queue's rate limit (V028): this queue takes at most its whole tokens.
        v_q_room := NULL;
        IF v_rl_queue THEN
            SELECT pgcrew.rate_tokens(l) INTO v_tok FROM pgcrew.rate_limits l
             WHERE l.scope = 'queue' AND l.name = v_q FOR UPDATE SKIP LOCKED;
            IF FOUND THEN
                v_q_room := floor(v_tok)::integer;
                v_q_frac := v_tok - v_q_room;
            ELSIF EXISTS (SELECT FROM pgcrew.rate_limits l WHERE l.scope = 'queue' AND l.name = v_q) THEN
                CONTINUE; -- another claimer is taking this queue's tokens
            END IF;
            CONTINUE WHEN v_q_room <= 0;
        END IF;
        v_outer_left := v_left;
        v_left := least(v_left, coalesce(v_q_room, v_left));
        v_q_left := v_left;
        -- Tenants with available work in this queue (loose index scan).
        WITH RECURSIVE act(tid) AS (
            (SELECT a.tenant_id FROM pgcrew.tasks a
              WHERE a.state = 'available' AND a.queue = v_q
              ORDER BY a.tenant_id LIMIT 1)
            UNION ALL
            SELECT (SELECT a.tenant_id FROM pgcrew.tasks a
                     WHERE a.state = 'available' AND a.queue = v_q AND a.tenant_id > act.tid
                     ORDER BY a.tenant_id LIMIT 1)
              FROM act WHERE act.tid IS NOT NULL)
        SELECT array_agg(act.tid) INTO v_tenants FROM act
         WHERE act.tid IS NOT NULL AND (v_paused IS NULL OR NOT (act.tid = ANY (v_paused)));
        IF v_tenants IS NULL THEN
            v_left := v_outer_left;
            CONTINUE;
        END IF;
        v_n := cardinality(v_tenants);
        v_t_room := array_fill(NULL::integer, ARRAY[v_n]);
        v_t_frac := array_fill(NULL::double precision, ARRAY[v_n]);
        v_taken := array_fill(0, ARRAY[v_n]);
        -- Each tenant's room this cycle: its limits minus what is running (NULL = unlimited).
        -- What this call claimed for earlier queues is running already and counted.
        v_caps := array_fill(NULL::integer, ARRAY[v_n]);
        FOR v_i IN 1..v_n LOOP
            v_t := v_tenants[v_i];
            SELECT tn.max_concurrent_tasks INTO v_lim FROM pgcrew.tenants tn WHERE tn.id = v_t;
            SELECT l.max_concurrent_tasks INTO v_qlim FROM pgcrew.tenant_queue_limits l
             WHERE l.tenant_id = v_t AND l.queue = v_q;
            IF v_lim IS NOT NULL OR v_qlim IS NOT NULL THEN
                IF NOT pg_try_advisory_xact_lock(pgcrew.lock_key('tenant_tasks', v_t)) THEN
                    v_caps[v_i] := 0;
                    CONTINUE;
                END IF;
                v_caps[v_i] := 2147483647;
                IF v_lim IS NOT NULL THEN
                    SELECT count(*) INTO v_running FROM pgcrew.tasks r
                     WHERE r.state = 'running' AND r.tenant_id = v_t;
                    v_caps[v_i] := least(v_caps[v_i], greatest(0, v_lim - v_running));
                END IF;
                IF v_qlim IS NOT NULL THEN
                    SELECT count(*) INTO v_running FROM pgcrew.tasks r
                     WHERE r.state = 'running' AND r.tenant_id = v_t AND r.queue = v_q;
                    v_caps[v_i] := least(v_caps[v_i], greatest(0, v_qlim - v_running));
                END IF;
            END IF;
            -- The tenant's rate limit (V028).
            IF v_rl_tenant THEN
                SELECT pgcrew.rate_tokens(l) INTO v_tok FROM pgcrew.rate_limits l
                 WHERE l.scope = 'tenant' AND l.name = v_t FOR UPDATE SKIP LOCKED;
                IF FOUND THEN
                    v_t_room[v_i] := floor(v_tok)::integer;
                    v_t_frac[v_i] := v_tok - v_t_room[v_i];
                    v_caps[v_i] := least(coalesce(v_caps[v_i], 2147483647), v_t_room[v_i]);
                ELSIF EXISTS (SELECT FROM pgcrew.rate_limits l WHERE l.scope = 'tenant' AND l.name = v_t) THEN
                    v_caps[v_i] := 0;
                END IF;
            END IF;
        END LOOP;
        -- Fast path: one unlimited tenant: claim in one statement.
        IF v_n = 1 AND v_caps[1] IS NULL AND v_key_field IS NULL AND v_kind_room IS NULL THEN
            v_t := v_tenants[1];
            IF v_left <= 1000 THEN
            -- V050: as the per-tenant scan below.
            RETURN QUERY
            WITH arg AS MATERIALIZED (SELECT v_q AS queue, v_t AS tenant, v_left AS n),
            next AS (
                SELECT c.id FROM (
                    SELECT a.id FROM pgcrew.tasks a
                     WHERE a.state = 'available' AND a.queue = (SELECT arg.queue FROM arg)
                       AND a.tenant_id = (SELECT arg.tenant FROM arg)
                     ORDER BY a.priority, a.run_at, a.id
                     LIMIT 1000
                     FOR UPDATE SKIP LOCKED) c
                 LIMIT (SELECT arg.n FROM arg))
            UPDATE pgcrew.tasks t
               SET state = 'running', attempts = t.attempts + 1, claimed_by = p_instance,
                   claim_token = v_token, claimed_at = now(), heartbeat_at = now()
              FROM next
             WHERE t.id = next.id
            RETURNING t.id, t.queue, t.kind, t.tenant_id, t.run_id, t.priority, t.payload,
                      t.attempts, t.max_attempts, t.claim_token, t.run_at, t.created_at,
                      (extract(epoch FROM (now() - t.run_at)) * 1000000)::bigint;
            ELSE
            RETURN QUERY
            WITH next AS (
                SELECT a.id FROM pgcrew.tasks a
                 WHERE a.state = 'available' AND a.queue = v_q AND a.tenant_id = v_t
                 ORDER BY a.priority, a.run_at, a.id
                 LIMIT v_left
                 FOR UPDATE SKIP LOCKED)
            UPDATE pgcrew.tasks t
               SET state = 'running', attempts = t.attempts + 1, claimed_by = p_instance,
                   claim_token = v_token, claimed_at = now(), heartbeat_at = now()
              FROM next
             WHERE t.id = next.id
            RETURNING t.id, t.queue, t.kind, t.tenant_id, t.run_id, t.priority, t.payload,
                      t.attempts, t.max_attempts, t.claim_token, t.run_at, t.created_at,
                      (extract(epoch FROM (now() - t.run_at)) * 1000000)::bigint;
            END IF;
            GET DIAGNOSTICS v_claimed = ROW_COUNT;
            v_left := v_left - v_claimed;
        ELSE
        -- Pass 1: an equal share each (when tenants outnumber the batch, successive claims start
        -- at successive tenants: round robin); pass 2: leftover capacity to tenants with work.
        v_ids := '{}';
        v_start := CASE WHEN v_n > v_left
                        THEN (nextval('pgcrew.task_claim_rotation') % v_n)::integer ELSE 0 END;
        FOR v_pass IN 1..2 LOOP
            EXIT WHEN v_left <= 0;
            v_share := CASE WHEN v_pass = 1 THEN greatest(1, ceil(v_left::numeric / v_n)::integer)
                            ELSE v_left END;
            FOR v_k IN 0..v_n - 1 LOOP
                EXIT WHEN v_left <= 0;
                v_i := ((v_start + v_k) % v_n) + 1;
                v_take := least(v_share, v_left, coalesce(v_caps[v_i], 2147483647));
                CONTINUE WHEN v_take <= 0;
                v_t := v_tenants[v_i];
                IF v_key_field IS NULL AND v_kind_room IS NULL AND v_take <= 1000 THEN
                    -- V050: the values through `arg`, the locking scan bounded by a constant
                    -- (the outer LIMIT takes its tasks one by one: only those are locked), so
                    -- no plan depends on them and the session keeps the generic one.
                    v_got := ARRAY(WITH arg AS MATERIALIZED (
                                       SELECT v_q AS queue, v_t AS tenant, v_ids AS ids,
                                              v_take AS n)
                                   SELECT c.id FROM (
                                       SELECT a.id FROM pgcrew.tasks a
                                        WHERE a.state = 'available'
                                          AND a.queue = (SELECT arg.queue FROM arg)
                                          AND a.tenant_id = (SELECT arg.tenant FROM arg)
                                          AND NOT (a.id = ANY ((SELECT arg.ids FROM arg)::bigint[]))
                                        ORDER BY a.priority, a.run_at, a.id
                                        LIMIT 1000
                                        FOR UPDATE SKIP LOCKED) c
                                    LIMIT (SELECT arg.n FROM arg));
                ELSIF v_key_field IS NULL AND v_kind_room IS NULL THEN
                    -- More than a bounded scan holds (a claim of over 1,000 tasks).
                    v_got := ARRAY(SELECT a.id FROM pgcrew.tasks a
                                    WHERE a.state = 'available' AND a.queue = v_q AND a.tenant_id = v_t
                                      AND NOT (a.id = ANY (v_ids))
                                    ORDER BY a.priority, a.run_at, a.id
                                    LIMIT v_take
                                    FOR UPDATE SKIP LOCKED);
                ELSE
                    -- In order, past tasks whose key is full or whose kind has no tokens
                    -- left, in one statement over the first tasks of the tenant: a task is
                    -- taken when its rank within its key (and within its kind) fits the room.
                    -- Ranks count the tasks ahead that the other filter drops, so this may
                    -- take fewer than fit, never more.
                    v_got := ARRAY(
                        SELECT c.id FROM (
                            SELECT w.id, w.priority, w.run_at, w.k, w.kind,
                                   row_number() OVER (PARTITION BY w.k ORDER BY w.priority, w.run_at, w.id) AS rk,
                                   row_number() OVER (PARTITION BY w.kind ORDER BY w.priority, w.run_at, w.id) AS rn
                              FROM (SELECT * FROM (SELECT a.id, a.priority, a.run_at, a.kind,
                                           a.payload ->> v_key_field AS k
                                      FROM pgcrew.tasks a
                                     WHERE a.state = 'available' AND a.queue = v_q AND a.tenant_id = v_t
                                       AND NOT (a.id = ANY (v_ids))
                                     ORDER BY a.priority, a.run_at, a.id
                                     -- A constant inner limit keeps the plan an index scan
                                     -- in order; the outer one stops it early.
                                     LIMIT 1000) w0
                             LIMIT least(1000, v_take * 4 + 100)) w) c
                         WHERE (c.k IS NULL OR c.rk <= coalesce((v_key_room ->> c.k)::integer, v_key_max))
                           AND (v_kind_room IS NULL OR NOT (v_kind_room ? c.kind)
                                OR c.rn <= (v_kind_room ->> c.kind)::integer)
                         ORDER BY c.priority, c.run_at, c.id
                         LIMIT v_take);
                    -- Their keys and kinds have that much less room (also if a lock below
                    -- skips one: fewer taken, never more).
                    IF v_key_field IS NOT NULL THEN
                        SELECT v_key_room || coalesce(jsonb_object_agg(g.k,
                                   coalesce((v_key_room ->> g.k)::integer, v_key_max) - g.n), '{}'::jsonb)
                          INTO v_key_room
                          FROM (SELECT x.payload ->> v_key_field AS k, count(*) AS n
                                  FROM pgcrew.tasks x WHERE x.id = ANY (v_got)
                                   AND x.payload ->> v_key_field IS NOT NULL GROUP BY 1) g;
                    END IF;
                    IF v_kind_room IS NOT NULL THEN
                        SELECT v_kind_room || coalesce(jsonb_object_agg(g.kind,
                                   (v_kind_room ->> g.kind)::integer - g.n), '{}'::jsonb)
                          INTO v_kind_room
                          FROM (SELECT x.kind, count(*) AS n FROM pgcrew.tasks x
                                 WHERE x.id = ANY (v_got) AND v_kind_room ? x.kind GROUP BY 1) g;
                    END IF;
                    -- Locked by id alone (the primary key: a filter on state could make the
                    -- plan read the partial index of every available task), then kept if
                    -- still available.
                    v_got := ARRAY(SELECT x.id FROM (
                                       SELECT l.id, l.state, l.priority, l.run_at FROM pgcrew.tasks l
                                        WHERE l.id = ANY (v_got)
                                       OFFSET 0 -- no pushing the state filter in here
                                          FOR UPDATE SKIP LOCKED) x
                                    WHERE x.state = 'available'
                                    ORDER BY x.priority, x.run_at, x.id);
                END IF;
                v_ids := v_ids || v_got;
                v_left := v_left - cardinality(v_got);
                v_taken[v_i] := v_taken[v_i] + cardinality(v_got);
                IF v_caps[v_i] IS NOT NULL THEN
                    v_caps[v_i] := v_caps[v_i] - cardinality(v_got);
                END IF;
                IF cardinality(v_got) < v_take THEN
                    v_caps[v_i] := 0; -- drained (or all locked): skip in pass 2
                END IF;
            END LOOP;
        END LOOP;
        -- Running now, so the next queue's counts include them.
        IF cardinality(v_ids) > 0 THEN
            RETURN QUERY
            UPDATE pgcrew.tasks t
               SET state = 'running', attempts = t.attempts + 1, claimed_by = p_instance,
                   claim_token = v_token, claimed_at = now(), heartbeat_at = now()
             WHERE t.id = ANY (v_ids)
            RETURNING t.id, t.queue, t.kind, t.tenant_id, t.run_id, t.priority, t.payload,
                      t.attempts, t.max_attempts, t.claim_token, t.run_at, t.created_at,
                      (extract(epoch FROM (now() - t.run_at)) * 1000000)::bigint;
        END IF;
        END IF;
        -- Rate limits (V028): take the tokens of what this queue claimed.
        IF v_q_room IS NOT NULL THEN
            UPDATE pgcrew.rate_limits l
               SET tokens = v_q_frac + v_q_room - (v_q_left - v_left),
                   refilled_at = greatest(l.refilled_at, now())
             WHERE l.scope = 'queue' AND l.name = v_q;
        END IF;
        IF v_rl_tenant THEN
            FOR v_i IN 1..v_n LOOP
                CONTINUE WHEN v_t_room[v_i] IS NULL;
                UPDATE pgcrew.rate_limits l
                   SET tokens = v_t_frac[v_i] + v_t_room[v_i] - v_taken[v_i],
                       refilled_at = greatest(l.refilled_at, now())
                 WHERE l.scope = 'tenant' AND l.name = v_tenants[v_i];
            END LOOP;
        END IF;
        v_left := v_outer_left - (v_q_left - v_left);
    END LOOP;
    IF v_kind_frac IS NOT NULL THEN
        UPDATE pgcrew.rate_limits l
           SET tokens = (v_kind_frac ->> l.name)::double precision + (v_kind_room ->> l.name)::integer,
               refilled_at = greatest(l.refilled_at, now())
         WHERE l.scope = 'kind' AND v_kind_frac ? l.name;
    END IF;
END $$;
