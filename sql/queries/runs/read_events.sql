-- Events of a run after a seq, in order.
SELECT seq, tenant_id, event_type, step_key, payload, prev_hash, hash, created_at
FROM pgcrew.events
WHERE run_id = $1 AND seq > $2
ORDER BY seq
LIMIT $3
