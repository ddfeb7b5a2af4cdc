-- The first backpressure threshold that an enqueue of tenant $2 into queue $1 would pass
-- (V028): the queue's, then the tenant's in the queue, with the available depth counted up to
-- just past the threshold (index-only on tasks_available_idx). No row: below every threshold.
SELECT b.tenant_id, b.max_available, d.n AS depth
  FROM pgcrew.queue_backpressure b,
       LATERAL (SELECT count(*) AS n FROM (
                    SELECT 1 FROM pgcrew.tasks a
                     WHERE a.state = 'available' AND a.queue = $1
                       AND (b.tenant_id IS NULL OR a.tenant_id = b.tenant_id)
                     LIMIT b.max_available) x) d
 WHERE b.queue = $1 AND (b.tenant_id IS NULL OR b.tenant_id = $2)
   AND d.n >= b.max_available
 ORDER BY b.tenant_id NULLS FIRST
 LIMIT 1
