-- The heartbeat of the tasks $1 that instance $2 holds: `heartbeat_at = now()` on each one
-- still running under its claim; rows (id, cancel_requested, busy).
--
-- It never waits for a row lock (40P01 in CI logs): a held task that another transaction has
-- locked is skipped (`busy`), not waited for. Waiting made the heartbeat one side of a
-- deadlock: it locks the held tasks in id order, and a transaction that enqueues dependants of
-- two of them, the higher id first, locks their rows (the parents' `has_dependants`) in the
-- other order. While it waited, no held task had its heartbeat written either. A busy task is
-- reported as this statement's snapshot saw it (still running under this claim); the lock's
-- holder is an acknowledgement in flight, an enqueue of a dependant, a cancellation request or a
-- rescue, and the next heartbeat writes it or finds it gone. Rescue skips locked tasks as well.
--
-- `(state = 'running') IS TRUE`, not `state = 'running'` (issue #23): tasks_running_idx's
-- predicate must not match, or the cached generic plan (which expects one running task) reads
-- every running task of every queue, plus the entries of tasks finished since the last vacuum,
-- on each heartbeat; by primary key it reads the held tasks only.
WITH beat AS (
    UPDATE pgcrew.tasks t
       SET heartbeat_at = now()
     WHERE t.id = ANY (ARRAY(
               SELECT s.id FROM pgcrew.tasks s
                WHERE s.id = ANY ($1) AND s.claimed_by = $2 AND (s.state = 'running') IS TRUE
                  FOR NO KEY UPDATE SKIP LOCKED))
    RETURNING t.id, t.cancel_requested_at IS NOT NULL AS cancel_requested)
SELECT b.id, b.cancel_requested, false AS busy
  FROM beat b
UNION ALL
SELECT s.id, s.cancel_requested_at IS NOT NULL, true
  FROM pgcrew.tasks s
 -- Read only when some held task was not written (a one-time filter).
 WHERE (SELECT count(*) FROM beat) < cardinality($1)
   AND s.id = ANY ($1) AND s.claimed_by = $2 AND (s.state = 'running') IS TRUE
   AND NOT EXISTS (SELECT FROM beat b WHERE b.id = s.id)
