-- `pgcrew bench rls`: $1 runs alternating between tenants bench-a and bench-b, then $2 events
-- spread evenly over them (placeholder hashes: the bench measures reads, not chains).
WITH r AS (
    INSERT INTO pgcrew.runs (id, tenant_id, state)
    SELECT gen_random_uuid(), CASE WHEN g % 2 = 0 THEN 'bench-a' ELSE 'bench-b' END, 'completed'
      FROM generate_series(1, $1::int) g
    RETURNING id, tenant_id
), numbered AS (
    SELECT id, tenant_id, row_number() OVER () - 1 AS n FROM r
)
INSERT INTO pgcrew.events (run_id, seq, tenant_id, event_type, step_key, payload, prev_hash, hash, created_at)
SELECT nb.id, e.g / $1::int + 1, nb.tenant_id, 'bench', NULL,
       jsonb_build_object('i', e.g, 'text', 'a payload of a few dozen bytes'),
       '\x00'::bytea, '\x00'::bytea, now() - (e.g * interval '1 millisecond')
  FROM generate_series(0, $2::int - 1) e(g)
  JOIN numbered nb ON nb.n = e.g % $1::int
