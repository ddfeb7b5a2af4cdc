-- pgcrew durable task queue: the tasks table, its indexes and autovacuum settings, the claim /
-- acknowledge / enqueue functions, per-tenant (and per-queue) concurrency limits, dependency
-- resolution, the wake-up trigger and the queue_stats view.
--
-- Task states: scheduled (delayed, snoozed or waiting on dependencies) | available -> running ->
-- completed | retryable (waiting for its backoff) -> available ... | discarded | cancelled.

CREATE TABLE pgcrew.tasks (
    id                  bigserial PRIMARY KEY,
    queue               text NOT NULL CHECK (length(queue) BETWEEN 1 AND 128),
    kind                text NOT NULL CHECK (length(kind) BETWEEN 1 AND 128),
    -- References pgcrew.tenants(id). Enforced per statement instead of per row (a row-level
    -- foreign key costs ~40 % of bulk-enqueue throughput): enqueue locks the named tenants
    -- FOR KEY SHARE once per statement, and deleting a tenant that still has tasks is refused.
    tenant_id           text NOT NULL DEFAULT 'default',
    run_id              uuid,
    -- 0 critical, 1 high, 2 normal, 3 low, 4 batch
    priority            smallint NOT NULL DEFAULT 2 CHECK (priority BETWEEN 0 AND 4),
    state               text NOT NULL DEFAULT 'available'
                        CHECK (state IN ('scheduled', 'available', 'running', 'completed',
                                         'retryable', 'discarded', 'cancelled')),
    payload             jsonb NOT NULL DEFAULT '{}'::jsonb,
    attempts            integer NOT NULL DEFAULT 0,
    max_attempts        integer NOT NULL DEFAULT 25 CHECK (max_attempts > 0),
    run_at              timestamptz NOT NULL DEFAULT now(),
    claimed_by          text,
    claim_token         uuid,
    claimed_at          timestamptz,
    heartbeat_at        timestamptz,
    last_error          text,
    errors              jsonb NOT NULL DEFAULT '[]'::jsonb,
    unique_key          text,
    depends_on          bigint[],
    pending_deps        integer NOT NULL DEFAULT 0,
    has_dependants      boolean NOT NULL DEFAULT false,
    cancel_requested_at timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    finalized_at        timestamptz
) WITH (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- Claiming: per queue, per tenant (fairness skip-scan), then priority / due time / id.
CREATE INDEX tasks_available_idx ON pgcrew.tasks (queue, tenant_id, priority, run_at, id)
    WHERE state = 'available';
-- Promotion of due scheduled / retryable tasks.
CREATE INDEX tasks_due_idx ON pgcrew.tasks (queue, run_at)
    WHERE state IN ('scheduled', 'retryable') AND pending_deps = 0;
-- Running tasks: tenant limits, heartbeat rescue.
CREATE INDEX tasks_running_idx ON pgcrew.tasks (tenant_id, queue) WHERE state = 'running';
-- Retention.
CREATE INDEX tasks_finalized_idx ON pgcrew.tasks (finalized_at)
    WHERE state IN ('completed', 'discarded', 'cancelled');
-- Unique keys deduplicate among non-final tasks.
CREATE UNIQUE INDEX tasks_unique_idx ON pgcrew.tasks (tenant_id, queue, unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'running', 'retryable');
-- Dependants of a task.
CREATE INDEX tasks_depends_on_idx ON pgcrew.tasks USING gin (depends_on)
    WHERE depends_on IS NOT NULL;
CREATE INDEX tasks_run_idx ON pgcrew.tasks (run_id) WHERE run_id IS NOT NULL;

CREATE FUNCTION pgcrew.tenants_restrict_tasks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pgcrew.tasks t WHERE t.tenant_id = OLD.id) THEN
        RAISE EXCEPTION 'tenant % still has tasks', OLD.id
            USING ERRCODE = 'foreign_key_violation', HINT = 'delete or let retention remove its tasks first';
    END IF;
    RETURN OLD;
END $$;

CREATE TRIGGER tenants_restrict_tasks BEFORE DELETE ON pgcrew.tenants
    FOR EACH ROW EXECUTE FUNCTION pgcrew.tenants_restrict_tasks();

