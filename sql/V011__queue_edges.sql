-- pgcrew queue: every promise holds at the edges (issue #15).
--
-- * Acknowledgements (`pgcrew.ack_tasks`, public API) are clamped and validated here as well as
--   in the library, so no caller can make one entry fail a whole batch:
--     - snooze / retry delays are clamped to 0 .. 3650 days (a larger delay, e.g. Rust's
--       `Duration::MAX`, overflowed `interval` and failed the statement);
--     - error texts are bounded to 8192 characters; a longer text keeps its beginning and ends
--       with ` … [truncated: N characters in all]`;
--     - a task's `errors` history keeps the 100 most recent entries (each carries its attempt
--       number, so a gap shows where older ones were dropped);
--     - arrays of different lengths and unknown outcomes are refused (SQLSTATE PC020) instead of
--       being padded with NULLs or treated as failures.
--   (PostgreSQL text cannot hold a NUL byte at all: the library replaces NUL with U+2400 `␀`
--   before sending; a caller of this function cannot pass one.)
-- * `pgcrew.claim_tasks` holds tenant limits and per-tenant-queue limits exactly for any list
--   of queues: the tasks claimed for a queue are set `running` before the next queue is counted
--   (before, tasks collected for earlier queues were set running only in a final UPDATE, so a
--   tenant limited to 1 with work in two queues got 2). A queue named twice is counted again
--   too. It refuses to run outside READ COMMITTED (SQLSTATE PC023): the limit counts need a
--   snapshot taken after the tenant lock, which an older REPEATABLE READ snapshot is not.
-- * `pgcrew.retry_task` recomputes a dependant's pending dependencies from its parents' states
--   (before, it set them to 0 and the child ran before its parent); a parent that was
--   discarded or cancelled can never complete, so retrying its dependant is refused
--   (SQLSTATE PC024) until the parent is retried. Parents deleted by retention count as done.
-- * `pgcrew.enqueue_task` refuses payloads whose JSON text (`octet_length(payload::text)`) is
--   larger than 262144 bytes (SQLSTATE PC021) and delays beyond 3650 days (SQLSTATE PC022).
-- * `pgcrew.queue_limits()` reports these limits.

CREATE FUNCTION pgcrew.queue_limits()
RETURNS TABLE (max_delay interval, max_error_chars integer, max_errors_kept integer,
               max_payload_bytes integer)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT interval '3650 days', 8192, 100, 262144
$$;
COMMENT ON FUNCTION pgcrew.queue_limits() IS
    'The queue''s documented limits: longest snooze / retry / enqueue delay, longest stored error text (characters), error history entries kept per task, largest payload (bytes of JSON text).';

