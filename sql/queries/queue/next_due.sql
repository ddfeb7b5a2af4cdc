-- How long until the next scheduled or retryable task of the queues $1 is due, or (V031) until
-- a rate limit that may hold back their available work has a whole token again (a queue
-- bucket of theirs, or any kind or tenant bucket, while it has less than one token): an idle
-- pool sleeps until then instead of its poll interval, on every instance. NULL: neither.
SELECT greatest(0, (extract(epoch FROM (min(d.at) - now())) * 1000000)::bigint) AS due_in_us
  FROM (SELECT s.run_at AS at
          FROM unnest($1::text[]) AS q(queue),
               LATERAL (SELECT s.run_at FROM pgcrew.tasks s
                         WHERE s.state IN ('scheduled', 'retryable') AND s.pending_deps = 0
                           AND s.queue = q.queue
                         ORDER BY s.run_at
                         LIMIT 1) s
        UNION ALL
        SELECT now() + make_interval(secs => (1 - pgcrew.rate_tokens(l)) / l.per_second)
          FROM pgcrew.rate_limits l
         WHERE EXISTS (SELECT FROM pgcrew.claim_features f
                        WHERE f.queue = ANY ($1::text[]) OR f.queue = '')
           AND (l.scope <> 'queue' OR l.name = ANY ($1::text[]))
           AND pgcrew.rate_tokens(l) < 1
           AND EXISTS (SELECT FROM pgcrew.tasks a
                        WHERE a.state = 'available' AND a.queue = ANY ($1::text[]))) d
HAVING min(d.at) IS NOT NULL
