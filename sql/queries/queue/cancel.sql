SELECT previous_state, state FROM pgcrew.cancel_task($1)
