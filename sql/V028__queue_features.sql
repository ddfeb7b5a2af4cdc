-- pgcrew V028: queue features (issue #21): pausing a queue (for every tenant or for one),
-- schedules (cron or fixed interval, fired by the leader, each fire once), and the queue
-- depth view for auto-scaling.
--
-- SQLSTATEs: PC100 unknown queue (pause), PC101 invalid schedule (time zone, interval,
-- misfire policy, missing spec), PC102 unknown schedule, PC103 invalid rate limit.
--
-- Also: per-key concurrency limits (pgcrew.queue_key_limits), rate limits per queue, kind
-- and tenant (token buckets in pgcrew.rate_limits) and backpressure thresholds
-- (pgcrew.queue_backpressure).
--
-- Redefines pgcrew.claim_tasks (V011's body, plus: paused queues and paused tenants of a queue
-- are skipped; due tasks are still promoted; key limits and rate limits hold).

-- ---------------------------------------------------------------------------------------------
-- Schedules
-- ---------------------------------------------------------------------------------------------

-- A named schedule: a cron expression (5 fields, or 6 with seconds first) evaluated in
-- time_zone, or a fixed interval (fires at whole multiples of it since the Unix epoch), and the
-- task each fire enqueues. The leader fires due schedules (next_fire_at <= now()); NULL
-- next_fire_at means "not computed yet": the leader sets it to the next fire after now without
-- firing (so enabling a schedule never fires for the time it was disabled).
-- misfire: what happens to fires more than the grace period (5 s) late, after downtime or a
-- long failover: 'skip' drops them, 'catch_up_one' enqueues the most recent one of them.
-- Fires within the grace period are always enqueued.
CREATE TABLE pgcrew.schedules (
    name         text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 128),
    cron         text CHECK (length(cron) BETWEEN 1 AND 256),
    time_zone    text NOT NULL DEFAULT 'UTC',
    interval_us  bigint,
    queue        text NOT NULL DEFAULT 'default' CHECK (length(queue) BETWEEN 1 AND 128),
    kind         text NOT NULL CHECK (length(kind) BETWEEN 1 AND 128),
    tenant_id    text NOT NULL DEFAULT 'default' REFERENCES pgcrew.tenants (id) ON DELETE CASCADE,
    payload      jsonb NOT NULL DEFAULT '{}'::jsonb,
    priority     smallint NOT NULL DEFAULT 2 CHECK (priority BETWEEN 0 AND 4),
    max_attempts integer NOT NULL DEFAULT 25 CHECK (max_attempts > 0),
    enabled      boolean NOT NULL DEFAULT true,
    misfire      text NOT NULL DEFAULT 'skip',
    next_fire_at timestamptz,
    last_fire_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_due_idx ON pgcrew.schedules (next_fire_at) WHERE enabled;

-- Every fire, once: the primary key makes a second leader (overlap, restart, failover) unable
-- to enqueue a fire again. task_id is the task it enqueued; manual marks `fire-now`.
CREATE TABLE pgcrew.schedule_fires (
    schedule   text NOT NULL REFERENCES pgcrew.schedules (name) ON DELETE CASCADE,
    fire_at    timestamptz NOT NULL,
    task_id    bigint,
    manual     boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, fire_at)
);
CREATE INDEX schedule_fires_created_idx ON pgcrew.schedule_fires (created_at);