-- An error text bounded to 8192 characters: a longer one keeps its beginning and ends with
-- ` … [truncated: N characters in all]` (the whole is exactly 8192 characters).
-- (Immutable operators only, so that it is inlined into the calling statement.)
CREATE FUNCTION pgcrew.bound_task_error(p_error text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN length(p_error) <= 8192 THEN p_error
                ELSE left(p_error, 8192 - length(' … [truncated:  characters in all]')
                                        - length(length(p_error)::text))
                     || ' … [truncated: ' || length(p_error)::text || ' characters in all]' END
$$;

-- A task's error history with one more entry, keeping the 100 most recent.
CREATE FUNCTION pgcrew.append_task_error(p_errors jsonb, p_attempt integer, p_error text)
RETURNS jsonb LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_array_length(p_errors) >= 100
                THEN jsonb_path_query_array(p_errors, '$[last - 98 to last]')
                ELSE p_errors END
           || jsonb_build_array(jsonb_build_object('attempt', p_attempt, 'at', now(),
                                                   'error', p_error))
$$;

-- Like every pgcrew function, not executable by PUBLIC (V010: per-schema default privileges
-- cannot take away PostgreSQL's global default EXECUTE for PUBLIC, so each is revoked here).
REVOKE ALL ON FUNCTION pgcrew.queue_limits() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgcrew.bound_task_error(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgcrew.append_task_error(jsonb, integer, text) FROM PUBLIC;

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
        RETURNING t.id, t.state, t.has_dependants)
    SELECT array_agg(u.id), array_agg(u.state),
           array_agg(u.id) FILTER (WHERE u.has_dependants AND u.state = 'completed'),
           array_agg(u.id) FILTER (WHERE u.has_dependants AND u.state IN ('discarded', 'cancelled'))
      INTO v_ids, v_states, v_completed, v_failed
      FROM u;
    IF v_completed IS NOT NULL THEN
        PERFORM pgcrew.resolve_dependants(v_completed);
    END IF;
    IF v_failed IS NOT NULL THEN
        PERFORM pgcrew.cancel_dependants(v_failed, 'a dependency was discarded or cancelled');
    END IF;
    IF v_ids IS NOT NULL THEN
        RETURN QUERY SELECT x.id, x.state FROM unnest(v_ids, v_states) AS x(id, state);
    END IF;
END $$;

-- Claims, as in V008 (secret-keyed tenant lock, fair shares, promotion), with the tasks of each
-- queue set running before the next queue is looked at, so every limit count includes what
-- this call already claimed.
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
    FOREACH v_q IN ARRAY p_queues LOOP
        EXIT WHEN v_left <= 0;
        -- Promote this queue's due scheduled / retryable tasks (bounded per claim).
        UPDATE pgcrew.tasks t SET state = 'available'
         WHERE t.id IN (SELECT s.id FROM pgcrew.tasks s
                         WHERE s.state IN ('scheduled', 'retryable') AND s.pending_deps = 0
                           AND s.queue = v_q AND s.run_at <= now()
                         ORDER BY s.run_at LIMIT 1000
                         FOR UPDATE SKIP LOCKED);
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
        SELECT array_agg(act.tid) INTO v_tenants FROM act WHERE act.tid IS NOT NULL;
        CONTINUE WHEN v_tenants IS NULL;
        v_n := cardinality(v_tenants);
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
        END LOOP;
        -- Fast path: one unlimited tenant: claim in one statement.
        IF v_n = 1 AND v_caps[1] IS NULL THEN
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
            CONTINUE;
        END IF;
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
                v_got := ARRAY(SELECT a.id FROM pgcrew.tasks a
                                WHERE a.state = 'available' AND a.queue = v_q AND a.tenant_id = v_t
                                  AND NOT (a.id = ANY (v_ids))
                                ORDER BY a.priority, a.run_at, a.id
                                LIMIT v_take
                                FOR UPDATE SKIP LOCKED);
                v_ids := v_ids || v_got;
                v_left := v_left - cardinality(v_got);
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
    END LOOP;
END $$;

-- Retry a task now, as in V003, but a dependant waits for its parents again: it becomes
-- `scheduled` with its pending dependencies recounted from the parents' states (parents that
-- no longer exist, deleted by retention after finishing, count as done), or `available` when
-- none is pending. A parent that was discarded or cancelled will never complete: the retry is
-- refused (PC024) until that parent is retried. Running tasks are left alone.
CREATE OR REPLACE FUNCTION pgcrew.retry_task(p_id bigint)
RETURNS TABLE (previous_state text, state text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_prev text;
    v_deps bigint[];
    v_queue text;
    v_pending integer := 0;
    v_bad bigint;
    v_bad_state text;
    v_new text;
BEGIN
    SELECT t.state, t.depends_on, t.queue INTO v_prev, v_deps, v_queue
      FROM pgcrew.tasks t WHERE t.id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_prev = 'running' THEN
        RETURN QUERY SELECT v_prev, v_prev;
        RETURN;
    END IF;
    -- Parents are read, not locked (a parent's acknowledgement locks the parent, then its
    -- dependants: locking in the other order here could deadlock). A parent finishing
    -- concurrently updates this (locked) row after we commit, and sees it scheduled.
    IF v_deps IS NOT NULL AND cardinality(v_deps) > 0 THEN
        SELECT p.id, p.state INTO v_bad, v_bad_state FROM pgcrew.tasks p
         WHERE p.id = ANY (v_deps) AND p.state IN ('discarded', 'cancelled')
         ORDER BY p.id LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'task % depends on task %, which is %: retry task % first', p_id,
                v_bad, v_bad_state, v_bad
                USING ERRCODE = 'PC024',
                      HINT = 'a dependant runs only after all its parents completed';
        END IF;
        SELECT count(*) INTO v_pending FROM pgcrew.tasks p
         WHERE p.id = ANY (v_deps) AND p.state <> 'completed';
    END IF;
    v_new := CASE WHEN v_pending > 0 THEN 'scheduled' ELSE 'available' END;
    UPDATE pgcrew.tasks t
       SET state = v_new, run_at = now(), finalized_at = NULL, pending_deps = v_pending,
           cancel_requested_at = NULL, claim_token = NULL,
           max_attempts = greatest(t.max_attempts, t.attempts + 1)
     WHERE t.id = p_id;
    IF v_new = 'available' THEN
        PERFORM pg_notify('pgcrew_task_available', json_build_object('queue', v_queue)::text);
    END IF;
    RETURN QUERY SELECT v_prev, v_new;
END $$;

-- Enqueue, as in V007, refusing oversized payloads and delays beyond the maximum before
-- anything is written.
CREATE OR REPLACE FUNCTION pgcrew.enqueue_task(
    p_queue text, p_kind text, p_tenant text, p_run uuid, p_priority smallint, p_payload jsonb,
    p_delay_us bigint, p_run_at timestamptz, p_max_attempts integer, p_unique_key text,
    p_depends_on bigint[])
RETURNS TABLE (id bigint, state text, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v_size integer := octet_length(p_payload::text);
BEGIN
    IF v_size > 262144 THEN
        RAISE EXCEPTION 'payload is % bytes of JSON; at most 262144 are allowed', v_size
            USING ERRCODE = 'PC021',
                  HINT = 'store large data elsewhere (e.g. an artifact) and pass a reference';
    END IF;
    IF p_delay_us > 315360000000000 THEN
        RAISE EXCEPTION 'delay is % µs; at most 3650 days (315360000000000 µs) are allowed', p_delay_us
            USING ERRCODE = 'PC022', HINT = 'give a run_at instead, or a shorter delay';
    END IF;
    SELECT i.id, i.state, i.duplicate INTO r
      FROM pgcrew.insert_task(p_queue, p_kind, p_tenant, p_run, p_priority, p_payload,
                              p_delay_us, p_run_at, p_max_attempts, p_unique_key,
                              p_depends_on) i;
    -- As pgcrew.wake_queues(ARRAY[p_queue]), inline (see V007).
    IF r.state = 'available' AND NOT r.duplicate
       AND EXISTS (SELECT FROM pgcrew.queue_waiters w WHERE w.queue = p_queue) THEN
        PERFORM pg_notify('pgcrew_task_available', json_build_object('queue', p_queue)::text);
    END IF;
    RETURN QUERY SELECT r.id, r.state, r.duplicate;
END $$;
