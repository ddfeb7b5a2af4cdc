-- `pgcrew bench ui`: wake the console's browsers as a run state change would.
SELECT pg_notify('pgcrew_run_state_changed', json_build_object('run_id', $1::uuid)::text)