-- Refuse an invalid schedule (PC101): neither or both of cron and interval, an interval that
-- is not positive, an unknown time zone or misfire policy. The cron expression itself is
-- checked by the library (`pgcrew schedules set`); a row written by hand with an expression
-- the leader cannot parse is logged and left alone.
CREATE FUNCTION pgcrew.check_schedule() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.cron IS NULL) = (NEW.interval_us IS NULL) THEN
        RAISE EXCEPTION 'schedule %: give either a cron expression or an interval, not %',
            NEW.name, CASE WHEN NEW.cron IS NULL THEN 'neither' ELSE 'both' END
            USING ERRCODE = 'PC101';
    END IF;
    IF NEW.interval_us IS NOT NULL AND NEW.interval_us <= 0 THEN
        RAISE EXCEPTION 'schedule %: the interval must be positive, not % µs', NEW.name, NEW.interval_us
            USING ERRCODE = 'PC101';
    END IF;
    IF NEW.misfire NOT IN ('skip', 'catch_up_one') THEN
        RAISE EXCEPTION 'schedule %: misfire policy % is unknown', NEW.name, NEW.misfire
            USING ERRCODE = 'PC101', HINT = 'skip or catch_up_one';
    END IF;
    IF (TG_OP = 'INSERT' OR NEW.time_zone IS DISTINCT FROM OLD.time_zone)
       AND NOT EXISTS (SELECT FROM pg_timezone_names z WHERE z.name = NEW.time_zone) THEN
        RAISE EXCEPTION 'schedule %: time zone % is unknown', NEW.name, NEW.time_zone
            USING ERRCODE = 'PC101', HINT = 'an IANA name such as UTC or Europe/Paris';
    END IF;
    RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION pgcrew.check_schedule() FROM PUBLIC;
CREATE TRIGGER schedules_check BEFORE INSERT OR UPDATE ON pgcrew.schedules
    FOR EACH ROW EXECUTE FUNCTION pgcrew.check_schedule();

