-- pgcrew V048: the worker pool's single-statement claims (sql/queries/queue/claim_fast.sql and
-- claim_fast_limited.sql, V035) planned once per connection, not once per call (issue #23).
--
-- As prepared statements they were planned again on every call whenever PostgreSQL's plan
-- cache had fallen into preferring plans made for the values. It keeps a statement's generic
-- plan while that plan's cost, computed when the plan was last built, is below the average
-- cost of the plans it made for the values so far. The average starts with the pool's first
-- claims of an empty queue (cheap); a generic plan built once the queue holds work (after an
-- ANALYZE, say) costs more, so the cache went back to plans for the values, and from then on
-- it compared their cost with that stale generic cost, which it computes again only when it
-- builds a generic plan, which it no longer did. Every claim was then planned: ~0.5 ms of
-- planning (more than running it) on the path of every wake-up. Seen in `pgcrew bench
-- queue`: 3,967-5,368 plans in 6,001 wake-up claims in some runs, in others 1 and 53 (which
-- runs fell in depended on when the statistics changed). The plan does not depend on the
-- values (the queue is read through `arg`, the locking scan is bounded by a constant), so the
-- generic one is always right: a PL/pgSQL function keeps its statements' plans for the
-- session, and its SET clause makes that plan the generic one (as V043's pgcrew.next_due_in).
-- The statements are the files' as they were, their parameters now the functions'
-- arguments. Test: queue::plans::claims_are_not_planned_again_once_the_queue_changes.

-- $1 queue, $2 limit, $3 claiming instance, $4 claim token; rows as claim_fast.sql describes.
CREATE FUNCTION pgcrew.claim_fast(p_queue text, p_limit integer, p_instance text, p_token uuid)
RETURNS TABLE (id bigint, queue text, kind text, tenant_id text, run_id uuid, priority smallint,
                payload jsonb, attempts integer, max_attempts integer, claim_token uuid,
                run_at timestamptz, created_at timestamptz, lag_us bigint, trace_context text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH arg AS MATERIALIZED (SELECT p_queue AS queue, p_limit AS n),
    t1 AS (
        SELECT a.tenant_id FROM pgcrew.tasks a
         WHERE a.state = 'available' AND a.queue = (SELECT arg.queue FROM arg)
         ORDER BY a.tenant_id DESC LIMIT 1),
    -- A delayed or retryable task of the queue is due: pgcrew.claim_tasks promotes it.
    due AS (
        SELECT s.run_at FROM pgcrew.tasks s
         WHERE s.state IN ('scheduled', 'retryable') AND s.pending_deps = 0
           AND s.queue = (SELECT arg.queue FROM arg) AND s.run_at <= now()
         ORDER BY s.run_at LIMIT 1),
    -- Whether this path applies: one tenant has available work, nothing is due, no limit binds.
    ok AS (
        SELECT EXISTS (SELECT FROM t1)
           -- Another tenant has work: fair shares are pgcrew.claim_tasks's job.
           AND (SELECT o.tenant_id FROM pgcrew.tasks o
                 WHERE o.state = 'available' AND o.queue = (SELECT arg.queue FROM arg)
                   AND o.tenant_id < (SELECT t1.tenant_id FROM t1)
                 ORDER BY o.tenant_id DESC LIMIT 1) IS NULL
           AND NOT EXISTS (SELECT FROM due)
           -- The tenant is limited: pgcrew.claim_tasks counts its running tasks under a lock.
           AND NOT EXISTS (SELECT FROM pgcrew.tenants tn
                            WHERE tn.id = (SELECT t1.tenant_id FROM t1)
                              AND tn.max_concurrent_tasks IS NOT NULL)
           AND NOT EXISTS (SELECT FROM pgcrew.tenant_queue_limits l
                            WHERE l.tenant_id = (SELECT t1.tenant_id FROM t1)
                              AND l.queue = (SELECT arg.queue FROM arg))
           -- The queue (or a tenant of it) is paused, or it has a key limit or a rate limit, or
           -- some kind or tenant has a rate limit (V028; one row of pgcrew.claim_features, V031):
           -- pauses, keys and tokens are pgcrew.claim_tasks's job.
           AND NOT EXISTS (SELECT FROM pgcrew.claim_features f
                            WHERE f.queue IN ((SELECT arg.queue FROM arg), ''))
           AS applies),
    claimed AS (
        UPDATE pgcrew.tasks t
           SET state = 'running', attempts = t.attempts + 1, claimed_by = p_instance,
               claim_token = p_token, claimed_at = now(), heartbeat_at = now()
         WHERE t.id = ANY (ARRAY(
            -- The outer LIMIT takes the tasks from the locking scan one by one: only those it
            -- takes are locked. The inner one, a constant, bounds what the planner expects the
            -- scan to read (see `arg` above): at most 1,000 tasks per statement.
            SELECT c.id FROM (
                SELECT a.id FROM pgcrew.tasks a
                 WHERE a.state = 'available' AND a.queue = (SELECT arg.queue FROM arg)
                   AND a.tenant_id = (SELECT t1.tenant_id FROM t1)
                   AND (SELECT k.applies FROM ok k)
                 ORDER BY a.priority, a.run_at, a.id
                 LIMIT 1000
                 FOR UPDATE SKIP LOCKED) c
             LIMIT (SELECT arg.n FROM arg)))
        RETURNING t.id, t.queue, t.kind, t.tenant_id, t.run_id, t.priority, t.payload, t.attempts,
                  t.max_attempts, t.claim_token, t.run_at, t.created_at,
                  (extract(epoch FROM (now() - t.run_at)) * 1000000)::bigint AS lag_us,
                  t.trace_context)
    -- The claimed tasks; none claimed: one row of NULLs while the queue has work this path does
    -- not take, no row otherwise.
    SELECT c.*
      FROM (SELECT) AS one LEFT JOIN claimed c ON true
     WHERE c.id IS NOT NULL
        OR (NOT (SELECT k.applies FROM ok k)
            AND (EXISTS (SELECT FROM t1) OR EXISTS (SELECT FROM due)));
END $$;

-- $1 queue, $2 limit, $3 claiming instance, $4 claim token; rows as claim_fast_limited.sql
-- describes (with `limited`).
CREATE FUNCTION pgcrew.claim_fast_limited(p_queue text, p_limit integer, p_instance text,
                                          p_token uuid)
RETURNS TABLE (id bigint, queue text, kind text, tenant_id text, run_id uuid, priority smallint,
                payload jsonb, attempts integer, max_attempts integer, claim_token uuid,
                run_at timestamptz, created_at timestamptz, lag_us bigint, trace_context text, limited boolean)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH arg AS MATERIALIZED (SELECT p_queue AS queue),
    t1 AS (
        SELECT a.tenant_id FROM pgcrew.tasks a
         WHERE a.state = 'available' AND a.queue = (SELECT arg.queue FROM arg)
         ORDER BY a.tenant_id DESC LIMIT 1),
    -- The queue's features as this statement's snapshot saw them (none: no row), with its token
    -- bucket's version and tokens as of now (no bucket: NULLs), and whether the bucket or (of a
    -- key-limited queue) the feature row is held: locked or updated, since it was written, by a
    -- transaction other than its writer that this snapshot does not see completed (`xmax` set,
    -- not `xmin`, and not finished before the snapshot: a claimer in flight, or one that
    -- committed after this snapshot): then this steps aside rather than wait for the row, as the
    -- `SKIP LOCKED` it replaces did. A lock left by a transaction that finished without updating
    -- the row (an empty pgcrew.claim_tasks locks the bucket and writes nothing) holds nothing:
    -- before, it made every fast claim step aside to pgcrew.claim_tasks until that wrote the row,
    -- and a pool that ran out of work through the general claim left such a lock each time, so
    -- every wake-up took two claims. (A row locked and then updated by one transaction, as
    -- pgcrew.claim_tasks does, keeps that lock in its new version: `xmax` = `xmin`. An `xmax` that
    -- is a MultiXactId, several lockers at once, is read as a transaction id: at worst this then
    -- waits for the row instead of stepping aside, and the version check below still holds.)
    feat AS (
        SELECT f.paused, f.key_max, f.rate, f.claims, l.xmin AS version,
               pgcrew.rate_tokens(l) AS tokens,
               -- Each row's `xmax` (the feature row's only with a key limit) that is set and not
               -- its writer's, judged against this statement's snapshot (taken only then), the
               -- 32-bit `xmax` read as the 64-bit id it is within 2^31 of the snapshot's oldest.
               coalesce((SELECT bool_or(NOT pg_visible_in_snapshot(
                                    (s.xmin + ((h.xmax::text::bigint - s.xmin % 4294967296
                                                + 2147483648) % 4294967296 + 4294967296)
                                              % 4294967296 - 2147483648)::text::xid8,
                                    s.snap))
                           FROM (VALUES (CASE WHEN f.key_max IS NOT NULL THEN f.xmax END, f.xmin),
                                        (l.xmax, l.xmin)) h (xmax, xmin)
                          CROSS JOIN LATERAL (
                                SELECT c.snap, pg_snapshot_xmin(c.snap)::text::bigint AS xmin
                                  FROM (SELECT pg_current_snapshot() AS snap OFFSET 0) c) s
                          WHERE h.xmax <> '0'::xid AND h.xmax <> h.xmin), false) AS held
          FROM pgcrew.claim_features f
          LEFT JOIN pgcrew.rate_limits l ON l.scope = 'queue' AND l.name = f.queue
         WHERE f.queue = (SELECT arg.queue FROM arg)),
    -- How many this statement may claim, by its snapshot (0: step aside), and the features; one
    -- row while the queue has an available task, none otherwise.
    room AS (
        SELECT f.rate, f.key_max, f.claims, f.version, f.tokens, CASE
            -- Paused, or kind or tenant rate limits exist (pgcrew.claim_tasks takes their tokens).
            WHEN f.paused OR EXISTS (SELECT FROM pgcrew.claim_features g WHERE g.queue = '') THEN 0
            -- Another tenant has work: fair shares are pgcrew.claim_tasks's job.
            WHEN (SELECT o.tenant_id FROM pgcrew.tasks o
                   WHERE o.state = 'available' AND o.queue = (SELECT arg.queue FROM arg)
                     AND o.tenant_id < t1.tenant_id
                   ORDER BY o.tenant_id DESC LIMIT 1) IS NOT NULL THEN 0
            -- A delayed or retryable task is due: pgcrew.claim_tasks promotes it.
            WHEN (SELECT s.run_at FROM pgcrew.tasks s
                   WHERE s.state IN ('scheduled', 'retryable') AND s.pending_deps = 0
                     AND s.queue = (SELECT arg.queue FROM arg) AND s.run_at <= now()
                   ORDER BY s.run_at LIMIT 1) IS NOT NULL THEN 0
            -- The tenant is limited: pgcrew.claim_tasks counts its running tasks under a lock.
            WHEN EXISTS (SELECT FROM pgcrew.tenants tn
                          WHERE tn.id = t1.tenant_id AND tn.max_concurrent_tasks IS NOT NULL)
              OR EXISTS (SELECT FROM pgcrew.tenant_queue_limits l
                          WHERE l.tenant_id = t1.tenant_id
                            AND l.queue = (SELECT arg.queue FROM arg)) THEN 0
            -- Another transaction holds (or held) the feature row or the bucket.
            WHEN f.held THEN 0
            -- The key limit may bind.
            WHEN (SELECT count(*) FROM pgcrew.tasks x
                   WHERE f.key_max IS NOT NULL AND x.state = 'running'
                     AND x.queue = (SELECT arg.queue FROM arg)) + p_limit
                 > f.key_max THEN 0
            -- The whole tokens, and no more than the tenant's available tasks (what the claim
            -- below locks: no claim can take them first, see `bucket`).
            WHEN f.rate THEN greatest(0, least(p_limit, floor(f.tokens),
                                               -- (At most 1,000, as `picked` below.)
                                               (SELECT count(*) FROM (
                                                   SELECT FROM pgcrew.tasks a
                                                    WHERE a.state = 'available'
                                                      AND a.queue = (SELECT arg.queue FROM arg)
                                                      AND a.tenant_id = t1.tenant_id
                                                    LIMIT 1000) c)))::integer
            ELSE p_limit END AS n
          FROM t1 LEFT JOIN feat f ON true),
    -- The tokens of what is claimed, taken from the bucket while it is the version the snapshot
    -- saw (waiting for a claimer that holds it: then it moved, and this steps aside).
    bucket AS (
        UPDATE pgcrew.rate_limits l
           SET tokens = r.tokens - r.n, refilled_at = greatest(l.refilled_at, now())
          FROM room r
         WHERE l.scope = 'queue' AND l.name = (SELECT arg.queue FROM arg) AND r.rate AND r.n > 0
           AND l.xmin = r.version
        RETURNING l.tokens),
    -- A key-limited queue: its feature row written once (after the bucket), raising the counter
    -- (later fast claims with an older snapshot step aside); without a rate limit only while the
    -- counter is the one the snapshot saw.
    gate AS (
        UPDATE pgcrew.claim_features f SET claims = f.claims + 1
          FROM room r
         WHERE f.queue = (SELECT arg.queue FROM arg) AND f.key_max IS NOT NULL
           AND r.key_max IS NOT NULL AND r.n > 0
           AND CASE WHEN r.rate THEN EXISTS (SELECT FROM bucket) ELSE f.claims = r.claims END
        RETURNING f.claims),
    -- The outer LIMIT takes the tasks from the locking scan one by one: only those it takes are
    -- locked. The inner one, a constant, bounds what the planner expects the scan to read (see
    -- `arg` above): at most 1,000 tasks per statement.
    picked AS (
        SELECT c.id FROM (
            SELECT a.id FROM pgcrew.tasks a
             WHERE a.state = 'available' AND a.queue = (SELECT arg.queue FROM arg)
               AND a.tenant_id = (SELECT t1.tenant_id FROM t1)
             ORDER BY a.priority, a.run_at, a.id
             LIMIT 1000
             FOR UPDATE SKIP LOCKED) c
         -- How many (0: step aside), decided and the bucket and feature row written before any
         -- task is locked. (With a rate limit the feature row is not written only when its key
         -- limit was removed since the snapshot: the tokens are taken, the claim goes ahead.)
         LIMIT coalesce((SELECT CASE
                             WHEN r.rate AND NOT EXISTS (SELECT FROM bucket) THEN 0
                             WHEN r.key_max IS NOT NULL AND NOT EXISTS (SELECT FROM gate)
                                  AND NOT r.rate THEN 0
                             ELSE r.n END
                           FROM room r), 0)),
    claimed AS (
        UPDATE pgcrew.tasks t
           SET state = 'running', attempts = t.attempts + 1, claimed_by = p_instance,
               claim_token = p_token, claimed_at = now(), heartbeat_at = now()
         WHERE t.id = ANY (ARRAY(SELECT p.id FROM picked p))
        RETURNING t.id, t.queue, t.kind, t.tenant_id, t.run_id, t.priority, t.payload, t.attempts,
                  t.max_attempts, t.claim_token, t.run_at, t.created_at,
                  (extract(epoch FROM (now() - t.run_at)) * 1000000)::bigint AS lag_us,
                  t.trace_context)
    -- The claimed tasks; none claimed: one row of NULLs (but `limited`) while the queue has work,
    -- no row when it has none.
    SELECT c.*, EXISTS (SELECT FROM feat) AS limited
      FROM (SELECT) AS one LEFT JOIN claimed c ON true
     WHERE c.id IS NOT NULL
        OR EXISTS (SELECT FROM t1)
        OR (SELECT s.run_at FROM pgcrew.tasks s
             WHERE s.state IN ('scheduled', 'retryable') AND s.pending_deps = 0
               AND s.queue = (SELECT arg.queue FROM arg) AND s.run_at <= now()
             ORDER BY s.run_at LIMIT 1) IS NOT NULL;
END $$;

-- Functions: nothing for PUBLIC (as V010; every migration creating functions revokes again).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgcrew FROM PUBLIC;
