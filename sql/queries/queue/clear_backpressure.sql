-- Remove a backpressure threshold (V028).
DELETE FROM pgcrew.queue_backpressure WHERE queue = $1 AND tenant_id IS NOT DISTINCT FROM $2
