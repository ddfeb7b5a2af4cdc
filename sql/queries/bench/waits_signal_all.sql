-- `pgcrew bench waits`: signal `go` to up to $2 waiting runs of tenant $1 (one statement).
SELECT count(pgcrew.signal_run(r.id, 'go', '{"bench": true}'::jsonb))
  FROM (SELECT id FROM pgcrew.runs WHERE tenant_id = $1::text AND state = 'waiting' LIMIT $2::int4) r
