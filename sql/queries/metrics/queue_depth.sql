-- /metrics cluster gauges (leader only, at most once per interval): tasks per queue and
-- non-final state (each state is read through its partial index), and the age of the oldest
-- due available task per queue.
SELECT t.queue,
       t.state,
       count(*)::int8 AS tasks,
       extract(epoch FROM now() - min(t.run_at) FILTER (WHERE t.state = 'available'
                                                         AND t.run_at <= now()))::float8
           AS oldest_available_s
  FROM pgcrew.tasks t
 WHERE t.state IN ('scheduled', 'available', 'running', 'retryable')
 GROUP BY t.queue, t.state
