SELECT id, queue, kind, tenant_id, run_id, priority, state, payload, attempts, max_attempts,
       run_at, claimed_by, heartbeat_at, last_error, errors, unique_key, depends_on,
       pending_deps, cancel_requested_at, created_at, finalized_at
  FROM pgcrew.tasks
 WHERE ($1::text IS NULL OR state = $1)
   AND ($2::text IS NULL OR queue = $2)
   AND ($3::text IS NULL OR tenant_id = $3)
 ORDER BY id DESC
 LIMIT $4
