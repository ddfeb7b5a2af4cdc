SELECT greatest(0, (extract(epoch FROM (min(d.run_at) - now())) * 1000000)::bigint) AS due_in_us
  FROM unnest($1::text[]) AS q(queue),
       LATERAL (SELECT s.run_at FROM pgcrew.tasks s
                 WHERE s.state IN ('scheduled', 'retryable') AND s.pending_deps = 0
                   AND s.queue = q.queue
                 ORDER BY s.run_at
                 LIMIT 1) d
HAVING min(d.run_at) IS NOT NULL
