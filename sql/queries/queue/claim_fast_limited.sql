-- The worker pool's claim for a single queue that has a rate limit or a key limit (V035), in
-- one statement, while the limits cannot bind: it claims what sql/queries/queue/claim_fast.sql
-- would (one unlimited tenant with work, nothing due to promote), and also when the queue has
-- -- a queue rate limit: at most its whole tokens, taken in this statement by one UPDATE of
--    the bucket row, made only while the row is the version this statement's snapshot saw (no
--    claim of the queue committed since: every claim that takes tasks of a rate-limited queue
--    writes its bucket), so the tasks the snapshot counts are the ones it locks, and exactly
--    as many tokens are taken as tasks are claimed;
-- -- a key limit far from its bound: the queue's running tasks plus $2 at most the limit (no
--    key can reach it, as in V031), counted with this statement's snapshot, the queue's
--    feature row then written once (its `claims` counter raised), which holds it against
--    pgcrew.claim_tasks (it raises the counter under the key lock before it counts, so its
--    count waits for this claim's commit) and, without a rate limit, only while the counter
--    is the one the snapshot saw (no claim committed since; with one, the bucket's version
--    said so).
-- Each row is written once: the UPDATE's own row lock is the only one taken on it (no
-- `FOR UPDATE` first, which wrote the row's lock as a separate heap change and WAL record;
-- V045 keeps the bucket's token update from preparing CHECK constraints).
-- It steps aside when either row is held by a transaction this snapshot does not see
-- completed (see `feat`), as `SKIP LOCKED` did; only a claimer that takes the row between this
-- statement's read and its UPDATE makes it wait (and then find the row moved, and step aside). It waits holding
-- nothing but the bucket (rows locked in the order bucket, feature row, tasks, the order
-- pgcrew.set_rate_limit's and clear_rate_limit's triggers take them too; pgcrew.claim_tasks
-- takes the bucket with SKIP LOCKED). Tasks are locked without waiting, after both rows.
-- It steps aside (claims nothing) when the queue or a tenant of it is paused, a kind or tenant
-- rate limit exists, the bucket or the counter moved since its snapshot, or the key limit may
-- bind; pgcrew.claim_tasks then decides. A queue without features claims as claim_fast.sql
-- (which is cheaper: the pool uses it for such queues). Nothing is locked or written unless
-- the queue has an available task this claim may take: a claim of an empty queue writes
-- nothing (no transaction id, no WAL).
-- Its rows: the tasks claimed (and their stored trace context); or, when it
-- claimed none while the queue has work (an available task, or a delayed or retryable one
-- due), one row whose columns are all NULL but `limited`: it stepped aside, and
-- pgcrew.claim_tasks decides; or no row at all: the queue has no work, so pgcrew.claim_tasks
-- would claim nothing and the caller need not run it (a pool going idle after each task saved
-- that round trip, and with a key limit its write of the feature row's counter). `limited`
-- says whether the queue had a feature row (false: claim_fast.sql would have done).
-- $1 queue, $2 limit, $3 claiming instance, $4 claim token.
-- The tenant is found from the end of the queue's range of tasks_available_idx and "another
-- tenant" looked for below it, as in claim_fast.sql (the head of the range is a run of dead
-- entries of the tasks claimed since the last vacuum).
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
WITH arg AS MATERIALIZED (SELECT $1::text AS queue),
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
                 AND x.queue = (SELECT arg.queue FROM arg)) + $2::integer
             > f.key_max THEN 0
        -- The whole tokens, and no more than the tenant's available tasks (what the claim
        -- below locks: no claim can take them first, see `bucket`).
        WHEN f.rate THEN greatest(0, least($2, floor(f.tokens),
                                           -- (At most 1,000, as `picked` below.)
                                           (SELECT count(*) FROM (
                                               SELECT FROM pgcrew.tasks a
                                                WHERE a.state = 'available'
                                                  AND a.queue = (SELECT arg.queue FROM arg)
                                                  AND a.tenant_id = t1.tenant_id
                                                LIMIT 1000) c)))::integer
        ELSE $2::integer END AS n
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
           AND s.queue = (SELECT arg.queue FROM arg) AND s.run_at <= now()
         ORDER BY s.run_at LIMIT 1) IS NOT NULL
