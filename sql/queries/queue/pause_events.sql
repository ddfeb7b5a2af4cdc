-- The newest $2 recorded pauses and resumes of queue $1 (NULL: of every queue), newest first.
SELECT id, queue, tenant_id, action, actor, changed, at
  FROM pgcrew.queue_pause_events
 WHERE $1::text IS NULL OR queue = $1
 ORDER BY id DESC
 LIMIT $2
