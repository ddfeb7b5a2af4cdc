-- The overview's paused queues (pgcrew.queue_pauses: tenant NULL for every tenant) and who
-- paused them from the console (the newest pause that changed something, if recorded).
SELECT p.queue, p.tenant_id, p.paused_at,
       (SELECT e.actor FROM pgcrew.queue_pause_events e
         WHERE e.queue = p.queue AND e.tenant_id IS NOT DISTINCT FROM p.tenant_id
           AND e.action = 'pause' AND e.changed
         ORDER BY e.id DESC LIMIT 1) AS paused_by
  FROM pgcrew.queue_pauses p
 ORDER BY p.queue, p.tenant_id NULLS FIRST
