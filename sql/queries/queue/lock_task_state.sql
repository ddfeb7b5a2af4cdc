-- The state of task $1 before a person's action on it, locked until the action commits.
SELECT state FROM pgcrew.tasks WHERE id = $1 FOR UPDATE
