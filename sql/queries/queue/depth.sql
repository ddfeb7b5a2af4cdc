-- Every known queue's depth and pause state (the pgcrew.queue_depth view, V028), with the
-- tenants paused in it.
SELECT d.queue, d.available, d.scheduled, d.running, d.oldest_available_age_s, d.paused,
       coalesce((SELECT array_agg(p.tenant_id ORDER BY p.tenant_id) FROM pgcrew.queue_pauses p
                  WHERE p.queue = d.queue AND p.tenant_id IS NOT NULL), '{}') AS paused_tenants
  FROM pgcrew.queue_depth d
 ORDER BY d.queue
