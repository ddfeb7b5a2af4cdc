-- `pgcrew bench queue --retained N`: $1 finished tasks already in the table, in queue
-- `retained`, as a deployment that keeps its finished tasks has them: completed over the two
-- hours before the last one (inside the default day of retention, outside the hour the console's
-- per-minute figures count).
INSERT INTO pgcrew.tasks (queue, kind, state, payload, attempts, run_at, claimed_at, created_at,
                          finalized_at)
SELECT 'retained', 'noop', 'completed', jsonb_build_object('i', g), 1, f.at, f.at, f.at, f.at
  FROM generate_series(1, $1::int8) AS g
 CROSS JOIN LATERAL (
       SELECT now() - interval '3 hours'
              + (g::float8 / $1::int8) * interval '2 hours' AS at) f
