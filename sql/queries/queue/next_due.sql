SELECT greatest(0, (extract(epoch FROM (s.run_at - now())) * 1000000)::bigint) AS due_in_us
  FROM pgcrew.tasks s
 WHERE s.state IN ('scheduled', 'retryable') AND s.pending_deps = 0 AND s.queue = ANY ($1)
 ORDER BY s.run_at
 LIMIT 1
