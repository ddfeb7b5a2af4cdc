-- `(state = 'running') IS TRUE`, not `state = 'running'` (issue #23): tasks_running_idx's
-- predicate must not match, or the cached generic plan (which expects one running task) reads
-- every running task of every queue, plus the entries of tasks finished since the last vacuum,
-- on each heartbeat; by primary key it reads the held tasks only.
UPDATE pgcrew.tasks
   SET heartbeat_at = now()
 WHERE id = ANY ($1) AND claimed_by = $2 AND (state = 'running') IS TRUE
RETURNING id, cancel_requested_at IS NOT NULL AS cancel_requested
