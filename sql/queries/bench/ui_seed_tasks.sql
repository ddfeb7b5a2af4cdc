-- `pgcrew bench ui`: $1 tasks over ten queues, seven kinds and tenants bench-0..bench-9,
-- payload {"customer": g % 1000, "n": g}; one in ten available, one in a hundred discarded,
-- the rest completed.
INSERT INTO pgcrew.tasks (queue, kind, tenant_id, state, payload, attempts, run_at, created_at,
                          finalized_at, last_error)
SELECT 'q' || (g % 10), 'k' || (g % 7), 'bench-' || (g % 10),
       CASE WHEN g % 10 = 0 THEN 'available' WHEN g % 100 = 1 THEN 'discarded' ELSE 'completed' END,
       jsonb_build_object('customer', g % 1000, 'n', g),
       CASE WHEN g % 10 = 0 THEN 0 ELSE 1 END,
       now() - g * interval '100 milliseconds', now() - g * interval '100 milliseconds',
       CASE WHEN g % 10 = 0 THEN NULL ELSE now() - g * interval '100 milliseconds' END,
       CASE WHEN g % 100 = 1 THEN 'bench error' END
  FROM generate_series(1, $1::int) g
