-- A tenant's unfinished work: tasks not final, runs pending or running, runs waiting (parked).
SELECT (SELECT count(*) FROM pgcrew.tasks k
         WHERE k.tenant_id = $1 AND k.state NOT IN ('completed', 'discarded', 'cancelled'))::bigint,
       (SELECT count(*) FROM pgcrew.runs r
         WHERE r.tenant_id = $1 AND r.state IN ('pending', 'running'))::bigint,
       (SELECT count(*) FROM pgcrew.runs r WHERE r.tenant_id = $1 AND r.state = 'waiting')::bigint
