-- The overview's queue depth, read through the queue's own partial indexes only (no scan of
-- finished tasks): available (with the oldest's age), running, scheduled and retryable tasks
-- that are due once their time comes (not those waiting for parents), and tasks finished in
-- the last five minutes by final state.
SELECT queue, 'available' AS state, count(*)::int8 AS tasks,
       extract(epoch FROM now() - min(run_at))::float8 AS oldest_available_age_s
  FROM pgcrew.tasks WHERE state = 'available' GROUP BY queue
UNION ALL
SELECT queue, 'running', count(*), NULL FROM pgcrew.tasks WHERE state = 'running' GROUP BY queue
UNION ALL
SELECT queue, state, count(*), NULL
  FROM pgcrew.tasks
 WHERE state IN ('scheduled', 'retryable') AND pending_deps = 0
 GROUP BY queue, state
UNION ALL
SELECT queue, state || ' (5 min)', count(*), NULL
  FROM pgcrew.tasks
 WHERE state IN ('completed', 'discarded', 'cancelled') AND finalized_at > now() - interval '5 minutes'
 GROUP BY queue, state
ORDER BY 1, 2
