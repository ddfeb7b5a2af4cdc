-- Record that $3 took action $2 on task $1 (state $4 -> $5) from $6, at the database's time.
INSERT INTO pgcrew.task_events (task_id, action, actor, previous_state, state, source)
VALUES ($1, $2, $3, $4, $5, $6)
