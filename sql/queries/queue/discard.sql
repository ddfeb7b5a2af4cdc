-- Discard task $1 by hand with reason $2 (V033): only a task that is not running and not
-- finished changes.
SELECT previous_state, state FROM pgcrew.discard_task($1, $2)
