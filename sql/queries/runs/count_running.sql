-- Runs of a tenant currently running, and the tenant's limit.
SELECT (SELECT count(*) FROM pgcrew.runs WHERE tenant_id = $1 AND state = 'running'),
       (SELECT max_concurrent_runs FROM pgcrew.tenants WHERE id = $1)
