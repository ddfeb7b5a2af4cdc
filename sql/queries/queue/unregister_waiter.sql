-- This pool is saturated (or stopping): no wake-ups needed. An enqueue may have named it to
-- claim a task it will now not take: if its queue still has available work and other pools wait
-- on it, wake them all (an unnamed NOTIFY) rather than leave the work to their poll. Returns the
-- number of queues woken.
WITH gone AS (
    DELETE FROM pgcrew.queue_waiters WHERE pool_id = $1 RETURNING queue)
SELECT count(*)::int8
  FROM gone g
 WHERE EXISTS (SELECT FROM pgcrew.queue_waiters w WHERE w.queue = g.queue AND w.pool_id <> $1)
   AND EXISTS (SELECT FROM pgcrew.tasks t
                WHERE t.queue = g.queue AND t.state = 'available' AND t.run_at <= now())
   AND EXISTS (SELECT FROM pg_notify('pgcrew_task_available',
                                     json_build_object('queue', g.queue)::text))
