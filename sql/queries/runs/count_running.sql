-- Runs of tenant $1 in flight now (running, or parked at a durable wait: a waiting run keeps
-- its place). Sub-agent runs (V021) run inside their parent's slot: they are not counted.
-- Read only under a limit (runs/run_limit): the count walks the tenant's index entries of those
-- states, live and dead.
SELECT count(*) FROM pgcrew.runs
 WHERE tenant_id = $1 AND state IN ('running', 'waiting')
   AND parent_relation IS DISTINCT FROM 'subagent'