-- Optional per-(tenant, queue) concurrency limits, on top of tenants.max_concurrent_tasks.
CREATE TABLE pgcrew.tenant_queue_limits (
    tenant_id            text NOT NULL REFERENCES pgcrew.tenants (id) ON DELETE CASCADE,
    queue                text NOT NULL,
    max_concurrent_tasks integer NOT NULL CHECK (max_concurrent_tasks > 0),
    PRIMARY KEY (tenant_id, queue)
);

-- Worker pools that ran out of work and wait for more register here per queue (and leave when
-- they are saturated). NOTIFY is only sent for queues that have a waiting pool, so a busy
-- system pays nothing for wake-ups. Unlogged: after a crash pools re-register on their next
-- idle cycle (and poll meanwhile).
CREATE UNLOGGED TABLE pgcrew.queue_waiters (
    queue       text NOT NULL,
    pool_id     uuid NOT NULL,
    instance_id text NOT NULL REFERENCES pgcrew.instances (id) ON DELETE CASCADE,
    since       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, pool_id)
);

-- Wake-up: one NOTIFY per queue with a waiting pool per inserting statement (PostgreSQL folds
-- identical payloads within a transaction, so at most one per transaction per queue is
-- delivered).
CREATE FUNCTION pgcrew.notify_tasks_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    q text;
BEGIN
    FOR q IN SELECT DISTINCT n.queue FROM new_tasks n
              WHERE n.state = 'available'
                AND EXISTS (SELECT 1 FROM pgcrew.queue_waiters w WHERE w.queue = n.queue) LOOP
        PERFORM pg_notify('pgcrew_task_available', json_build_object('queue', q)::text);
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER tasks_inserted AFTER INSERT ON pgcrew.tasks
    REFERENCING NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION pgcrew.notify_tasks_inserted();

-- Cancel every not-yet-started task depending (transitively) on one of p_parents.
CREATE FUNCTION pgcrew.cancel_dependants(p_parents bigint[], p_reason text) RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_total integer := 0;
    v_n integer;
    v_next bigint[];
BEGIN
    WHILE p_parents IS NOT NULL AND cardinality(p_parents) > 0 LOOP
        WITH c AS (
            UPDATE pgcrew.tasks d
               SET state = 'cancelled', finalized_at = now(), pending_deps = 0,
                   last_error = p_reason,
                   errors = d.errors || jsonb_build_array(jsonb_build_object(
                       'attempt', d.attempts, 'at', now(), 'error', p_reason))
             WHERE d.depends_on && p_parents
               AND d.depends_on IS NOT NULL
               AND d.state IN ('scheduled', 'available', 'retryable')
            RETURNING d.id, d.has_dependants)
        SELECT count(*), array_agg(c.id) FILTER (WHERE c.has_dependants) INTO v_n, v_next FROM c;
        v_total := v_total + v_n;
        p_parents := v_next;
    END LOOP;
    RETURN v_total;
END $$;

