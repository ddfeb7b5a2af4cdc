UPDATE pgcrew.tasks
   SET heartbeat_at = now()
 WHERE id = ANY ($1) AND claimed_by = $2 AND state = 'running'
RETURNING id, cancel_requested_at IS NOT NULL AS cancel_requested
