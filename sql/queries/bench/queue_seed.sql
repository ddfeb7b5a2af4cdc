-- `pgcrew bench scale`: add $1 tasks of tenant $2 to queue 'default' in state $3 ('available'
-- or 'completed') with one INSERT ... SELECT (the enqueue path itself is measured by
-- `pgcrew bench queue`). Their times are spread over the last 23 hours, inside the default 24 h
-- retention: an old backlog, or a day of finished work that retention has not deleted yet.
INSERT INTO pgcrew.tasks (queue, kind, tenant_id, state, payload, attempts, run_at,
                          created_at, finalized_at)
SELECT 'default', 'noop', $2::text, $3::text, jsonb_build_object('i', g),
       CASE WHEN $3::text = 'available' THEN 0 ELSE 1 END,
       now() - (g % 82800) * interval '1 second',
       now() - (g % 82800) * interval '1 second',
       CASE WHEN $3::text = 'available' THEN NULL ELSE now() - (g % 82800) * interval '1 second' END
  FROM generate_series(1, $1::bigint) AS g
