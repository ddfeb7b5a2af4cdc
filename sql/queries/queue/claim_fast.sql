-- The worker pool's claim for a single queue, in one statement (no PL/pgSQL call), for the
-- common case: exactly one tenant has available work in the queue, it has no concurrency limit
-- (tenant-wide or for this queue), the queue is not paused and has no key or rate limit, no
-- kind or tenant has a rate limit (V028, through pgcrew.claim_features, V031), and no
-- scheduled / retryable task of the queue is due. Then it claims up to $2 of that tenant's
-- tasks by priority, run_at, id, exactly as pgcrew.claim_tasks would.
-- Its rows (as claim_fast_limited.sql's, V035): the tasks claimed; or, when the path does not
-- apply while the queue has work (an available task, or a delayed or retryable one due), one
-- row of NULLs: it stepped aside, and the caller runs pgcrew.claim_tasks (fair shares, limits,
-- pauses, promotion); or no row at all: the queue has no work, or the path applied and every
-- task it could take was locked by another claimer (which pgcrew.claim_tasks would skip too),
-- so the caller need not run pgcrew.claim_tasks. (Issue #22: an idle pool woken by an enqueue
-- another instance's pool won sent both statements; at 32 instances that was two claims per
-- instance per enqueue. A worker pool whose queue has a rate or key limit uses
-- claim_fast_limited.sql instead, V035: it claims under those limits while they cannot bind.)
-- The checks are evaluated once (the one-row `ok`, a one-time filter of the locking subquery)
-- and the due probe once (`due`); the stepped-aside row re-reads neither.
-- The two probes of pgcrew.tasks are ordered LIMIT 1 subqueries, not EXISTS: for an EXISTS the
-- planner may pick a sequential scan when it expects many matching rows (several tenants in
-- the statistics), which reads the whole heap when the matching rows sit at its end
-- (`pgcrew bench scale` saw claims double). ORDER BY the index's own order keeps them on
-- tasks_available_idx / tasks_due_idx.
-- The tenant is found from the end of the queue's range of tasks_available_idx (its highest
-- tenant, a backward scan), and "another tenant has work" looks below it: a claimed task's
-- entry stays in the index, dead, until VACUUM, and claims take the head of the range, so
-- between vacuums the head is a run of dead entries as long as the tasks claimed since. The
-- claim's own ordered scan must step over it; the tenant probe, read from the head, stepped
-- over it a second time (issue #23: with 100,000 tasks claimed since the last vacuum, 730
-- index pages, as many as the claim's own scan, so a claim's cost grew twice as fast with the
-- run's length). From the end the probes read a few pages: the tail of the range is the last
-- work to be claimed.
-- The claim token comes from the caller ($4, random, one per claim as in pgcrew.claim_tasks):
-- gen_random_uuid() cost ~0.04 ms on an idle backend, a tenth of the whole statement.
-- It also returns the task's stored trace context (V027), so a tracing pool needs no second
-- statement for tasks without a run.
-- $1 queue, $2 limit, $3 claiming instance, $4 claim token.
-- One plan (issue #23). PostgreSQL plans a prepared statement for its values five times,
-- then keeps its generic plan unless that looks costlier than those. This one looked
-- costlier when the values gave better estimates (a short queue's share of the rows, a
-- small LIMIT), or when the first calls saw a shorter queue than the generic plan did
-- (the locking scan's LIMIT, unknown, is costed as a tenth of the queue): then it was
-- planned on every call, ~0.5 ms each time, more than running it (6,300-6,450 plans in
-- 7,170 calls of a `bench queue` round). So the queue is read through `arg`, unknown to
-- every plan, and the locking scan is bounded by a constant LIMIT of 1,000 (a fast claim
-- takes at most 1,000 tasks; the fetcher claims again for the rest): every plan costs the
-- same, and the generic one is kept from the sixth call (test:
-- queue::plans::fast_claims_keep_their_generic_plan).
WITH arg AS MATERIALIZED (SELECT $1::text AS queue, $2::integer AS n),
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
       SET state = 'running', attempts = t.attempts + 1, claimed_by = $3::text,
           claim_token = $4::uuid, claimed_at = now(), heartbeat_at = now()
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
        AND (EXISTS (SELECT FROM t1) OR EXISTS (SELECT FROM due)))
