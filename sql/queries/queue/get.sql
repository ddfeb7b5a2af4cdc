SELECT id, queue, kind, tenant_id, run_id, priority, state, payload, attempts, max_attempts,
       run_at, claimed_by, heartbeat_at, last_error, errors, unique_key, depends_on,
       pending_deps, cancel_requested_at, created_at, finalized_at
  FROM pgcrew.tasks
 WHERE id = $1
