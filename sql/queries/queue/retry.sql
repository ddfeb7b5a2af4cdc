SELECT previous_state, state FROM pgcrew.retry_task($1)
