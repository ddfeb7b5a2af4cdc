-- Tenant $1's max_concurrent_runs for run $2: NULL without a limit, and for a sub-agent run
-- (V021), which runs inside its parent's slot and is not held back by the limit, and for an
-- unknown tenant.
SELECT (SELECT t.max_concurrent_runs FROM pgcrew.tenants t
         WHERE t.id = $1
           AND NOT EXISTS (SELECT 1 FROM pgcrew.runs r
                            WHERE r.id = $2 AND r.parent_relation = 'subagent'))
