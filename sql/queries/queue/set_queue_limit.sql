INSERT INTO pgcrew.tenant_queue_limits (tenant_id, queue, max_concurrent_tasks)
VALUES ($1, $2, $3)
ON CONFLICT (tenant_id, queue) DO UPDATE SET max_concurrent_tasks = EXCLUDED.max_concurrent_tasks
