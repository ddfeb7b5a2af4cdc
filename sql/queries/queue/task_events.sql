-- The recorded actions on task $1, oldest first.
SELECT id, task_id, at, action, actor, previous_state, state, source
  FROM pgcrew.task_events
 WHERE task_id = $1
 ORDER BY id
