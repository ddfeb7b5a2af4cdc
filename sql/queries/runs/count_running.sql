-- Runs of a tenant in flight now (running, or parked at a durable wait: a waiting run keeps its
-- place), and the tenant's limit.
SELECT (SELECT count(*) FROM pgcrew.runs WHERE tenant_id = $1 AND state IN ('running', 'waiting')),
       (SELECT max_concurrent_runs FROM pgcrew.tenants WHERE id = $1)
