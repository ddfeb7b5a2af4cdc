-- Runs forked from run $1 (replay's fork_on_drift and explicit forks), oldest first.
SELECT id, state, forked_at_seq, created_at
  FROM pgcrew.runs
 WHERE parent_run_id = $1
 ORDER BY forked_at_seq, created_at
 LIMIT 100
