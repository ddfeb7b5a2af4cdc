-- Backpressure threshold (V028): at most $3 available tasks in queue $1 (of tenant $2, or in
-- all when NULL).
INSERT INTO pgcrew.queue_backpressure (queue, tenant_id, max_available) VALUES ($1, $2, $3)
ON CONFLICT ON CONSTRAINT queue_backpressure_unique DO UPDATE
   SET max_available = EXCLUDED.max_available
