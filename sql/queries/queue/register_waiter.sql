-- This pool ran out of work on these queues: wake it with NOTIFY when tasks arrive.
INSERT INTO pgcrew.queue_waiters (queue, pool_id, instance_id)
SELECT q, $2, $3 FROM unnest($1::text[]) AS q
ON CONFLICT (queue, pool_id) DO UPDATE SET since = now()
