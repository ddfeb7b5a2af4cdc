-- The wait a run is in, if any: signal name, step key, deadline, parked task.
SELECT name, step_key, deadline, task_id FROM pgcrew.run_waits WHERE run_id = $1
