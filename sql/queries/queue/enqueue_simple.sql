-- Enqueue one task without dependencies or unique key: a plain INSERT (the tenant is locked
-- FOR KEY SHARE; an unknown tenant yields NULL and fails on NOT NULL).
WITH tn AS (
    SELECT tn.id FROM pgcrew.tenants tn WHERE tn.id = $3 FOR KEY SHARE),
v AS (
    SELECT coalesce($8::timestamptz, now() + $7::int8 * interval '1 microsecond') AS run_at)
INSERT INTO pgcrew.tasks AS t (queue, kind, tenant_id, run_id, priority, state, payload,
                               max_attempts, run_at)
SELECT $1, $2, (SELECT tn.id FROM tn), $4, $5,
       CASE WHEN v.run_at > now() THEN 'scheduled' ELSE 'available' END,
       $6, $9, v.run_at
  FROM v
RETURNING t.id, t.state, false AS duplicate
