-- At most $3 tasks of queue $1 running per value of payload field $2 (V028).
INSERT INTO pgcrew.queue_key_limits (queue, key_field, max_running) VALUES ($1, $2, $3)
ON CONFLICT (queue) DO UPDATE
   SET key_field = EXCLUDED.key_field, max_running = EXCLUDED.max_running