-- Parents completed: count them off their dependants; wake workers for dependants now due.
CREATE FUNCTION pgcrew.resolve_dependants(p_parents bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_n integer := 0;
    q text;
BEGIN
    IF p_parents IS NULL OR cardinality(p_parents) = 0 THEN
        RETURN 0;
    END IF;
    FOR q IN
        WITH u AS (
            UPDATE pgcrew.tasks d
               SET pending_deps = greatest(0, d.pending_deps
                   - (SELECT count(*) FROM unnest(d.depends_on) x WHERE x = ANY (p_parents)))
             WHERE d.depends_on && p_parents
               AND d.depends_on IS NOT NULL
               AND d.state = 'scheduled'
               AND d.pending_deps > 0
            RETURNING d.queue, d.pending_deps, d.run_at)
        SELECT DISTINCT u.queue FROM u WHERE u.pending_deps = 0 AND u.run_at <= now()
    LOOP
        v_n := v_n + 1;
        PERFORM pg_notify('pgcrew_task_available', json_build_object('queue', q)::text);
    END LOOP;
    RETURN v_n;
END $$;

-- Enqueue one task (dependencies, unique key, delay) atomically. Returns the task (the existing
-- one when the unique key is already taken by a non-final task).
CREATE FUNCTION pgcrew.enqueue_task(
    p_queue text, p_kind text, p_tenant text, p_run uuid, p_priority smallint, p_payload jsonb,
    p_delay_us bigint, p_run_at timestamptz, p_max_attempts integer, p_unique_key text,
    p_depends_on bigint[])
RETURNS TABLE (id bigint, state text, duplicate boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_run_at timestamptz := coalesce(p_run_at, now() + coalesce(p_delay_us, 0) * interval '1 microsecond');
    v_state text;
    v_pending integer := 0;
    v_found integer := 0;
    v_bad bigint;
    v_missing bigint[];
    v_id bigint;
    v_deps bigint[];
BEGIN
    PERFORM 1 FROM pgcrew.tenants tn WHERE tn.id = p_tenant FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant % does not exist', p_tenant
            USING ERRCODE = 'foreign_key_violation', HINT = 'pgcrew_unknown_tenant';
    END IF;
    IF p_unique_key IS NOT NULL THEN
        SELECT t.id, t.state INTO v_id, v_state FROM pgcrew.tasks t
         WHERE t.tenant_id = p_tenant AND t.queue = p_queue AND t.unique_key = p_unique_key
           AND t.state IN ('scheduled', 'available', 'running', 'retryable');
        IF FOUND THEN
            RETURN QUERY SELECT v_id, v_state, true;
            RETURN;
        END IF;
    END IF;
    IF p_depends_on IS NOT NULL AND cardinality(p_depends_on) > 0 THEN
        SELECT array_agg(DISTINCT x) INTO v_deps FROM unnest(p_depends_on) x;
        -- Lock the parents (their completion waits for this transaction) and mark them.
        WITH p AS (
            UPDATE pgcrew.tasks t SET has_dependants = true
             WHERE t.id = ANY (v_deps)
            RETURNING t.id, t.state)
        SELECT count(*), count(*) FILTER (WHERE p.state <> 'completed'),
               min(p.id) FILTER (WHERE p.state IN ('discarded', 'cancelled')),
               array(SELECT x FROM unnest(v_deps) x EXCEPT SELECT p2.id FROM p p2)
          INTO v_found, v_pending, v_bad, v_missing FROM p;
        IF v_found < cardinality(v_deps) THEN
            RAISE EXCEPTION 'depends_on: task(s) % do not exist', v_missing
                USING ERRCODE = 'foreign_key_violation', HINT = 'pgcrew_missing_dependency';
        END IF;
    END IF;
    IF v_bad IS NOT NULL THEN
        v_state := 'cancelled';
    ELSIF v_pending > 0 OR v_run_at > now() THEN
        v_state := 'scheduled';
    ELSE
        v_state := 'available';
    END IF;
    INSERT INTO pgcrew.tasks AS t (queue, kind, tenant_id, run_id, priority, state, payload,
                                   max_attempts, run_at, unique_key, depends_on, pending_deps,
                                   finalized_at, last_error, errors)
    VALUES (p_queue, p_kind, p_tenant, p_run, p_priority, v_state, p_payload, p_max_attempts,
            v_run_at, p_unique_key, v_deps, CASE WHEN v_bad IS NULL THEN v_pending ELSE 0 END,
            CASE WHEN v_bad IS NOT NULL THEN now() END,
            CASE WHEN v_bad IS NOT NULL THEN format('dependency %s was discarded or cancelled', v_bad) END,
            CASE WHEN v_bad IS NOT NULL THEN jsonb_build_array(jsonb_build_object('attempt', 0, 'at', now(),
                 'error', format('dependency %s was discarded or cancelled', v_bad))) ELSE '[]'::jsonb END)
    ON CONFLICT (tenant_id, queue, unique_key)
        WHERE unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'running', 'retryable')
        DO NOTHING
    RETURNING t.id INTO v_id;
    IF v_id IS NULL THEN
        -- Lost a race on the unique key: the winner has committed by now.
        SELECT t.id, t.state INTO v_id, v_state FROM pgcrew.tasks t
         WHERE t.tenant_id = p_tenant AND t.queue = p_queue AND t.unique_key = p_unique_key
           AND t.state IN ('scheduled', 'available', 'running', 'retryable');
        RETURN QUERY SELECT v_id, v_state, true;
        RETURN;
    END IF;
    RETURN QUERY SELECT v_id, v_state, false;
END $$;

-- Round-robin start for claims smaller than the number of tenants with work.
CREATE SEQUENCE pgcrew.task_claim_rotation AS bigint CYCLE;

-- Claim up to p_limit tasks from p_queues for instance p_instance, fairly across tenants and
-- within every tenant's (and tenant-queue's) concurrency limit. Limits are exact: claims of a
-- limited tenant are serialised by a transaction-scoped advisory lock, taken with try-lock so
-- claimers never wait on each other (a busy tenant is skipped for this cycle: its lock holder
-- is serving it).
CREATE FUNCTION pgcrew.claim_tasks(p_queues text[], p_limit integer, p_instance text)
RETURNS TABLE (id bigint, queue text, kind text, tenant_id text, run_id uuid, priority smallint,
               payload jsonb, attempts integer, max_attempts integer, claim_token uuid,
               run_at timestamptz, created_at timestamptz, lag_us bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_token uuid := gen_random_uuid();
    v_ids bigint[] := '{}';
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
BEGIN
    IF p_limit IS NULL OR p_limit <= 0 THEN
        RETURN;
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
        v_caps := array_fill(NULL::integer, ARRAY[v_n]);
        FOR v_i IN 1..v_n LOOP
            v_t := v_tenants[v_i];
            SELECT tn.max_concurrent_tasks INTO v_lim FROM pgcrew.tenants tn WHERE tn.id = v_t;
            SELECT l.max_concurrent_tasks INTO v_qlim FROM pgcrew.tenant_queue_limits l
             WHERE l.tenant_id = v_t AND l.queue = v_q;
            IF v_lim IS NOT NULL OR v_qlim IS NOT NULL THEN
                IF NOT pg_try_advisory_xact_lock(hashtextextended('pgcrew.tenant_tasks:' || v_t, 0)) THEN
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
        -- Fast path: one unlimited tenant and nothing collected yet: claim in one statement.
        IF v_n = 1 AND v_caps[1] IS NULL AND cardinality(v_ids) = 0 THEN
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
            RETURN;
        END IF;
        -- Pass 1: an equal share each (when tenants outnumber the batch, successive claims start
        -- at successive tenants: round robin); pass 2: leftover capacity to tenants with work.
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
    END LOOP;

    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE pgcrew.tasks t
       SET state = 'running', attempts = t.attempts + 1, claimed_by = p_instance,
           claim_token = v_token, claimed_at = now(), heartbeat_at = now()
     WHERE t.id = ANY (v_ids)
    RETURNING t.id, t.queue, t.kind, t.tenant_id, t.run_id, t.priority, t.payload, t.attempts,
              t.max_attempts, t.claim_token, t.run_at, t.created_at,
              (extract(epoch FROM (now() - t.run_at)) * 1000000)::bigint;
END $$;

-- Acknowledge many claimed tasks at once. Outcomes: complete | fail (retryable after p_delays,
-- or discarded after max_attempts) | snooze (scheduled after p_delays, attempt given back) |
-- discard. An ack whose (id, claim token) does not match a running task is ignored (not
-- returned): the task was rescued and possibly reclaimed since.
CREATE FUNCTION pgcrew.ack_tasks(p_ids bigint[], p_tokens uuid[], p_outcomes text[],
                                 p_delays_us bigint[], p_errors text[])
RETURNS TABLE (id bigint, state text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_ids bigint[];
    v_states text[];
    v_completed bigint[];
    v_failed bigint[];
BEGIN
    WITH a AS (
        SELECT * FROM unnest(p_ids, p_tokens, p_outcomes, p_delays_us, p_errors)
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
                             THEN now() + coalesce(a.delay_us, 0) * interval '1 microsecond'
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
                             ELSE t.errors || jsonb_build_array(jsonb_build_object(
                                  'attempt', t.attempts, 'at', now(), 'error', a.err)) END
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

-- Return running tasks of dead instances (or with stale heartbeats) to retryable (due now), or
-- discard them when out of attempts. Returns (id, state) of every rescued task.
CREATE FUNCTION pgcrew.rescue_tasks(p_timeout_us bigint, p_limit integer)
RETURNS TABLE (id bigint, state text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_ids bigint[];
    v_states text[];
    v_failed bigint[];
BEGIN
    WITH s AS (
        SELECT r.id FROM pgcrew.tasks r
         WHERE r.state = 'running'
           AND (r.heartbeat_at < now() - p_timeout_us * interval '1 microsecond'
                OR r.claimed_by IS NULL
                OR NOT EXISTS (SELECT 1 FROM pgcrew.instances i WHERE i.id = r.claimed_by))
         ORDER BY r.id
         LIMIT p_limit
         FOR UPDATE SKIP LOCKED),
    u AS (
        UPDATE pgcrew.tasks t
           SET state = CASE WHEN t.attempts >= t.max_attempts THEN 'discarded' ELSE 'retryable' END,
               finalized_at = CASE WHEN t.attempts >= t.max_attempts THEN now() END,
               run_at = now(),
               claim_token = NULL,
               heartbeat_at = NULL,
               last_error = format('rescued: instance %s stopped heartbeating the task', t.claimed_by),
               errors = t.errors || jsonb_build_array(jsonb_build_object(
                   'attempt', t.attempts, 'at', now(),
                   'error', format('rescued: instance %s stopped heartbeating the task', t.claimed_by)))
          FROM s WHERE t.id = s.id
        RETURNING t.id, t.state, t.has_dependants)
    SELECT array_agg(u.id), array_agg(u.state),
           array_agg(u.id) FILTER (WHERE u.has_dependants AND u.state = 'discarded')
      INTO v_ids, v_states, v_failed
      FROM u;
    IF v_failed IS NOT NULL THEN
        PERFORM pgcrew.cancel_dependants(v_failed, 'a dependency was discarded');
    END IF;
    IF v_ids IS NOT NULL THEN
        RETURN QUERY SELECT x.id, x.state FROM unnest(v_ids, v_states) AS x(id, state);
    END IF;
END $$;

-- Per queue and state: counts, oldest available age.
CREATE VIEW pgcrew.queue_stats AS
SELECT t.queue,
       t.state,
       count(*) AS tasks,
       min(t.run_at) FILTER (WHERE t.state = 'available') AS oldest_available_run_at,
       CASE WHEN t.state = 'available'
            THEN extract(epoch FROM now() - min(t.run_at))::double precision END AS oldest_available_age_s
FROM pgcrew.tasks t
GROUP BY t.queue, t.state;

-- Cancel a task: not-started tasks (and their dependants) are cancelled at once; a running task
-- gets cancel_requested_at (its worker sees it at the next heartbeat and cancels the handler).
-- Returns the previous and the new state; no row when the task does not exist.
CREATE FUNCTION pgcrew.cancel_task(p_id bigint)
RETURNS TABLE (previous_state text, state text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_prev text;
    v_deps boolean;
BEGIN
    SELECT t.state, t.has_dependants INTO v_prev, v_deps FROM pgcrew.tasks t WHERE t.id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_prev IN ('scheduled', 'available', 'retryable') THEN
        UPDATE pgcrew.tasks t
           SET state = 'cancelled', finalized_at = now(), pending_deps = 0,
               last_error = 'cancelled by request',
               errors = t.errors || jsonb_build_array(jsonb_build_object(
                   'attempt', t.attempts, 'at', now(), 'error', 'cancelled by request'))
         WHERE t.id = p_id;
        IF v_deps THEN
            PERFORM pgcrew.cancel_dependants(ARRAY[p_id], 'a dependency was cancelled');
        END IF;
        RETURN QUERY SELECT v_prev, 'cancelled'::text;
    ELSIF v_prev = 'running' THEN
        UPDATE pgcrew.tasks t SET cancel_requested_at = coalesce(t.cancel_requested_at, now())
         WHERE t.id = p_id;
        RETURN QUERY SELECT v_prev, 'running'::text;
    ELSE
        RETURN QUERY SELECT v_prev, v_prev;
    END IF;
END $$;

-- Retry a task now: discarded, cancelled, retryable, scheduled or completed tasks become
-- available again (with at least one attempt left). Running tasks are left alone.
CREATE FUNCTION pgcrew.retry_task(p_id bigint)
RETURNS TABLE (previous_state text, state text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_prev text;
BEGIN
    SELECT t.state INTO v_prev FROM pgcrew.tasks t WHERE t.id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_prev = 'running' THEN
        RETURN QUERY SELECT v_prev, v_prev;
        RETURN;
    END IF;
    UPDATE pgcrew.tasks t
       SET state = 'available', run_at = now(), finalized_at = NULL, pending_deps = 0,
           cancel_requested_at = NULL, claim_token = NULL,
           max_attempts = greatest(t.max_attempts, t.attempts + 1)
     WHERE t.id = p_id;
    PERFORM pg_notify('pgcrew_task_available', json_build_object('queue', t.queue)::text)
       FROM pgcrew.tasks t WHERE t.id = p_id;
    RETURN QUERY SELECT v_prev, 'available'::text;
END $$;