-- Enqueue the fires p_fires of schedule p_name that were not enqueued before (each task as the
-- schedule's template says) and, unless p_manual, move next_fire_at to p_next. Returns the
-- fires enqueued now with their tasks. Unknown schedule: PC102.
CREATE FUNCTION pgcrew.fire_schedule(p_name text, p_fires timestamptz[], p_next timestamptz,
                                     p_manual boolean DEFAULT false)
RETURNS TABLE (fire_at timestamptz, task_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    s pgcrew.schedules;
    f timestamptz;
    v_task bigint;
BEGIN
    SELECT * INTO s FROM pgcrew.schedules sc WHERE sc.name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'schedule % does not exist', p_name USING ERRCODE = 'PC102';
    END IF;
    FOREACH f IN ARRAY coalesce(p_fires, '{}'::timestamptz[]) LOOP
        INSERT INTO pgcrew.schedule_fires (schedule, fire_at, manual) VALUES (p_name, f, p_manual)
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            SELECT e.id INTO v_task
              FROM pgcrew.enqueue_task(p_queue => s.queue, p_kind => s.kind, p_tenant => s.tenant_id,
                                       p_priority => s.priority::integer, p_payload => s.payload,
                                       p_max_attempts => s.max_attempts) e;
            UPDATE pgcrew.schedule_fires sf SET task_id = v_task
             WHERE sf.schedule = p_name AND sf.fire_at = f;
            RETURN QUERY SELECT f, v_task;
        END IF;
    END LOOP;
    IF NOT p_manual THEN
        UPDATE pgcrew.schedules sc
           SET next_fire_at = p_next,
               last_fire_at = coalesce(greatest(sc.last_fire_at, (SELECT max(x) FROM unnest(p_fires) x)),
                                       sc.last_fire_at)
         WHERE sc.name = p_name;
    END IF;
END $$;

-- Enable or disable a schedule. Enabling clears next_fire_at: the leader computes the next fire
-- after now, so the time it was disabled is never caught up. Unknown schedule: PC102.
CREATE FUNCTION pgcrew.set_schedule_enabled(p_name text, p_enabled boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_was boolean;
BEGIN
    SELECT sc.enabled INTO v_was FROM pgcrew.schedules sc WHERE sc.name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'schedule % does not exist', p_name USING ERRCODE = 'PC102';
    END IF;
    UPDATE pgcrew.schedules sc
       SET enabled = p_enabled, updated_at = now(),
           next_fire_at = CASE WHEN p_enabled AND NOT v_was THEN NULL ELSE sc.next_fire_at END
     WHERE sc.name = p_name;
    RETURN v_was IS DISTINCT FROM p_enabled;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Concurrency per key
-- ---------------------------------------------------------------------------------------------

-- At most max_running tasks of `queue` run at once per key, fleet-wide; a task's key is the
-- value of its payload's field key_field (payload {"customer": 42} with key_field 'customer' is
-- the key customer:42); tasks without the field are not limited. Claims of a queue with a key
-- limit are serialised by a transaction-scoped advisory lock on the queue and count the running
-- tasks per key under it, so the limit is exact under any number of claimers.
CREATE TABLE pgcrew.queue_key_limits (
    queue       text PRIMARY KEY CHECK (length(queue) BETWEEN 1 AND 128),
    key_field   text NOT NULL CHECK (length(key_field) BETWEEN 1 AND 128),
    max_running integer NOT NULL CONSTRAINT queue_key_limits_max_running_positive CHECK (max_running > 0)
);

-- ---------------------------------------------------------------------------------------------
-- Rate limits
-- ---------------------------------------------------------------------------------------------

-- Token buckets: claims of a queue, of a kind (in any queue) or of a tenant (in any queue) take
-- one token each; a bucket holds at most `burst` tokens and gains `per_second` a second. A task
-- that finds no token stays available (no attempt is used) until a later claim finds one.
-- Every claimer takes tokens in the transaction that claims, holding the bucket row, so the
-- rate holds across instances.
CREATE TABLE pgcrew.rate_limits (
    scope       text NOT NULL CHECK (scope IN ('queue', 'kind', 'tenant')),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    per_second  double precision NOT NULL CHECK (per_second > 0 AND per_second <= 1e9),
    burst       integer NOT NULL CHECK (burst >= 1),
    tokens      double precision NOT NULL,
    refilled_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, name)
);

-- A bucket's tokens now: what it held plus what it gained since, at most its burst.
CREATE FUNCTION pgcrew.rate_tokens(l pgcrew.rate_limits) RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT least(l.burst::double precision,
                 l.tokens + l.per_second * greatest(0, extract(epoch FROM now() - l.refilled_at)))
$$;

-- Set (or replace) a rate limit: p_per_second claims a second of the queue, kind or tenant
-- p_name, bursts of up to p_burst (default: one second's worth, at least 1). A rate that is
-- not positive (or not a number), a burst below 1 or an unknown scope: PC103, nothing stored.
CREATE FUNCTION pgcrew.set_rate_limit(p_scope text, p_name text, p_per_second double precision,
                                      p_burst integer DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_burst integer;
BEGIN
    IF p_scope IS NULL OR p_scope NOT IN ('queue', 'kind', 'tenant') THEN
        RAISE EXCEPTION 'rate limit scope % is unknown', p_scope
            USING ERRCODE = 'PC103', HINT = 'queue, kind or tenant';
    END IF;
    IF p_name IS NULL OR length(p_name) NOT BETWEEN 1 AND 128 THEN
        RAISE EXCEPTION 'rate limit: the % name must be 1 to 128 characters', p_scope
            USING ERRCODE = 'PC103';
    END IF;
    IF p_per_second IS NULL OR p_per_second = 'NaN' OR p_per_second <= 0 OR p_per_second > 1e9 THEN
        RAISE EXCEPTION 'rate limit of % %: the rate must be above 0 (and at most 1e9) per second, not %',
            p_scope, p_name, p_per_second
            USING ERRCODE = 'PC103', HINT = 'to stop claims, pause the queue instead';
    END IF;
    v_burst := coalesce(p_burst, greatest(1, ceil(p_per_second))::integer);
    IF v_burst < 1 THEN
        RAISE EXCEPTION 'rate limit of % %: the burst must be at least 1, not %', p_scope, p_name, v_burst
            USING ERRCODE = 'PC103';
    END IF;
    INSERT INTO pgcrew.rate_limits AS l (scope, name, per_second, burst, tokens)
    VALUES (p_scope, p_name, p_per_second, v_burst, v_burst)
    ON CONFLICT (scope, name) DO UPDATE
       SET per_second = EXCLUDED.per_second, burst = EXCLUDED.burst,
           tokens = least(pgcrew.rate_tokens(l), EXCLUDED.burst), refilled_at = now();
END $$;

-- ---------------------------------------------------------------------------------------------
-- Backpressure
-- ---------------------------------------------------------------------------------------------

-- Thresholds producers can ask to be held to: at most max_available tasks available in
-- `queue` (tenant_id NULL), or of one tenant in it. Checked by the library's
-- `enqueue_with_backpressure` before it enqueues (a soft limit: concurrent producers may pass
-- it by a few tasks); plain enqueues ignore it.
CREATE TABLE pgcrew.queue_backpressure (
    queue         text NOT NULL CHECK (length(queue) BETWEEN 1 AND 128),
    tenant_id     text REFERENCES pgcrew.tenants (id) ON DELETE CASCADE,
    max_available bigint NOT NULL CONSTRAINT queue_backpressure_max_positive CHECK (max_available > 0),
    CONSTRAINT queue_backpressure_unique UNIQUE NULLS NOT DISTINCT (queue, tenant_id)
);

-- ---------------------------------------------------------------------------------------------
-- Pause / resume
-- ---------------------------------------------------------------------------------------------

-- One row per paused queue (tenant_id NULL: every tenant) or per paused (queue, tenant).
-- The claim statements read it on every claim (an index probe on a table that is usually
-- empty), so a pause holds from the first claim that starts after it commits, on every instance.
CREATE TABLE pgcrew.queue_pauses (
    queue     text NOT NULL CHECK (length(queue) BETWEEN 1 AND 128),
    tenant_id text REFERENCES pgcrew.tenants (id) ON DELETE CASCADE,
    paused_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT queue_pauses_unique UNIQUE NULLS NOT DISTINCT (queue, tenant_id)
);

-- Whether p_queue is known: it has tasks available, due later, retrying or running (every
-- probe on an index), a worker pool waiting on it, a limit, a schedule or a pause.
CREATE FUNCTION pgcrew.queue_is_known(p_queue text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT FROM pgcrew.tasks a WHERE a.state = 'available' AND a.queue = p_queue)
        OR EXISTS (SELECT FROM pgcrew.tasks s WHERE s.state IN ('scheduled', 'retryable')
                                                AND s.pending_deps = 0 AND s.queue = p_queue)
        OR EXISTS (SELECT FROM pgcrew.tasks r WHERE r.state = 'running' AND r.queue = p_queue)
        OR EXISTS (SELECT FROM pgcrew.queue_waiters w WHERE w.queue = p_queue)
        OR EXISTS (SELECT FROM pgcrew.tenant_queue_limits l WHERE l.queue = p_queue)
        OR EXISTS (SELECT FROM pgcrew.queue_pauses p WHERE p.queue = p_queue)
        OR EXISTS (SELECT FROM pgcrew.queue_key_limits k WHERE k.queue = p_queue)
        OR EXISTS (SELECT FROM pgcrew.rate_limits l WHERE l.scope = 'queue' AND l.name = p_queue)
        OR EXISTS (SELECT FROM pgcrew.schedules sc WHERE sc.queue = p_queue)
$$;

-- Pause p_queue (p_tenant NULL: for every tenant). Claims that start after this commits take
-- nothing from it; running tasks finish. Returns false when it was paused already. An unknown
-- queue is refused (PC100), an unknown tenant too (23503, hint pgcrew_unknown_tenant).
CREATE FUNCTION pgcrew.pause_queue(p_queue text, p_tenant text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_n integer;
BEGIN
    IF p_queue IS NULL OR NOT pgcrew.queue_is_known(p_queue) THEN
        RAISE EXCEPTION 'queue % is unknown: it has no tasks, worker pool, limit or schedule', p_queue
            USING ERRCODE = 'PC100',
                  HINT = 'check the queue name (pgcrew queues list shows the known queues)';
    END IF;
    IF p_tenant IS NOT NULL THEN
        PERFORM 1 FROM pgcrew.tenants tn WHERE tn.id = p_tenant FOR KEY SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'tenant % does not exist', p_tenant
                USING ERRCODE = 'foreign_key_violation', HINT = 'pgcrew_unknown_tenant';
        END IF;
    END IF;
    INSERT INTO pgcrew.queue_pauses (queue, tenant_id) VALUES (p_queue, p_tenant)
    ON CONFLICT ON CONSTRAINT queue_pauses_unique DO NOTHING;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n > 0;
END $$;

-- Resume p_queue (p_tenant NULL: the queue-wide pause; a tenant's own pause stays). Wakes the
-- worker pools of the queue at once (pgcrew_task_available); pools that miss it find the work
-- at their next poll. Returns false when there was no such pause.
CREATE FUNCTION pgcrew.resume_queue(p_queue text, p_tenant text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_n integer;
BEGIN
    DELETE FROM pgcrew.queue_pauses p
     WHERE p.queue = p_queue AND p.tenant_id IS NOT DISTINCT FROM p_tenant;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF v_n > 0 THEN
        PERFORM pg_notify('pgcrew_task_available', json_build_object('queue', p_queue)::text);
    END IF;
    RETURN v_n > 0;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Queue depth (auto-scaling signal)
-- ---------------------------------------------------------------------------------------------

-- Per queue: tasks available now, scheduled (delayed, retryable, waiting on dependencies),
-- running, the age of the oldest available task and whether the queue is paused (for every
-- tenant; paused_tenants counts tenant pauses). `available` is the auto-scaling signal.
CREATE VIEW pgcrew.queue_depth AS
WITH q AS (
    SELECT t.queue,
           count(*) FILTER (WHERE t.state = 'available') AS available,
           count(*) FILTER (WHERE t.state IN ('scheduled', 'retryable')) AS scheduled,
           count(*) FILTER (WHERE t.state = 'running') AS running,
           min(t.run_at) FILTER (WHERE t.state = 'available') AS oldest_available_run_at
      FROM pgcrew.tasks t
     WHERE t.state IN ('available', 'scheduled', 'retryable', 'running')
     GROUP BY t.queue
    UNION ALL
    SELECT DISTINCT p.queue, 0, 0, 0, NULL::timestamptz FROM pgcrew.queue_pauses p
     WHERE NOT EXISTS (SELECT FROM pgcrew.tasks t WHERE t.queue = p.queue
                          AND t.state IN ('available', 'scheduled', 'retryable', 'running')))
SELECT q.queue, q.available, q.scheduled, q.running,
       CASE WHEN q.oldest_available_run_at IS NOT NULL
            THEN extract(epoch FROM now() - q.oldest_available_run_at)::double precision
       END AS oldest_available_age_s,
       EXISTS (SELECT FROM pgcrew.queue_pauses p WHERE p.queue = q.queue AND p.tenant_id IS NULL)
           AS paused,
       (SELECT count(*) FROM pgcrew.queue_pauses p
         WHERE p.queue = q.queue AND p.tenant_id IS NOT NULL) AS paused_tenants
  FROM q;

-- ---------------------------------------------------------------------------------------------
-- Claims
-- ---------------------------------------------------------------------------------------------

-- Claims as in V011, and: a paused queue (or a paused tenant of it) gives nothing (due tasks
-- are still promoted, so `next_due` stays accurate while paused); in a queue with a key limit,
-- tasks whose key has max_running tasks running are passed over; rate limits of the queue, of
-- each tenant and of each kind cap what is claimed and take their tokens.
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
            SELECT coalesce(jsonb_object_agg(c.k, v_key_max - c.n), '{}'::jsonb) INTO v_key_room
              FROM (SELECT x.payload ->> v_key_field AS k, count(*) AS n FROM pgcrew.tasks x
                     WHERE x.state = 'running' AND x.queue = v_q
                       AND x.payload ->> v_key_field IS NOT NULL
                     GROUP BY 1) c;
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
