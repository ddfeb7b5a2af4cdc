-- pgcrew V035: a queue with a rate limit or a key limit claims in one statement while the
-- limits cannot bind, and a pool held back by a key limit is woken when the key frees up
-- (issue #21's last benchmark findings).
--
-- 1. pgcrew.claim_features (V031) says which features a queue has: `paused` (the queue or a
--    tenant of it is paused; always true for the row '' of kind and tenant rate limits),
--    `key_max` (its key limit), `rate` (it has a queue rate limit), and `claims`, a counter
--    every claim of a key-limited queue raises: the fast limited claim
--    (sql/queries/queue/claim_fast_limited.sql) compares the newest value (row locked) with
--    the one its snapshot saw, so it never counts running tasks with a snapshot that misses a
--    claim committed after it. The triggers keep the flags exact as before; `claims` is kept
--    across refreshes.
-- 2. pgcrew.claim_tasks (V031's body, same signature and result) raises `claims` of a
--    key-limited queue under the queue's key lock, before counting: a fast limited claim in
--    flight holds that row, so the count waits for its commit and sees its tasks; one that
--    starts later sees the counter moved and steps aside.
-- 3. pgcrew.ack_tasks (V011's body, same signature and result) sends a NOTIFY on
--    pgcrew_task_available for a key-limited queue when an acknowledged task's key was at its
--    bound (so a pool held back by it claims at once, on any instance). Other acks send
--    nothing more: one index probe of pgcrew.claim_features decides, and a queue whose
--    running tasks were below the limit is not counted per key.

ALTER TABLE pgcrew.claim_features
    ADD COLUMN paused  boolean NOT NULL DEFAULT true,
    ADD COLUMN key_max integer,
    ADD COLUMN rate    boolean NOT NULL DEFAULT false,
    ADD COLUMN claims  bigint NOT NULL DEFAULT 0;

-- Recompute pgcrew.claim_features (as V031, with the flags; `claims` is left as it is).
CREATE OR REPLACE FUNCTION pgcrew.refresh_claim_features() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(pgcrew.lock_key('claim_features', ''));
    DELETE FROM pgcrew.claim_features f
     WHERE NOT EXISTS (SELECT FROM pgcrew.queue_pauses p WHERE p.queue = f.queue)
       AND NOT EXISTS (SELECT FROM pgcrew.queue_key_limits k WHERE k.queue = f.queue)
       AND NOT EXISTS (SELECT FROM pgcrew.rate_limits r WHERE r.scope = 'queue' AND r.name = f.queue)
       AND NOT (f.queue = '' AND EXISTS (SELECT FROM pgcrew.rate_limits r
                                          WHERE r.scope IN ('kind', 'tenant')));
    INSERT INTO pgcrew.claim_features AS f (queue, paused, key_max, rate)
    SELECT q.queue,
           q.queue = '' OR EXISTS (SELECT FROM pgcrew.queue_pauses p WHERE p.queue = q.queue),
           (SELECT k.max_running FROM pgcrew.queue_key_limits k WHERE k.queue = q.queue),
           EXISTS (SELECT FROM pgcrew.rate_limits r WHERE r.scope = 'queue' AND r.name = q.queue)
      FROM (SELECT p.queue FROM pgcrew.queue_pauses p
            UNION SELECT k.queue FROM pgcrew.queue_key_limits k
            UNION SELECT r.name FROM pgcrew.rate_limits r WHERE r.scope = 'queue'
            UNION SELECT '' WHERE EXISTS (SELECT FROM pgcrew.rate_limits r
                                           WHERE r.scope IN ('kind', 'tenant'))) q
    ON CONFLICT (queue) DO UPDATE
       SET paused = EXCLUDED.paused, key_max = EXCLUDED.key_max, rate = EXCLUDED.rate
     WHERE (f.paused, f.key_max, f.rate) IS DISTINCT FROM
           (EXCLUDED.paused, EXCLUDED.key_max, EXCLUDED.rate);
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgcrew.refresh_claim_features() FROM PUBLIC;

-- The flags of the rows V031 wrote.
UPDATE pgcrew.claim_features f
   SET paused = f.queue = '' OR EXISTS (SELECT FROM pgcrew.queue_pauses p WHERE p.queue = f.queue),
       key_max = (SELECT k.max_running FROM pgcrew.queue_key_limits k WHERE k.queue = f.queue),
       rate = EXISTS (SELECT FROM pgcrew.rate_limits r WHERE r.scope = 'queue' AND r.name = f.queue);

-- Claims as in V031, and: in a key-limited queue, `claims` of its feature row is raised under
-- the queue's key lock before the running tasks are counted.
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
                IF v_key_field IS NULL AND v_kind_room IS NULL THEN
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

-- Acknowledgements as in V011, and: when an acknowledged task of a key-limited queue held a
-- key at its bound (the key's running tasks, these included, were at least the limit), one
-- NOTIFY per such queue on pgcrew_task_available, so a pool held back by the key (on any
-- instance) claims now instead of at its poll. Queues without a key limit cost one index
-- probe of pgcrew.claim_features; a key-limited queue whose running tasks were below the
-- limit is not counted per key.
CREATE OR REPLACE FUNCTION pgcrew.ack_tasks(p_ids bigint[], p_tokens uuid[], p_outcomes text[],
                                            p_delays_us bigint[], p_errors text[])
RETURNS TABLE (id bigint, state text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_n integer := coalesce(cardinality(p_ids), 0);
    v_bad_id bigint;
    v_bad text;
    v_ids bigint[];
    v_states text[];
    v_queues text[];
    v_completed bigint[];
    v_failed bigint[];
BEGIN
    IF v_n = 0 THEN
        RETURN;
    END IF;
    IF coalesce(cardinality(p_tokens), 0) <> v_n OR coalesce(cardinality(p_outcomes), 0) <> v_n
       OR coalesce(cardinality(p_delays_us), v_n) <> v_n
       OR coalesce(cardinality(p_errors), v_n) <> v_n THEN
        RAISE EXCEPTION 'pgcrew.ack_tasks: % ids but % tokens, % outcomes, % delays and % errors',
            v_n, coalesce(cardinality(p_tokens), 0), coalesce(cardinality(p_outcomes), 0),
            coalesce(cardinality(p_delays_us)::text, 'NULL'), coalesce(cardinality(p_errors)::text, 'NULL')
            USING ERRCODE = 'PC020',
                  HINT = 'pass one id, claim token and outcome per acknowledgement, and either NULL or one delay (µs) and one error text (or NULL) each';
    END IF;
    SELECT a.id, a.outcome INTO v_bad_id, v_bad
      FROM unnest(p_ids, p_outcomes) AS a(id, outcome)
     WHERE a.outcome IS NULL OR a.outcome NOT IN ('complete', 'fail', 'snooze', 'discard')
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgcrew.ack_tasks: task %: unknown outcome %', v_bad_id, coalesce(quote_literal(v_bad), 'NULL')
            USING ERRCODE = 'PC020', HINT = 'outcomes are complete, fail, snooze or discard';
    END IF;
    WITH a AS (
        SELECT a.id, a.token, a.outcome,
               -- 0 .. 3650 days (pgcrew.queue_limits()).
               least(greatest(coalesce(a.delay_us, 0), 0), 315360000000000) AS delay_us,
               CASE WHEN length(a.err) > 8192 THEN pgcrew.bound_task_error(a.err)
                    ELSE a.err END AS err
          FROM unnest(p_ids, p_tokens, p_outcomes, p_delays_us, p_errors)
               AS a(id, token, outcome, delay_us, err)),
    u AS (
        UPDATE pgcrew.tasks t
           SET state = CASE
                   WHEN a.outcome = 'complete' THEN 'completed'
                   WHEN t.cancel_requested_at IS NOT NULL THEN 'cancelled'
                   WHEN a.outcome = 'snooze' THEN 'scheduled'
                   WHEN a.outcome = 'discard' OR t.attempts >= t.max_attempts THEN 'discarded'
                   ELSE 'retryable' END,
               run_at = CASE WHEN a.outcome IN ('snooze', 'fail')
                             THEN now() + a.delay_us * interval '1 microsecond'
                             ELSE t.run_at END,
               attempts = CASE WHEN a.outcome = 'snooze' THEN greatest(0, t.attempts - 1)
                               ELSE t.attempts END,
               finalized_at = CASE
                   WHEN a.outcome = 'complete' OR t.cancel_requested_at IS NOT NULL
                        OR a.outcome = 'discard'
                        OR (a.outcome = 'fail' AND t.attempts >= t.max_attempts) THEN now() END,
               claim_token = NULL,
               heartbeat_at = NULL,
               last_error = coalesce(a.err, t.last_error),
               errors = CASE WHEN a.err IS NULL THEN t.errors
                             ELSE pgcrew.append_task_error(t.errors, t.attempts, a.err) END
          FROM a
         WHERE t.id = a.id AND t.claim_token = a.token AND t.state = 'running'
        RETURNING t.id, t.state, t.has_dependants, t.queue)
    SELECT array_agg(u.id), array_agg(u.state), array_agg(DISTINCT u.queue),
           array_agg(u.id) FILTER (WHERE u.has_dependants AND u.state = 'completed'),
           array_agg(u.id) FILTER (WHERE u.has_dependants AND u.state IN ('discarded', 'cancelled'))
      INTO v_ids, v_states, v_queues, v_completed, v_failed
      FROM u;
    IF v_completed IS NOT NULL THEN
        PERFORM pgcrew.resolve_dependants(v_completed);
    END IF;
    IF v_failed IS NOT NULL THEN
        PERFORM pgcrew.cancel_dependants(v_failed, 'a dependency was discarded or cancelled');
    END IF;
    -- V035: a key at its bound freed: wake the pools of its queue. Only key-limited queues
    -- whose running tasks plus these acks reach the limit can have had a key at it.
    IF v_queues IS NOT NULL
       AND EXISTS (SELECT FROM pgcrew.claim_features f
                    WHERE f.queue = ANY (v_queues) AND f.key_max IS NOT NULL
                      AND (SELECT count(*) FROM pgcrew.tasks r
                            WHERE r.state = 'running' AND r.queue = f.queue)
                          + cardinality(v_ids) >= f.key_max) THEN
        PERFORM pg_notify('pgcrew_task_available', json_build_object('queue', w.queue)::text)
          FROM (SELECT DISTINCT a.queue
                  FROM (SELECT x.queue, k.key_field, k.max_running,
                               x.payload ->> k.key_field AS key
                          FROM pgcrew.tasks x JOIN pgcrew.queue_key_limits k ON k.queue = x.queue
                         WHERE x.id = ANY (v_ids)) a
                 WHERE a.key IS NOT NULL
                 GROUP BY a.queue, a.key_field, a.key, a.max_running
                -- The key's running tasks, these acknowledged ones included, were at the limit.
                HAVING count(*) + (SELECT count(*) FROM pgcrew.tasks r
                                    WHERE r.state = 'running' AND r.queue = a.queue
                                      AND r.payload ->> a.key_field = a.key)
                       >= a.max_running) w;
    END IF;
    IF v_ids IS NOT NULL THEN
        RETURN QUERY SELECT x.id, x.state FROM unnest(v_ids, v_states) AS x(id, state);
    END IF;
END $$;
