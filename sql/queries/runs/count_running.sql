-- Runs of a tenant in flight now (running, or parked at a durable wait: a waiting run keeps its
-- place), and the tenant's limit for run $2. Sub-agent runs (V021) run inside their parent's
-- slot: they are not counted, and none is held back by the limit.
SELECT (SELECT count(*) FROM pgcrew.runs
         WHERE tenant_id = $1 AND state IN ('running', 'waiting')
           AND parent_relation IS DISTINCT FROM 'subagent'),
       (SELECT t.max_concurrent_runs FROM pgcrew.tenants t
         WHERE t.id = $1
           AND NOT EXISTS (SELECT 1 FROM pgcrew.runs r
                            WHERE r.id = $2 AND r.parent_relation = 'subagent'))
