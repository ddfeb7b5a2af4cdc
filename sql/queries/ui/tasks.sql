-- The operations console's task list: newest first, filtered by queue, state, tenant, kind and
-- payload containment (jsonb @>), below task id $7 when given (the next page's cursor). With a
-- payload filter this is the search through a GIN index on payload (ui/payload_index.sql);
-- without one, ui/tasks_payload_window.sql looks at a bounded window instead.
SELECT id, queue, kind, tenant_id, run_id, priority, state, payload, attempts, max_attempts,
       run_at, claimed_by, heartbeat_at, last_error, errors, unique_key, depends_on,
       pending_deps, cancel_requested_at, created_at, finalized_at
  FROM pgcrew.tasks
 WHERE ($1::text IS NULL OR queue = $1)
   AND ($2::text IS NULL OR state = $2)
   AND ($3::text IS NULL OR tenant_id = $3)
   AND ($4::text IS NULL OR kind = $4)
   AND ($5::jsonb IS NULL OR payload @> $5)
   AND ($7::int8 IS NULL OR id < $7)
 ORDER BY id DESC
 LIMIT $6
