SELECT id, state FROM pgcrew.rescue_tasks($1, $2)
