-- The worker pool's claim for a single queue that has a rate limit or a key limit (V035), in
-- one statement, while the limits cannot bind: it claims what sql/queries/queue/claim_fast.sql
-- would (one unlimited tenant with work, nothing due to promote), and also when the queue has
-- -- a queue rate limit: at most its whole tokens, taken in this statement (the bucket row locked
--    and read as of now, so exact across instances, with bursts, as pgcrew.claim_tasks takes
--    them);
-- -- a key limit far from its bound: the queue's running tasks plus $2 at most the limit (no
--    key can reach it, as in V031), counted with this statement's snapshot while the queue's
--    feature row is locked and its `claims` counter is the one the snapshot saw (no claim
--    committed since, none in flight: pgcrew.claim_tasks raises it under the key lock before
--    it counts, and this statement raises it when it claims).
-- It steps aside (claims nothing) when the queue or a tenant of it is paused, a kind or tenant
-- rate limit exists, the bucket or the feature row is held by another claimer, the counter
-- moved, or the key limit may bind; pgcrew.claim_tasks then decides. A queue without features
-- claims as claim_fast.sql (which is cheaper: the pool uses it for such queues).
-- Every lock it takes (feature row, bucket, tasks) is taken without waiting, the rows it
-- locks before any task; and only while the queue has an available task: a claim of an empty
-- queue locks and writes nothing (no transaction id, no WAL), where it used to lock the feature
-- row and the bucket on every idle claim.
-- Its rows: the tasks claimed (and their stored trace context); or, when it
-- claimed none while the queue has work (an available task, or a delayed or retryable one
-- due), one row whose columns are all NULL but `limited`: it stepped aside, and
-- pgcrew.claim_tasks decides; or no row at all: the queue has no work, so pgcrew.claim_tasks
-- would claim nothing and the caller need not run it (a pool going idle after each task saved
-- that round trip, and with a key limit its write of the feature row's counter). `limited`
-- says whether the queue had a feature row (false: claim_fast.sql would have done).
-- $1 queue, $2 limit, $3 claiming instance, $4 claim token.
WITH t1 AS (
    SELECT a.tenant_id FROM pgcrew.tasks a
     WHERE a.state = 'available' AND a.queue = $1::text
     ORDER BY a.tenant_id LIMIT 1),
-- The queue's features as this statement's snapshot saw them (none: no row).
feat AS (
    SELECT f.paused, f.key_max, f.rate, f.claims FROM pgcrew.claim_features f
     WHERE f.queue = $1),
-- The newest feature row of a key-limited queue, locked (FOR UPDATE reads the newest version)
-- when the queue has an available task (none: nothing to claim, nothing locked).
gate AS (
    SELECT f.claims FROM pgcrew.claim_features f
     WHERE f.queue = $1 AND f.key_max IS NOT NULL AND EXISTS (SELECT FROM t1)
       FOR UPDATE SKIP LOCKED),
-- The queue's token bucket, locked, as of now (only when the queue has an available task).
bucket AS (
    SELECT pgcrew.rate_tokens(l) AS tokens FROM pgcrew.rate_limits l
     WHERE l.scope = 'queue' AND l.name = $1 AND EXISTS (SELECT FROM t1)
       FOR UPDATE SKIP LOCKED),
-- How many this statement may claim (0: step aside).
room AS (
    SELECT CASE
        -- Kind or tenant rate limits exist: pgcrew.claim_tasks takes their tokens.
        WHEN EXISTS (SELECT FROM pgcrew.claim_features f WHERE f.queue = '') THEN 0
        WHEN NOT EXISTS (SELECT FROM feat) THEN $2::integer
        WHEN (SELECT f.paused FROM feat f) THEN 0
        WHEN (SELECT f.key_max FROM feat f) IS NOT NULL
             AND (NOT EXISTS (SELECT FROM gate)
                  OR (SELECT g.claims FROM gate g) <> (SELECT f.claims FROM feat f)
                  OR (SELECT count(*) FROM pgcrew.tasks x
                       WHERE x.state = 'running' AND x.queue = $1) + $2
                     > (SELECT f.key_max FROM feat f)) THEN 0
        WHEN (SELECT f.rate FROM feat f) THEN
             -- (No row: another claimer holds the bucket. LEAST would skip a NULL.)
             coalesce((SELECT greatest(0, least($2, floor(b.tokens)))::integer FROM bucket b), 0)
        ELSE $2 END AS n),
picked AS (
    SELECT a.id FROM pgcrew.tasks a
     WHERE a.state = 'available' AND a.queue = $1 AND a.tenant_id = (SELECT t1.tenant_id FROM t1)
       -- Another tenant has work: fair shares are pgcrew.claim_tasks's job.
       AND (SELECT o.tenant_id FROM pgcrew.tasks o
             WHERE o.state = 'available' AND o.queue = $1
               AND o.tenant_id > (SELECT t1.tenant_id FROM t1)
             ORDER BY o.tenant_id LIMIT 1) IS NULL
       -- A delayed or retryable task is due: pgcrew.claim_tasks promotes it.
       AND (SELECT s.run_at FROM pgcrew.tasks s
             WHERE s.state IN ('scheduled', 'retryable') AND s.pending_deps = 0
               AND s.queue = $1 AND s.run_at <= now()
             ORDER BY s.run_at LIMIT 1) IS NULL
       -- The tenant is limited: pgcrew.claim_tasks counts its running tasks under a lock.
       AND NOT EXISTS (SELECT FROM pgcrew.tenants tn
                        WHERE tn.id = (SELECT t1.tenant_id FROM t1)
                          AND tn.max_concurrent_tasks IS NOT NULL)
       AND NOT EXISTS (SELECT FROM pgcrew.tenant_queue_limits l
                        WHERE l.tenant_id = (SELECT t1.tenant_id FROM t1) AND l.queue = $1)
     ORDER BY a.priority, a.run_at, a.id
     -- Decided (and the feature row and bucket locked) before any task is locked.
     LIMIT (SELECT r.n FROM room r)
     FOR UPDATE SKIP LOCKED),
-- The tokens of what was claimed (only when something was).
spend AS (
    UPDATE pgcrew.rate_limits l
       SET tokens = (SELECT b.tokens FROM bucket b) - (SELECT count(*) FROM picked),
           refilled_at = greatest(l.refilled_at, now())
     WHERE l.scope = 'queue' AND l.name = $1
       AND EXISTS (SELECT FROM bucket) AND EXISTS (SELECT FROM picked)),
-- A claim was made: later fast claims with an older snapshot step aside.
bump AS (
    UPDATE pgcrew.claim_features f SET claims = f.claims + 1
     WHERE f.queue = $1 AND EXISTS (SELECT FROM gate) AND EXISTS (SELECT FROM picked)),
claimed AS (
    UPDATE pgcrew.tasks t
       SET state = 'running', attempts = t.attempts + 1, claimed_by = $3::text,
           claim_token = $4::uuid, claimed_at = now(), heartbeat_at = now()
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
           AND s.queue = $1 AND s.run_at <= now()
         ORDER BY s.run_at LIMIT 1) IS NOT NULL
