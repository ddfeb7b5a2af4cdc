-- The first fork of a run made at a sequence number (forks carry forked_at_seq; sub-runs don't).
SELECT id FROM pgcrew.runs
 WHERE parent_run_id = $1 AND forked_at_seq = $2 AND tenant_id = $3
 ORDER BY created_at, id
 LIMIT 1
